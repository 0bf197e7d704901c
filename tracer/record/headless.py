"""``vftrace record``: headless capture of switch records to CSV, a summary at the end.

The recording itself (probes, engine, writers, workload, stop order) is
``tracer.record.session.Session``, shared with ``vftrace live``; this module is the headless
front end: a progress line on stderr and the summary table on stdout.
"""
from __future__ import annotations

import sys
import time

from ..capture.files import meta_path
from ..kernel.engine import warn
from ..model import group_columns as gc
from ..model.correction import Correction
from ..model.stats import Stats
from .session import (RecordError, Session, TraceOptions, add_trace_options, check_output,
                      parse_ints, plan_for)
from .summary import format_summary, progress_line

__all__ = ["RecordError", "add_trace_options", "check_output", "main", "parse_ints"]


def main(args) -> int:
    opts = TraceOptions.from_args(args, "record")
    out = check_output(args.output, "-o/--output")
    if out is None and not opts.ebpf:
        raise RecordError("give -o/--output capture.csv (or --ebpf to print the program)")
    plan = plan_for(opts)
    if plan is None:                          # --ebpf: the program was printed
        return 0

    stats = Stats(budget_ns=opts.budget_ns, pfs=opts.pfs, vfs=opts.vfs)   # sees every switch
    session = Session(opts, plan, tool="vftrace record", output=out, on_switch=stats.add,
                      signals=True)
    session.start()
    stats.set_correction(Correction.from_meta(session.meta))
    for w in session.engine.warnings:
        warn(w)
    floor = session.engine.floor.modes
    floor_txt = ", ".join(f"{m} {v['median_ns']} ns" for m, v in floor.items()) or "unknown"
    print(f"vftrace: recording {plan.source} to {out} (floor: {floor_txt}; probe costs: "
          f"{gc.probe_costs_text(session.meta)}; "
          f"start-up {session.startup_s:.1f} s); Ctrl-C to stop", file=sys.stderr)
    reason = "duration"
    tty = sys.stderr.isatty()
    last_progress = 0.0
    try:
        while True:
            stop = session.poll(100)
            for line in session.take_warnings():
                print(("\n" if tty else ""), end="", file=sys.stderr)
                warn(line)
            if stop is not None:
                reason = stop
                break
            now = time.monotonic()
            if not args.quiet and now - last_progress >= 1.0:
                last_progress = now
                line = progress_line(stats, sum(session.lost_per_cpu().values()))
                print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr,
                      flush=True)
    except OSError as e:                      # disk full, output gone: keep what was written
        reason = f"error: {e}"
        print(f"\nvftrace: error: {e}; the capture up to here is kept", file=sys.stderr)
    finally:
        if tty and not args.quiet:
            print(file=sys.stderr)
        meta = session.stop(reason)
    print(format_summary(stats.snapshot(), meta))
    if (problem := session.workload_warning()) is not None:
        warn(problem)
    print(f"vftrace: wrote {out} and {meta_path(out)}", file=sys.stderr)
    return 0
