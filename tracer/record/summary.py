"""The end-of-run table and the recorder's progress line, in the style of funclatency
and ``perf kvm stat``: one line per group, latencies in human units."""
from __future__ import annotations

from tracer.model import group_columns as gc
from tracer.model.kernel_hist import accounting_warning, exact_line
from tracer.model.schema import depth_of, reader_pause, unmeasured
from tracer.model.stats import Snapshot, Stats
from tracer.model.units import fmt_ns, fmt_rate

COLUMNS = gc.pick("group", "count", "p50", "p90", "p99", "p999", "max", "p50_corr",
                  "own_share", "over_budget", "revoke", "grant", "exits", "blocked")
HEADER = gc.header(COLUMNS)


def _lost(meta: dict | None) -> tuple[int, dict]:
    if not meta:
        return 0, {}
    per_cpu = meta.get("lost_records_per_cpu") or {}
    return int(meta.get("lost_total", sum(per_cpu.values()))), per_cpu


def format_summary(snap: Snapshot, meta: dict | None = None) -> str:
    """The table printed at the end of a run (or by a report on a capture)."""
    lost, per_cpu = _lost(meta)
    lines = [f"VF switches: {snap.records}   budget: {fmt_ns(snap.budget_ns)}   "
             f"lost records: {lost}"]
    if meta and meta.get("switch_source"):
        lines[0] += f"   source: {meta['switch_source']}"
    if meta:
        lines[0] += f"   depth: {depth_of(meta)}"
    if snap.ignored:
        lines.append(f"filtered out: {snap.ignored} records ({_filters(snap.filters)})")
    if lost or snap.seq_gaps_total:
        parts = []
        if lost:
            cpus = " ".join(f"{cpu}:{n}" for cpu, n in sorted(per_cpu.items()) if n)
            parts.append(f"{lost} records lost" + (f" (per CPU {cpus})" if cpus else ""))
        if snap.seq_gaps_total:
            pfs = " ".join(f"pf{pf}:{n}" for pf, n in snap.seq_gaps.items() if n)
            parts.append(f"{snap.seq_gaps_total} seq gaps ({pfs})")
        if pause := reader_pause(meta):
            parts.append(pause)
        lines.append("WARNING: " + "; ".join(parts) + ": figures below miss those switches")
    if unaccounted := accounting_warning(meta):
        lines.append(f"WARNING: {unaccounted}: figures below miss those switches")
    if not snap.records:
        lines.append("no switches recorded")
        return "\n".join(lines) + "\n"
    if exact := exact_line(meta, snap.filters):
        lines.append(exact)
    lines.append(gc.own_cost_line(snap.overall, meta))
    if meta and meta.get("probe_costs"):
        lines.append(f"probe costs per run: {gc.probe_costs_text(meta)}")
    lines.append("")
    skip = unmeasured(meta)
    lines.extend(gc.align([HEADER, *(gc.cells(COLUMNS, g, skip)
                                     for g in gc.table_groups(snap))]))
    if skip:
        lines.append(f"{gc.NOT_MEASURED}: not measured at depth {depth_of(meta)} "
                     "(--depth guests measures every column)")
    return "\n".join(lines) + "\n"


def _filters(filters: dict) -> str:
    return ", ".join(f"{k}={','.join(map(str, v))}" for k, v in filters.items()
                     if v is not None) or "none"


def progress_line(stats: Stats, lost: int | dict | None = 0, now: float | None = None) -> str:
    """One line for the recorder's stderr: records so far, arrival rate, lost records."""
    total = sum(lost.values()) if isinstance(lost, dict) else int(lost or 0)
    return f"records {stats.records}  rate {fmt_rate(stats.rate(now))}  lost {total}"
