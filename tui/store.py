"""The switch records the dashboard keeps: newest first out, bounded, as int64 rows.

Kept so a filter can rebuild the statistics and ``e`` can export what is shown; when
the bound is reached the oldest rows go and ``dropped`` says how many (an export
reports it, never a silent loss).  224 bytes a record: the default 500k is ~110 MB.
"""
from __future__ import annotations

from itertools import chain
from operator import attrgetter
from typing import Iterable, Sequence

import numpy as np

from tracer.model.filter import filter_mask
from tracer.model.schema import COLUMNS, SwitchRecord
from tracer.model.stats import MAX_VALUE

DEFAULT_MAX_RECORDS = 500_000
COL = {name: i for i, name in enumerate(COLUMNS)}
_ROW = attrgetter(*COLUMNS)


def to_rows(recs: Sequence[SwitchRecord]) -> np.ndarray:
    """Records as an (n, len(COLUMNS)) int64 array."""
    if not recs:
        return np.zeros((0, len(COLUMNS)), dtype=np.int64)
    tuples = list(map(_ROW, recs))
    try:
        # fromiter over the flattened rows: half the cost of np.array's nested lists
        flat = np.fromiter(chain.from_iterable(tuples), np.int64, len(tuples) * len(COLUMNS))
    except OverflowError:       # a u64 garbage value: clamp as the statistics core does
        flat = np.array([min(max(v, -MAX_VALUE), MAX_VALUE)
                         for v in chain.from_iterable(tuples)], dtype=np.int64)
    return flat.reshape(len(tuples), len(COLUMNS))


def to_records(rows: np.ndarray) -> list[SwitchRecord]:
    return [SwitchRecord(*r) for r in rows.tolist()]


class RecordStore:
    def __init__(self, max_records: int = DEFAULT_MAX_RECORDS) -> None:
        if max_records <= 0:
            raise ValueError("max_records must be positive")
        self.max_records = max_records
        self.clear()

    def clear(self) -> None:
        self._chunks: list[np.ndarray] = []
        self.count = 0          # rows held
        self.dropped = 0        # oldest rows let go to stay within max_records

    def append(self, rows: np.ndarray) -> None:
        if not rows.shape[0]:
            return
        self._chunks.append(rows)
        self.count += rows.shape[0]
        while self.count > self.max_records:
            excess = self.count - self.max_records
            oldest = self._chunks[0]
            if oldest.shape[0] <= excess:
                self._chunks.pop(0)
                self.count -= oldest.shape[0]
                self.dropped += oldest.shape[0]
            else:
                self._chunks[0] = oldest[excess:]
                self.count -= excess
                self.dropped += excess

    def rows(self) -> np.ndarray:
        if not self._chunks:
            return np.zeros((0, len(COLUMNS)), dtype=np.int64)
        if len(self._chunks) > 1:            # compact, so the next call is cheap
            self._chunks = [np.concatenate(self._chunks)]
        return self._chunks[0]

    def newest(self, n: int, pfs: Iterable[int] | None = None,
               vfs: Iterable[int] | None = None) -> np.ndarray:
        """Up to ``n`` newest rows passing the filters, newest first (arrival order)."""
        picked: list[np.ndarray] = []
        have = 0
        block = 4096
        for chunk in reversed(self._chunks):
            end = chunk.shape[0]
            while end > 0 and have < n:          # scan back in blocks: no full-array pass
                part = chunk[max(0, end - block):end]
                sel = part[filter_mask(part, pfs, vfs)][::-1][: n - have]
                picked.append(sel)
                have += sel.shape[0]
                end -= block
            if have >= n:
                break
        if not picked:
            return np.zeros((0, len(COLUMNS)), dtype=np.int64)
        return np.concatenate(picked)
