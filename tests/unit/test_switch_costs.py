"""Probe costs on real switches (``calibrate --switches``, ``--costs FILE``): the A/B
arithmetic against a switch source whose cost per probe run is known, the file's checks,
and the flags' refusals.  The real hooks on real switches: tests/lab/test_calibrate.py."""
from __future__ import annotations

import json
import platform
import random

import pytest

from tracer import cli
from tracer.errors import VftraceError
from tracer.kernel.costs import SwitchCostCalibration
from tracer.kernel.probes import FENTRY, HOOKS, KPROBE, Choice, Plan
from tracer.model.correction import Correction
from tracer.model.schema import COLUMNS, SwitchRecord
from tracer.record import costs_file

from .fake_bpf import AttachTracker

HOOK = {h.name: h for h in HOOKS}


def iommu_plan(mode=FENTRY) -> Plan:
    return Plan("pf_sched", "raw_tp", depth="iommu", choices=[
        Choice(HOOK["iommu_map"], mode, ("iommu_map",)),
        Choice(HOOK["iommu_unmap"], mode, ("iommu_unmap",))])


class SwitchingEngine:
    """A source switching on every poll: each switch is a base time with noise and slow
    drift, plus ``cost`` ns per attached pair that it runs; now and then one was cut by
    a flip (one run instead of two), and the buffer still holds the previous arm's last."""

    def __init__(self, bpf, cal, cost, kind="fentry", seed=7):
        self.bpf, self.cal, self.cost, self.kind = bpf, cal, cost, kind
        self.rng = random.Random(seed)
        self.t = 0
        self.stale = None

    def poll(self, _ms):
        self.t += 1
        runs = sum(1 for k, _ in self.bpf.attached if k == {"fentry": "kfunc"}.get(self.kind,
                                                                                  self.kind))
        if self.rng.random() < 0.05:
            runs = 1                                   # cut in two by a flip
        base = 50_000 + 10 * self.t + self.rng.gauss(0, 3_000)
        values = dict.fromkeys(COLUMNS, 0)
        values.update(switch_ns=int(base + runs * self.cost) + 2_000,
                      source_ns=int(base + runs * self.cost),
                      **{f"{'fentry' if self.kind == 'fentry' else 'kprobe'}_hits": runs})
        rec = SwitchRecord(**values)
        if self.stale is not None:
            self.cal.collect(self.stale)
        self.stale = rec


PAIRS = {"fentry": ("kfunc", "kretfunc"), "kprobe": ("kprobe", "kretprobe")}


def calibrated(kind="fentry", cost=7_000, rounds=9, per_arm=60, hot=None):
    """A calibration of the iommu pairs in ``kind`` mode on the fake switching source."""
    plan = iommu_plan(FENTRY if kind == "fentry" else KPROBE)
    cal = SwitchCostCalibration(plan, rounds=rounds, per_arm=per_arm, read_every_s=0)
    bpf = AttachTracker({(k, f) for k in PAIRS[kind] for f in ("iommu_map", "iommu_unmap")})
    engine = SwitchingEngine(bpf, cal, cost=cost, kind=kind)
    return plan, bpf, *cal.run(engine, hot)


def test_switch_costs_find_the_cost_per_run_despite_drift_and_cut_switches():
    plan, bpf, costs, warnings = calibrated(rounds=9, per_arm=60)
    assert not warnings
    f = costs["fentry"]
    assert f["method"] == "switches" and costs["method"] == "switches"
    # 2 runs per switch at 7 us each: the per-run cost, not the per-switch one
    assert f["median_ns"] == pytest.approx(7_000, rel=0.1)
    assert f["p10_ns"] <= f["median_ns"] <= f["p90_ns"]
    assert f["miscounted"] > 0                          # the cut switches were left out
    assert f["switches"] + f["miscounted"] >= 9 * 4 * 60
    # production's hooks are attached again afterwards
    assert bpf.attached == {(k, f) for k in PAIRS["fentry"] for f in ("iommu_map", "iommu_unmap")}
    # and the correction takes exactly that off
    corr = Correction.from_meta({"probe_costs": costs, "probe_modes": plan.modes()})
    assert corr.own((2, 0, 0))[0] == pytest.approx(2 * f["median_ns"])


def test_kprobe_pairs_are_flipped_with_their_return_probes():
    _, bpf, costs, _ = calibrated("kprobe", cost=9_000, rounds=3, per_arm=30)
    assert costs["kprobe"]["median_ns"] == pytest.approx(9_000, rel=0.15)
    assert len(bpf.attached) == 4


def test_a_type_no_switch_runs_keeps_its_hot_loop_cost_and_says_so():
    plan = Plan("pf_sched", "raw_tp", depth="guests", choices=[
        Choice(HOOK["vcpu_kick"], KPROBE, ("kvm_vcpu_kick",))])     # no guests: never runs
    cal = SwitchCostCalibration(plan, rounds=2, per_arm=5, arm_timeout_s=0.05,
                                read_every_s=0.01)
    bpf = AttachTracker({("kprobe", "kvm_vcpu_kick")})
    engine = SwitchingEngine(bpf, cal, cost=1_000, kind="none")
    hot = {"entry": {"median_ns": 1200, "p10_ns": 1000, "p90_ns": 1500}}
    costs, warnings = cal.run(engine, hot)
    assert costs["entry"] == {**hot["entry"], "method": "synthetic"}
    assert any("no switch ran a entry probe; its synthetic cost is kept" in w for w in warnings)


# --- the file --------------------------------------------------------------------------

def saved(tmp_path, **over):
    path = tmp_path / "costs.json"
    costs_file.save(path, iommu_plan(), {"method": "switches", "types": ["fentry"],
                                         "fentry": {"median_ns": 9000.0, "p10_ns": 7000.0,
                                                    "p90_ns": 12000.0, "rounds": 9}},
                    {"function": "f"})
    if over:
        data = json.loads(path.read_text())
        data.update(over)
        path.write_text(json.dumps(data))
    return path


def test_a_saved_file_loads_and_corrects(tmp_path):
    costs = costs_file.load(str(saved(tmp_path)))
    assert costs["method"] == "switches" and costs["measured_depth"] == "iommu"
    costs_file.check(costs, ("fentry",))
    assert Correction.from_meta({"probe_costs": costs}).own((2, 0, 0)) == \
        pytest.approx((18000.0, 5000.0))


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("{not json", "not a probe-costs file"),
    ('{"format": "other"}', "not a probe-costs file"),
])
def test_bad_files_are_one_line_refusals(tmp_path, content, message):
    path = tmp_path / "c.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(VftraceError, match=message):
        costs_file.load(str(path))


def test_another_kernels_costs_are_refused(tmp_path):
    with pytest.raises(VftraceError, match=f"measured on kernel 5.10.0-x, this is "
                                           f"{platform.release()}"):
        costs_file.load(str(saved(tmp_path, kernel="5.10.0-x")))


def test_a_file_without_a_cost_for_a_type_the_depth_runs_is_refused(tmp_path):
    costs = costs_file.load(str(saved(tmp_path)))
    with pytest.raises(VftraceError, match="no cost for kprobe probes"):
        costs_file.check(costs, ("fentry", "kprobe"))


@pytest.mark.parametrize("argv, message", [
    (["calibrate", "-o", "x.json"], "--output: only with --switches"),
    (["calibrate", "--switches", "--capture", "c.csv"], "--capture and --switches: give one"),
    (["record", "--costs", "/nonexistent/costs.json"], "no such file"),
])
def test_flag_misuse_is_one_line_and_exit_2(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_held_out_rounds_say_how_well_the_cost_corrects_switches_it_did_not_see():
    from tracer.kernel.costs import held_out
    _, _, costs, _ = calibrated(rounds=7, per_arm=80)
    check = held_out(costs["fentry"])
    assert len(costs["fentry"]["per_round"]) == 7
    # the source adds exactly runs x cost: corrected matches detached within the noise
    assert abs(check["p50_ns"]["median"]) < 0.05
    assert check["p50_ns"]["min"] <= check["p50_ns"]["median"] <= check["p50_ns"]["max"]
    # a cost half the true one leaves the corrected switches high (7 us in 60-90 us)
    half = {**costs["fentry"], "per_round": [{**r, "cost_ns": r["cost_ns"] / 2}
                                             for r in costs["fentry"]["per_round"]]}
    assert held_out(half)["p50_ns"]["median"] > 0.07
    assert held_out({"per_round": costs["fentry"]["per_round"][:2]}) is None


def test_the_costs_text_says_where_each_cost_was_measured():
    from tracer.model.group_columns import probe_costs_text
    one = {"median_ns": 20100, "p10_ns": 4140, "p90_ns": 29700}
    text = probe_costs_text({"probe_costs": {"method": "switches",
                                             "fentry": {**one, "method": "switches"},
                                             "entry": {**one, "method": "synthetic"}}})
    assert text == ("fentry 20.1us (4.14us-29.7us) on real switches, "
                    "entry 20.1us (4.14us-29.7us) in a hot loop")
    # start-up costs (every capture before --costs) read as they always have
    assert probe_costs_text({"probe_costs": {"fentry": one}}) == "fentry 20.1us (4.14us-29.7us)"


def test_calibrate_output_is_checked_before_anything_loads(tmp_path, capsys):
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    for target, message in ((tmp_path / "link", "is a symlink"),
                            (tmp_path / "no" / "c.json", "does not exist"),
                            (tmp_path, "is a directory")):
        assert cli.main(["calibrate", "--switches", "-o", str(target)]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
