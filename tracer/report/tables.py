"""The report's tables: rows built from the statistics core's snapshot, rendered as
text (stdout), HTML or JSON from the same ``Row`` values, so every output agrees.

Losses are never silent: each capture's block opens with its loss line, and a capture
that lost records, has seq gaps or was cut short gets a WARNING line above its table.
"""
from __future__ import annotations

import html
import textwrap
from dataclasses import asdict, dataclass, replace

from tracer.model import exit_reasons, kernel_hist
from tracer.model import group_columns as gc
from tracer.model.stats import GroupStats
from tracer.model.schema import reader_pause
from tracer.model.units import fmt_ns
from tracer.report.load import Capture


@dataclass(frozen=True, slots=True)
class Row:
    """One table line: a group of one capture, numbers straight from ``GroupStats``."""
    capture: str
    group: str            # "all", "pf0", "pf0/vf1", "pf0/0->1"
    level: str            # "all", "pf", "vf", "pair"
    count: int
    p50: int | None
    p90: int | None
    p99: int | None
    p999: int | None
    max: int | None
    over_budget: int
    over_budget_share: float
    revoke_mean: float | None
    grant_mean: float | None
    revoke_share: float | None   # of the switch time, in revoke (the rest is grant)
    exits_per_switch: float | None
    exit_ns_per_switch: float | None
    blocked_per_switch: float | None
    blocked_ns_per_switch: float | None
    # with vftrace's own cost taken off (None: the capture is not corrected)
    p50_corrected: int | None = None
    p90_corrected: int | None = None
    corrected_err_ns: float | None = None
    own_share: float | None = None


def row_of(capture: str, g: GroupStats) -> Row:
    s = g.switch
    return Row(
        capture=capture, group=g.key.label, level=g.key.level, count=g.count,
        p50=s.p50, p90=s.p90, p99=s.p99, p999=s.p999, max=s.max,
        over_budget=g.over_budget, over_budget_share=g.over_budget_share,
        revoke_mean=g.revoke.mean, grant_mean=g.grant.mean,
        revoke_share=g.revoke.mean / s.mean if s.mean else 0.0,
        exits_per_switch=g.exits_per_switch, exit_ns_per_switch=g.means.get("exit_ns", 0.0),
        blocked_per_switch=g.blocked_per_switch, blocked_ns_per_switch=g.blocked_ns_per_switch,
        **({} if g.own is None else dict(
            p50_corrected=g.own.switch.p50, p90_corrected=g.own.switch.p90,
            corrected_err_ns=round(g.own.err_ns, 1), own_share=round(g.own.share, 4))))


def capture_groups(cap: Capture) -> list[GroupStats]:
    """Overall, per PF, per (PF, incoming VF) and per (PF, from->to), as every group
    table has them."""
    return gc.table_groups(cap.snapshot)


def capture_rows(cap: Capture) -> list[Row]:
    rows = [row_of(cap.label, g) for g in capture_groups(cap)]
    gone = {f for f, needs in ROW_NEEDS.items() if not cap.unmeasured.isdisjoint(needs)}
    return [replace(r, **dict.fromkeys(gone)) for r in rows] if gone else rows


# Row fields that are a group column's quantity, so they need what it needs (None where
# the capture did not measure that).
ROW_NEEDS = {field: gc.BY_NAME[column].needs for field, column in (
    ("revoke_mean", "revoke"), ("grant_mean", "grant"), ("revoke_share", "revoke_share"),
    ("exits_per_switch", "exits"), ("exit_ns_per_switch", "exit_time"),
    ("blocked_per_switch", "blocked"), ("blocked_ns_per_switch", "blocked_time"))}


def comparison_groups(captures: list[Capture]) -> list[tuple[Capture, GroupStats]]:
    """(capture, group): overall and per-PF groups of every capture, for side-by-side
    reading."""
    out = []
    for cap in captures:
        if cap.snapshot.records:
            out.append((cap, cap.snapshot.overall))
            out.extend((cap, g) for g in cap.snapshot.per_pf)
    return out


COLUMNS = gc.pick("group", "count", "p50", "p90", "p99", "p999", "max", "p50_corr",
                  "own_share", "over_budget", "revoke", "grant", "revoke_share", "exits",
                  "exit_time", "blocked_time")
HEADER = gc.header(COLUMNS)
LEGEND = gc.legend(COLUMNS)


def cells(g: GroupStats, cap: Capture) -> tuple[str, ...]:
    return gc.cells(COLUMNS, g, cap.unmeasured)


# --- what the capture's meta says: losses, problems, context ------------------------------

def _of_type(value, kind: type):
    """A meta field as the type the report expects, or empty: an odd hand-edited meta
    loses that line of context, not the report."""
    return value if isinstance(value, kind) else kind()


@dataclass(frozen=True, slots=True)
class Note:
    warning: bool         # shown as WARNING (data is missing) rather than as a note
    text: str


def losses_line(cap: Capture) -> str:
    m = cap.meta
    lost = cap.lost_total
    parts = [f"lost records {lost if lost is not None else 'unknown'}",
             f"seq gaps {cap.snapshot.seq_gaps_total}"]
    for key, name in (("partial_windows", "partial windows"),
                      ("late_releases", "late releases"), ("orphan_releases", "orphan releases"),
                      ("late_exits", "late exits"), ("orphan_exits", "orphan exits")):
        parts.append(f"{name} {m[key] if key in m else 'unknown'}")
    if m.get("unended_exits"):          # newer captures only: not "unknown" in older ones
        parts.append(f"unended exits {m['unended_exits']}")
    drops = kernel_drops(m)
    parts.append(f"kernel drops {sum(drops.values()) if drops is not None else 'unknown'}")
    return "losses: " + ", ".join(parts)


def kernel_drops(meta: dict) -> dict[str, int] | None:
    """What the kernel side could not keep (windows not recorded, full maps; the meta's
    background.kernel_drops), or None where it was not counted."""
    drops = _of_type(meta.get("background"), dict).get("kernel_drops")
    if not isinstance(drops, dict):
        return None
    return {k: v for k, v in drops.items() if isinstance(v, int)}


def notes(cap: Capture) -> list[Note]:
    m, snap = cap.meta, cap.snapshot
    out = [Note(True, p) for p in cap.problems]
    if cap.truncated:
        out.append(Note(True, "the capture was truncated: the figures cover its whole rows "
                              "only"))
    lost = cap.lost_total
    if lost:
        per_cpu = m.get("lost_records_per_cpu") or {}
        cpus = " ".join(f"{cpu}:{n}" for cpu, n in sorted(per_cpu.items()) if n)
        out.append(Note(True, f"{lost} records lost by the kernel" +
                        (f" (per CPU {cpus})" if cpus else "") +
                        ": the figures miss those switches"))
    if snap.seq_gaps_total:
        pfs = " ".join(f"pf{pf}:{n}" for pf, n in snap.seq_gaps.items() if n)
        out.append(Note(True, f"{snap.seq_gaps_total} seq gaps ({pfs}): switches missing "
                              "from the capture"))
    if (lost or snap.seq_gaps_total) and (pause := reader_pause(m)):
        out.append(Note(False, f"{pause} between two reads of the buffers: records are lost "
                               "when a pause outlasts what the buffer holds"))
    if m.get("partial_windows"):
        out.append(Note(False, f"{m['partial_windows']} partial windows: switch ends seen "
                               "without their start (probes armed mid-switch or a missed "
                               "begin); not counted"))
    releases = int(m.get("late_releases") or 0) + int(m.get("orphan_releases") or 0)
    if releases:
        late_ns = int(m.get("late_release_ns") or 0)
        out.append(Note(True, f"{releases} blocked-access releases not joined to their switch "
                              "(late or orphaned): blocked time is undercounted" +
                              (f" (by {late_ns} ns for the late ones)" if late_ns else "")))
    exits = int(m.get("late_exits") or 0) + int(m.get("orphan_exits") or 0)
    if exits:
        out.append(Note(True, f"{exits} KVM exits outlived their switch and reached user "
                              "space too late to be joined (late or orphaned): exit_ns is "
                              "undercounted"))
    if m.get("unended_exits"):
        out.append(Note(False, f"{m['unended_exits']} KVM exits had not ended when their "
                               "switch was passed on (still running at the stop, or their VM "
                               "gone): their time is not in exit_ns"))
    dropped = {k: n for k, n in (kernel_drops(m) or {}).items() if n > 0}
    if dropped:
        what = ", ".join(f"{k} {n}" for k, n in sorted(dropped.items()))
        out.append(Note(True, f"the kernel side could not keep everything ({what}; see "
                              "VFT_DROP_* in bpf/vftrace.h): figures miss those"))
    background = _of_type(m.get("background"), dict)
    irq = {k: v.get("count") for k, v in _of_type(background.get("irq_calls"), dict).items()
           if isinstance(v, dict) and isinstance(v.get("count"), int) and v["count"] > 0}
    if irq:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(irq.items()))
        out.append(Note(False, f"{sum(irq.values())} calls made in interrupt context ({kinds}): "
                               "no switch made them, so none is charged to a window"))
    negative = {k: n for k, n in _of_type(background.get("negative_durations"), dict).items()
                if isinstance(n, int) and n > 0}
    if negative:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(negative.items()))
        out.append(Note(True, f"{sum(negative.values())} durations came out negative ({kinds}) "
                              "and were discarded: those switches or calls are missing"))
    unwritable = background.get("out_of_range_records")
    if isinstance(unwritable, int) and unwritable > 0:
        out.append(Note(True, f"{unwritable} records held a value above int64 (a wrapped "
                              "negative the kernel side did not catch) and were discarded"))
    unreadable = background.get("unreadable_ring_records")
    if isinstance(unreadable, int) and unreadable > 0:
        out.append(Note(True, f"{unreadable} ring-buffer records were of a size the reader "
                              "did not expect and were skipped: those records are missing"))
    for w in _of_type(m.get("warnings"), list):
        out.append(Note(False, f"recorder: {w}"))
    filters = {k: v for k, v in _of_type(m.get("filters"), dict).items() if v}
    if filters:
        out.append(Note(False, "recorded with filters " + ", ".join(
            f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in filters.items())))
    return out


def context_line(cap: Capture) -> str:
    m = cap.meta
    bits = [f"{key} {m[key]}" for key in ("kernel", "host", "switch_source", "buffer", "reader")
            if m.get(key)]
    bits.append(f"depth {cap.depth}")
    if m.get("start_time"):
        bits.append(f"start {m['start_time']}")
    bits.append(f"span {cap.duration_s:.1f} s")
    return "  ".join(bits)


def probes_line(cap: Capture) -> str | None:
    modes = _of_type(cap.meta.get("probe_modes"), dict)
    if not modes:
        return None
    floor = _of_type(cap.meta.get("floor_ns"), dict)
    floors = ", ".join(f"{mode} {v['median_ns']}ns" for mode, v in floor.items()
                       if isinstance(v, dict) and "median_ns" in v)
    text = "probes: " + ", ".join(f"{hook} {mode}" for hook, mode in modes.items())
    text += f"  (probe floor: {floors})" if floors else ""
    if isinstance(cap.meta.get("probe_costs"), dict):
        text += f"  (cost per probe run: {gc.probe_costs_text(cap.meta)})"
    return text


def exact_line(cap: Capture) -> str | None:
    """Every switch, from the kernel's histograms (exact whatever records were lost)."""
    return kernel_hist.exact_line(cap.meta, cap.snapshot.filters)


def every_switch_json(cap: Capture) -> dict | None:
    try:
        hists = kernel_hist.from_meta(cap.meta.get("kernel_histograms"))
    except ValueError:
        return None
    pfs, vfs = cap.snapshot.filters.get("pfs"), cap.snapshot.filters.get("vfs")
    h = kernel_hist.selected(hists, pfs, vfs)
    if h is None:
        return None
    out = {**kernel_hist.percentiles_json(h), "source": "kernel histograms"}
    c = kernel_hist.selected(hists, pfs, vfs, "corrected")
    if c is not None:
        out["corrected"] = kernel_hist.percentiles_json(c)
    return out


def own_cost_line(cap: Capture) -> str | None:
    """vftrace's own share of the switch time, and the corrected percentiles."""
    if not cap.records:
        return None
    return gc.own_cost_line(cap.snapshot.overall, cap.meta)


# --- KVM exits by reason, from the meta's background totals ---------------------------------

@dataclass(frozen=True, slots=True)
class ExitRow:
    reason: str
    in_switch: int
    in_switch_ns: int
    outside: int
    outside_ns: int


def exit_rows(cap: Capture) -> list[ExitRow]:
    """Exits per reason inside switch windows and outside them (the whole capture,
    including exits that the per-switch counts cannot show)."""
    vendor = cap.meta.get("kvm_vendor")
    totals: dict[str, list[int]] = {}
    for e in _of_type(_of_type(cap.meta.get("background"), dict).get("kvm_exits"), list):
        try:
            name = exit_reasons.name(int(e["reason"]), vendor)
            t = totals.setdefault(name, [0, 0, 0, 0])
            base = 0 if e.get("in_window") else 2
            t[base] += int(e["count"])
            t[base + 1] += int(e["ns"])
        except (KeyError, TypeError, ValueError):
            continue                 # a malformed entry does not hide the others
    rows = [ExitRow(name, *t) for name, t in totals.items()]
    return sorted(rows, key=lambda r: (-r.in_switch, -r.outside, r.reason))


EXIT_HEADER = ("KVM EXIT", "IN SWITCHES", "TIME", "OUTSIDE", "TIME")


def exit_cells(r: ExitRow) -> tuple[str, ...]:
    return (r.reason, str(r.in_switch), fmt_ns(r.in_switch_ns), str(r.outside),
            fmt_ns(r.outside_ns))


# --- renderings ---------------------------------------------------------------------------

def render_text(captures: list[Capture]) -> str:
    out: list[str] = []
    for cap in captures:
        out.append(f"== {cap.label} ({cap.path}) ==")
        out.append(context_line(cap))
        out.append(f"VF switches: {cap.records}   budget: {fmt_ns(cap.budget_ns)}   "
                   f"{losses_line(cap)}")
        if (line := probes_line(cap)) is not None:
            out.append(line)
        if (line := exact_line(cap)) is not None:
            out.append(line)
        if (line := own_cost_line(cap)) is not None:
            out.append(line)
        for n in notes(cap):
            out.append(("WARNING: " if n.warning else "note: ") + n.text)
        groups = capture_groups(cap)
        if groups:
            out.append("")
            out.extend(gc.align([HEADER, *(cells(g, cap) for g in groups)]))
        else:
            out.append("no switches in this capture")
        if exits := exit_rows(cap):
            out.append("")
            out.extend(gc.align([EXIT_HEADER, *map(exit_cells, exits)]))
        out.append("")
    if len(captures) > 1 and (groups := comparison_groups(captures)):
        out.append("== comparison ==")
        table = [("CAPTURE", *HEADER)] + [(c.label, *cells(g, c)) for c, g in groups]
        out.extend(gc.align(table, names=2))
        out.append("")
    if any(cap.unmeasured for cap in captures):
        out.append(f"{gc.NOT_MEASURED}: not measured at that capture's depth")
    out.append(textwrap.fill(LEGEND, 100))
    return "\n".join(out) + "\n"


def own_cost_json(cap: Capture) -> dict | None:
    """The overall group's corrected figures (None: the capture is not corrected)."""
    g = cap.snapshot.overall
    if not cap.records or g.own is None:
        return None
    return {"share": round(g.own.share, 4), "err_ns": round(g.own.err_ns, 1),
            "p50_ns": g.own.switch.p50, "p90_ns": g.own.switch.p90,
            "p99_ns": g.own.switch.p99, "raw_p50_ns": g.switch.p50,
            "raw_p90_ns": g.switch.p90}


def report_json(captures: list[Capture]) -> dict:
    """The same numbers, machine-readable (``vftrace report --json``)."""
    return {"captures": [{
        "label": cap.label, "path": str(cap.path), "budget_ns": cap.budget_ns,
        "records": cap.records, "lost_total": cap.lost_total,
        "depth": cap.depth, "unmeasured": sorted(cap.unmeasured),
        "seq_gaps": {str(k): v for k, v in cap.snapshot.seq_gaps.items()},
        "partial_windows": cap.meta.get("partial_windows"),
        "late_releases": cap.meta.get("late_releases"),
        "orphan_releases": cap.meta.get("orphan_releases"),
        "late_exits": cap.meta.get("late_exits"),
        "orphan_exits": cap.meta.get("orphan_exits"),
        "unended_exits": cap.meta.get("unended_exits"),
        "kernel_drops": kernel_drops(cap.meta),
        "probe_costs": cap.meta.get("probe_costs"),
        "own_cost": own_cost_json(cap),
        "every_switch": every_switch_json(cap),
        "truncated": cap.truncated, "problems": cap.problems,
        "notes": [asdict(n) for n in notes(cap)],
        "rows": [asdict(r) for r in capture_rows(cap)],
        "kvm_exits": [asdict(r) for r in exit_rows(cap)],
    } for cap in captures]}


def html_table(header: tuple[str, ...], rows: list[tuple[str, ...]], names: int = 1) -> str:
    """A table whose first ``names`` columns are names (left-aligned), the rest numbers."""
    esc = html.escape

    def cell(tag: str, i: int, text: str) -> str:
        return f"<{tag} class=\"name\">{esc(text)}</{tag}>" if i < names else \
            f"<{tag}>{esc(text)}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(header))
    body = "\n".join("<tr>" + "".join(cell("td", i, c) for i, c in enumerate(r)) + "</tr>"
                     for r in rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"
