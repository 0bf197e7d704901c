"""KVM exits charged to the right switch, checked against the kernel's own counts.

The kernel counts every exit and its duration per vCPU thread in tracefs hists (no BPF
involved, ``tests/lab/kernel_counts.py``) while vftrace records the same guests.  With
one PF the windows never overlap, so every exit is in at most one switch, and the calls
file's kvm_exit rows give each exit's start, duration and switch.
"""
from __future__ import annotations

from collections import Counter

import pytest

from tests.lab import kernel_counts, labutil, pfsched
from tracer.capture.files import iter_calls, read_capture
from tracer.lab.experiment import record_with_guests

pytestmark = pytest.mark.lab
OUT = labutil.REPO / "build" / "lab-captures"
SECONDS = 6
LOSSES = ("late_exits", "late_exit_ns", "orphan_exits", "unended_exits")


@pytest.mark.parametrize("mode", ["mmap", "trap"])
def test_exits_and_their_time_match_the_kernels_count_and_stay_with_their_switch(mode):
    csv = OUT / f"exits-{mode}-{labutil.kernel_release()}.csv"
    calls_csv = csv.with_suffix(".calls.csv")
    with pfsched.loaded(1, slice_us=2000, nr_vfs=2):
        with kernel_counts.ExitLatency() as kernel:
            guests, _, err = record_with_guests(
                csv, mode=mode, vms=2, vcpus=1, duration=SECONDS,
                record_args=["--calls", str(calls_csv)])
            began, ended, octaves = kernel.exits(), kernel.latency(), kernel.latency_log2()
    meta, rows, problems = read_capture(csv)
    assert not problems, problems
    assert meta["lost_total"] == 0, err
    assert guests["returncode"] == 0 and not guests["errors"], guests
    skipped = labutil.assert_no_kernel_drops(meta)
    exits = meta["background"]["kvm_exits"]

    # 1. Every exit the kernel saw begin, vftrace counted (only the guests make exits).
    k_began = sum(began.values())
    assert k_began > 1000
    assert sum(e["count"] for e in exits) == k_began

    # 2. Their time: the kernel's own latency sum against vftrace's, over the exits that
    #    ended.  The two read their clocks in different programs on the same tracepoints,
    #    and a pause of the lab's vCPU between those reads (the host descheduling a TCG
    #    thread, up to ms; CI runs two VMs on two cores) is in one measure and not the
    #    other.  Exit by exit they differ by up to ~0.9 ms against ftrace's own events,
    #    in both directions; totals mostly agree within 1.5%, and -8% and -10% were seen
    #    with long mmap exits on a loaded host: hence 15%.  How many exits fall in the
    #    kernel's octave (its log2 histogram) is printed, not held: 81-99% seen.
    k_ended = sum(n for n, _ in ended.values())
    k_ns = sum(ns for _, ns in ended.values())
    calls = [c for c in iter_calls(calls_csv) if c.kind == "kvm_exit"]
    assert len(calls) == k_ended == sum(octaves.values())
    v_ns = sum(e["ns"] for e in exits)
    assert v_ns == sum(c.ns for c in calls)
    mine = Counter((c.ns - 1).bit_length() if c.ns > 0 else 0 for c in calls)
    same = sum(min(n, octaves.get(b, 0)) for b, n in mine.items())
    print(f"{mode}: exits began {k_began}, ended {k_ended}; kernel {k_ns} ns, "
          f"vftrace {v_ns} ns ({(v_ns - k_ns) / k_ns:+.3%}); in the kernel's octave "
          f"{same / k_ended:.2%}; late-joined {meta['late_exits']}; rows {len(rows)}; "
          f"runs the kernel skipped {skipped}")
    assert abs(v_ns - k_ns) <= 0.15 * k_ns, (v_ns, k_ns)

    # 3. Per switch: an exit counts and is timed in the switch it began in, and no
    #    other; exits that outlived their window still reach it (joined after it).
    by_seq: dict[int, list] = {}
    for c in calls:
        if c.seq is not None:
            by_seq.setdefault(c.seq, []).append(c)
    windows = {r.seq: r for r in rows}
    assert set(by_seq) <= set(windows)
    outlived, early, late = 0, [], []
    for seq, mine in by_seq.items():
        r = windows[seq]
        end = r.t_ns + r.switch_ns
        early += [r.t_ns - c.t_ns for c in mine if c.t_ns < r.t_ns]
        late += [c.t_ns - end for c in mine if c.t_ns > end]
        outlived += sum(1 for c in mine if c.t_ns + c.ns > end)
    longest = max(c.ns for c in calls)
    print(f"{mode}: {sum(len(m) for m in by_seq.values())} exits in windows, {outlived} "
          f"outlived theirs; began before the window's stamp: {len(early)} (max "
          f"{max(early, default=0)} ns), after its end stamp: {len(late)} (max "
          f"{max(late, default=0)} ns); longest exit {longest} ns; floor "
          f"{meta['floor_ns']}")
    assert not early and not late, "an exit counted in a window it did not begin in"
    # Exact per switch: an end is added only to the generation of the window it began
    # in (a slot can close and reopen between an exit's check and its add: fresh-clone
    # run C, 6.12, had one 4.4 ms end land in the next switch before generations).
    # The last drain reads calls before joins (engine._open_buffers): CI on 6.12 once
    # wrote a 59 ms exit's call row and missed its join, read in the other order.
    unended = 0
    for r in rows:
        mine = by_seq.get(r.seq, [])
        assert r.exit_ns == sum(c.ns for c in mine), (r.seq, r.exit_ns, [c.ns for c in mine],
                                                      {k: meta[k] for k in LOSSES})
        # The exits that never ended (a vCPU's last, at the guests' stop) have no row,
        # and are counted as such.
        assert len(mine) <= r.kvm_exits <= len(mine) + 2, r.seq
        unended += r.kvm_exits - len(mine)
    assert meta["unended_exits"] == unended
    in_window = [e for e in exits if e["in_window"]]
    assert sum(r.kvm_exits for r in rows) == sum(e["count"] for e in in_window)
    assert sum(r.exit_ns for r in rows) == sum(e["ns"] for e in in_window)
    assert outlived > 0, "no exit outlived its window: the case this test is for"
    assert meta["late_exits"] == 0 and meta["orphan_exits"] == 0
