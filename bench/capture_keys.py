"""A capture read a chunk of records at a time, for the lab's long runs.

All of a long run's records as objects at once do not fit the lab VM's 2 GiB: the
10-minute 6.12 soak's 1.46M rows took 1.16 GB through ``read_capture``, and 30 s
lossless windows at every slice write more.  Only each row's (pf, seq, t_ns) is kept,
in an int64 array, and the statistics core is fed chunk by chunk.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tracer.capture.files import count_problems, iter_capture, meta_problems, read_meta
from tracer.model.stats import Stats

CHUNK_ROWS = 65536


def read_capture_keys(csv: Path, with_stats: bool = True
                      ) -> tuple[dict, np.ndarray, list[str], Stats | None]:
    """The capture's meta, each row's (pf, seq, t_ns), the statistics core over every
    row (None without ``with_stats``), and the problems ``read_capture`` would note."""
    meta = read_meta(csv)
    problems = meta_problems(csv, meta)
    stats = Stats(meta.get("budget_ns") or 100) if with_stats else None
    keys: list[np.ndarray] = []
    chunk: list = []

    def take() -> None:
        if stats is not None:
            stats.add_many(chunk)
        keys.append(np.array([(r.pf, r.seq, r.t_ns) for r in chunk], np.int64).reshape(-1, 3))
        chunk.clear()

    for rec in iter_capture(csv, problems):
        chunk.append(rec)
        if len(chunk) == CHUNK_ROWS:
            take()
    take()
    rows = np.concatenate(keys)
    problems += count_problems(meta, len(rows))
    return meta, rows, problems, stats


def missing_seqs(rows: np.ndarray, seq_ranges: dict[str, list[int]]) -> int:
    """Switches the module made in a window (its seq range (lo, hi] per PF, JSON keys)
    with no row.  ``rows``: (pf, seq, ...) a row; a duplicate row counts once."""
    missing = 0
    for pf, (lo, hi) in seq_ranges.items():
        seqs = np.unique(rows[rows[:, 0] == int(pf), 1])
        have = np.searchsorted(seqs, hi, "right") - np.searchsorted(seqs, lo, "right")
        missing += (hi - lo) - int(have)
    return missing
