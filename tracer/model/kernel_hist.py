"""The kernel's histograms of every switch, as the statistics core's own objects.

The switch program counts each switch that closed into log-linear buckets per (pf,
incoming vf) and phase before its record goes out (bpf/vftrace.h), so these counts hold
every switch, also those whose records were lost.  The buckets are ``stats.Histogram``'s
(``stats.bucket_index``), so a kernel histogram and one built from records compare bucket
by bucket and merge.  They travel in the capture's meta (``kernel_histograms``), sparse,
so that ``report`` and ``replay`` of a lossy capture still give exact percentiles.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .stats import SUB_BITS, Histogram, bucket_bounds, bucket_index

# The kernel's order (bpf/vftrace.h VFT_HIST_*).  "corrected" is the switch time with
# vftrace's own cost taken off (correction.py's integer rule, vft_corrected_ns), kept
# where the probe costs were known before arming; the rest are raw record columns.
PHASES = ("switch", "revoke", "grant", "corrected")
RAW_PHASES = PHASES[:3]
PHASE_COLUMNS = {"switch": "switch_ns", "revoke": "revoke_ns", "grant": "grant_ns"}
# Values at or above this share the kernel's last bucket (bpf/vftrace.h VFT_HIST_MAX_BITS).
MAX_BITS = 32


@dataclass
class KernelHist:
    pf: int
    vf: int
    phase: str
    hist: Histogram
    sum_ns: int

    @property
    def count(self) -> int:
        return self.hist.total


def kernel_bucket(value: int) -> int:
    """The kernel's bucket of ``value``: the core's, or its last one from 2**MAX_BITS."""
    return bucket_index(min(value, (1 << MAX_BITS) - 1))


def from_counts(counts: np.ndarray, vmin: int, vmax: int, base: int = 0) -> Histogram:
    """A Histogram from kernel bucket counts (``counts[i]`` is bucket ``base + i``) and
    their exact extremes.  Its total is the buckets' (the kernel's count beside them can
    run ahead mid-switch)."""
    h = Histogram()
    nz = np.flatnonzero(counts)
    if nz.size:
        lo, hi = int(nz[0]), int(nz[-1])
        h.base, h.counts = base + lo, counts[lo:hi + 1].astype(np.int64)
        h.total, h.min, h.max = int(h.counts.sum()), vmin, vmax
    return h


def buckets(h: Histogram) -> dict[int, int]:
    """A histogram's non-empty buckets, for comparing two bucket by bucket."""
    nz = np.flatnonzero(h.counts)
    return {int(h.base + i): int(h.counts[i]) for i in nz}


def to_meta(hists: list[KernelHist], dropped: int) -> dict:
    return {"sub_bits": SUB_BITS, "max_bits": MAX_BITS, "slots_full": dropped,
            "groups": [{"pf": k.pf, "vf": k.vf, "phase": k.phase, "count": k.count,
                        "sum_ns": k.sum_ns, "min_ns": k.hist.min, "max_ns": k.hist.max,
                        "buckets": [[b, n] for b, n in buckets(k.hist).items()]}
                       for k in hists if k.count]}


def merged(hists: list[KernelHist], phase: str = "switch",
           pfs: frozenset[int] | None = None) -> Histogram:
    """One phase's histogram over every (pf, vf), or over the PFs ``pfs``."""
    out = Histogram()
    for k in hists:
        if k.phase == phase and (pfs is None or k.pf in pfs):
            out.merge(k.hist)
    return out


def over_budget(h: Histogram, budget_ns: int) -> tuple[int, bool]:
    """How many values exceed ``budget_ns``, and whether that is exact: it is when the
    budget ends its bucket (every budget below 2 << SUB_BITS ns does); otherwise the
    values in the budget's own bucket are not counted (a lower bound)."""
    b = bucket_index(budget_ns)
    start = max(b + 1 - h.base, 0)
    return int(h.counts[start:].sum()), bucket_bounds(b)[1] == budget_ns


def selected(hists: list[KernelHist] | None, pfs=None, vfs=None,
             phase: str = "switch") -> Histogram | None:
    """The ``phase`` histogram of the PFs ``pfs`` (None: all); None without histograms,
    with a VF filter (the kernel keeps (pf, incoming vf) only; the filter also keeps a
    VF's outgoing switches), or for "corrected" where the kernel kept none."""
    if hists is None or vfs is not None:
        return None
    if phase not in RAW_PHASES and not any(k.phase == phase for k in hists):
        return None
    return merged(hists, phase, pfs=frozenset(pfs) if pfs is not None else None)


def percentiles_json(h: Histogram) -> dict:
    p50, p90, p99, p999 = h.percentiles([50, 90, 99, 99.9])
    return {"count": h.total, "p50_ns": p50, "p90_ns": p90, "p99_ns": p99, "p999_ns": p999,
            "max_ns": h.max}


def exact_text(hists: list[KernelHist] | None, pfs=None, vfs=None,
               slots_full: int = 0, budget_ns: int | None = None) -> str | None:
    """The line of every switch of ``selected``, exact whatever records were lost."""
    from .units import fmt_ns
    h = selected(hists, pfs, vfs)
    if h is None:
        return None
    if not h.total:
        return "every switch (kernel histograms): none yet"
    p50, p90, p99, p999 = h.percentiles([50, 90, 99, 99.9])
    what = ("exact whatever was lost" if not slots_full else
            f"NOT exact: {slots_full} switches of (PF, VF) pairs past the kernel's slots missing")
    def over(h: Histogram) -> str:
        if budget_ns is None or not h.total:
            return ""
        n, exact = over_budget(h, budget_ns)
        return f"  over budget {'' if exact else '>='}{100 * n / h.total:.2f}%"
    text = (f"every switch (kernel histograms, {what}): {h.total} switches; "
            f"p50 {fmt_ns(p50)}  p90 {fmt_ns(p90)}  p99 {fmt_ns(p99)}  p99.9 {fmt_ns(p999)}  "
            f"max {fmt_ns(h.max)}{over(h)}")
    c = selected(hists, pfs, vfs, "corrected")
    if c is not None and c.total:
        p50, p90, p99, p999 = c.percentiles([50, 90, 99, 99.9])
        text += (f"\n  corrected (vftrace's own cost off, every switch): p50 {fmt_ns(p50)}  "
                 f"p90 {fmt_ns(p90)}  p99 {fmt_ns(p99)}  p99.9 {fmt_ns(p999)}  "
                 f"max {fmt_ns(c.max)}{over(c)}")
    return text


def exact_line(meta: dict | None, filters: dict | None = None) -> str | None:
    """``exact_text`` of a capture's meta, with a Snapshot's ``filters``."""
    filters = filters or {}
    try:
        hists = from_meta((meta or {}).get("kernel_histograms"))
    except ValueError as e:
        return f"kernel histograms: unreadable ({e})"
    slots_full = (meta or {}).get("kernel_histograms", {}).get("slots_full") or 0
    budget = (meta or {}).get("budget_ns")
    return exact_text(hists, filters.get("pfs"), filters.get("vfs"), int(slots_full),
                      budget if isinstance(budget, int) else None)


def switch_accounting(hist_meta: dict, lost_in_kernel: int, read: int, passed_on: int) -> dict:
    """Every switch the kernel counted (its histograms, and the switches of pairs past
    its slots) against what became of its record: lost in the kernel (a full ring,
    counted there), read from the rings, passed on to the capture and the statistics.
    ``unaccounted`` above 0 is a loss nobody counted, and the capture says so (meta
    ``switch_accounting``, the summary's warning).  Below 0 is not a loss: a window that
    closed after the histograms were read at stop still wrote its row."""
    counted = sum(int(g["count"]) for g in hist_meta.get("groups", ()) if g["phase"] == "switch")
    counted += int(hist_meta.get("slots_full") or 0)
    return {"kernel": counted, "lost_in_kernel": lost_in_kernel, "read": read,
            "passed_on": passed_on, "unaccounted": counted - lost_in_kernel - passed_on}


def accounting_warning(meta: dict | None) -> str | None:
    """The summary's words for switches neither recorded nor counted lost, if any."""
    acc = (meta or {}).get("switch_accounting")
    keys = ("kernel", "lost_in_kernel", "read", "passed_on", "unaccounted")
    if not isinstance(acc, dict) or not all(isinstance(acc.get(k), int) for k in keys) \
            or acc["unaccounted"] <= 0:
        return None
    emitted = acc["kernel"] - acc["lost_in_kernel"]
    written = acc.get("written") if isinstance(acc.get("written"), int) else None
    where = ("the reader never saw them" if acc["read"] < emitted
             else "read, then not passed on" if acc["passed_on"] < acc["read"]
             else "passed on, then not written")
    return (f"{acc['unaccounted']} switches the kernel counted are neither recorded nor "
            f"counted lost ({where}: {acc['read']} read, {acc['passed_on']} passed on"
            + (f", {written} written" if written is not None else "")
            + f", of {acc['kernel']} counted and {acc['lost_in_kernel']} lost in the kernel)")


def from_meta(m: dict | None) -> list[KernelHist] | None:
    """The histograms a capture's meta kept (None for a capture from before them);
    ValueError, in one line, for one not as vftrace writes them."""
    if not m:
        return None
    try:
        if m["sub_bits"] != SUB_BITS:
            raise ValueError(f"kernel_histograms: sub_bits {m['sub_bits']}, this vftrace "
                             f"reads {SUB_BITS}")
        out = []
        for g in m["groups"]:
            h = Histogram()
            if g["buckets"]:
                idx = np.array([b for b, _ in g["buckets"]], dtype=np.int64)
                n = np.array([c for _, c in g["buckets"]], dtype=np.int64)
                h.base = int(idx.min())
                h.counts = np.zeros(int(idx.max()) - h.base + 1, dtype=np.int64)
                h.counts[idx - h.base] = n
                h.total, h.min, h.max = int(n.sum()), int(g["min_ns"]), int(g["max_ns"])
            if g["phase"] not in PHASES:
                raise ValueError(f"kernel_histograms: unknown phase {g['phase']!r}")
            out.append(KernelHist(int(g["pf"]), int(g["vf"]), g["phase"], h, int(g["sum_ns"])))
        return out
    except (KeyError, TypeError) as e:
        raise ValueError(f"kernel_histograms: not as vftrace writes them ({e})") from None
