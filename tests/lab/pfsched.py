"""pf_sched in the lab for the tracer's tests: load, bind, gate, read ground truth."""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

from tests.lab import labutil

PARAMS = Path("/sys/module/pf_sched/parameters")
DEBUGFS = Path("/sys/kernel/debug/pf_sched")


def stats(bdf: str) -> dict[str, int | str]:
    out: dict[str, int | str] = {}
    for line in (DEBUGFS / bdf / "stats").read_text().splitlines():
        key, _, value = line.partition(" ")
        out[key] = int(value) if value.lstrip("-").isdigit() else value
    return out


def set_param(name: str, value) -> None:
    (PARAMS / name).write_text(str(value))


def set_enabled(on: bool) -> None:
    """Gate every PF at once (the module param), then let an in-flight switch finish."""
    set_param("enabled", int(on))
    if not on:
        time.sleep(0.3)


@contextlib.contextmanager
def loaded(n_pfs: int, **params):
    """pf_sched loaded with ``params`` and bound to ``n_pfs`` free edu devices."""
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
        for bdf in bound:
            labutil.unbind(bdf)
        labutil.run(["rmmod", "pf_sched"])
