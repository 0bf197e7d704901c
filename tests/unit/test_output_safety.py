"""Output files: created with the user's umask, never written through a planted symlink.

Every writer (the capture CSV and its meta, the per-call CSV, report and export files)
is tried with a symlink planted where it writes, pointing at a file elsewhere: the
command fails with one line and the file elsewhere is untouched.
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tracer.capture.files import CallWriter, CaptureError, CaptureWriter, meta_path
from tracer.cli import main
from tracer.errors import VftraceError
from tracer.model.schema import CALL_COLUMNS, COLUMNS, CallRecord, SwitchRecord

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
PRECIOUS = "precious, not to be overwritten\n"


def switch(seq: int) -> SwitchRecord:
    return SwitchRecord(*[seq + k for k in range(len(COLUMNS))])


def call(seq: int) -> CallRecord:
    return CallRecord("iommu_map", *[seq + k for k in range(len(CALL_COLUMNS) - 1)])


@pytest.fixture
def victim(tmp_path) -> Path:
    """A file elsewhere that a planted symlink points at."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    target = elsewhere / "victim.txt"
    target.write_text(PRECIOUS)
    return target


def plant(link: Path, target: Path) -> Path:
    link.symlink_to(target)
    return link


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture
def umask():
    """Set the process umask for one test, restored after it."""
    saved = os.umask(0o022)
    os.umask(saved)
    yield os.umask
    os.umask(saved)


# --- the writers ----------------------------------------------------------------------

@pytest.mark.parametrize("mask, mode", [(0o077, 0o600), (0o022, 0o644)])
def test_capture_meta_and_calls_files_follow_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    with CaptureWriter(tmp_path / "cap.csv", {}) as w:
        w.write(switch(1))
    with CallWriter(tmp_path / "cap.calls.csv") as c:
        c.write(call(1))
    umask(0o022)
    for path in (tmp_path / "cap.csv", tmp_path / "cap.meta.json", tmp_path / "cap.calls.csv"):
        assert mode_of(path) == mode, path


@pytest.mark.parametrize("make", [
    lambda p: CaptureWriter(p, {}),
    lambda p: CallWriter(p),
], ids=["capture", "calls"])
def test_a_symlink_at_a_csv_output_is_refused(tmp_path, victim, make):
    link = plant(tmp_path / "out.csv", victim)
    with pytest.raises(CaptureError, match="symlink") as err:
        make(link)
    assert "\n" not in str(err.value)
    assert victim.read_text() == PRECIOUS and link.is_symlink()


def test_a_symlink_at_the_meta_path_is_refused_before_the_csv_is_created(tmp_path, victim):
    plant(tmp_path / "cap.meta.json", victim)
    with pytest.raises(CaptureError, match="symlink"):
        CaptureWriter(tmp_path / "cap.csv", {})
    assert victim.read_text() == PRECIOUS
    assert not (tmp_path / "cap.csv").exists()


def test_a_symlink_planted_at_the_meta_temporary_name_is_not_written_through(tmp_path,
                                                                            victim):
    # The meta is written to .NAME.PID.tmp and renamed: the name is predictable.
    plant(tmp_path / f".cap.meta.json.{os.getpid()}.tmp", victim)
    with CaptureWriter(tmp_path / "cap.csv", {}) as w:
        w.write(switch(1))
    assert victim.read_text() == PRECIOUS
    assert not meta_path(tmp_path / "cap.csv").is_symlink()
    assert '"complete": true' in meta_path(tmp_path / "cap.csv").read_text()


def test_report_atomic_output_refuses_a_symlink_and_never_follows_its_temporary(tmp_path,
                                                                               victim):
    from tracer.capture.output import atomic_output
    with pytest.raises(VftraceError, match="is a symlink"):
        with atomic_output(plant(tmp_path / "r.html", victim)) as f:
            f.write("x")
    plant(tmp_path / f".t.json.{os.getpid()}.tmp", victim)
    with atomic_output(tmp_path / "t.json") as f:
        f.write("{}")
    assert victim.read_text() == PRECIOUS
    assert (tmp_path / "t.json").read_text() == "{}"
    assert not (tmp_path / f".t.json.{os.getpid()}.tmp").exists()


@pytest.mark.parametrize("mask, mode", [(0o077, 0o600), (0o022, 0o644)])
def test_report_atomic_output_follows_the_umask(tmp_path, umask, mask, mode):
    from tracer.capture.output import atomic_output
    umask(mask)
    with atomic_output(tmp_path / "t.json") as f:
        f.write("{}")
    umask(0o022)
    assert mode_of(tmp_path / "t.json") == mode


# --- the commands -----------------------------------------------------------------------

def vftrace(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "tracer.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


def assert_one_line_error(r: subprocess.CompletedProcess, command: str, says: str) -> None:
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"vftrace {command}: error:"), lines[0]
    assert says in lines[0], lines[0]
    assert "Traceback" not in r.stderr + r.stdout


@pytest.fixture
def capture(tmp_path) -> Path:
    for name in ("small.csv", "small.meta.json", "small.calls.csv"):
        shutil.copy(DATA / name, tmp_path / name)
    return tmp_path / "small.csv"


# Each case plants the symlink at the path named LINK; nothing needs root or BPF, as the
# outputs are checked before anything is attached.
@pytest.mark.parametrize("args, link", [
    (["record", "-o", "LINK"], "out.csv"),
    (["record", "-o", "out.csv"], "out.meta.json"),
    (["record", "-o", "out.csv", "--calls", "LINK"], "calls.csv"),
    (["live", "--csv", "LINK"], "live.csv"),
    (["live", "--calls", "LINK"], "calls.csv"),
    (["report", "small.csv", "-o", "LINK"], "report.html"),
    (["report", "small.csv", "-o", "LINK"], "report.png"),
    (["export", "small.csv", "--perfetto", "LINK"], "trace.json"),
    (["export", "small.csv", "--parquet", "LINK"], "cap.parquet"),
    (["export", "small.csv", "--calls-parquet", "LINK"], "calls.parquet"),
])
def test_no_command_writes_through_a_planted_symlink(tmp_path, capture, victim, args, link):
    plant(tmp_path / link, victim)
    r = vftrace(tmp_path, *[link if a == "LINK" else a for a in args])
    assert_one_line_error(r, args[0], "is a symlink")
    assert victim.read_text() == PRECIOUS
    assert (tmp_path / link).is_symlink()


@pytest.mark.parametrize("mask, mode", [(0o077, 0o600), (0o022, 0o644)])
def test_report_and_export_outputs_follow_the_umask(tmp_path, capture, umask, capsys,
                                                    mask, mode):
    umask(mask)
    try:
        assert main(["report", str(capture), "-o", str(tmp_path / "r.html")]) == 0
        assert main(["report", str(capture), "-o", str(tmp_path / "r.svg")]) == 0
        assert main(["export", str(capture), "--perfetto", str(tmp_path / "t.json"),
                     "--parquet", str(tmp_path / "c.parquet")]) == 0
    finally:
        umask(0o022)
    capsys.readouterr()
    for name in ("r.html", "r.svg", "t.json", "c.parquet"):
        assert mode_of(tmp_path / name) == mode, name


# --- one home for each check (#18) -------------------------------------------------------

def test_record_check_output_is_the_capture_rule_as_a_record_error(tmp_path):
    from tracer.capture import output
    from tracer.record.session import RecordError, check_output
    link = tmp_path / "link.csv"
    link.symlink_to(tmp_path / "elsewhere.csv")
    for bad in (str(link), str(tmp_path), str(tmp_path / "no" / "x.csv"), ""):
        with pytest.raises(output.OutputError) as want:
            output.check_output(bad, "--calls")
        with pytest.raises(RecordError) as got:
            check_output(bad, "--calls")
        assert str(got.value) == str(want.value)
    assert check_output(str(tmp_path / "ok.csv"), "--calls") == tmp_path / "ok.csv"


@pytest.mark.parametrize("name, found", [
    ("calls.csv", True), ("../calls.csv", False), ("/etc/passwd", False), ("..", False),
    (".", False), ("sub/calls.csv", False), ("", False), (7, False), (None, False)])
def test_one_calls_path_rule_for_report_and_replay(tmp_path, name, found):
    from tracer.capture.files import calls_path
    from tracer.report.load import calls_path as report_calls_path
    from tui import sources
    cap = tmp_path / "c.csv"
    want = tmp_path / "calls.csv" if found else None
    assert calls_path(cap, {"calls_file": name}) == want
    assert report_calls_path(cap, {"calls_file": name}) == want
    assert sources.calls_path is calls_path
