"""``vftrace record``: headless capture of switch records to CSV, a summary at the end."""
from __future__ import annotations

import os
import platform
import signal
import sys
import time
from pathlib import Path

from . import __version__, probes
from .capture import CallWriter, CaptureWriter, meta_path
from .engine import Engine, program_text, warn
from .stats import Stats
from .summary import format_summary, progress_line


class RecordError(Exception):
    """A one-line reason recording cannot start."""


def parse_ints(values: list[str] | None, flag: str) -> set[int] | None:
    if not values:
        return None
    out = set()
    for v in values:
        for part in v.split(","):
            try:
                n = int(part)
            except ValueError:
                raise RecordError(f"{flag} {part!r}: give integers, e.g. {flag} 0,1") from None
            if n < 0:
                raise RecordError(f"{flag} {n}: must not be negative")
            out.add(n)
    return out


def check_output(path: str | None, flag: str) -> Path | None:
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        raise RecordError(f"{flag} {path}: is a directory; give a file name like capture.csv")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise RecordError(f"{flag} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise RecordError(f"{flag} {path}: directory {parent} is not writable")
    return p


class Stop:
    """SIGINT/SIGTERM/SIGHUP end the run cleanly; the reason goes into the metadata."""

    def __init__(self):
        self.reason: str | None = None
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, _frame):
        self.reason = signal.Signals(signum).name


def build_meta(args, plan, engine, filters) -> dict:
    return {"tool": "vftrace record", "version": __version__, "kernel": platform.release(),
            "host": platform.node(), "switch_source": plan.source,
            "probe_modes": plan.modes(), "floor_ns": engine.floor.as_meta(),
            "budget_ns": args.budget_ns, "filters": filters,
            "buffer": "ringbuf" if plan.ringbuf else "perf", "warnings": engine.warnings}


def main(args) -> int:
    pfs, vfs = parse_ints(args.pf, "--pf"), parse_ints(args.vf, "--vf")
    pids = parse_ints(args.pid, "--pid")
    if args.budget_ns <= 0:
        raise RecordError(f"--budget-ns {args.budget_ns}: must be positive")
    if args.duration is not None and args.duration <= 0:
        raise RecordError(f"--duration {args.duration}: must be positive")
    out = check_output(args.output, "-o/--output")
    calls_out = check_output(args.calls, "--calls")
    if out is None and not args.ebpf:
        raise RecordError("give -o/--output capture.csv (or --ebpf to print the program)")
    if os.geteuid() != 0 and not args.ebpf:
        raise RecordError("needs root (BPF tracing needs CAP_BPF and CAP_PERFMON); run with sudo")
    try:
        offer = probes.KernelOffer.probe()
        plan = probes.plan(args.switch, args.probe_mode, offer,
                           ringbuf=not args.perf_buffer and offer.ringbuf,
                           emit_calls=calls_out is not None)
    except probes.ProbeError as e:
        raise RecordError(str(e)) from None
    if args.ebpf:
        print(program_text(plan, os.getpid()))
        return 0
    try:
        import bcc  # noqa: F401
    except ImportError:
        raise RecordError("BCC is missing: apt-get install python3-bpfcc (not PyPI's 'bcc')") from None

    stats = Stats(budget_ns=args.budget_ns, pfs=pfs, vfs=vfs)
    sinks: dict = {}

    def on_switch(rec):
        if (pfs is None or rec.pf in pfs) and (vfs is None or rec.to_vf in vfs or rec.from_vf in vfs):
            stats.add(rec)
            sinks["csv"].write(rec)

    def on_call(rec):
        if pids is None or rec.pid in pids:
            sinks["calls"].write(rec)

    stop = Stop()
    engine = Engine(plan, budget_ns=args.budget_ns, on_switch=on_switch,
                    on_call=on_call if calls_out else None)
    t_start = time.monotonic()
    try:
        engine.start()
    except Exception as e:                    # BCC reports compile/attach failures this way
        engine.close()
        raise RecordError(f"could not load the BPF program: {str(e).splitlines()[0]}") from None
    for w in engine.warnings:
        warn(w)
    filters = {"pf": sorted(pfs) if pfs else None, "vf": sorted(vfs) if vfs else None,
               "pid": sorted(pids) if pids else None}
    meta = build_meta(args, plan, engine, filters)
    sinks["csv"] = CaptureWriter(out, meta)
    if calls_out:
        sinks["calls"] = CallWriter(calls_out)
    floor = engine.floor.modes
    floor_txt = ", ".join(f"{m} {v['median_ns']} ns" for m, v in floor.items()) or "unknown"
    print(f"vftrace: recording {plan.source} to {out} (floor: {floor_txt}; "
          f"start-up {time.monotonic() - t_start:.1f} s); Ctrl-C to stop", file=sys.stderr)
    deadline = None if args.duration is None else time.monotonic() + args.duration
    reason = "duration"
    tty = sys.stderr.isatty()
    last_progress = 0.0
    try:
        while True:
            if stop.reason:
                reason = stop.reason
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
            engine.poll(100)
            now = time.monotonic()
            if not args.quiet and now - last_progress >= 1.0:
                last_progress = now
                line = progress_line(stats, sum(engine.lost_per_cpu().values()))
                print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr,
                      flush=True)
    except OSError as e:                      # disk full, output gone: keep what was written
        reason = f"error: {e}"
        print(f"\nvftrace: error: {e}; the capture up to here is kept", file=sys.stderr)
    finally:
        lost = engine.lost_per_cpu()
        extra = {"late_releases": engine.assembler.late_releases,
                 "orphan_releases": engine.assembler.orphan_releases,
                 "partial_windows": engine.partial_windows(),
                 "background": engine.background() if engine.bpf else {}}
        engine.close()                        # flushes held records into the sinks
        if tty and not args.quiet:
            print(file=sys.stderr)
        sinks["csv"].meta.update(extra)
        sinks["csv"].close(stop_reason=reason, lost=lost)
        if "calls" in sinks:
            sinks["calls"].close()
    print(format_summary(stats.snapshot(), sinks["csv"].meta))
    print(f"vftrace: wrote {out} and {meta_path(out)}", file=sys.stderr)
    return 0
