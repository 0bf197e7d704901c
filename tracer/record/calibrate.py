"""``vftrace calibrate``: the tracer's own floor, and how well a capture agrees with the driver.

The floor is what vftrace's probe pair adds to a near-empty kernel call, per probe mode
(fentry/fexit, kprobe/kretprobe).  ``Engine`` measures it at every start-up; this command
loads the program exactly as ``vftrace record`` does, prints the floor with its spread,
and exits without recording.

``--capture CAP.csv`` needs no root: it compares each recorded ``switch_ns`` with the
driver's own timing of the same switch (``source_ns``, pf_sched's ``total_ns``) and
prints the distribution of the difference next to the floor the capture was made with.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

from ..errors import VftraceError
from ..model.schema import DEFAULT_DEPTH, DEPTHS

COMMANDS: tuple[str, ...] = ("calibrate",)

# With no pf_sched loaded the program still needs a switch source to compile; this pair
# exists in every kernel and is never armed here (calibration runs before arming).
IDLE_SOURCE = "tp:sched:sched_process_fork,sched:sched_process_exit"

EPILOG = """examples:
  sudo vftrace calibrate                    # floor per probe mode, median and p10-p90
  sudo vftrace calibrate --json | jq .floor.fentry.median_ns
  sudo vftrace calibrate --probe-mode kprobe
  vftrace calibrate --capture cap.csv       # switch_ns vs the driver's own source_ns
  sudo vftrace calibrate --switches -D iommu -o costs.json
                                            # probe costs on real switches (hooks off/on)
  sudo vftrace record -D iommu --costs costs.json -o cap.csv
"""


@dataclass
class Accuracy:
    """Distribution of ``switch_ns - source_ns`` over the switches that carry both."""
    switches: int
    without_source: int
    median_ns: float
    p10_ns: float
    p90_ns: float
    p99_ns: float
    min_ns: int
    max_ns: int
    mean_ns: float
    median_abs_ns: float
    median_source_ns: float
    median_switch_ns: float

    def as_dict(self) -> dict:
        return asdict(self)


def accuracy(rows: Iterable) -> Accuracy:
    """Tracer-minus-driver difference per switch (rows: SwitchRecords of one capture)."""
    import numpy as np
    pairs = [(r.switch_ns, r.source_ns) for r in rows]
    timed = np.array([p for p in pairs if p[1] > 0], dtype=np.int64).reshape(-1, 2)
    if len(timed) == 0:
        raise VftraceError("no switch in the capture carries source_ns (the driver's own "
                           "timing): record with --switch pf_sched")
    diff = timed[:, 0] - timed[:, 1]
    p10, p50, p90, p99 = np.percentile(diff, [10, 50, 90, 99])
    return Accuracy(switches=len(timed), without_source=len(pairs) - len(timed),
                    median_ns=float(p50), p10_ns=float(p10), p90_ns=float(p90),
                    p99_ns=float(p99), min_ns=int(diff.min()), max_ns=int(diff.max()),
                    mean_ns=float(diff.mean()), median_abs_ns=float(np.median(np.abs(diff))),
                    median_source_ns=float(np.median(timed[:, 1])),
                    median_switch_ns=float(np.median(timed[:, 0])))


def floor_modes(floor: dict | None) -> dict[str, dict]:
    """The per-mode entries of a floor as stored in capture metadata (drops ``function``)."""
    return {k: v for k, v in (floor or {}).items() if isinstance(v, dict)}


def format_floor(floor: dict | None) -> str:
    modes = floor_modes(floor)
    if not modes:
        return "floor: unknown (no calibration function in this kernel)"
    func = (floor or {}).get("function") or "?"
    lines = [f"floor: what a probe pair adds to a near-empty call ({func})",
             f"  {'mode':<8} {'median':>10} {'p10':>10} {'p90':>10} {'samples':>8}"]
    for mode, v in modes.items():
        lines.append(f"  {mode:<8} {v['median_ns']:>8} ns {v['p10_ns']:>7} ns "
                     f"{v['p90_ns']:>7} ns {v['samples']:>8}")
    return "\n".join(lines)


def format_accuracy(acc: Accuracy, floor: dict | None, modes_used: dict | None = None) -> str:
    lines = [f"accuracy: switch_ns - source_ns over {acc.switches} switches"
             + (f" ({acc.without_source} without source_ns skipped)" if acc.without_source else ""),
             f"  median {acc.median_ns:.0f} ns  p10 {acc.p10_ns:.0f}  p90 {acc.p90_ns:.0f}  "
             f"p99 {acc.p99_ns:.0f}  min {acc.min_ns}  max {acc.max_ns}  mean {acc.mean_ns:.0f}",
             f"  median |diff| {acc.median_abs_ns:.0f} ns; median source_ns "
             f"{acc.median_source_ns:.0f} ns, switch_ns {acc.median_switch_ns:.0f} ns"]
    mode = capture_mode(modes_used)
    reference = floor_modes(floor).get(mode) if mode else None
    if reference:
        verdict = "within" if acc.median_abs_ns <= reference["median_ns"] else "above"
        lines.append(f"  {verdict} the {mode} floor ({reference['median_ns']} ns median)")
    return "\n".join(lines)


def capture_mode(modes_used: dict | None) -> str | None:
    """The probe mode of the capture's timed IOMMU hooks (the floor that applies)."""
    for hook in ("iommu_unmap", "iommu_map"):
        mode = (modes_used or {}).get(hook)
        if mode in ("fentry", "kprobe"):
            return mode
    return None


# --- the command ------------------------------------------------------------------------

def add_parsers(sub) -> None:
    p = sub.add_parser(
        "calibrate", help="print the tracer's floor per probe mode (or a capture's accuracy)",
        description="Load vftrace's BPF program as `vftrace record` does, time its probe pair "
                    "around a near-empty kernel call per probe mode, print the floor with its "
                    "spread and exit (nothing is recorded).  With --capture: compare a "
                    "capture's switch_ns with the driver's own source_ns instead.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-j", "--json", action="store_true", help="machine-readable output")
    p.add_argument("-m", "--probe-mode", choices=("auto", "fentry", "kprobe"), default="auto",
                   help="auto: every mode this kernel offers (default)")
    p.add_argument("-s", "--switch", help="switch source to load the program with (default: "
                   "pf_sched if loaded, else an idle tracepoint pair)")
    p.add_argument("-C", "--capture", metavar="CAP.csv",
                   help="print the accuracy of this capture instead (no root needed)")
    p.add_argument("-S", "--switches", action="store_true",
                   help="measure what each probe type costs a real switch: the source's "
                        "own switches with the hooks detached and attached in turn (needs "
                        "a source that is switching; tens of seconds)")
    p.add_argument("-D", "--depth", choices=DEPTHS, default=DEFAULT_DEPTH,
                   help="with --switches: the --depth whose hooks are measured (default "
                        f"{DEFAULT_DEPTH})")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="with --switches: save the costs here, for record/live/serve --costs")


def run(args) -> int:
    if args.output and not args.switches:
        raise VftraceError("--output: only with --switches (it saves their probe costs)")
    if args.capture:
        if args.switches:
            raise VftraceError("--capture and --switches: give one")
        return _run_capture(Path(args.capture), args.json)
    if args.switches:
        return _run_switches(args)
    return _run_live(args)


def _run_capture(path: Path, as_json: bool) -> int:
    from ..capture.files import iter_capture, read_meta
    if not path.is_file():
        raise VftraceError(f"--capture {path}: no such file")
    meta = read_meta(path, require=False)           # a CaptureError is a VftraceError
    problems: list[str] = []
    acc = accuracy(iter_capture(path, problems))
    floor = meta.get("floor_ns") if meta else None
    modes_used = meta.get("probe_modes") if meta else None
    if as_json:
        print(json.dumps({"capture": str(path), "floor": floor, "probe_modes": modes_used,
                          "accuracy": acc.as_dict(), "problems": problems}, indent=2))
    else:
        print(format_floor(floor))
        print(format_accuracy(acc, floor, modes_used))
        for p in problems[:5]:
            print(f"vftrace calibrate: warning: {p}")
    return 0


def _run_live(args) -> int:
    from ..kernel import probes
    from .session import TraceOptions, make_plan, require_bcc, require_root
    require_root()
    require_bcc()
    spec = args.switch
    if spec is None:
        offer = probes.KernelOffer.probe()            # a ProbeError is a VftraceError
        spec = "pf_sched" if "pf_sched:vf_switch_begin" in offer.tracepoints else IDLE_SOURCE
    plan = make_plan(TraceOptions(switch=spec, probe_mode=args.probe_mode))
    if not plan.calib_modes:
        raise VftraceError("no probe mode can time the calibration function here "
                           "(see vftrace doctor)")
    floor, costs, warnings = measure_floor(plan)
    if args.json:
        print(json.dumps({"floor": floor, "calib_modes": list(plan.calib_modes),
                          "probe_costs": costs, "warnings": warnings}, indent=2))
    else:
        for w in warnings:
            print(f"vftrace calibrate: warning: {w}")
        print(format_floor(floor))
        from ..model.group_columns import probe_costs_text
        print(f"probe costs: what one probe run costs a switch window, per type "
              f"(median, p10-p90): {probe_costs_text({'probe_costs': costs})}")
    return 0


def measure_floor(plan) -> tuple[dict, dict, list[str]]:
    """Start the engine (which calibrates on start-up), read its floor and probe costs,
    detach."""
    from ..kernel.engine import Engine
    from .session import RecordError
    engine = Engine(plan, budget_ns=100, on_switch=lambda rec: None)
    try:
        engine.start()
    except Exception as e:                # BCC reports compile/attach failures this way
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise RecordError(f"could not load the BPF program: {first}") from None
    finally:
        engine.close()
    return engine.floor.as_meta(), engine.probe_costs, engine.warnings


def _run_switches(args) -> int:
    """``--switches``: the probe costs of ``--depth``'s hooks on the source's own switches."""
    import sys
    from ..capture.output import check_output
    from ..kernel.costs import SwitchCostCalibration, held_out
    from ..kernel.engine import Engine
    from ..model.group_columns import probe_costs_text
    from . import costs_file
    from .session import RecordError, TraceOptions, make_plan, require_bcc, require_root
    out = check_output(args.output, "--output")        # before anything loads
    require_root()
    require_bcc()
    plan = make_plan(TraceOptions(switch=args.switch, probe_mode=args.probe_mode,
                                  depth=args.depth))
    if not plan.hit_types():
        raise VftraceError(f"--depth {args.depth}: runs no probe inside a switch; nothing "
                           "to calibrate")
    cal = SwitchCostCalibration(plan)
    engine = Engine(plan, budget_ns=100, on_switch=cal.collect)
    say = (lambda msg: None) if args.json else \
        (lambda msg: print(f"vftrace calibrate: {msg}", file=sys.stderr, flush=True))
    try:
        try:
            engine.start()
        except Exception as e:            # BCC reports compile/attach failures this way
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise RecordError(f"could not load the BPF program: {first}") from None
        synthetic = engine.probe_costs
        costs, warnings = cal.run(engine, synthetic, progress=say)
        floor = engine.floor.as_meta()
    finally:
        engine.close()
    warnings = engine.warnings + warnings
    if not any(isinstance(v, dict) and v.get("method") == "switches" for v in costs.values()):
        raise VftraceError("no switch ran a probe while calibrating: is the source switching "
                           "(pf_sched up, or --switch)?")
    if out is not None:
        costs_file.save(out, plan, costs, floor)
    checks = {t: held_out(v) for t, v in costs.items()
              if isinstance(v, dict) and v.get("method") == "switches"}
    if args.json:
        print(json.dumps({"probe_costs": costs, "hot_loop": synthetic, "depth": plan.depth,
                          "held_out": checks, "warnings": warnings,
                          "saved": str(out) if out else None}, indent=2))
        return 0
    for w in warnings:
        print(f"vftrace calibrate: warning: {w}")
    print(f"probe costs at --depth {plan.depth}, per run (median, p10-p90): "
          f"{probe_costs_text({'probe_costs': costs})}")
    print(f"the start-up calibration's hot loop: {probe_costs_text({'probe_costs': synthetic})}")
    for t, h in checks.items():
        if h:
            print(f"held-out check, {t}: each round's switches with the hooks, corrected with "
                  f"the other rounds' cost, against its switches without: p50 "
                  f"{h['p50_ns']['median']:+.1%} ({h['p50_ns']['min']:+.0%} to "
                  f"{h['p50_ns']['max']:+.0%}), p90 {h['p90_ns']['median']:+.1%}")
    if out is not None:
        print(f"saved to {out}: use it with vftrace record --costs {out}")
    return 0
