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
Joins that come later than that are counted with their time (``late_releases``,
``late_release_ns``, ``late_exits`` and ``late_exit_ns``), never dropped silently, and so are the exit ends a record was passed on
without (``unended_exits``: given up on, or still running when the recording stopped).

A switch is given up on (``max_hold_ns``) only in ``tick()``, which the engine calls once
a poll has read every buffer: a reader that was starved for longer than that (a loaded
lab VM) first reads the ends already waiting in the joins buffer.  While records are
being read, only switches with all their ends are passed on, to keep memory bounded.

Switches are held as arrays of rows (``COLUMNS`` order, int64), a batch of them at a time
as the mapped ring reader hands them over, and passed on the same way (``emit_rows``), so
no Python runs per switch unless a consumer asks for records (``emit``).  Joins are few
(guests' blocked accesses and long exits) and stay a dict by (pf, seq).
"""
from __future__ import annotations

import operator
import time
from collections import deque
from itertools import chain
from typing import Callable

import numpy as np

from ..model.schema import COLUMNS, SwitchRecord

PF, SEQ = COLUMNS.index("pf"), COLUMNS.index("seq")
EXIT_NS = COLUMNS.index("exit_ns")
BLOCKED, BLOCKED_NS = COLUMNS.index("blocked_accesses"), COLUMNS.index("blocked_ns")
# What a switch gathers from its joins: [blocked accesses, their wait ns, exits, their ns]
RELEASES, RELEASE_NS, EXITS, EXIT_TOTAL_NS = range(4)

MAX_PENDING_JOINS = 65536
RECHECK_NS = 10_000_000     # a switch waiting for exit ends: how often arrivals look again
_column_values = operator.attrgetter(*COLUMNS)       # a record's values, COLUMNS order


def records_of(emit: Callable[[SwitchRecord], None]) -> Callable[[np.ndarray], None]:
    """An ``emit_rows`` for a consumer of records: one SwitchRecord per row."""
    def emit_rows(rows: np.ndarray) -> None:
        for values in rows.tolist():
            emit(SwitchRecord(*values))
    return emit_rows


class _Held:
    """One batch of held switches: their rows, when each arrived, and how many of each
    one's exit ends are still to come."""
    __slots__ = ("rows", "arrived", "pending")

    def __init__(self, rows: np.ndarray, arrived: np.ndarray, pending: np.ndarray):
        self.rows, self.arrived, self.pending = rows, arrived, pending


class Assembler:
    """Held switches are batches of rows, oldest first; a batch is passed on whole or
    split where a switch still waits for its exits' ends.  Joins add up by (pf, seq)
    whether their switch is held or still to come, and are added to its row when it is
    passed on."""

    def __init__(self, emit: Callable[[SwitchRecord], None] | None = None,
                 hold_ns: int = 250_000_000,
                 clock: Callable[[], int] = time.monotonic_ns,
                 max_hold_ns: int = 2_000_000_000, *,
                 emit_rows: Callable[[np.ndarray], None] | None = None):
        if (emit is None) == (emit_rows is None):
            raise ValueError("Assembler: give emit (records) or emit_rows (arrays)")
        self.emit_rows = emit_rows if emit_rows is not None else records_of(emit)
        self.hold_ns, self.clock = hold_ns, clock
        self.max_hold_ns = max(max_hold_ns, hold_ns)
        self.held: deque[_Held] = deque()
        self.held_rows = 0
        self._staged: list[tuple] = []          # switch_values' rows, not batched yet
        self._staged_at: list[int] = []
        self._staged_pending: list[int] = []
        self.joins: dict[tuple[int, int], list[int]] = {}   # (pf, seq) -> RELEASES...
        self.late_releases = 0      # their record had already been passed on
        self.late_release_ns = 0
        self.orphan_releases = 0    # releases never matched (table overflow, or end)
        self.late_exits = 0         # exit ends whose record had already been passed on
        self.late_exit_ns = 0
        self.orphan_exits = 0       # exit ends never matched
        self.unended_exits = 0      # exit ends a record was passed on without
        self.last_emitted: dict[int, int] = {}                 # pf -> newest seq passed on
        self.next_due: int | None = None                       # when the oldest is due
        self._waiting = False       # the oldest held switch waits for its exits' ends

    # -- switches -----------------------------------------------------------------------
    def switch(self, rec: SwitchRecord) -> None:
        self.switch_values(_column_values(rec))

    def switch_values(self, values: tuple, exits_pending: int = 0) -> None:
        """One switch as its column values (``COLUMNS`` order), and how many of its
        exits' ends are still to come as joins (the per-record readers' entry)."""
        now = self.clock()
        self._staged.append(values)
        self._staged_at.append(now)
        self._staged_pending.append(exits_pending)
        self._arrived(now)

    def switch_rows(self, rows: np.ndarray, exits_pending: np.ndarray) -> None:
        """A batch of switches: an (n, len(COLUMNS)) int64 array, and each one's exit
        ends still to come."""
        if not rows.shape[0]:
            return
        self._batch_staged()
        now = self.clock()
        self._hold(rows, np.full(rows.shape[0], now, np.int64),
                   exits_pending.astype(np.int64, copy=False))
        self._arrived(now)

    def _arrived(self, now: int) -> None:
        if self.next_due is None:
            self.next_due = now + self.hold_ns
        if now >= self.next_due:
            self._pass_on_due(now, give_up=False)

    def _hold(self, rows: np.ndarray, arrived: np.ndarray, pending: np.ndarray) -> None:
        self.held.append(_Held(rows, arrived, pending))
        self.held_rows += rows.shape[0]

    def _batch_staged(self) -> None:
        if self._staged:
            n = len(self._staged)
            rows = np.fromiter(chain.from_iterable(self._staged), np.int64,
                               n * len(COLUMNS)).reshape(n, len(COLUMNS))
            self._hold(rows, np.array(self._staged_at, np.int64),
                       np.array(self._staged_pending, np.int64))
            self._staged, self._staged_at, self._staged_pending = [], [], []

    # -- joins --------------------------------------------------------------------------
    def release(self, pf: int, seq: int, wait_ns: int) -> None:
        """A guest access switch (pf, seq) released after blocking ``wait_ns``."""
        if not self._join((pf, seq), 1, wait_ns, 0, 0):
            self.late_releases += 1
            self.late_release_ns += wait_ns

    def exit_end(self, pf: int, seq: int, ns: int) -> None:
        """An exit that began in switch (pf, seq)'s window took ``ns`` in all."""
        if not self._join((pf, seq), 0, 0, 1, ns):
            self.late_exits += 1
            self.late_exit_ns += ns

    def _join(self, key: tuple[int, int], releases: int, release_ns: int, exits: int,
              exit_ns: int) -> bool:
        """Add to switch ``key``, held or still to come; False when it was passed on."""
        extra = self.joins.get(key)
        if extra is None:
            if self.emitted_past(*key):
                return False
            if len(self.joins) >= MAX_PENDING_JOINS + self.held_rows + len(self._staged):
                _, dropped = self.joins.popitem()
                self._orphaned(dropped)
            extra = self.joins[key] = [0, 0, 0, 0]
        extra[RELEASES] += releases
        extra[RELEASE_NS] += release_ns
        extra[EXITS] += exits
        extra[EXIT_TOTAL_NS] += exit_ns
        return True

    def _orphaned(self, extra: list[int]) -> None:
        self.orphan_releases += extra[RELEASES]
        self.orphan_exits += extra[EXITS]

    def _ends_in(self, rows: np.ndarray, i: int) -> int:
        extra = self.joins.get((int(rows[i, PF]), int(rows[i, SEQ])))
        return 0 if extra is None else extra[EXITS]

    def awaiting_exit_ends(self) -> int:
        """How many held switches still wait for ends of their exits."""
        self._batch_staged()
        return sum(1 for h in self.held for i in np.flatnonzero(h.pending).tolist()
                   if self._ends_in(h.rows, i) < h.pending[i])

    def emitted_past(self, pf: int, seq: int) -> bool:
        return seq <= self.last_emitted.get(pf, 0)

    # -- passing on ---------------------------------------------------------------------
    def tick(self) -> None:
        """Pass on what is due; call it only when every buffer has been read."""
        if self.next_due is not None:
            now = self.clock()
            if now >= self.next_due or self._waiting:
                self._pass_on_due(now, give_up=True)

    def _pass_on_due(self, now: int, give_up: bool) -> None:
        """Pass on, oldest first (the capture stays in order), what has been held
        ``hold_ns`` and has its exit ends, or (``give_up``) has waited ``max_hold_ns``."""
        self._batch_staged()
        out = []
        while self.held:
            h = self.held[0]
            total = h.rows.shape[0]
            n = int(np.searchsorted(h.arrived, now - self.hold_ns, side="right"))
            waiting = False
            for i in np.flatnonzero(h.pending[:n]).tolist():
                if ((now - int(h.arrived[i]) < self.max_hold_ns or not give_up)
                        and self._ends_in(h.rows, i) < h.pending[i]):
                    n, waiting = i, True
                    break
            if n:
                out.append(self._take(h, n))
            if n < total:           # h's first switch (now at 0) is not due, or waits
                # a waiting one is looked at again at every tick, and by switches
                # arriving only after RECHECK_NS (not once per switch)
                self.next_due = (now + min(self.hold_ns, RECHECK_NS) if waiting
                                 else int(h.arrived[0]) + self.hold_ns)
                self._waiting = waiting
                break
        else:
            self.next_due = None
            self._waiting = False
        if out:
            self._emit(out)

    def _take(self, h: _Held, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The first ``n`` of ``h``'s switches, out of the held ones."""
        if n == h.rows.shape[0]:
            self.held.popleft()
            taken = (h.rows, h.pending)
        else:
            taken = (h.rows[:n], h.pending[:n])
            h.rows, h.arrived, h.pending = h.rows[n:], h.arrived[n:], h.pending[n:]
        self.held_rows -= n
        return taken

    def flush(self) -> None:
        self._batch_staged()
        out = [self._take(self.held[0], self.held[0].rows.shape[0])
               for _ in range(len(self.held))]
        if out:
            self._emit(out)
        self.next_due = None
        self._waiting = False
        for extra in self.joins.values():
            self._orphaned(extra)
        self.joins.clear()

    def _emit(self, taken: list[tuple[np.ndarray, np.ndarray]]) -> None:
        rows = np.concatenate([r for r, _ in taken]) if len(taken) > 1 else taken[0][0]
        pending = np.concatenate([p for _, p in taken]) if len(taken) > 1 else taken[0][1]
        if self.joins:
            rows = rows.copy()      # a view of the reader's batch: add to our own
            unended = self._add_joins(rows, pending)
        else:
            unended = int(pending.sum())
        self.unended_exits += unended
        for pf in np.unique(rows[:, PF]).tolist():
            newest = int(rows[rows[:, PF] == pf, SEQ].max())
            if newest > self.last_emitted.get(pf, 0):
                self.last_emitted[pf] = newest
        if self.joins:
            self._drop_passed_joins()
        self.emit_rows(rows)

    def _drop_passed_joins(self) -> None:
        """Joins of switches older than the newest passed on are orphans now: their
        record was lost in the kernel (counted there).  Kept, they would make every later
        pass-on slower (each one looks through the joins), and a reader that falls behind
        loses more records, which leave more such joins (a 6.12 soak: 15k of them, and a
        loss that grew through the run)."""
        last = self.last_emitted
        for key in [k for k in self.joins if k[1] <= last.get(k[0], 0)]:
            self._orphaned(self.joins.pop(key))

    def _add_joins(self, rows: np.ndarray, pending: np.ndarray) -> int:
        """Add the joins of ``rows``' switches to them; the exit ends still missing."""
        seqs = np.fromiter((seq for _, seq in self.joins), np.int64, len(self.joins))
        missing = pending.copy()
        for i in np.flatnonzero(np.isin(rows[:, SEQ], seqs)).tolist():
            extra = self.joins.pop((int(rows[i, PF]), int(rows[i, SEQ])), None)
            if extra is None:
                continue
            rows[i, BLOCKED] += extra[RELEASES]
            rows[i, BLOCKED_NS] += extra[RELEASE_NS]
            rows[i, EXIT_NS] += extra[EXIT_TOTAL_NS]
            missing[i] -= extra[EXITS]
        return int(missing[missing > 0].sum())
