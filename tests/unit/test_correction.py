"""The correction arithmetic (tracer/model/correction.py) and its uncertainty."""
from __future__ import annotations

import math

import numpy as np
import pytest

from tracer.model.correction import (CORRECTED_COLUMNS, Correction, Cost, HIT_COLUMNS,
                                     bookends_corrected)
from tracer.model.schema import SwitchRecord

META = {
    "switch_source": "pf_sched",
    "probe_modes": {"iommu_map": "fentry", "iommu_unmap": "kprobe"},
    "floor_ns": {"function": "security_task_getsid",
                 "fentry": {"median_ns": 100, "p10_ns": 80, "p90_ns": 140},
                 "kprobe": {"median_ns": 300, "p10_ns": 200, "p90_ns": 400}},
    "probe_costs": {"types": ["fentry", "kprobe", "entry"],
                    "fentry": {"median_ns": 1000, "p10_ns": 900, "p90_ns": 1300},
                    "kprobe": {"median_ns": 2000, "p10_ns": 1500, "p90_ns": 2500},
                    "entry": {"median_ns": 500, "p10_ns": 500, "p90_ns": 500}},
}


def rec(**kw) -> SwitchRecord:
    base = dict.fromkeys(SwitchRecord.__dataclass_fields__, 0)
    base.update(kw)
    return SwitchRecord(**base)


def test_no_costs_in_meta_means_no_correction():
    assert Correction.from_meta({}) is None
    assert Correction.from_meta(None) is None
    assert Correction.from_meta({"probe_costs": "junk"}) is None


def test_a_listed_type_without_a_cost_means_no_correction():
    meta = {**META, "probe_costs": {"types": ["fentry", "kprobe"],
                                    "fentry": {"median_ns": 1000}}}
    assert Correction.from_meta(meta) is None


def test_no_hit_types_corrects_with_nothing_to_take_off():
    c = Correction.from_meta({"probe_costs": {"types": []}})
    r = rec(switch_ns=5000, revoke_ns=3000, grant_ns=2000)
    assert c.values(r)[:6] == (5000, 0, 3000, 0, 2000, 0)


def test_switch_takes_source_ns_then_the_hits_off():
    c = Correction.from_meta(META)
    r = rec(switch_ns=20_000, source_ns=15_000, fentry_hits=2, kprobe_hits=1, entry_hits=2)
    corr, err = c.values(r)[:2]
    assert corr == 15_000 - (2 * 1000 + 2000 + 2 * 500)
    # half spreads 200, 500, 0: hits x half spread, in quadrature
    assert err == round(math.hypot(2 * 200, 500))


def test_without_source_ns_the_window_is_the_base():
    c = Correction.from_meta({**META, "switch_source": "func:x"})
    r = rec(switch_ns=20_000, fentry_hits=1)
    assert c.values(r)[0] == 19_000
    assert not bookends_corrected({"switch_source": "func:x"})
    assert bookends_corrected(META)


def test_grant_takes_only_the_map_calls_off_and_revoke_the_rest():
    c = Correction.from_meta(META)
    # map is fentry: its 1 call is 1 fentry hit in the grant; the kprobe (unmap) and
    # entry hits are the revoke's
    r = rec(switch_ns=30_000, source_ns=0, revoke_ns=20_000, grant_ns=10_000, map_calls=1,
            unmap_calls=1, fentry_hits=1, kprobe_hits=1, entry_hits=1)
    v = dict(zip(CORRECTED_COLUMNS, c.values(r)))
    assert v["grant_corr_ns"] == 10_000 - 1000 and v["grant_corr_err_ns"] == 200
    assert v["revoke_corr_ns"] == 20_000 - 2000 - 500
    assert v["revoke_corr_err_ns"] == 500
    assert v["switch_corr_ns"] == v["revoke_corr_ns"] + v["grant_corr_ns"]


def test_calls_take_their_mode_floor_off():
    c = Correction.from_meta(META)
    r = rec(unmap_calls=2, unmap_ns=5000, map_calls=1, map_ns=3000)
    v = dict(zip(CORRECTED_COLUMNS, c.values(r)))
    assert v["unmap_corr_ns"] == 5000 - 2 * 300 and v["unmap_corr_err_ns"] == 2 * 100
    assert v["map_corr_ns"] == 3000 - 100 and v["map_corr_err_ns"] == 30


def test_an_overcorrection_stays_negative_not_clamped():
    c = Correction.from_meta(META)
    assert c.values(rec(switch_ns=100, kprobe_hits=1))[0] == 100 - 2000


def test_arrays_agree_with_values():
    c = Correction.from_meta(META)
    rng = np.random.default_rng(1)
    recs = [rec(switch_ns=int(s), source_ns=int(src), fentry_hits=int(f), kprobe_hits=int(k),
                entry_hits=int(e))
            for s, src, f, k, e in zip(rng.integers(1000, 10**6, 200),
                                       rng.choice([0, 5000, 70_000], 200),
                                       *rng.integers(0, 9, (3, 200)))]
    cols = {n: np.array([getattr(r, n) for r in recs])
            for n in ("switch_ns", "source_ns", *HIT_COLUMNS)}
    corr, err = c.switch_arrays(cols)
    assert [c.values(r)[0] for r in recs] == [round(x) for x in corr]
    assert [c.values(r)[1] for r in recs] == [round(x) for x in err]


@pytest.mark.parametrize("entry", [None, {}, {"median_ns": "x"}, {"median_ns": float("nan")}])
def test_bad_cost_entries_are_no_cost(entry):
    assert Cost.of(entry) is None


def test_an_old_capture_loads_everywhere_uncorrected(tmp_path, capsys):
    """tests/data/small.csv predates the hit columns and probe costs: the report, the
    export and the replay dashboard's reader take it, and say it is not corrected."""
    import json
    from pathlib import Path
    from tracer.cli import main
    from tracer.capture.files import read_capture
    from tui.sources import ReplaySource
    small = Path(__file__).resolve().parents[1] / "data" / "small.csv"
    meta, recs, _ = read_capture(small)
    assert Correction.from_meta(meta) is None
    assert all(r.fentry_hits == r.kprobe_hits == r.entry_hits == 0 for r in recs)
    assert main(["report", str(small), "--json"]) == 0
    cap = json.loads(capsys.readouterr().out)["captures"][0]
    assert cap["own_cost"] is None and cap["rows"][0]["p50_corrected"] is None
    assert main(["export", str(small), "--parquet", str(tmp_path / "s.parquet"),
                 "--perfetto", str(tmp_path / "s.json")]) == 0
    source = ReplaySource(small, speed=0)
    assert source.start().meta == meta
