"""The kernel's histograms count every switch pf_sched made, whether or not its record
reached user space, and are, bucket by bucket, the histograms of the records when none
was lost: the raw phases, and the corrected switch time, which the kernel computes with
the calibrated costs user space gave it and user space computes from each record.

At --depth window no probe runs inside the switch, so the corrected switch time is
pf_sched's own timing of it (total_ns, t2 - t0), which the module also counts into a
histogram of its own (debugfs total_hist, 16 buckets an octave): the kernel histograms,
folded into the module's coarser buckets, must be that histogram, lossy run or not."""
from __future__ import annotations

import math
import os
import signal
import time

import numpy as np
import pytest

from tests.lab import labutil, pfsched
from tracer.model import kernel_hist
from tracer.model.correction import Correction
from tracer.model.kernel_hist import PHASE_COLUMNS
from tracer.model.stats import RELATIVE_ERROR, Histogram, bucket_bounds
from tracer.pfsched import control

from .test_record import Recorder, window

pytestmark = pytest.mark.lab


def switches_per_pf(before: dict, after: dict) -> dict[int, int]:
    return {a["pf"]: a["switches"] - before[b]["switches"] for b, a in after.items()}


def kernel_counts_per_pf(hists, phase: str = "switch") -> dict[int, int]:
    out: dict[int, int] = {}
    for k in hists:
        if k.phase == phase:
            out[k.pf] = out.get(k.pf, 0) + k.count
    return out


def in_module_buckets(h: Histogram) -> dict[int, int]:
    """A kernel histogram folded into pf_sched's total_hist buckets (each of ours lies
    inside one of the module's: 1024 an octave against its 16, both exact below 16)."""
    out: dict[int, int] = {}
    for b, n in kernel_hist.buckets(h).items():
        low, high = (control.hist_bucket_low(v) for v in bucket_bounds(b))
        assert low == high, b
        out[low] = out.get(low, 0) + n
    return out


def module_hists(bdfs) -> dict[str, dict[int, int]]:
    return {b: control.total_hist(b) for b in bdfs}


def assert_corrected_is_the_modules_histogram(hists, after, hist_before, hist_after) -> None:
    """Per PF, the kernel's corrected histograms (every incoming VF) are pf_sched's own
    histogram of the same switches, bucket by bucket."""
    for bdf, a in after.items():
        mine = kernel_hist.merged(hists, "corrected", pfs=frozenset([a["pf"]]))
        theirs = control.hist_delta(hist_after[bdf], hist_before[bdf])
        assert in_module_buckets(mine) == theirs, (a["pf"], in_module_buckets(mine), theirs)


def nearest_rank(values: list[int], p: float) -> int:
    """The exact nearest-rank percentile, the rule Histogram.percentiles approximates."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(p / 100 * len(ordered) - 1e-9)) - 1]


def test_kernel_histograms_are_pf_sched_own_timings_of_every_switch():
    """Lossless, --depth window: per PF, the kernel's corrected histogram is pf_sched's
    own total_hist of the same switches, and its p50/p99/p99.9 are within the bucket
    error of the exact percentiles of pf_sched's per-switch timings (the rows' source_ns,
    from the module's tracepoint)."""
    with pfsched.loaded(2, slice_us=1000) as pfs:
        pfsched.set_enabled(False)
        rec = Recorder("khist-module", "--depth", "window")
        hist_before = module_hists(pfs)
        before, after = window(pfs, lambda: time.sleep(3))
        hist_after = module_hists(pfs)
        meta, rows, problems = rec.stop()
    assert not problems and meta["lost_total"] == 0, meta
    labutil.assert_no_kernel_drops(meta)
    hists = kernel_hist.from_meta(meta["kernel_histograms"])
    assert kernel_counts_per_pf(hists, "corrected") == switches_per_pf(before, after)
    assert_corrected_is_the_modules_histogram(hists, after, hist_before, hist_after)
    made, seen = switches_per_pf(before, after), []
    for pf in made:
        timings = [r.source_ns for r in rows if r.pf == pf]
        assert len(timings) == made[pf] > 100
        mine = kernel_hist.merged(hists, "corrected", pfs=frozenset([pf])).percentiles(
            [50, 99, 99.9])
        for p, got in zip((50, 99, 99.9), mine):
            exact = nearest_rank(timings, p)
            assert abs(got - exact) <= exact * RELATIVE_ERROR, (pf, p, got, exact)
        seen.append(f"pf{pf} {made[pf]} switches, p50/p99/p99.9 {'/'.join(map(str, mine))} ns")
    print("pf_sched's own timings: " + "; ".join(seen))


def test_lossless_kernel_histograms_are_the_records_histograms():
    with pfsched.loaded(2, slice_us=3000) as pfs:
        pfsched.set_enabled(False)
        rec = Recorder("khist-exact", "--depth", "iommu")     # revoke and grant measured
        before, after = window(pfs, lambda: time.sleep(3))
        meta, rows, problems = rec.stop()
    assert not problems and meta["lost_total"] == 0, meta
    labutil.assert_no_kernel_drops(meta)
    hists = kernel_hist.from_meta(meta["kernel_histograms"])
    assert meta["kernel_histograms"]["read"] == "mmap"
    assert kernel_counts_per_pf(hists) == switches_per_pf(before, after)
    assert {k.phase for k in hists} == {"switch", "revoke", "grant", "corrected"}
    correction = Correction.from_meta(meta)
    assert correction is not None and meta["probe_costs"]["types"], meta["probe_costs"]
    assert kernel_counts_per_pf(hists, "corrected") == switches_per_pf(before, after)
    # every switch the kernel counted is a record (the capture's own check)
    assert meta["switch_accounting"]["unaccounted"] == 0, meta["switch_accounting"]
    for k in hists:
        ours = [r for r in rows if r.pf == k.pf and r.to_vf == k.vf]
        if k.phase == "corrected":          # the records' rule, below zero as 0
            mine = [max(correction.values(r)[0], 0) for r in ours]
        else:
            mine = [getattr(r, PHASE_COLUMNS[k.phase]) for r in ours]
        built = Histogram()
        built.add_array(np.array(mine))
        assert kernel_hist.buckets(k.hist) == kernel_hist.buckets(built), (k.pf, k.vf, k.phase)
        assert (k.hist.min, k.hist.max, k.sum_ns) == (min(mine), max(mine), sum(mine))
        assert k.hist.percentiles([50, 99, 99.9]) == built.percentiles([50, 99, 99.9])
    print(f"kernel histograms: {len(hists)} (pf, vf, phase) groups, "
          f"{sum(k.count for k in hists if k.phase == 'switch')} switches, as the records")


def test_with_records_lost_the_kernel_histograms_still_count_every_switch():
    """A paused reader with a tiny ring buffer (8 pages, ~150 switches): it fills and
    records are lost (counted); the histograms, updated before a record goes out, still
    have every switch."""
    with pfsched.loaded(2, slice_us=500) as pfs:
        pfsched.set_enabled(False)
        rec = Recorder("khist-lossy", "--depth", "window",     # no cost calibration to wait for
                       "--buffer-pages", "8")
        os.kill(rec.proc.pid, signal.SIGSTOP)
        try:
            hist_before = module_hists(pfs)
            before, after = window(pfs, lambda: time.sleep(6))
            hist_after = module_hists(pfs)
        finally:
            os.kill(rec.proc.pid, signal.SIGCONT)
        meta, rows, problems = rec.stop()
    assert not problems
    assert meta["buffer_pages"] == 8
    lost = meta["lost_by_kind"]["switch"]
    assert lost > 0, "the paused reader lost nothing: the case this test is for"
    made = switches_per_pf(before, after)
    hists = kernel_hist.from_meta(meta["kernel_histograms"])
    assert kernel_counts_per_pf(hists) == made
    # no probe hits at --depth window: corrected is pf_sched's own timing, every switch
    assert kernel_counts_per_pf(hists, "corrected") == made
    # and each switch's value, not only its count: the module's own histogram of them
    assert_corrected_is_the_modules_histogram(hists, after, hist_before, hist_after)
    assert len(rows) + lost == sum(made.values())
    assert meta["switch_accounting"] == {"kernel": sum(made.values()), "lost_in_kernel": lost,
                                         "read": len(rows), "passed_on": len(rows),
                                         "written": len(rows), "unaccounted": 0}
    # the capture says why: a reader stopped for 6 s, noticed between two of its reads
    assert meta["reader_gaps"]["longest_s"] >= 5.5 and meta["reader_gaps"]["over_1s"] >= 1
    print(f"paused reader: pf_sched made {sum(made.values())} switches, {len(rows)} records "
          f"kept, {lost} lost; the kernel histograms counted "
          f"{sum(kernel_counts_per_pf(hists).values())}")
