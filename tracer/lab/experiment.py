"""Guests under a recorder, and the mmap-versus-trap experiment (run inside the lab VM).

The order is fixed: the recorder is armed first, the guests start, the guests are
stopped, then the recorder stops (and detaches its probes).  Under QEMU's TCG, patching
kernel text while a nested guest runs has crashed the lab kernel, and a recorder armed
first also sees every exit the guests cause.

    python -m tracer.lab.experiment run --mode mmap --duration 10 -o build/cap.csv
    python -m tracer.lab.experiment compare --duration 10 -o build/experiment
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..capture.files import read_capture
from ..model import group_columns as gc
from ..model.correction import Correction
from ..model.stats import Stats
from ..model.units import fmt_ns
from ..pfsched import control
from ..record.procgroup import stop_group
from . import LabError

RECORDER_START_S = 300          # BCC compiles slowly under TCG
CASES = (("mmap", "strict"), ("mmap", "batched"), ("trap", "strict"), ("trap", "batched"))


class ExperimentError(LabError):
    """A one-line reason the run failed."""


@dataclass
class CaseResult:
    mode: str
    unmap_mode: str
    csv: Path
    meta: dict
    records: list
    guests: dict
    problems: list[str]


def _python() -> list[str]:
    return [sys.executable]


def start_recorder(out: Path, extra: list[str], command: str = "record"
                   ) -> tuple[subprocess.Popen, list[str]]:
    """`vftrace record` (or ``serve``) until its probes are armed (it creates its
    --ready-file); its stderr lines so far."""
    ready = out.with_name(out.name + ".ready")
    ready.unlink(missing_ok=True)
    proc = subprocess.Popen([*_python(), "-m", "tracer.cli", command, "-o", str(out), "-q",
                             "--ready-file", str(ready), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    said = b""
    deadline = time.monotonic() + RECORDER_START_S
    fd = proc.stderr.fileno()
    # Readiness is the file, not a line; stderr is drained meanwhile (warnings come before
    # arming), with os.read as communicate() later does, so nothing is read twice.
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            _, rest = proc.communicate()
            tail = (said.decode(errors="replace") + rest).strip().splitlines()
            raise ExperimentError("the recorder did not start: "
                                  + (tail[-1] if tail else "no output"))
        if select.select([fd], [], [], 0.05)[0]:
            said += os.read(fd, 65536)
    ready.unlink(missing_ok=True)
    return proc, said.decode(errors="replace").splitlines(keepends=True)


def stop_process(proc: subprocess.Popen, sig: int, timeout: float) -> tuple[str, str]:
    proc.send_signal(sig)
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return out, err + f"\n(killed after {timeout:g} s)"


def record_with_guests(out: Path, *, mode: str, vms: int, vcpus: int, duration: float,
                       record_args: list[str] | None = None,
                       on_armed=lambda: None, before_stop=lambda: None
                       ) -> tuple[dict, str, str]:
    """Record while guests run for ``duration`` s; (guests' final report, the recorder's
    stdout summary, its stderr).  ``on_armed`` runs once the probes are armed, before
    the guests start; ``before_stop`` once they have stopped, before the recorder does
    (a test takes the ground truth's snapshots there)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = out.with_name(out.stem + ".guests.json")
    summary.unlink(missing_ok=True)
    recorder, err_lines = start_recorder(out, record_args or [])
    guests = None
    try:
        on_armed()
        guests = subprocess.Popen(
            [*_python(), "-m", "tracer.lab.workloads.guests", "--mode", mode, "--vms", str(vms),
             "--vcpus", str(vcpus), "--json", "--interval", "1", "--summary", str(summary),
             "--seconds", str(duration)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:        # the guests stop themselves after `duration` s of running
            g_out, g_err = guests.communicate(timeout=duration + 120)
        except subprocess.TimeoutExpired:
            stop_group(guests, 30)              # their QEMUs too, not only the leader
            g_out, g_err = guests.communicate()
            g_err += f"\n(stopped after {duration + 120:g} s)"
    finally:
        if guests is not None:
            stop_group(guests, 5)               # nothing of the group outlives the case
        try:
            before_stop()
        finally:
            r_out, r_err = stop_process(recorder, signal.SIGINT, 120)
    if recorder.returncode != 0:
        raise ExperimentError(f"the recorder failed ({recorder.returncode}): "
                              + (r_err.strip().splitlines() or ["no output"])[-1])
    if not summary.exists():
        raise ExperimentError(f"the guests wrote no report ({guests.returncode}): "
                              + (g_err.strip().splitlines() or ["no output"])[-1])
    report = json.loads(summary.read_text())
    report["reports"] = [json.loads(line) for line in g_out.splitlines() if line.startswith("{")]
    report["returncode"] = guests.returncode
    summary.write_text(json.dumps(report) + "\n")
    return report, r_out, "".join(err_lines) + r_err


def set_unmap_mode(mode: str) -> None:
    control.set_param("unmap_mode", mode)


def run_case(out_dir: Path, mode: str, unmap_mode: str, *, vms: int, vcpus: int,
             duration: float, record_args: list[str] | None = None) -> CaseResult:
    set_unmap_mode(unmap_mode)
    csv_path = out_dir / f"{mode}-{unmap_mode}.csv"
    guests, _, _ = record_with_guests(csv_path, mode=mode, vms=vms, vcpus=vcpus,
                                      duration=duration, record_args=record_args)
    meta, records, problems = read_capture(csv_path)
    return CaseResult(mode, unmap_mode, csv_path, meta, records, guests, problems)


COMPARISON_COLUMNS = (
    "mode", "unmap_mode", "switches", "lost", "switch_p50_ns", "switch_p90_ns",
    "switch_p50_corr_ns", "switch_p90_corr_ns", "switch_corr_err_ns", "own_share",
    "switch_p99_ns", "revoke_mean_ns", "grant_mean_ns", "unmap_mean_ns", "mmu_zap_mean_ns",
    "map_mean_ns", "exits_per_switch", "kicks_per_switch", "blocked_per_switch",
    "blocked_ns_per_switch", "guest_accesses_per_s", "guest_efault_retries", "capture")


def compare_row(case: CaseResult) -> dict:
    stats = Stats(budget_ns=case.meta.get("budget_ns", 100),
                  correction=Correction.from_meta(case.meta))
    stats.add_many(case.records)
    g = stats.snapshot().overall
    vms = case.guests.get("vms", [])
    return {
        "mode": case.mode, "unmap_mode": case.unmap_mode, "switches": g.count,
        "lost": case.meta.get("lost_total", 0),
        "switch_p50_ns": g.switch.p50, "switch_p90_ns": g.switch.p90,
        "switch_p99_ns": g.switch.p99,
        "switch_p50_corr_ns": g.own.switch.p50 if g.own else None,
        "switch_p90_corr_ns": g.own.switch.p90 if g.own else None,
        "switch_corr_err_ns": round(g.own.err_ns) if g.own else None,
        "own_share": round(g.own.share, 4) if g.own else None,
        "revoke_mean_ns": round(g.revoke.mean), "grant_mean_ns": round(g.grant.mean),
        "unmap_mean_ns": round(g.means.get("unmap_ns", 0.0)),
        "mmu_zap_mean_ns": round(g.means.get("mmu_ns", 0.0)),
        "map_mean_ns": round(g.means.get("map_ns", 0.0)),
        "exits_per_switch": round(g.exits_per_switch, 3),
        "kicks_per_switch": round(g.kicks_per_switch, 3),
        "blocked_per_switch": round(g.blocked_per_switch, 3),
        "blocked_ns_per_switch": round(g.blocked_ns_per_switch),
        "guest_accesses_per_s": round(sum(v.get("mean_accesses_per_s", 0.0) for v in vms)),
        "guest_efault_retries": sum(v.get("efault_retries", 0) for v in vms),
        "capture": case.csv.name,
    }


# The comparison's columns that are the group table's: their headers and formats.
SPEC_COLUMNS = {"switch_p50_ns": "p50", "switch_p99_ns": "p99", "revoke_mean_ns": "revoke",
                "grant_mean_ns": "grant", "exits_per_switch": "exits",
                "blocked_ns_per_switch": "blocked_time"}


def comparison_table(rows: list[dict]) -> str:
    spec = {key: gc.BY_NAME[name] for key, name in SPEC_COLUMNS.items()}
    corr, own = gc.BY_NAME["p50_corr"], gc.BY_NAME["own_share"]
    head = ("CASE", "SWITCHES", "LOST", *(c.header for c in spec.values()), corr.header,
            own.header, "GUEST ACC/S")
    lines = [head]
    for r in rows:
        lines.append((f"{r['mode']}/{r['unmap_mode']}", str(r["switches"]), str(r["lost"]),
                      *(c.fmt(r[key]) for key, c in spec.items()),
                      corr.fmt((r.get("switch_p50_corr_ns"), r.get("switch_corr_err_ns"))),
                      own.fmt(r.get("own_share")), f"{r['guest_accesses_per_s']:,}"))
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w)
                               for i, (c, w) in enumerate(zip(row, widths))) for row in lines)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def conclusion(rows: list[dict]) -> str:
    """What the runs say about the seed's question, and how far an emulated lab can say it."""
    by = {(r["mode"], r["unmap_mode"]): r for r in rows}
    out = ["", "What this run says (TCG emulation: compare ratios, never absolute ns):"]
    mm, tr = by.get(("mmap", "strict")), by.get(("trap", "strict"))
    if mm and tr:
        out.append(f"- guest accesses/s, mmap vs trap: {_ratio(mm['guest_accesses_per_s'], tr['guest_accesses_per_s'])}"
                   " (trapping every access is the slow path the seed warns about)")
        out.append(f"- KVM exits per switch, mmap vs trap: {mm['exits_per_switch']:.2f} vs "
                   f"{tr['exits_per_switch']:.2f}; blocked time per switch "
                   f"{fmt_ns(mm['blocked_ns_per_switch'])} vs {fmt_ns(tr['blocked_ns_per_switch'])}")
    for mode in ("mmap", "trap"):
        s, b = by.get((mode, "strict")), by.get((mode, "batched"))
        if s and b:
            out.append(f"- {mode}: switch p50 strict vs batched unmaps: "
                       f"{_ratio(s['switch_p50_ns'], b['switch_p50_ns'])}")
    if mm:
        total = mm["revoke_mean_ns"] + mm["grant_mean_ns"]
        if total:
            out.append(f"- mmap/strict: revoke is {mm['revoke_mean_ns'] / total:.0%} of a switch "
                       f"(IOMMU unmap {fmt_ns(mm['unmap_mean_ns'])}, MMU zap "
                       f"{fmt_ns(mm['mmu_zap_mean_ns'])}, map {fmt_ns(mm['map_mean_ns'])} on average)")
    out.append("- Whether one switch fits ~100 ns on real hardware cannot be read from "
               "emulated time; the split above says where the time goes. Run the same "
               "command on a hypervisor host for absolute figures.")
    return "\n".join(out)


def switch_costs(out_dir: Path) -> list[str]:
    """``vftrace calibrate --switches`` on pf_sched's switches before any guest runs (a
    flip patches kernel text, which must not happen under a running nested guest), for
    the cases' ``--costs``; if it cannot, the cases keep the start-up calibration's."""
    path = out_dir / "costs.json"
    print("experiment: measuring probe costs on pf_sched's switches (calibrate --switches)",
          file=sys.stderr, flush=True)
    r = subprocess.run([*_python(), "-m", "tracer.cli", "calibrate", "--switches", "-o",
                        str(path)], capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        print("experiment: warning: calibrate --switches failed ("
              + (r.stderr.strip().splitlines() or ["no output"])[-1]
              + "); corrected values use the start-up calibration's costs", file=sys.stderr)
        return []
    print(r.stdout.strip(), file=sys.stderr)
    return ["--costs", str(path)]


def compare(out_dir: Path, *, vms: int, vcpus: int, duration: float) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    costs = switch_costs(out_dir)
    for mode, unmap_mode in CASES:
        print(f"experiment: {mode}/{unmap_mode}: recording {duration:g} s with {vms} VM(s) x "
              f"{vcpus} vCPU(s)", file=sys.stderr, flush=True)
        case = run_case(out_dir, mode, unmap_mode, vms=vms, vcpus=vcpus, duration=duration,
                        record_args=costs)
        for p in case.problems:
            print(f"experiment: {case.csv.name}: {p}", file=sys.stderr)
        rows.append(compare_row(case))
    set_unmap_mode("strict")
    with open(out_dir / "comparison.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COMPARISON_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    text = comparison_table(rows) + "\n" + conclusion(rows) + "\n"
    (out_dir / "comparison.txt").write_text(text)
    print(text)
    print(f"experiment: wrote {out_dir / 'comparison.csv'} and the captures beside it",
          file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tracer.lab.experiment",
                                description="Guests under a recorder (inside the lab VM).")
    sub = p.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="one recording with guests")
    run.add_argument("--mode", choices=("mmap", "trap"), default="mmap")
    run.add_argument("-o", "--output", required=True)
    cmp_ = sub.add_parser("compare", help="mmap/trap x strict/batched, a comparison table")
    cmp_.add_argument("-o", "--output", required=True, help="directory for the results")
    for q in (run, cmp_):
        q.add_argument("--vms", type=int, default=2)
        q.add_argument("--vcpus", type=int, default=1)
        q.add_argument("-d", "--duration", type=float, default=10.0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if os.geteuid() != 0:
        print("experiment: error: needs root (run it in the lab: vftrace lab ...)", file=sys.stderr)
        return 2
    try:
        if args.cmd == "compare":
            return compare(Path(args.output), vms=args.vms, vcpus=args.vcpus,
                           duration=args.duration)
        guests, summary, _ = record_with_guests(Path(args.output), mode=args.mode, vms=args.vms,
                                                vcpus=args.vcpus, duration=args.duration)
        print(summary)
        rates = ", ".join(f"vm{v['vm']} {v['mean_accesses_per_s']:,.0f}" for v in guests["vms"])
        print(f"guests ({args.mode}): accesses/s {rates}")
        return 0
    except (ExperimentError, OSError) as e:
        print(f"experiment: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
