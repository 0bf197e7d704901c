"""Throughput of the Python side of the pipeline: Stats, the capture CSV, and both.

    .venv/bin/python bench/bench_pipeline.py [-n RECORDS] [--pfs 2] [--vfs 8]

Records are synthetic (log-normal switch times with a heavy tail, random from/to VFs),
made before timing starts; each case feeds them one at a time, as the perf-buffer
callback does.  The brief's floor for the statistics core is 200k records/s.
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tracer.capture.files import CaptureWriter  # noqa: E402
from tracer.model.schema import SwitchRecord  # noqa: E402
from tracer.model.stats import Stats  # noqa: E402


def synthetic(n: int, pfs: int, vfs: int, seed: int = 1) -> list[SwitchRecord]:
    rng = random.Random(seed)
    seqs = [0] * pfs
    out = []
    for i in range(n):
        pf = rng.randrange(pfs)
        src, dst = rng.randrange(-1, vfs), rng.randrange(vfs)
        switch = int(rng.lognormvariate(11, 0.8) + (rng.paretovariate(1.5) * 1e4
                                                      if rng.random() < 0.01 else 0))
        revoke = switch * 2 // 5
        out.append(SwitchRecord(
            seqs[pf], i * 10_000, pf, src, dst, i % 2, switch, revoke, switch - revoke,
            8, revoke // 2, revoke // 8, 8 << 21, 8, switch // 3, switch // 12, 8 << 21,
            1, 900, revoke // 3, revoke // 5, rng.randrange(6), 1800, rng.randrange(3),
            rng.randrange(4), rng.randrange(5000), 0, int(switch > 100_000)))
        seqs[pf] += 1
    return out


def run(label: str, recs: list, feed) -> float:
    start = time.perf_counter()
    feed(recs)
    elapsed = time.perf_counter() - start
    rate = len(recs) / elapsed
    print(f"{label:<14} {len(recs):>9} records  {elapsed:7.3f}s  {rate / 1e3:8.1f}k records/s")
    return rate


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--records", type=int, default=1_000_000)
    ap.add_argument("--pfs", type=int, default=2)
    ap.add_argument("--vfs", type=int, default=8)
    args = ap.parse_args()
    recs = synthetic(args.records, args.pfs, args.vfs)
    print(f"{args.pfs} PFs x {args.vfs} VFs: {args.pfs * args.vfs * (args.vfs + 1)} "
          "possible from->to groups")

    with tempfile.TemporaryDirectory() as tmp:
        def stats_only(recs):
            stats = Stats(budget_ns=100_000)
            for r in recs:
                stats.add(r)
            stats.snapshot()

        def csv_only(recs):
            writer = CaptureWriter(Path(tmp) / "csv.csv", {})
            for r in recs:
                writer.write(r)
            writer.close()

        def both(recs):
            stats = Stats(budget_ns=100_000)
            writer = CaptureWriter(Path(tmp) / "both.csv", {})
            for r in recs:
                stats.add(r)
                writer.write(r)
            writer.close()
            stats.snapshot()

        def stats_batched(recs):
            stats = Stats(budget_ns=100_000)
            stats.add_many(recs)
            stats.snapshot()

        run("stats", recs, stats_only)
        run("stats add_many", recs, stats_batched)
        run("csv", recs, csv_only)
        run("stats+csv", recs, both)
        size = (Path(tmp) / "both.csv").stat().st_size
        print(f"capture size {size / len(recs):.0f} bytes/record")
    return 0


if __name__ == "__main__":
    sys.exit(main())
