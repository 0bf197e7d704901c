"""The kernel's histogram buckets are the statistics core's: the very C function the BPF
program runs (vft_hist_bucket, bpf/vftrace.h), compiled here with gcc, against
stats.bucket_index; and the histograms' trip through a capture's meta."""
from __future__ import annotations

import ctypes
import subprocess

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import in_ci
from tracer.kernel import layout
from tracer.model import kernel_hist
from tracer.model.kernel_hist import from_counts, from_meta, to_meta
from tracer.model.correction import HIT_TYPES, Correction
from tracer.model.schema import SwitchRecord
from tracer.model.stats import SUB_BITS, Histogram, bucket_index
from tracer.paths import bpf_dir

C = layout.header().constants
TOP = 1 << C["VFT_HIST_MAX_BITS"]


@pytest.fixture(scope="module")
def kernel_bucket(tmp_path_factory):
    d = tmp_path_factory.mktemp("bucket")
    (d / "b.c").write_text('#include <linux/types.h>\n#include "vftrace.h"\n'
                           "unsigned bucket(unsigned long long v) { return vft_hist_bucket(v); }\n")
    subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-shared", "-fPIC", f"-I{bpf_dir()}",
                    "-o", str(d / "b.so"), str(d / "b.c")], check=True)
    lib = ctypes.CDLL(str(d / "b.so"))
    lib.bucket.restype, lib.bucket.argtypes = ctypes.c_uint, [ctypes.c_ulonglong]
    return lib.bucket


@pytest.fixture(scope="module")
def kernel_corrected(tmp_path_factory):
    d = tmp_path_factory.mktemp("corrected")
    (d / "c.c").write_text(
        '#include <linux/types.h>\n#include "vftrace.h"\n'
        "unsigned long long corrected(unsigned long long sw, unsigned long long src,\n"
        "    unsigned f, unsigned k, unsigned e, unsigned long long cf,\n"
        "    unsigned long long ck, unsigned long long ce)\n"
        "{ return vft_corrected_ns(sw, src, f, k, e, cf, ck, ce); }\n")
    subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-shared", "-fPIC", f"-I{bpf_dir()}",
                    "-o", str(d / "c.so"), str(d / "c.c")], check=True)
    lib = ctypes.CDLL(str(d / "c.so"))
    lib.corrected.restype = ctypes.c_ulonglong
    lib.corrected.argtypes = [ctypes.c_ulonglong] * 2 + [ctypes.c_uint] * 3 + \
        [ctypes.c_ulonglong] * 3
    return lib.corrected


COST = st.floats(-50, 5000, allow_nan=False).map(lambda x: round(x, 3))


@settings(max_examples=1000, deadline=None)
@given(st.integers(0, 1 << 40), st.sampled_from([0, 1, 999, 123_456]) | st.integers(0, 1 << 40),
       st.integers(0, 200), st.integers(0, 200), st.integers(0, 200), COST, COST, COST)
def test_the_kernels_corrected_switch_is_the_records(kernel_corrected, sw, src, f, k, e,
                                                     cf, ck, ce):
    """vft_corrected_ns, compiled as the program has it, against correction.py's value
    of the same record (below zero as 0, as both histograms count it), for costs as the
    calibration writes them (medians in ns, negative ones included) and given to the
    kernel in milli-ns."""
    meta = {"probe_costs": {"types": ["fentry", "kprobe", "entry"],
                            "fentry": {"median_ns": cf}, "kprobe": {"median_ns": ck},
                            "entry": {"median_ns": ce}}}
    corr = Correction.from_meta(meta)
    r = SwitchRecord(**{**dict.fromkeys(SwitchRecord.__dataclass_fields__, 0),
                        "switch_ns": sw, "source_ns": src, "fentry_hits": f,
                        "kprobe_hits": k, "entry_hits": e})
    assert kernel_corrected(sw, src, f, k, e, *corr.cost_milli_ns) == max(corr.values(r)[0], 0)
    cols = {c: np.array([getattr(r, c)], np.int64)
            for c in ("switch_ns", "source_ns", "fentry_hits", "kprobe_hits", "entry_hits")}
    assert corr.switch_arrays(cols)[0].tolist() == [corr.values(r)[0]]


def test_the_header_sizes_the_core_scheme():
    assert C["VFT_HIST_SUB_BITS"] == SUB_BITS
    assert C["VFT_HIST_MAX_BITS"] == kernel_hist.MAX_BITS
    assert C["VFT_HIST_BUCKETS"] == bucket_index(TOP - 1) + 1
    # the phases in the kernel's order, and its cost slots in the correction's
    assert [C[f"VFT_HIST_{p.upper()}"] for p in kernel_hist.PHASES] == \
        list(range(C["VFT_HIST_PHASES"]))
    assert C["VFT_COST_TYPES"] == len(HIT_TYPES)


def boundaries():
    yield from range(0, 4 << SUB_BITS)
    for k in range(SUB_BITS + 1, C["VFT_HIST_MAX_BITS"]):
        step = 1 << (k - SUB_BITS)
        for j in (0, 1, 2, (1 << SUB_BITS) - 1):        # sub-buckets at either end
            low = (1 << k) + j * step
            yield from (low - 1, low, low + 1, low + step - 1)


def test_every_bucket_boundary_agrees(kernel_bucket):
    values = list(boundaries())
    assert [kernel_bucket(v) for v in values] == [bucket_index(v) for v in values]


@settings(max_examples=2000)
@given(st.integers(0, TOP - 1))
def test_any_value_agrees(kernel_bucket, v):
    assert kernel_bucket(v) == bucket_index(v)


@given(st.integers(TOP, (1 << 64) - 1))
def test_values_past_the_top_share_the_last_bucket(kernel_bucket, v):
    assert kernel_bucket(v) == C["VFT_HIST_BUCKETS"] - 1


def kernel_array(values: np.ndarray) -> np.ndarray:
    counts = np.zeros(C["VFT_HIST_BUCKETS"], dtype=np.uint64)
    np.add.at(counts, [bucket_index(v) for v in values], 1)
    return counts


@given(st.lists(st.integers(0, TOP - 1), min_size=1, max_size=300))
def test_a_kernel_array_is_the_histogram_of_the_same_values(values):
    built = Histogram()
    built.add_array(np.array(values, dtype=np.int64))
    got = from_counts(kernel_array(values), min(values), max(values))
    assert kernel_hist.buckets(got) == kernel_hist.buckets(built)
    assert got.percentiles([50, 99, 99.9, 100]) == built.percentiles([50, 99, 99.9, 100])


def test_the_meta_keeps_them_exactly():
    values = [5, 900, 2048, 70_000, 70_001, 3_000_000]
    h = from_counts(kernel_array(values), 5, 3_000_000)
    hists = [kernel_hist.KernelHist(1, 0, "switch", h, sum(values))]
    back = from_meta(to_meta(hists, dropped=0))
    assert len(back) == 1 and (back[0].pf, back[0].vf, back[0].phase) == (1, 0, "switch")
    assert kernel_hist.buckets(back[0].hist) == kernel_hist.buckets(h)
    assert (back[0].hist.min, back[0].hist.max, back[0].sum_ns) == (5, 3_000_000, sum(values))
    assert from_meta(None) is None


@pytest.mark.parametrize("bad, says", [
    ({"sub_bits": 7, "groups": []}, "sub_bits 7"),
    ({"sub_bits": SUB_BITS, "groups": [{"pf": 0}]}, "not as vftrace writes them"),
    ({"sub_bits": SUB_BITS, "groups": [{"pf": 0, "vf": 0, "phase": "x", "buckets": [],
                                        "sum_ns": 0, "min_ns": 0, "max_ns": 0}]}, "phase"),
])
def test_a_foreign_meta_is_one_clear_error(bad, says):
    with pytest.raises(ValueError, match=says):
        from_meta(bad)


def test_the_summary_line_is_every_switch_of_the_pfs_asked_for():
    def one(pf, values):
        h = from_counts(kernel_array(values), min(values), max(values))
        return kernel_hist.KernelHist(pf, 0, "switch", h, sum(values))
    meta = {"kernel_histograms": to_meta([one(0, [1000] * 9 + [5000]), one(1, [70_000] * 5)], 0)}
    line = kernel_hist.exact_line(meta)
    assert "15 switches" in line and "max 70.0us" in line and "over budget" not in line
    meta["budget_ns"] = 2000            # in the exact range: 6 of 15 are over
    assert "over budget 40.00%" in kernel_hist.exact_line(meta)
    assert "10 switches" in kernel_hist.exact_line(meta, {"pfs": [0], "vfs": None})
    assert "p50 1.00us" in kernel_hist.exact_line(meta, {"pfs": [0], "vfs": None})
    # the kernel keeps (pf, incoming vf); a VF filter also keeps outgoing: no line
    assert kernel_hist.exact_line(meta, {"pfs": None, "vfs": [0]}) is None
    assert kernel_hist.exact_line({}) is None
    assert "unreadable" in kernel_hist.exact_line({"kernel_histograms": {"sub_bits": 3}})
    meta["kernel_histograms"]["slots_full"] = 7     # pairs past the kernel's slots
    assert "NOT exact: 7 switches" in kernel_hist.exact_line(meta)


@given(st.lists(st.integers(0, 10**9), min_size=1, max_size=200), st.integers(0, 10**8))
def test_over_budget_counts_exactly_or_says_it_is_a_lower_bound(values, budget):
    h = Histogram()
    h.add_array(np.array(values, dtype=np.int64))
    n, exact = kernel_hist.over_budget(h, budget)
    true = sum(v > budget for v in values)
    assert n == true if exact else n <= true
    assert exact or budget >= 2 << SUB_BITS


def test_report_of_a_lossy_capture_gives_every_switch_exactly(tmp_path, capsys):
    """The records kept and the kernel's histograms of every switch: ``report`` prints
    both, text and JSON; an old capture has neither line nor figure; a mangled one says
    so in one line."""
    import json
    from pathlib import Path
    from tracer.capture.files import CaptureWriter, read_capture
    from tracer.cli import main
    small = Path(__file__).resolve().parents[1] / "data" / "small.csv"
    meta, rows, _ = read_capture(small)
    everything = [r.switch_ns for r in rows] + [7_000_000] * 25
    h = Histogram()
    h.add_array(np.array(everything))
    path = tmp_path / "lossy.csv"
    corrected = Histogram()
    corrected.add_array(np.array(everything) - 20)
    w = CaptureWriter(path, {**meta, "kernel_histograms": to_meta(
        [kernel_hist.KernelHist(0, 1, "switch", h, sum(everything)),
         kernel_hist.KernelHist(0, 1, "corrected", corrected, sum(everything) - 20 * len(everything))], 0)})
    w.write_many(rows)
    w.close(lost={0: 25})
    assert main(["report", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"every switch (kernel histograms, exact whatever was lost): {len(everything)} " \
           "switches" in out and "max 7.00ms" in out
    assert "corrected (vftrace's own cost off, every switch): p50 " in out
    assert main(["report", str(path), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["captures"][0]["every_switch"]
    assert got["count"] == len(everything) and got["max_ns"] == 7_000_000
    assert got["p99_ns"] == h.percentiles([99])[0]
    assert got["corrected"]["count"] == len(everything)
    assert got["corrected"]["p99_ns"] == corrected.percentiles([99])[0]
    assert main(["report", str(small), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["captures"][0]["every_switch"] is None
    bad = tmp_path / "bad.csv"
    w = CaptureWriter(bad, {**meta, "kernel_histograms": {"sub_bits": SUB_BITS, "groups": 3}})
    w.write_many(rows)
    w.close()
    assert main(["report", str(bad)]) == 0
    assert "kernel histograms: unreadable (kernel_histograms: not as vftrace writes them" \
        in capsys.readouterr().out


def real_mappable_array(value_size: int, entries: int) -> int:
    """A BPF array map in this machine's kernel, BPF_F_MMAPABLE, its fd kept open."""
    import os
    from tracer.kernel.features import (BPF_F_MMAPABLE, BPF_MAP_CREATE, BPF_MAP_TYPE_ARRAY,
                                        SYS_BPF)
    attr = (ctypes.c_uint32 * 32)()
    attr[0], attr[1], attr[2], attr[3], attr[4] = (BPF_MAP_TYPE_ARRAY, 4, value_size, entries,
                                                   BPF_F_MMAPABLE)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    fd = libc.syscall(ctypes.c_long(SYS_BPF), ctypes.c_int(BPF_MAP_CREATE), ctypes.byref(attr),
                      ctypes.c_uint(ctypes.sizeof(attr)))
    if fd < 0:
        why = f"bpf(BPF_MAP_CREATE) of a mappable array: {os.strerror(ctypes.get_errno())} " \
              "(needs root and a kernel >= 5.5)"
        if in_ci():
            pytest.fail(f"cannot run in CI: {why}")
        pytest.skip(why)
    return fd


def test_the_reader_maps_real_kernel_arrays_and_reads_what_was_counted():
    """HistogramReader against two BPF arrays of this machine's kernel (the layout
    hist_add writes: slots x phases x buckets counts, and their sums), filled through a
    writable mapping as the program would, read through its own read-only one."""
    import mmap
    import os
    from types import SimpleNamespace
    from tracer.kernel.histograms import SUM_DTYPE, HistogramReader
    slots, phases, nb = 2, C["VFT_HIST_PHASES"], C["VFT_HIST_BUCKETS"]
    fds = {"hist_buckets": real_mappable_array(8, slots * phases * nb),
           "hist_sums": real_mappable_array(32, slots * phases)}
    try:
        def writable(name, dtype, count):
            size = np.dtype(dtype).itemsize * count
            m = mmap.mmap(fds[name], size + -size % mmap.PAGESIZE, mmap.MAP_SHARED)
            return m, np.frombuffer(m, dtype=dtype, count=count)
        mb, counts = writable("hist_buckets", np.uint64, slots * phases * nb)
        ms, sums = writable("hist_sums", SUM_DTYPE, slots * phases)
        values = {(1, 0): [700, 700, 5000, 3_000_000], (1, 2): [90_000]}  # slot = order
        for slot, vals in enumerate(values.values()):
            for v in vals:                       # the switch phase only
                counts[(slot * phases) * nb + bucket_index(v)] += 1
            sums[slot * phases] = (len(vals), sum(vals), ~min(vals) & ((1 << 64) - 1),
                                   max(vals))
        keys = [(SimpleNamespace(pf=pf, vf=vf), SimpleNamespace(value=slot))
                for slot, (pf, vf) in enumerate(values)]
        tables = {name: SimpleNamespace(map_fd=fd) for name, fd in fds.items()}
        tables["hist_slots"] = SimpleNamespace(items=lambda: keys)
        reader = HistogramReader(tables, mappable=True, slots=slots)
        got = {(k.pf, k.vf): k for k in reader.read()}
        reader.close()
        del counts, sums
        mb.close(), ms.close()
    finally:
        for fd in fds.values():
            os.close(fd)
    assert set(got) == set(values)
    for key, vals in values.items():
        built = Histogram()
        built.add_array(np.array(vals))
        k = got[key]
        assert k.phase == "switch" and kernel_hist.buckets(k.hist) == kernel_hist.buckets(built)
        assert (k.count, k.sum_ns, k.hist.min, k.hist.max) == (len(vals), sum(vals), min(vals),
                                                              max(vals))


def test_switches_neither_recorded_nor_counted_lost_are_said():
    """The kernel's count of every switch against what became of the records: a loss
    nobody counted (CI under overload: 200 of 783 switches) is said, with which side."""
    hist = {"slots_full": 3, "groups": [{"phase": "switch", "count": 500},
                                        {"phase": "revoke", "count": 500},
                                        {"phase": "switch", "count": 283}]}
    whole = kernel_hist.switch_accounting(hist, lost_in_kernel=86, read=700, passed_on=700)
    assert whole == {"kernel": 786, "lost_in_kernel": 86, "read": 700, "passed_on": 700,
                     "unaccounted": 0}
    assert kernel_hist.accounting_warning({"switch_accounting": whole}) is None
    unread = kernel_hist.switch_accounting(hist, lost_in_kernel=0, read=583, passed_on=583)
    said = kernel_hist.accounting_warning({"switch_accounting": unread})
    assert said.startswith("203 switches the kernel counted are neither recorded nor "
                           "counted lost (the reader never saw them")
    dropped = kernel_hist.switch_accounting(hist, lost_in_kernel=0, read=786, passed_on=780)
    assert "read, then not passed on" in kernel_hist.accounting_warning(
        {"switch_accounting": dropped})
    assert kernel_hist.accounting_warning({"switch_accounting": {"unaccounted": "x"}}) is None


def test_the_summary_warns_of_an_uncounted_loss():
    from tracer.model.stats import Stats
    from tracer.record.summary import format_summary
    stats = Stats(100)
    text = format_summary(stats.snapshot(), {"switch_accounting": {
        "kernel": 10, "lost_in_kernel": 0, "read": 8, "passed_on": 8, "unaccounted": 2}})
    assert "WARNING: 2 switches the kernel counted are neither recorded nor counted lost" in text


def test_the_capture_counts_what_it_wrote_against_the_kernel(tmp_path):
    """The rows the file holds are the last step of the accounting: rows handed to the
    writer and not written (a formatter that returned short: CI, 216 of 804) are said."""
    from tracer.capture.files import CaptureWriter, read_meta
    from tracer.model.schema import COLUMNS
    acc = kernel_hist.switch_accounting({"groups": [{"phase": "switch", "count": 9}]},
                                        lost_in_kernel=2, read=7, passed_on=7)
    w = CaptureWriter(tmp_path / "c.csv", {"switch_accounting": acc})
    rows = np.zeros((5, len(COLUMNS)), np.int64)
    rows[:, COLUMNS.index("seq")] = np.arange(1, 6)
    w.write_rows(rows)                  # 7 passed on, 5 written
    w.close()
    got = read_meta(tmp_path / "c.csv")["switch_accounting"]
    assert (got["written"], got["unaccounted"]) == (5, 2)
    assert "(passed on, then not written: 7 read, 7 passed on, 5 written, of 9 counted" in \
        kernel_hist.accounting_warning({"switch_accounting": got})
