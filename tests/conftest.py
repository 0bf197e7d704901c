"""Three test tiers in one pytest run.

- ``tests/unit``: here, no VM, no root.
- ``tests/lab``: as root inside the lab VM.  On the host each lab test is collected once
  per lab kernel as a proxy item.  When the test loop starts, one VM per kernel is booted
  in the background (``vftrace lab``), all at once: each runs the whole lab tier with a
  JUnit report, on one TCG thread, so two kernels use this 2-core machine's two cores
  while the unit tests run.  Every proxy reports its own test's outcome from that report.
- ``tests/integration``: boot VMs from the host (the lab's exit status, shutdown, ``make
  lab``'s dashboard).  They run after the lab proxies, so they never share the CPU with
  the lab tiers' VMs (their timeouts assume a core of their own).

A lab test that cannot run fails under CI (``CI`` set) and is skipped elsewhere with
the exact reason (no QEMU, no kernel, a skip inside the VM).
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAB_DIR = REPO / "tests" / "lab"
INTEGRATION_DIR = REPO / "tests" / "integration"
RESULTS = REPO / "build" / "lab-results"
LAB_PFS = 10                      # test_many_pfs binds ten; the rest two, plus one for VFIO
LAB_TIMEOUT_S = int(os.environ.get("VFTRACE_LAB_TIMEOUT", "3600"))  # runs took ~2900 s (CI, stop 25)


def in_lab() -> bool:
    return os.environ.get("VFTRACE_LAB") == "1"


def in_ci() -> bool:
    return bool(os.environ.get("CI"))


def is_lab_item(item) -> bool:
    return LAB_DIR in Path(str(item.fspath)).parents


def is_integration_item(item) -> bool:
    return INTEGRATION_DIR in Path(str(item.fspath)).parents


def lab_kernels() -> list[str]:
    """One kernel per series the lab tier covers (VFTRACE_LAB_KERNELS=6.1,6.12 narrows)."""
    from tracer.lab.kernels import installed_kernels, version_key
    wanted = os.environ.get("VFTRACE_LAB_KERNELS", "6.1,6.12").split(",")
    found = []
    for series in wanted:
        series = series.strip()
        match = [k.release for k in installed_kernels() if
                 ".".join(map(str, version_key(k.release)[:2])) == series]
        found.append(match[-1] if match else f"missing:{series}")
    return found


def junit_key(nodeid: str) -> tuple[str, str]:
    parts = nodeid.split("::")
    module = parts[0].removesuffix(".py").replace("/", ".")
    return ".".join([module, *parts[1:-1]]), parts[-1]


class LabRun:
    """One VM boot of one kernel running every selected lab test, in a background thread
    (``start``); ``get`` waits for it."""
    runs: dict[str, "LabRun"] = {}

    def __init__(self, release: str, nodeids: list[str]):
        self.release, self.nodeids = release, nodeids
        self.results: dict[tuple[str, str], tuple[str, str]] = {}
        self.problem: str | None = None
        self.log = RESULTS / f"{release}.log"
        self._proc: subprocess.Popen | None = None
        self._thread = threading.Thread(target=self._run_safely, name=f"lab-{release}",
                                        daemon=True)

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
        RESULTS.mkdir(parents=True, exist_ok=True)
        xml = RESULTS / f"{self.release}.xml"
        xml.unlink(missing_ok=True)
        # The test ids go through a file: the guest command must fit the kernel cmdline.
        ids = RESULTS / f"{self.release}.tests"
        ids.write_text("\n".join(self.nodeids) + "\n")
        inner = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", "-rs",
                 f"--junitxml={xml}", "-o", "junit_family=xunit2", f"@{ids}"]
        cmd = [sys.executable, "-m", "tracer.cli", "lab", "--kernel", self.release,
               "--pfs", str(LAB_PFS), "--timeout", str(LAB_TIMEOUT_S), "--", *inner]
        # Through a pipe: QEMU reopens its stdout by path, which would truncate a file.
        with open(self.log, "wb") as log:
            log.write(f"$ {' '.join(cmd)}\n".encode())
            proc = self._proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE,
                                                 stderr=subprocess.STDOUT,
                                                 stdin=subprocess.DEVNULL)
            for chunk in iter(lambda: proc.stdout.read1(65536), b""):
                log.write(chunk)
                log.flush()
            rc = proc.wait()
        if not xml.exists():
            self.problem = (f"the lab VM ({self.release}) produced no results (exit {rc}); "
                            f"see {self.log}:\n{self.tail()}")
            return
        for case in ET.parse(xml).getroot().iter("testcase"):
            key = (case.get("classname", ""), case.get("name", ""))
            outcome, text = "passed", ""
            for tag in ("failure", "error", "skipped"):
                el = case.find(tag)
                if el is not None:
                    outcome = tag
                    text = (el.get("message") or "") + "\n" + (el.text or "")
                    break
            self.results[key] = (outcome, text.strip())

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """SIGTERM, not SIGKILL: `vftrace lab` stops its VM before it exits."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()

    @classmethod
    def start(cls, release: str, nodeids: list[str]) -> "LabRun":
        if release not in cls.runs:
            run = cls.runs[release] = LabRun(release, nodeids)
            run._thread.start()
        return cls.runs[release]

    @classmethod
    def get(cls, release: str, nodeids: list[str]) -> "LabRun":
        run = cls.start(release, nodeids)
        try:
            run._thread.join()
        except BaseException:               # Ctrl-C or pytest-timeout while waiting
            run.stop()
            raise
        return run

    @classmethod
    def stop_all(cls) -> None:
        for run in cls.runs.values():
            run.stop()


class LabFailure(Exception):
    pass


class LabProxy(pytest.Item):
    """Stands on the host for one lab test on one kernel."""

    def __init__(self, *, release: str, inner_nodeid: str, **kw):
        super().__init__(**kw)
        self.release, self.inner_nodeid = release, inner_nodeid

    def runtest(self):
        run = LabRun.get(self.release, [self.inner_nodeid])
        if run.problem:
            self._cannot_run(run.problem)
        outcome, text = run.results.get(junit_key(self.inner_nodeid), ("missing", ""))
        if outcome == "passed":
            return
        if outcome == "skipped":
            self._cannot_run(f"skipped in the lab VM: {text.splitlines()[0] if text else '?'}")
        if outcome == "missing":
            raise LabFailure(f"no result for {self.inner_nodeid} in the lab run; log tail:\n{run.tail()}")
        raise LabFailure(f"{outcome} in the lab VM ({self.release}):\n{text}")

    def _cannot_run(self, why: str):
        if in_ci():
            raise LabFailure(f"cannot run in CI: {why}")
        pytest.skip(why)

    def repr_failure(self, excinfo):
        if isinstance(excinfo.value, LabFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, None, f"{self.inner_nodeid} [lab {self.release}]"


def pytest_collection_modifyitems(session, config, items):
    if in_lab():
        return
    lab = [i for i in items if is_lab_item(i)]
    if not lab:
        return
    integration = [i for i in items if is_integration_item(i)]
    rest = [i for i in items if not is_lab_item(i) and not is_integration_item(i)]
    proxies = []
    for release in lab_kernels():
        label = release.split("-")[0] if not release.startswith("missing:") else release
        for item in lab:
            proxy = LabProxy.from_parent(item.parent, name=f"{item.name}@{label}",
                                         release=release, inner_nodeid=item.nodeid)
            # The first proxy of a kernel waits for that kernel's whole lab run.
            proxy.add_marker(pytest.mark.timeout(LAB_TIMEOUT_S + 120))
            proxies.append(proxy)
    items[:] = rest + proxies + integration


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session):
    """Boot every selected kernel's lab VM now, all at once, each running the lab tests
    selected for it; the unit tests run meanwhile and the proxies wait for the results."""
    if in_lab() or session.config.option.collectonly:
        return
    wanted: dict[str, list[str]] = {}
    for item in session.items:
        if isinstance(item, LabProxy):
            wanted.setdefault(item.release, []).append(item.inner_nodeid)
    for release, nodeids in wanted.items():
        LabRun.start(release, nodeids)


def pytest_sessionfinish(session, exitstatus):
    LabRun.stop_all()                       # a run cut short leaves no VM behind
