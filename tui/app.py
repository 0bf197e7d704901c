"""``VftraceApp``: the live dashboard over any ``Source`` (live engine, capture, growing capture).

A worker thread reads the source and posts coalesced batches; the UI folds them into one
``DashboardModel`` (one ``tracer.model.stats.Stats``) and redraws from a timer at ~10 Hz (the
two tables and the plot at ~2 Hz), never per record.  Elapsed time and rates come
from the injected ``clock``, so tests and snapshots are deterministic.
"""
from __future__ import annotations

import asyncio
import re
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

from rich.cells import cell_len
from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Sparkline, Static
from textual.worker import get_current_worker

from tracer.model import group_columns as gc
from tracer.model.group_columns import NOT_MEASURED
from tracer.model.schema import NO_VF
from tracer.model.units import fmt_ns, fmt_rate

from . import keys
from .model import GROUP_COLUMNS, SORTS, DashboardModel, describe_export, write_export
from .sources import Batch, Source
from .store import COL, DEFAULT_MAX_RECORDS
from .watchdog import StallWatchdog
from .widgets import DistributionPlot, HeaderBar, HelpScreen, PromptScreen, SwitchList, TextTable

READ_TIMEOUT_S = 0.1
SWITCH_ROWS_MAX = 200            # newest switches listed: as many as the panel shows
PLOT_EVERY_TICKS = 5             # the plot is the costly widget: redrawn at ~2 Hz
# The per-PF/VF and guest tables are refilled at ~2 Hz too (still quicker than they
# can be read), on other ticks than the plot.
TABLES_EVERY_TICKS = 5
# Writes queued for the terminal beyond which redraws wait.  The lab's console is an
# emulated 16550 that took ~10 KB/s under load (measured: what Textual wrote and what
# reached the host's pane were the same 680 KB over a minute), several times less than
# the dashboard draws at 10 Hz; with Textual's 30-write queue the screen fell tens of
# seconds behind, then the UI thread blocked on the full queue.  Drawing only when the
# queue is empty lets the frame rate follow the terminal, one frame behind at most.
OUTPUT_BACKLOG_MAX = 0
OVER = "bold red"

# Header cell -> sort name for a click on the per-PF/VF table's header.
HEADER_SORT = {c.header: c.header.lower() for c in GROUP_COLUMNS
               if c.header.lower() in dict(SORTS)}
SWITCH_TIME = {"p50", "p90", "p99", "p999", "max"}      # red over the budget
GUEST_COLUMNS = ("PID", "VCPU", "REASON", "EXITS/S", "TOTAL", "IN SWITCH", "OUTSIDE", "AVG")


class SourceBatch(Message):
    """Records from the reading thread, coalesced (one message per ~0.1 s at most)."""

    def __init__(self, batch: Batch) -> None:
        super().__init__()
        self.batch = batch


class VftraceApp(App):
    TITLE = "vftrace"
    AUTO_FOCUS = "#groups"          # the table the arrows scroll (and s sorts)
    # Below 100 columns the plot has no room beside the switches; below 32 rows the
    # probe line goes (a failed hook is still in the warnings line).
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (100, "-wide")]
    VERTICAL_BREAKPOINTS = [(0, "-short"), (32, "-tall")]
    CSS = """
    Screen { layout: vertical; }
    #header { height: auto; padding: 0 1; background: $boost; text-wrap: nowrap;
              text-overflow: ellipsis; }
    #probes { height: auto; padding: 0 1; background: $boost; }
    #top { height: 3fr; min-height: 6; }
    #switches { width: 66; height: 100%; border-top: solid $accent; padding: 0 1;
                overflow: hidden; }
    #dist { width: 1fr; border-top: solid $accent; }
    #plot { height: 1fr; min-height: 4; }
    #rate { height: 2; margin: 0 1; }
    #rate-label { height: 1; padding: 0 1; }
    #groups { height: 3fr; min-height: 4; border-top: solid $accent; }
    #guests { height: 2fr; min-height: 4; border-top: solid $accent; }
    #guest-summary { height: auto; padding: 0 1; }
    #guest-table { height: 1fr; }
    Screen.-narrow #dist { display: none; }
    Screen.-narrow #switches { width: 1fr; }
    Screen.-short #probes { display: none; }
    """
    BINDINGS = [Binding(key, action, label, key_display=display, show=show)
                for key, action, label, display, show in keys.bindings()]
    COMMAND_PALETTE_BINDING = keys.PALETTE_KEY

    def __init__(self, source: Source, *, clock: Callable[[], float] = time.monotonic,
                 budget_ns: int | None = None, pfs: Iterable[int] | None = None,
                 vfs: Iterable[int] | None = None, max_records: int = DEFAULT_MAX_RECORDS,
                 export_dir: str | Path | None = None, handle_signals: bool = False,
                 refresh_hz: float = 10.0, coalesce_s: float = 0.1) -> None:
        super().__init__()
        self.source = source
        self.clock = clock
        self.header_info = source.start()
        budget = budget_ns or self.header_info.budget_ns or 100
        self.model = DashboardModel(budget, pfs=set(pfs) if pfs is not None else None,
                                    vfs=set(vfs) if vfs is not None else None,
                                    max_records=max_records,
                                    vendor=self.header_info.kvm_vendor)
        self.model.use_meta(self.header_info.meta)  # probe costs; --pf/--vf left out
        self.export_dir = Path(export_dir) if export_dir is not None else Path.cwd()
        self.handle_signals = handle_signals
        self.refresh_hz, self.coalesce_s = refresh_hz, coalesce_s
        self.paused = False
        self.held = 0                      # switches that arrived while paused
        self.last_export: Path | None = None
        self.last_export_message = ""
        self.export_worker = None
        self._dirty = True
        self._plot_dirty = True
        self._tables_dirty = True
        self._tables_filled = False      # nothing in the tables yet: fill them on first data
        self._plot_filled = False        # likewise the distribution
        self._probe_line: Text | None = None
        self._widgets: dict = {}
        self._ticks = 0
        self._t_start = clock()
        self._stop_requested = threading.Event()
        # Set while no SourceBatch waits in the UI's queue: the reader posts only then and
        # merges meanwhile, so a UI slower than the source lags by one batch, not by a
        # queue that grows without end and starves the ticks and the repaints behind it.
        self._batch_taken = threading.Event()
        self._batch_taken.set()
        self.batches_posted = 0
        self._stop_reason = "quit"
        self._exit_when_stopped = False
        self.reader_done = threading.Event()
        self._reader_started = False
        self.stopping = False
        self.watchdog = StallWatchdog.from_env()
        self.skipped_frames = 0          # redraws skipped while the terminal lagged

    # -- layout ---------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield HeaderBar(id="header")
        yield Static(id="probes")
        with Horizontal(id="top"):
            yield SwitchList(id="switches")
            with Vertical(id="dist"):
                yield DistributionPlot(id="plot")
                yield Sparkline([], id="rate")
                yield Static(id="rate-label")
        yield TextTable(tuple(c.header for c in GROUP_COLUMNS), id="groups")
        with Vertical(id="guests"):
            yield Static(id="guest-summary")
            yield DataTable(id="guest-table", show_cursor=False)
        yield Footer()

    def w(self, wid: str):
        """A widget of the main screen (a modal may be on top; the panels still update)."""
        return self._widgets[wid]

    def on_mount(self) -> None:
        self._widgets = {w.id: w for w in self.screen.query("*") if w.id}
        self.w("switches").border_title = "Switches (newest first, over budget in red)"
        self.w("guest-table").add_columns(*GUEST_COLUMNS)
        self.query_one("#guests").border_title = "Guests"
        self.query_one("#dist").border_title = "Distribution: switch ns, log scale"
        self.refresh_view()
        self.set_interval(1 / self.refresh_hz, self._tick)
        if self.watchdog is not None:
            self.watchdog.start()
        if self.handle_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_quit, sig.name)
        self._read_source()

    # -- reading --------------------------------------------------------------------------
    @work(thread=True, exclusive=True, name="source reader", group="source")
    def _read_source(self) -> None:
        self._reader_started = True
        worker = get_current_worker()
        pending = Batch()
        last_post = time.monotonic()
        try:
            # Cancelled: Textual shuts down (the app exits by any path but q).
            while not self._stop_requested.is_set() and not worker.is_cancelled:
                batch = self.source.read(READ_TIMEOUT_S)
                pending.merge(batch)
                now = time.monotonic()
                if pending.finished or (now - last_post >= self.coalesce_s
                                        and not pending.is_empty()
                                        and self._batch_taken.is_set()):
                    self._post_batch(pending)
                    pending, last_post = Batch(), now
                if batch.finished:
                    break
        except Exception as e:          # a source bug must not take the terminal with it
            pending.problems.append(f"reading the source failed: {type(e).__name__}: {e}")
            pending.status, pending.finished = "source failed", True
        finally:
            if not pending.is_empty():
                self._post_batch(pending)
            try:
                self.source.stop(self._stop_reason)
            except Exception as e:
                self.post_message(SourceBatch(Batch(problems=[f"stopping the source: {e}"])))
            self.reader_done.set()
            if self._exit_when_stopped:
                self.call_from_thread(self.exit)

    def _post_batch(self, batch: Batch) -> None:
        self._batch_taken.clear()
        self.batches_posted += 1
        self.post_message(SourceBatch(batch))

    @on(SourceBatch)
    def _fold(self, message: SourceBatch) -> None:
        try:
            self._fold_batch(message.batch)
        finally:
            self._batch_taken.set()

    def _fold_batch(self, batch: Batch) -> None:
        if batch.header is not None:
            self.header_info = batch.header
            self.model.guests.vendor = batch.header.kvm_vendor
        self.model.fold(batch, now=self.clock())
        if self.paused:
            self.held += batch.switch_count()
        self._dirty = self._plot_dirty = self._tables_dirty = True

    def request_quit(self, reason: str = "quit") -> None:
        """Stop the source in its own thread (live: workload, probes, capture), then exit."""
        if self.reader_done.is_set():
            self.exit()
            return
        self._stop_reason = reason
        self._exit_when_stopped = True
        self.stopping = True
        self._stop_requested.set()
        self._update_header()

    def stop_source(self, timeout: float = 60.0) -> None:
        """After ``run()``: make sure the source was stopped (idempotent)."""
        self._stop_requested.set()
        if self._reader_started:
            self.reader_done.wait(timeout)
        self.source.stop(self._stop_reason)

    # -- refreshing -----------------------------------------------------------------------
    def _output_backlog(self) -> int:
        """Frames written but not yet taken by the terminal (Textual's output queue)."""
        writer = getattr(self._driver, "_writer_thread", None)
        queue = getattr(writer, "_queue", None)
        return queue.qsize() if queue is not None else 0

    def _tick(self) -> None:
        if not self.is_running or not self._widgets:
            return
        # A slow terminal (the lab's emulated serial console, a thin ssh link) takes
        # frames slower than we make them: Textual's output queue fills and its next
        # write blocks this thread, keys included.  Skip the redraw until it drains, so
        # the frame rate drops to what the terminal takes and q still answers.
        if self._output_backlog() > OUTPUT_BACKLOG_MAX:
            self.skipped_frames += 1
            return
        if self.watchdog is not None:
            self.watchdog.beat()
        self._ticks += 1
        plot_due = (self._ticks % PLOT_EVERY_TICKS == 0
                    or (not self._plot_filled and self.model.hist.total > 0))  # first data: at once
        tables_due = (self._ticks % TABLES_EVERY_TICKS == 2     # two ticks after the plot
                      or not self._tables_filled)                # the first data: at once
        if self.paused:
            self._update_header()
        elif self._dirty or (self._plot_dirty and plot_due) or (self._tables_dirty and tables_due):
            self.refresh_view(plot=plot_due, tables=tables_due)
        else:
            self._update_header()

    def refresh_view(self, plot: bool = True, tables: bool = True) -> None:
        """Redraw every panel from the model (``plot=False`` skips the costly plot,
        ``tables=False`` the per-PF/VF and guest tables)."""
        self._dirty = False
        now = self.clock()
        # Every group's percentiles only when a panel shows them; the header's two
        # figures are cheap on their own.
        snap = self.model.snapshot(now) if tables or plot else None
        self._shown_counts = ((snap.records, snap.seq_gaps_total) if snap is not None
                              else self.model.counts())
        if snap is not None and snap.records:
            self._own_line = gc.own_cost_line(snap.overall, self.header_info.meta)
        self._update_header()
        self._update_switches()
        if tables:
            self._tables_dirty = False
            self._tables_filled = snap.records > 0
            self._update_groups(snap)
            self._update_guests()
        self._update_rate()
        if plot:
            self._plot_dirty = False
            values, counts = self.model.distribution()
            self._plot_filled = values.size > 0
            self.w("plot").show(
                values, counts, self.model.budget_ns,
                snap.overall.over_budget_share if snap.records else None)

    def _update_header(self) -> None:
        info, model = self.header_info, self.model
        now = self.clock()
        # as of the last redraw: a paused screen keeps them
        records, seq_gaps = getattr(self, "_shown_counts", (0, 0))
        line1 = Text.assemble(("vftrace ", "bold"), (info.origin, "bold cyan"))
        if model.status:
            line1.append(f"  {model.status}")
        line1.append(f"  depth {info.depth}  source {info.switch_source or '?'}"
                     f"  kernel {info.kernel or '?'}")
        lost = sum(model.lost.values())
        line2 = Text(f"elapsed {_clock_text(now - self._t_start)}  switches {records}  "
                     f"{fmt_rate(model.stats.rate(now))} (wall)  ")
        line2.append(f"lost {lost}", "bold white on red" if lost else "green")
        if model.kernel_drops:          # windows not recorded, full maps: see the report
            line2.append(f"  kernel drops {model.kernel_drops}", "bold white on red")
        line2.append("  budget ")
        line2.append(fmt_ns(model.budget_ns), "bold")
        if self.paused:
            line2.append(f"  PAUSED (+{self.held} switches; p resumes)", "bold black on yellow")
        if self.stopping:
            line2.append("  stopping (workload, probes, capture)...", "bold yellow")
        if model.bad_lines:
            line2.append(f"  malformed lines {model.bad_lines}", "bold red")
        if seq_gaps:
            line2.append(f"  seq gaps {seq_gaps}", "bold red")
        if model.pfs is not None or model.vfs is not None:
            line2.append(f"  filter {_filter_text(model.pfs, model.vfs)}", "bold magenta")
        line2.append(f"  floor {_floor_text(info.floor_ns)}")
        line3 = Text(getattr(self, "_own_line", "vftrace's own cost: no switches yet"))
        line3.append(f"  (per probe run: {gc.probe_costs_text(info.meta)})", "dim")
        lines = [line1, line2, line3]
        if (exact := model.exact_text()) is not None:
            every, *corrected = exact.split("\n")      # raw, then corrected when kept
            line4 = Text(every)
            if lost:    # the panels below are of the records kept, the line above of all
                line4.append(f"  SAMPLED: panels show the {records} records kept",
                             "bold black on yellow")
            lines.append(line4)
            lines.extend(map(Text, corrected))
        notes = list(info.warnings) + model.problems[-3:]
        if notes:
            lines.append(Text("! " + "; ".join(notes), "yellow"))
        self.header_lines = lines
        self.w("header").show(lines)
        probes = _probe_text(info.probe_modes)
        if probes != self._probe_line:          # static: skip the re-layout
            self._probe_line = probes
            self.w("probes").update(probes)

    def _update_switches(self) -> None:
        panel = self.w("switches")
        budget = self.model.budget_ns
        rows, over = [], []
        skip = self.header_info.unmeasured

        def cell(row, name, fmt=str):
            return NOT_MEASURED if name in skip else fmt(row[COL[name]])

        for row in self.model.newest(panel.capacity(SWITCH_ROWS_MAX)).tolist():
            src = row[COL["from_vf"]]
            rows.append((str(row[COL["seq"]]), str(row[COL["pf"]]),
                         f"{'-' if src == NO_VF else src}>{row[COL['to_vf']]}",
                         fmt_ns(row[COL["switch_ns"]]), cell(row, "revoke_ns", fmt_ns),
                         cell(row, "grant_ns", fmt_ns), cell(row, "kvm_exits"),
                         cell(row, "blocked_accesses")))
            over.append(row[COL["switch_ns"]] > budget)
        panel.show(rows, over)

    def _update_groups(self, snap) -> None:
        table = self.w("groups")
        unmeasured = self.header_info.unmeasured
        table.show([[(c.cell(g, unmeasured), _group_style(c.name, g, snap.budget_ns))
                     for c in GROUP_COLUMNS] for g in self.model.group_rows(snap)])
        arrow = "" if self.model.sort_name == "group" else " (largest first)"
        table.border_title = f"Per PF / per VF: sort by {self.model.sort_name}{arrow}  [s]"

    def _update_guests(self) -> None:
        guests = self.model.guests
        rows = guests.exit_rows()
        total, inside = sum(r.total for r in rows), sum(r.in_window for r in rows)
        summary = Text()
        if rows:
            summary.append(f"KVM exits {total}: {inside} in switch windows, "
                           f"{total - inside} outside")
            if not guests.has_rates():
                summary.append("  (totals; per-second rates need --calls)", "dim")
        elif self.header_info.probe_modes.get("kvm_exit") == "absent":
            summary.append("KVM exits: not traced (no kvm:kvm_exit tracepoint)", "dim")
        elif self.header_info.probe_modes.get("kvm_exit") == "off":
            summary.append(f"KVM exits: not traced at depth {self.header_info.depth} "
                           "(--depth guests traces them)", "dim")
        else:
            summary.append("KVM exits: none seen", "dim")
        summary.append("\nVFIO DMA: ")
        vfio = guests.vfio_rows()
        if vfio:
            summary.append("; ".join(
                f"{r.kind.removeprefix('vfio_').removesuffix('_dma')} {r.count} calls "
                + (f"p50 {fmt_ns(r.p50)} p99 {fmt_ns(r.p99)} " if r.p50 is not None
                   else f"mean {fmt_ns(r.mean)} ") + f"max {fmt_ns(r.max)}" for r in vfio))
        elif self.header_info.probe_modes.get("vfio_dma") == "absent":
            summary.append("not traced (vfio_dma hook absent)", "dim")
        elif self.header_info.probe_modes.get("vfio_dma") == "off":
            summary.append(f"not traced at depth {self.header_info.depth}", "dim")
        else:
            summary.append("no map/unmap calls seen", "dim")
        self.w("guest-summary").update(summary)
        cells = []
        for r in rows:
            cells.append([str(r.pid), str(r.vcpu), r.reason,
                          Text("-" if r.rate is None else f"{r.rate:.1f}", justify="right"),
                          Text(str(r.total), justify="right"),
                          Text(str(r.in_window), "yellow" if r.in_window else "",
                               justify="right"),
                          Text(str(r.outside), justify="right"),
                          Text(fmt_ns(r.mean_ns), justify="right")])
        _fill(self.w("guest-table"), cells)

    def _update_rate(self) -> None:
        series = self.model.rate_series()
        self.w("rate").data = series or [0.0]
        label = "switches/s (trace time)"
        if series:
            label += f": newest {series[-1]:.0f}, peak {max(series):.0f}, {len(series)} s shown"
        self.w("rate-label").update(label, layout=False)      # height 1 in the CSS

    # -- keys -----------------------------------------------------------------------------
    def action_toggle_pause(self) -> None:
        self.paused = not self.paused
        self.held = 0
        if not self.paused:
            self.refresh_view()
        else:
            self._update_header()

    def action_reset(self) -> None:
        self.model.reset()
        self.held = 0
        self.refresh_view()
        self.notify("statistics reset")

    def action_sort(self) -> None:
        self.model.cycle_sort()
        self.refresh_view(plot=False)

    @on(TextTable.HeaderClicked, "#groups")
    def _sort_by_header(self, event: TextTable.HeaderClicked) -> None:
        name = HEADER_SORT.get(event.label)
        if name is not None:
            self.model.sort_by(name)
            self.refresh_view(plot=False)

    def action_budget(self) -> None:
        def parse(values: dict[str, str]) -> int:
            return parse_ns(values["budget"])

        def done(budget: object) -> None:
            if isinstance(budget, int):
                self.model.set_budget(budget)
                self.refresh_view()

        self.push_screen(PromptScreen("Switch budget", [
            ("budget", "budget (ns, or with a unit: 500ns, 1.5us, 2ms)",
             str(self.model.budget_ns))], parse), done)

    def action_filter(self) -> None:
        def parse(values: dict[str, str]) -> tuple:
            return parse_id_list(values["pfs"], "PF"), parse_id_list(values["vfs"], "VF")

        def done(result: object) -> None:
            if isinstance(result, tuple):
                self.model.set_filters(*result, now=self.clock())
                self.refresh_view()

        fmt = lambda ids: ",".join(map(str, sorted(ids))) if ids is not None else ""  # noqa: E731
        self.push_screen(PromptScreen("Filter (empty: all)", [
            ("pfs", "PFs (comma list)", fmt(self.model.pfs)),
            ("vfs", "VFs: switches from or to these (comma list)", fmt(self.model.vfs))],
            parse), done)

    def action_export(self) -> None:
        plan = self.model.plan_export(self.export_dir, self.header_info.meta,
                                      self.source.description, paused=self.paused)
        self.export_worker = self._write_export(plan)

    @work(thread=True, group="export")
    def _write_export(self, plan) -> None:
        try:
            path = write_export(plan)
        except Exception as e:               # disk full, read-only directory...
            self.call_from_thread(self.notify, f"export failed: {e}", severity="error")
            return
        self.last_export = path
        self.last_export_message = describe_export(plan)
        self.call_from_thread(self.notify, self.last_export_message,
                              severity="warning" if plan.left_out else "information",
                              timeout=8)

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    async def action_quit(self) -> None:
        self.request_quit("quit")

    def on_unmount(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        ours = [SystemCommand(k.title, f"{k.description[:1].upper()}{k.description[1:]} "
                              f"({k.displays[0]})", getattr(self, f"action_{k.action}"))
                for k in keys.KEYS]
        titles = {c.title for c in ours}      # Textual's Quit: ours says what q does here
        yield from (c for c in super().get_system_commands(screen) if c.title not in titles)
        yield from ours


# --- small helpers -----------------------------------------------------------------------

def _group_style(column: str, g, budget_ns: int) -> str:
    """Over-budget figures in red; the all and PF rows' names in bold."""
    if column == "group":
        return "bold" if g.key.level != "vf" else ""
    if column in SWITCH_TIME:
        v = getattr(g.switch, column)
        return "red" if v is not None and v > budget_ns else ""
    if column == "over_budget":
        return OVER if g.over_budget else "green"
    return ""


def _fill(table: DataTable, rows: list[list], keys: list[str] | None = None) -> None:
    """Replace a table's rows, unless they are what it shows already: a DataTable
    re-measures and re-renders every cell after a clear, the costly part of a redraw."""
    content = [tuple((str(c), str(getattr(c, "style", ""))) for c in row) for row in rows]
    if content == getattr(table, "_vftrace_content", None):
        return
    table._vftrace_content = content
    table.clear()
    # Widths from what is shown now: a DataTable only ever widens a column, so a value
    # gone by (or shown half-way through a filter) would keep its column wide for good.
    for i, row in enumerate(rows):
        table.add_row(*row, key=keys[i] if keys else None)
    # Set now rather than when the DataTable next idles: a screen drawn in between (a
    # snapshot, a slow terminal's one frame) would show the columns cut to their labels.
    for i, column in enumerate(table.columns.values()):
        column.content_width = max([column.label.cell_len,
                                    *(cell_len(str(getattr(row[i], "plain", row[i])))
                                      for row in rows if i < len(row))])


_UNITS = {"": 1, "ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": 1_000_000_000}


def parse_ns(text: str) -> int:
    """"500", "500ns", "1.5us", "2ms" -> ns (a positive integer)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ns|us|µs|ms|s)?\s*", text)
    if not m:
        raise ValueError(f"{text.strip()!r}: give nanoseconds, e.g. 500 or 1.5us")
    ns = round(float(m.group(1)) * _UNITS[m.group(2) or ""])
    if ns <= 0:
        raise ValueError("the budget must be positive")
    return ns


def parse_id_list(text: str, what: str) -> set[int] | None:
    """"" -> None (all); "0,2" -> {0, 2}."""
    if not text.strip():
        return None
    out = set()
    for part in text.replace(" ", ",").split(","):
        if not part:
            continue
        if not part.isdigit():
            raise ValueError(f"{what} {part!r}: give non-negative integers, e.g. 0,1")
        out.add(int(part))
    return out or None


def _clock_text(seconds: float) -> str:
    s = max(0, int(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else \
        f"{s // 60:02d}:{s % 60:02d}"


def _floor_text(floor: dict) -> str:
    parts = [f"{mode} {fmt_ns(v.get('median_ns'))}" for mode, v in floor.items()
             if isinstance(v, dict) and v.get("median_ns") is not None]
    return " ".join(parts) or "unknown"


def _filter_text(pfs, vfs) -> str:
    parts = []
    if pfs is not None:
        parts.append("pf=" + ",".join(map(str, sorted(pfs))))
    if vfs is not None:
        parts.append("vf=" + ",".join(map(str, sorted(vfs))))
    return " ".join(parts)


def _probe_text(modes: dict[str, str]) -> Text:
    """``probes: fentry a b  kprobe c  absent d``: absent hooks stand out."""
    by_mode: dict[str, list[str]] = {}
    for hook, mode in modes.items():
        by_mode.setdefault(mode, []).append(hook)
    text = Text("probes:")
    for mode in sorted(by_mode, key=lambda m: (m != "absent", m)):
        style = "bold yellow" if mode == "absent" else ""
        text.append(f"  {mode} ", style or "dim")
        text.append(" ".join(by_mode[mode]), style)
    if not modes:
        text.append(" unknown (no meta)", "dim")
    return text
