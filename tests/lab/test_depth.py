"""``--depth``: each depth attaches exactly its hooks, as the kernel's own lists show them
(the kprobes debugfs list, ftrace's enabled_functions, the loaded BPF programs), records
every switch pf_sched made, and leaves the columns it does not hook empty."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.lab import kernel_counts, labutil, pfsched
from tracer.capture.files import read_capture
from tracer.kernel import costs
from tracer.model.correction import Correction
from tracer.model.schema import DEPTHS
from tracer.model.stats import RELATIVE_ERROR, Stats
from tracer.pfsched import control

from .test_record import Recorder, window

pytestmark = pytest.mark.lab
SLICE_US = 3000


@pytest.fixture(scope="module")
def pfs():
    with pfsched.loaded(2, slice_us=SLICE_US) as bdfs:
        yield bdfs


def untraced_p50(pfs, seconds: float = 2.0) -> float:
    """pf_sched's own p50 over a window of switches with nothing attached."""
    def merged():
        out: dict[int, int] = {}
        for b in pfs:
            for low, n in control.total_hist(b).items():
                out[low] = out.get(low, 0) + n
        return out
    pfsched.set_enabled(False)
    before = merged()
    pfsched.set_enabled(True)
    time.sleep(seconds)
    pfsched.set_enabled(False)
    return control.hist_quantile(control.hist_delta(merged(), before), 0.5)


def paused(rec: Recorder, seconds: float) -> None:
    """Switch for ``seconds`` with the recorder's user space stopped: the lab runs every
    vCPU on one TCG thread, so a reader busy writing rows takes the thread from
    pf_sched mid-switch and stretches its emulated time, which a host's spare CPU would
    not (BENCHMARKS.md, "reader stopped").  The kernel side runs on; its records wait in
    the ring buffer (about 700 here, far below its size) and are read after SIGCONT."""
    os.kill(rec.proc.pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        os.kill(rec.proc.pid, signal.SIGCONT)


@pytest.fixture(scope="module")
def switch_costs(pfs, tmp_path_factory):
    """``vftrace calibrate --switches -D iommu``: the fentry pairs' cost on pf_sched's own
    switches, saved for the iommu recorder's --costs."""
    path = tmp_path_factory.mktemp("costs") / "iommu.json"
    r = subprocess.run([sys.executable, "-m", "tracer.cli", "calibrate", "--switches",
                        "--json", "-D", "iommu", "-o", str(path)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    fentry = out["probe_costs"]["fentry"]
    assert fentry["method"] == "switches" and fentry["median_ns"] > 0, fentry
    # every round's with-arm ran both calls: pf_sched maps and unmaps once per switch
    assert all(r["runs"] == 2 for r in fentry["per_round"]), fentry["per_round"]
    # Drift-free: each round's with-hooks switches, corrected with the other rounds'
    # cost, against the same round's switches without the hooks (held out, in one
    # seconds-long round).  Lab runs: -5.4%, -2.1%, -2.2%, +9.1% (p50 medians).
    check = costs.held_out(fentry)
    assert abs(check["p50_ns"]["median"]) <= 0.25, check
    print(f"calibrate --switches: fentry {fentry['median_ns']} ns per run (p10-p90 "
          f"{fentry['p10_ns']}-{fentry['p90_ns']}) on {fentry['switches']} switches; hot "
          f"loop {out['hot_loop'].get('fentry')}; held out {check}")
    return path


# --depth guests, the default, is checked by test_record's first test, on its recorder.
@pytest.mark.parametrize("depth", DEPTHS[:-1])
def test_each_depth_attaches_exactly_its_hooks_and_records_every_switch(pfs, depth, request):
    # iommu's costs come from real switches (calibrate --switches), mmu's from the
    # start-up hot loop: both ways into the capture are checked.
    extra = ["--costs", str(request.getfixturevalue("switch_costs"))] if depth == "iommu" else []
    untraced = untraced_p50(pfs)
    pfsched.set_enabled(False)
    attached = kernel_counts.Attached()
    rec = Recorder(f"depth-{depth}", "--depth", depth, *extra)
    hooked = attached.check(depth)
    before, after = window(pfs, (lambda: paused(rec, 2)) if extra else (lambda: time.sleep(2)))
    meta, rows, problems = rec.stop()
    pfsched.set_enabled(True)
    # The recording: every switch, its depth said, what it did not hook left empty.
    assert not problems and meta["complete"] and meta["lost_total"] == 0, meta
    assert meta["depth"] == depth
    labutil.assert_no_kernel_drops(meta)
    assert len(rows) == sum(a["switches"] - before[b]["switches"] for b, a in after.items())
    header, *lines = rec.csv.read_text().splitlines()
    empty = {name for name, field in zip(header.split(","), lines[0].split(",")) if not field}
    assert empty == set(meta["unmeasured"])
    hits = labutil.assert_hits_are_the_calls(meta, rows)
    if depth == "window":
        assert {"map_calls", "revoke_ns", "kvm_exits", "blocked_ns"} <= empty
        assert not any(hits.values()) and meta["probe_costs"]["types"] == []
    else:
        assert all(r.map_calls == 1 and r.unmap_calls == 1 for r in rows)
        assert all(r.revoke_ns + r.grant_ns == r.switch_ns for r in rows)
        zaps = sum(a["zap_calls"] - before[b]["zap_calls"] for b, a in after.items())
        if depth == "mmu":          # the module's own count of its zaps
            assert sum(r.mmu_calls for r in rows) == zaps
    # The correction takes something off (a calibrated cost is positive), and at most
    # what the probes added: never far below the untraced switches measured around the
    # recording (the lower of before and after: the lab drifts both ways, 33 us traced
    # against 56 us untraced was seen at --depth window, CI on both kernels), plus the
    # correction's own uncertainty and the histogram's bucket error.  --depth window has
    # no probe hits to correct: its corrected figure is the raw one, whatever the drift.
    g = Stats(10**9, correction=Correction.from_meta(meta))
    g.add_many(rows)
    own = g.snapshot().overall.own
    # pf_sched's own p50, by the same nearest rank the histogram uses: with an even count
    # the lower middle value (the upper one was 90 ns off it in CI, beyond the slack).
    raw = sorted(r.source_ns for r in rows)[math.ceil(len(rows) / 2) - 1]
    slack = own.err_ns + raw * RELATIVE_ERROR
    later = untraced_p50(pfs)
    untraced, highest = min(untraced, later), max(untraced, later)
    pfsched.set_enabled(True)
    if depth == "window":
        assert own.err_ns == 0 and abs(own.switch.p50 - raw) <= slack, (own, raw)
    else:
        assert own.switch.p50 >= 0.5 * untraced - slack, (own, untraced)
    assert own.switch.p50 <= raw + slack, (own, raw)
    if extra:
        # Held to the untraced switches only by the bounds above: the lab's own drift
        # between two untraced windows a minute apart (up to 2x in BENCHMARKS.md) is larger
        # than any tighter bound.  Tried: corrected p50 within 15% (and its uncertainty) of
        # the untraced before/after passed 4 runs of 6 by hand and failed 2 at +53%/+73%
        # (a recording whose raw p50 doubled).  The drift-free check is the calibration's
        # own held-out one, in the switch_costs fixture.
        assert meta["probe_costs"]["method"] == "switches", meta["probe_costs"]
    print(f"depth {depth}: untraced p50 {untraced:.0f}-{highest:.0f} ns; pf_sched's own p50 "
          f"here {raw} ns; "
          f"corrected p50 {own.switch.p50} ±{own.err_ns:.0f} ns ({own.share:.0%} own)")
    print(f"depth {depth}: {len(rows)} switches; {hooked}; hits {hits}; median switch_ns "
          f"{sorted(r.switch_ns for r in rows)[len(rows) // 2]}; probe costs "
          f"{meta['probe_costs']}")
