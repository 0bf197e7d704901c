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
from ..metrics.server import check_metrics_args, start_endpoint
from ..metrics.tap import MetricsTap, state_from
from ..model.correction import Correction
from ..model.stats import Stats
from .session import (RecordError, Session, TraceOptions, add_trace_options, check_output,
                      parse_ints, plan_for)
from .summary import format_summary, progress_line

__all__ = ["RecordError", "add_trace_options", "check_output", "main", "parse_ints"]


def serve(args) -> int:
    """``vftrace serve``: ``record`` for a Prometheus server, until signalled."""
    return main(args)


def main(args) -> int:
    serving = args.command == "serve"
    opts = TraceOptions.from_args(args, args.command)
    out = check_output(args.output, "-o/--output")
    if out is None and not opts.ebpf and not serving:
        raise RecordError("give -o/--output capture.csv (or --ebpf to print the program)")
    check_metrics_args(args)
    plan = plan_for(opts)
    if plan is None:                          # --ebpf: the program was printed
        return 0

    stats = Stats(budget_ns=opts.budget_ns, pfs=opts.pfs, vfs=opts.vfs)   # sees every switch
    session = Session(opts, plan, tool=f"vftrace {args.command}", output=out,
                      on_switch_rows=stats.add_rows, signals=True)
    tap = MetricsTap(lambda: state_from(stats, session.current_meta(),
                                        session.kernel_histograms()))
    # Listening before the probes are armed: a port in use is refused at once, not after
    # the compile, and the endpoint is up by the time --ready-file appears.
    endpoint = start_endpoint(args, tap)
    try:
        session.start()
    except BaseException:
        if endpoint is not None:
            endpoint.stop()
        raise
    stats.set_correction(Correction.from_meta(session.meta))
    for w in session.engine.warnings:
        warn(w)
    floor = session.engine.floor.modes
    floor_txt = ", ".join(f"{m} {v['median_ns']} ns" for m, v in floor.items()) or "unknown"
    where = f"to {out}" if out is not None else "(no capture file)"
    print(f"vftrace: recording {plan.source} {where} (floor: {floor_txt}; probe costs: "
          f"{gc.probe_costs_text(session.meta)}; "
          f"start-up {session.startup_s:.1f} s); Ctrl-C to stop", file=sys.stderr)
    reason = "duration"
    tty = sys.stderr.isatty()
    last_progress = 0.0
    try:
        while True:
            stop = session.poll(100)
            tap.service()
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
        try:
            meta = session.stop(reason)
        finally:
            if endpoint is not None:
                tap.close()                 # a scrape in flight gets the final state
                endpoint.stop()
    print(format_summary(stats.snapshot(), meta))
    if (problem := session.workload_warning()) is not None:
        warn(problem)
    if out is not None:
        print(f"vftrace: wrote {out} and {meta_path(out)}", file=sys.stderr)
    return 0
