"""Read the kernel's histograms of every switch (hist_add in bpf/vftrace.bpf.c) in one go.

The bucket counts are one BPF array of slots x phases x buckets u64s.  Where the kernel
lets it be mapped (BPF_F_MMAPABLE, >= 5.5) it is viewed with numpy through an mmap of the
map, so a read is a copy of memory, not a syscall per key; elsewhere each cell is read
with lookups (slower, the same numbers).  Slots are given out by the kernel in order of
first switch, and hist_slots says which (pf, vf) each one is.
"""
from __future__ import annotations

import ctypes
import mmap

import numpy as np

from ..model.kernel_hist import PHASES, KernelHist, from_counts
from . import layout


class HistogramReader:
    def __init__(self, bpf, mappable: bool, slots: int):
        c = layout.header().constants
        self.slots, self.phases = slots, c["VFT_HIST_PHASES"]
        self.nbuckets = c["VFT_HIST_BUCKETS"]
        self.bpf = bpf
        self.mode = "mmap" if mappable else "lookup"
        self._map = self._view = None
        if mappable:
            size = 8 * self.slots * self.phases * self.nbuckets
            size += -size % mmap.PAGESIZE
            self._map = mmap.mmap(bpf["hist_buckets"].map_fd, size, mmap.MAP_SHARED,
                                  mmap.PROT_READ)
            self._view = np.frombuffer(self._map, dtype=np.uint64,
                                       count=self.slots * self.phases * self.nbuckets
                                       ).reshape(self.slots, self.phases, self.nbuckets)

    def _cell_counts(self, slot: int, phase: int) -> np.ndarray:
        if self._view is not None:
            return self._view[slot, phase]          # from_counts copies the used range only
        table, first = self.bpf["hist_buckets"], (slot * self.phases + phase) * self.nbuckets
        return np.array([table[ctypes.c_int(first + b)].value for b in range(self.nbuckets)],
                        dtype=np.int64)

    def read(self, phases: tuple[str, ...] = PHASES) -> list[KernelHist]:
        """Every (pf, vf)'s histograms of ``phases`` as they stand now."""
        sums = self.bpf["hist_sums"]
        out = []
        for key, slot in sorted(self.bpf["hist_slots"].items(), key=lambda kv: kv[1].value):
            s = slot.value
            if s >= self.slots:
                continue
            for p, phase in enumerate(PHASES):
                if phase not in phases:
                    continue
                total = sums[ctypes.c_int(s * self.phases + p)]
                if not total.count:
                    continue
                vmin = ~int(total.not_min) & 0xFFFF_FFFF_FFFF_FFFF
                h = from_counts(self._cell_counts(s, p), vmin, int(total.max))
                out.append(KernelHist(int(key.pf), int(key.vf), phase, h, int(total.sum)))
        return out

    def close(self) -> None:
        self._view = None
        if self._map is not None:
            self._map.close()
            self._map = None
