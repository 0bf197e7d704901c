"""What a Prometheus scrape shows: one ``MetricsState`` turned into the text format
(0.0.4): ``render``.

The state is read, at scrape time, from the statistics core and the kernel's histograms
by the thread that owns them (``tap.py``); this module has no state of its own and
updates nothing per record.  Names follow Prometheus conventions: base units (seconds,
bytes), ``_total`` for counters.  Labels are bounded: ``pf`` and ``vf`` (the incoming VF,
as the kernel keys its histograms), ``phase``, an exit ``reason`` and ``window``, a
loss ``kind`` and ``side``; never a switch, pid or tid.

Buckets: the E12 series (1, 1.2, 1.5, 1.8, 2.2, 2.7, 3.3, 3.9, 4.7, 5.6, 6.8, 8.2) in
every decade from 10 ns to 100 ms.  Neighbouring bounds are at most 25% apart, so
``histogram_quantile`` (which interpolates inside one bucket) is within 25% of the true
quantile between 10 ns and 100 ms; every power of ten (100 ns, 1 us, ...) is a bound, so
"the share of switches within 100 ns" is one bucket over the count.  Each bound's count
comes from the statistics core's own buckets (0.049% wide): exact below 2048 ns, and
above it at most the values within 0.1% of the bound can sit on the wrong side
(``stats.Histogram.count_above``).

The two histogram families are most of a scrape (48 series x 88 lines with 3 PFs of 4
VFs) and are formatted here from each series' counts with label text made once:
prometheus_client builds a Sample per bucket and formats each in Python (~14 ms a scrape
on a host, seconds in the TCG lab, where it starved the recorder's reader).  Everything
else goes through prometheus_client's ``generate_latest``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from prometheus_client import generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    InfoMetricFamily, Metric)

from ..model import exit_reasons
from ..model.kernel_hist import PHASE_COLUMNS, KernelHist, over_budget
from ..model.stats import Cuts, Histogram, VfHistograms

E12 = (10, 12, 15, 18, 22, 27, 33, 39, 47, 56, 68, 82)
BOUNDS_NS: tuple[int, ...] = tuple(m * 10 ** d for d in range(0, 7) for m in E12) + (100_000_000,)
NS = 1e9
PREFIX = "vftrace"


@dataclass
class MetricsState:
    """Everything one scrape shows, read by the owner of the data (see tap.py)."""
    info: dict[str, str]
    budget_ns: int
    vfs: dict[tuple[int, int], VfHistograms]      # from the records (statistics core)
    kernel: list[KernelHist] | None = None         # every switch, where the source has them
    exits: list[dict] = field(default_factory=list)    # meta background.kvm_exits rows
    kvm_vendor: str | None = None
    lost: dict[tuple[str, str], int] = field(default_factory=dict)   # (kind, side) -> n
    kernel_drops: dict[str, int] = field(default_factory=dict)
    floor_ns: dict[str, float] = field(default_factory=dict)         # probe mode -> ns
    probe_cost_ns: dict[str, float] = field(default_factory=dict)    # hit type -> ns
    seq_gaps: dict[int, int] = field(default_factory=dict)
    stale: bool = False          # the owner did not answer in time: the previous state
    read_seconds: float = 0.0    # what building this state took the owner's loop


def cumulative(h: Histogram) -> list[tuple[str, float]]:
    """A histogram's ``le`` buckets (cumulative counts, seconds), +Inf last."""
    counts = h.counts_at_or_below(_BOUNDS).tolist()
    return [*zip(_LE, counts), ("+Inf", h.total)]


# Each bound in seconds, as the shortest decimal ("1e-07", not 1.0000000000000001e-07),
# so a query can name one: le="1e-07".
LE = {b: repr(float(f"{b}e-9")) for b in BOUNDS_NS}
_LE = [LE[b] for b in BOUNDS_NS]
_BOUNDS = Cuts(BOUNDS_NS)


def families(state: MetricsState) -> Iterator[Metric]:
    """Every family but the switch duration histograms (``histograms_text``)."""
    yield InfoMetricFamily(PREFIX, "vftrace's version and what it traces", value=state.info)
    yield _gauge("budget_seconds", "the switch budget over-budget counts use",
                 [([], state.budget_ns / NS)])
    yield _gauge("metrics_stale", "1 when this scrape shows the previous state: the "
                 "recorder did not answer in time", [([], int(state.stale))])
    yield _gauge("metrics_read_seconds", "what reading this scrape's state took the "
                 "recorder's loop (no records were drained meanwhile)",
                 [([], state.read_seconds)])
    yield from _per_vf_counters(state)
    yield from _exits(state)
    yield _counter("lost_records", "records the kernel (ring buffer full) or user space "
                   "(a value no capture holds) could not keep", ("kind", "side"),
                   [([k, s], n) for (k, s), n in sorted(state.lost.items())])
    yield _counter("kernel_drops", "what the kernel side could not keep besides full "
                   "buffers (windows, full maps, runs the kernel skipped)", ("what",),
                   [([k], n) for k, n in sorted(state.kernel_drops.items())])
    yield _counter("switch_seq_gaps", "switches missing from the records by their "
                   "sequence numbers", ("pf",),
                   [([str(pf)], n) for pf, n in sorted(state.seq_gaps.items())])
    yield _gauge("probe_floor_seconds", "one probe pair around a near-empty call, median",
                 [([m], ns / NS) for m, ns in sorted(state.floor_ns.items())], ("mode",))
    yield _gauge("probe_cost_seconds", "what one probe run costs a switch window, median",
                 [([t], ns / NS) for t, ns in sorted(state.probe_cost_ns.items())], ("type",))


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')


def _labels(names: tuple[str, ...], values) -> str:
    return ",".join(f'{n}="{_escape(str(v))}"' for n, v in zip(names, values))


def _histogram_text(name: str, help_: str, series) -> str:
    """One histogram family in the text format; ``series`` yields (labels text,
    Histogram, sum in ns).  Bucket lines are the bound's label text and the count."""
    name = f"{PREFIX}_{name}"
    out = [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
    for labels, h, sum_ns in series:
        bucket = f"{name}_bucket{{{labels},le="
        out.extend([f'{bucket}"{le}"}} {c}' for le, c in cumulative(h)])
        out.append(f"{name}_count{{{labels}}} {h.total}")
        out.append(f"{name}_sum{{{labels}}} {sum_ns / NS!r}")
    return "\n".join(out) + "\n"


RAW_HELP = ("switch time per phase (switch, revoke, grant), raw; from the kernel's histograms "
            "of every switch where the source has them, else from the records")
CORRECTED_HELP = ("switch time with vftrace's own probe cost taken off; from the kernel's "
                  "histograms of every switch where the source has them, else from the records")


def histograms_text(state: MetricsState) -> str:
    """The switch duration histograms, raw per phase and corrected, as text."""
    kernel = sorted(state.kernel or (), key=lambda k: (k.pf, k.vf, k.phase))
    if state.kernel is not None:
        raw = [(_labels(("pf", "vf", "phase"), (k.pf, k.vf, k.phase)), k.hist, k.sum_ns)
               for k in kernel if k.count and k.phase in PHASE_COLUMNS]
    else:
        raw = [(_labels(("pf", "vf", "phase"), (pf, vf, phase)), g.hists[col], g.sums[col])
               for (pf, vf), g in state.vfs.items()
               for phase, col in PHASE_COLUMNS.items() if g.hists[col].total]
    corrected = [(_labels(("pf", "vf"), (k.pf, k.vf)), k.hist, k.sum_ns)
                 for k in kernel if k.count and k.phase == "corrected"]
    if not any(k.phase == "corrected" for k in kernel):      # the records', then
        corrected = [(_labels(("pf", "vf"), (pf, vf)), g.corrected, g.corrected_sum)
                     for (pf, vf), g in state.vfs.items()
                     if g.corrected is not None and g.corrected.total]
    return (_histogram_text("switch_duration_seconds", RAW_HELP, raw)
            + _histogram_text("switch_corrected_duration_seconds", CORRECTED_HELP, corrected))


class _Families:
    """A state's families as prometheus_client's ``generate_latest`` reads a registry."""

    def __init__(self, state: MetricsState | None, collectors) -> None:
        self.state, self.collectors = state, collectors

    def collect(self) -> Iterator[Metric]:
        for c in self.collectors:
            yield from c.collect()
        if self.state is not None:
            yield from families(self.state)


def render(state: MetricsState | None, collectors=()) -> bytes:
    """The whole scrape: ``collectors`` (e.g. prometheus_client's ProcessCollector) and
    the state's families through prometheus_client, then the histograms."""
    text = generate_latest(_Families(state, collectors))
    if state is not None:
        text += histograms_text(state).encode()
    return text


def _per_vf_counters(state: MetricsState) -> Iterator[Metric]:
    labels = ("pf", "vf")
    switches, over = [], []
    if state.kernel is not None:
        for k in state.kernel:
            if k.phase == "switch" and k.count:
                switches.append(([str(k.pf), str(k.vf)], k.count))
                over.append(([str(k.pf), str(k.vf)], over_budget(k.hist, state.budget_ns)[0]))
    else:
        for (pf, vf), g in state.vfs.items():
            switches.append(([str(pf), str(vf)], g.count))
            over.append(([str(pf), str(vf)], g.over_budget))
    yield _counter("switches", "switches that closed (every one, from the kernel's "
                   "histograms, where the source has them)", labels, switches)
    yield _counter("switches_over_budget", "switches longer than the budget", labels, over)
    per = (
        ("switch_records", None, "switch records that reached user space", 1),
        ("switch_guest_exits", "kvm_exits", "KVM exits that began inside switch windows "
         "(from the records)", 1),
        ("switch_guest_exit_seconds", "exit_ns", "time vCPUs spent out in those exits", NS),
        ("switch_vcpu_kicks", "vcpu_kicks", "vCPU kick requests inside switch windows", 1),
        ("blocked_accesses", "blocked_accesses", "guest accesses that blocked on a "
         "switched-off VF, charged to the switch that released them", 1),
        ("blocked_seconds", "blocked_ns", "time those accesses waited", NS),
        ("unmap_bytes", "unmap_bytes", "bytes unmapped from the IOMMU in switches", 1),
        ("map_bytes", "map_bytes", "bytes mapped into the IOMMU in switches", 1))
    for name, col, help_, scale in per:
        rows = [([str(pf), str(vf)], (g.count if col is None else g.sums[col]) / scale)
                for (pf, vf), g in state.vfs.items()]
        yield _counter(name, help_, labels, rows)


def _exits(state: MetricsState) -> Iterator[Metric]:
    """KVM exits by reason, in and out of switch windows: the kernel's own totals."""
    count: dict[tuple[str, str], int] = {}
    ns: dict[tuple[str, str], int] = {}
    for e in state.exits:
        key = (exit_reasons.name(int(e["reason"]), state.kvm_vendor),
               "in" if e["in_window"] else "out")
        count[key] = count.get(key, 0) + int(e["count"])
        ns[key] = ns.get(key, 0) + int(e["ns"])
    labels = ("reason", "window")
    yield _counter("guest_exits", "KVM exits of every guest, by reason; window=in: "
                   "began inside a switch window", labels,
                   [(list(k), n) for k, n in sorted(count.items())])
    yield _counter("guest_exit_seconds", "time vCPUs spent out in those exits", labels,
                   [(list(k), n / NS) for k, n in sorted(ns.items())])


def _counter(name, help_, labels, rows) -> CounterMetricFamily:
    m = CounterMetricFamily(f"{PREFIX}_{name}", help_, labels=list(labels))
    for values, v in rows:
        m.add_metric(values, v)
    return m


def _gauge(name, help_, rows, labels=()) -> GaugeMetricFamily:
    m = GaugeMetricFamily(f"{PREFIX}_{name}", help_, labels=list(labels))
    for values, v in rows:
        m.add_metric(values, v)
    return m
