"""The dashboard's own widgets: the header, the latency plot, the switch list, the
per-PF/VF table and the modal screens."""
from __future__ import annotations

import math

import numpy as np
from rich.cells import cell_len
from rich.segment import Segment
from rich.text import Text
from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.geometry import Size
from textual.message import Message
from textual.screen import ModalScreen
from textual.scroll_view import ScrollView
from textual.strip import Strip
from textual.widgets import Input, Label, Static
from textual_plotext import PlotextPlot

from tracer.model.units import fmt_ns

from . import keys

PLOT_BINS = 40


class DistributionPlot(PlotextPlot):
    """Histogram of switch ns on a log axis, the budget marked as a vertical line."""

    def show(self, values: np.ndarray, counts: np.ndarray, budget_ns: int,
             over_share: float | None) -> None:
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        if not values.size:
            plt.title("no switches yet")
            self.refresh()
            return
        lo, hi = float(values.min()), float(values.max())
        lo_log, hi_log = math.log10(max(lo, 1.0)), math.log10(max(hi, 1.0))
        if hi_log - lo_log < 1e-6:
            hi_log = lo_log + 0.1
        edges = np.linspace(lo_log, hi_log, PLOT_BINS + 1)
        binned, _ = np.histogram(np.log10(np.maximum(values, 1.0)), bins=edges, weights=counts)
        centers = (edges[:-1] + edges[1:]) / 2
        plt.bar(centers.tolist(), binned.tolist(), width=0.9, marker="sd", color="cyan")
        budget_log = math.log10(max(budget_ns, 1))
        where = ""
        if lo_log <= budget_log <= hi_log:
            plt.vline(budget_log, "red")
        else:
            where = " (below all)" if budget_log < lo_log else " (above all)"
        ticks = np.linspace(lo_log, hi_log, 4)
        plt.xticks(ticks.tolist(), [fmt_ns(10 ** t) for t in ticks])
        plt.yticks([])
        share = "" if over_share is None else f": {100 * over_share:.1f}% over"
        plt.title(f"budget {fmt_ns(budget_ns)}{where}{share}")
        self.refresh()


class SwitchList(Static):
    """The newest switches as plain aligned text: a streaming list redrawn ten times a
    second is far cheaper as one Text than as DataTable cells.  ``rows`` keeps what is
    shown (strings per column) for tests and the export notice."""

    COLUMNS = (("SEQ", 7, "<"), ("PF", 3, "<"), ("FROM>TO", 8, "<"), ("SWITCH", 8, ">"),
               ("REVOKE", 8, ">"), ("GRANT", 8, ">"), ("EXITS", 6, ">"), ("BLOCKED", 8, ">"))

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.rows: list[tuple[str, ...]] = []
        self.over: list[bool] = []

    def capacity(self, most: int) -> int:
        """Rows that fit (all of ``most`` before the first layout)."""
        height = self.content_region.height
        return min(most, height - 1) if height > 1 else most

    def _line(self, cells) -> str:
        return " ".join(f"{c:{align}{width}}" for c, (_, width, align) in zip(cells,
                                                                              self.COLUMNS))

    def show(self, rows: list[tuple[str, ...]], over: list[bool]) -> None:
        self.rows, self.over = rows, over
        text = Text(self._line(name for name, _, _ in self.COLUMNS), "bold")
        for cells, is_over in zip(rows, over):
            text.append("\n")
            text.append(self._line(cells), "red" if is_over else "")
        # Its size is fixed by the CSS, never by its text: no re-layout, which would
        # repaint every panel (the tables too) ten times a second.
        self.update(text, layout=False)


class TextTable(ScrollView, can_focus=True):
    """A table drawn as ready-made lines: a header that stays put and rows that scroll
    (arrows, page keys, the mouse).  Refilled at ~2 Hz with new figures in every row, a
    DataTable re-rendered each cell through Rich (~0.5 ms a cell, most of the dashboard's
    CPU at 10k records/s); here a refill formats each row once into a Strip and drawing a
    line is a crop.  ``headers`` and ``rows`` keep what is shown (strings), for tests and
    the export notice; a click on a header cell posts ``HeaderClicked``."""

    DEFAULT_CSS = "TextTable { background: $surface; }"

    class HeaderClicked(Message):
        def __init__(self, table: "TextTable", label: str) -> None:
            super().__init__()
            self.table, self.label = table, label

        @property
        def control(self) -> "TextTable":
            return self.table

    def __init__(self, headers: tuple[str, ...] = (), **kwargs) -> None:
        super().__init__(**kwargs)
        self.headers = tuple(headers)
        self.rows: list[tuple[str, ...]] = []
        self._shown: list | None = None              # the (text, style) cells drawn
        self._bounds: list[tuple[int, int]] = []     # each column's cells, for clicks
        self._head = Strip([])
        self._lines: list[Strip] = []

    @property
    def row_count(self) -> int:
        return len(self.rows)

    def show(self, rows: list[list[tuple[str, str]]], left: frozenset[int] = frozenset({0})) -> None:
        """``rows`` of (text, style) cells; columns in ``left`` are left-aligned, the
        others right-aligned, each as wide as its widest cell or header."""
        if rows == self._shown:
            return
        self._shown, self.rows = rows, [tuple(text for text, _ in row) for row in rows]
        widths = [max([cell_len(h), *(cell_len(r[i]) for r in self.rows if i < len(r))])
                  for i, h in enumerate(self.headers)]

        def line(cells) -> list[Segment]:
            out: list[Segment] = []
            for i, ((text, style), width) in enumerate(zip(cells, widths)):
                pad = Segment(" " * (width - cell_len(text)))
                cell = Segment(text, self.app.console.get_style(style) if style else None)
                # a cell of padding each side, as a DataTable draws them
                out += [Segment(" "), *((cell, pad) if i in left else (pad, cell)), Segment(" ")]
            return out

        bold = self.app.console.get_style("bold")
        self._head = Strip([Segment(s.text, bold) for s in line([(h, "") for h in self.headers])])
        self._lines = [Strip(line(r)) for r in rows]
        x = 0
        self._bounds = []
        for width in widths:
            self._bounds.append((x, x + width + 2))
            x += width + 2
        self.virtual_size = Size(x, len(rows) + 1)
        self.refresh()

    def render_line(self, y: int) -> Strip:
        scroll_x, scroll_y = self.scroll_offset
        if y == 0:
            strip = self._head                      # the header does not scroll down
        else:
            i = y - 1 + scroll_y
            strip = self._lines[i] if i < len(self._lines) else Strip([])
        return strip.crop_extend(scroll_x, scroll_x + self.size.width, self.rich_style)

    def on_click(self, event: events.Click) -> None:
        if event.y != 0:
            return
        x = event.x + self.scroll_offset.x
        for label, (start, end) in zip(self.headers, self._bounds):
            if start <= x < end:
                self.post_message(self.HeaderClicked(self, label))
                return


class HeaderBar(Static):
    """Three lines: the source and its state; the run's figures; probes and problems."""

    shown_lines = 0

    def show(self, lines: list[Text]) -> None:
        text = Text("\n").join(lines)
        text.no_wrap, text.overflow = True, "ellipsis"
        # height: auto: a re-layout (every panel repainted) only when its height changes
        self.update(text, layout=len(lines) != self.shown_lines)
        self.shown_lines = len(lines)


HELP_TEXT = "[b]vftrace dashboard keys[/b]\n\n" + "\n".join(keys.help_lines()) + f"""

Over-budget switches are red.  Lost records (the kernel could not hand them over) are
red in the header when there are any.  The header's rate is records arriving per second
of wall-clock time (over the last 5 s: a backlog drained at start shows as a burst);
rates in the Distribution and Guests panels are per second of trace time (a replay
shows the rates the recording saw).

[dim]{keys.close_help_hint()}[/dim]"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding(",".join(keys.close_help_keys()), "dismiss", "Close")]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > Static { width: 92; height: auto; padding: 1 2; border: thick $accent;
                          background: $surface; }
    """

    def compose(self) -> ComposeResult:
        yield Static(HELP_TEXT, id="help-text")

    def action_dismiss(self) -> None:
        self.dismiss(None)


class PromptScreen(ModalScreen[object]):
    """One or more labelled inputs; Enter checks them with ``parse`` (which raises
    ValueError with a message) and dismisses with its result; Escape cancels."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]
    AUTO_FOCUS = "Input"
    DEFAULT_CSS = """
    PromptScreen { align: center middle; }
    PromptScreen > Vertical { width: 70; height: auto; padding: 1 2; border: thick $accent;
                              background: $surface; }
    PromptScreen #prompt-error { color: $error; }
    """

    def __init__(self, title: str, fields: list[tuple[str, str, str]], parse) -> None:
        super().__init__()
        self.title_text, self.fields, self.parse = title, fields, parse

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(f"[b]{self.title_text}[/b]")
            for field_id, label, value in self.fields:
                yield Label(label)
                yield Input(value=value, id=field_id)
            yield Label("", id="prompt-error")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        values = {f: self.query_one(f"#{f}", Input).value for f, _, _ in self.fields}
        try:
            result = self.parse(values)
        except ValueError as e:
            self.query_one("#prompt-error", Label).update(str(e))
            return
        self.dismiss(result)

    def action_cancel(self) -> None:
        self.dismiss(None)
