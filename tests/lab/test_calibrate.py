"""vftrace calibrate in the lab: a floor per probe mode measured on the calls vftrace
made.  Which mode is cheaper is a speed claim, so it lives in the benchmark (BENCHMARKS.md's
per-run costs, with their spread), not here: under TCG one run's medians of the two modes
have come out either way round (900 vs 870 ns on 6.1 once)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.lab import pfsched
from tracer.kernel.engine import CALIB_CALLS

pytestmark = pytest.mark.lab


def calibrate(*args: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "tracer.cli", "calibrate", "--json", *args],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def check_floor(out: dict, modes) -> None:
    floor = out["floor"]
    assert floor["function"]
    for mode in modes:
        f = floor[mode]
        # Measured on vftrace's own calls (CALIB_CALLS of them, one thread): if most are
        # missing, the probe pair did not see the calls it was timing.
        assert f["samples"] >= CALIB_CALLS // 2, (mode, f)
        assert f["median_ns"] > 0, (mode, f)
        assert f["p10_ns"] <= f["median_ns"] <= f["p90_ns"], (mode, f)    # not mislabelled
        # a probe pair costs something; a floor of milliseconds is not a floor
        assert f["median_ns"] < 1_000_000, (mode, f)


@pytest.fixture(scope="module")
def both_modes() -> dict:
    """One calibration of both probe modes, side by side in one run, as vftrace record
    does at start (pf_sched switching meanwhile)."""
    with pfsched.loaded(1, slice_us=2000):
        return calibrate()


def test_floor_per_mode_with_pf_sched(both_modes):
    assert set(both_modes["calib_modes"]) >= {"fentry", "kprobe"}
    check_floor(both_modes, both_modes["calib_modes"])


def test_kprobe_only_and_no_switch_source_loaded():
    out = calibrate("--probe-mode", "kprobe")        # pf_sched is not loaded here
    assert out["calib_modes"] == ["kprobe"]
    check_floor(out, ["kprobe"])
    assert "fentry" not in out["floor"]
