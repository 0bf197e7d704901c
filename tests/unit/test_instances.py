"""A second recorder is told about the first; a dead one's file is cleaned up."""
from __future__ import annotations

import subprocess
import sys

from tracer.record.instances import Registration


def hold_lock(run_dir) -> subprocess.Popen:
    """Another process registered as tracing, until its stdin closes."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys, pathlib;"
         "from tracer.record.instances import Registration;"
         f"r = Registration(pathlib.Path({str(run_dir)!r})); print('ok', flush=True);"
         "sys.stdin.read(); r.close()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ok"
    return proc


def test_alone_there_is_no_warning_and_the_file_goes_at_close(tmp_path):
    r = Registration(tmp_path)
    assert r.others == [] and r.warning() is None
    assert r.path.exists()
    r.close()
    assert not r.path.exists()


def test_a_running_recorder_is_named(tmp_path):
    other = hold_lock(tmp_path)
    try:
        r = Registration(tmp_path)
        assert r.others == [other.pid]
        assert str(other.pid) in r.warning()
        r.close()
    finally:
        other.communicate("")
    assert Registration(tmp_path).others == []      # it closed: no longer named


def test_a_dead_recorders_file_is_removed(tmp_path):
    other = hold_lock(tmp_path)
    other.kill()
    other.wait()
    stale = tmp_path / f"{other.pid}.lock"
    assert stale.exists()                           # killed: no chance to clean up
    r = Registration(tmp_path)
    assert r.others == [] and not stale.exists()
    r.close()
