"""pf_sched in the lab for the tracer's tests: load, bind, gate, read ground truth."""
from __future__ import annotations

import contextlib
import os
import signal
import time

from tests.lab import labutil
from tracer.pfsched import control

stats = control.stats
set_param = control.set_param


def set_enabled(on: bool) -> None:
    """Gate every PF at once (the module param), then let an in-flight switch finish."""
    set_param("enabled", int(on))
    if not on:
        time.sleep(0.3)


def unload() -> None:
    """Unbind and unload pf_sched.  If something still holds it, that process is killed
    (so the next test starts clean instead of failing in turn) and named in the error."""
    for bdf in labutil.edu_devices():
        if labutil.current_driver(bdf) == "pf_sched":
            labutil.unbind(bdf)
    if not labutil.module_loaded("pf_sched"):
        return
    first = labutil.run(["rmmod", "pf_sched"], check=False)
    if first.returncode == 0:
        return
    held = {pid: comm for pid, comm in control.holders() if pid != os.getpid()}
    for pid in held:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while labutil.module_loaded("pf_sched") and time.monotonic() < deadline:
        time.sleep(0.2)
        labutil.run(["rmmod", "pf_sched"], check=False)
    if held or labutil.module_loaded("pf_sched"):
        still = "; still loaded 15 s later" if labutil.module_loaded("pf_sched") else ""
        raise RuntimeError(f"rmmod pf_sched: {first.stderr.strip()}; held by "
                           f"{held or 'no process (a BPF program?)'}{' (killed)' if held else ''}"
                           f"{still}")
    # Held a moment by a tracer still detaching (its BPF program pins the module): gone now.


@contextlib.contextmanager
def loaded(n_pfs: int, **params):
    """pf_sched loaded with ``params`` and bound to ``n_pfs`` free edu devices."""
    if labutil.module_loaded("pf_sched"):
        unload()                            # left by a test that failed: start clean
    ko = labutil.kmod_path()
    if not ko.exists():
        raise FileNotFoundError(f"{ko} is not built (make kmod)")
    free = labutil.free_edu_devices()
    if len(free) < n_pfs:
        raise RuntimeError(f"need {n_pfs} free edu devices, have {free}")
    args = [f"{k}={v}" for k, v in params.items()]
    labutil.run(["insmod", str(ko), *args])
    bound = []
    try:
        for bdf in free[:n_pfs]:
            labutil.bind(bdf, "pf_sched")
            bound.append(bdf)
        yield bound
    finally:
        unload()
