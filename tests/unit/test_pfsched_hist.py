"""pf_sched's total_hist, read back: its buckets (the module's arithmetic, written again
here from kmod/pf_sched_main.c) and the quantiles taken from them against numpy's exact
ones on the same values.  The lab test checks the module's own file."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from tracer.pfsched import control

KMOD = Path(__file__).resolve().parents[2] / "kmod" / "pf_sched_main.c"
SUB_BITS, TOP = 4, 39


def bucket(v: int) -> int:
    """pf_hist_bucket(), as the C has it."""
    if v < 1 << SUB_BITS:
        return v
    e = v.bit_length() - 1
    buckets = (1 << SUB_BITS) + (TOP + 1 - SUB_BITS) * (1 << SUB_BITS)
    if e > TOP:
        return buckets - 1
    return (1 << SUB_BITS) + (e - SUB_BITS) * (1 << SUB_BITS) + ((v >> (e - SUB_BITS)) & 15)


def low(i: int) -> int:
    """pf_hist_low(), as the C has it."""
    if i < 1 << SUB_BITS:
        return i
    e = (i - 16) // 16 + SUB_BITS
    return (16 + (i - 16) % 16) << (e - SUB_BITS)


def test_the_constants_here_are_the_modules():
    src = KMOD.read_text()
    assert re.search(r"#define PF_HIST_SUB_BITS 4\b", src)
    assert re.search(rf"#define PF_HIST_TOP_BIT {TOP}\b", src)
    assert control.HIST_SUB == 1 << SUB_BITS


@pytest.mark.parametrize("v", [0, 1, 15, 16, 17, 31, 32, 33, 100, 1000, 123_456, 2**39 - 1])
def test_each_value_is_in_the_bucket_whose_low_and_width_hold_it(v):
    lo = low(bucket(v))
    assert control.hist_bucket_low(v) == lo
    assert lo <= v < lo + control.hist_width(lo)
    assert control.hist_width(lo) <= max(1, lo / 16)      # under 1/16 of its value


def hist_text(values) -> str:
    counts: dict[int, int] = {}
    for v in values:
        counts[bucket(int(v))] = counts.get(bucket(int(v)), 0) + 1
    return "# sub_buckets 16\n" + "".join(f"{low(i)} {n}\n" for i, n in sorted(counts.items()))


def test_quantiles_are_within_a_bucket_of_numpys():
    rng = np.random.default_rng(7)
    values = np.concatenate([rng.lognormal(np.log(30_000), 0.3, 5000),
                             rng.lognormal(np.log(90_000), 0.2, 500)]).astype(np.int64)
    hist = control.parse_hist(hist_text(values))
    assert sum(hist.values()) == len(values)
    for q in (0.1, 0.5, 0.9, 0.99):
        exact = float(np.quantile(values, q))
        got = control.hist_quantile(hist, q)
        assert abs(got - exact) <= exact / 16, (q, got, exact)
    assert control.hist_quantile({}, 0.5) is None


def test_a_delta_is_the_switches_between_two_reads_and_a_foreign_layout_is_refused():
    before = control.parse_hist(hist_text([100, 100, 5000]))
    after = control.parse_hist(hist_text([100, 100, 5000, 100, 7000]))
    assert control.hist_delta(after, before) == {low(bucket(100)): 1, low(bucket(7000)): 1}
    with pytest.raises(ValueError, match="8 sub-buckets"):
        control.parse_hist("# sub_buckets 8\n16 1\n")
