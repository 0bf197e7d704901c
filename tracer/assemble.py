"""Join blocked-access releases to the switches that released them.

A guest access blocked on a switched-off VF is released by the grant of a switch and
reported when its task runs again, which can be after that switch's record left the
kernel.  Records are therefore held for a short time (``hold_ns``) and releases are
added by (pf, seq); releases that come later than that are counted, never dropped
silently.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable

from .schema import SwitchRecord

MAX_PENDING_RELEASES = 65536


class Assembler:
    def __init__(self, emit: Callable[[SwitchRecord], None], hold_ns: int = 250_000_000,
                 clock: Callable[[], int] = time.monotonic_ns):
        self.emit, self.hold_ns, self.clock = emit, hold_ns, clock
        self.held: OrderedDict[tuple[int, int], tuple[int, SwitchRecord]] = OrderedDict()
        self.early: dict[tuple[int, int], list[int]] = {}   # releases before their record
        self.late_releases = 0      # their record had already been passed on
        self.orphan_releases = 0    # dropped from the early table when it overflowed
        self.last_emitted: dict[int, int] = {}                 # pf -> newest seq passed on

    def switch(self, rec: SwitchRecord) -> None:
        key = (rec.pf, rec.seq)
        for wait_ns in self.early.pop(key, ()):
            rec.blocked_accesses += 1
            rec.blocked_ns += wait_ns
        self.held[key] = (self.clock(), rec)
        self.tick()

    def release(self, pf: int, seq: int, wait_ns: int) -> None:
        held = self.held.get((pf, seq))
        if held:
            held[1].blocked_accesses += 1
            held[1].blocked_ns += wait_ns
            return
        if self.emitted_past(pf, seq):
            self.late_releases += 1
            return
        if len(self.early) >= MAX_PENDING_RELEASES:
            _, dropped = self.early.popitem()
            self.orphan_releases += len(dropped)
        self.early.setdefault((pf, seq), []).append(wait_ns)

    def emitted_past(self, pf: int, seq: int) -> bool:
        return seq <= self.last_emitted.get(pf, 0)

    def tick(self) -> None:
        now = self.clock()
        while self.held:
            key, (arrived, rec) = next(iter(self.held.items()))
            if now - arrived < self.hold_ns:
                break
            self._pass_on(key, rec)

    def flush(self) -> None:
        while self.held:
            key, (_, rec) = next(iter(self.held.items()))
            self._pass_on(key, rec)
        self.orphan_releases += sum(len(v) for v in self.early.values())
        self.early.clear()

    def _pass_on(self, key, rec: SwitchRecord) -> None:
        del self.held[key]
        self.last_emitted[rec.pf] = max(self.last_emitted.get(rec.pf, 0), rec.seq)
        self.emit(rec)
