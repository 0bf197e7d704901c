"""One recording session: plan the probes, arm the engine, write the capture, stop cleanly.

Both ``vftrace record`` (headless) and ``vftrace live`` (the dashboard's live source) record
through ``Session``, so there is one way to record and one order of operations:

    plan probes -> start the Engine (probes attached, armed) -> meta + writers ->
    touch --ready-file -> start the workload (-- CMD) ... poll ... ->
    stop the workload (SIGTERM to its process group, SIGKILL after a grace period) ->
    engine.close() (detach the probes) -> close the writers with stop reason and losses.

Guests are started only after the probes are attached and stopped before they are
detached: patching kernel text while a nested KVM guest runs has crashed the lab kernel
(QEMU TCG, ``Oops: int3`` in ``__schedule``).
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .. import __version__
from .procgroup import stop_group
from ..capture import output
from ..capture.files import (CallWriter, CaptureError, CaptureWriter, load_block_formatter,
                             meta_path)
from ..errors import VftraceError
from ..kernel import probes
from ..kernel.assemble import records_of
from ..metrics.server import add_metrics_options
from ..model import exit_reasons, kernel_hist
from ..model.filter import META_KEY as FILTERED_OUT, FilterGate, SwitchFilter
from ..model.schema import DEFAULT_DEPTH, DEPTHS, CallRecord, SwitchRecord
from . import costs_file
from .priority import PriorityError, call_at_nice, check_nice, set_process_nice, thread_nice
from .instances import Registration
from ..pfsched import control
from ..pfsched.watch import PfWatch

WORKLOAD_GRACE_S = 10.0
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class RecordError(VftraceError):
    """A one-line reason recording cannot start."""


# --- options ---------------------------------------------------------------------------

def add_trace_options(parser: argparse.ArgumentParser) -> None:
    """The tracing options shared by ``vftrace record`` and ``vftrace live``."""
    parser.add_argument("-s", "--switch", help="what delimits a switch: pf_sched (default), "
                        "func:SYMBOL or tp:SYS:BEGIN,SYS:END")
    parser.add_argument("--pf", action="append", help="only these PFs (comma list, repeatable)")
    parser.add_argument("--vf", action="append", help="only switches from or to these VFs")
    parser.add_argument("-p", "--pid", action="append", help="per-call rows of these pids only")
    parser.add_argument("-b", "--budget-ns", type=int, default=100,
                        help="switch budget (default 100)")
    parser.add_argument("-m", "--probe-mode", choices=("auto", "fentry", "kprobe"),
                        default="auto", help="auto: fentry where possible, kprobes elsewhere")
    parser.add_argument("-D", "--depth", choices=DEPTHS, default=DEFAULT_DEPTH,
                        help="how much of a switch to hook: window (its bookends only), "
                             "iommu (+ iommu_map/unmap), mmu (+ IOTLB flush, guest "
                             "mapping zap), guests (+ KVM exits, kicks, blocked accesses; "
                             "the default).  Shallower costs the switch less; the columns "
                             "it does not hook are left empty")
    parser.add_argument("-c", "--calls", help="also write one row per timed call to this CSV")
    parser.add_argument("--costs", metavar="FILE",
                        help="probe costs measured on real switches (vftrace calibrate "
                             "--switches -o FILE) for the corrected columns, instead of "
                             "the start-up calibration's")
    parser.add_argument("--hist-pairs", type=int, default=HIST_PAIRS, metavar="N",
                        help=f"(PF, VF) pairs the kernel keeps histograms of every switch for "
                             f"(default {HIST_PAIRS}; ~736 KB of kernel memory each; pairs "
                             "past it are counted and the every-switch line says not exact)")
    parser.add_argument("-B", "--buffer-pages", type=int, default=BUFFER_PAGES, metavar="N",
                        help=f"pages of the switch ring buffer (a power of two; default "
                             f"{BUFFER_PAGES}: {BUFFER_PAGES * 4 // 1024} MiB, ~{BUFFER_PAGES * 4096 // 216:,} "
                             "switches, the longest the reader may pause without losing any; "
                             "the perf buffer gets a quarter of it per CPU)")
    parser.add_argument("--perf-buffer", action="store_true",
                        help="use the perf buffer, not the ring buffer")
    parser.add_argument("--callback-reader", action="store_true",
                        help="read the ring buffers through BCC's per-record callback "
                             "instead of their mapped pages (the fallback; slower)")
    parser.add_argument("--ebpf", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--nice", type=int, metavar="N",
                        help="run vftrace's own threads at nice N (-20 to 19; below 0 "
                             "needs root), not the -- CMD workload: on a host whose CPUs "
                             "the guests keep busy, a reader at nice 0 can starve and the "
                             "rings overflow (e.g. --nice -10)")
    parser.add_argument("--ready-file", metavar="PATH",
                        help="create this file once every probe is armed (for scripts "
                             "and tests that wait for arming; the workload starts then)")
    add_metrics_options(parser)
    parser.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ...",
                        help="a workload to run while tracing: started once the probes are "
                             "armed, stopped before they are detached; its exit ends the run")


MAX_ID = 2**32 - 1          # PFs, VFs and pids are 32-bit in the BPF records
HIST_PAIRS, MAX_HIST_PAIRS = 32, 256      # kernel histogram slots (bpf/vftrace.h): 736 KB each (4 phases)
# Ring buffer pages: 256 (1 MiB, ~4.9k switches) lost 6.5% of a 6.12 lab soak's records
# (3 PFs x 200 us, 1,717 switches/s, 2 nested guests sharing the TCG vCPUs) to reader
# pauses of up to 3.2 s, 275 of them over 1 s; 1024 holds ~19k switches, ~11 s there.
BUFFER_PAGES, MAX_BUFFER_PAGES = 1024, 1 << 16


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
            if n > MAX_ID:
                raise RecordError(f"{flag} {n}: out of range (at most {MAX_ID})")
            out.add(n)
    return out


def check_output(path: str | None, flag: str) -> Path | None:
    """``tracer.capture.output.check_output`` (the one rule for files vftrace writes), as
    a RecordError so ``vftrace record``/``live`` still print one line and exit 2."""
    try:
        return output.check_output(path, flag)
    except output.OutputError as e:
        raise RecordError(str(e)) from None


def check_capture_output(path: str | None, flag: str,
                         others: dict[str, Path | None] | None = None) -> Path | None:
    """A capture CSV to write: ``check_output`` for it and its meta file, a name that is
    not a meta file's, and no other output (``others``: flag -> path) on either."""
    p = check_output(path, flag)
    if p is None:
        return None
    if p.name.endswith(".meta.json"):
        raise RecordError(f"{flag} {path}: that name is for a capture's metadata; give a "
                          "name ending in .csv")
    check_output(str(meta_path(p)), f"{flag} {path}: its meta file")
    mine = {_same_file_key(p), _same_file_key(meta_path(p))}
    for other_flag, other in (others or {}).items():
        if other is not None and _same_file_key(other) in mine:
            raise RecordError(f"{other_flag} {other}: is the capture's file ({flag} {path}) "
                              "or its meta file; give another name")
    return p


def _same_file_key(p: Path) -> Path:
    """What decides whether two output names are one file (the directory resolved)."""
    return p.parent.resolve() / p.name


def check_switch_spec(spec: str | None) -> None:
    """The form of --switch, checked before root and the kernel are needed (whether the
    function or tracepoints exist is the probe planner's question)."""
    if spec is None or spec == "pf_sched":
        return
    if spec.startswith("func:"):
        if not SYMBOL.fullmatch(spec[5:]):
            raise RecordError(f"--switch {spec}: give func:SYMBOL, a kernel function name "
                              "(see /sys/kernel/tracing/available_filter_functions)")
        return
    if spec.startswith("tp:"):
        parts = spec[3:].split(",")
        if len(parts) != 2 or not all(TRACEPOINT.fullmatch(p) for p in parts):
            raise RecordError(f"--switch {spec}: give tp:SYS:BEGIN,SYS:END")
        return
    raise RecordError(f"--switch {spec}: give pf_sched, func:SYMBOL or tp:SYS:BEGIN,SYS:END")


SYMBOL = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")        # .isra.0, .constprop.0 suffixes too
TRACEPOINT = re.compile(r"[A-Za-z0-9_]+:[A-Za-z0-9_]+")


def check_seconds(value: float | None, flag: str) -> float | None:
    if value is not None and not math.isfinite(value):
        raise RecordError(f"{flag} {value}: give a finite number of seconds")
    if value is not None and value <= 0:
        raise RecordError(f"{flag} {value}: must be positive")
    return value


def workload_argv(cmd: Sequence[str] | None, command: str) -> list[str] | None:
    """``-- CMD ARGS`` from the REMAINDER positional; anything not after ``--`` is a typo."""
    if not cmd:
        return None
    if cmd[0] != "--":
        raise RecordError(f"unexpected argument {cmd[0]!r} (a workload goes after --: "
                          f"vftrace {command} ... -- CMD ARGS)")
    if len(cmd) == 1:
        raise RecordError("-- without a command: give the workload after it, e.g. -- sleep 10")
    return list(cmd[1:])


# Where each tracing command keeps its capture's path: (attribute, flag).
CAPTURE_FLAGS = {"record": ("output", "-o/--output"), "serve": ("output", "-o/--output"),
                 "live": ("csv", "--csv")}


@dataclass
class TraceOptions:
    """The validated tracing options (what ``add_trace_options`` parses)."""
    switch: str | None = None
    pfs: set[int] | None = None
    vfs: set[int] | None = None
    pids: set[int] | None = None
    budget_ns: int = 100
    probe_mode: str = "auto"
    depth: str = DEFAULT_DEPTH
    calls: Path | None = None
    perf_buffer: bool = False
    callback_reader: bool = False
    hist_pairs: int = 32
    buffer_pages: int = 1024
    duration: float | None = None
    ebpf: bool = False
    ready_file: Path | None = None
    workload: list[str] | None = None
    nice: int | None = None            # --nice: vftrace's threads, not the workload
    costs: dict | None = None          # --costs FILE's probe costs (costs_file.load)

    @classmethod
    def from_args(cls, args: argparse.Namespace, command: str = "record") -> TraceOptions:
        """Validate in the order ``vftrace record`` always has (its messages unchanged)."""
        pfs, vfs = parse_ints(args.pf, "--pf"), parse_ints(args.vf, "--vf")
        pids = parse_ints(args.pid, "--pid")
        if args.budget_ns <= 0:
            raise RecordError(f"--budget-ns {args.budget_ns}: must be positive")
        duration = check_seconds(getattr(args, "duration", None), "--duration")
        if not 1 <= args.hist_pairs <= MAX_HIST_PAIRS:
            raise RecordError(f"--hist-pairs {args.hist_pairs}: give 1 to {MAX_HIST_PAIRS}")
        pages = args.buffer_pages
        if not 8 <= pages <= MAX_BUFFER_PAGES or pages & (pages - 1):
            raise RecordError(f"--buffer-pages {pages}: give a power of two from 8 to "
                              f"{MAX_BUFFER_PAGES} (the kernel's ring buffers are)")
        check_switch_spec(args.switch)
        calls = check_output(args.calls, "--calls")
        ready_file = check_output(getattr(args, "ready_file", None), "--ready-file")
        if calls is not None and ready_file is not None and \
                _same_file_key(calls) == _same_file_key(ready_file):
            raise RecordError(f"--ready-file {ready_file}: is the --calls file; give another name")
        # The capture itself (record -o, live --csv) is the front end's option; it must
        # still not be one of the files above.
        attr, flag = CAPTURE_FLAGS.get(command, (None, None))
        if attr is not None:
            check_capture_output(getattr(args, attr, None), flag,
                                 {"--calls": calls, "--ready-file": ready_file})
        costs = costs_file.load(args.costs) if getattr(args, "costs", None) else None
        return cls(switch=args.switch, pfs=pfs, vfs=vfs, pids=pids, budget_ns=args.budget_ns,
                   probe_mode=args.probe_mode, depth=args.depth, calls=calls,
                   perf_buffer=args.perf_buffer, callback_reader=args.callback_reader,
                   hist_pairs=args.hist_pairs, buffer_pages=pages,
                   duration=duration, ebpf=args.ebpf,
                   ready_file=ready_file, costs=costs,
                   nice=check_nice(getattr(args, "nice", None)),
                   workload=workload_argv(getattr(args, "cmd", None), command))

    def filters(self) -> dict:
        return {"pf": sorted(self.pfs) if self.pfs else None,
                "vf": sorted(self.vfs) if self.vfs else None,
                "pid": sorted(self.pids) if self.pids else None}

    @property
    def switch_filter(self) -> SwitchFilter:
        """--pf/--vf; applied only through a ``FilterGate`` (seqs counted first)."""
        return SwitchFilter.of(self.pfs, self.vfs)

    def keeps_call(self, rec: CallRecord) -> bool:
        return self.pids is None or rec.pid in self.pids


def require_root() -> None:
    if os.geteuid() != 0:
        raise RecordError("needs root (BPF tracing needs CAP_BPF and CAP_PERFMON); run with sudo")


def make_plan(opts: TraceOptions, offer: probes.KernelOffer | None = None) -> probes.Plan:
    """What to attach and how, for this kernel (``offer``: tests pass their own)."""
    try:
        offer = offer or probes.KernelOffer.probe()
        return probes.plan(opts.switch, opts.probe_mode, offer,
                           ringbuf=not opts.perf_buffer and offer.ringbuf,
                           mapped_reader=not opts.callback_reader,
                           emit_calls=opts.calls is not None, depth=opts.depth,
                           hist_slots=opts.hist_pairs, buffer_pages=opts.buffer_pages)
    except probes.ProbeError as e:
        raise RecordError(str(e)) from None


def require_bcc() -> None:
    try:
        import bcc  # noqa: F401
    except ImportError:
        raise RecordError("BCC is missing: apt-get install python3-bpfcc (not PyPI's 'bcc')") \
            from None


def check_filters(opts: TraceOptions, layout: dict[int, int] | None) -> None:
    """--pf/--vf naming a PF or VF pf_sched does not have would record nothing, silently."""
    if not layout:
        return
    for pf in sorted(opts.pfs or ()):
        if pf not in layout:
            raise RecordError(f"--pf {pf}: pf_sched has no PF {pf} (it has "
                              f"{', '.join(map(str, sorted(layout)))})")
    most = max(layout[pf] for pf in (opts.pfs or layout))
    for vf in sorted(opts.vfs or ()):
        if vf >= most:
            raise RecordError(f"--vf {vf}: pf_sched has VFs 0 to {most - 1} on "
                              f"{'the PFs asked for' if opts.pfs else 'each PF'}")


def plan_for(opts: TraceOptions) -> probes.Plan | None:
    """What a tracing command needs before it starts: root, the probe plan, BCC.  With
    ``--ebpf`` it prints the program instead and returns None (no root, no BCC needed)."""
    if not opts.ebpf:
        require_root()
    plan = make_plan(opts)
    if opts.costs is not None:
        costs_file.check(opts.costs, plan.hit_types())
    if plan.source == "pf_sched":
        check_filters(opts, control.layout())
    if opts.ebpf:
        from ..kernel.engine import program_text
        print(program_text(plan, os.getpid()))
        return None
    require_bcc()
    return plan


# --- stopping ------------------------------------------------------------------------

class SignalStop:
    """SIGINT/SIGTERM/SIGHUP end the run cleanly; the reason goes into the metadata.

    Only the main thread can install handlers: the headless recorder uses this, the
    dashboard turns the same signals into its own quit."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}

    def _on_signal(self, signum, _frame) -> None:
        self.reason = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Workload:
    """``-- CMD ARGS``: a process group of its own, so stopping it reaches whatever it
    started (a QEMU guest, a VFIO test) and a Ctrl-C in the terminal reaches only us."""

    def __init__(self, argv: Sequence[str], *, grace_s: float = WORKLOAD_GRACE_S,
                 stdin=None, stdout=None, stderr=None) -> None:
        self.argv = list(argv)
        self.grace_s = grace_s
        self._stdio = {"stdin": stdin, "stdout": stdout, "stderr": stderr}
        self.proc: subprocess.Popen | None = None
        self.stopped_by_us = False

    def start(self) -> None:
        try:
            self.proc = subprocess.Popen(self.argv, process_group=0, **self._stdio)
        except OSError as e:
            raise RecordError(f"cannot start the workload {self.argv[0]}: "
                              f"{e.strerror or e}") from None

    @property
    def exit_status(self) -> int | None:
        """The exit status, or minus the signal number that ended it (None: running)."""
        return None if self.proc is None else self.proc.poll()

    def stop(self) -> int | None:
        """SIGTERM to the whole group, SIGKILL whatever is left after the grace period;
        returns once every process of the group is gone (or could not be killed)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.stopped_by_us = True
        return stop_group(self.proc, self.grace_s)

    def as_meta(self) -> dict:
        return {"argv": self.argv, "exit_status": self.exit_status,
                "stopped_by_vftrace": self.stopped_by_us}


# --- the session ---------------------------------------------------------------------

class Session:
    """A recording from arming to detaching; see the module docstring for the order.

    ``on_switch`` (a record at a time) or ``on_switch_rows`` (an int64 array of them in
    ``COLUMNS`` order, a batch at a time: what the engine hands over) sees every switch,
    so the consumer's statistics (``Stats`` with ``opts.switch_filter``) count seqs before
    filtering; the capture holds what the filter keeps, and its meta says
    (``filtered_out``) what it left out, so a reader does not count those as gaps.
    ``on_call`` sees the calls --pid keeps.
    ``engine_factory`` is ``Engine`` unless a test passes a fake one.
    """

    def __init__(self, opts: TraceOptions, plan: probes.Plan, *, tool: str,
                 output: Path | None = None,
                 on_switch: Callable[[SwitchRecord], None] | None = None,
                 on_call: Callable[[CallRecord], None] | None = None,
                 engine_factory: Callable | None = None,
                 signals: bool = False, workload_stdio: dict | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 on_switch_rows: Callable[[np.ndarray], None] | None = None) -> None:
        self.opts, self.plan, self.tool, self.output = opts, plan, tool, output
        self.on_switch, self.on_call = on_switch, on_call
        self.on_switch_rows = on_switch_rows
        self.clock = clock
        self.meta: dict = {}
        self.engine = None
        self.capture: CaptureWriter | None = None
        self.calls: CallWriter | None = None
        self.workload = Workload(opts.workload, **(workload_stdio or {})) \
            if opts.workload else None
        self._engine_factory = engine_factory
        self._signals = signals
        self.signal_stop: SignalStop | None = None
        self.pf_watch: PfWatch | None = None
        self.registration: Registration | None = None
        self.new_warnings: list[str] = []
        self.started_at: float | None = None
        self.startup_s = 0.0
        self.stop_reason: str | None = None
        self.lost: dict[int, int] = {}
        self.gate = FilterGate(opts.switch_filter)     # what the capture keeps
        self.switch_rows_passed = 0     # every switch the engine handed over (filtered or not)
        self._caller_nice: int | None = None     # before --nice: the workload's

    # -- start ----------------------------------------------------------------------
    def start(self) -> None:
        """Arm the probes, open the writers, touch the ready file, start the workload."""
        if self.opts.nice is not None:   # first: the threads started below inherit it
            self._caller_nice = set_process_nice(self.opts.nice)
        if self._engine_factory is None:
            require_bcc()
            from ..kernel.engine import Engine
            self._engine_factory = Engine
        if self._signals:
            self.signal_stop = SignalStop()
        if self.output is not None:
            # before the records flow: under the lab's TCG the import takes seconds,
            # which a reader must not spend while the rings fill
            load_block_formatter()
        self.engine = self._engine_factory(
            self.plan, budget_ns=self.opts.budget_ns, on_switch_rows=self._switch_rows,
            on_call=self._call if self.opts.calls else None, probe_costs=self.opts.costs)
        t0 = self.clock()
        try:
            self.engine.start()
        except Exception as e:                # BCC reports compile/attach failures this way
            self._abort()
            raise RecordError(f"could not load the BPF program: {str(e).splitlines()[0]}") \
                from None
        self.registration = Registration()
        if (other := self.registration.warning()) is not None:
            self.engine.warnings.append(other)
        self.meta = self.build_meta()
        try:
            if self.output is not None:
                self.capture = CaptureWriter(self.output, self.meta)
                self.meta = self.capture.meta
            if self.opts.calls is not None:
                self.calls = CallWriter(self.opts.calls)
        except CaptureError as e:
            self._abort()
            raise RecordError(str(e)) from None
        if self.opts.ready_file is not None:     # created, never written through a symlink
            os.close(os.open(self.opts.ready_file,
                             os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666))
        self.startup_s = self.clock() - t0
        if self.workload is not None:
            try:
                if self._caller_nice is None:
                    self.workload.start()
                else:
                    call_at_nice(self._caller_nice, self.workload.start)
            except (RecordError, PriorityError):
                self.stop("error: the workload did not start")
                raise
        if self.plan.source == "pf_sched":
            self.pf_watch = PfWatch()
        self.started_at = self.clock()

    def _abort(self) -> None:
        """Start-up failed: detach what was attached; nothing was started after it."""
        self.engine.close()
        if self.registration is not None:
            self.registration.close()
        if self.capture is not None:
            self.capture.close(stop_reason="start-up failed")
        if self.signal_stop is not None:
            self.signal_stop.restore()

    def build_meta(self) -> dict:
        plan, engine, opts = self.plan, self.engine, self.opts
        meta = {"tool": self.tool, "version": __version__, "kernel": platform.release(),
                "host": platform.node(), "switch_source": plan.source,
                "depth": plan.depth, "unmeasured": plan.unmeasured(),
                "probe_modes": plan.modes(), "floor_ns": engine.floor.as_meta(),
                "probe_costs": engine.probe_costs,
                "budget_ns": opts.budget_ns, "filters": opts.filters(),
                "buffer": "ringbuf" if plan.ringbuf else "perf",
                "buffer_pages": plan.ringbuf_pages,
                "reader": engine.reader, "reader_note": engine.reader_note,
                "nice": thread_nice(),
                "warnings": engine.warnings,
                "kvm_vendor": exit_reasons.vendor(),
                "calls_file": opts.calls.name if opts.calls else None}
        if self.workload is not None:
            meta["workload"] = {"argv": self.workload.argv, "exit_status": None}
        return meta

    # -- records ----------------------------------------------------------------------
    def _switch_rows(self, rows: np.ndarray) -> None:
        """A batch of switches from the engine: the capture gets what the filter keeps,
        the consumer every one."""
        self.switch_rows_passed += rows.shape[0]
        kept = self.gate.rows(rows) if self.gate.filter.active else rows
        if self.capture is not None:
            self.capture.write_rows(kept)
        if self.on_switch_rows is not None:
            self.on_switch_rows(rows)
        elif self.on_switch is not None:
            records_of(self.on_switch)(rows)

    def _call(self, rec: CallRecord) -> None:
        if self.opts.keeps_call(rec):
            if self.calls is not None:
                self.calls.write(rec)
            if self.on_call is not None:
                self.on_call(rec)

    # -- running ----------------------------------------------------------------------
    def poll(self, timeout_ms: int = 100) -> str | None:
        """Hand over what the kernel has; the reason to stop when the run is over
        (a signal, --duration, the workload exiting by itself), else None."""
        reason = self.due_stop()
        if reason is None:
            self.engine.poll(timeout_ms)
            if self.pf_watch is not None:
                for line in self.pf_watch.check():
                    self.engine.warnings.append(line)       # into the capture's meta too
                    self.new_warnings.append(line)
            reason = self.due_stop()
        return reason

    def take_warnings(self) -> list[str]:
        """Warnings that arose while running, once each, for the front end to show."""
        out, self.new_warnings = self.new_warnings, []
        return out

    def due_stop(self) -> str | None:
        if self.signal_stop is not None and self.signal_stop.reason:
            return self.signal_stop.reason
        if self.workload is not None and self.workload.exit_status is not None:
            return f"workload exited ({self.workload.exit_status})"
        if (self.opts.duration is not None and self.started_at is not None
                and self.clock() - self.started_at >= self.opts.duration):
            return "duration"
        return None

    def elapsed(self) -> float:
        return 0.0 if self.started_at is None else self.clock() - self.started_at

    def lost_per_cpu(self) -> dict[int, int]:
        if self.engine is None or self.stop_reason is not None:
            return dict(self.lost)
        return self.engine.lost_per_cpu()

    def background(self) -> dict:
        if self.engine is None or self.stop_reason is not None or not self.engine.bpf:
            return self.meta.get("background", {})
        return self.engine.background()

    def current_meta(self) -> dict:
        """The meta as it stands: while recording, with the engine's losses and totals
        read now (in the keys the capture's meta gives them at stop)."""
        if self.engine is None or self.stop_reason is not None or not self.engine.bpf:
            return self.meta
        e = self.engine
        return {**self.meta, "lost_by_kind": e.lost_by_kind(), "background": e.background()}

    def kernel_histograms(self) -> list | None:
        """The kernel's histograms of every switch: read now while recording, else the
        meta's (None where there are none)."""
        if self.engine is not None and self.stop_reason is None and self.engine.bpf:
            return self.engine.kernel_histograms()
        return kernel_hist.from_meta(self.meta.get("kernel_histograms"))

    # -- stop -------------------------------------------------------------------------
    def stop(self, reason: str) -> dict:
        """Workload first, then the probes, then the files; safe to call twice."""
        if self.stop_reason is not None or self.engine is None:
            return self.meta
        self.stop_reason = reason
        try:
            if self.workload is not None:
                self.workload.stop()
                self.meta.setdefault("workload", {}).update(self.workload.as_meta())
            engine = self.engine
            # Drained first, so what closed during the stop is in the counts; the joins'
            # counts after the held records were passed on (flush counts the orphans).
            engine.drain()
            self.lost = engine.lost_per_cpu()
            self.meta.update({"lost_by_kind": engine.lost_by_kind(),
                              "partial_windows": engine.partial_windows(),
                              "reader_gaps": engine.reads.as_meta(),
                              "background": engine.background() if engine.bpf else {}})
            if engine.bpf is not None:
                self.meta["kernel_histograms"] = engine.kernel_histograms_meta()
            a = engine.assembler
            a.flush()
            if engine.bpf is not None:
                self.meta["switch_accounting"] = kernel_hist.switch_accounting(
                    self.meta["kernel_histograms"], self.meta["lost_by_kind"].get("switch", 0),
                    engine.samples, self.switch_rows_passed)
            self.meta.update({"late_releases": a.late_releases,
                              "late_release_ns": a.late_release_ns,
                              "orphan_releases": a.orphan_releases,
                              "late_exits": a.late_exits, "late_exit_ns": a.late_exit_ns,
                              "orphan_exits": a.orphan_exits,
                              "unended_exits": a.unended_exits})
        finally:
            try:
                self.engine.close()           # flushes held records into the writers
                if self.registration is not None:
                    self.registration.close()
            finally:
                if self.signal_stop is not None:
                    self.signal_stop.restore()
                self._close_writers(reason)
        return self.meta

    def _close_writers(self, reason: str) -> None:
        if self.gate.filter.active:           # after engine.close(): its flush counted
            self.meta[FILTERED_OUT] = self.gate.as_meta()
        try:
            if self.capture is not None:
                self.capture.close(stop_reason=reason, lost=self.lost)
                self.meta = self.capture.meta
            else:
                self.meta.update({"stop_reason": reason, "lost_total": sum(self.lost.values()),
                                  "lost_records_per_cpu": dict(sorted(self.lost.items()))})
        finally:
            if self.calls is not None:
                self.calls.close()

    def workload_warning(self) -> str | None:
        """A line for the user when the workload failed by itself (not when we stopped it)."""
        w = self.workload
        if w is None or w.stopped_by_us or not w.exit_status:
            return None
        status = w.exit_status
        how = f"signal {-status}" if status < 0 else f"status {status}"
        return f"workload {' '.join(w.argv)} exited with {how}"
