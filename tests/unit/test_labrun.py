"""The lab tier's host harness (tests/labrun.py): outcomes from the guest's progress
file, and a VM that hangs costing one test, not the run.  The "VM" here is a small
script that plays the guest's side of the protocol (no QEMU): the harness is under test."""
from __future__ import annotations

import json
import sys
import textwrap

from tests import labrun

FAKE_VM = textwrap.dedent('''
    import json, os, sys, time
    ids = [l for l in open(sys.argv[1]).read().split() if l]
    out = open(os.environ["VFTRACE_LAB_PROGRESS"], "a")
    def put(**r):
        out.write(json.dumps(r) + "\\n"); out.flush()
    for n in ids:
        put(start=n)
        print(n, flush=True)
        hangs = n.endswith("hang") or (n.endswith("hang_once") and not os.path.exists(n + ".hung"))
        if hangs:
            open(n + ".hung", "w").close()
            time.sleep(600)                       # silent: the harness must notice
        for when in ("setup", "call", "teardown"):
            failed = n.endswith("fail") and when == "call"
            put(nodeid=n, when=when, outcome="failed" if failed else "passed",
                text="assert 1 == 2" if failed else "")
        print("PASSED", flush=True)
''')


def write(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_read_progress_takes_each_tests_worst_report(tmp_path):
    p = tmp_path / "progress"
    rep = lambda n, when, outcome, text="": dict(nodeid=n, when=when, outcome=outcome, text=text)
    write(p, [{"start": "a"}, rep("a", "setup", "passed"), rep("a", "call", "passed"),
              rep("a", "teardown", "passed"),
              {"start": "b"}, rep("b", "setup", "failed", "fixture broke"),
              rep("b", "teardown", "passed"),
              {"start": "c"}, rep("c", "setup", "skipped", "no KVM"), rep("c", "teardown", "passed"),
              {"start": "d"}, rep("d", "setup", "passed"), rep("d", "call", "failed", "assert 0"),
              rep("d", "teardown", "failed", "cleanup"),
              {"start": "e"}, rep("e", "setup", "passed")])
    with p.open("a") as f:
        f.write('{"nodeid": "e", "wh')               # cut short when the VM stopped
    results, started = labrun.read_progress(p)
    assert started == ["a", "b", "c", "d", "e"]
    assert results == {"a": ("passed", ""), "b": ("error", "fixture broke"),
                       "c": ("skipped", "no KVM"), "d": ("failure", "assert 0")}


def test_a_hung_vm_costs_the_test_it_hung_in_and_a_new_vm_runs_the_rest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    script = tmp_path / "fake_vm.py"
    script.write_text(FAKE_VM)
    kernel_logs = []

    def vm_command(ids, kernel_log, timeout_s):
        kernel_logs.append(kernel_log)
        kernel_log.write_text("[  1.0] watchdog: BUG: soft lockup - CPU#0 stuck for 22s!\n")
        return [sys.executable, str(script), str(ids)]

    ids = ["t::one", "t::two_fail", "t::three_hang", "t::four", "t::five"]
    run = labrun.LabRun("6.99", ids, tmp_path / "results", tmp_path, timeout_s=300, pfs=1,
                        stall_s=2, vm_command=vm_command)
    run._run()
    assert run.problem is None
    assert run.results["t::one"] == ("passed", "")
    assert run.results["t::two_fail"] == ("failure", "assert 1 == 2")
    outcome, text = run.results["t::three_hang"]
    assert outcome == "failure"
    assert "hung twice" in text and "stalled: no output for 2 s" in text and "soft lockup" in text
    assert run.results["t::four"] == run.results["t::five"] == ("passed", "")
    assert len(kernel_logs) == 3 and len(set(kernel_logs)) == 3          # each VM its own
    log = run.log.read_text()
    assert "[VM 2]" in log and "[lab harness] the lab VM stalled" in log


def test_a_test_that_hangs_once_passes_in_the_next_vm_and_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    script = tmp_path / "fake_vm.py"
    script.write_text(FAKE_VM)
    ids = ["t::one", "t::two_hang_once", "t::three"]
    run = labrun.LabRun("6.99", ids, tmp_path / "results", tmp_path, timeout_s=300, pfs=1,
                        stall_s=1, vm_command=lambda i, kl, t: [sys.executable, str(script), str(i)])
    run._run()
    assert {n: r[0] for n, r in run.results.items()} == dict.fromkeys(ids, "passed")
    assert list(run.hung_once) == ["t::two_hang_once"]
    assert "stalled" in run.hung_once["t::two_hang_once"]
    assert (tmp_path / "results" / "6.99.2.progress").read_text().splitlines()[0] == \
        '{"start": "t::two_hang_once"}'                 # run again first, then the rest


def test_a_vm_that_runs_no_test_is_a_problem_of_every_test(tmp_path):
    run = labrun.LabRun("6.99", ["t::one"], tmp_path / "results", tmp_path, timeout_s=300,
                        pfs=1, stall_s=60,
                        vm_command=lambda ids, kl, t: [sys.executable, "-c", "print('no boot'); raise SystemExit(3)"])
    run._run()
    assert run.results == {}
    assert "ran no test" in run.problem and "exit 3" in run.problem and "no boot" in run.problem


def test_hangs_in_every_vm_stop_after_max_vms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    script = tmp_path / "fake_vm.py"
    script.write_text(FAKE_VM)
    ids = [f"t::h{i}_hang" for i in range(labrun.MAX_VMS + 1)]
    run = labrun.LabRun("6.99", ids, tmp_path / "results", tmp_path, timeout_s=300, pfs=1,
                        stall_s=1, vm_command=lambda i, kl, t: [sys.executable, str(script), str(i)])
    run._run()
    # VM 1 stops in h0, VM 2 in h0 again, VM 3 in h1: no VM is left to run h1 again or
    # the rest, which the proxies report missing.
    assert set(run.results) == {"t::h0_hang", "t::h1_hang"}
    assert run.results["t::h0_hang"][0] == run.results["t::h1_hang"][0] == "failure"
    assert "hung twice" in run.results["t::h0_hang"][1]
    assert "hung twice" not in run.results["t::h1_hang"][1]
