"""How much CPU the dashboard uses ingesting N switch records/s, headless (run_test).

    .venv/bin/python bench/bench_tui.py [--rate 10000] [--seconds 10]

A synthetic source makes switches at the given rate (2 PFs x 4 VFs, log-normal switch
times, some KVM exit call rows) in the app's reading thread, as int64 rows, the form the
live source hands over (the engine's batches); the app folds them and
redraws at its usual rates (~10 Hz; its tables and plot ~2 Hz).  Prints the
process CPU share (all threads: reader + UI), the records folded, and how long a key
press takes to take effect while it runs.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from tracer.model.schema import COLUMNS, CallRecord  # noqa: E402
from tui.app import VftraceApp  # noqa: E402
from tui.sources import Batch, HeaderInfo  # noqa: E402


COL = {name: i for i, name in enumerate(COLUMNS)}


class SyntheticSource:
    description = "synthetic"

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.t0 = time.monotonic()
        self.made = 0
        self.rng = np.random.default_rng(1)
        self.seq = {0: 0, 1: 0}

    def start(self) -> HeaderInfo:
        return HeaderInfo(origin="synthetic", kernel="bench", switch_source="synthetic",
                          budget_ns=50_000, kvm_vendor="vmx")

    def _rows(self, n: int, now_ns: int) -> np.ndarray:
        """``n`` switches as the live engine hands them over: int64 rows, COLUMNS order."""
        rows = np.zeros((n, len(COLUMNS)), np.int64)
        made = self.made + np.arange(n)
        pf = made % 2
        seq = np.empty(n, np.int64)
        for p in (0, 1):                        # per-PF seqs going up, as pf_sched's
            mine = pf == p
            seq[mine] = self.seq[p] + 1 + np.arange(int(mine.sum()))
            self.seq[p] += int(mine.sum())
        vf = seq % 4
        sw = self.rng.lognormal(10.5, 0.6, n).astype(np.int64)
        for name, values in (("seq", seq), ("t_ns", now_ns), ("pf", pf),
                             ("from_vf", (vf - 1) % 4), ("to_vf", vf), ("switch_ns", sw),
                             ("revoke_ns", sw * 3 // 4), ("grant_ns", sw // 4),
                             ("map_calls", 1), ("unmap_calls", 1), ("kvm_exits", made % 3),
                             ("over_budget", sw > 50_000)):
            rows[:, COL[name]] = values
        self.made += n
        return rows

    def read(self, timeout: float) -> Batch:
        time.sleep(min(timeout, 0.02))
        now = time.monotonic()
        due = max(int((now - self.t0) * self.rate) - self.made, 0)
        now_ns = int(now * 1e9)
        rows = self._rows(due, now_ns)
        calls = [CallRecord("kvm_exit", now_ns, 900, 30, 4242, 0, seq if i % 5 else None,
                            4243, i % 2, pf)
                 for i, (seq, pf) in enumerate(rows[::10, [COL["seq"], COL["pf"]]].tolist())]
        return Batch(switch_rows=[rows] if due else [], calls=calls)

    def stop(self, reason: str) -> None:
        pass


async def bench(rate: float, seconds: float) -> None:
    source = SyntheticSource(rate)
    app = VftraceApp(source)
    redraws = [0]
    redraw = app.refresh_view

    def counted(*a, **kw):
        redraws[0] += 1
        return redraw(*a, **kw)

    app.refresh_view = counted
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause(1.0)                        # warm up
        cpu0, wall0, made0 = time.process_time(), time.monotonic(), source.made
        redraws0 = redraws[0]
        await pilot.pause(seconds)
        cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
        redraw_rate = (redraws[0] - redraws0) / wall
        made = source.made - made0
        key_times = []
        for _ in range(5):
            before = app.model.sort_index
            t = time.monotonic()
            app.simulate_key("s")        # as a terminal delivers it (pilot.press also
            while app.model.sort_index == before:      # waits for the screen to go idle)
                await asyncio.sleep(0.001)
            key_times.append(time.monotonic() - t)
        folded = app.model.stats.records
    print(f"rate asked {rate:.0f}/s, made {made / wall:.0f}/s over {wall:.1f} s; "
          f"folded {folded} records in all")
    print(f"CPU: {100 * cpu / wall:.0f}% of one core (reader thread + UI); "
          f"{redraw_rate:.1f} redraws/s")
    print(f"key 's' took effect in {1000 * max(key_times):.0f} ms at worst "
          f"(median {1000 * sorted(key_times)[2]:.0f} ms)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=10_000)
    p.add_argument("--seconds", type=float, default=10)
    args = p.parse_args()
    asyncio.run(bench(args.rate, args.seconds))


if __name__ == "__main__":
    main()
