"""The per-group table's columns, declared once: the end-of-run summary
(``tracer.record.summary``), the report's tables (``tracer.report.tables``) and the
dashboard's per-PF/VF table (``tui``) each pick the columns they show from
``GROUP_COLUMNS``, so a header means the same quantity, in the same unit and format,
wherever it appears.

``P50_CORR`` is the median switch time with vftrace's own cost taken off, with its
uncertainty, and ``OWN%`` the share of the raw switch time that was vftrace's own
(``tracer/model/correction.py``); both are ``-`` for a capture that is not corrected.
Headers ending ``/SW`` are means per switch; ``EXITS/SW`` and ``BLOCKED/SW`` count
(KVM exits, guest accesses blocked), ``EXIT_T/SW`` and ``BLOCK_T/SW`` are the time those
took.  Durations are ``fmt_ns``'s (812ns, 12.3us, 1.52ms).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

from .stats import GroupStats, Snapshot
from .units import fmt_ns


def per_switch(value: float) -> str:
    """A count per switch: two decimals under 10, one above."""
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def percent(share: float, digits: int) -> str:
    return f"{100 * share:.{digits}f}%"


@dataclass(frozen=True)
class Column:
    name: str                                   # what front ends pick it by
    header: str                                 # what every table prints
    value: Callable[[GroupStats], object]       # the quantity, from a group's statistics
    fmt: Callable[[object], str]                # how it reads
    meaning: str = ""                           # for a legend ("" : the header says it)
    needs: tuple[str, ...] = ()                 # capture columns it is computed from

    def cell(self, g: GroupStats, unmeasured: frozenset[str] = frozenset()) -> str:
        """Its text; NOT_MEASURED where a column it needs was not measured (a shallower
        --depth), never a 0 that reads as a measurement."""
        if unmeasured and not unmeasured.isdisjoint(self.needs):
            return NOT_MEASURED
        return self.fmt(self.value(g))

    def sort_key(self, g: GroupStats) -> float:
        """Larger first in a sorted table; a missing value (no switches) sorts last."""
        v = self.value(g)
        return v if isinstance(v, (int, float)) else 0


NOT_MEASURED = "-"


def with_error(value: float | None, err: float) -> str:
    """A corrected duration: never without its uncertainty."""
    return NOT_MEASURED if value is None else f"{fmt_ns(value)}±{fmt_ns(err)}"


def _own(g: GroupStats, attr: str):
    return None if g.own is None else getattr(g.own.switch, attr)


def _switch_time(header: str, attr: str) -> Column:
    return Column(attr, header, lambda g: getattr(g.switch, attr), fmt_ns, "switch time")


GROUP_COLUMNS: tuple[Column, ...] = (
    Column("group", "GROUP", lambda g: g.key.label, str),
    Column("count", "COUNT", lambda g: g.count, str),
    _switch_time("P50", "p50"),
    _switch_time("P90", "p90"),
    _switch_time("P99", "p99"),
    _switch_time("P99.9", "p999"),
    _switch_time("MAX", "max"),
    Column("p50_corr", "P50_CORR", lambda g: (_own(g, "p50"), g.own and g.own.err_ns),
           lambda v: with_error(v[0], v[1] or 0),
           "switch time less vftrace's own cost (± its uncertainty)"),
    Column("own_share", "OWN%", lambda g: None if g.own is None else g.own.share,
           lambda v: NOT_MEASURED if v is None else percent(v, 1),
           "share of the switch time that was vftrace's own"),
    Column("over_budget", ">BUDGET", lambda g: g.over_budget_share,
           lambda v: percent(v, 2), "share of switches over the budget"),
    Column("revoke", "REVOKE", lambda g: g.revoke.mean, fmt_ns,
           "mean time per switch in each phase", ("revoke_ns",)),
    Column("grant", "GRANT", lambda g: g.grant.mean, fmt_ns,
           "mean time per switch in each phase", ("grant_ns",)),
    Column("revoke_share", "REV%",
           lambda g: g.revoke.mean / g.switch.mean if g.switch.mean else 0.0,
           lambda v: percent(v, 1), "revoke's share of the switch time", ("revoke_ns",)),
    Column("exits", "EXITS/SW", lambda g: g.exits_per_switch, per_switch,
           "KVM exits per switch", ("kvm_exits",)),
    Column("exit_time", "EXIT_T/SW", lambda g: g.means.get("exit_ns", 0.0), fmt_ns,
           "mean time per switch in KVM exits", ("exit_ns",)),
    Column("blocked", "BLOCKED/SW", lambda g: g.blocked_per_switch, per_switch,
           "guest accesses blocked on the switched-off VF, per switch", ("blocked_accesses",)),
    Column("blocked_time", "BLOCK_T/SW", lambda g: g.blocked_ns_per_switch, fmt_ns,
           "mean time per switch in guest accesses blocked on the switched-off VF",
           ("blocked_ns",)),
)
BY_NAME = {c.name: c for c in GROUP_COLUMNS}


def pick(*names: str) -> tuple[Column, ...]:
    """A front end's columns, in the order ``GROUP_COLUMNS`` has them (so a column sits
    in the same place relative to the others in every table)."""
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise KeyError(f"no group column {unknown[0]!r}")
    order = [c.name for c in GROUP_COLUMNS]
    if list(names) != sorted(names, key=order.index):
        raise ValueError(f"columns {names} are not in GROUP_COLUMNS' order")
    return tuple(BY_NAME[n] for n in names)


def header(columns: Iterable[Column]) -> tuple[str, ...]:
    return tuple(c.header for c in columns)


def cells(columns: Iterable[Column], g: GroupStats,
          unmeasured: frozenset[str] = frozenset()) -> tuple[str, ...]:
    return tuple(c.cell(g, unmeasured) for c in columns)


def legend(columns: Iterable[Column]) -> str:
    """``P50..MAX: switch time; REVOKE, GRANT: ...``: a run of columns with one meaning
    said once."""
    runs: list[list[Column]] = []
    for c in columns:
        if not c.meaning:
            continue
        if runs and runs[-1][-1].meaning == c.meaning:
            runs[-1].append(c)
        else:
            runs.append([c])
    parts = []
    for run in runs:
        names = (f"{run[0].header}..{run[-1].header}" if len(run) > 2
                 else ", ".join(c.header for c in run))
        parts.append(f"{names}: {run[0].meaning}")
    return "; ".join(parts)


def align(table: list[tuple[str, ...]], names: int = 1) -> list[str]:
    """Text lines: the first ``names`` columns left-aligned, numbers right-aligned, two
    spaces apart."""
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    return ["  ".join([c.ljust(w) for c, w in zip(r[:names], widths)] +
                      [c.rjust(w) for c, w in zip(r[names:], widths[names:])]).rstrip()
            for r in table]


def own_cost_line(g: GroupStats, meta: dict | None = None) -> str:
    """One line on vftrace's own cost in group ``g`` (the overall one, usually), for the
    summary, the report and the dashboard: what share of the switch time it was, and
    the corrected percentiles with their uncertainty."""
    from .correction import bookends_corrected
    if g.own is None:
        return ("vftrace's own cost: unknown (no probe costs in this capture: switch times "
                "below include the probes)")
    o = g.own
    base = ("pf_sched's own timing where a switch has it" if bookends_corrected(meta)
            else "the window")
    return (f"vftrace's own cost: {percent(o.share, 1)} of the switch time; corrected "
            f"p50 {with_error(o.switch.p50, o.err_ns)}, p90 {with_error(o.switch.p90, o.err_ns)}"
            f" (raw p50 {fmt_ns(g.switch.p50)}; from {base}, less probe hits x their costs)")


def probe_costs_text(meta: dict | None) -> str:
    """``fentry 1.9us (1.6-2.4us), kprobe ...``: the calibrated cost per probe run."""
    pc = (meta or {}).get("probe_costs") or {}
    # Where each was measured, once any was on real switches (calibrate --switches): the
    # start-up calibration's hot loop of calls ran 3-7x cheaper per run in the lab.
    where = {"switches": " on real switches", None: " in a hot loop"} \
        if pc.get("method") == "switches" else {}
    parts = [f"{t} {fmt_ns(v['median_ns'])} ({fmt_ns(v['p10_ns'])}-{fmt_ns(v['p90_ns'])})"
             + where.get(v.get("method") if v.get("method") == "switches" else None, "")
             for t in ("fentry", "kprobe", "entry")
             if isinstance(v := pc.get(t), dict) and {"median_ns", "p10_ns", "p90_ns"} <= v.keys()]
    return ", ".join(parts) or "none measured"


def table_groups(snap: Snapshot) -> list[GroupStats]:
    """A table's rows: overall, per PF, per (PF, incoming VF) and per (PF, from->to); a
    level with one group only repeats "all" and is left out (the pairs are always shown)."""
    if not snap.records:
        return []
    groups = [snap.overall]
    for level in (snap.per_pf, snap.per_vf, snap.per_pair):
        if len(level) > 1 or level is snap.per_pair:
            groups.extend(level)
    return groups
