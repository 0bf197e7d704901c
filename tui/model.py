"""What the dashboard holds, without any Textual: one ``tracer.model.stats.Stats`` fed with every
switch the filters keep, the kept records (for filter rebuilds and export), the latency
histogram and the trace-time rate series for the Distribution panel, the guest figures.

The App folds batches in here as they come and reads it out at ~10 Hz.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from tracer.capture.files import CaptureWriter
from tracer.model import group_columns as gc
from tracer.model import kernel_hist
from tracer.model.correction import Correction
from tracer.model.filter import FilterGate, merge_meta
from tracer.model.stats import GroupStats, Histogram, Snapshot, Stats, bucket_value

from .guests import GuestModel
from .sources import Batch
from .store import COL, DEFAULT_MAX_RECORDS, RecordStore, to_records, to_rows

NS_PER_S = 1_000_000_000
RATE_SECONDS = 120               # trace seconds of the rate sparkline kept

# The per-PF/VF table's columns (tracer.model.group_columns: one meaning per header).
GROUP_COLUMNS = gc.pick("group", "count", "p50", "p99", "p999", "max", "own_share",
                        "over_budget", "revoke", "grant", "exits", "blocked_time")
SORTED_BY = ("count", "p50", "p99", "p999", "max", "over_budget", "exits", "blocked_time")
# (name shown, key) for ``s``: the table cycles through these, largest first; the name
# is the column's header, lower-cased.
SORTS: tuple[tuple[str, Callable[[GroupStats], float] | None], ...] = (
    ("group", None),
    *((gc.BY_NAME[n].header.lower(), gc.BY_NAME[n].sort_key) for n in SORTED_BY),
)


@dataclass
class ExportPlan:
    """What ``e`` writes: taken on the UI thread, written by a worker."""
    path: Path
    rows: np.ndarray
    meta: dict
    lost: dict[int, int]
    left_out: int


class DashboardModel:
    def __init__(self, budget_ns: int, *, pfs: set[int] | None = None,
                 vfs: set[int] | None = None, max_records: int = DEFAULT_MAX_RECORDS,
                 vendor: str | None = None) -> None:
        self.budget_ns = int(budget_ns)
        self.pfs, self.vfs = pfs, vfs
        self.store = RecordStore(max_records)
        self.guests = GuestModel(vendor)
        self.correction: Correction | None = None     # the source's (use_meta)
        self.stats = Stats(self.budget_ns, pfs=pfs, vfs=vfs)
        self.sort_index = 0
        self.lost: dict[int, int] = {}
        self.kernel_drops = 0            # what the kernel side could not keep (VFT_DROP_*)
        self.kernel_hists: list | None = None   # every switch, exact (model/kernel_hist.py)
        self.problems: list[str] = []
        self.bad_lines = 0
        self.status = ""
        self.finished = False
        self.resets = 0
        self.seen = 0                    # switches received since the last reset
        self.upstream: dict | None = None   # the source capture's meta ``filtered_out``
        self._clear_views()

    def _clear_views(self) -> None:
        self.hist = Histogram()          # switch_ns of the records the filters keep
        self._per_second: dict[int, int] = {}

    # -- input ------------------------------------------------------------------------
    def fold(self, batch: Batch, now: float) -> None:
        if batch.restart:
            self.reset()
            self.finished = False
        if batch.header is not None:
            self.account(batch.header.meta)
        rows = to_rows(batch.switches)
        if batch.switch_rows:
            rows = np.concatenate([rows, *batch.switch_rows])
        if rows.shape[0]:
            self.store.append(rows)
            self.stats.add_rows(rows, now=now)          # the same numbers, read once
            self._view(rows)
            self.seen += rows.shape[0]
        if batch.calls:
            self.guests.add_calls(batch.calls)
        if batch.guest_totals is not None:
            self.guests.set_totals(batch.guest_totals, now)
            drops = batch.guest_totals.get("kernel_drops")
            if isinstance(drops, dict):
                self.kernel_drops = sum(n for n in drops.values() if isinstance(n, int))
        if batch.lost_per_cpu is not None:
            self.lost = dict(batch.lost_per_cpu)
        if batch.problems:
            self.problems = (self.problems + batch.problems)[-50:]
        self.bad_lines += batch.bad_lines
        if batch.status is not None:
            self.status = batch.status
        self.finished = self.finished or batch.finished
        if batch.finished:
            self._apply_upstream(whole=True)

    def use_meta(self, source_meta: dict | None) -> None:
        """The source's meta: what the capture was recorded with.  Its probe costs give
        the corrected switch times (tracer/model/correction.py)."""
        self.correction = Correction.from_meta(source_meta)
        self.stats.set_correction(self.correction)
        try:            # a capture's, of its whole run (live does not read them yet)
            self.kernel_hists = kernel_hist.from_meta((source_meta or {}).get("kernel_histograms"))
        except ValueError as e:
            self.problems.append(str(e))
        self.account(source_meta)

    def exact_text(self) -> str | None:
        """Every switch under the PF filter, from the kernel's histograms (None without)."""
        return kernel_hist.exact_text(self.kernel_hists, self.pfs, self.vfs,
                                      budget_ns=self.budget_ns)

    def account(self, source_meta: dict | None) -> None:
        """The capture being shown was recorded with --pf/--vf: what its recorder left out
        (meta ``filtered_out``) counts as left out, not as seq gaps.  The first and last
        seqs apply once the whole capture has been read (``finished``)."""
        self.upstream = (source_meta or {}).get("filtered_out") or None
        self._apply_upstream(whole=self.finished)

    def _apply_upstream(self, whole: bool) -> None:
        if self.upstream and self.resets == 0:     # after ``r`` it no longer adds up
            self.stats.account(self.upstream, whole=whole)

    def _view(self, rows: np.ndarray) -> None:
        kept = rows[self.stats.filter.mask(rows)]
        if not kept.shape[0]:
            return
        self.hist.add_array(kept[:, COL["switch_ns"]])
        seconds, counts = np.unique(kept[:, COL["t_ns"]] // NS_PER_S, return_counts=True)
        for s, n in zip(seconds.tolist(), counts.tolist()):
            self._per_second[s] = self._per_second.get(s, 0) + n
        if len(self._per_second) > 2 * RATE_SECONDS:
            newest = max(self._per_second)
            self._per_second = {s: n for s, n in self._per_second.items()
                                if s > newest - RATE_SECONDS}

    # -- the keys -----------------------------------------------------------------------
    def reset(self) -> None:
        """``r``: statistics, kept records and guest figures start again from now."""
        self.stats.reset()
        self.store.clear()
        self.guests.reset()
        self._clear_views()
        self.resets += 1
        self.seen = 0

    def set_filters(self, pfs: set[int] | None, vfs: set[int] | None, now: float) -> None:
        """``f``: a new Stats with these filters, rebuilt from every kept record."""
        self.pfs, self.vfs = pfs, vfs
        self.stats = Stats(self.budget_ns, pfs=pfs, vfs=vfs, correction=self.correction)
        self._clear_views()
        self._apply_upstream(whole=self.finished)
        rows = self.store.rows()
        if rows.shape[0]:
            self.stats.add_rows(rows, now=now)      # Stats filters after counting seqs
            self._view(rows)

    def set_budget(self, budget_ns: int) -> None:
        """``b``: the over-budget counts so far are recomputed by the statistics core."""
        self.budget_ns = int(budget_ns)
        self.stats.set_budget(self.budget_ns)

    def cycle_sort(self) -> str:
        self.sort_index = (self.sort_index + 1) % len(SORTS)
        return SORTS[self.sort_index][0]

    def sort_by(self, name: str) -> None:
        self.sort_index = [n for n, _ in SORTS].index(name)

    @property
    def sort_name(self) -> str:
        return SORTS[self.sort_index][0]

    # -- read-out ---------------------------------------------------------------------
    def snapshot(self, now: float) -> Snapshot:
        return self.stats.snapshot(now=now)

    def counts(self) -> tuple[int, int]:
        """(records counted, seqs missing): a snapshot's ``records`` and
        ``seq_gaps_total`` without computing every group's figures."""
        return self.stats.records, sum(self.stats.seq_gaps().values())

    def group_rows(self, snap: Snapshot) -> list[GroupStats]:
        """All, then the PFs, then (PF, VF): each level sorted by the current column."""
        key = SORTS[self.sort_index][1]
        levels = [snap.per_pf, snap.per_vf]
        if key is not None:
            levels = [sorted(level, key=key, reverse=True) for level in levels]
        return [snap.overall, *levels[0], *levels[1]] if snap.records else []

    def newest(self, n: int) -> np.ndarray:
        return self.store.newest(n, self.pfs, self.vfs)

    def distribution(self) -> tuple[np.ndarray, np.ndarray]:
        """(value, count) of every non-empty histogram bucket."""
        h = self.hist
        idx = np.flatnonzero(h.counts)
        values = np.array([bucket_value(h.base + int(i)) for i in idx], dtype=np.float64)
        return values, h.counts[idx].astype(np.float64)

    def rate_series(self, points: int = 60) -> list[float]:
        """Switches per second of trace time, the newest ``points`` seconds."""
        if not self._per_second:
            return []
        newest = max(self._per_second)
        first = max(min(self._per_second), newest - points + 1)
        return [float(self._per_second.get(s, 0)) for s in range(first, newest + 1)]

    # -- export -------------------------------------------------------------------------
    def plan_export(self, directory: Path, source_meta: dict, source_description: str,
                    paused: bool = False) -> ExportPlan:
        gate = FilterGate(self.stats.filter)
        rows = gate.rows(self.store.rows()).copy()
        skip = {"columns", "complete", "stop_time", "stop_reason", "records",
                "lost_records_per_cpu", "lost_total", "start_time", "calls_file", "tool",
                "filtered_out"}
        meta = {k: v for k, v in source_meta.items() if k not in skip}
        left_out = self.store.dropped
        # What a filter left out, here or by the source's recorder, is no seq gap to
        # whoever opens the export (the recorder's account holds while the store has
        # every record since the start).
        upstream = self.upstream if not left_out and not self.resets else None
        if upstream or gate.filter.active:
            meta["filtered_out"] = merge_meta(upstream, gate.as_meta())
        meta.update({
            "tool": "vftrace dashboard export",
            "budget_ns": self.budget_ns,
            "filters": {"pf": sorted(self.pfs) if self.pfs is not None else None,
                        "vf": sorted(self.vfs) if self.vfs is not None else None,
                        "pid": (source_meta.get("filters") or {}).get("pid")},
            "calls_file": None,
            "export": {
                "from": source_description,
                "source_start_time": source_meta.get("start_time"),
                "source_filters": source_meta.get("filters"),
                "records": int(rows.shape[0]),
                "records_left_out": left_out,
                "max_records_kept": self.store.max_records,
                "statistics_reset": self.resets > 0,
                "paused": paused,
            },
        })
        return ExportPlan(export_path(directory), rows, meta, dict(self.lost), left_out)


def export_path(directory: Path, now: datetime | None = None) -> Path:
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%d-%H%M%S")
    path = directory / f"vftrace-export-{stamp}.csv"
    n = 1
    while path.exists() or path.with_name(path.name[:-4] + ".meta.json").exists():
        n += 1
        path = directory / f"vftrace-export-{stamp}-{n}.csv"
    return path


def write_export(plan: ExportPlan) -> Path:
    """Write the capture (CSV + meta) the plan describes; returns its path."""
    writer = CaptureWriter(plan.path, plan.meta)
    try:
        step = 65536
        for start in range(0, plan.rows.shape[0], step):
            writer.write_many(to_records(plan.rows[start:start + step]))
    finally:
        writer.close(stop_reason="export", lost=plan.lost)
    return plan.path


def describe_export(plan: ExportPlan) -> str:
    text = f"exported {plan.rows.shape[0]} switches to {os.path.relpath(plan.path)}"
    if plan.left_out:
        text += (f"; {plan.left_out} older switches were left out (the dashboard keeps "
                 f"the newest {plan.meta['export']['max_records_kept']})")
    return text
