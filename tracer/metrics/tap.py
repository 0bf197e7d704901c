"""Scrape-time read-outs, made by the thread that owns the data.

The statistics core and the BPF engine are not thread-safe, and nothing on the record
path takes a lock.  So a scrape (on an HTTP thread) asks, and the owner's loop, which
already wakes every ~100 ms (``Session.poll``, the live pump, a replay's read), answers
at its next turn (``OwnerRead``) with a ``MetricsState``.  A scrape that waits longer
than ``wait_s`` (the owner is busy starting up or stopping) gets the previous state,
marked stale.  After ``close`` every scrape gets the final state at once.

``state_from`` is the one rule that turns the statistics core, a meta-shaped dict (a
capture's meta, or the live engine's read-outs in the same shape) and the kernel's
histograms into a state, for every front end.
"""
from __future__ import annotations

import time
from typing import Callable

from ..model.kernel_hist import KernelHist
from ..model.stats import Stats
from .exposition import MetricsState
from .owner import WAIT_S, OwnerRead

class MetricsTap(OwnerRead[MetricsState]):
    """The scrapes' OwnerRead: a state the owner was late with, or failed to build
    anew, is the previous one marked stale; each says what building it took the owner."""

    def __init__(self, build: Callable[[], MetricsState], wait_s: float = WAIT_S) -> None:
        def timed() -> MetricsState:
            t0 = time.monotonic()
            state = build()
            # What answering cost the owner's loop (it drained no records meanwhile).
            state.read_seconds = time.monotonic() - t0
            return state
        super().__init__(timed, wait_s)

    def state(self) -> MetricsState | None:
        """The owner's answer to this scrape, or the previous state marked stale."""
        state, fresh = self.get()
        if state is not None and not fresh:
            state = MetricsState(**{**state.__dict__, "stale": True})
        return state


def _modes_text(modes) -> str:
    if isinstance(modes, dict):
        return ",".join(f"{k}={v}" for k, v in sorted(modes.items()))
    return str(modes or "")


def state_from(stats: Stats, meta: dict, kernel: list[KernelHist] | None) -> MetricsState:
    """The state of a recording or capture: ``meta`` as a capture's meta says it (the
    live engine's read-outs are put in the same keys), ``kernel`` its histograms of
    every switch (None where there are none yet)."""
    meta = meta or {}
    # The recorder's filters (in the meta) and this reader's (the stats'): both apply.
    filters = meta.get("filters") or {}
    pfs = set(filters["pfs"]) if filters.get("pfs") else None
    if stats.pfs is not None:
        pfs = set(stats.pfs) if pfs is None else pfs & set(stats.pfs)
    vfs = filters.get("vfs") or stats.vfs
    if kernel is not None:
        # The kernel keys by (pf, incoming vf): a VF filter also keeps a VF's outgoing
        # switches, which it cannot pick out (kernel_hist.selected's rule).
        kernel = None if vfs else [k for k in kernel if pfs is None or k.pf in pfs]
    info = {"version": str(meta.get("version", "")), "kernel": str(meta.get("kernel", "")),
            "depth": str(meta.get("depth", "")), "switch_source": str(meta.get("switch_source", "")),
            "probe_modes": _modes_text(meta.get("probe_modes")),
            "buffer": str(meta.get("buffer", "")), "tool": str(meta.get("tool", ""))}
    bg = meta.get("background") or {}
    lost = {(kind, "kernel"): int(n) for kind, n in (meta.get("lost_by_kind") or {}).items()}
    if not lost and meta.get("lost_total"):          # a capture from before lost_by_kind
        lost[("unknown", "kernel")] = int(meta["lost_total"])
    # Always a series, so increase() sees the first loss (from 0, not from absent).
    lost.setdefault(("switch", "kernel"), 0)
    if bg.get("out_of_range_records"):
        lost[("out_of_range", "user")] = int(bg["out_of_range_records"])
    if bg.get("unreadable_ring_records"):
        lost[("unreadable", "user")] = int(bg["unreadable_ring_records"])
    floor = {m: float(v["median_ns"]) for m, v in (meta.get("floor_ns") or {}).items()
             if isinstance(v, dict) and "median_ns" in v}
    costs = {t: float(v["median_ns"]) for t, v in (meta.get("probe_costs") or {}).items()
             if isinstance(v, dict) and "median_ns" in v}
    return MetricsState(
        info=info, budget_ns=stats.budget_ns, vfs=stats.vf_histograms(), kernel=kernel,
        exits=list(bg.get("kvm_exits") or []),
        kvm_vendor=meta.get("kvm_vendor"), lost=lost,
        kernel_drops={k: int(v) for k, v in (bg.get("kernel_drops") or {}).items()},
        floor_ns=floor, probe_cost_ns=costs, seq_gaps=stats.seq_gaps())


class TappedSource:
    """A dashboard source (tui/sources.py: ``read`` -> a batch of switches) whose
    switches also feed the metrics' own statistics core, in the reading thread, which
    answers the scrapes.  ``source.metrics_view()`` gives the rest of the state (its meta
    and kernel histograms); when the source finishes, its final state is kept for good."""

    def __init__(self, source, stats: Stats) -> None:
        self.source, self.stats = source, stats
        self.tap = MetricsTap(self._build)
        self.finished = False

    def _build(self) -> MetricsState:
        meta, kernel = self.source.metrics_view()
        return state_from(self.stats, meta, kernel)

    def __getattr__(self, name):            # everything else is the source's
        return getattr(self.source, name)

    def start(self):
        header = self.source.start()
        if self.stats.correction is None:       # the capture's, or the recording's
            from ..model.correction import Correction
            self.stats.set_correction(Correction.from_meta(self.source.metrics_view()[0]))
        return header

    def read(self, timeout: float):
        batch = self.source.read(timeout)
        if batch.switches:
            self.stats.add_many(batch.switches)
        for rows in batch.switch_rows:          # the live engine's batches
            self.stats.add_rows(rows)
        if batch.finished and not self.finished:
            self.finished = True
            self.tap.close()
        else:
            self.tap.service()
        return batch

    def stop(self, reason: str) -> None:
        try:
            self.source.stop(reason)
        finally:
            if not self.finished:
                self.finished = True
                self.tap.close()
