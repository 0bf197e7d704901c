"""``make bench``: every benchmark, one table on stdout, the same in BENCHMARKS.md.

    .venv/bin/python bench/run.py [--kernel 6.12] [--full] [--no-lab] [--render-only]
    .venv/bin/python bench/run.py --full --only lossless_npf --nice -10    # a section, and reniced

Boots the lab VM once per kernel (``--pfs 3``) and runs bench/lab_bench.py there
(inflation, lossless rate, start-up: all in one boot so ratios compare), then the
host-side pipeline benches (decode -> statistics -> CSV; the dashboard at 10k
records/s), then renders bench/figures.json to stdout and BENCHMARKS.md.

bench/figures.json is committed beside BENCHMARKS.md, which is rendered from it: a run
of one section (``--only``), of the host benches alone (``--no-lab``) or of one kernel
(``--keep``) merges into it, in any later checkout, instead of dropping what it did not
measure again (a lab section takes tens of minutes, the soak ten per kernel).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import lab_bench, report  # noqa: E402
from tracer.capture.files import meta_json  # noqa: E402

OUT = REPO / "build" / "bench"
FIGURES = REPO / "bench" / "figures.json"
PY = str(REPO / ".venv" / "bin" / "python")
KERNELS = ("6.1", "6.12")
LAB_LOCK = "/tmp/vftrace-lab.lock"


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def machine() -> dict:
    cpu = "-"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cpus": os.cpu_count(),
            "python": platform.python_version()}


def lab_run(kernel: str, full: bool, only: str | None = None, nice: int = 0) -> dict | None:
    """bench/lab_bench.py in one boot of ``kernel`` (``only``: one of its sections); its
    JSON, or None."""
    out = OUT / f"lab-{kernel}.json"
    out.unlink(missing_ok=True)
    # One vCPU: the lab's TCG runs every vCPU on one host thread, so a second one adds no
    # capacity, only a way for the reader's work to stretch pf_sched's emulated switch
    # (the thread serves the other vCPU while the switch's clock runs on).
    cmd = ["flock", LAB_LOCK, str(REPO / ".venv" / "bin" / "vftrace"), "lab", "-k", kernel,
           "--pfs", "3", "--cpus", "1", "-t", "3600" if full else "1500", "--", "python",
           "bench/lab_bench.py", "-o", str(out.relative_to(REPO))] + (["--full"] if full else []) \
        + (["--only", only] if only else []) + (["--nice", str(nice)] if nice else [])
    log(f"lab {kernel}: {' '.join(cmd)}")
    with open(OUT / f"lab-{kernel}.log", "w") as logf:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        for line in proc.stdout:                # through a pipe: QEMU wants no plain file
            logf.write(line)
            if line.startswith("[lab_bench"):
                print(line, end="", file=sys.stderr, flush=True)
        proc.wait()
    if not out.exists():
        log(f"lab {kernel}: no figures (exit {proc.returncode}; see {OUT}/lab-{kernel}.log)")
        return None
    return json.loads(out.read_text())


def host_benches(quick: bool) -> tuple[dict, dict]:
    n = "200000" if quick else "1000000"
    log("pipeline: bench/bench_decode.py, bench/bench_pipeline.py")
    rates = {}
    for script in ("bench_decode.py", "bench_pipeline.py"):
        r = subprocess.run([PY, str(REPO / "bench" / script), "-n", n], capture_output=True,
                           text=True, cwd=REPO)
        (OUT / f"{script}.log").write_text(r.stdout + r.stderr)
        rates.update(report.parse_rates(r.stdout))
    log("dashboard: bench/bench_tui.py --rate 10000")
    r = subprocess.run([PY, str(REPO / "bench" / "bench_tui.py"), "--rate",
                        str(report.DASHBOARD_RATE), "--seconds", "10"], capture_output=True,
                       text=True, cwd=REPO)
    (OUT / "bench_tui.py.log").write_text(r.stdout + r.stderr)
    return rates, report.parse_tui(r.stdout)


def soak_figures() -> dict:
    """The newest soak per kernel (bench/soak.py --boot writes build/soak/soak-*.json):
    ten minutes per kernel is too long for every ``make bench``, so it is run on its own
    and its figures are rendered here."""
    out = {}
    for path in sorted((REPO / "build" / "soak").glob("soak-*.json")):
        if path.name.endswith(".guests.json") or path.name.endswith(".meta.json"):
            continue
        f = json.loads(path.read_text())
        out[f["kernel"]] = {k: v for k, v in f.items() if k not in ("recorder_said", "guests_said")}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", "--kernel", action="append", choices=KERNELS,
                    help="only this lab kernel (repeatable; default: both)")
    ap.add_argument("--full", action="store_true", help="30 s lossless windows, 1M-record pipeline")
    ap.add_argument("--no-lab", action="store_true", help="host benches only")
    ap.add_argument("--only", choices=lab_bench.SECTIONS,
                    help="one lab section (and those whose names start with it), merged into "
                         "the last run's figures (each section says when it was measured)")
    ap.add_argument("--nice", type=int, default=0, metavar="N",
                    help="also the lossless search of every PF with vftrace --nice N "
                         "(bench/lab_bench.py --nice)")
    ap.add_argument("--keep", action="store_true", help="keep the other kernels' figures "
                    "from the last run (bench/figures.json)")
    ap.add_argument("--render-only", action="store_true",
                    help="re-render BENCHMARKS.md from bench/figures.json")
    ap.add_argument("-o", "--output", default=str(REPO / "BENCHMARKS.md"))
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    figures_path = FIGURES
    previous = json.loads(figures_path.read_text()) if figures_path.exists() else {}
    if args.render_only:
        if not previous:
            log(f"nothing to render: {figures_path} is missing (run make bench)")
            return 1
        figures = previous
    else:
        figures = {"machine": machine(), "full": args.full,
                   "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "kernels": {}}
        if args.keep or args.only or args.no_lab:
            figures["kernels"] = previous.get("kernels", {})
        if not args.no_lab:
            for kernel in args.kernel or KERNELS:
                lab = lab_run(kernel, args.full, args.only, args.nice)
                if lab is not None:
                    release = lab.get("kernel", kernel)
                    if args.only:       # its sections into the last run's, the rest kept
                        lab = {**figures["kernels"].get(release, {}),
                               **{k: v for k, v in lab.items() if k.startswith(args.only)},
                               f"{args.only}_measured": lab.get("date")}
                    figures["kernels"] = {k: v for k, v in figures["kernels"].items()
                                          if k != release}
                    figures["kernels"][release] = lab
                    figures["kernels"] = dict(sorted(figures["kernels"].items()))
        figures["pipeline"], figures["dashboard"] = host_benches(quick=not args.full)
    # a soak is run on its own: the newest one here, else the one the figures have
    figures["soak"] = {**previous.get("soak", {}), **soak_figures()}
    text = report.render(figures)
    print(text)
    if not figures["kernels"] and (args.no_lab or args.render_only):
        # the lab's sections would vanish from the document: print, write nothing
        log(f"{figures_path} has no lab figures to keep: {args.output} and the figures are "
            "left as they are (run make bench once, or --only SECTION per kernel)")
        return 1
    figures_path.write_text(meta_json(figures) + "\n")     # lists of numbers on one line
    Path(args.output).write_text(text + "\n")
    log(f"wrote {args.output} and {figures_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
