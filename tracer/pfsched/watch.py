"""Notice a PF that leaves while we trace (its device unbound or removed from pf_sched).

The BPF program keeps pf_sched itself loaded while attached (a module's tracepoints and
functions hold a reference), so what can go mid-trace is a PF: its switches stop.  The
recorder keeps what it has and says which PF went and when."""
from __future__ import annotations

import time
from pathlib import Path

DRIVER = Path("/sys/bus/pci/drivers/pf_sched")
CHECK_EVERY_S = 1.0


def bound_pfs(driver: Path = DRIVER) -> set[str]:
    """PCI addresses bound to pf_sched now."""
    try:
        return {p.name for p in driver.iterdir() if p.name.count(":") == 2}
    except OSError:
        return set()


class PfWatch:
    def __init__(self, driver: Path = DRIVER, clock=time.monotonic) -> None:
        self.driver, self.clock = driver, clock
        self.started = clock()
        self.present = bound_pfs(driver)
        self.next_check = self.started + CHECK_EVERY_S

    def check(self) -> list[str]:
        """One line per PF that went away since the last check (at most once a second)."""
        now = self.clock()
        if now < self.next_check:
            return []
        self.next_check = now + CHECK_EVERY_S
        now_bound = bound_pfs(self.driver)
        gone = sorted(self.present - now_bound)
        self.present = now_bound
        after = now - self.started
        return [f"pf_sched: PF {bdf} went away after {after:.1f} s of recording; its switches"
                " up to then are kept" for bdf in gone]
