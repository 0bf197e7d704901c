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

from .fake_bpf import AttachTracker

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


# --- the engine's floor arithmetic, on samples we choose --------------------------------

CALIB = "security_task_getsid"


class Slot:
    def __init__(self, value: int) -> None:
        self.value = value


class Table:
    """A BPF array as BCC shows it: indexed by ctypes ints, items with ``.value``."""

    def __init__(self, values=(), on_set=None) -> None:
        self.values, self.on_set = list(values), on_set

    def __getitem__(self, key):
        return Slot(self.values[key.value])        # IndexError past the slots given

    def __setitem__(self, key, value) -> None:
        if self.on_set:
            self.on_set(key.value, value.value)

    def open_ring_buffer(self, callback) -> None:
        pass


class CalibBPF(AttachTracker):
    """The kernel side of calibration: each time the engine zeroes ``calib_count`` for a
    probe mode, the next run's samples land in ``calib`` and its count in
    ``calib_count`` (the calls seen, which can exceed the slots).  Attachments of the
    calibration probes are tracked; BCC attaches the fentry pair itself at load."""

    def __init__(self, runs: list[tuple[int, list[int]]]) -> None:
        self.runs = list(runs)
        self.count, self.slots = Table([None]), Table()
        self.count.on_set = self._next_run
        super().__init__({("kfunc", CALIB), ("kretfunc", CALIB)})
        self.cleaned = False

    def _next_run(self, index: int, value: int) -> None:
        assert (index, value) == (0, 0), "calib_count is only ever zeroed"
        calls, samples = self.runs.pop(0)
        self.count.values, self.slots.values = [calls], samples

    def __getitem__(self, name: str) -> Table:
        return {"calib_count": self.count, "calib": self.slots}.get(name) or Table([0])

    def ring_buffer_consume(self):
        pass

    def cleanup(self):
        self.cleaned = True


def calibrated(runs, modes=("fentry", "kprobe")):
    from tracer.kernel.engine import Engine
    from tracer.kernel.probes import Plan
    engine = Engine(Plan("pf_sched", "raw_tp", calib_func=CALIB, calib_modes=modes),
                    budget_ns=100, on_switch=lambda rec: None)
    engine.bpf = bpf = CalibBPF(runs)
    engine._calibrate()
    assert bpf.runs == [] and bpf.attached == set(), "every mode ran and was detached"
    return engine


def shuffled(values: list[int]) -> list[int]:
    import random
    values = list(values)
    random.Random(1).shuffle(values)          # the kernel's slots are in arrival order
    return values


def test_floor_is_median_and_p10_p90_of_the_samples_per_mode():
    fentry = shuffled(range(301, 401))                     # 100 samples, 1 ns apart
    kprobe = shuffled([600] * 95 + [50_000] * 5)           # 5 calls hit by an interrupt
    engine = calibrated([(100, fentry), (100, kprobe)])
    # 301..400: the median lies between 350 and 351, p10 between 310 and 311, p90
    # between 390 and 391; reported in whole ns, rounded down.
    assert engine.floor.modes["fentry"] == {"median_ns": 350, "p10_ns": 310, "p90_ns": 390,
                                            "samples": 100}
    # The outliers move neither the median nor p90 (their mean would be 3,070 ns).
    assert engine.floor.modes["kprobe"] == {"median_ns": 600, "p10_ns": 600, "p90_ns": 600,
                                            "samples": 100}
    assert engine.floor.as_meta()["function"] == CALIB
    assert not any(w.startswith("floor:") for w in engine.warnings)


def test_floor_reads_no_more_samples_than_the_kernel_has_slots():
    from tracer.kernel import layout
    slots = layout.header().constants["VFT_CALIB_SAMPLES"]
    samples = shuffled([400] * (slots // 2) + [500] * (slots - slots // 2))
    engine = calibrated([(slots + 904, samples)], modes=("fentry",))    # more calls than slots
    assert engine.floor.modes["fentry"]["samples"] == slots
    assert engine.floor.modes["fentry"]["median_ns"] == 450


def test_a_mode_with_too_few_samples_has_no_floor_and_says_so():
    engine = calibrated([(100, shuffled(range(301, 401))), (9, [700] * 9)])
    assert set(engine.floor.modes) == {"fentry"}
    assert f"floor: kprobe calibration saw 9 calls of {CALIB}" in engine.warnings


def test_no_calibration_function_means_an_unknown_floor():
    from tracer.kernel.engine import Engine
    from tracer.kernel.probes import Plan
    engine = Engine(Plan("pf_sched", "raw_tp"), budget_ns=100, on_switch=lambda rec: None)
    engine._calibrate()                        # touches no BPF (there is none)
    assert engine.floor.modes == {}
    assert "floor unknown" in engine.warnings[-1]
    assert "unknown" in calibrate.format_floor(engine.floor.as_meta())


def test_measure_floor_starts_the_real_engine_and_detaches(monkeypatch):
    """vftrace calibrate's path: Engine.start (with BCC replaced by the fake kernel
    side), the floor it computed, then close (BCC's cleanup)."""
    import sys
    import types
    from tracer.kernel.probes import Plan
    bpf = CalibBPF([(100, shuffled(range(301, 401))), (100, shuffled(range(501, 601)))])
    monkeypatch.setitem(sys.modules, "bcc", types.SimpleNamespace(BPF=lambda **kw: bpf))
    floor, costs, warnings = calibrate.measure_floor(
        Plan("pf_sched", "raw_tp", calib_func=CALIB, calib_modes=("fentry", "kprobe"),
             mapped_reader=False))        # the fake plays BCC's callbacks, not ring pages
    assert costs == {"types": []}         # no cost function in this plan: no costs
    assert floor == {"function": CALIB,
                     "fentry": {"median_ns": 350, "p10_ns": 310, "p90_ns": 390, "samples": 100},
                     "kprobe": {"median_ns": 550, "p10_ns": 510, "p90_ns": 590, "samples": 100}}
    assert warnings == []
    assert bpf.cleaned and bpf.attached == set()


class FailingEngine:
    """Stands in for Engine whose start() fails as BCC does; close() is recorded."""
    closed = 0

    def __init__(self, plan, *, budget_ns, on_switch):
        pass

    def start(self):
        raise Exception("bpf: Failed to load\nmore detail")

    def close(self):
        FailingEngine.closed += 1


def test_measure_floor_load_failure_is_one_line_and_detaches(monkeypatch):
    from tracer.kernel import engine
    from tracer.kernel.probes import Plan
    monkeypatch.setattr(engine, "Engine", FailingEngine)
    FailingEngine.closed = 0
    with pytest.raises(VftraceError) as e:
        calibrate.measure_floor(Plan("pf_sched", "raw_tp"))
    assert str(e.value) == "could not load the BPF program: bpf: Failed to load"
    assert FailingEngine.closed == 1
