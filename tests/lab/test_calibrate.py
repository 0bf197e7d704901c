"""vftrace calibrate in the lab: a positive floor per probe mode, with a sane spread."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.lab import pfsched

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
        assert f["median_ns"] > 0 and f["samples"] >= 10, f
        assert f["p10_ns"] <= f["median_ns"] <= f["p90_ns"], f


def test_floor_per_mode_with_pf_sched():
    with pfsched.loaded(1, slice_us=2000):
        out = calibrate()
    assert set(out["calib_modes"]) >= {"fentry", "kprobe"}
    check_floor(out, out["calib_modes"])


def test_kprobe_only_and_no_switch_source_loaded():
    out = calibrate("--probe-mode", "kprobe")        # pf_sched is not loaded here
    assert out["calib_modes"] == ["kprobe"]
    check_floor(out, ["kprobe"])
    assert "fentry" not in out["floor"]
