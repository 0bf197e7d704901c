"""The end-of-run table, the ns formatter and the progress line."""
from __future__ import annotations

import pytest

from tracer.model.schema import COLUMNS, SwitchRecord
from tracer.model.stats import Stats
from tracer.model.units import fmt_ns, fmt_rate
from tracer.record.summary import HEADER, format_summary, progress_line


def rec(seq, pf=0, src=0, dst=1, switch=1000, **kw) -> SwitchRecord:
    values = dict.fromkeys(COLUMNS, 0)
    values.update(seq=seq, pf=pf, from_vf=src, to_vf=dst, switch_ns=switch,
                  revoke_ns=switch // 4, grant_ns=switch - switch // 4, **kw)
    return SwitchRecord(**values)


@pytest.mark.parametrize("ns, text", [
    (0, "0ns"), (812, "812ns"), (999, "999ns"), (1000, "1.00us"), (12_345, "12.3us"),
    (123_456, "123us"), (999_999, "1.00ms"), (1_523_000, "1.52ms"), (45_600_000, "45.6ms"),
    (2_050_000_000, "2.05s"), (3_600_000_000_000, "3600s"), (812.4, "812ns"),
    (None, "-"), (-1500, "-1.50us"),
])
def test_fmt_ns(ns, text):
    assert fmt_ns(ns) == text


def test_fmt_rate():
    assert fmt_rate(950) == "950/s"
    assert fmt_rate(201_300) == "201.3k/s"
    assert fmt_rate(2_500_000) == "2.50M/s"


def two_pf_stats(pf1_seqs=(0, 1, 2)) -> Stats:
    s = Stats(budget_ns=100_000)
    s.add_many([rec(i, pf=0, src=i % 2, dst=(i + 1) % 2, switch=50_000 + i * 1000,
                    kvm_exits=3, blocked_accesses=2) for i in range(100)])
    s.add_many([rec(i, pf=1, src=-1, dst=4, switch=2_000_000) for i in pf1_seqs])
    return s


def test_summary_table_rows_and_columns():
    snap = two_pf_stats().snapshot()
    text = format_summary(snap, {"lost_total": 0, "lost_records_per_cpu": {},
                                 "switch_source": "pf_sched"})
    lines = text.splitlines()
    assert "VF switches: 103" in lines[0] and "budget: 100us" in lines[0]
    assert "lost records: 0" in lines[0] and "source: pf_sched" in lines[0]
    header = next(line for line in lines if line.startswith("GROUP"))
    assert header.split() == list(HEADER)
    body = lines[lines.index(header) + 1:]
    labels = [line.split()[0] for line in body]
    assert labels == ["all", "pf0", "pf1", "pf0/vf0", "pf0/vf1", "pf1/vf4",
                      "pf0/0->1", "pf0/1->0", "pf1/none->4"]
    assert all(len(line.split()) == len(HEADER) for line in body)
    # overall, 2 PFs, 3 PF/VF groups, 3 pairs
    assert len(body) == 1 + 2 + 3 + 3
    rows = {line.split()[0]: dict(zip(HEADER, line.split())) for line in body}
    all_row = rows["all"]
    assert all_row["COUNT"] == "103"
    assert all_row["MAX"] == "2.00ms"
    # >budget: 50 of pf0 (i>=51 -> 101us..149us) + 3 of pf1 = 52 of 103
    over = sum(50_000 + i * 1000 > 100_000 for i in range(100)) + 3
    assert all_row[">BUDGET"] == f"{100 * over / 103:.2f}%"
    pf1 = rows["pf1"]
    assert pf1["COUNT"] == "3" and pf1["P50"] == "2.00ms" and pf1[">BUDGET"] == "100.00%"
    assert pf1["REVOKE"] == "500us" and pf1["GRANT"] == "1.50ms"    # mean revoke / grant
    pf0 = rows["pf0"]
    # KVM exits and blocked guest accesses per switch: counts, as in the report
    assert pf0["EXITS/SW"] == "3.00" and pf0["BLOCKED/SW"] == "2.00"
    assert "WARNING" not in text


def test_warning_on_lost_records_and_seq_gaps():
    snap = two_pf_stats(pf1_seqs=(0, 1, 5)).snapshot()      # 2, 3, 4 missing
    text = format_summary(snap, {"lost_total": 7, "lost_records_per_cpu": {0: 7, 1: 0}})
    warning = next(line for line in text.splitlines() if line.startswith("WARNING"))
    assert "7 records lost (per CPU 0:7)" in warning
    assert "3 seq gaps (pf1:3)" in warning
    assert "lost records: 7" in text.splitlines()[0]
    assert "paused" not in text                     # a capture from before reader_gaps


def test_a_lossy_run_says_how_long_its_reader_paused():
    snap = two_pf_stats().snapshot()
    gaps = {"longest_s": 4.257, "longest_at_s": 312.4, "over_1s": 3}
    text = format_summary(snap, {"lost_total": 9, "reader_gaps": gaps})
    warning = next(line for line in text.splitlines() if line.startswith("WARNING"))
    assert "the reader paused up to 4.26 s at 312 s (3 pauses over 1 s)" in warning
    assert "paused" not in format_summary(snap, {"lost_total": 0, "reader_gaps": gaps})


def test_single_pf_does_not_repeat_overall():
    s = Stats()
    s.add_many([rec(i, src=0, dst=1) for i in range(10)])
    lines = format_summary(s.snapshot()).splitlines()
    body = lines[lines.index(next(x for x in lines if x.startswith("GROUP"))) + 1:]
    assert [x.split()[0] for x in body] == ["all", "pf0/0->1"]


def test_empty_run_and_filters_line():
    s = Stats(pfs={3})
    s.add(rec(0, pf=0))
    text = format_summary(s.snapshot())
    assert "no switches recorded" in text
    assert "filtered out: 1 records (pfs=3)" in text


def test_progress_line():
    s = Stats()
    for i in range(300):
        s.add(rec(i), now=10.0 + i / 100)
    assert progress_line(s, {0: 2, 1: 3}, now=13.0) == "records 300  rate 100/s  lost 5"
    assert progress_line(s, 0, now=13.0).endswith("lost 0")
