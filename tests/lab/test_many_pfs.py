"""More than 8 PFs recorded at once, each whole and with its own calls and exits.

Windows once had a fixed slot per PF (pf % 8), so PF n and PF n+8 overwrote each
other's.  Here ten PFs switch at once under KVM guests, and each PF's rows are checked
against pf_sched's own counters for that PF.
"""
from __future__ import annotations

from bisect import bisect_left, bisect_right

import pytest

from tests.lab import labutil, pfsched
from tracer.capture.files import iter_calls, read_capture
from tracer.lab.experiment import record_with_guests

pytestmark = pytest.mark.lab
OUT = labutil.REPO / "build" / "lab-captures"
PFS = 10
VMS = 2                  # one vCPU each: at most one exit each never ends
SLICE_US = 20_000        # ten switching threads on the lab's two TCG vCPUs


def test_more_than_eight_pfs_each_recorded_whole_with_their_own_calls_and_exits():
    free = labutil.free_edu_devices()
    assert len(free) >= PFS, f"the lab needs {PFS} free edu devices (--pfs), has {free}"
    csv = OUT / f"many-pfs-{labutil.kernel_release()}.csv"
    calls_csv = csv.with_suffix(".calls.csv")
    snaps: dict[str, dict] = {}

    def snapshot(name):
        pfsched.set_enabled(False)       # returns once no switch is in flight
        snaps[name] = {b: pfsched.stats(b) for b in bdfs}

    def armed():
        snapshot("before")
        pfsched.set_enabled(True)

    with pfsched.loaded(PFS, slice_us=SLICE_US, nr_vfs=2) as bdfs:
        pfsched.set_enabled(False)
        guests, _, err = record_with_guests(csv, mode="trap", vms=VMS, vcpus=1, duration=6,
                                            on_armed=armed,
                                            record_args=["--calls", str(calls_csv)],
                                            before_stop=lambda: snapshot("after"))
    meta, rows, problems = read_capture(csv)
    assert not problems, problems
    assert meta["lost_total"] == 0, err
    assert guests["returncode"] == 0 and not guests["errors"], guests
    skipped = labutil.assert_no_kernel_drops(meta)
    for bdf in bdfs:
        b, a = snaps["before"][bdf], snaps["after"][bdf]
        mine = [r for r in rows if r.pf == a["pf"]]
        # Every switch this PF made while armed, once, and nothing of another PF's.
        assert sorted(r.seq for r in mine) == list(range(b["seq"] + 1, a["seq"] + 1)), bdf
        assert len(mine) > 10, (bdf, len(mine))
        for key in ("map_calls", "unmap_calls", "map_bytes", "unmap_bytes"):
            assert sum(getattr(r, key) for r in mine) == a[key] - b[key], (bdf, key)
    # Each switch's exits are its own.  An exit is counted in every window open when it
    # began (its call row names the lowest slot's switch only), so per switch: at least
    # the exits the calls file puts in it, at most those that began between its stamps
    # (plus a vCPU's last exit, never ended, so without a call row).  A window mixed up
    # with another PF's would count exits that began outside it.  (How many land in one
    # PF's windows is chance: fresh-clone run I had a PF with none.)
    calls = [c for c in iter_calls(calls_csv) if c.kind == "kvm_exit"]
    starts = sorted(c.t_ns for c in calls)
    named: dict[tuple[int, int], int] = {}
    for c in calls:
        if c.seq is not None:
            named[(c.pf, c.seq)] = named.get((c.pf, c.seq), 0) + 1
    assert set(named) <= {(r.pf, r.seq) for r in rows}
    for r in rows:
        began = bisect_right(starts, r.t_ns + r.switch_ns) - bisect_left(starts, r.t_ns)
        assert named.get((r.pf, r.seq), 0) <= r.kvm_exits <= began + VMS, r
    assert sum(named.values()) > 0, "no exit began in any window"
    print(f"{PFS} PFs: {len(rows)} rows; exits per PF "
          f"{[sum(r.kvm_exits for r in rows if r.pf == p) for p in range(PFS)]}; "
          f"runs the kernel skipped {skipped}")
