"""The Guests panel's figures: KVM exits by (VM pid, vCPU, reason), inside switch windows
and outside, and VFIO DMA map/unmap latency.

Two inputs, whichever the source has:
* per-call rows (``--calls``): each ``kvm_exit`` row is one exit (``seq`` set: inside a
  switch window); rates are over the newest ``RATE_WINDOW_S`` seconds of trace time, so a
  replay shows the rates the recording saw, at any speed;
* cumulative totals (``engine.background()``, or a capture's meta): counts per key;
  rates are differences between two polls over the dashboard's clock.
Latency distributions use the statistics core's ``Histogram``.
"""
from __future__ import annotations

from dataclasses import dataclass

from tracer.model import exit_reasons
from tracer.model.stats import Histogram

RATE_WINDOW_S = 5
VFIO_KINDS = ("vfio_map_dma", "vfio_unmap_dma")
NS_PER_S = 1_000_000_000


@dataclass
class ExitRow:
    pid: int
    vcpu: int
    reason: str
    rate: float | None          # exits/s (None: unknown from totals alone)
    total: int
    in_window: int
    ns: int

    @property
    def outside(self) -> int:
        return self.total - self.in_window

    @property
    def mean_ns(self) -> float:
        return self.ns / self.total if self.total else 0.0


@dataclass
class VfioRow:
    kind: str
    count: int
    p50: int | None
    p99: int | None
    max: int | None
    mean: float


class _Exits:
    __slots__ = ("total", "in_window", "ns", "bins")

    def __init__(self) -> None:
        self.total = self.in_window = self.ns = 0
        self.bins: dict[int, int] = {}          # trace second -> exits (recent ones only)


class GuestModel:
    def __init__(self, vendor: str | None = None) -> None:
        self.vendor = vendor
        self.reset()

    def reset(self) -> None:
        self._exits: dict[tuple[int, int, int], _Exits] = {}
        self._newest_t = 0
        self._first_t: int | None = None
        self._vfio = {kind: [Histogram(), 0] for kind in VFIO_KINDS}   # hist, ns sum
        self.calls_seen = 0
        self._totals: dict | None = None
        self._prev: tuple[float, dict] | None = None
        self._rates: dict[tuple[int, int, int], float] = {}

    # -- input ------------------------------------------------------------------------
    def add_calls(self, calls) -> None:
        for c in calls:
            kind = c.kind
            if kind == "kvm_exit":
                key = (c.pid, c.vcpu, c.size)
                cell = self._exits.get(key)
                if cell is None:
                    cell = self._exits[key] = _Exits()
                cell.total += 1
                cell.ns += c.ns
                if c.seq is not None:
                    cell.in_window += 1
                second = c.t_ns // NS_PER_S
                cell.bins[second] = cell.bins.get(second, 0) + 1
                if c.t_ns > self._newest_t:
                    self._newest_t = c.t_ns
                if self._first_t is None or c.t_ns < self._first_t:
                    self._first_t = c.t_ns
            elif kind in self._vfio:
                hist_sum = self._vfio[kind]
                hist_sum[0].add(c.ns)
                hist_sum[1] += c.ns
        self.calls_seen += len(calls)
        self._prune()

    def _prune(self) -> None:
        horizon = self._newest_t // NS_PER_S - RATE_WINDOW_S
        for cell in self._exits.values():
            if len(cell.bins) > RATE_WINDOW_S + 2:
                cell.bins = {s: n for s, n in cell.bins.items() if s >= horizon}

    def set_totals(self, totals: dict, now: float) -> None:
        """Cumulative totals (``engine.background()`` shape); rates by difference."""
        counts = _total_counts(totals)
        if self._prev is not None:
            then, before = self._prev
            dt = now - then
            if dt > 0:
                self._rates = {k: max(0, n - before.get(k, 0)) / dt for k, n in counts.items()}
        self._prev = (now, counts)
        self._totals = totals

    # -- read-out ---------------------------------------------------------------------
    @property
    def from_calls(self) -> bool:
        return bool(self._exits) or any(h.total for h, _ in self._vfio.values())

    def exit_rows(self) -> list[ExitRow]:
        if self._exits:
            return self._rows_from_calls()
        return self._rows_from_totals()

    def _rows_from_calls(self) -> list[ExitRow]:
        newest_s = self._newest_t // NS_PER_S
        start = max(self._first_t or 0, (newest_s - RATE_WINDOW_S + 1) * NS_PER_S)
        span = max((self._newest_t - start) / NS_PER_S, 1.0)
        rows = []
        for (pid, vcpu, reason), cell in self._exits.items():
            recent = sum(n for s, n in cell.bins.items() if s > newest_s - RATE_WINDOW_S)
            rows.append(ExitRow(pid, vcpu, self.reason_name(reason), recent / span,
                                cell.total, cell.in_window, cell.ns))
        return _ordered(rows)

    def _rows_from_totals(self) -> list[ExitRow]:
        merged: dict[tuple[int, int, int], list[int]] = {}
        for e in (self._totals or {}).get("kvm_exits") or []:
            try:
                key = (int(e["pid"]), int(e["vcpu"]), int(e["reason"]))
                count, ns, inside = int(e["count"]), int(e["ns"]), bool(e["in_window"])
            except (KeyError, TypeError, ValueError):
                continue
            cell = merged.setdefault(key, [0, 0, 0])
            cell[0] += count
            cell[1] += count if inside else 0
            cell[2] += ns
        rows = [ExitRow(pid, vcpu, self.reason_name(reason),
                        self._rates.get((pid, vcpu, reason), 0.0) if self._rates else None,
                        total, inside, ns)
                for (pid, vcpu, reason), (total, inside, ns) in merged.items()]
        return _ordered(rows)

    def has_rates(self) -> bool:
        return bool(self._exits) or bool(self._rates)

    def reason_name(self, reason: int) -> str:
        return exit_reasons.name(reason, self.vendor)

    def vfio_rows(self) -> list[VfioRow]:
        rows = []
        for kind, (hist, ns_sum) in self._vfio.items():
            if hist.total:
                p50, p99 = hist.percentiles((50, 99))
                rows.append(VfioRow(kind, hist.total, p50, p99, hist.max, ns_sum / hist.total))
        if rows:
            return rows
        # No per-call rows: the totals have count, ns and max per pid.
        for kind in VFIO_KINDS:
            count = ns = 0
            biggest = None
            for per_kind in ((self._totals or {}).get("calls_by_pid") or {}).values():
                v = per_kind.get(kind) if isinstance(per_kind, dict) else None
                if isinstance(v, dict):
                    count += int(v.get("count", 0))
                    ns += int(v.get("ns", 0))
                    m = v.get("max_ns")
                    biggest = m if biggest is None or (m is not None and m > biggest) else biggest
            if count:
                rows.append(VfioRow(kind, count, None, None, biggest, ns / count))
        return rows

    def exit_totals(self) -> tuple[int, int]:
        """(all exits, exits inside switch windows)."""
        rows = self.exit_rows()
        return sum(r.total for r in rows), sum(r.in_window for r in rows)


def _total_counts(totals: dict) -> dict[tuple[int, int, int], int]:
    counts: dict[tuple[int, int, int], int] = {}
    for e in totals.get("kvm_exits") or []:
        try:
            key = (int(e["pid"]), int(e["vcpu"]), int(e["reason"]))
            counts[key] = counts.get(key, 0) + int(e["count"])
        except (KeyError, TypeError, ValueError):
            continue
    return counts


def _ordered(rows: list[ExitRow]) -> list[ExitRow]:
    """Busiest first; ties by pid, vCPU, reason so the order never depends on arrival."""
    return sorted(rows, key=lambda r: (-r.total, r.pid, r.vcpu, r.reason))
