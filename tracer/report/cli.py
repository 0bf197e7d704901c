"""``vftrace report`` and ``vftrace export``: parsers here, the work in ``commands``
(imported in ``run`` with matplotlib and pyarrow, so ``vftrace --help`` stays fast)."""
from __future__ import annotations

import argparse
import textwrap

COMMANDS: tuple[str, ...] = ("report", "export")

REPORT_EPILOG = """examples:
  vftrace report cap.csv                        # the summary table on stdout
  vftrace report cap.csv -o report.html         # one self-contained HTML file: tables + plots
  vftrace report mmap.csv trap.csv -o cmp.png --size 1600x1000
  vftrace report strict.csv batched.csv -l strict -l batched -o cmp.svg
  vftrace report cap.csv --budget-ns 500 --json | jq '.captures[0].rows[0]'
"""

EXPORT_EPILOG = """examples:
  vftrace export cap.csv --perfetto trace.json  # open in ui.perfetto.dev or chrome://tracing
  vftrace export cap.csv --parquet cap.parquet  # typed columns + the meta (pandas, DuckDB)
  vftrace export cap.csv --perfetto trace.json --parquet cap.parquet \\
                 --calls-parquet calls.parquet
"""


def add_parsers(sub) -> None:
    rep = sub.add_parser(
        "report", help="summary tables and plots of one or more captures",
        description=textwrap.fill(
            "Print per-PF, per-VF and per-switch-pair statistics of capture CSVs "
            "(percentiles, share over budget, revoke/grant split, KVM exits and blocked "
            "time per switch, losses) and, with -o, plot them: switch-time CDF, revoke vs "
            "grant, switch time over time, exits per switch. Several captures are "
            "overlaid for comparison.", 88),
        epilog=REPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    rep.add_argument("captures", nargs="+", metavar="CAPTURE.csv",
                     help="capture CSVs written by vftrace record")
    rep.add_argument("-o", "--output", metavar="FILE",
                     help="also write the report: .html (self-contained), .png, .svg or .pdf")
    rep.add_argument("-l", "--label", action="append", metavar="LABEL",
                     help="name of a capture in tables and legends, in capture order "
                          "(repeatable; default: the file name without .csv)")
    rep.add_argument("--size", metavar="WxH",
                     help="figure size in pixels (default 1600x1000)")
    rep.add_argument("-b", "--budget-ns", type=int, metavar="NS",
                     help="switch budget for the over-budget share (default: the capture's)")
    rep.add_argument("-j", "--json", action="store_true",
                     help="print the tables as JSON instead of text")

    exp = sub.add_parser(
        "export", help="convert a capture: Perfetto timeline, Parquet",
        description=textwrap.fill(
            "Write a capture as a Chrome JSON trace for Perfetto (one track per PF with "
            "the switches, their revoke and grant phases and their kernel calls; one track "
            "per vCPU with its KVM exits) and/or as Parquet.", 88),
        epilog=EXPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    exp.add_argument("capture", metavar="CAPTURE.csv",
                     help="a capture CSV written by vftrace record")
    exp.add_argument("--perfetto", metavar="FILE", help="write the timeline (JSON) here")
    exp.add_argument("--parquet", metavar="FILE", help="write the switch rows as Parquet here")
    exp.add_argument("--calls-parquet", metavar="FILE",
                     help="write the per-call rows as Parquet here")
    exp.add_argument("-c", "--calls", metavar="FILE",
                     help="the per-call CSV (default: the capture meta's calls_file)")
    exp.add_argument("--no-calls", action="store_true",
                     help="leave the per-call rows out of the timeline")


def run(args) -> int:
    from tracer.errors import VftraceError
    from tracer.report import commands
    if args.command == "export" and args.no_calls and (args.calls or args.calls_parquet):
        other = "--calls" if args.calls else "--calls-parquet"
        raise VftraceError(f"--no-calls leaves the per-call rows out and {other} asks for "
                           "them: give one of the two")
    # What tracer.capture refuses is a CaptureError, a VftraceError too: one line.
    if args.command == "report":
        return commands.report(args)
    return commands.export(args)
