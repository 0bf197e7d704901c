"""Join what a switch costs after its record left the kernel to that switch.

Two such costs arrive on their own, keyed by (pf, seq) (``struct vft_join``):
- a guest access blocked on a switched-off VF, released by the switch's grant and
  reported when its task runs again (``blocked_accesses``, ``blocked_ns``);
- a KVM exit that began in the switch's window and ended after it, e.g. a vCPU blocked
  in pf_sched's fault handler (its time goes to ``exit_ns``; the exit was counted in
  ``kvm_exits`` by the kernel when it began).
Records are therefore held for a short time (``hold_ns``) and joins are added by
(pf, seq).  The kernel says how many exit ends a switch still awaits (exits_pending), and
its record is held until they are in, however loaded the machine, up to ``max_hold_ns``
(an exit can last as long as its vCPU blocks; one whose VM is torn down never ends).
Joins that come later than that are counted (``late_releases``, ``late_exits`` and
``late_exit_ns``), never dropped silently, and so are the exit ends a record was passed on
without (``unended_exits``: given up on, or still running when the recording stopped).

A switch is given up on (``max_hold_ns``) only in ``tick()``, which the engine calls once
a poll has read every buffer: a reader that was starved for longer than that (a loaded
lab VM) first reads the ends already waiting in the joins buffer.  While records are
being read, only switches with all their ends are passed on, to keep memory bounded.
"""
from __future__ import annotations

import operator
import time
from collections import OrderedDict
from typing import Callable

from ..model.schema import COLUMNS, SwitchRecord

PF, SEQ = COLUMNS.index("pf"), COLUMNS.index("seq")
# What a held switch gathers: [blocked accesses, their wait ns, late exits, their ns]
RELEASES, RELEASE_NS, EXITS, EXIT_NS = range(4)

MAX_PENDING_JOINS = 65536


class Assembler:
    """Held switches are plain tuples of their column values (the garbage collector does
    not track tuples of ints, and ~50k are held at 200k records/s); the record is built
    when it is passed on.  Joins for a held switch add up beside it."""

    def __init__(self, emit: Callable[[SwitchRecord], None], hold_ns: int = 250_000_000,
                 clock: Callable[[], int] = time.monotonic_ns,
                 max_hold_ns: int = 2_000_000_000):
        self.emit, self.hold_ns, self.clock = emit, hold_ns, clock
        self.max_hold_ns = max(max_hold_ns, hold_ns)
        # key -> (arrival, column values, exit ends still to come)
        self.held: OrderedDict[tuple[int, int], tuple[int, tuple, int]] = OrderedDict()
        self.joined: dict[tuple[int, int], list[int]] = {}    # held key -> RELEASES...
        self.early: dict[tuple[int, int], list[int]] = {}     # joins before their record
        self.late_releases = 0      # their record had already been passed on
        self.orphan_releases = 0    # releases never matched (early table overflow, or end)
        self.late_exits = 0         # exit ends whose record had already been passed on
        self.late_exit_ns = 0
        self.orphan_exits = 0       # exit ends never matched
        self.unended_exits = 0      # exit ends a record was passed on without
        self.last_emitted: dict[int, int] = {}                 # pf -> newest seq passed on
        self.next_due: int | None = None                       # when the oldest is due

    def switch(self, rec: SwitchRecord) -> None:
        self.switch_values(_column_values(rec))

    def switch_values(self, values: tuple, exits_pending: int = 0) -> None:
        """One switch as its column values (``COLUMNS`` order), and how many of its
        exits' ends are still to come as joins."""
        key = (values[PF], values[SEQ])
        now = self.clock()
        if key in self.held:        # the same switch twice (a source reusing its seq):
            self._pass_on(key)      # both are kept, the first with its joins so far
        early = self.early.pop(key, None)
        if early:
            self.joined[key] = early
        self.held[key] = (now, values, exits_pending)
        if self.next_due is None:
            self.next_due = now + self.hold_ns
        if now >= self.next_due:
            self._pass_on_due(now, give_up=False)

    def release(self, pf: int, seq: int, wait_ns: int) -> None:
        """A guest access switch (pf, seq) released after blocking ``wait_ns``."""
        if not self._join((pf, seq), 1, wait_ns, 0, 0):
            self.late_releases += 1

    def exit_end(self, pf: int, seq: int, ns: int) -> None:
        """An exit that began in switch (pf, seq)'s window took ``ns`` in all."""
        if not self._join((pf, seq), 0, 0, 1, ns):
            self.late_exits += 1
            self.late_exit_ns += ns

    def _join(self, key: tuple[int, int], releases: int, release_ns: int, exits: int,
              exit_ns: int) -> bool:
        """Add to switch ``key``, held or still to come; False when it was passed on."""
        extra = self.joined.get(key) if key in self.held else self.early.get(key)
        if extra is None:
            if key not in self.held:
                if self.emitted_past(*key):
                    return False
                if len(self.early) >= MAX_PENDING_JOINS:
                    _, dropped = self.early.popitem()
                    self._orphaned(dropped)
                extra = self.early[key] = [0, 0, 0, 0]
            else:
                extra = self.joined[key] = [0, 0, 0, 0]
        extra[RELEASES] += releases
        extra[RELEASE_NS] += release_ns
        extra[EXITS] += exits
        extra[EXIT_NS] += exit_ns
        return True

    def _orphaned(self, extra: list[int]) -> None:
        self.orphan_releases += extra[RELEASES]
        self.orphan_exits += extra[EXITS]

    def awaiting_exit_ends(self) -> int:
        """How many held switches still wait for ends of their exits."""
        joined = self.joined
        return sum(1 for key, (_, _, pending) in self.held.items()
                   if pending and (key not in joined or joined[key][EXITS] < pending))

    def emitted_past(self, pf: int, seq: int) -> bool:
        return seq <= self.last_emitted.get(pf, 0)

    def tick(self) -> None:
        """Pass on what is due; call it only when every buffer has been read."""
        if self.next_due is not None:
            now = self.clock()
            if now >= self.next_due:
                self._pass_on_due(now, give_up=True)

    def _pass_on_due(self, now: int, give_up: bool) -> None:
        """Pass on, oldest first (the capture stays in order), what has been held
        ``hold_ns`` and has its exit ends, or (``give_up``) has waited ``max_hold_ns``."""
        held = self.held
        while held:
            key = next(iter(held))
            arrived, _, pending = held[key]
            age = now - arrived
            if age < self.hold_ns:
                self.next_due = arrived + self.hold_ns
                return
            if pending and (age < self.max_hold_ns or not give_up):
                extra = self.joined.get(key)
                if extra is None or extra[EXITS] < pending:
                    self.next_due = now                 # look again at the next call
                    return
            self._pass_on(key)
        self.next_due = None

    def flush(self) -> None:
        while self.held:
            self._pass_on(next(iter(self.held)))
        self.next_due = None
        for extra in self.early.values():
            self._orphaned(extra)
        self.early.clear()

    def _pass_on(self, key) -> None:
        _, values, pending = self.held.pop(key)
        rec = SwitchRecord(*values)
        extra = self.joined.pop(key, None)
        if extra is not None:
            rec.blocked_accesses += extra[RELEASES]
            rec.blocked_ns += extra[RELEASE_NS]
            rec.exit_ns += extra[EXIT_NS]
            pending -= extra[EXITS]
        if pending > 0:
            self.unended_exits += pending
        pf, seq = key
        if seq > self.last_emitted.get(pf, 0):
            self.last_emitted[pf] = seq
        self.emit(rec)


_column_values = operator.attrgetter(*COLUMNS)       # a record's values, COLUMNS order
