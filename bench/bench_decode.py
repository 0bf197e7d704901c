"""The whole user-space path of a live recording, without BPF: decode -> statistics -> CSV.

    .venv/bin/python bench/bench_decode.py [-n RECORDS]

Raw ``struct vft_switch`` samples (laid out from bpf/vftrace.h with ctypes, as the
kernel writes them) are made before timing starts, and fed to the engine's own entry
points two ways:

- ``callback``: one at a time to ``Engine._on_switch`` as BCC's ring buffer callback
  does (the address of the sample): the fallback reader;
- ``mapped``: as ring slots (header, sample, padding), ``RING_BATCH`` at a time, to
  ``Engine._on_switches`` as the mapped reader does.

Either way the engine hands over int64 rows, which go to ``Stats.add_rows`` and
``CaptureWriter.write_rows`` as ``vftrace record`` wires them.

The capture's meta has probe costs, so its corrected columns are computed, as a
recording's are.  The process is pinned to one CPU, so a library's threads (Arrow's
CSV writer) cannot make the figure a two-core one.  Prints one line per case: ``<case> N records T s R k records/s``.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import random
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tracer.capture.files import CaptureWriter  # noqa: E402
from tracer.kernel import layout, ringread  # noqa: E402
from tracer.kernel.engine import Engine  # noqa: E402
from tracer.kernel.probes import Plan  # noqa: E402
from tracer.model.stats import Stats  # noqa: E402

BUDGET_NS = 100_000
RING_BATCH = 1024           # records per mapped read: about 1/4 of a default ring's slots


def raw_samples(n: int, pfs: int = 2, vfs: int = 4, seed: int = 1) -> ctypes.Array:
    """``n`` vft_switch records back to back (an array of the ctypes structure)."""
    cls = layout.header().structs["vft_switch"]
    rng = random.Random(seed)
    seqs = [0] * pfs
    out = (cls * n)()
    for i in range(n):
        pf = i % pfs
        seqs[pf] += 1
        sw = int(rng.lognormvariate(11, 0.8))
        rec = cls(seq=seqs[pf], t_ns=i * 10_000, switch_ns=sw, revoke_ns=sw * 2 // 5,
                  grant_ns=sw - sw * 2 // 5, unmap_ns=sw // 5, unmap_max_ns=sw // 5,
                  unmap_bytes=16384, map_ns=sw // 8, map_max_ns=sw // 8, map_bytes=16384,
                  source_ns=sw - 500, pf=pf, from_vf=(seqs[pf] - 1) % vfs,
                  to_vf=seqs[pf] % vfs, cpu=i % 2, unmap_calls=1, map_calls=1, sync_calls=1)
        out[i] = rec
    return out


def addresses(samples: ctypes.Array) -> range:
    """Each sample's address: what BCC passes to the callback (``data``)."""
    size = ctypes.sizeof(samples._type_)
    base = ctypes.addressof(samples)
    return range(base, base + len(samples) * size, size)


# What a recording's meta says of vftrace's own cost (the corrected columns' input)
META = {"probe_costs": {"types": ["fentry", "kprobe", "entry"],
                        "fentry": {"median_ns": 45, "p10_ns": 30, "p90_ns": 60},
                        "kprobe": {"median_ns": 90, "p10_ns": 70, "p90_ns": 130},
                        "entry": {"median_ns": 8, "p10_ns": 5, "p90_ns": 12}},
        "floor_ns": {"fentry": {"median_ns": 20, "p10_ns": 10, "p90_ns": 30}},
        "probe_modes": {"iommu_map": "fentry", "iommu_unmap": "fentry"}}


def engine(sink) -> Engine:
    """The live engine's decoding half; start() (BPF) is never called."""
    return Engine(Plan("pf_sched", "raw_tp"), budget_ns=BUDGET_NS, on_switch_rows=sink)


def ring_batches(samples: ctypes.Array, batch: int = RING_BATCH) -> list[bytes]:
    """The samples as the mapped reader hands them over: ring slots (8-byte header,
    sample, padding) back to back, ``batch`` records per read."""
    size = ctypes.sizeof(samples._type_)
    pad = b"\0" * (ringread.slot_bytes(size) - ringread.HEADER_BYTES - size)
    head = struct.pack("=II", size, 0)
    raw = bytes(samples)
    slots = b"".join(head + raw[i:i + size] + pad for i in range(0, len(raw), size))
    step = batch * ringread.slot_bytes(size)
    return [slots[i:i + step] for i in range(0, len(slots), step)]


def feed_callback(eng: Engine, samples: ctypes.Array) -> None:
    """BCC's callback reader: the engine's entry once per record, with its address."""
    for data in addresses(samples):
        eng._on_switch(data)


def feed_mapped(eng: Engine, batches: list[bytes]) -> None:
    """The mapped reader (tracer/kernel/ringread.py): the engine's entry once per batch."""
    for batch in batches:
        eng._on_switches(batch)


def timed(label: str, samples: ctypes.Array, make_sink, feed=feed_callback, data=None) -> float:
    sink, finish = make_sink()
    eng = engine(sink)
    start = time.perf_counter()
    feed(eng, samples if data is None else data)
    eng.assembler.flush()
    finish()
    elapsed = time.perf_counter() - start
    rate = len(samples) / elapsed
    print(f"{label:<22} {len(samples):>9} records  {elapsed:7.3f}s  {rate / 1e3:8.1f}k records/s",
          flush=True)
    return rate


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--records", type=int, default=300_000)
    args = ap.parse_args()
    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})   # threads started later too
    samples = raw_samples(args.records)
    with tempfile.TemporaryDirectory() as tmp:
        def decode_only():
            return (lambda _: None), (lambda: None)

        def full():
            stats = Stats(budget_ns=BUDGET_NS)
            writer = CaptureWriter(Path(tmp) / "cap.csv", dict(META))

            def sink(rows):
                stats.add_rows(rows)
                writer.write_rows(rows)

            def finish():
                writer.close()
                stats.snapshot()
            return sink, finish

        def with_stats():
            stats = Stats(budget_ns=BUDGET_NS)
            return stats.add_rows, stats.snapshot

        batches = ring_batches(samples)
        for reader, feed, data in (("callback", feed_callback, None),
                                   ("mapped", feed_mapped, batches)):
            timed(f"{reader} decode", samples, decode_only, feed, data)
            timed(f"{reader} decode+stats", samples, with_stats, feed, data)
            timed(f"{reader} decode+stats+csv", samples, full, feed, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
