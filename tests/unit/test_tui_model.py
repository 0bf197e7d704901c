"""The dashboard's model without Textual: bounded record store, filter rebuilds, guest rates."""
from __future__ import annotations

import numpy as np
import pytest

from tests.unit.tui_support import SMALL
from tracer.capture.files import read_capture
from tracer.model.schema import CallRecord
from tracer.model.stats import Stats
from tui.app import parse_id_list, parse_ns
from tui.guests import GuestModel
from tui.model import DashboardModel
from tui.sources import Batch
from tui.store import RecordStore, to_records, to_rows

META, ROWS, _ = read_capture(SMALL)


def test_the_store_keeps_the_newest_and_counts_what_it_let_go():
    store = RecordStore(max_records=1000)
    for start in range(0, 2500, 300):
        store.append(to_rows(ROWS[start:min(start + 300, 2500)]))
    assert store.count == 1000 and store.dropped == 1500
    assert to_records(store.rows()) == ROWS[1500:2500]
    newest = store.newest(5, pfs={1})
    assert [r.seq for r in to_records(newest)] == [r.seq for r in reversed(
        [r for r in ROWS[1500:2500] if r.pf == 1])][:5]


def test_a_filter_rebuild_equals_statistics_fed_with_that_filter_from_the_start():
    model = DashboardModel(100)
    model.fold(Batch(switches=ROWS), now=1.0)
    model.set_filters({0}, {2}, now=1.0)
    fresh = Stats(100, pfs={0}, vfs={2})
    fresh.add_many(ROWS, now=1.0)
    got, want = model.snapshot(1.0), fresh.snapshot(1.0)
    assert got.records == want.records > 0
    assert got.per_vf == want.per_vf and got.seq_gaps == want.seq_gaps
    assert model.hist.total == got.records             # the plot shows the same records


def test_guest_rates_from_cumulative_totals_are_differences_over_the_clock():
    guests = GuestModel("svm")

    def totals(count_out, count_in):
        return {"kvm_exits": [
            {"pid": 9, "vcpu": 1, "reason": 0x78, "in_window": False, "count": count_out, "ns": 5},
            {"pid": 9, "vcpu": 1, "reason": 0x78, "in_window": True, "count": count_in, "ns": 1}]}

    guests.set_totals(totals(100, 10), now=10.0)
    [row] = guests.exit_rows()
    assert (row.reason, row.total, row.in_window, row.rate) == ("HLT", 110, 10, None)
    guests.set_totals(totals(160, 30), now=12.0)
    [row] = guests.exit_rows()
    assert row.total == 190 and row.in_window == 30 and row.rate == pytest.approx(40.0)


def test_guest_rates_from_call_rows_use_trace_time():
    guests = GuestModel("vmx")
    second = 1_000_000_000
    calls = [CallRecord("kvm_exit", 50 * second + i * second // 100, 700, 12, 7, 0,
                        5 if i % 4 == 0 else None, vcpu=i % 2) for i in range(300)]
    calls.append(CallRecord("vfio_map_dma", 51 * second, 4000, 4096, 7, 0, None))
    guests.add_calls(calls)
    rows = {(r.vcpu, r.reason): r for r in guests.exit_rows()}
    assert set(rows) == {(0, "HLT"), (1, "HLT")}
    assert sum(r.total for r in rows.values()) == 300
    assert sum(r.in_window for r in rows.values()) == 75
    # 300 exits over the 3 s of trace time they span: 100/s in all.
    assert sum(r.rate for r in rows.values()) == pytest.approx(300 / 2.99, rel=0.01)
    [vfio] = guests.vfio_rows()
    assert vfio.kind == "vfio_map_dma" and vfio.count == 1 and vfio.max == 4000


@pytest.mark.parametrize("text, ns", [("500", 500), ("500ns", 500), ("1.5us", 1500),
                                      ("2ms", 2_000_000), (" 3 s ", 3_000_000_000)])
def test_budget_text(text, ns):
    assert parse_ns(text) == ns


@pytest.mark.parametrize("text", ["", "fast", "-5", "0", "1.5.2us"])
def test_bad_budget_text(text):
    with pytest.raises(ValueError):
        parse_ns(text)


def test_id_lists():
    assert parse_id_list(" ", "PF") is None
    assert parse_id_list("0, 2,2", "PF") == {0, 2}
    with pytest.raises(ValueError, match="PF 'x'"):
        parse_id_list("1,x", "PF")


def test_rows_round_trip_and_clamp_garbage():
    rows = to_rows(ROWS[:10])
    assert rows.dtype == np.int64 and to_records(rows) == ROWS[:10]
    bad = to_records(rows[:1])[0]
    bad.switch_ns = 2 ** 64 - 5                          # a u64 from a negative difference
    assert to_rows([bad])[0, 6] > 0
