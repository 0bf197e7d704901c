"""The host side of the lab tier: one ``vftrace lab`` VM per kernel runs the selected lab
tests and reports each test's outcome through a progress file in the shared tree.

A VM that hangs must cost one test, not the run: the guest writes a line when a test
starts and one per report (``ProgressWriter``, a plugin in the guest's pytest), and the
host watches the VM's output.  When nothing is printed for ``stall_s`` (longer than any
test's own pytest-timeout, so a test that times out inside the guest never looks
stalled), the VM is stopped with SIGTERM (``vftrace lab`` first asks QEMU where the
vCPUs were and the guest for its SysRq dumps, into the kernel log), the test it was in
is run again first in a new VM, which then runs the tests not yet started.  A test that
passes on that second run passes with a warning naming the hang and its diagnostics
(a hang under TCG that does not repeat); one that hangs twice fails with them.
"""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

# Inside the guest each test gets TEST_TIMEOUT_S from pytest-timeout (the slowest took
# 179 s in CI); a VM silent for longer than that plus a margin is hung, not slow.
TEST_TIMEOUT_S = 420
STALL_S = TEST_TIMEOUT_S + 120
MAX_VMS = 3                     # the first boot and two resumes after stalls
PROGRESS_ENV = "VFTRACE_LAB_PROGRESS"


class ProgressWriter:
    """Guest side: a pytest plugin appending one JSON line per test start and report."""

    def __init__(self, path: str):
        self.f = open(path, "a", buffering=1, encoding="utf-8")

    def _put(self, **rec) -> None:
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())           # a guest that hangs next must not lose it

    def pytest_runtest_logstart(self, nodeid, location):
        self._put(start=nodeid)

    def pytest_runtest_logreport(self, report):
        text = ""
        if report.skipped and isinstance(report.longrepr, tuple):
            text = str(report.longrepr[2]).removeprefix("Skipped: ")
        elif report.failed:
            text = report.longreprtext
        self._put(nodeid=report.nodeid, when=report.when, outcome=report.outcome, text=text)


def read_progress(path: Path) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """({nodeid: (outcome, text)} of finished tests, nodeids started) from a progress file.

    A test's outcome is its worst report: "failure" (call failed), "error" (set-up or
    tear-down failed), "skipped", else "passed".  A test is finished once its tear-down
    is reported; one started but not finished is where the VM stopped."""
    reports: dict[str, list[dict]] = {}
    started: list[str] = []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue                        # a line cut short when the VM stopped
        if "start" in rec:
            started.append(rec["start"])
        else:
            reports.setdefault(rec["nodeid"], []).append(rec)
    results = {}
    for nodeid, reps in reports.items():
        if not any(r["when"] == "teardown" for r in reps):
            continue
        outcome, text = "passed", ""
        for r in reps:
            if r["outcome"] == "failed":
                outcome, text = ("failure" if r["when"] == "call" else "error"), r["text"]
                break
            if r["outcome"] == "skipped" and outcome == "passed":
                outcome, text = "skipped", r["text"]
        results[nodeid] = (outcome, text)
    return results, started


def tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(none)"


class LabRun:
    """One kernel's lab tests, in as many VMs as stalls need (up to MAX_VMS), in a
    background thread (``start``); ``get`` waits for it.  ``results`` maps each test's
    node id to (outcome, text); ``problem`` is set when no VM ran any test."""

    def __init__(self, release: str, nodeids: list[str], results_dir: Path, repo: Path,
                 timeout_s: float, pfs: int, stall_s: float = STALL_S, vm_command=None):
        self.release, self.nodeids = release, list(nodeids)
        self.dir, self.repo = results_dir, repo
        self.timeout_s, self.pfs, self.stall_s = timeout_s, pfs, stall_s
        self.vm_command = vm_command or self._vftrace_lab
        self.results: dict[str, tuple[str, str]] = {}
        self.hung_once: dict[str, str] = {}      # test: why its first VM was stopped
        self.problem: str | None = None
        self.log = results_dir / f"{release}.log"
        self.kernel_log = results_dir / f"{release}.kernel.log"
        self._proc: subprocess.Popen | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run_safely, name=f"lab-{release}",
                                        daemon=True)

    def _vftrace_lab(self, ids: Path, kernel_log: Path, timeout_s: float) -> list[str]:
        inner = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", "-rs",
                 "-o", f"timeout={TEST_TIMEOUT_S}", f"@{ids}"]
        return [sys.executable, "-m", "tracer.cli", "lab", "--kernel", self.release,
                "--pfs", str(self.pfs), "--timeout", f"{timeout_s:.0f}",
                "--kernel-log", str(kernel_log), "--", *inner]

    def _run_safely(self) -> None:
        try:
            self._run()
        except BaseException as e:          # reported by every proxy of this kernel
            self.problem = f"the lab run ({self.release}) failed on the host: {e!r}"

    def _run(self) -> None:
        if self.release.startswith("missing:"):
            self.problem = (f"no lab kernel {self.release[8:]} installed "
                            "(run `make setup`: it installs bookworm 6.1 and bookworm-backports 6.12)")
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.timeout_s
        todo = list(self.nodeids)
        with open(self.log, "wb") as log:
            for vm in range(1, MAX_VMS + 1):
                left = deadline - time.monotonic()
                if not todo or left < 60 or self._stopping:
                    break
                kernel_log = (self.kernel_log if vm == 1 else
                              self.kernel_log.with_name(f"{self.release}.{vm}.kernel.log"))
                finished, started, why = self._one_vm(log, todo, kernel_log, left, vm)
                self.results.update(finished)
                stuck = [n for n in started if n not in finished and n in todo]
                for nodeid in stuck:
                    found = (f"{why}\nkernel log ({kernel_log}), last lines:\n"
                             f"{tail(kernel_log, 60)}")
                    if nodeid in self.hung_once:
                        found = f"it hung twice; the first time: {self.hung_once[nodeid]}\n{found}"
                    self.results[nodeid] = ("failure", found)
                if not started:
                    self.problem = (f"the lab VM ({self.release}) ran no test ({why}); see "
                                    f"{self.log}:\n{tail(self.log)}")
                    return
                retry = [n for n in stuck if n not in self.hung_once]
                for nodeid in retry:
                    self.hung_once[nodeid] = f"{why} (kernel log: {kernel_log})"
                todo = retry + [n for n in todo if n not in started]
                if todo and not stuck:
                    break     # ended without a hang before every test ran: reported missing

    def _one_vm(self, log, todo: list[str], kernel_log: Path, left: float, vm: int):
        """Run ``todo`` in one VM; (finished results, nodeids started, why it stopped)."""
        ids = self.dir / f"{self.release}.tests"
        ids.write_text("\n".join(todo) + "\n")
        progress = self.dir / (f"{self.release}.progress" if vm == 1 else
                               f"{self.release}.{vm}.progress")
        progress.unlink(missing_ok=True)
        cmd = self.vm_command(ids, kernel_log, left)
        log.write(f"\n$ [VM {vm}] {PROGRESS_ENV}={progress} {' '.join(cmd)}\n".encode())
        log.flush()
        env = {**os.environ, PROGRESS_ENV: str(progress)}
        # Through a pipe: QEMU reopens its stdout by path, which would truncate a file.
        proc = self._proc = subprocess.Popen(cmd, cwd=self.repo, stdout=subprocess.PIPE,
                                             stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, env=env)
        why = None
        last = time.monotonic()
        stopped_at = None
        fd = proc.stdout.fileno()
        while True:
            ready, _, _ = select.select([fd], [], [], min(5.0, self.stall_s / 4))
            now = time.monotonic()
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                log.write(chunk)
                log.flush()
                last = now
            elif stopped_at is None and now - last > self.stall_s:
                why = (f"the lab VM stalled: no output for {self.stall_s:g} s (longer than "
                       f"any test's own timeout), so it was stopped")
                log.write(f"\n[lab harness] {why}\n".encode())
                log.flush()
                proc.terminate()            # vftrace lab examines the guest, then stops it
                stopped_at = now
            elif stopped_at is not None and now - stopped_at > 120:
                proc.kill()
                if now - stopped_at > 180:
                    break                   # a QEMU left holding the pipe: stop reading
        rc = proc.wait()
        finished, started = read_progress(progress)
        if why is None:
            why = ("the lab VM timed out during this test" if rc == 124 else
                   f"the lab VM ended (exit {rc}) during this test")
        vm_said = [ln for ln in tail(self.log, 400).splitlines() if ln.startswith("vftrace lab: ")]
        if vm_said:
            why += "\n" + "\n".join(vm_said[-8:])
        return finished, started, why

    def stop(self) -> None:
        """SIGTERM, not SIGKILL: `vftrace lab` stops its VM before it exits."""
        self._stopping = True
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
