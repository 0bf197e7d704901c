"""Join blocked-access releases to the switches that released them.

A guest access blocked on a switched-off VF is released by the grant of a switch and
reported when its task runs again, which can be after that switch's record left the
kernel.  Records are therefore held for a short time (``hold_ns``) and releases are
added by (pf, seq); releases that come later than that are counted, never dropped
silently.
"""
from __future__ import annotations

import operator
import time
from collections import OrderedDict
from typing import Callable

from ..model.schema import COLUMNS, SwitchRecord

PF, SEQ = COLUMNS.index("pf"), COLUMNS.index("seq")

MAX_PENDING_RELEASES = 65536


class Assembler:
    """Held switches are plain tuples of their column values (the garbage collector does
    not track tuples of ints, and ~50k are held at 200k records/s); the record is built
    when it is passed on.  Releases for a held switch add up beside it."""

    def __init__(self, emit: Callable[[SwitchRecord], None], hold_ns: int = 250_000_000,
                 clock: Callable[[], int] = time.monotonic_ns):
        self.emit, self.hold_ns, self.clock = emit, hold_ns, clock
        self.held: OrderedDict[tuple[int, int], tuple[int, tuple]] = OrderedDict()
        self.released: dict[tuple[int, int], list[int]] = {}  # held key -> [count, ns]
        self.early: dict[tuple[int, int], list[int]] = {}   # releases before their record
        self.late_releases = 0      # their record had already been passed on
        self.orphan_releases = 0    # dropped from the early table when it overflowed
        self.last_emitted: dict[int, int] = {}                 # pf -> newest seq passed on
        self.next_due: int | None = None                       # when the oldest is due

    def switch(self, rec: SwitchRecord) -> None:
        self.switch_values(_column_values(rec))

    def switch_values(self, values: tuple) -> None:
        """One switch as its column values (``COLUMNS`` order)."""
        key = (values[PF], values[SEQ])
        now = self.clock()
        waits = self.early.pop(key, None)
        if waits:
            self.released[key] = [len(waits), sum(waits)]
        self.held[key] = (now, values)
        if self.next_due is None:
            self.next_due = now + self.hold_ns
        if now >= self.next_due:
            self._pass_on_due(now)

    def release(self, pf: int, seq: int, wait_ns: int) -> None:
        key = (pf, seq)
        if key in self.held:
            extra = self.released.get(key)
            if extra is None:
                self.released[key] = [1, wait_ns]
            else:
                extra[0] += 1
                extra[1] += wait_ns
            return
        if self.emitted_past(pf, seq):
            self.late_releases += 1
            return
        if len(self.early) >= MAX_PENDING_RELEASES:
            _, dropped = self.early.popitem()
            self.orphan_releases += len(dropped)
        self.early.setdefault(key, []).append(wait_ns)

    def emitted_past(self, pf: int, seq: int) -> bool:
        return seq <= self.last_emitted.get(pf, 0)

    def tick(self) -> None:
        if self.next_due is not None:
            now = self.clock()
            if now >= self.next_due:
                self._pass_on_due(now)

    def _pass_on_due(self, now: int) -> None:
        held = self.held
        while held:
            key = next(iter(held))
            arrived = held[key][0]
            if now - arrived < self.hold_ns:
                self.next_due = arrived + self.hold_ns
                return
            self._pass_on(key)
        self.next_due = None

    def flush(self) -> None:
        while self.held:
            self._pass_on(next(iter(self.held)))
        self.next_due = None
        self.orphan_releases += sum(len(v) for v in self.early.values())
        self.early.clear()

    def _pass_on(self, key) -> None:
        _, values = self.held.pop(key)
        rec = SwitchRecord(*values)
        extra = self.released.pop(key, None)
        if extra is not None:
            rec.blocked_accesses += extra[0]
            rec.blocked_ns += extra[1]
        pf, seq = key
        if seq > self.last_emitted.get(pf, 0):
            self.last_emitted[pf] = seq
        self.emit(rec)


_column_values = operator.attrgetter(*COLUMNS)       # a record's values, COLUMNS order
