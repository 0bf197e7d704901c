"""Switch durations with vftrace's own cost taken off, and the uncertainty of that.

Every window's record counts the probe runs that fired on its task while it was open, by
type (``fentry_hits``, ``kprobe_hits``, ``entry_hits``).  ``tracer/kernel/costs.py``
measures what one run of each type costs on the production code path (time with the
program attached minus time without, in interleaved rounds) and writes the median and
the p10-p90 spread into the capture's meta as ``probe_costs``.  Here:

  switch   the driver's own timing of the switch when the source has one (pf_sched's
           ``source_ns``: its clock reads sit inside the window's bookends, so the
           bookends' own cost is already out), else the window's ``switch_ns``; minus
           the hits times their costs
  revoke   ``revoke_ns`` minus the hits of every call but iommu_map (the zap, the
           notifier, the vCPU kicks it causes, the unmap and its flush)
  grant    ``grant_ns`` minus the hits of the iommu_map calls
  unmap    ``unmap_ns`` minus its calls times the floor of their probe mode (the part of
  map      a probe pair inside the call it times, ``floor_ns``)

What a hit type costs is taken in whole milli-ns (a median below zero, calibration
noise, as nothing), and what hits cost is rounded half up to whole ns: integer
arithmetic, so the switch program computes the very same corrected switch time for its
histograms of every switch (vft_corrected_ns, bpf/vftrace.h; the costs go into its
hist_costs map before it arms).  The uncertainty of one correction is the hits times
half the p10-p90 spread of their cost, the hit types added in quadrature (they are
calibrated independently).  The
bookends of a source without its own timing are not taken off: ``bookends_corrected``
says which.  Plain arithmetic on the meta and the record: no other vftrace import.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

HIT_TYPES: tuple[str, ...] = ("fentry", "kprobe", "entry")
HIT_COLUMNS: tuple[str, ...] = tuple(f"{t}_hits" for t in HIT_TYPES)
CORRECTED: tuple[str, ...] = ("switch", "revoke", "grant", "unmap", "map")
# Written after every record column, in pairs: the value, then its uncertainty.
CORRECTED_COLUMNS: tuple[str, ...] = tuple(c for name in CORRECTED
                                           for c in (f"{name}_corr_ns", f"{name}_corr_err_ns"))


@dataclass(frozen=True)
class Cost:
    """One probe run's cost: the median over calibration rounds, and half its p10-p90."""
    median_ns: float
    half_spread_ns: float

    @property
    def milli_ns(self) -> int:
        """The median in whole milli-ns, never below zero: what the kernel is given."""
        return max(round(self.median_ns * 1000), 0)

    @classmethod
    def of(cls, entry) -> "Cost | None":
        if not isinstance(entry, dict):
            return None
        try:
            med = float(entry["median_ns"])
            lo, hi = float(entry.get("p10_ns", med)), float(entry.get("p90_ns", med))
        except (KeyError, TypeError, ValueError):
            return None
        if not all(map(math.isfinite, (med, lo, hi))):
            return None
        return cls(med, abs(hi - lo) / 2)


ZERO = Cost(0.0, 0.0)


@dataclass(frozen=True)
class Correction:
    """How one capture's durations are corrected; ``None`` from ``from_meta`` when the
    capture cannot be (it predates hit counts, or a hit type it used has no cost)."""
    costs: dict[str, Cost]          # by hit type
    floors: dict[str, Cost]         # by probe mode: what a pair adds inside its call
    map_mode: str                   # the probe mode of iommu_map, of iommu_unmap
    unmap_mode: str
    # what values() takes off, by (hits, map and unmap calls): a handful of keys in a
    # capture, so a record costs a lookup and five subtractions on the recorder's path
    _terms: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_meta(cls, meta: dict | None) -> "Correction | None":
        meta = meta or {}
        pc = meta.get("probe_costs")
        if not isinstance(pc, dict):
            return None
        costs = {t: Cost.of(pc.get(t)) for t in HIT_TYPES}
        if any(c is None for t, c in costs.items() if t in (pc.get("types") or ())):
            return None
        floors = {m: Cost.of(v) for m, v in (meta.get("floor_ns") or {}).items()}
        modes = meta.get("probe_modes") or {}
        return cls({t: c or ZERO for t, c in costs.items()},
                   {m: c for m, c in floors.items() if c is not None},
                   str(modes.get("iommu_map", "")), str(modes.get("iommu_unmap", "")))

    @property
    def cost_milli_ns(self) -> tuple[int, ...]:
        """Each hit type's cost in milli-ns, in ``HIT_TYPES`` order (hist_costs)."""
        return tuple(self.costs[t].milli_ns for t in HIT_TYPES)

    # -- one record ------------------------------------------------------------------
    def own(self, hits: tuple[int, int, int]) -> tuple[int, float]:
        """(cost in ns, uncertainty) of ``hits`` (fentry, kprobe, entry runs)."""
        milli = sum(n * c for n, c in zip(hits, self.cost_milli_ns))
        err2 = sum((n * self.costs[t].half_spread_ns) ** 2 for n, t in zip(hits, HIT_TYPES))
        return (milli + 500) // 1000, math.sqrt(err2)

    def _map_hits(self, map_calls: int) -> tuple[int, int, int]:
        return (map_calls if self.map_mode == "fentry" else 0,
                map_calls if self.map_mode == "kprobe" else 0, 0)

    def _floor(self, mode: str, calls: int) -> tuple[float, float]:
        f = self.floors.get(mode, ZERO)
        return calls * f.median_ns, calls * f.half_spread_ns

    def terms(self, fentry: int, kprobe: int, entry: int, map_calls: int,
              unmap_calls: int) -> tuple[int, ...]:
        """What is taken off switch, revoke, grant, unmap and map, each with its
        uncertainty, for a record with these hits and calls (integer ns)."""
        own, own_err = self.own((fentry, kprobe, entry))
        g_own, g_err = self.own(self._map_hits(map_calls))
        r_own, r_err = own - g_own, math.sqrt(max(own_err ** 2 - g_err ** 2, 0.0))
        u_own, u_err = self._floor(self.unmap_mode, unmap_calls)
        m_own, m_err = self._floor(self.map_mode, map_calls)
        return (own, round(own_err), r_own, round(r_err), g_own, round(g_err),
                *(round(v) for v in (u_own, u_err, m_own, m_err)))

    def values(self, rec) -> tuple[int, ...]:
        """One record's ``CORRECTED_COLUMNS`` (rec: anything with the record's fields)."""
        key = (rec.fentry_hits, rec.kprobe_hits, rec.entry_hits, rec.map_calls,
               rec.unmap_calls)
        t = self._terms.get(key)
        if t is None:
            if len(self._terms) >= 4096:        # bounded whatever the records hold
                self._terms.clear()
            t = self._terms[key] = self.terms(*key)
        own, own_err, r_own, r_err, g_own, g_err, u_own, u_err, m_own, m_err = t
        src = rec.source_ns
        return ((src if src > 0 else rec.switch_ns) - own, own_err,
                rec.revoke_ns - r_own, r_err, rec.grant_ns - g_own, g_err,
                rec.unmap_ns - u_own, u_err, rec.map_ns - m_own, m_err)

    # -- many records (numpy arrays by column name) ----------------------------------
    def value_rows(self, cols: dict):
        """``values`` of many records at once: an (n, len(CORRECTED_COLUMNS)) int64
        array from their columns (int64 arrays by name), the same numbers."""
        import numpy as np
        keys = np.stack([cols[c] for c in (*HIT_COLUMNS, "map_calls", "unmap_calls")], axis=1)
        out = np.empty((keys.shape[0], len(CORRECTED_COLUMNS)), np.int64)
        if not keys.shape[0]:
            return out
        if keys.min() >= 0 and keys.max() < 1 << 12:     # the usual: one int64 per key
            packed = keys[:, 0].copy()
            for i in range(1, keys.shape[1]):
                packed |= keys[:, i] << (12 * i)
            _, first, inverse = np.unique(packed, return_index=True, return_inverse=True)
            uniq = keys[first]
        else:
            uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
        terms = np.array([self.terms(*k) for k in uniq.tolist()], np.int64)[inverse.ravel()]
        src = cols["source_ns"]
        bases = (np.where(src > 0, src, cols["switch_ns"]), cols["revoke_ns"], cols["grant_ns"],
                 cols["unmap_ns"], cols["map_ns"])
        for i, base in enumerate(bases):
            out[:, 2 * i] = base - terms[:, 2 * i]
            out[:, 2 * i + 1] = terms[:, 2 * i + 1]
        return out

    def switch_arrays(self, cols: dict):
        """(corrected switch as int64, uncertainty as float) arrays for columns ``cols``
        (``switch_ns``, ``source_ns`` and the three hit counts): ``values``' numbers."""
        import numpy as np
        milli = np.zeros(len(cols["switch_ns"]), np.int64)
        err2 = np.zeros(len(cols["switch_ns"]))
        for t, col, c in zip(HIT_TYPES, HIT_COLUMNS, self.cost_milli_ns):
            n = np.asarray(cols[col], dtype=np.int64)
            milli += n * c
            err2 += (n * self.costs[t].half_spread_ns) ** 2
        src = np.asarray(cols["source_ns"])
        base = np.where(src > 0, src, np.asarray(cols["switch_ns"]))
        return base - (milli + 500) // 1000, np.sqrt(err2)

    def mean_hits_error(self, mean_hits: tuple[float, float, float]) -> float:
        """The uncertainty of a corrected figure of a switch with ``mean_hits``."""
        return self.own(mean_hits)[1]


def bookends_corrected(meta: dict | None) -> bool:
    """Whether the switch correction also removes the window's bookends: only with a
    source that times itself (pf_sched's ``source_ns``)."""
    return (meta or {}).get("switch_source") == "pf_sched"
