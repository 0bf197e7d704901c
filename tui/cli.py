"""``vftrace live`` and ``vftrace replay``: the dashboard over the kernel or a capture.

Textual is imported inside ``run()`` so ``vftrace --help`` and the other commands stay fast.
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from pathlib import Path

from tracer.errors import VftraceError
from tracer.metrics.server import add_metrics_options, check_metrics_args, start_endpoint
from tracer.record.session import (Session, TraceOptions, add_trace_options,
                                   check_capture_output, parse_ints, plan_for)

from . import keys

COMMANDS: tuple[str, ...] = ("live", "replay")

LIVE_EPILOG = """examples:
  sudo vftrace live                           # pf_sched's switches, as they happen
  sudo vftrace live -o cap.csv -d 60          # and record them (cap.csv + cap.meta.json)
  sudo vftrace live --calls calls.csv         # per-call rows: KVM exit and VFIO rates
  sudo vftrace live --pf 0 -b 5000 -- python -m tracer.lab.workloads.kvm
                                              # a guest started once armed, stopped first
""" + keys.epilog_line()

REPLAY_EPILOG = """examples:
  vftrace replay cap.csv                      # as recorded (paced by the records' t_ns)
  vftrace replay cap.csv --speed max          # as fast as possible
  vftrace replay cap.csv --speed 10 --pf 0 -b 5000
  vftrace replay --follow cap.csv             # like tail -f: a recorder still writing it
  vftrace replay cap.csv --speed max --metrics 127.0.0.1:9435 </dev/null
                                              # no terminal: serve its metrics, headless
""" + keys.epilog_line()


def add_parsers(sub) -> None:
    live = sub.add_parser(
        "live", help="live dashboard of VF switches (root; BPF)",
        description="Attach vftrace's BPF program (as vftrace record does) and show the "
                    "switches, their statistics per PF and VF, the latency distribution and "
                    "the guests' KVM exits in a terminal dashboard.",
        epilog=LIVE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    live.add_argument("-o", "--output", metavar="FILE",
                      help="record the capture too (FILE + FILE.meta.json, as vftrace record)")
    live.add_argument("--csv", metavar="FILE", help=argparse.SUPPRESS)   # -o's old name
    live.add_argument("-d", "--duration", type=float,
                      help="stop recording after this many seconds (the dashboard stays)")
    add_trace_options(live)

    rep = sub.add_parser(
        "replay", help="the dashboard over a capture file (or one being written: --follow)",
        description="Replay a capture written by vftrace record (or vftrace live -o) in "
                    "the dashboard, paced as recorded; with --follow, watch a capture "
                    "another vftrace is still writing.",
        epilog=REPLAY_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    rep.add_argument("file", help="the capture CSV (its NAME.meta.json is read beside it)")
    rep.add_argument("-x", "--speed", default="1",
                     help="replay speed: 1 as recorded (default), 10 ten times faster, "
                          "max (or 0) as fast as possible")
    rep.add_argument("-F", "--follow", action="store_true",
                     help="follow a capture being written (waits for it to appear)")
    rep.add_argument("-b", "--budget-ns", type=int,
                     help="switch budget (default: the capture's)")
    rep.add_argument("--pf", action="append", help="only these PFs (comma list, repeatable)")
    rep.add_argument("--vf", action="append", help="only switches from or to these VFs")
    add_metrics_options(rep)


def run(args) -> int:
    if args.command == "replay":
        return _replay(args)
    return _live(args)


def parse_speed(text: str) -> float:
    """"max"/"0" -> 0.0 (as fast as possible); else a positive finite factor."""
    if text.strip().lower() == "max":
        return 0.0
    try:
        speed = float(text)
    except ValueError:
        speed = math.nan
    if not math.isfinite(speed) or speed < 0:
        raise VftraceError(f"--speed {text}: give a factor like 2 or 0.5, or max")
    return speed


def require_tty() -> None:
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise VftraceError("the dashboard needs a terminal (stdin and stdout are not a TTY); "
                           "record headless with vftrace record")


def _replay(args) -> int:
    from .sources import FollowSource, ReplaySource

    speed = parse_speed(args.speed)
    if args.budget_ns is not None and args.budget_ns <= 0:
        raise VftraceError(f"--budget-ns {args.budget_ns}: must be positive")
    pfs, vfs = parse_ints(args.pf, "--pf"), parse_ints(args.vf, "--vf")
    if args.follow:
        if args.speed != "1":
            raise VftraceError("--speed paces a finished capture; --follow shows records as "
                               "they are written")
        source = FollowSource(args.file)
    else:
        source = ReplaySource(args.file, speed)
        check_filters_match(source.path, pfs, vfs)
    check_metrics_args(args)
    if args.metrics is None:
        require_tty()
        return _show(source, budget_ns=args.budget_ns, pfs=pfs, vfs=vfs)
    from tracer.metrics.tap import TappedSource
    from tracer.model.stats import Stats
    budget = args.budget_ns or source.meta.get("budget_ns") or 100
    tapped = TappedSource(source, Stats(budget, pfs=pfs, vfs=vfs))
    endpoint = start_endpoint(args, tapped.tap)
    try:
        if sys.stdin.isatty() and sys.stdout.isatty():
            return _show(tapped, budget_ns=args.budget_ns, pfs=pfs, vfs=vfs)
        return _serve_headless(tapped)
    finally:
        endpoint.stop()


def _serve_headless(source) -> int:
    """No terminal: read the source to its end for the endpoint, then keep serving
    until SIGINT/SIGTERM/SIGHUP."""
    import signal
    import threading
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    source.start()
    said = False
    try:
        while not stop.is_set():
            batch = source.read(0.1)
            for problem in batch.problems:
                print(f"vftrace: warning: {problem}", file=sys.stderr)
            if source.finished and not said:
                said = True
                print(f"vftrace: {batch.status or 'end of capture'}; serving until "
                      "SIGINT/SIGTERM", file=sys.stderr)
    finally:
        source.stop("signal")
    return 0


def check_filters_match(path: Path, pfs: set[int] | None, vfs: set[int] | None) -> None:
    """--pf/--vf naming a PF or VF the capture never switched would replay an empty
    dashboard: say so instead.  (A growing capture, --follow, may still get them.)"""
    if not pfs and not vfs:
        return
    from tracer.capture.files import CaptureError, iter_capture
    seen_pfs: set[int] = set()
    seen_vfs: set[int] = set()
    try:
        for r in iter_capture(path):
            seen_pfs.add(r.pf)
            if pfs is None or r.pf in pfs:
                seen_vfs.update((r.from_vf, r.to_vf))
    except CaptureError:      # the replay shows the damage; the rows before it still count
        pass
    seen_vfs.discard(-1)                                   # from_vf -1: no VF before
    if missing := sorted((pfs or set()) - seen_pfs):
        raise VftraceError(f"--pf {missing[0]}: {path.name} has no switch on PF {missing[0]} "
                           f"(its PFs: {_listed(seen_pfs)})")
    if missing := sorted((vfs or set()) - seen_vfs):
        where = f" on PF {_listed(pfs)}" if pfs else ""
        raise VftraceError(f"--vf {missing[0]}: {path.name} has no switch from or to VF "
                           f"{missing[0]}{where} (its VFs: {_listed(seen_vfs)})")


def _listed(numbers: set[int]) -> str:
    return ", ".join(map(str, sorted(numbers))) or "none"


def _live(args) -> int:
    if args.output is not None and args.csv is not None:
        raise VftraceError("--csv is -o/--output's old name: give one of the two")
    # A capture given as --csv (its old name) is checked there, under that name.
    opts = TraceOptions.from_args(args, "live")
    flag, path = ("--csv", args.csv) if args.csv is not None else ("-o/--output", args.output)
    out = check_capture_output(path, flag, {"--calls": opts.calls,
                                            "--ready-file": opts.ready_file})
    check_metrics_args(args)
    plan = plan_for(opts)
    if plan is None:                          # --ebpf: the program was printed
        return 0
    require_tty()
    from .sources import LiveSource

    # The workload's output would scribble over the dashboard.
    quiet = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL,
             "stderr": subprocess.DEVNULL}
    session = Session(opts, plan, tool="vftrace live", output=out, workload_stdio=quiet)
    source = LiveSource(session)
    if args.metrics is not None:
        # Its own statistics, fed in the dashboard's reading thread: the dashboard's
        # filter keys (f) must not change what Prometheus sees.
        from tracer.metrics.tap import TappedSource
        from tracer.model.stats import Stats
        source = TappedSource(source, Stats(opts.budget_ns, pfs=opts.pfs, vfs=opts.vfs))
    endpoint = start_endpoint(args, source.tap) if args.metrics is not None else None
    print(f"vftrace: arming the probes on {plan.source} (BCC compiles the program first)...",
          file=sys.stderr)
    try:
        source.start()
    except BaseException:
        if endpoint is not None:
            endpoint.stop()
        raise
    # The session hands the dashboard every switch: its statistics count seqs, then
    # apply --pf/--vf (shown in the header; ``f`` changes it).
    try:
        code = _show(source, budget_ns=opts.budget_ns, pfs=opts.pfs, vfs=opts.vfs)
    finally:
        if endpoint is not None:
            endpoint.stop()
    if (problem := session.workload_warning()) is not None:
        print(f"vftrace: warning: {problem}", file=sys.stderr)
    if out is not None:
        from tracer.capture.files import meta_path
        print(f"vftrace: wrote {out} and {meta_path(out)}", file=sys.stderr)
    return code


def _show(source, **options) -> int:
    from .app import VftraceApp

    # Some consoles hand us a non-blocking terminal (the lab VM's, for one): Textual's
    # writer thread then dies on the first EAGAIN and the screen freezes for good.
    for stream in (sys.stdout, sys.stderr):
        try:
            os.set_blocking(stream.fileno(), True)
        except (OSError, ValueError):       # not a real file (tests): nothing to fix
            pass
    app = VftraceApp(source, handle_signals=True, **options)
    try:
        app.run()
    finally:
        app.stop_source()
    return 0

