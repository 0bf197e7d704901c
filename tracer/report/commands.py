"""What ``vftrace report`` and ``vftrace export`` do, given parsed arguments."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from tracer.capture.files import meta_path
from tracer.capture.output import atomic_output, check_output
from tracer.errors import VftraceError
from tracer.report import tables
from tracer.report.load import (call_chunks, calls_path, check_input, load_capture, load_meta,
                                switch_chunks, unique_labels)

REPORT_FORMATS = (".html", ".htm", ".png", ".svg", ".pdf")


def report(args) -> int:
    out = None
    if args.output:
        out = check_output(args.output, "-o/--output", tuple(Path(p) for p in args.captures))
        if out.suffix.lower() not in REPORT_FORMATS:
            kind = f"format {out.suffix!r}" if out.suffix else "format (no extension)"
            raise VftraceError(f"-o {out}: unknown {kind}; give a name ending in .html, "
                               ".png, .svg or .pdf")
    from tracer.report.plots import parse_size
    size = parse_size(args.size)
    if args.budget_ns is not None and args.budget_ns <= 0:
        raise VftraceError(f"--budget-ns {args.budget_ns}: must be positive")
    paths = [check_input(p) for p in args.captures]
    labels = unique_labels(paths, args.label)
    captures = [load_capture(p, label, args.budget_ns) for p, label in zip(paths, labels)]
    if out is not None and not any(c.records for c in captures):
        raise VftraceError("nothing to plot: the capture(s) hold no switch records")
    if args.json:
        print(json.dumps(tables.report_json(captures), indent=2))
    else:
        print(tables.render_text(captures), end="")
    if out is None:
        return 0
    from tracer.report import plots
    fig = plots.make_figure(captures, size)
    if out.suffix.lower() in (".html", ".htm"):
        from tracer.report.html import render_html
        with atomic_output(out) as f:
            f.write(render_html(captures, plots.svg_text(fig)))
    else:
        plots.save_figure(fig, out)
    print(f"vftrace: wrote {out}", file=sys.stderr)
    return 0


def export(args) -> int:
    if not (args.perfetto or args.parquet or args.calls_parquet):
        raise VftraceError("nothing to export: give --perfetto trace.json, --parquet "
                           "capture.parquet and/or --calls-parquet calls.parquet")
    src = check_input(args.capture)
    meta, problems = load_meta(src)
    calls = None if args.no_calls else calls_path(src, meta, args.calls)
    inputs = (src, meta_path(src), *([calls] if calls is not None else []))
    outputs = {}
    for flag, value in (("--perfetto", args.perfetto), ("--parquet", args.parquet),
                        ("--calls-parquet", args.calls_parquet)):
        if value:
            outputs[flag] = check_output(value, flag, inputs)
    if len(set(outputs.values())) < len(outputs):
        raise VftraceError("give a different file to each of " + ", ".join(outputs))
    if calls is not None and not calls.is_file():
        print(f"vftrace export: warning: calls file {calls} is missing; exporting switches "
              "only", file=sys.stderr)
        calls = None
    if args.calls_parquet and calls is None:
        raise VftraceError(f"--calls-parquet: {src} has no per-call file "
                           "(record with vftrace record --calls, or give --calls FILE)")
    if args.parquet:
        from tracer.report import parquet
        with atomic_output(outputs["--parquet"], "wb") as f:
            rows = parquet.write_switches(f, switch_chunks(src, problems), meta)
        print(f"vftrace: wrote {outputs['--parquet']} ({rows} switches)", file=sys.stderr)
    if args.calls_parquet:
        from tracer.report import parquet
        call_problems: list[str] = []
        with atomic_output(outputs["--calls-parquet"], "wb") as f:
            rows = parquet.write_calls(f, call_chunks(calls, call_problems), meta)
        problems.extend(f"{calls.name}: {p}" for p in call_problems)
        print(f"vftrace: wrote {outputs['--calls-parquet']} ({rows} calls)", file=sys.stderr)
    if args.perfetto:
        write_perfetto(src, calls, meta, problems, outputs["--perfetto"])
    for p in dict.fromkeys(problems):    # each once, in order
        print(f"vftrace export: warning: {p}", file=sys.stderr)
    return 0


def write_perfetto(src: Path, calls: Path | None, meta: dict, problems: list[str],
                   out: Path) -> None:
    from tracer.report.perfetto import TraceBuilder
    builder = TraceBuilder(meta)
    switch_problems: list[str] = []
    for chunk in switch_chunks(src, switch_problems):
        for r in chunk:
            builder.add_switch(r)
    if calls is not None:
        call_problems: list[str] = []
        for chunk in call_chunks(calls, call_problems):
            for c in chunk:
                builder.add_call(c)
        switch_problems.extend(f"{calls.name}: {p}" for p in call_problems)
    problems.extend(switch_problems)
    with atomic_output(out) as f:
        builder.write(f, src, list(dict.fromkeys(problems)))
    print(f"vftrace: wrote {out} ({builder.switches} switches, {builder.exits} KVM exits, "
          f"{builder.calls} other calls); open it in https://ui.perfetto.dev or "
          "chrome://tracing", file=sys.stderr)
