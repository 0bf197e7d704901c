"""``vftrace doctor``: what this kernel lets vftrace do, and how to get what is missing."""
from __future__ import annotations

import json
import sys

from .features import PROBES, REQUIRED, Check, Kernel, can_trace, check_all

LEVEL_NOTE = {REQUIRED: "required", PROBES: "one of fentry/kprobes", "optional": "optional"}


def report(checks: list[Check], k: Kernel) -> tuple[str, bool]:
    """The human report and whether tracing is possible."""
    ok = can_trace(checks)
    where = "lab VM (virtme-ng)" if k.in_lab else "this machine"
    lines = [f"vftrace doctor: kernel {k.release} on {where}", ""]
    width = max(len(c.key) for c in checks)
    for c in checks:
        mark = " ok " if c.ok else ("FAIL" if c.level in (REQUIRED, PROBES) else "miss")
        lines.append(f"  [{mark}] {c.key:<{width}}  {c.detail}")
        if not c.ok and c.fix:
            lines.append(f"  {'':6} {'':<{width}}  -> {c.fix} ({LEVEL_NOTE[c.level]})")
    lines.append("")
    lines.append(verdict(checks, k))
    return "\n".join(lines), ok


def verdict(checks: list[Check], k: Kernel) -> str:
    by = {c.key: c for c in checks}
    if can_trace(checks):
        modes = [m for m in ("fentry", "kprobes") if by[m].ok]
        extra = [c.key for c in checks if not c.ok]
        tail = f"; not available here: {', '.join(extra)}" if extra else ""
        return f"tracing is possible (probe modes: {', '.join(modes)}){tail}."
    blockers = [c.key for c in checks if c.level == REQUIRED and not c.ok]
    if not (by["kprobes"].ok or by["fentry"].ok):
        blockers.append("kprobes and fentry")
    msg = f"tracing is NOT possible here: missing {', '.join(blockers)}."
    lab_only = not by["kprobes"].ok or not by["modules"].ok or not by["kernel_headers"].ok
    if not k.in_lab and lab_only:
        lacks = [name for key, name in (("kprobes", "kprobes"), ("modules", "loadable modules"),
                                        ("kernel_headers", "kernel headers"),
                                        ("vfio_iommu_type1", "VFIO"))
                 if not by[key].ok]
        msg += (f"\nThis kernel has no {', no '.join(lacks)}, so pf_sched cannot be loaded and BCC "
                "cannot compile here: only the lab works on this machine.\n"
                "Run the whole stack in the lab VM instead: `make lab` (or `vftrace lab -- CMD`).")
    return msg


def main(args) -> int:
    k = Kernel()
    checks = check_all(k)
    if args.json:
        print(json.dumps({"kernel": k.release, "in_lab": k.in_lab,
                          "can_trace": can_trace(checks),
                          "checks": [c.__dict__ for c in checks]}, indent=2))
        return 0 if can_trace(checks) else 1
    text, ok = report(checks, k)
    print(text, file=sys.stdout)
    return 0 if ok else 1
