"""The ``vftrace`` command: one entry point, a subcommand per job."""
from __future__ import annotations

import argparse
import importlib
import math
import os
import sys

from . import __version__
from .errors import UsageError, VftraceError

# Subcommands whose parsers and code live with their front end.  Each module has
# COMMANDS, add_parsers(subparsers) and run(args) -> int; it imports its heavy libraries
# (Textual, matplotlib) inside run(), so `vftrace --help` and the other commands stay fast.
FRONT_ENDS = ("tui.cli", "tracer.report.cli", "tracer.record.calibrate")

EPILOG = """examples:
  vftrace doctor                      # what this kernel lets vftrace do, and what to install
  vftrace record -o cap.csv -d 10     # 10 s of pf_sched switches to cap.csv (+ cap.meta.json)
  vftrace record -o cap.csv --switch func:my_pf_switch --budget-ns 500
  vftrace lab                         # a shell in the lab VM (newest kernel, one PF)
  vftrace lab -P --pfs 2              # the same with pf_sched switching on two PFs
  vftrace lab --kernel 6.1 --pfs 2 -- vftrace doctor
  vftrace lab --timeout 600 -- python -m pytest tests/lab
  vftrace lab --mode mmap --vms 2     # KVM guests on pf_sched's VFs, in the dashboard
  vftrace lab experiment -d 20        # mmap vs trap, strict vs batched: a comparison
"""


class Parser(argparse.ArgumentParser):
    def error(self, message):                  # one line, no usage dump
        raise UsageError(f"{message} (see {self.prog} --help)", self.prog)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="vftrace", description="Time SR-IOV VF switches (IOMMU map/unmap, MMU "
               "zaps, KVM exits) live with BPF.", epilog=EPILOG,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-V", "--version", action="version", version=f"vftrace {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True

    d = sub.add_parser("doctor", help="check kernel features and say how to get what is missing",
                       epilog="examples:\n  vftrace doctor\n  vftrace doctor --json | jq .can_trace",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("-j", "--json", action="store_true", help="machine-readable output")
    d.set_defaults(handler="tracer.kernel.doctor:main")

    lab = sub.add_parser(
        "lab", help="run a command (or a shell) in the lab VM",
        description="Boot a Debian kernel with virtme-ng under QEMU (q35, emulated VT-d "
                    "IOMMU, one edu PCI device per PF) with the repository shared read-write, "
                    "run CMD there and return its exit status.",
        epilog="examples:\n  vftrace lab\n  vftrace lab -k 6.1 -- vftrace doctor\n"
               "  vftrace lab -k 6.12 --pfs 2 -t 900 -- python -m pytest tests/lab\n"
               "  vftrace lab -P --pfs 2 -- vftrace record -o build/cap.csv -d 10\n"
               "  vftrace lab --mode mmap --vms 2 --vcpus 2       # guests + the dashboard\n"
               "  vftrace lab --mode trap --record trap.csv -d 20  # headless capture\n"
               "  vftrace lab experiment -d 20 -o results/        # mmap/trap x strict/batched",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    lab.add_argument("-k", "--kernel", help="6.1, 6.12, a release string or a vmlinuz path "
                     "(default: the newest installed)")
    lab.add_argument("-n", "--pfs", type=int, default=1, help="simulated PFs: edu devices (default 1)")
    lab.add_argument("--cpus", type=int, default=2, help="guest CPUs (default 2)")
    lab.add_argument("--memory", default="2G", help="guest memory (default 2G)")
    lab.add_argument("-t", "--timeout", type=seconds, help="stop the VM after this many seconds")
    lab.add_argument("--boot-timeout", type=seconds, default=150,
                     help="retry the boot when CMD has not started after this many seconds "
                          "(default 150; up to 3 attempts)")
    lab.add_argument("--accel", choices=("auto", "tcg", "kvm"), default="auto",
                     help="auto probes once whether KVM boots a standard kernel here")
    lab.add_argument("-P", "--pf-sched", action="store_true",
                     help="start pf_sched on every PF before CMD (or the shell)")
    lab.add_argument("--dry-run", action="store_true", help="print the vng command and exit")
    lab.add_argument("--kernel-log", metavar="FILE",
                     help="keep the guest kernel's warnings and worse (oopses, lockups, hung "
                          "tasks) in FILE on this host")
    g = lab.add_argument_group("guests preset (pf_sched + KVM guests on its VFs + the dashboard)")
    g.add_argument("-M", "--mode", choices=("mmap", "trap"),
                   help="guests with the VF BAR mmap'd (zapped on a switch) or trapped (every "
                        "access an exit); with it, the lab shows the dashboard")
    g.add_argument("--vms", type=int, default=2, help="KVM guests, one VF each (default 2)")
    g.add_argument("--vcpus", type=int, default=1, help="vCPUs per guest (default 1)")
    g.add_argument("--vfs", type=int, default=4, help="VFs per PF (default 4)")
    g.add_argument("--slice-us", type=int, default=2000, help="pf_sched time slice (default 2000)")
    g.add_argument("--unmap-mode", choices=("strict", "batched"), default="strict")
    g.add_argument("-r", "--record", metavar="FILE",
                   help="headless: record the guests' switches to FILE (on this host) instead")
    g.add_argument("-d", "--duration", type=seconds, default=10.0,
                   help="seconds of guests for --record and for experiment (default 10)")
    g.add_argument("-o", "--output", help="experiment: directory for its results "
                   "(default build/experiment/<kernel>)")
    lab.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD...: what to run in the guest")
    lab.set_defaults(handler="tracer.lab.vm:main")
    pf = sub.add_parser(
        "pf-sched", help="load/unload pf_sched on the lab's edu devices (in the lab VM)",
        epilog="examples:\n  vftrace pf-sched up --slice-us 500 --unmap-mode batched\n"
               "  vftrace pf-sched status\n  vftrace pf-sched down",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    pf.add_argument("action", choices=("up", "down", "status"))
    pf.add_argument("--slice-us", type=int, help="time slice per VF (default 2000)")
    pf.add_argument("--nr-vfs", type=int, help="VFs per PF (default 4)")
    pf.add_argument("--bar-pages", type=int, help="pages per VF BAR (default 4)")
    pf.add_argument("--unmap-mode", choices=("strict", "batched"), help="IOTLB sync per unmap or per switch")
    pf.set_defaults(handler="tracer.pfsched.control:main")

    rec = sub.add_parser(
        "record", help="record switch timings to a CSV capture (headless)",
        description="Attach vftrace's BPF program and write one row per VF switch to a CSV "
                    "capture with a .meta.json beside it; a summary table at the end.",
        epilog="examples:\n"
               "  vftrace record -o cap.csv -d 10\n"
               "  vftrace record -o cap.csv --pf 0 --budget-ns 1000 --probe-mode kprobe\n"
               "  vftrace record -o cap.csv --calls calls.csv --pid 4242\n"
               "  vftrace record -o cap.csv --depth window  # the switch's bookends only\n"
               "  vftrace record -o cap.csv --switch tp:mydrv:switch_start,mydrv:switch_done\n"
               "  vftrace record -o cap.csv -- python -m tracer.lab.workloads.kvm  # stops with it",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    rec.add_argument("-o", "--output", help="the capture CSV (its metadata: NAME.meta.json)")
    rec.add_argument("-d", "--duration", type=seconds, help="stop after this many seconds")
    rec.add_argument("-q", "--quiet", action="store_true", help="no progress line")
    from .record.session import add_trace_options
    add_trace_options(rec)
    rec.set_defaults(handler="tracer.record.headless:main")

    srv = sub.add_parser(
        "serve", help="record headless for Prometheus: the /metrics endpoint, until signalled",
        description="Record as vftrace record does, with no capture file unless -o asks "
                    "for one, and serve the statistics at http://ADDR/metrics for a "
                    "Prometheus server (deploy/prometheus/ has a scrape config, recording "
                    "rules and alerts).  Runs until SIGINT/SIGTERM, or -d.  Memory stays "
                    "bounded: nothing is kept per record.",
        epilog="examples:\n"
               "  vftrace serve                              # 127.0.0.1:9435, pf_sched's switches\n"
               "  vftrace serve --metrics 0.0.0.0:9435       # every interface (no authentication)\n"
               "  vftrace serve --metrics [::1]:9435 --metrics-tls cert.pem key.pem\n"
               "  vftrace serve --pf 0 -b 500 -o cap.csv     # and keep a capture too\n"
               "  curl -s 127.0.0.1:9435/metrics | grep vftrace_switches_total",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    srv.add_argument("-o", "--output", help="also write a capture CSV (and its .meta.json)")
    srv.add_argument("-d", "--duration", type=seconds, help="stop after this many seconds")
    srv.add_argument("-q", "--quiet", action="store_true", default=True,
                     help=argparse.SUPPRESS)   # a service: no progress line
    add_trace_options(srv)
    from .metrics.server import DEFAULT_ADDRESS
    srv.set_defaults(handler="tracer.record.headless:serve", metrics=DEFAULT_ADDRESS)
    for name in FRONT_ENDS:
        module = importlib.import_module(name)
        module.add_parsers(sub)
        for command in module.COMMANDS:
            sub.choices[command].set_defaults(handler=f"{name}:run")
    return p


def handler(args: argparse.Namespace):
    """The function that runs the parsed subcommand: every subparser names its own,
    ``module:function``, imported only now so the other commands stay fast."""
    module, _, function = args.handler.partition(":")
    return getattr(importlib.import_module(module), function)


def main(argv: list[str] | None = None) -> int:
    command = "vftrace"
    try:
        args = build_parser().parse_args(argv)
        command = f"vftrace {args.command}"
        return handler(args)(args)
    except VftraceError as e:           # any refusal, of any subcommand: one line
        who = e.prog if isinstance(e, UsageError) else command
        print(f"{who}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:                     # `vftrace ... | head`: the reader left
        # Point stdout at /dev/null so the interpreter's final flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:     # the system said no (permissions, a full disk): not a bug trace
        print(f"{command}: error: {os_error_text(e)}", file=sys.stderr)
        return 2


def os_error_text(e: OSError) -> str:
    """``Permission denied: build/x`` rather than ``[Errno 13] Permission denied: 'build/x'``."""
    what = e.strerror or str(e) or type(e).__name__
    text = what if e.filename is None else f"{what}: {os.fsdecode(e.filename)}"
    return text.splitlines()[0]


def seconds(text: str) -> float:
    """argparse type: a finite number (``nan`` and ``inf`` are floats, not durations)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r}: give a finite number of seconds")
    return value


if __name__ == "__main__":
    sys.exit(main())
