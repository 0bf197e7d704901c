"""The statistics core: histogram accuracy against numpy, grouping, budget, gaps, filters."""
from __future__ import annotations

import math
import random
from fractions import Fraction

import numpy as np
import pytest

from tracer.model.schema import COLUMNS, SwitchRecord
from tracer.model.stats import (EXACT_LIMIT, MAX_VALUE, RELATIVE_ERROR, GroupKey, Histogram, Stats,
                          bucket_bounds, bucket_index, bucket_indices, bucket_value)


def rec(seq=0, pf=0, src=0, dst=1, switch=1000, revoke=None, grant=None, **kw) -> SwitchRecord:
    revoke = switch // 2 if revoke is None else revoke
    grant = switch - revoke if grant is None else grant
    values = dict.fromkeys(COLUMNS, 0)
    values.update(seq=seq, t_ns=seq * 1000, pf=pf, from_vf=src, to_vf=dst,
                  switch_ns=switch, revoke_ns=revoke, grant_ns=grant, **kw)
    return SwitchRecord(**values)


# --- histogram ---------------------------------------------------------------------------

def test_every_bucket_reports_within_the_brief_and_the_stated_error():
    """Over the whole range, the value reported for a bucket is within 0.1% (the brief)
    and within RELATIVE_ERROR (what the module states) of every value the bucket holds:
    its lowest and highest are the worst cases."""
    worst = 0.0
    for i in range(bucket_index(MAX_VALUE) + 1):
        low, high = bucket_bounds(i)
        value = bucket_value(i)
        assert low <= value <= high, i
        if low:
            worst = max(worst, (value - low) / low, (high - value) / high)
    assert worst <= RELATIVE_ERROR
    assert worst <= 0.001
    assert bucket_bounds(bucket_index(MAX_VALUE))[1] == MAX_VALUE    # the range is covered


@pytest.mark.parametrize("value", [0, 1, 2047, 2048, 2049, 4095, 4096, 123456789,
                                   2**53 - 1, 2**53, 2**53 + 1, MAX_VALUE])
def test_bucket_contains_value_and_vector_agrees(value):
    i = bucket_index(value)
    low, high = bucket_bounds(i)
    assert low <= value <= high
    assert int(bucket_indices(np.array([value]))[0]) == i
    if value:
        assert abs(bucket_value(i) - value) / value <= RELATIVE_ERROR


def test_vector_bucket_at_every_power_of_two_edge():
    # float64 rounds 2**k - 1 up to 2**k above 2**53: the vector path must not follow it
    edges = [v for k in range(1, 63) for v in (2**k - 1, 2**k, 2**k + 1) if v <= MAX_VALUE]
    edges += [2**k - d for k in range(54, 63)
              for d in range(1, 2**(k - 52), 2**(k - 52) // 64 + 1)]
    assert bucket_indices(np.array(edges)).tolist() == [bucket_index(v) for v in edges]


def test_buckets_are_contiguous_and_exact_below_limit():
    for i in range(EXACT_LIMIT + 5 * 1024):
        low, high = bucket_bounds(i)
        nxt, _ = bucket_bounds(i + 1)
        assert nxt == high + 1
        if i < EXACT_LIMIT:
            assert low == high == i


def test_vector_bucket_matches_scalar_on_random_values():
    rng = np.random.default_rng(7)
    values = np.concatenate([rng.integers(0, 2**62, 5000), rng.integers(0, 10**6, 5000)])
    vector = bucket_indices(values).tolist()
    assert vector == [bucket_index(v) for v in values.tolist()]


def nearest_rank(data: np.ndarray, p: float) -> int:
    """The order statistic of rank ceil(p% of n), in exact arithmetic: numpy's
    ``inverted_cdf`` is the same definition, but its float p*n (199800.00000000003 for
    99.9% of 200000) can land one rank higher, on a different value in a heavy tail."""
    rank = max(1, math.ceil(Fraction(str(p)) / 100 * data.size))
    return int(np.sort(data)[rank - 1])


DISTRIBUTIONS = {
    "uniform": lambda rng, n: rng.integers(1, 5_000_000, n),
    "lognormal": lambda rng, n: rng.lognormal(10, 1.5, n).astype(np.int64) + 1,
    "pareto": lambda rng, n: ((rng.pareto(1.2, n) + 1) * 800).astype(np.int64),
    "bimodal": lambda rng, n: np.where(rng.random(n) < 0.9, rng.normal(20_000, 500, n),
                                       rng.normal(3_000_000, 200_000, n)).astype(np.int64),
    "small_exact": lambda rng, n: rng.integers(0, 3000, n),
}


@pytest.mark.parametrize("name", DISTRIBUTIONS)
def test_percentiles_against_numpy(name):
    rng = np.random.default_rng(list(DISTRIBUTIONS).index(name))
    data = np.clip(DISTRIBUTIONS[name](rng, 200_000), 0, None)
    h = Histogram()
    for chunk in np.array_split(data, 7):       # several batches: the window grows
        h.add_array(chunk)
    ps = [0.1, 1, 50, 90, 99, 99.9, 99.99, 100]
    got = h.percentiles(ps)
    # Same definition (nearest rank): within the stated error.
    for p, g in zip(ps, got):
        w = nearest_rank(data, p)
        assert abs(g - w) <= RELATIVE_ERROR * w, (name, p, g, w)
    # numpy's default (linear) lies between neighbouring order statistics; so must we.
    lower = np.percentile(data, ps, method="lower")
    higher = np.percentile(data, ps, method="higher")
    for g, lo, hi in zip(got, lower, higher):
        assert lo * (1 - RELATIVE_ERROR) - 1 <= g <= hi * (1 + RELATIVE_ERROR) + 1
    assert h.min == data.min() and h.max == data.max() and h.total == data.size


def test_histogram_merge_equals_single_histogram():
    rng = np.random.default_rng(3)
    a, b = rng.integers(100, 10**5, 1000), rng.integers(10**7, 10**9, 1000)
    one, left, right = Histogram(), Histogram(), Histogram()
    one.add_array(np.concatenate([a, b]))
    left.add_array(a)
    right.add_array(b)
    left.merge(right)
    ps = [1, 50, 99, 100]
    assert left.percentiles(ps) == one.percentiles(ps)
    assert (left.total, left.min, left.max) == (one.total, one.min, one.max)


def test_empty_histogram():
    h = Histogram()
    assert h.percentiles([50]) == [None]
    assert h.count_above(0) == 0


# --- Stats -------------------------------------------------------------------------------

def test_grouping_on_hand_built_records():
    recs = [
        rec(0, pf=0, src=-1, dst=1, switch=100, kvm_exits=2, blocked_accesses=1),
        rec(1, pf=0, src=1, dst=2, switch=200, kvm_exits=4, unmap_calls=3, unmap_bytes=4096),
        rec(2, pf=0, src=2, dst=1, switch=300, vcpu_kicks=6, map_calls=1, map_bytes=8192),
        rec(3, pf=0, src=1, dst=2, switch=400, blocked_ns=1000),
        rec(0, pf=1, src=0, dst=1, switch=1000),
    ]
    s = Stats(budget_ns=250)
    s.add_many(recs)
    snap = s.snapshot()
    assert snap.records == 5
    assert snap.overall.count == 5
    assert snap.overall.switch.min == 100 and snap.overall.switch.max == 1000
    assert snap.overall.switch.mean == pytest.approx(400)
    assert [(g.key.pf, g.count) for g in snap.per_pf] == [(0, 4), (1, 1)]
    assert [(g.key.pf, g.key.to_vf, g.count) for g in snap.per_vf] == \
        [(0, 1, 2), (0, 2, 2), (1, 1, 1)]
    pairs = {(g.key.pf, g.key.from_vf, g.key.to_vf): g for g in snap.per_pair}
    assert set(pairs) == {(0, -1, 1), (0, 1, 2), (0, 2, 1), (1, 0, 1)}
    one_two = pairs[(0, 1, 2)]
    assert one_two.count == 2
    assert one_two.switch.p50 == 200 and one_two.switch.max == 400
    assert one_two.exits_per_switch == pytest.approx(2.0)
    assert one_two.unmap_calls_per_switch == pytest.approx(1.5)
    assert one_two.unmap_bytes_per_switch == pytest.approx(2048)
    assert one_two.blocked_ns_per_switch == pytest.approx(500)
    pf0 = snap.per_pf[0]
    assert pf0.exits_per_switch == pytest.approx(6 / 4)
    assert pf0.kicks_per_switch == pytest.approx(6 / 4)
    assert pf0.blocked_per_switch == pytest.approx(1 / 4)
    assert pf0.map_calls_per_switch == pytest.approx(1 / 4)
    assert pf0.map_bytes_per_switch == pytest.approx(8192 / 4)
    assert pf0.revoke.mean == pytest.approx(125)       # switch // 2 each: 50,100,150,200
    assert pf0.grant.mean == pytest.approx(125)
    assert pairs[(0, -1, 1)].key.label == "pf0/none->1"
    assert snap.per_vf[0].key == GroupKey("vf", 0, None, 1)
    # over budget (> 250): 300, 400 on pf0 and 1000 on pf1
    assert snap.overall.over_budget == 3
    assert snap.overall.over_budget_share == pytest.approx(3 / 5)
    assert snap.per_pf[0].over_budget_share == pytest.approx(2 / 4)


def test_overall_equals_all_records_in_one_histogram():
    rng = random.Random(5)
    recs = [rec(i, pf=i % 3, src=rng.randrange(-1, 4), dst=rng.randrange(4),
                switch=int(rng.paretovariate(1.1) * 1000)) for i in range(50_000)]
    s = Stats()
    for r in recs:
        s.add(r)
    snap = s.snapshot()
    data = np.array([r.switch_ns for r in recs])
    for p, got in zip((50, 90, 99, 99.9), (snap.overall.switch.p50, snap.overall.switch.p90,
                                          snap.overall.switch.p99, snap.overall.switch.p999)):
        want = nearest_rank(data, p)
        assert abs(got - want) <= RELATIVE_ERROR * want
    assert sum(g.count for g in snap.per_pair) == sum(g.count for g in snap.per_pf) == 50_000


def test_over_budget_exact_and_after_set_budget():
    rng = np.random.default_rng(11)
    values = rng.integers(0, 2000, 30_000).tolist()   # the exact range of the histogram
    s = Stats(budget_ns=1000)
    s.add_many(rec(i, switch=v) for i, v in enumerate(values))
    assert s.snapshot().overall.over_budget == sum(v > 1000 for v in values)
    for budget in (0, 1, 500, 1999, 5000):
        s.set_budget(budget)
        snap = s.snapshot()
        assert snap.budget_ns == budget
        assert snap.overall.over_budget == sum(v > budget for v in values), budget
    # records added after a change are judged against the new budget
    s.set_budget(10)
    s.add_many([rec(99_999, switch=11), rec(99_998, switch=10)])
    assert s.snapshot().overall.over_budget == sum(v > 10 for v in values) + 1


def test_set_budget_on_wide_buckets_errs_only_near_the_budget():
    rng = np.random.default_rng(12)
    values = rng.lognormal(12, 1, 40_000).astype(np.int64).tolist()
    s = Stats(budget_ns=10**9)
    s.add_many(rec(i, switch=v) for i, v in enumerate(values))
    for budget in (50_000, 163_840, 400_001):
        s.set_budget(budget)
        got = s.snapshot().overall.over_budget
        want = sum(v > budget for v in values)
        near = sum(abs(v - budget) <= budget * 2 * RELATIVE_ERROR for v in values)
        assert abs(got - want) <= near, (budget, got, want, near)
    # a budget at a bucket's top edge splits nothing: exact
    _, high = bucket_bounds(bucket_index(163_840))
    s.set_budget(high)
    assert s.snapshot().overall.over_budget == sum(v > high for v in values)


def test_seq_gaps_per_pf_out_of_order_is_not_loss():
    s = Stats()
    s.add_many([rec(seq, pf=0) for seq in (3, 1, 2, 5, 4)])           # shuffled, complete
    s.add_many([rec(seq, pf=1) for seq in (10, 11, 15, 17)])          # 12,13,14,16 missing
    assert s.seq_gaps() == {0: 0, 1: 4}
    snap = s.snapshot()
    assert snap.seq_gaps == {0: 0, 1: 4} and snap.seq_gaps_total == 4
    s.add(rec(6, pf=0))
    s.add(rec(9, pf=0))
    assert s.seq_gaps()[0] == 2


def test_filters_drop_other_records_but_keep_seq_accounting():
    recs = [rec(0, pf=0, src=1, dst=2), rec(1, pf=0, src=2, dst=3), rec(2, pf=0, src=3, dst=4),
            rec(0, pf=1, src=1, dst=2)]
    s = Stats(pfs={0}, vfs={2})
    s.add_many(recs)
    snap = s.snapshot()
    assert snap.records == 2 and snap.ignored == 2
    assert {(g.key.from_vf, g.key.to_vf) for g in snap.per_pair} == {(1, 2), (2, 3)}
    assert [g.key.pf for g in snap.per_pf] == [0]
    assert snap.seq_gaps == {0: 0}        # the VF filter's gaps are not loss
    assert snap.filters == {"pfs": [0], "vfs": [2]}


def test_reset_forgets_everything():
    s = Stats()
    s.add_many([rec(i) for i in range(10)])
    s.reset()
    snap = s.snapshot()
    assert snap.records == 0 and snap.overall.count == 0 and snap.per_pair == []
    assert snap.overall.switch.p99 is None and snap.seq_gaps == {}


def test_rate_over_sliding_window():
    s = Stats(rate_window_s=5.0)
    assert s.rate(now=100.0) == 0.0
    for i in range(100):
        s.add(rec(i), now=100.0 + i * 0.01)          # 100 records in 1 s
    assert s.rate(now=101.0) == pytest.approx(100.0)
    s.add_many([rec(1000 + i) for i in range(400)], now=103.0)
    assert s.rate(now=104.9) == pytest.approx(500 / 4.9, rel=0.01)
    assert s.rate(now=107.05) == pytest.approx(400 / 5.0)   # the first second fell out
    assert s.rate(now=200.0) == 0.0


def test_memory_is_bounded_by_groups_not_records():
    s = Stats()
    rng = np.random.default_rng(1)
    values = rng.integers(1000, 1_000_000, 100_000).tolist()
    s.add_many(rec(i, switch=v) for i, v in enumerate(values))
    first = s.memory_bytes()
    s.add_many(rec(i, switch=v) for i, v in enumerate(values, start=100_000))
    assert s.memory_bytes() == first
    assert s.records == 200_000


def test_add_folds_in_batches_and_readout_sees_pending():
    s = Stats()
    s.add(rec(0, switch=777))
    assert s.snapshot().overall.switch.max == 777      # not waiting for a full batch


def test_snapshot_to_dict_is_plain():
    s = Stats()
    s.add(rec(0))
    d = s.snapshot().to_dict()
    assert d["overall"]["count"] == 1 and d["overall"]["key"]["level"] == "all"
    assert math.isclose(d["overall"]["switch"]["mean"], 1000)


def test_garbage_u64_values_are_clamped_not_fatal():
    s = Stats()
    s.add_many([rec(0, switch=2**64 - 5, revoke=0, grant=0), rec(1, switch=-3, revoke=0, grant=0),
                rec(2, switch=500)])
    snap = s.snapshot()
    assert snap.records == 3
    assert snap.overall.switch.max == MAX_VALUE and snap.overall.switch.min == 0
    assert snap.overall.switch.p50 == 500
