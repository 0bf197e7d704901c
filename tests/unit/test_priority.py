"""--nice: every thread of vftrace at the value, its workload at the caller's.

The session runs in a child process (with the fake engine of test_session), so the test
process keeps its own priority.  Setting the workload back below --nice needs root, which
CI has.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tracer.cli import main
from tracer.record.priority import PriorityError, call_at_nice, check_nice

REPO = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent("""
    import json, os, sys, threading, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from tests.unit.test_session import FakeEngine
    from tracer.kernel.probes import Plan
    from tracer.record.session import Session, TraceOptions

    tmp = Path(sys.argv[2])
    def task_nices():       # field 19 of /proc/TID/stat: the nice value
        return sorted({int((p / "stat").read_text().rsplit(")", 1)[1].split()[16])
                       for p in Path("/proc/self/task").iterdir()})
    # a thread from before the session, asleep until the end: it must be reached too
    threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
    probe = [sys.executable, "-c", "import os, sys; "
             "open(sys.argv[1], 'w').write(str(os.getpriority(os.PRIO_PROCESS, 0)))",
             str(tmp / "workload-nice")]
    opts = TraceOptions(workload=probe, nice=int(sys.argv[3]))
    s = Session(opts, Plan("pf_sched", "raw_tp"), tool="test", output=tmp / "c.csv",
                engine_factory=FakeEngine)
    s.start()
    later = {}
    t = threading.Thread(target=lambda: later.update(n=os.getpriority(os.PRIO_PROCESS, 0)))
    t.start(); t.join()
    while s.poll(20) is None:
        pass
    meta = s.stop("done")
    print(json.dumps({"tasks": task_nices(), "later": later["n"], "meta": meta["nice"],
                      "workload_exit": meta["workload"]["exit_status"]}))
""")


def run_child(tmp_path, nice: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(REPO), str(tmp_path), str(nice)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the workload is set back below "
                    "--nice, which needs CAP_SYS_NICE (CI runs as root)")
@pytest.mark.parametrize("nice", [-7, 11])
def test_every_vftrace_thread_takes_the_value_and_the_workload_keeps_the_callers(
        tmp_path, nice):
    caller = os.getpriority(os.PRIO_PROCESS, 0)
    got = run_child(tmp_path, nice)
    assert got["tasks"] == [nice]               # the thread from before the session too
    assert got["later"] == nice                 # threads started later inherit it
    assert got["meta"] == nice
    assert got["workload_exit"] == 0
    assert int((tmp_path / "workload-nice").read_text()) == caller


def test_out_of_range_values_are_refused_in_one_line(tmp_path, capsys):
    assert check_nice(None) is None and check_nice(-20) == -20 and check_nice(19) == 19
    for bad in (-21, 20):
        with pytest.raises(PriorityError, match=f"--nice {bad}: give -20 .* to 19"):
            check_nice(bad)
    assert main(["record", "--nice", "40", "-o", str(tmp_path / "x.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["vftrace record: error: --nice 40: give -20 (first) to 19 (last)"]
    assert not list(tmp_path.iterdir())         # refused before anything was written


def test_a_failure_on_the_spawning_thread_reaches_the_caller():
    assert call_at_nice(os.getpriority(os.PRIO_PROCESS, 0), lambda: 42) == 42
    with pytest.raises(ZeroDivisionError):
        call_at_nice(os.getpriority(os.PRIO_PROCESS, 0), lambda: 1 / 0)
