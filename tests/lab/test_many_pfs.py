"""More than 8 PFs recorded at once, each whole and with its own calls and exits.

Windows once had a fixed slot per PF (pf % 8), so PF n and PF n+8 overwrote each
other's.  Here ten PFs switch at once under KVM guests, and each PF's rows are checked
against pf_sched's own counters for that PF.
"""
from __future__ import annotations

import pytest

from tests.lab import labutil, pfsched
from tracer.capture.files import read_capture
from tracer.lab.experiment import record_with_guests

pytestmark = pytest.mark.lab
OUT = labutil.REPO / "build" / "lab-captures"
PFS = 10
SLICE_US = 20_000        # ten switching threads on the lab's two TCG vCPUs


def test_more_than_eight_pfs_each_recorded_whole_with_their_own_calls_and_exits():
    free = labutil.free_edu_devices()
    assert len(free) >= PFS, f"the lab needs {PFS} free edu devices (--pfs), has {free}"
    csv = OUT / f"many-pfs-{labutil.kernel_release()}.csv"
    snaps: dict[str, dict] = {}

    def snapshot(name):
        pfsched.set_enabled(False)       # returns once no switch is in flight
        snaps[name] = {b: pfsched.stats(b) for b in bdfs}

    def armed():
        snapshot("before")
        pfsched.set_enabled(True)

    with pfsched.loaded(PFS, slice_us=SLICE_US, nr_vfs=2) as bdfs:
        pfsched.set_enabled(False)
        guests, _, err = record_with_guests(csv, mode="trap", vms=2, vcpus=1, duration=6,
                                            on_armed=armed,
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
        # Trapped guest accesses are exits, many a second: some begin in every PF's windows.
        assert sum(r.kvm_exits for r in mine) > 0, (bdf, "no exits in its windows")
    print(f"{PFS} PFs: {len(rows)} rows; exits per PF "
          f"{[sum(r.kvm_exits for r in rows if r.pf == p) for p in range(PFS)]}; "
          f"runs the kernel skipped {skipped}")
