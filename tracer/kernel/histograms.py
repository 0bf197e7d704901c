"""Read the kernel's histograms of every switch (hist_add in bpf/vftrace.bpf.c) in one go.

The bucket counts are one BPF array of slots x phases x buckets u64s, their sums another.
Where the kernel lets them be mapped (BPF_F_MMAPABLE, >= 5.5) both are viewed with numpy
through an mmap of the map, so a read is a copy of memory, not a syscall per key;
elsewhere each is read with lookups (slower, the same numbers).  Slots are given out by
the kernel in order of first switch, and hist_slots says which (pf, vf) each one is.
"""
from __future__ import annotations

import ctypes
import mmap

import numpy as np

from ..model.kernel_hist import PHASES, KernelHist, from_counts, kernel_bucket
from . import layout


U64 = (1 << 64) - 1
# struct vft_hist_sum (bpf/vftrace.h), as numpy reads the mapped array
SUM_DTYPE = np.dtype([(name, "<u8") for name in ("count", "sum", "not_min", "max")])


class HistogramReader:
    def __init__(self, bpf, mappable: bool, slots: int):
        c = layout.header().constants
        self.slots, self.phases = slots, c["VFT_HIST_PHASES"]
        self.nbuckets = c["VFT_HIST_BUCKETS"]
        self.bpf = bpf
        self.mode = "mmap" if mappable else "lookup"
        self._maps: list[mmap.mmap] = []
        self._view = self._sums = None
        if mappable:
            cells = self.slots * self.phases
            self._view = self._mapped("hist_buckets", np.uint64, cells * self.nbuckets
                                      ).reshape(self.slots, self.phases, self.nbuckets)
            self._sums = self._mapped("hist_sums", SUM_DTYPE, cells)

    def _mapped(self, name: str, dtype, count: int) -> np.ndarray:
        """A read-only numpy view of BPF array ``name`` (created BPF_F_MMAPABLE)."""
        size = np.dtype(dtype).itemsize * count
        m = mmap.mmap(self.bpf[name].map_fd, size + -size % mmap.PAGESIZE, mmap.MAP_SHARED,
                      mmap.PROT_READ)
        self._maps.append(m)
        return np.frombuffer(m, dtype=dtype, count=count)

    def _cell_sum(self, cell: int) -> tuple[int, int, int, int]:
        """(count, sum, not_min, max) of one (slot, phase)."""
        if self._sums is not None:
            return tuple(int(x) for x in self._sums[cell].tolist())
        t = self.bpf["hist_sums"][ctypes.c_int(cell)]
        return int(t.count), int(t.sum), int(t.not_min), int(t.max)

    def _cell_counts(self, slot: int, phase: int, lo: int, hi: int) -> np.ndarray:
        """Buckets lo..hi of one (slot, phase): those between its min and max, so a read
        touches only the buckets a cell can have used, not all VFT_HIST_BUCKETS."""
        if self._view is not None:
            return self._view[slot, phase, lo:hi + 1]   # from_counts copies it
        table, first = self.bpf["hist_buckets"], (slot * self.phases + phase) * self.nbuckets
        return np.array([table[ctypes.c_int(first + b)].value for b in range(lo, hi + 1)],
                        dtype=np.int64)

    def read(self, phases: tuple[str, ...] = PHASES) -> list[KernelHist]:
        """Every (pf, vf)'s histograms of ``phases`` as they stand now."""
        out = []
        for key, slot in sorted(self.bpf["hist_slots"].items(), key=lambda kv: kv[1].value):
            s = slot.value
            if s >= self.slots:
                continue
            for p, phase in enumerate(PHASES):
                if phase not in phases:
                    continue
                count, total, not_min, vmax = self._cell_sum(s * self.phases + p)
                if not count:
                    continue
                vmin = ~not_min & U64
                lo, hi = kernel_bucket(vmin), kernel_bucket(vmax)
                h = from_counts(self._cell_counts(s, p, lo, hi), vmin, vmax, base=lo)
                out.append(KernelHist(int(key.pf), int(key.vf), phase, h, total))
        return out

    def close(self) -> None:
        self._view = self._sums = None
        for m in self._maps:
            m.close()
        self._maps = []
