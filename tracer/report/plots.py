"""The report's figure: four panels over one or more captures, drawn with matplotlib.

A *series* is one PF of one capture (or a whole capture, when that would make too many
lines); it keeps one colour in every panel and one figure legend names them, so
several captures (mmap vs trap, strict vs batched) read as an overlay on the same axes.
Numbers that are statistics (means, rolling medians) come from the statistics core.
"""
from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tracer.errors import VftraceError
from tracer.model.stats import GroupStats, Histogram
from tracer.report.load import Capture

DEFAULT_SIZE = (1600, 1000)
MIN_SIZE, MAX_SIZE = (480, 320), (8000, 8000)
MAX_SERIES_PER_PF = 8       # beyond this many (capture, PF) lines, one line per capture
CDF_POINTS = 4000           # a CDF of more values is drawn through this many ranks
SCATTER_POINTS = 20000      # more switches than this are drawn as an even subsample
EXIT_BINS = 8               # 0..7 exits, then ">= 8"
LINESTYLES = ("solid", "dashed", "dashdot", "dotted")
MARKERS = ("o", "s", "^", "D")
PERCENTILE_TICKS = (0.001, 0.01, 0.1, 0.5, 0.9, 0.99, 0.999, 0.9999)


@dataclass
class Series:
    capture: Capture
    index: int                  # the capture's position: its line style
    pf: int | None              # None: every PF of the capture
    label: str
    color: str
    group: GroupStats

    def column(self, name: str) -> np.ndarray:
        values = self.capture.columns[name]
        if self.pf is None:
            return values
        return values[self.capture.columns["pf"] == self.pf]

    @property
    def linestyle(self) -> str:
        return LINESTYLES[self.index % len(LINESTYLES)]

    @property
    def marker(self) -> str:
        return MARKERS[self.index % len(MARKERS)]


def parse_size(text: str | None) -> tuple[int, int]:
    """``1600x1000`` (pixels) -> (1600, 1000)."""
    if text is None:
        return DEFAULT_SIZE
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise VftraceError(f"--size {text!r}: give WIDTHxHEIGHT in pixels, e.g. 1600x1000"
                           ) from None
    if not (MIN_SIZE[0] <= w <= MAX_SIZE[0] and MIN_SIZE[1] <= h <= MAX_SIZE[1]):
        raise VftraceError(f"--size {text}: give {MIN_SIZE[0]}x{MIN_SIZE[1]} to "
                           f"{MAX_SIZE[0]}x{MAX_SIZE[1]} pixels")
    return w, h


def make_series(captures: list[Capture]) -> list[Series]:
    from matplotlib import colormaps
    per_pf = sum(len(c.snapshot.per_pf) for c in captures) <= MAX_SERIES_PER_PF
    palette = colormaps["tab10"].colors
    out: list[Series] = []
    for i, cap in enumerate(captures):
        if not cap.snapshot.records:
            continue
        if per_pf:
            groups = [(g.key.pf, f"{cap.label} pf{g.key.pf}", g) for g in cap.snapshot.per_pf]
        else:
            groups = [(None, cap.label, cap.snapshot.overall)]
        for pf, label, g in groups:
            out.append(Series(cap, i, pf, label, _hex(palette[len(out) % len(palette)]), g))
    return out


def _hex(rgb) -> str:
    return "#" + "".join(f"{round(c * 255):02x}" for c in rgb[:3])


def ns_label(value: float, _pos=None) -> str:
    """Compact time for ticks and labels: 100ns, 2.5µs, 10µs, 1ms (3 significant digits,
    no trailing zeros)."""
    if value < 0:
        return "-" + ns_label(-value)
    value = float(f"{value:.3g}")
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if value >= scale:
            return f"{value / scale:g}{unit}"
    return f"{value:g}ns"


def make_figure(captures: list[Capture], size: tuple[int, int] = DEFAULT_SIZE):
    """The four-panel figure (a matplotlib ``Figure``, not attached to pyplot)."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    series = make_series(captures)
    if not series:
        raise VftraceError("nothing to plot: the capture(s) hold no switch records")
    w, h = size
    dpi = min(max(100 * math.sqrt(w * h / (DEFAULT_SIZE[0] * DEFAULT_SIZE[1])), 50), 300)
    fig = Figure(figsize=(w / dpi, h / dpi), dpi=dpi, layout="constrained")
    (cdf, split), (timeline, exits) = fig.subplots(2, 2)
    budgets = sorted({c.budget_ns for c in captures})
    plot_cdf(cdf, series, budgets)
    plot_split(split, series)
    plot_over_time(timeline, series, budgets)
    plot_exits(exits, series)
    handles = [Line2D([], [], color=s.color, linestyle=s.linestyle, lw=2, marker=s.marker,
                      markersize=5, label=s.label) for s in series]
    # A CDF rises from bottom left to top right, so its lower right (or upper left) is
    # empty: "best" puts the one legend for every panel there, and the figure's edges
    # stay free for the warnings.
    cdf.legend(handles=handles, loc="best", title="series (same in all panels)",
               fontsize="medium", framealpha=0.9)
    title = " vs ".join(c.label for c in captures)
    total = sum(c.records for c in captures)
    fig.suptitle(f"VF switch times: {title}  ({total} switches, budget "
                 f"{', '.join(ns_label(b) for b in budgets)})", fontsize="x-large")
    if warnings := figure_warnings(captures):
        # supxlabel takes part in the constrained layout: it never covers the axes.
        text = "\n".join(textwrap.wrap("WARNING: " + "; ".join(warnings), 160))
        fig.supxlabel(text, color="#b00020", fontsize="medium", fontweight="bold")
    return fig


def figure_warnings(captures: list[Capture]) -> list[str]:
    """Missing data, stated on the figure itself: a plot pasted into a paper keeps it."""
    out = []
    for c in captures:
        lost = c.lost_total
        if lost is None:
            out.append(f"{c.label}: lost records unknown")
        elif lost:
            out.append(f"{c.label}: {lost} records lost")
        if c.snapshot.seq_gaps_total:
            out.append(f"{c.label}: {c.snapshot.seq_gaps_total} seq gaps")
        if c.truncated:
            out.append(f"{c.label}: truncated capture")
    return out


def _ns_axis(axis) -> None:
    from matplotlib.ticker import FuncFormatter
    axis.set_major_formatter(FuncFormatter(ns_label))
    axis.set_minor_formatter(FuncFormatter(lambda v, p: ""))


def _mark_budgets(ax, budgets: list[int], vertical: bool) -> None:
    for b in budgets:
        line = ax.axvline if vertical else ax.axhline
        line(b, color="#b00020", linestyle=(0, (4, 3)), lw=1.3, zorder=1)
        text = f"budget {ns_label(b)}"
        if vertical:
            ax.annotate(text, (b, 0.02), xycoords=("data", "axes fraction"),
                        xytext=(4, 0), textcoords="offset points", rotation=90,
                        va="bottom", ha="left", color="#b00020", fontsize="small")
        else:
            ax.annotate(text, (0.01, b), xycoords=("axes fraction", "data"),
                        xytext=(0, 3), textcoords="offset points", va="bottom",
                        color="#b00020", fontsize="small")


def plot_cdf(ax, series: list[Series], budgets: list[int]) -> None:
    """Empirical CDF on a log time axis; the y axis is logit so the median and the
    p99.9 tail both get room."""
    from matplotlib.ticker import FixedLocator, NullLocator
    largest = 1
    for s in series:
        values = np.sort(s.column("switch_ns"))
        n = values.size
        largest = max(largest, n)
        ranks = _cdf_ranks(n)
        ax.plot(np.maximum(values[ranks], 1), (ranks + 0.5) / n, color=s.color,
                linestyle=s.linestyle, lw=1.8, drawstyle="steps-post")
    ax.set_xscale("log")
    ax.set_yscale("logit")
    low, high = 0.5 / largest, 1 - 0.5 / largest
    ticks = [p for p in PERCENTILE_TICKS if low <= p <= high]
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.set_yticklabels([f"p{100 * p:g}" for p in ticks])
    ax.set_ylim(low, high)
    _include_budget(ax, series, budgets)
    _mark_budgets(ax, budgets, vertical=True)
    _ns_axis(ax.xaxis)
    ax.set_xlabel("switch time (log scale)")
    ax.set_ylabel("percentile of switches (logit scale)")
    ax.set_title("Switch time CDF")
    ax.grid(True, which="major", alpha=0.3)


def _cdf_ranks(n: int) -> np.ndarray:
    """Every rank of a small sample; for a large one, even ranks plus ranks packed
    towards the tail so p99.9 keeps its shape."""
    if n <= CDF_POINTS:
        return np.arange(n)
    even = np.linspace(0, n - 1, CDF_POINTS // 2)
    tail = n - np.geomspace(1, n, CDF_POINTS // 2)
    return np.unique(np.clip(np.concatenate([even, tail]).astype(np.int64), 0, n - 1))


def _include_budget(ax, series: list[Series], budgets: list[int]) -> None:
    """Widen the time axis to show the budget line when it lies outside the data."""
    lo = min(max(int(s.column("switch_ns").min()), 1) for s in series)
    hi = max(int(s.column("switch_ns").max()) for s in series)
    lo, hi = min([lo, *budgets]), max([hi, *budgets])
    ax.set_xlim(lo / 1.5, hi * 1.5)


def plot_split(ax, series: list[Series]) -> None:
    """Mean revoke and grant time per switch, stacked: their sum is the mean switch."""
    labels = [s.label for s in series]
    y = np.arange(len(series))[::-1]
    for yi, s in zip(y, series):
        revoke, grant = s.group.revoke.mean, s.group.grant.mean
        ax.barh(yi, revoke, color=s.color, edgecolor=s.color, height=0.5)
        ax.barh(yi, grant, left=revoke, color=s.color, alpha=0.35, hatch="//",
                edgecolor=s.color, height=0.5)
        total = revoke + grant
        share = revoke / total if total else 0.0
        ax.annotate(f"revoke {ns_label(revoke)} ({100 * share:.0f}%)  +  grant "
                    f"{ns_label(grant)}  =  {ns_label(total)}",
                    (total, yi), xytext=(6, 0), textcoords="offset points", va="center",
                    fontsize="small")
    ax.set_yticks(y, labels)
    widest = max(s.group.revoke.mean + s.group.grant.mean for s in series)
    ax.set_xlim(0, widest * 2.1)          # room for the annotations right of the bars
    _ns_axis(ax.xaxis)
    ax.set_xlabel("mean time per switch (dark: revoke, light: grant)")
    ax.set_title("Revoke vs grant")
    ax.grid(True, axis="x", alpha=0.3)


def plot_over_time(ax, series: list[Series], budgets: list[int]) -> None:
    """Every switch as a faint point, plus a rolling median per series."""
    from matplotlib import patheffects
    for s in series:
        t = s.column("t_ns")
        values = s.column("switch_ns")
        start = int(s.capture.columns["t_ns"].min())
        seconds = (t - start) / 1e9
        step = max(1, values.size // SCATTER_POINTS)
        shown = values.size // step
        # Fainter points as they get denser, so the median lines stay readable.
        alpha = float(np.clip(0.3 * math.sqrt(2000 / max(shown, 1)), 0.04, 0.3))
        ax.scatter(seconds[::step], np.maximum(values[::step], 1), s=6, color=s.color,
                   alpha=alpha, marker=s.marker, linewidths=0, rasterized=True, zorder=2)
    for s in series:                    # every line above every cloud of points
        start = int(s.capture.columns["t_ns"].min())
        centers, medians = rolling_median((s.column("t_ns") - start) / 1e9,
                                          s.column("switch_ns"))
        ax.plot(centers, medians, color=s.color, linestyle=s.linestyle, lw=2, zorder=3,
                path_effects=[patheffects.withStroke(linewidth=4, foreground="white")])
    ax.set_yscale("log")
    _mark_budgets(ax, budgets, vertical=False)
    lo = min(max(int(s.column("switch_ns").min()), 1) for s in series)
    hi = max(int(s.column("switch_ns").max()) for s in series)
    ax.set_ylim(min([lo, *budgets]) / 1.5, max([hi, *budgets]) * 1.5)
    _ns_axis(ax.yaxis)
    ax.set_xlabel("seconds since the capture's first switch")
    ax.set_ylabel("switch time (log scale)")
    ax.set_title("Switch time over time (points: switches, line: rolling median)")
    ax.grid(True, which="major", alpha=0.3)


def rolling_median(seconds: np.ndarray, values: np.ndarray, bins: int = 100
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Medians over equal time bins (each with enough switches), from the statistics
    core's histogram so they match the table's percentile definition."""
    if values.size < 2 or seconds.max() <= seconds.min():
        return np.array([]), np.array([])
    bins = max(1, min(bins, values.size // 20))
    edges = np.linspace(seconds.min(), seconds.max(), bins + 1)
    which = np.clip(np.searchsorted(edges, seconds, side="right") - 1, 0, bins - 1)
    centers, medians = [], []
    for b in range(bins):
        chunk = values[which == b]
        if chunk.size >= 5:
            hist = Histogram()
            hist.add_array(chunk)
            centers.append((edges[b] + edges[b + 1]) / 2)
            medians.append(hist.percentiles([50])[0])
    return np.array(centers), np.array(medians, dtype=float)


def plot_exits(ax, series: list[Series]) -> None:
    """Share of switches with 0, 1, 2... KVM exits, bars grouped per series."""
    from matplotlib.ticker import FuncFormatter
    width = 0.8 / len(series)
    any_exits = False
    for i, s in enumerate(series):
        exits = s.column("kvm_exits")
        any_exits |= bool(exits.any())
        counts = np.bincount(np.clip(exits, 0, EXIT_BINS), minlength=EXIT_BINS + 1)
        share = counts / exits.size
        x = np.arange(EXIT_BINS + 1) - 0.4 + width * (i + 0.5)
        shown = share > 0
        ax.bar(x[shown], share[shown], width=width, color=s.color,
               hatch=("", "//", "..", "xx")[s.index % 4], edgecolor="white", lw=0.5)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, p: f"{100 * v:g}%"))
    ax.set_xticks(np.arange(EXIT_BINS + 1),
                  [str(k) for k in range(EXIT_BINS)] + [f"≥{EXIT_BINS}"])
    ax.set_xlim(-0.6, EXIT_BINS + 0.6)
    ax.set_xlabel("KVM exits during the switch")
    ax.set_ylabel("share of switches (log scale)")
    if any_exits:
        means = "\n".join(f"{s.label}: {s.group.exits_per_switch:.2g}" for s in series)
        ax.text(0.98, 0.96, f"mean exits per switch\n{means}", transform=ax.transAxes,
                ha="right", va="top", fontsize="small",
                bbox={"facecolor": "white", "edgecolor": "#ccc", "alpha": 0.9})
    ax.set_title("KVM exits per switch" if any_exits
                 else "KVM exits per switch: none during any switch")
    ax.grid(True, axis="y", which="major", alpha=0.3)


FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}
DETERMINISTIC = {"svg.hashsalt": "vftrace"}   # SVG ids from a fixed salt, not a random one


def save_figure(fig, path: Path) -> None:
    """PNG, SVG or PDF by the file's extension, at the figure's size in pixels."""
    import matplotlib
    from tracer.capture.output import atomic_output   # never through a symlink, never half-written
    fmt = FORMATS[path.suffix.lower()]
    with atomic_output(path, "wb") as f, matplotlib.rc_context(DETERMINISTIC):
        fig.savefig(f, format=fmt, dpi=fig.dpi, metadata=_metadata(fmt))


def _metadata(fmt: str) -> dict:
    # No creation date: the same capture gives the same file (reviewable diffs).
    return {"png": {"Software": "vftrace report"}, "svg": {"Date": None},
            "pdf": {"CreationDate": None}}[fmt]


def svg_text(fig) -> str:
    """The figure as an SVG document for inlining in HTML (no XML prolog, no DOCTYPE)."""
    import io

    import matplotlib
    buf = io.StringIO()
    with matplotlib.rc_context(DETERMINISTIC):
        fig.savefig(buf, format="svg", dpi=fig.dpi, metadata={"Date": None})
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    # The RDF block only names the generator; inline it is noise.
    start, end = text.find("<metadata>"), text.find("</metadata>")
    if 0 <= start < end:
        text = text[:start] + text[end + len("</metadata>"):]
    return text
