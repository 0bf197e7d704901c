"""Pilot tests of the dashboard: keys do what they say, on the shipped capture.

Expected figures are computed here from the capture's rows, independently of
``tracer.model.stats`` and of the dashboard.
"""
from __future__ import annotations

import json
import shutil
import time
from collections import Counter, defaultdict

import numpy as np
import pytest
from textual.command import CommandPalette
from textual.widgets import Input

from tests.unit.tui_support import (DATA, SIZE, SMALL, FedSource, FrozenClock, caught_up,
                                    group_counts, run_async, table_rows, wait_for)
from tracer.capture.files import iter_calls, read_capture
from tracer.model.units import fmt_ns
from tui.app import VftraceApp
from tui.model import GROUP_COLUMNS
from tui.sources import Batch, FollowSource, ReplaySource
from tui.widgets import HelpScreen

META, ROWS, _ = read_capture(SMALL)


def replay_app(path=SMALL, **kw) -> VftraceApp:
    return VftraceApp(ReplaySource(path, 0), clock=FrozenClock(), **kw)


def share_text(rows, budget: int) -> str:
    return f"{100 * sum(r.switch_ns > budget for r in rows) / len(rows):.2f}%"


@run_async
async def test_replay_fills_the_tables_with_the_captures_counts():
    app = replay_app()
    async with app.run_test(size=SIZE) as pilot:
        await caught_up(pilot, app)
        counts = group_counts(app)
    expected = Counter(f"pf{r.pf}/vf{r.to_vf}" for r in ROWS)
    expected.update(f"pf{r.pf}" for r in ROWS)
    expected["all"] = len(ROWS)
    assert counts == dict(expected)


@run_async
async def test_the_switches_panel_streams_the_newest_first_over_budget_in_red():
    newest = list(reversed(ROWS[-6:]))
    budget = sorted(r.switch_ns for r in newest)[3]          # some over it, some not
    app = replay_app(budget_ns=budget)
    async with app.run_test(size=SIZE) as pilot:
        await caught_up(pilot, app)
        shown = table_rows(app, "switches")
        panel = app.w("switches")
        text = panel.render()
    assert [int(r[0]) for r in shown[:6]] == [r.seq for r in newest]
    over = [r.switch_ns > budget for r in newest]
    assert panel.over[:6] == over and any(over) and not all(over)
    lines = text.plain.split("\n")[1:7]
    for line, is_over in zip(lines, over):
        assert ("red" in style_of(text, line)) == is_over, line


@run_async
async def test_p_pauses_the_tables_while_batches_keep_arriving():
    source = FedSource()
    app = VftraceApp(source, clock=FrozenClock())
    async with app.run_test(size=SIZE) as pilot:
        source.feed(Batch(switches=ROWS[:100]))
        await wait_for(pilot, lambda: group_counts(app).get("all") == 100, "first batch")
        await pilot.press("p")
        before = (table_rows(app, "switches"), table_rows(app, "groups"))
        source.feed(Batch(switches=ROWS[100:250]))
        await wait_for(pilot, lambda: app.model.seen == 250, "second batch folded")
        await pilot.pause(0.35)                       # several refresh ticks go by
        assert (table_rows(app, "switches"), table_rows(app, "groups")) == before
        assert "switches 100 " in app.header_lines[1].plain
        assert "PAUSED (+150 switches" in app.header_lines[1].plain
        await pilot.press("p")
        await wait_for(pilot, lambda: group_counts(app).get("all") == 250, "resumed view")
        assert int(table_rows(app, "switches")[0][0]) == ROWS[249].seq


@run_async
async def test_r_resets_the_counts():
    source = FedSource()
    app = VftraceApp(source, clock=FrozenClock())
    async with app.run_test(size=SIZE) as pilot:
        source.feed(Batch(switches=ROWS[:300]))
        await wait_for(pilot, lambda: group_counts(app).get("all") == 300, "first batch")
        await pilot.press("r")
        assert group_counts(app) == {} and table_rows(app, "switches") == []
        source.feed(Batch(switches=ROWS[300:340]))
        await wait_for(pilot, lambda: group_counts(app).get("all") == 40, "counted anew")


def gap_budget(rows) -> int:
    """A budget midway between two switch times 0.5% apart: no switch is in its
    histogram bucket (0.1% wide), so the core's split of a bucket cannot matter."""
    values = np.unique([r.switch_ns for r in rows])
    median = float(np.median(values))
    gaps = [(abs(values[i] - median), (int(values[i]) + int(values[i + 1])) // 2)
            for i in range(len(values) - 1)
            if values[i + 1] > values[i] * 1.005 and 0.01 < (i + 1) / len(values) < 0.99]
    assert gaps, "the capture has no usable gap"
    return min(gaps)[1]


@run_async
async def test_b_sets_the_budget_and_the_over_budget_share_follows():
    budget = gap_budget(ROWS)
    app = replay_app()
    async with app.run_test(size=SIZE) as pilot:
        await caught_up(pilot, app)
        over = [c.name for c in GROUP_COLUMNS].index("over_budget")
        assert table_rows(app, "groups")[0][over] == "100.00%"   # everything over 100 ns
        await pilot.press("b")
        await pilot.pause()
        app.screen.query_one("#budget", Input).value = str(budget)
        await pilot.press("enter")
        await pilot.pause()
        rows = {r[0]: r[over] for r in table_rows(app, "groups")}
    assert app.model.budget_ns == budget
    assert rows["all"] == share_text(ROWS, budget)
    for pf in (0, 1):
        assert rows[f"pf{pf}"] == share_text([r for r in ROWS if r.pf == pf], budget)


@run_async
async def test_a_bad_budget_is_refused_in_the_prompt():
    app = replay_app()
    async with app.run_test(size=SIZE) as pilot:
        await caught_up(pilot, app)
        await pilot.press("b")
        await pilot.pause()
        app.screen.query_one("#budget", Input).value = "fast"
        await pilot.press("enter")
        await pilot.pause()
        assert "give nanoseconds" in str(app.screen.query_one("#prompt-error").render())
        await pilot.press("escape")
        await pilot.pause()
        assert app.model.budget_ns == META["budget_ns"]


@run_async
async def test_f_filters_to_one_pf():
    app = replay_app()
    async with app.run_test(size=SIZE) as pilot:
        await caught_up(pilot, app)
        await pilot.press("f")
        await pilot.pause()
        app.screen.query_one("#pfs", Input).value = "1"
        await pilot.press("enter")
        await pilot.pause()
        counts = group_counts(app)
        shown_pfs = {row[1] for row in table_rows(app, "switches")}
        header = app.header_lines[1].plain
    pf1 = [r for r in ROWS if r.pf == 1]
    expected = Counter(f"pf1/vf{r.to_vf}" for r in pf1)
    expected.update({"all": len(pf1), "pf1": len(pf1)})
    assert counts == dict(expected)
    assert shown_pfs == {"1"} and "filter pf=1" in header


@run_async
async def test_a_click_on_a_header_sorts_by_it_and_the_arrows_scroll_under_a_fixed_header():
    app = replay_app()
    async with app.run_test(size=(120, 30)) as pilot:
        await caught_up(pilot, app)
        table = app.w("groups")
        start, _ = table._bounds[table.headers.index("MAX")]
        await pilot.click("#groups", offset=(start + 2, 0))
        await pilot.pause()
        assert app.model.sort_name == "max"
        await wait_for(pilot, lambda: table_rows(app, "groups")[1][0] != "pf0", "sorted rows")
        by_max = [r[0] for r in table_rows(app, "groups")]
        assert by_max[0] == "all" and by_max[1:] != sorted(by_max[1:])
        await pilot.click("#groups", offset=(1, 0))            # GROUP: back to the default
        await pilot.pause()
        assert app.model.sort_name == "group"
        assert table.size.height - 1 < table.row_count           # rows to scroll to
        app.set_focus(table)
        first = table.render_line(1).text
        for _ in range(3):
            await pilot.press("down")
        await pilot.pause()
        assert table.scroll_offset.y == 3
        assert table.render_line(0).text.split()[:2] == ["GROUP", "COUNT"]    # stays put
        assert table.render_line(1).text != first
        assert table.render_line(1).text.split()[0] == table_rows(app, "groups")[3][0]


@run_async
async def test_s_changes_the_row_order():
    app = replay_app()
    async with app.run_test(size=SIZE) as pilot:
        await caught_up(pilot, app)
        default = [r[0] for r in table_rows(app, "groups")]
        while app.model.sort_name != "max":
            await pilot.press("s")
        await pilot.pause()
        by_max = [r[0] for r in table_rows(app, "groups")]
    biggest = defaultdict(int)
    for r in ROWS:
        for label in (f"pf{r.pf}", f"pf{r.pf}/vf{r.to_vf}"):
            biggest[label] = max(biggest[label], r.switch_ns)
    pfs = sorted((k for k in biggest if "/" not in k), key=lambda k: -biggest[k])
    vfs = sorted((k for k in biggest if "/" in k), key=lambda k: -biggest[k])
    assert by_max == ["all", *pfs, *vfs]
    assert by_max != default


@run_async
async def test_e_exports_a_capture_with_the_same_records(tmp_path):
    app = replay_app(export_dir=tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await caught_up(pilot, app)
        await pilot.press("e")
        await wait_for(pilot, lambda: app.export_worker is not None, "the export to start")
        await app.export_worker.wait()
    meta, rows, problems = read_capture(app.last_export)
    assert rows == ROWS and not problems
    assert meta["tool"] == "vftrace dashboard export" and meta["complete"]
    assert meta["export"]["records_left_out"] == 0
    assert meta["export"]["from"] == "replay small.csv (max speed)"
    assert meta["budget_ns"] == META["budget_ns"] and meta["lost_total"] == 0
    assert meta["probe_modes"] == META["probe_modes"]


@run_async
async def test_an_export_says_how_many_records_memory_bounds_left_out(tmp_path):
    app = replay_app(export_dir=tmp_path, max_records=1000)
    async with app.run_test(size=SIZE) as pilot:
        await caught_up(pilot, app)
        await pilot.press("e")
        await wait_for(pilot, lambda: app.export_worker is not None, "the export to start")
        await app.export_worker.wait()
    meta, rows, _ = read_capture(app.last_export)
    assert rows == ROWS[-1000:]
    assert meta["export"]["records_left_out"] == len(ROWS) - 1000
    assert f"{len(ROWS) - 1000} older switches were left out" in app.last_export_message
    # The statistics still count every record: only the kept copies are bounded.
    assert app.model.stats.records == len(ROWS)


@run_async
async def test_q_quits_and_stops_the_source():
    source = FedSource()
    app = VftraceApp(source, clock=FrozenClock())
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("q")
        await wait_for(pilot, lambda: source.stopped, "the source to stop")
    assert source.stopped == ["quit"]
    assert not app.is_running


def copy_capture(tmp_path, **meta_changes):
    for name in ("small.csv", "small.meta.json", "small.calls.csv"):
        shutil.copy(DATA / name, tmp_path / name)
    meta = json.loads((tmp_path / "small.meta.json").read_text())
    meta.update(meta_changes)
    (tmp_path / "small.meta.json").write_text(json.dumps(meta))
    return tmp_path / "small.csv"


def style_of(text, fragment: str) -> str:
    start = text.plain.index(fragment)
    return " ".join(str(s.style) for s in text.spans if s.start <= start < s.end)


@run_async
async def test_lost_records_are_red_in_the_header(tmp_path):
    path = copy_capture(tmp_path, lost_records_per_cpu={"0": 3, "1": 4}, lost_total=7)
    app = replay_app(path)
    async with app.run_test(size=SIZE) as pilot:
        await caught_up(pilot, app)
        line = app.header_lines[1]
    assert "red" in style_of(line, "lost 7")
    app = replay_app()
    async with app.run_test(size=SIZE) as pilot:
        await caught_up(pilot, app)
        line = app.header_lines[1]
    assert "red" not in style_of(line, "lost 0")


@run_async
async def test_follow_mode_picks_up_appended_rows_and_survives_garbage(tmp_path):
    path = tmp_path / "growing.csv"
    lines = SMALL.read_text().splitlines(keepends=True)
    app = VftraceApp(FollowSource(path, poll_s=0.02), clock=FrozenClock())
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: "waiting for" in app.model.status, "waiting status")
        path.write_text("".join(lines[:101]))                   # header + 100 rows
        await wait_for(pilot, lambda: group_counts(app).get("all") == 100, "first rows")
        half = lines[101]
        with open(path, "a") as f:
            f.write(half[:10])
        await pilot.pause(0.2)
        assert app.model.seen == 100                              # half a line waits
        with open(path, "a") as f:
            f.write(half[10:] + "\x00garbage,,\n" + "".join(lines[102:201]))
        await wait_for(pilot, lambda: group_counts(app).get("all") == 200, "the rest")
        await wait_for(pilot, lambda: "malformed lines 1" in app.header_lines[1].plain,
                       "the garbage line counted")
        assert int(table_rows(app, "switches")[0][0]) == ROWS[199].seq


@run_async
async def test_the_guests_panel_counts_exits_in_and_out_of_switch_windows():
    exits = [c for c in iter_calls(DATA / META["calls_file"]) if c.kind == "kvm_exit"]
    app = replay_app()
    async with app.run_test(size=SIZE) as pilot:
        await caught_up(pilot, app)
        rows = table_rows(app, "guest-table")
    by_reason = {r[2]: (int(r[4]), int(r[5]), int(r[6])) for r in rows}
    assert sum(t for t, _, _ in by_reason.values()) == len(exits)
    assert sum(i for _, i, _ in by_reason.values()) == sum(c.seq is not None for c in exits)
    hlt = [c for c in exits if c.size == 0x78]                 # SVM exit code of HLT
    assert by_reason["HLT"][0] == len(hlt)


@run_async
async def test_help_screen_opens_with_question_mark_and_f1():
    app = replay_app()
    async with app.run_test(size=SIZE) as pilot:
        for key in ("question_mark", "f1"):
            await pilot.press(key)
            await pilot.pause()
            assert isinstance(app.screen, HelpScreen)
            await pilot.press("escape")
            await pilot.pause()
            assert not isinstance(app.screen, HelpScreen)


@run_async
async def test_the_command_palette_runs_dashboard_actions():
    app = replay_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+p")
        await wait_for(pilot, lambda: isinstance(app.screen, CommandPalette), "the palette")
        await pilot.press(*"pause")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.paused, "pause from the palette")


@pytest.mark.parametrize("size, panels", [
    ((80, 24), ("header", "switches", "groups", "guests")),      # the plot has no room
    ((120, 40), ("header", "probes", "switches", "plot", "rate", "groups", "guests")),
])
@run_async
async def test_every_panel_is_on_screen_at_small_and_pinned_sizes(size, panels):
    app = replay_app()
    async with app.run_test(size=size) as pilot:
        await caught_up(pilot, app)
        for wid in panels:
            region = app.w(wid).region
            assert region.height > 0 and region.bottom <= size[1], wid
        assert app.w("groups").region.height >= 3          # header + at least two rows


@run_async
async def test_without_the_calls_file_the_guests_panel_shows_the_meta_totals(tmp_path):
    path = copy_capture(tmp_path, calls_file=None)
    app = replay_app(path)
    async with app.run_test(size=SIZE) as pilot:
        await caught_up(pilot, app)
        rows = table_rows(app, "guest-table")
        summary = str(app.w("guest-summary").render())
    totals = META["background"]["kvm_exits"]
    assert sum(int(r[4]) for r in rows) == sum(e["count"] for e in totals)
    assert sum(int(r[5]) for r in rows) == sum(e["count"] for e in totals if e["in_window"])
    assert all(r[3] == "-" for r in rows)                   # no rate from totals alone
    assert "per-second rates need --calls" in summary


@run_async
async def test_the_first_switches_fill_the_tables_in_the_same_redraw():
    """The tables redraw at ~2 Hz, but never lag the first data: an empty per-PF table
    beside a list of switches would look broken."""
    source = FedSource()
    app = VftraceApp(source, clock=FrozenClock())
    first = ROWS[:40]
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause(0.3)                       # idle ticks before any data
        source.feed(Batch(switches=list(first)))
        await wait_for(pilot, lambda: table_rows(app, "switches"), "the first switches")
        counts = group_counts(app)
    assert counts["all"] == len(first)
    assert counts[f"pf{first[0].pf}"] == sum(r.pf == first[0].pf for r in first)
    assert app._plot_filled                          # nor the distribution


@run_async
async def test_redraws_wait_while_the_terminal_has_not_taken_the_last_frame():
    """A slow terminal (the lab's serial console took ~10 KB/s) must not block the UI
    thread in Textual's full output queue: redraws wait until the queue is empty, and
    then show the newest data at once."""
    source = FedSource()
    app = VftraceApp(source, clock=FrozenClock())
    backlog = [5]
    app._output_backlog = lambda: backlog[0]
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause(0.2)
        source.feed(Batch(switches=list(ROWS[:40])))
        await wait_for(pilot, lambda: app.model.seen == 40, "the batch to be folded")
        skipped = app.skipped_frames
        await wait_for(pilot, lambda: app.skipped_frames > skipped + 3, "skipped redraws")
        assert table_rows(app, "switches") == []     # nothing drawn while it lags
        backlog[0] = 0
        await wait_for(pilot, lambda: table_rows(app, "switches"), "the redraw")
        assert len(table_rows(app, "switches")) > 0 and group_counts(app)["all"] == 40


class FloodSource(FedSource):
    """A source faster than the UI: every read returns within 2 ms with new switches."""

    def __init__(self, reads: int, per_read: int = 5) -> None:
        super().__init__()
        self.left, self.per_read, self.sent = reads, per_read, 0

    def read(self, timeout: float) -> Batch:
        if not self.left:
            return super().read(timeout)
        self.left -= 1
        time.sleep(0.002)
        rows = [ROWS[(self.sent + i) % len(ROWS)] for i in range(self.per_read)]
        self.sent += len(rows)
        return Batch(switches=rows)


@run_async
async def test_a_ui_slower_than_its_source_lags_by_one_batch_and_keeps_ticking():
    """The freeze `make lab` showed under two mmap guests on TCG: folding took longer than
    the reader's coalescing period, so SourceBatch messages queued without end and the
    ticks (and so the redraws) waited behind them.  The reader must post a batch only
    once the UI has folded the last one, merging what comes meanwhile."""
    source = FloodSource(reads=400)
    app = VftraceApp(source, clock=FrozenClock(), coalesce_s=0.0)
    slow_fold, folded, in_flight = app.model.fold, [0], []

    def fold(batch, now):
        in_flight.append(app.batches_posted - folded[0])
        time.sleep(0.02)                    # a UI thread busy 20 ms a batch
        slow_fold(batch, now)
        folded[0] += 1

    app.model.fold = fold
    async with app.run_test(size=SIZE) as pilot:
        ticks = app._ticks
        await wait_for(pilot, lambda: source.left == 0, "the source to run dry")
        assert app._ticks > ticks + 2, "the UI stopped ticking while the source flooded it"
        await wait_for(pilot, lambda: app.model.seen == source.sent, "every switch folded")
    assert max(in_flight) == 1, f"batches queued ahead of the UI: {max(in_flight)}"
    assert folded[0] < 400 / 2, "batches were not merged while the UI was busy"


@run_async
async def test_the_dashboard_says_how_much_of_each_switch_was_vftrace(tmp_path):
    """A corrected capture: the header gives vftrace's own share and the corrected p50/p90
    with their uncertainty, the table an OWN% per group, computed here independently."""
    from dataclasses import replace
    from tracer.capture.files import CaptureWriter
    meta = {**META, "probe_modes": {"iommu_map": "fentry", "iommu_unmap": "fentry"},
            "probe_costs": {"types": ["fentry"],
                            "fentry": {"median_ns": 2000, "p10_ns": 1000, "p90_ns": 3000}}}
    rows = [replace(r, fentry_hits=4, source_ns=0) for r in ROWS]
    path = tmp_path / "corrected.csv"
    with CaptureWriter(path, meta) as w:
        w.write_many(rows)
    raw = sum(r.switch_ns for r in rows)
    share = 1 - (raw - 8000 * len(rows)) / raw
    app = replay_app(path)
    async with app.run_test(size=SIZE) as pilot:
        await caught_up(pilot, app)
        own = app.header_lines[2].plain
        table = table_rows(app, "groups")
    corrected = np.sort([r.switch_ns - 8000 for r in rows])
    p50 = corrected[int(np.ceil(0.5 * len(rows))) - 1]
    assert own.startswith(f"vftrace's own cost: {100 * share:.1f}% of the switch time")
    assert "±4.00us" in own and "per probe run: fentry 2.00us (1.00us-3.00us)" in own
    shown = own.split("corrected p50 ")[1].split("±")[0]
    assert abs(float(shown.removesuffix("us")) * 1000 - p50) <= 0.01 * p50, (shown, p50)
    col = [c.name for c in GROUP_COLUMNS].index("own_share")
    assert table[0][col] == f"{100 * share:.1f}%"


@run_async
async def test_a_lossy_capture_shows_every_switch_from_the_kernel_and_says_sampled(tmp_path):
    """Records were lost, the kernel's histograms were not: the header gives every
    switch's percentiles from them, and says the panels are of the records kept."""
    from tracer.capture.files import CaptureWriter
    from tracer.model import kernel_hist
    from tracer.model.stats import Histogram
    everything = [r.switch_ns for r in ROWS] + [9_000_000] * 40     # 40 records lost
    h = Histogram()
    h.add_array(np.array(everything))
    hists = [kernel_hist.KernelHist(0, 1, "switch", h, sum(everything))]
    meta = {**META, "kernel_histograms": kernel_hist.to_meta(hists, 0)}
    path = tmp_path / "lossy.csv"
    w = CaptureWriter(path, meta)
    w.write_many(ROWS)
    w.close(lost={0: 40})
    app = replay_app(path)
    async with app.run_test(size=SIZE) as pilot:
        await caught_up(pilot, app)
        await wait_for(pilot, lambda: len(app.header_lines) > 3 and "SAMPLED" in
                       app.header_lines[3].plain, "the every-switch line, sampled")
        line = app.header_lines[3].plain
    p99 = h.percentiles([99])[0]
    assert line.startswith(f"every switch (kernel histograms, exact whatever was lost): "
                           f"{len(everything)} switches")
    assert f"p99 {fmt_ns(p99)}" in line and "max 9.00ms" in line
    assert f"SAMPLED: panels show the {len(ROWS)} records kept" in line
