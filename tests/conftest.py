"""Three test tiers in one pytest run.

- ``tests/unit``: here, no VM, no root.
- ``tests/lab``: as root inside the lab VM.  On the host each lab test is collected once
  per lab kernel as a proxy item.  When the test loop starts, one VM per kernel is booted
  in the background (``vftrace lab``), all at once: each runs the whole lab tier on one
  TCG thread, so two kernels use this 2-core machine's two cores while the unit tests
  run.  Every proxy reports its own test's outcome from the guest's progress file; a VM
  that hangs costs the test it hung in, and a new VM runs the rest (tests/labrun.py).
- ``tests/integration``: boot VMs from the host (the lab's exit status, shutdown, ``make
  lab``'s dashboard).  They run after the lab proxies, so they never share the CPU with
  the lab tiers' VMs (their timeouts assume a core of their own).

A lab test that cannot run fails under CI (``CI`` set) and is skipped elsewhere with
the exact reason (no QEMU, no kernel, a skip inside the VM).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests import labrun

REPO = Path(__file__).resolve().parents[1]
LAB_DIR = REPO / "tests" / "lab"
INTEGRATION_DIR = REPO / "tests" / "integration"
RESULTS = REPO / "build" / "lab-results"
LAB_PFS = 10                      # test_many_pfs binds ten; the rest two, plus one for VFIO
# All of a kernel's lab VMs together: a run took ~3200 s (CI, session 17), and one hang
# adds ~600 s (labrun.STALL_S and a new boot), which must still fit; CI's whole run, the
# integration tests after it included, stays under its 90 minutes even then.
LAB_TIMEOUT_S = int(os.environ.get("VFTRACE_LAB_TIMEOUT", "4200"))


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


class LabRun(labrun.LabRun):
    """One kernel's lab run, shared by all its proxies (``start`` once, ``get`` waits)."""
    runs: dict[str, "LabRun"] = {}

    @classmethod
    def start(cls, release: str, nodeids: list[str]) -> "LabRun":
        if release not in cls.runs:
            run = cls.runs[release] = LabRun(
                release, nodeids, RESULTS, REPO, timeout_s=LAB_TIMEOUT_S, pfs=LAB_PFS,
                stall_s=float(os.environ.get("VFTRACE_LAB_STALL_S", labrun.STALL_S)))
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
        outcome, text = run.results.get(self.inner_nodeid, ("missing", ""))
        if outcome == "passed":
            if self.inner_nodeid in run.hung_once:
                self.warn(pytest.PytestWarning(
                    f"{self.inner_nodeid} [lab {self.release}] hung its VM once and passed in "
                    f"the next: {run.hung_once[self.inner_nodeid]}"))
            return
        if outcome == "skipped":
            self._cannot_run(f"skipped in the lab VM: {text.splitlines()[0] if text else '?'}")
        if outcome == "missing":
            raise LabFailure(f"no result for {self.inner_nodeid} in the lab run; log tail:\n"
                             f"{labrun.tail(run.log)}")
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


def pytest_configure(config):
    """In the lab VM, report each test's progress to the host (tests/labrun.py)."""
    if in_lab() and os.environ.get(labrun.PROGRESS_ENV):
        config.pluginmanager.register(labrun.ProgressWriter(os.environ[labrun.PROGRESS_ENV]),
                                      "vftrace-lab-progress")


def pytest_sessionfinish(session, exitstatus):
    LabRun.stop_all()                       # a run cut short leaves no VM behind
