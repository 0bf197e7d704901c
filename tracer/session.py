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
import errno
import os
import platform
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from . import __version__, exit_reasons, probes
from .capture import CallWriter, CaptureError, CaptureWriter
from .errors import VftraceError
from .schema import CallRecord, SwitchRecord

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
    parser.add_argument("-c", "--calls", help="also write one row per timed call to this CSV")
    parser.add_argument("--perf-buffer", action="store_true",
                        help="use the perf buffer, not the ring buffer")
    parser.add_argument("--ebpf", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ready-file", help=argparse.SUPPRESS)   # touched once armed
    parser.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ...",
                        help="a workload to run while tracing: started once the probes are "
                             "armed, stopped before they are detached; its exit ends the run")


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
        raise RecordError(f"{flag} {path}: is a directory; give a file name")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise RecordError(f"{flag} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise RecordError(f"{flag} {path}: directory {parent} is not writable")
    return p


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


@dataclass
class TraceOptions:
    """The validated tracing options (what ``add_trace_options`` parses)."""
    switch: str | None = None
    pfs: set[int] | None = None
    vfs: set[int] | None = None
    pids: set[int] | None = None
    budget_ns: int = 100
    probe_mode: str = "auto"
    calls: Path | None = None
    perf_buffer: bool = False
    duration: float | None = None
    ebpf: bool = False
    ready_file: Path | None = None
    workload: list[str] | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace, command: str = "record") -> TraceOptions:
        """Validate in the order ``vftrace record`` always has (its messages unchanged)."""
        pfs, vfs = parse_ints(args.pf, "--pf"), parse_ints(args.vf, "--vf")
        pids = parse_ints(args.pid, "--pid")
        if args.budget_ns <= 0:
            raise RecordError(f"--budget-ns {args.budget_ns}: must be positive")
        duration = getattr(args, "duration", None)
        if duration is not None and duration <= 0:
            raise RecordError(f"--duration {duration}: must be positive")
        return cls(switch=args.switch, pfs=pfs, vfs=vfs, pids=pids, budget_ns=args.budget_ns,
                   probe_mode=args.probe_mode, calls=check_output(args.calls, "--calls"),
                   perf_buffer=args.perf_buffer,
                   duration=duration, ebpf=args.ebpf,
                   ready_file=check_output(getattr(args, "ready_file", None), "--ready-file"),
                   workload=workload_argv(getattr(args, "cmd", None), command))

    def filters(self) -> dict:
        return {"pf": sorted(self.pfs) if self.pfs else None,
                "vf": sorted(self.vfs) if self.vfs else None,
                "pid": sorted(self.pids) if self.pids else None}

    def keeps_switch(self, rec: SwitchRecord) -> bool:
        return ((self.pfs is None or rec.pf in self.pfs) and
                (self.vfs is None or rec.to_vf in self.vfs or rec.from_vf in self.vfs))

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
                           emit_calls=opts.calls is not None)
    except probes.ProbeError as e:
        raise RecordError(str(e)) from None


def require_bcc() -> None:
    try:
        import bcc  # noqa: F401
    except ImportError:
        raise RecordError("BCC is missing: apt-get install python3-bpfcc (not PyPI's 'bcc')") \
            from None


def plan_for(opts: TraceOptions) -> probes.Plan | None:
    """What a tracing command needs before it starts: root, the probe plan, BCC.  With
    ``--ebpf`` it prints the program instead and returns None (no root, no BCC needed)."""
    if not opts.ebpf:
        require_root()
    plan = make_plan(opts)
    if opts.ebpf:
        from .engine import program_text
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
        pgid = self.proc.pid
        self._signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        while self._group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._group_alive(pgid):
            self._signal_group(pgid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while self._group_alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.05)
        return self.proc.wait()

    def _group_alive(self, pgid: int) -> bool:
        self.proc.poll()                      # reap our child so it is not a zombie member
        return bool(group_members(pgid))

    @staticmethod
    def _signal_group(pgid: int, sig: int) -> None:
        try:
            os.killpg(pgid, sig)
        except OSError as e:
            if e.errno != errno.ESRCH:
                raise

    def as_meta(self) -> dict:
        return {"argv": self.argv, "exit_status": self.exit_status,
                "stopped_by_vftrace": self.stopped_by_us}


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group.  A zombie grandchild that init
    has not reaped yet still answers kill(0), so /proc is read instead."""
    members = []
    try:
        entries = os.listdir("/proc")
    except OSError:                           # no /proc: fall back to the signal probe
        try:
            os.killpg(pgid, 0)
            return [pgid]
        except OSError:
            return []
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 2 and fields[0] not in (b"Z", b"X") and int(fields[2]) == pgid:
            members.append(int(name))
    return members


# --- the session ---------------------------------------------------------------------

class Session:
    """A recording from arming to detaching; see the module docstring for the order.

    ``on_switch``/``on_call`` see the records the filters keep (the capture holds the
    same ones).  ``engine_factory`` is ``Engine`` unless a test passes a fake one.
    """

    def __init__(self, opts: TraceOptions, plan: probes.Plan, *, tool: str,
                 output: Path | None = None,
                 on_switch: Callable[[SwitchRecord], None] | None = None,
                 on_call: Callable[[CallRecord], None] | None = None,
                 engine_factory: Callable | None = None,
                 signals: bool = False, workload_stdio: dict | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.opts, self.plan, self.tool, self.output = opts, plan, tool, output
        self.on_switch, self.on_call = on_switch, on_call
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
        self.started_at: float | None = None
        self.startup_s = 0.0
        self.stop_reason: str | None = None
        self.lost: dict[int, int] = {}

    # -- start ----------------------------------------------------------------------
    def start(self) -> None:
        """Arm the probes, open the writers, touch the ready file, start the workload."""
        if self._engine_factory is None:
            require_bcc()
            from .engine import Engine
            self._engine_factory = Engine
        if self._signals:
            self.signal_stop = SignalStop()
        self.engine = self._engine_factory(
            self.plan, budget_ns=self.opts.budget_ns, on_switch=self._switch,
            on_call=self._call if self.opts.calls else None)
        t0 = self.clock()
        try:
            self.engine.start()
        except Exception as e:                # BCC reports compile/attach failures this way
            self._abort()
            raise RecordError(f"could not load the BPF program: {str(e).splitlines()[0]}") \
                from None
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
        if self.opts.ready_file is not None:
            self.opts.ready_file.touch()
        self.startup_s = self.clock() - t0
        if self.workload is not None:
            try:
                self.workload.start()
            except RecordError:
                self.stop("error: the workload did not start")
                raise
        self.started_at = self.clock()

    def _abort(self) -> None:
        """Start-up failed: detach what was attached; nothing was started after it."""
        self.engine.close()
        if self.capture is not None:
            self.capture.close(stop_reason="start-up failed")
        if self.signal_stop is not None:
            self.signal_stop.restore()

    def build_meta(self) -> dict:
        plan, engine, opts = self.plan, self.engine, self.opts
        meta = {"tool": self.tool, "version": __version__, "kernel": platform.release(),
                "host": platform.node(), "switch_source": plan.source,
                "probe_modes": plan.modes(), "floor_ns": engine.floor.as_meta(),
                "budget_ns": opts.budget_ns, "filters": opts.filters(),
                "buffer": "ringbuf" if plan.ringbuf else "perf", "warnings": engine.warnings,
                "kvm_vendor": exit_reasons.vendor(),
                "calls_file": opts.calls.name if opts.calls else None}
        if self.workload is not None:
            meta["workload"] = {"argv": self.workload.argv, "exit_status": None}
        return meta

    # -- records ----------------------------------------------------------------------
    def _switch(self, rec: SwitchRecord) -> None:
        if self.opts.keeps_switch(rec):
            if self.capture is not None:
                self.capture.write(rec)
            if self.on_switch is not None:
                self.on_switch(rec)

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
            reason = self.due_stop()
        return reason

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
            self.lost = engine.lost_per_cpu()
            self.meta.update({"late_releases": engine.assembler.late_releases,
                              "orphan_releases": engine.assembler.orphan_releases,
                              "partial_windows": engine.partial_windows(),
                              "background": engine.background() if engine.bpf else {}})
        finally:
            try:
                self.engine.close()           # flushes held records into the writers
            finally:
                if self.signal_stop is not None:
                    self.signal_stop.restore()
                self._close_writers(reason)
        return self.meta

    def _close_writers(self, reason: str) -> None:
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
