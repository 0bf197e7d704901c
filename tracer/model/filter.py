"""The PF/VF filter (``--pf``/``--vf``, the dashboard's ``f``): which switches it keeps,
and the one place it is applied.

A switch is kept when its PF is in ``pfs`` and its incoming or outgoing VF is in ``vfs``
(a switch involves both); None keeps every PF or VF.

Seqs are numbered per PF by the kernel, so a switch a VF filter leaves out would look
like a lost one to whoever counts seq gaps after the filter.  ``FilterGate`` is therefore
the only way the filter is applied: it counts every switch's seq first, then filters.
The recorder's gate writes what it left out into the capture's meta
(``FilterGate.as_meta``, meta key ``filtered_out``) and a reader of that capture hands
it to its own gate (``FilterGate.account``), so recording, the dashboard, replay and
report count the same gaps: only switches that never reached vftrace.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from .schema import COLUMNS

_PF, _FROM, _TO, _SEQ = (COLUMNS.index(c) for c in ("pf", "from_vf", "to_vf", "seq"))

META_KEY = "filtered_out"       # the capture meta's account of what the filter left out


def filter_mask(rows: np.ndarray, pfs: Iterable[int] | None,
                vfs: Iterable[int] | None, *, pf_col: int = _PF, from_col: int = _FROM,
                to_col: int = _TO) -> np.ndarray:
    """Which of ``rows`` (int64 switch rows, ``COLUMNS`` order unless the column indexes
    say otherwise) the filter keeps."""
    keep = np.ones(rows.shape[0], dtype=bool)
    if pfs is not None:
        keep &= np.isin(rows[:, pf_col], list(pfs))
    if vfs is not None:
        wanted = list(vfs)
        keep &= np.isin(rows[:, to_col], wanted) | np.isin(rows[:, from_col], wanted)
    return keep


@dataclass(frozen=True)
class SwitchFilter:
    """The rule itself; ``None`` keeps every PF (VF)."""
    pfs: frozenset[int] | None = None
    vfs: frozenset[int] | None = None

    @classmethod
    def of(cls, pfs: Iterable[int] | None = None,
           vfs: Iterable[int] | None = None) -> SwitchFilter:
        return cls(frozenset(pfs) if pfs is not None else None,
                   frozenset(vfs) if vfs is not None else None)

    @property
    def active(self) -> bool:
        return self.pfs is not None or self.vfs is not None

    def keeps_pf(self, pf: int) -> bool:
        return self.pfs is None or pf in self.pfs

    def mask(self, rows: np.ndarray, **columns) -> np.ndarray:
        return filter_mask(rows, self.pfs, self.vfs, **columns)


class FilterGate:
    """Count every switch's seq, then apply the filter: what passes is kept, what does not
    is counted per PF as left out (never as lost).

    ``gaps()`` is seqs missing per PF the filter keeps: between the first and the last seq
    seen (here or, via ``account``, upstream), neither delivered nor left out.  Out of
    order delivery (per-CPU buffers) is not loss: only extremes and counts are kept."""

    def __init__(self, flt: SwitchFilter | None = None) -> None:
        self.filter = flt or SwitchFilter()
        self._seqs: dict[int, list[int]] = {}      # pf -> [first, last, seen]
        self.left_out: dict[int, int] = {}         # pf -> switches the filter dropped
        self._upstream: dict[int, list[int | None]] = {}   # pf -> [left out, first, last]

    # -- feeding --------------------------------------------------------------------
    def rows(self, rows: np.ndarray, *, pf_col: int = _PF, seq_col: int = _SEQ,
             from_col: int = _FROM, to_col: int = _TO) -> np.ndarray:
        """int64 switch rows: every one counted, the kept ones returned in their order."""
        if not rows.shape[0]:
            return rows
        self._tally(rows[:, pf_col], rows[:, seq_col])
        if not self.filter.active:
            return rows
        keep = self.filter.mask(rows, pf_col=pf_col, from_col=from_col, to_col=to_col)
        dropped = rows[~keep, pf_col]
        if dropped.size:
            pfs, counts = np.unique(dropped, return_counts=True)
            for pf, n in zip(pfs.tolist(), counts.tolist()):
                self.left_out[pf] = self.left_out.get(pf, 0) + n
            return rows[keep]
        return rows

    def _tally(self, pfs: np.ndarray, seqs: np.ndarray) -> None:
        if pfs.size > 1 and not bool(np.all(pfs[1:] >= pfs[:-1])):
            order = np.argsort(pfs, kind="stable")
            pfs, seqs = pfs[order], seqs[order]
        starts = np.concatenate(([0], np.flatnonzero(pfs[1:] != pfs[:-1]) + 1))
        counts = np.diff(np.append(starts, pfs.size)).tolist()
        los = np.minimum.reduceat(seqs, starts).tolist()
        his = np.maximum.reduceat(seqs, starts).tolist()
        for pf, lo, hi, n in zip(pfs[starts].tolist(), los, his, counts):
            seen = self._seqs.get(pf)
            if seen is None:
                self._seqs[pf] = [lo, hi, n]
            else:
                seen[0], seen[1], seen[2] = min(seen[0], lo), max(seen[1], hi), seen[2] + n

    # -- what a recorder upstream left out ---------------------------------------------
    def account(self, filtered_out: dict | None, *, whole: bool = True) -> None:
        """Take a capture's ``filtered_out`` meta: the switches its recorder's filter left
        out count as seen, not missing.  ``whole``: the rows of the whole capture will
        come (its first and last seq per PF apply); a reader part-way through (a replay)
        passes False and again True once it has read everything."""
        for pf, entry in parse_meta(filtered_out).items():
            n, first, last = entry
            self._upstream[pf] = [n, first if whole else None, last if whole else None]

    @property
    def left_out_total(self) -> int:
        return sum(self.left_out.values())

    @property
    def upstream_left_out(self) -> int:
        return sum(e[0] for e in self._upstream.values())

    # -- read-out -----------------------------------------------------------------------
    def gaps(self) -> dict[int, int]:
        """PF -> seqs missing, for the PFs the filter keeps."""
        out = {}
        for pf in sorted(set(self._seqs) | set(self._upstream)):
            if not self.filter.keeps_pf(pf):
                continue
            lo, hi, n = self._seqs.get(pf, [None, None, 0])
            up = self._upstream.get(pf)
            if up is not None:
                n += up[0]
                los = [x for x in (lo, up[1]) if x is not None]
                his = [x for x in (hi, up[2]) if x is not None]
                lo, hi = (min(los), max(his)) if los else (None, None)
            if lo is None:
                continue
            out[pf] = max(0, hi - lo + 1 - n)
        return out

    def as_meta(self) -> dict:
        """For the capture's meta (``META_KEY``): per PF, the switches left out and the
        first and last seq of every switch seen, kept or not (null for a PF --pf leaves
        out whole: its gaps are nobody's figure)."""
        out = {}
        for pf, (lo, hi, _n) in sorted(self._seqs.items()):
            kept = self.filter.keeps_pf(pf)
            out[str(pf)] = {"switches": self.left_out.get(pf, 0),
                            "first_seq": lo if kept else None, "last_seq": hi if kept else None}
        return out


def parse_meta(filtered_out: dict | None) -> dict[int, tuple[int, int, int]]:
    """A meta's ``filtered_out``: PF -> (left out, first seq, last seq).  Raises
    ValueError on anything else (capture readers turn it into their own error)."""
    if filtered_out is None:
        return {}
    if not isinstance(filtered_out, dict):
        raise ValueError("filtered_out is not an object")
    out = {}
    for pf, entry in filtered_out.items():
        try:
            key = int(pf)
            n, first, last = (entry[k] for k in ("switches", "first_seq", "last_seq"))
        except (TypeError, ValueError, KeyError):
            raise ValueError(f"filtered_out: PF {pf!r} is not "
                             "{switches, first_seq, last_seq}") from None
        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        ranged = is_int(first) and is_int(last) and first <= last
        if not is_int(n) or n < 0 or not (ranged or (first is None and last is None)):
            raise ValueError(f"filtered_out: PF {pf}: not counts and seqs: {entry!r}")
        out[key] = (n, first, last)
    return out


def merge_meta(*accounts: dict | None) -> dict:
    """Two ``filtered_out`` accounts of one stream (a recorder's, then a re-filter of
    what it kept) as one: left-outs add up, the seq range spans both."""
    out: dict[int, list[int]] = {}
    for account in accounts:
        for pf, (n, first, last) in parse_meta(account).items():
            have = out.get(pf)
            if have is not None:
                firsts = [x for x in (have[1], first) if x is not None]
                lasts = [x for x in (have[2], last) if x is not None]
                n, first, last = (have[0] + n, min(firsts, default=None),
                                  max(lasts, default=None))
            out[pf] = [n, first, last]
    return {str(pf): {"switches": n, "first_seq": first, "last_seq": last}
            for pf, (n, first, last) in sorted(out.items())}
