"""One group-table column spec (``tracer.model.group_columns``): the end-of-run summary,
the report and the dashboard pick from it, and a header reads the same quantity, in the
same unit and format, in all of them."""
from __future__ import annotations

import pytest

from tests.unit.tui_support import SIZE, SMALL, FrozenClock, caught_up, run_async, table_rows
from tests.unit.test_summary import rec
from tracer.capture.files import iter_capture, read_meta
from tracer.model import group_columns as gc
from tracer.model.stats import Stats
from tracer.model.units import fmt_ns
from tracer.record import summary
from tracer.report import tables
from tracer.report.load import load_capture
from tui import model as dashboard
from tui.app import VftraceApp
from tui.sources import ReplaySource

BY_HEADER = {c.header: c for c in gc.GROUP_COLUMNS}


def expected(groups) -> dict[str, dict[str, str]]:
    """Group label -> header -> the spec's cell."""
    return {g.key.label: {c.header: c.cell(g) for c in gc.GROUP_COLUMNS} for g in groups}


def parsed(lines: list[str]) -> tuple[list[str], dict[str, dict[str, str]]]:
    """A text table's header and its rows by group label (cells hold no spaces)."""
    header = lines[0].split()
    return header, {line.split()[0]: dict(zip(header, line.split())) for line in lines[1:]}


def text_table(text: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("GROUP"))
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    return lines[start:end]


def small_snapshot(budget_ns: int):
    s = Stats(budget_ns=budget_ns)
    s.add_many(iter_capture(SMALL))
    return s.snapshot()


def test_names_and_headers_are_unique_and_each_header_says_one_thing():
    assert len({c.name for c in gc.GROUP_COLUMNS}) == len(gc.GROUP_COLUMNS)
    assert len(BY_HEADER) == len(gc.GROUP_COLUMNS)


def test_a_count_per_switch_and_a_time_per_switch_have_their_own_headers():
    s = Stats(budget_ns=1000)
    s.add_many([rec(i, kvm_exits=3, exit_ns=4500, blocked_accesses=2 + i % 2,
                    blocked_ns=1500) for i in range(4)])
    cells = {c.header: c.cell(s.snapshot().overall) for c in gc.GROUP_COLUMNS}
    assert cells["EXITS/SW"] == "3.00" and cells["EXIT_T/SW"] == "4.50us"
    assert cells["BLOCKED/SW"] == "2.50" and cells["BLOCK_T/SW"] == "1.50us"
    assert all(h.endswith("_T/SW") == (BY_HEADER[h].fmt is fmt_ns)
               for h in BY_HEADER if h.endswith("/SW"))


def test_every_front_end_picks_from_the_spec_in_its_order():
    for columns in (summary.COLUMNS, tables.COLUMNS, dashboard.GROUP_COLUMNS):
        assert all(c in gc.GROUP_COLUMNS for c in columns)
        order = [gc.GROUP_COLUMNS.index(c) for c in columns]
        assert order == sorted(order)
    with pytest.raises(ValueError, match="order"):
        gc.pick("max", "p50")
    with pytest.raises(KeyError, match="nope"):
        gc.pick("group", "nope")


def test_the_summary_shows_the_spec_cells():
    snap = small_snapshot(read_meta(SMALL)["budget_ns"])
    header, rows = parsed(text_table(summary.format_summary(snap)))
    assert tuple(header) == summary.HEADER
    want = expected(gc.table_groups(snap))
    assert rows.keys() == want.keys()
    for label, cells in rows.items():
        assert cells == {h: want[label][h] for h in header}


def test_the_report_shows_the_spec_cells():
    cap = load_capture(SMALL)
    header, rows = parsed(text_table(tables.render_text([cap])))
    assert tuple(header) == tables.HEADER
    want = expected(gc.table_groups(cap.snapshot))
    assert rows.keys() == want.keys()
    for label, cells in rows.items():
        assert cells == {h: want[label][h] for h in header}


def test_the_legend_explains_every_column_it_has_to():
    legend = tables.LEGEND
    assert legend.startswith("P50..MAX: switch time; P50_CORR: switch time less vftrace's own "
                             "cost (± its uncertainty); OWN%: share of the switch time that was "
                             "vftrace's own; >BUDGET: share of switches over the budget")
    for c in tables.COLUMNS:
        assert not c.meaning or c.header in legend or c.header in ("P90", "P99", "P99.9")
    assert "BLOCK_T/SW: mean time per switch in guest accesses blocked" in legend


@run_async
async def test_the_dashboard_shows_the_spec_cells():
    app = VftraceApp(ReplaySource(SMALL, 0), clock=FrozenClock())
    async with app.run_test(size=SIZE) as pilot:
        await caught_up(pilot, app)
        header = list(app.w("groups").headers)
        assert header == [c.header for c in dashboard.GROUP_COLUMNS]
        want = expected(app.model.group_rows(app.model.snapshot(app.clock())))
        shown = {r[0]: dict(zip(header, r)) for r in table_rows(app, "groups")}
        assert shown and shown.keys() == want.keys()
        for label, cells in shown.items():
            assert cells == {h: want[label][h] for h in header}
        # a click on a header sorts by that column, named as the header
        assert dashboard.SORTS[-1][0] == "block_t/sw"
