"""vftrace calibrate: the accuracy distribution, its output, and bad input (no BPF here)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from tracer import cli
from tracer.capture.files import iter_capture, read_meta
from tracer.errors import VftraceError
from tracer.model.schema import COLUMNS, SwitchRecord
from tracer.record import calibrate

DATA = Path(__file__).resolve().parents[1] / "data"
SMALL = DATA / "small.csv"


def rec(switch_ns: int, source_ns: int) -> SwitchRecord:
    values = dict.fromkeys(COLUMNS, 0)
    values.update(switch_ns=switch_ns, source_ns=source_ns)
    return SwitchRecord(**values)


def test_accuracy_of_a_lab_capture_matches_numpy():
    rows = list(iter_capture(SMALL))
    sw = np.array([r.switch_ns for r in rows if r.source_ns > 0], dtype=np.int64)
    src = np.array([r.source_ns for r in rows if r.source_ns > 0], dtype=np.int64)
    diff = sw - src
    acc = calibrate.accuracy(rows)
    assert acc.switches == len(diff) > 100
    assert acc.without_source == len(rows) - len(diff)
    for got, q in ((acc.p10_ns, 10), (acc.median_ns, 50), (acc.p90_ns, 90), (acc.p99_ns, 99)):
        assert got == pytest.approx(np.percentile(diff, q))
    assert acc.median_abs_ns == pytest.approx(np.median(np.abs(diff)))
    assert (acc.min_ns, acc.max_ns) == (diff.min(), diff.max())
    assert acc.mean_ns == pytest.approx(diff.mean())
    assert acc.median_source_ns == pytest.approx(np.median(src))


def test_rows_without_source_are_skipped_and_counted():
    acc = calibrate.accuracy([rec(150, 100), rec(170, 100), rec(999, 0), rec(110, 100)])
    assert (acc.switches, acc.without_source) == (3, 1)
    assert acc.median_ns == 50 and acc.min_ns == 10 and acc.max_ns == 70


def test_no_source_at_all_is_a_one_line_error():
    with pytest.raises(VftraceError, match="source_ns"):
        calibrate.accuracy([rec(150, 0)])


def test_verdict_compares_median_abs_with_the_floor_of_the_capture_mode():
    acc = calibrate.accuracy([rec(150, 100)] * 3)        # |diff| 50
    floor = {"function": "f", "fentry": {"median_ns": 60, "p10_ns": 50, "p90_ns": 70,
                                         "samples": 9},
             "kprobe": {"median_ns": 40, "p10_ns": 30, "p90_ns": 50, "samples": 9}}
    assert "within the fentry floor (60 ns" in calibrate.format_accuracy(
        acc, floor, {"iommu_unmap": "fentry"})
    assert "above the kprobe floor (40 ns" in calibrate.format_accuracy(
        acc, floor, {"iommu_unmap": "kprobe"})
    assert "floor (" not in calibrate.format_accuracy(acc, floor, {})


def test_format_floor_lists_every_mode_with_its_spread():
    text = calibrate.format_floor(read_meta(SMALL)["floor_ns"])
    meta_floor = read_meta(SMALL)["floor_ns"]
    for mode in ("fentry", "kprobe"):
        line = next(l for l in text.splitlines() if l.strip().startswith(mode))
        for key in ("median_ns", "p10_ns", "p90_ns", "samples"):
            assert str(meta_floor[mode][key]) in line
    assert "unknown" in calibrate.format_floor({"function": None})


def test_cli_capture_json(capsys):
    assert cli.main(["calibrate", "--capture", str(SMALL), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["accuracy"]["switches"] == calibrate.accuracy(iter_capture(SMALL)).switches
    assert out["floor"] == read_meta(SMALL)["floor_ns"]


def test_cli_capture_text(capsys):
    assert cli.main(["calibrate", "-C", str(SMALL)]) == 0
    out = capsys.readouterr().out
    assert "floor:" in out and "accuracy: switch_ns - source_ns" in out


@pytest.mark.parametrize("argv, words", [
    (["calibrate", "--capture", "/nonexistent/cap.csv"], "no such file"),
    (["calibrate", "--capture", str(DATA / "small.meta.json")], "lacks column"),
    (["calibrate", "--probe-mode", "fexit"], "invalid choice"),
    (["calibrate", "--bogus"], "unrecognized"),
])
def test_bad_input_is_one_line_exit_2(capsys, argv, words):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and words in err
    assert "Traceback" not in err


def test_not_root_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert cli.main(["calibrate"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vftrace calibrate: error:") and "root" in err
    assert len(err.splitlines()) == 1


class FakeEngine:
    """Stands in for Engine: start() 'calibrates' (or fails), close() is recorded."""
    fail: Exception | None = None
    closed = 0

    def __init__(self, plan, *, budget_ns, on_switch):
        from tracer.kernel.engine import Floor
        self.floor, self.warnings = Floor(plan.calib_func), ["w1"]

    def start(self):
        if FakeEngine.fail:
            raise FakeEngine.fail
        self.floor.modes["fentry"] = {"median_ns": 7, "p10_ns": 5, "p90_ns": 9, "samples": 3}

    def close(self):
        FakeEngine.closed += 1


def test_measure_floor_reads_the_engine_floor_and_detaches(monkeypatch):
    from tracer.kernel import engine
    from tracer.kernel.probes import Plan
    monkeypatch.setattr(engine, "Engine", FakeEngine)
    FakeEngine.fail, FakeEngine.closed = None, 0
    floor, warnings = calibrate.measure_floor(Plan("pf_sched", "raw_tp", calib_func="g"))
    assert floor == {"function": "g", "fentry": {"median_ns": 7, "p10_ns": 5, "p90_ns": 9,
                                                "samples": 3}}
    assert warnings == ["w1"] and FakeEngine.closed == 1


def test_measure_floor_load_failure_is_one_line_and_detaches(monkeypatch):
    from tracer.kernel import engine
    from tracer.kernel.probes import Plan
    monkeypatch.setattr(engine, "Engine", FakeEngine)
    FakeEngine.fail, FakeEngine.closed = Exception("bpf: Failed to load\nmore detail"), 0
    with pytest.raises(VftraceError) as e:
        calibrate.measure_floor(Plan("pf_sched", "raw_tp"))
    assert str(e.value) == "could not load the BPF program: bpf: Failed to load"
    assert FakeEngine.closed == 1
    FakeEngine.fail = None
