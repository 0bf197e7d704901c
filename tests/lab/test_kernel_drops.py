"""Every kernel-side drop counter fires when its map is full, and is seen in the meta.

A test build shrinks the BPF maps (``VFTRACE_BPF_SIZES``, compile-time defines) until
they fill under three PFs switching and two guests exiting.  The switches the kernel
side could not record are checked against what it did record: every seq gap in the
capture is a counted drop, so nothing is missing silently.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.lab import labutil, pfsched
from tracer.capture.files import read_capture
from tracer.kernel.probes import MAP_SIZES_ENV
from tracer.lab.experiment import record_with_guests

pytestmark = pytest.mark.lab
OUT = labutil.REPO / "build" / "lab-captures"
PFS = 3

# The map sizes of each test build, and the drop counters that must fire in it.  One
# open window at most leaves task_slot with one entry, so it gets a build of its own.
BUILDS = {
    "one-window": ("VFT_MAX_OPEN=1,VFT_STARTS_MAX=1,VFT_EXITS_MAX=1,VFT_BG_MAX=1",
                   {"no_slot", "starts", "exits", "bg"}),
    "one-task": ("VFT_TASK_SLOTS=1", {"task_slot"}),
}


def seq_gaps(rows) -> int:
    """Switches missing between each PF's first and last recorded seq."""
    by_pf: dict[int, list[int]] = {}
    for r in rows:
        by_pf.setdefault(r.pf, []).append(r.seq)
    return sum(max(s) - min(s) + 1 - len(set(s)) for s in by_pf.values())


@pytest.mark.parametrize("build", BUILDS)
def test_each_full_map_is_counted_and_every_missing_switch_is_a_counted_drop(
        build, monkeypatch):
    sizes, must_fire = BUILDS[build]
    monkeypatch.setenv(MAP_SIZES_ENV, sizes)
    csv = OUT / f"drops-{build}-{labutil.kernel_release()}.csv"
    with pfsched.loaded(PFS, slice_us=2000, nr_vfs=2):
        guests, _, err = record_with_guests(csv, mode="mmap", vms=2, vcpus=1, duration=6)
    meta, rows, problems = read_capture(csv)
    assert not problems, problems
    assert guests["returncode"] == 0 and not guests["errors"], guests
    assert meta["lost_total"] == 0, err
    assert any("test build" in w for w in meta["warnings"]), meta["warnings"]
    drops = meta["background"]["kernel_drops"]
    print(f"{build}: {len(rows)} rows, drops {drops}")
    fired = {k for k, n in drops.items() if n > 0}
    assert must_fire <= fired, (must_fire - fired, drops)

    # A switch the kernel could not open a window for is a seq gap, and vice versa
    # (a drop before a PF's first row or after its last is no gap: at most 2 per PF).
    not_recorded = drops["no_slot"] + drops["task_slot"]
    gaps = seq_gaps(rows)
    assert gaps <= not_recorded <= gaps + 2 * PFS, (gaps, drops)
    # ... and its end, finding no window, is a partial one (as are the ends of switches
    # begun before the probes were armed: at most one per PF).
    partial = meta["partial_windows"]
    assert not_recorded <= partial <= not_recorded + PFS, (partial, drops)
    # No window here lives long: none may be reclaimed as stale (a begin that read its
    # clock before another stamped its window once took that window for 2^64 ns old).
    assert drops["stale"] == 0, drops
    assert rows, "nothing recorded at all"

    # The report says so, by name.
    report = subprocess.run([sys.executable, "-m", "tracer.cli", "report", str(csv)],
                            capture_output=True, text=True, timeout=120)
    shown = report.stdout + report.stderr
    assert "could not keep everything" in shown, shown
    for name in must_fire:
        assert f"{name} {drops[name]}" in shown, (name, shown)
