"""The one statistics core behind every front end (recorder, dashboard, reports).

Memory stays bounded however long a run is: nothing per record is kept, only per-group
sums and log-linear histograms (HDR style).  Records are accumulated into the finest
group, one cell per (PF, from VF, to VF); the per-VF, per-PF and overall figures are
merges of those cells made when a snapshot is taken, so the hot path touches one cell.

``add()`` only takes the record's numbers (one C-level attrgetter, packed as int64 by
one precompiled struct while the record is still hot in the cache) and queues them;
queued rows are folded in by numpy in batches (at ``BATCH`` records or at any
read-out), which is what lets pure Python keep up with several hundred thousand
switches a second.  ``add_rows()`` takes records already laid out as an int64 array in
``COLUMNS`` order (the dashboard keeps them so) without any per-record Python work.
"""
from __future__ import annotations

import math
import struct
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from operator import attrgetter
from typing import Iterable

import numpy as np

from .correction import HIT_COLUMNS, Correction
from .filter import FilterGate, SwitchFilter
from .schema import COLUMNS

# --- log-linear histogram ---------------------------------------------------------------

SUB_BITS = 10
SUB = 1 << SUB_BITS            # sub-buckets per power of two
EXACT_LIMIT = 2 * SUB          # values below this have a bucket of their own (exact)
RELATIVE_ERROR = 1 / (2 * SUB)  # a reported value is within 0.049% of a true one
MAX_VALUE = (1 << 62) - 1      # ~146 years in ns; larger values are clamped


def bucket_index(value: int) -> int:
    """The bucket of one non-negative value (the scalar twin of ``bucket_indices``)."""
    v = min(max(int(value), 0), MAX_VALUE)
    if v < EXACT_LIMIT:
        return v
    k = v.bit_length() - 1
    return EXACT_LIMIT + (k - SUB_BITS - 1) * SUB + ((v >> (k - SUB_BITS)) - SUB)


def bucket_indices(values: np.ndarray) -> np.ndarray:
    v = np.clip(values.astype(np.int64, copy=False), 0, MAX_VALUE)
    # frexp's exponent is bit_length, exactly below 2**53.  Above, float rounding can
    # add one, but only for a value in the top sub-bucket of its octave, and the formula
    # below then gives that same bucket (sub-bucket -1 of the next octave).
    k = np.frexp(v.astype(np.float64))[1].astype(np.int64) - 1
    shift = np.maximum(k - SUB_BITS, 0)
    big = EXACT_LIMIT + (k - SUB_BITS - 1) * SUB + ((v >> shift) - SUB)
    return np.where(v < EXACT_LIMIT, v, big)


def bucket_bounds(index: int) -> tuple[int, int]:
    """(lowest, highest) value that falls in bucket ``index``."""
    if index < EXACT_LIMIT:
        return index, index
    j = index - EXACT_LIMIT
    shift = j // SUB + 1
    low = (SUB + j % SUB) << shift
    return low, low + (1 << shift) - 1


def bucket_value(index: int) -> int:
    """The value reported for a bucket: its middle, so the error is half a bucket."""
    low, high = bucket_bounds(index)
    return (low + high + 1) // 2


class Cuts:
    """Ascending thresholds with their buckets and the share of each bucket above its
    threshold worked out once: a scrape counts every histogram at the same bounds."""

    def __init__(self, thresholds) -> None:
        t = np.asarray(thresholds, dtype=np.int64)
        b = bucket_indices(t)
        shift = np.where(b < EXACT_LIMIT, 0, (b - EXACT_LIMIT) // SUB + 1)
        low = np.where(b < EXACT_LIMIT, b, (SUB + (b - EXACT_LIMIT) % SUB) << shift)
        width = np.int64(1) << shift
        self.t, self.buckets = t, b
        self.share_above = (low + width - 1 - t) / width


class Histogram:
    """Counts per log-linear bucket over the window of buckets seen so far, plus exact
    min and max (so p100 and the extremes are exact)."""

    __slots__ = ("base", "counts", "total", "min", "max")

    def __init__(self) -> None:
        self.base = 0
        self.counts = np.zeros(0, dtype=np.int64)
        self.total = 0
        self.min: int | None = None
        self.max: int | None = None

    def add(self, value: int) -> None:
        self.add_array(np.array([value], dtype=np.int64))

    def add_array(self, values: np.ndarray) -> None:
        if values.size:
            values = np.clip(values.astype(np.int64, copy=False), 0, MAX_VALUE)
            idx = bucket_indices(values)
            self.add_indices(idx, int(idx.min()), int(idx.max()),
                             int(values.min()), int(values.max()))

    def add_indices(self, idx: np.ndarray, lo: int, hi: int, vmin: int, vmax: int) -> None:
        """Count bucket indices already computed (lo/hi are their extremes, vmin/vmax
        the extreme values): the batch path computes them for many groups at once."""
        self._cover(lo, hi)
        counts = np.bincount(idx - lo)
        self.counts[lo - self.base: lo - self.base + counts.size] += counts
        self.total += int(idx.size)
        self.min = vmin if self.min is None else min(self.min, vmin)
        self.max = vmax if self.max is None else max(self.max, vmax)

    def _cover(self, lo: int, hi: int) -> None:
        """Grow the bucket window to include [lo, hi], in steps so growth is rare."""
        end = self.base + self.counts.size
        if self.counts.size and lo >= self.base and hi < end:
            return
        new_lo = lo if not self.counts.size else min(lo, self.base)
        new_hi = hi if not self.counts.size else max(hi, end - 1)
        new_lo = max(0, new_lo - new_lo % 256)
        new_end = new_hi + 256 - new_hi % 256
        grown = np.zeros(new_end - new_lo, dtype=np.int64)
        if self.counts.size:
            grown[self.base - new_lo: end - new_lo] = self.counts
        self.base, self.counts = new_lo, grown

    def merge(self, other: Histogram) -> None:
        if not other.total:
            return
        if not self.total and not self.counts.size:     # a snapshot's fresh group: copy
            self.base, self.counts = other.base, other.counts.copy()
            self.total, self.min, self.max = other.total, other.min, other.max
            return
        self._cover(other.base, other.base + other.counts.size - 1)
        start = other.base - self.base
        self.counts[start: start + other.counts.size] += other.counts
        self.total += other.total
        self.min = other.min if self.min is None else min(self.min, other.min)
        self.max = other.max if self.max is None else max(self.max, other.max)

    def percentiles(self, ps: Iterable[float]) -> list[int | None]:
        """Nearest-rank percentiles (numpy's ``inverted_cdf``), within RELATIVE_ERROR."""
        ps = list(ps)
        if not self.total:
            return [None] * len(ps)
        ranks = [max(1, math.ceil(p / 100 * self.total - 1e-9)) for p in ps]
        found = np.searchsorted(np.cumsum(self.counts), ranks).tolist()
        return [min(max(bucket_value(self.base + i), self.min), self.max) for i in found]

    def count_above(self, threshold: int) -> int:
        """How many values are > threshold.  Exact unless the threshold falls inside a
        bucket wider than 1 ns (>= EXACT_LIMIT): that bucket's count is then split
        linearly, so only values within 0.1% of the threshold can be misplaced."""
        if not self.total or threshold >= self.max:
            return 0
        if threshold < self.min:
            return self.total
        b = bucket_index(threshold)
        i = b - self.base
        above = int(self.counts[i + 1:].sum()) if i + 1 < self.counts.size else 0
        if 0 <= i < self.counts.size and self.counts[i]:
            low, high = bucket_bounds(b)
            above += round(int(self.counts[i]) * (high - threshold) / (high - low + 1))
        return above

    def counts_at_or_below(self, thresholds: np.ndarray | Cuts) -> np.ndarray:
        """``total - count_above(t)`` for each of ``thresholds`` (ascending), in one pass:
        the same counts, the same linear split inside a bucket wider than 1 ns."""
        cuts = thresholds if isinstance(thresholds, Cuts) else Cuts(thresholds)
        t, b = cuts.t, cuts.buckets
        if not self.total:
            return np.zeros(t.size, dtype=np.int64)
        i = b - self.base
        inside = (i >= 0) & (i < self.counts.size)
        cum = np.concatenate(([0], np.cumsum(self.counts)))
        below = cum[np.clip(i, 0, self.counts.size)]          # buckets before t's own
        c = np.where(inside, self.counts[np.clip(i, 0, self.counts.size - 1)], 0)
        above_in = np.round(c * cuts.share_above).astype(np.int64)
        out = below + c - above_in
        out = np.where(t >= self.max, self.total, out)
        return np.where(t < self.min, 0, out)

    def nbytes(self) -> int:
        return self.counts.nbytes


# --- per-group accumulation -------------------------------------------------------------

KEY_FIELDS = ("pf", "from_vf", "to_vf", "seq")
DIST_FIELDS = ("switch_ns", "revoke_ns", "grant_ns")
SUM_FIELDS = (
    "switch_ns", "revoke_ns", "grant_ns",
    "unmap_calls", "unmap_ns", "unmap_bytes", "map_calls", "map_ns", "map_bytes",
    "sync_calls", "sync_ns", "mmu_ns", "mmu_notifier_ns",
    "kvm_exits", "exit_ns", "vcpu_kicks", "blocked_accesses", "blocked_ns", "source_ns",
    *HIT_COLUMNS,
)
_EXTRACT = attrgetter(*KEY_FIELDS, *SUM_FIELDS)       # a record -> its stats row
_WIDTH = len(KEY_FIELDS) + len(SUM_FIELDS)
_PACK = struct.Struct(f"={_WIDTH}q").pack               # a stats row -> int64 bytes
_FROM_COLUMNS = [COLUMNS.index(name) for name in (*KEY_FIELDS, *SUM_FIELDS)]
_PF, _FROM, _TO, _SEQ = range(4)
_SUMS = slice(4, 4 + len(SUM_FIELDS))
_SWITCH = 4 + SUM_FIELDS.index("switch_ns")
_DIST_COLS = [4 + SUM_FIELDS.index(name) for name in DIST_FIELDS]
# what the corrected switch time is computed from (tracer/model/correction.py)
_CORR_COLS = {name: 4 + SUM_FIELDS.index(name) for name in ("switch_ns", "source_ns",
                                                             *HIT_COLUMNS)}

BATCH = 16384         # large enough to amortise per-group numpy calls
_SAFE_SUM = (1 << 63) // BATCH    # below this, no sum of a batch can overflow int64
PERCENTILES = (50, 90, 99, 99.9)


class _Cell:
    """Everything kept for one group: counts, exact sums, three histograms, and the
    corrected switch time's histogram and sum (when the stats have a correction)."""

    __slots__ = ("count", "sums", "hists", "over", "corr", "corr_sum")

    def __init__(self) -> None:
        self.count = 0
        self.sums = [0] * len(SUM_FIELDS)
        self.hists = [Histogram() for _ in DIST_FIELDS]
        self.over = 0
        self.corr = Histogram()
        self.corr_sum = 0

    def merge(self, other: _Cell) -> None:
        self.count += other.count
        self.sums = [a + b for a, b in zip(self.sums, other.sums)]
        for mine, theirs in zip(self.hists, other.hists):
            mine.merge(theirs)
        self.over += other.over
        self.corr.merge(other.corr)
        self.corr_sum += other.corr_sum


def _packed(row: tuple) -> bytes:
    """One stats row as int64 bytes; only a bad value gets here from the fast path."""
    try:
        return _PACK(*row)
    except struct.error:
        # A u64 garbage value (a negative difference in the kernel) must not stop the
        # run: clamp it into +-MAX_VALUE, as _fold_rows does with what fits int64.
        return _PACK(*[min(max(int(v), -MAX_VALUE), MAX_VALUE) for v in row])


def _packed_rows(recs: Iterable) -> list[bytes]:
    rows = list(map(_EXTRACT, recs))
    try:
        return [_PACK(*row) for row in rows]
    except struct.error:
        return list(map(_packed, rows))


# --- read-out -----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Dist:
    count: int
    mean: float
    min: int | None
    max: int | None
    p50: int | None
    p90: int | None
    p99: int | None
    p999: int | None


@dataclass(frozen=True, slots=True)
class GroupKey:
    """``level`` is "all", "pf", "vf" (PF and incoming VF) or "pair" (PF, from -> to)."""
    level: str
    pf: int | None = None
    from_vf: int | None = None
    to_vf: int | None = None

    @property
    def label(self) -> str:
        if self.level == "all":
            return "all"
        if self.level == "pf":
            return f"pf{self.pf}"
        if self.level == "vf":
            return f"pf{self.pf}/vf{self.to_vf}"
        # No spaces in a label, so the table splits cleanly with awk.
        src = "none" if self.from_vf is not None and self.from_vf < 0 else self.from_vf
        return f"pf{self.pf}/{src}->{self.to_vf}"


@dataclass(frozen=True, slots=True)
class GroupStats:
    key: GroupKey
    count: int
    switch: Dist
    revoke: Dist
    grant: Dist
    over_budget: int
    over_budget_share: float
    exits_per_switch: float
    kicks_per_switch: float
    blocked_per_switch: float
    blocked_ns_per_switch: float
    unmap_calls_per_switch: float
    unmap_bytes_per_switch: float
    map_calls_per_switch: float
    map_bytes_per_switch: float
    means: dict[str, float] = field(default_factory=dict)   # every SUM_FIELDS column
    own: OwnCost | None = None       # vftrace's own cost, when the capture is corrected


@dataclass(frozen=True, slots=True)
class OwnCost:
    """A group's switch time with vftrace's own cost taken off (correction.py).  A
    corrected figure is never shown without ``err_ns``: the uncertainty of the
    correction of a switch with the group's mean probe hits."""
    switch: Dist                     # the corrected switch time's distribution
    err_ns: float
    share: float                     # of the raw switch time, what was vftrace's own


@dataclass(frozen=True, slots=True)
class Snapshot:
    budget_ns: int
    records: int              # records counted (after filters)
    ignored: int              # records the filters dropped
    overall: GroupStats
    per_pf: list[GroupStats]
    per_vf: list[GroupStats]
    per_pair: list[GroupStats]
    seq_gaps: dict[int, int]  # PF -> seqs missing between the first and last seen
    rate_per_s: float
    filters: dict

    @property
    def seq_gaps_total(self) -> int:
        return sum(self.seq_gaps.values())

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class VfHistograms:
    """One (PF, incoming VF)'s counts, sums and histograms (``Stats.vf_histograms``)."""
    count: int
    over_budget: int
    sums: dict[str, int]                  # every SUM_FIELDS column
    hists: dict[str, Histogram]           # DIST_FIELDS column -> its histogram
    corrected: Histogram | None           # the corrected switch time, when corrected
    corrected_sum: int = 0


def _dist(hist: Histogram, total: int) -> Dist:
    p50, p90, p99, p999 = hist.percentiles(PERCENTILES)
    return Dist(hist.total, total / hist.total if hist.total else 0.0,
                hist.min, hist.max, p50, p90, p99, p999)


def _own_cost(cell: _Cell, means: dict, correction: Correction | None) -> OwnCost | None:
    if correction is None or not cell.count:
        return None
    raw = means["switch_ns"] * cell.count
    return OwnCost(_dist(cell.corr, round(cell.corr_sum)),
                   correction.mean_hits_error(tuple(means[c] for c in HIT_COLUMNS)),
                   1 - cell.corr_sum / raw if raw else 0.0)


def _group_stats(key: GroupKey, cell: _Cell, correction: Correction | None = None
                 ) -> GroupStats:
    n = cell.count
    means = {name: (s / n if n else 0.0) for name, s in zip(SUM_FIELDS, cell.sums)}
    sums = dict(zip(SUM_FIELDS, cell.sums))
    return GroupStats(
        key=key, count=n,
        switch=_dist(cell.hists[0], sums["switch_ns"]),
        revoke=_dist(cell.hists[1], sums["revoke_ns"]),
        grant=_dist(cell.hists[2], sums["grant_ns"]),
        over_budget=cell.over,
        over_budget_share=cell.over / n if n else 0.0,
        exits_per_switch=means["kvm_exits"],
        kicks_per_switch=means["vcpu_kicks"],
        blocked_per_switch=means["blocked_accesses"],
        blocked_ns_per_switch=means["blocked_ns"],
        unmap_calls_per_switch=means["unmap_calls"],
        unmap_bytes_per_switch=means["unmap_bytes"],
        map_calls_per_switch=means["map_calls"],
        map_bytes_per_switch=means["map_bytes"],
        means=means,
        own=_own_cost(cell, means, correction),
    )


# --- the core ---------------------------------------------------------------------------

_monotonic = time.monotonic

class Stats:
    """Switch statistics, overall and per PF, per (PF, incoming VF), per (PF, from->to).

    ``pfs``/``vfs`` restrict what is counted (``filter.SwitchFilter``), applied by
    ``filter.FilterGate`` after every record's seq is counted: what the filter leaves out
    is never a seq gap.  A capture recorded with a filter says in its meta what was left
    out; ``account`` takes that, so its reader counts the recorder's gaps.
    """

    def __init__(self, budget_ns: int = 100, *, pfs: Iterable[int] | None = None,
                 vfs: Iterable[int] | None = None, rate_window_s: float = 5.0,
                 correction: Correction | None = None) -> None:
        self.correction = correction
        self.filter = SwitchFilter.of(pfs, vfs)
        self.pfs, self.vfs = self.filter.pfs, self.filter.vfs
        self.rate_window_s = rate_window_s
        self.budget_ns = int(budget_ns)
        self.reset()

    def reset(self) -> None:
        self._pending: list[bytes] = []           # packed stats rows not folded yet
        self._cells: dict[tuple[int, int, int], _Cell] = {}
        self._gate = FilterGate(self.filter)       # seqs counted, then the filter
        self._records = 0
        self._ticks: deque[list] = deque()        # [tick, arrivals] for the rate
        self._newest_tick: list | None = None     # self._ticks[-1]: add()'s fast path
        self._first_arrival: float | None = None

    # feeding

    def add(self, rec, now: float | None = None) -> None:
        row = _EXTRACT(rec)
        try:
            self._pending.append(_PACK(*row))
        except struct.error:
            self._pending.append(_packed(row))
        if now is None:
            now = _monotonic()
        newest = self._newest_tick
        if newest is not None and newest[0] == int(now * 10):
            newest[1] += 1                          # the common case: same 0.1 s tick
        else:
            self._arrived(1, now)
        if len(self._pending) >= BATCH:
            self._flush()

    def add_many(self, recs: Iterable, now: float | None = None) -> None:
        packed = _packed_rows(recs)
        self._pending.extend(packed)
        self._arrived(len(packed), now)
        if len(self._pending) >= BATCH:
            self._flush()

    def add_rows(self, rows: np.ndarray, now: float | None = None) -> None:
        """Records as an (n, len(COLUMNS)) int64 array in ``COLUMNS`` order: the same as
        ``add_many`` of those records, without making or reading any record object."""
        n = rows.shape[0]
        if not n:
            return
        self._arrived(n, now)
        for start in range(0, n, BATCH):
            picked = rows[start:start + BATCH, _FROM_COLUMNS]       # a new, compact array
            self._fold_rows(picked.astype(np.int64, copy=False))

    def set_correction(self, correction: Correction | None) -> None:
        """The capture's correction (from its meta); records already counted keep the
        one they were counted with, so give it before the first."""
        self._flush()
        self.correction = correction

    def set_budget(self, budget_ns: int) -> None:
        """Change the budget; the over-budget counts so far are recomputed from the
        switch histograms (see Histogram.count_above for the exactness)."""
        self._flush()
        self.budget_ns = int(budget_ns)
        for cell in self._cells.values():
            cell.over = cell.hists[0].count_above(self.budget_ns)

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        for start in range(0, len(pending), BATCH):
            batch = pending[start:start + BATCH]
            rows = np.frombuffer(b"".join(batch), np.int64).reshape(len(batch), _WIDTH)
            self._fold_rows(rows)

    def _fold_rows(self, rows: np.ndarray) -> None:
        """Fold stats rows (KEY_FIELDS then SUM_FIELDS, int64) into the cells."""
        if not rows.shape[0]:
            return
        # Garbage u64 values (a negative difference in the kernel) are clamped into
        # +-MAX_VALUE whatever else the batch holds, and such a batch is summed in Python
        # ints: a few of them must not wrap a group's int64 sums.
        exact = int(rows.max()) < _SAFE_SUM and int(rows.min()) > -_SAFE_SUM
        if not exact:
            rows = np.clip(rows, -MAX_VALUE, MAX_VALUE)
        # One sort by group key makes each group a contiguous slice; per-group sums,
        # extremes and over-budget counts then come from one reduceat each.  The gate
        # counts seqs (sorted by PF here), then filters, keeping the order.
        order = np.lexsort((rows[:, _TO], rows[:, _FROM], rows[:, _PF]))
        rows = self._gate.rows(rows[order], pf_col=_PF, seq_col=_SEQ, from_col=_FROM,
                               to_col=_TO)
        if not rows.shape[0]:
            return
        self._records += rows.shape[0]
        keys = rows[:, :3]
        starts = np.concatenate(([0], np.flatnonzero(np.any(keys[1:] != keys[:-1], axis=1)) + 1))
        ends = [*starts[1:].tolist(), rows.shape[0]]
        dists = np.clip(rows[:, _DIST_COLS], 0, MAX_VALUE)
        idx = bucket_indices(dists)
        sums = np.add.reduceat(rows[:, _SUMS] if exact else rows[:, _SUMS].astype(object),
                               starts, axis=0).tolist()
        vmins = np.minimum.reduceat(dists, starts, axis=0).tolist()
        vmaxs = np.maximum.reduceat(dists, starts, axis=0).tolist()
        imins = np.minimum.reduceat(idx, starts, axis=0).tolist()
        imaxs = np.maximum.reduceat(idx, starts, axis=0).tolist()
        over = np.add.reduceat((rows[:, _SWITCH] > self.budget_ns).astype(np.int64),
                               starts).tolist()
        by_dist = np.ascontiguousarray(idx.T)        # one contiguous run per group below
        corr = corr_idx = None
        if self.correction is not None:
            # Below zero (an overcorrection) counts as 0 in the histogram and its sum,
            # as in the kernel's (vft_corrected_ns): the two then agree exactly.
            corr = np.clip(self.correction.switch_arrays(
                {name: rows[:, i] for name, i in _CORR_COLS.items()})[0], 0, MAX_VALUE)
            corr_sums = np.add.reduceat(corr if exact else corr.astype(object), starts).tolist()
            corr_idx = bucket_indices(corr)
        starts = starts.tolist()
        for g, (key, a, b) in enumerate(zip(map(tuple, keys[starts].tolist()), starts, ends)):
            cell = self._cells.get(key)
            if cell is None:
                cell = self._cells[key] = _Cell()
            cell.count += b - a
            cell.sums = [s + x for s, x in zip(cell.sums, sums[g])]
            cell.over += over[g]
            for m, hist in enumerate(cell.hists):
                hist.add_indices(by_dist[m, a:b], imins[g][m], imaxs[g][m], vmins[g][m],
                                 vmaxs[g][m])
            if corr is not None:
                ci = corr_idx[a:b]
                cell.corr.add_indices(ci, int(ci.min()), int(ci.max()), int(corr[a:b].min()),
                                      int(corr[a:b].max()))
                cell.corr_sum += corr_sums[g]

    def account(self, filtered_out: dict | None, *, whole: bool = True) -> None:
        """A capture's ``filtered_out`` meta (see ``FilterGate.account``): the switches
        its recorder's filter left out are counted as left out, not as gaps."""
        self._gate.account(filtered_out, whole=whole)

    @property
    def records(self) -> int:
        """Records counted so far (after the filters)."""
        self._flush()
        return self._records

    @property
    def ignored(self) -> int:
        """Records the filters dropped (here, and by the recorder of an ``account``ed
        capture)."""
        self._flush()
        return self._gate.left_out_total + self._gate.upstream_left_out

    # rate

    def _arrived(self, n: int, now: float | None) -> None:
        if not n:
            return
        now = time.monotonic() if now is None else now
        if self._first_arrival is None:
            self._first_arrival = now
        tick = int(now * 10)
        if self._ticks and self._ticks[-1][0] == tick:
            self._ticks[-1][1] += n
        else:
            self._newest_tick = [tick, n]
            self._ticks.append(self._newest_tick)
            horizon = tick - int(self.rate_window_s * 10)
            while self._ticks and self._ticks[0][0] <= horizon:
                self._ticks.popleft()

    def rate(self, now: float | None = None) -> float:
        """Records/s that arrived over the last ``rate_window_s`` seconds (0.1 s ticks);
        over the time since the first record while the run is younger than that."""
        if self._first_arrival is None:
            return 0.0
        now = time.monotonic() if now is None else now
        horizon = int(now * 10) - int(self.rate_window_s * 10)
        arrived = sum(n for tick, n in self._ticks if tick > horizon)
        span = min(self.rate_window_s, max(now - self._first_arrival, 1.0))
        return arrived / span

    # read-out

    def seq_gaps(self) -> dict[int, int]:
        self._flush()
        return self._gate.gaps()

    def memory_bytes(self) -> int:
        """Histogram memory: bounded by groups x buckets, never by the record count."""
        self._flush()
        return sum(h.nbytes() for c in self._cells.values() for h in c.hists)

    def vf_histograms(self) -> dict[tuple[int, int], VfHistograms]:
        """Per (PF, incoming VF): the count, sums and histograms themselves (merged
        copies; the metrics endpoint turns them into its own buckets at scrape time)."""
        self._flush()
        out: dict[tuple[int, int], _Cell] = {}
        for (pf, _src, dst), cell in self._cells.items():
            out.setdefault((pf, dst), _Cell()).merge(cell)
        return {key: VfHistograms(c.count, c.over, dict(zip(SUM_FIELDS, c.sums)),
                                  dict(zip(DIST_FIELDS, c.hists)),
                                  c.corr if self.correction is not None else None,
                                  c.corr_sum)
                for key, c in sorted(out.items())}

    def snapshot(self, now: float | None = None) -> Snapshot:
        self._flush()
        per_pf: dict = {}
        per_vf: dict = {}
        overall = _Cell()
        for (pf, src, dst), cell in self._cells.items():
            overall.merge(cell)
            per_pf.setdefault(GroupKey("pf", pf), _Cell()).merge(cell)
            per_vf.setdefault(GroupKey("vf", pf, None, dst), _Cell()).merge(cell)

        corr = self.correction

        def ordered(groups: dict) -> list[GroupStats]:
            return [_group_stats(k, c, corr) for k, c in sorted(
                groups.items(), key=lambda kv: (kv[0].pf, kv[0].from_vf or 0, kv[0].to_vf or 0))]

        pairs = {GroupKey("pair", *key): cell for key, cell in self._cells.items()}
        filters = {"pfs": sorted(self.pfs) if self.pfs is not None else None,
                   "vfs": sorted(self.vfs) if self.vfs is not None else None}
        return Snapshot(
            budget_ns=self.budget_ns, records=self._records, ignored=self.ignored,
            overall=_group_stats(GroupKey("all"), overall, corr),
            per_pf=ordered(per_pf), per_vf=ordered(per_vf), per_pair=ordered(pairs),
            seq_gaps=self.seq_gaps(), rate_per_s=self.rate(now), filters=filters)
