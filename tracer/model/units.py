"""Durations and rates in human units, as every table, plot and panel shows them."""
from __future__ import annotations


def fmt_ns(ns: float | int | None) -> str:
    """812ns, 12.3us, 1.52ms, 2.05s: three significant digits past the ns range."""
    if ns is None:
        return "-"
    if ns < 0:
        return "-" + fmt_ns(-ns)
    if ns < 1000:
        return f"{ns:.0f}ns"
    for unit, scale in (("us", 1e3), ("ms", 1e6), ("s", 1e9)):
        value = ns / scale
        if value < 999.5 or unit == "s":
            digits = 2 if value < 9.995 else 1 if value < 99.95 else 0
            return f"{value:.{digits}f}{unit}"
    raise AssertionError("unreachable")


def fmt_rate(per_s: float) -> str:
    if per_s >= 1e6:
        return f"{per_s / 1e6:.2f}M/s"
    if per_s >= 1e3:
        return f"{per_s / 1e3:.1f}k/s"
    return f"{per_s:.0f}/s"
