"""The end-of-run table and the recorder's progress line, in the style of funclatency
and ``perf kvm stat``: one line per group, latencies in human units."""
from __future__ import annotations

from tracer.model.stats import GroupStats, Snapshot, Stats
from tracer.model.units import fmt_ns, fmt_rate


HEADER = ("GROUP", "COUNT", "P50", "P90", "P99", "P99.9", "MAX",
          "REVOKE", "GRANT", ">BUDGET", "EXITS/SW", "BLOCKED/SW")


def _row(g: GroupStats) -> tuple[str, ...]:
    s = g.switch
    return (g.key.label, str(g.count), fmt_ns(s.p50), fmt_ns(s.p90), fmt_ns(s.p99),
            fmt_ns(s.p999), fmt_ns(s.max), fmt_ns(g.revoke.mean), fmt_ns(g.grant.mean),
            f"{100 * g.over_budget_share:.2f}%", f"{g.exits_per_switch:.1f}",
            f"{g.blocked_per_switch:.1f}")


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
        lines.append("WARNING: " + "; ".join(parts) + ": figures below miss those switches")
    if not snap.records:
        lines.append("no switches recorded")
        return "\n".join(lines) + "\n"
    groups = [snap.overall]
    for level in (snap.per_pf, snap.per_vf, snap.per_pair):
        if len(level) > 1 or level is snap.per_pair:   # skip levels that repeat "all"
            groups.extend(level)
    table = [HEADER, *map(_row, groups)]
    widths = [max(len(r[i]) for r in table) for i in range(len(HEADER))]
    lines.append("")
    for r in table:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


def _filters(filters: dict) -> str:
    return ", ".join(f"{k}={','.join(map(str, v))}" for k, v in filters.items()
                     if v is not None) or "none"


def progress_line(stats: Stats, lost: int | dict | None = 0, now: float | None = None) -> str:
    """One line for the recorder's stderr: records so far, arrival rate, lost records."""
    total = sum(lost.values()) if isinstance(lost, dict) else int(lost or 0)
    return f"records {stats.records}  rate {fmt_rate(stats.rate(now))}  lost {total}"
