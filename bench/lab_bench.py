"""The in-VM half of ``make bench``: inflation, lossless rate, start-up (run as root in the lab).

    python bench/lab_bench.py [--full] [--window 10] [-o build/bench/lab-RELEASE.json]

Everything runs in one boot so the ratios compare like with like (TCG makes absolute
times ~1000x a real host's).  pf_sched's debugfs counters time every switch without
any tracer (``total_ns_*``); deltas over a window give its self-timed mean switch.

1. Inflation: the same pf_sched settings, consecutive windows of equal length: no
   tracer, vftrace fentry, vftrace kprobe, BCC funclatency, bpftrace, no tracer, then the
   tracers again in reverse order and no tracer (drift falls on every case alike).
2. Lossless rate: one recorder for the whole search; slice_us is lowered window by
   window and each window's seq range is checked against the capture (every switch the
   module made must be a row).  1 PF, then every PF the VM has (boot with --pfs 3).
3. Start-up: launch of ``vftrace record`` to its "recording" line (armed; the first
   switch follows within one slice), and the start-up figure it prints itself.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.lab import labutil, pfsched  # noqa: E402
from tracer.pfsched import control  # noqa: E402
from bench.scrape import Scraper  # noqa: E402
from bench.capture_keys import missing_seqs, read_capture_keys  # noqa: E402
from bench.procstat import CpuShare, rss_kb  # noqa: E402
from tracer.capture.files import read_capture  # noqa: E402
from tracer.model.correction import Correction  # noqa: E402
from tracer.model.stats import Stats  # noqa: E402

FUNCLATENCY = "/usr/sbin/funclatency-bpfcc"
BPFTRACE = "/usr/bin/bpftrace"
# What funclatency and bpftrace attach: a kprobe+kretprobe pair on each function.
BPFTRACE_SCRIPT = ("kprobe:iommu_map,kprobe:iommu_unmap { @start[tid] = nsecs; } "
                   "kretprobe:iommu_map,kretprobe:iommu_unmap /@start[tid]/ "
                   "{ @ns = hist(nsecs - @start[tid]); delete(@start[tid]); }")
TOOL_START_S = 300              # BCC compiles slowly under TCG
INFLATION_SLICE_US = 2000
LOSSLESS_SLICES_US = (2000, 1000, 500, 200, 100, 50, 20, 10, 5, 1)
NR_VFS = 4


def log(msg: str) -> None:
    print(f"[lab_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- pf_sched's own accounting ----------------------------------------------------------

def snapshot(bdfs: list[str]) -> dict[str, dict]:
    return {b: pfsched.stats(b) for b in bdfs}


def self_timed(before: dict, after: dict, seconds: float) -> dict:
    """Mean self-timed switch ns and switches/s over a window, all PFs together."""
    count = sum(after[b]["total_ns_count"] - before[b]["total_ns_count"] for b in before)
    total = sum(after[b]["total_ns_sum"] - before[b]["total_ns_sum"] for b in before)
    switches = sum(after[b]["switches"] - before[b]["switches"] for b in before)
    return {"switches": switches, "mean_ns": total / count if count else None,
            "seconds": seconds, "rate_per_s": switches / seconds if seconds else None}


def merged_hist(bdfs: list[str]) -> dict[int, int]:
    out: dict[int, int] = {}
    for b in bdfs:
        for low, n in control.total_hist(b).items():
            out[low] = out.get(low, 0) + n
    return out


def measure(bdfs: list[str], seconds: float) -> dict:
    before, t0, hist0 = snapshot(bdfs), time.monotonic(), merged_hist(bdfs)
    time.sleep(seconds)
    after, t1, hist1 = snapshot(bdfs), time.monotonic(), merged_hist(bdfs)
    out = self_timed(before, after, t1 - t0)
    # pf_sched's own histogram of the window's switches: its percentiles (JSON: str keys)
    out["hist"] = {str(k): v for k, v in control.hist_delta(hist1, hist0).items()}
    out["seq"] = {str(after[b]["pf"]): [before[b]["seq"], after[b]["seq"]] for b in bdfs}
    return out


# --- tracers as a user starts them ------------------------------------------------------

class Tool:
    """A tracer process, started and waited for until it says it is attached."""

    def __init__(self, argv: list[str], ready: str, stream: str) -> None:
        self.argv = argv
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env, start_new_session=True)
        pipe = self.proc.stderr if stream == "stderr" else self.proc.stdout
        self.lines: list[str] = []
        deadline = t0 + TOOL_START_S
        while True:
            line = pipe.readline()
            self.lines.append(line)
            if ready in line:
                break
            if not line or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"{argv[0]} did not start: {''.join(self.lines)[-600:]}")
        self.ready_s = time.monotonic() - t0

    def stop(self) -> tuple[int, str, str]:
        self.proc.send_signal(signal.SIGINT)
        try:
            out, err = self.proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        return self.proc.returncode, out, err


def vftrace(out: Path, *extra: str) -> Tool:
    return Tool([sys.executable, "-m", "tracer.cli", "record", "-o", str(out), "-q", *extra],
                "recording", "stderr")


def corrected_rounds(mine: dict) -> None:
    """A capture key's corrected figures: each round's, and all its rounds' window rows
    pooled (the figure held against the untraced windows, pooled alike), with its own
    costs and with the start-up hot loop's.  The rows and meta are dropped after."""
    hot = (mine.get("switch_costs") or {}).get("hot_loop")
    pooled: list = []
    for r in mine["rounds"]:
        meta, rows = r.pop("meta"), r.pop("rows")
        r["corrected"] = corrected_figures(meta, rows)
        r["window_rows"] = len(rows)
        pooled += rows
    mine["corrected"] = corrected_figures(meta, pooled)
    mine["corrected_hot_loop"] = hot and corrected_figures(
        {**meta, "probe_costs": {**hot, "types": meta["probe_costs"].get("types")}}, pooled)
    mine["floor_ns"] = meta.get("floor_ns")


def in_window(rows: list, seq_ranges: dict[str, list[int]]) -> list:
    """The rows of the switches pf_sched made inside a measured window (its seq range per
    PF): a capture also holds the switches made while its recorder started and stopped,
    when the reader is busiest, which the window's untraced twin has no counterpart of."""
    bounds = {int(pf): (lo, hi) for pf, (lo, hi) in seq_ranges.items()}
    return [r for r in rows if r.pf in bounds and bounds[r.pf][0] < r.seq <= bounds[r.pf][1]]


def corrected_figures(meta: dict, rows: list) -> dict | None:
    """The capture's switch time with vftrace's own cost taken off (correction.py): p50
    and p90 with their uncertainty, the raw ones, the share that was vftrace's own and
    the probe runs per switch."""
    correction = Correction.from_meta(meta)
    if correction is None or not rows:
        return None
    stats = Stats(10**9, correction=correction)
    stats.add_many(rows)
    g = stats.snapshot().overall
    return {"p50_ns": g.own.switch.p50, "p90_ns": g.own.switch.p90, "err_ns": g.own.err_ns,
            "raw_p50_ns": g.switch.p50, "raw_p90_ns": g.switch.p90, "own_share": g.own.share,
            "hits_per_switch": {t: g.means[f"{t}_hits"] for t in ("fentry", "kprobe", "entry")},
            "probe_costs": meta.get("probe_costs")}


# The probe costs each vftrace case records with: measured on pf_sched's own switches
# first (vftrace calibrate --switches at that case's depth and probe mode).
SWITCH_COSTS = {"fentry": ["-D", "guests"], "kprobe": ["-D", "guests", "-m", "kprobe"],
                "iommu": ["-D", "iommu"], "mmu": ["-D", "mmu"]}


# Each vftrace case's capture (inflation-KEY.csv), and whose costs a stopped one uses.
CAPTURES = {"vftrace fentry": "fentry", "vftrace kprobe": "kprobe", "vftrace window": "window",
            "vftrace iommu": "iommu", "vftrace mmu": "mmu", "vftrace reader stopped": "stopped",
            "vftrace iommu reader stopped": "iommu-stopped"}
COSTS_OF = {"stopped": "fentry", "iommu-stopped": "iommu"}


def switch_costs(path: Path, argv: list[str]) -> dict:
    """``vftrace calibrate --switches``'s JSON (its costs, the hot loop's, the held-out
    check) and its file at ``path``; an error is kept, not raised."""
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "tracer.cli", "calibrate", "--switches", "--json",
                        "-o", str(path), *argv], capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["?"])[-1][:300]}
    out = json.loads(r.stdout)
    out["file"], out["seconds"] = str(path), round(time.monotonic() - t0, 1)
    return out


def costs_args(costs: dict, key: str) -> list[str]:
    c = costs.get(key) or {}
    return ["--costs", c["file"]] if c.get("file") else []


def startup_figures(tool: Tool) -> dict:
    said = re.search(r"start-up ([\d.]+) s", "".join(tool.lines))
    return {"to_armed_s": tool.ready_s, "engine_startup_s": float(said.group(1)) if said else None}


# --- 1. inflation -----------------------------------------------------------------------

# The shallower depths (--depth guests is the "vftrace fentry" case).
DEPTH_CASES = (("window", "the switch's bookends only"),
               ("iommu", "+ iommu_map/iommu_unmap, the functions funclatency times"),
               ("mmu", "+ IOTLB flush, unmap_mapping_range, KVM's MMU notifier"))

def inflation(window: float, out_dir: Path, rounds: int = 2) -> dict:
    """Each case ``rounds`` times in mirrored order (A B C .. C B A) with untraced windows
    between the rounds, so slow drift of the emulated machine falls on every case alike."""
    cases = [("none", "nothing", None)]
    costs: dict[str, dict] = {}         # calibrate --switches per capture, run first
    # vftrace's cases start with their capture's path: one per round (inflation-KEY-rN.csv)
    for mode in ("fentry", "kprobe"):
        cases.append((f"vftrace {mode}", f"vftrace's program at --depth guests (all of it), "
                      f"hooks in {mode} mode",
                      lambda csv, m=mode: vftrace(csv, "--probe-mode", m, *costs_args(costs, m))))
    for depth, what in DEPTH_CASES:
        cases.append((f"vftrace {depth}", f"vftrace --depth {depth} (fentry): {what}",
                      lambda csv, d=depth: vftrace(csv, "--depth", d, *costs_args(costs, d))))
    # The same as "vftrace fentry" with its reader stopped (SIGSTOP once armed): under TCG
    # the lab has one emulation thread, so a reader busy draining records would slow
    # pf_sched in a way the rivals' (which read nothing per switch) do not.
    cases.append(("vftrace reader stopped", "vftrace --depth guests (fentry), its user-space "
                  "reader stopped once armed (records pile up in the ring buffer)",
                  lambda csv: stopped(vftrace(csv, *costs_args(costs, "fentry")))))
    cases.append(("vftrace iommu reader stopped", "vftrace --depth iommu (fentry), its reader "
                  "stopped once armed",
                  lambda csv: stopped(vftrace(csv, "--depth", "iommu",
                                              *costs_args(costs, "iommu")))))
    if Path(FUNCLATENCY).exists():
        cases.append(("funclatency", "BCC funclatency -r '^iommu_(un)?map$': kprobe+kretprobe "
                      "on iommu_map and iommu_unmap",
                      lambda _csv: Tool([FUNCLATENCY, "-r", "^iommu_(un)?map$"], "Tracing",
                                        "stdout")))
    if Path(BPFTRACE).exists():
        cases.append(("bpftrace", "bpftrace kprobe+kretprobe on iommu_map and iommu_unmap, "
                      "@ns hist", lambda _csv: Tool([BPFTRACE, "-B", "line", "-e",
                                                     BPFTRACE_SCRIPT], "Attaching", "stdout")))
    order: list[tuple] = []
    for r in range(rounds):
        traced = cases[1:] if r % 2 == 0 else cases[:0:-1]
        order += [cases[0], *traced]
    order.append(cases[0])
    windows: list[dict] = []
    extra: dict = {}
    with pfsched.loaded(1, slice_us=INFLATION_SLICE_US, nr_vfs=NR_VFS) as bdfs:
        time.sleep(1)
        for key, argv in SWITCH_COSTS.items():
            log(f"calibrate --switches for {key}")
            costs[key] = switch_costs(out_dir / f"costs-{key}.json", argv)
        for name, attaches, start in order:
            log(f"inflation: {name}")
            mode = CAPTURES.get(name)
            seen = sum(1 for w in windows if w["case"] == name)
            csv = out_dir / f"inflation-{mode}-r{seen + 1}.csv"
            try:
                tool = start(csv) if start else None
            except RuntimeError as e:            # a tool that cannot attach: say so, go on
                windows.append({"case": name, "error": str(e)[-300:]})
                continue
            try:
                row = {"case": name, **measure(bdfs, window)}
            finally:
                status = tool.stop() if tool else (0, "", "")
            row["ready_s"] = tool.ready_s if tool else None
            if status[0] not in (0, -signal.SIGINT):
                row["error"] = f"exit {status[0]}: " + " ".join(status[2].strip().splitlines()[-1:])
            windows.append(row)
            if mode is not None and tool is not None and "error" not in row:
                meta, rows, _ = read_capture(csv)
                mine = extra.setdefault(mode, {"rounds": [], "startup": startup_figures(tool),
                                               "switch_costs": costs.get(COSTS_OF.get(mode, mode)),
                                               "probe_modes": meta.get("probe_modes")})
                mine["rounds"].append({"csv": csv.name, "meta": meta,
                                       "rows": in_window(rows, row["seq"]),
                                       "records": len(rows), "lost_total": meta.get("lost_total")})
    for mode, mine in extra.items():
        corrected_rounds(mine)
    return {"slice_us": INFLATION_SLICE_US, "window_s": window, "rounds": rounds,
            "cpus": os.cpu_count(),
            "windows": windows, "cases": combine(windows, {c[0]: c[1] for c in cases}),
            "vftrace": extra}


def stopped(tool: Tool) -> Tool:
    """``tool`` with its process stopped (SIGSTOP) until its stop(), which resumes it."""
    os.kill(tool.proc.pid, signal.SIGSTOP)
    stop = tool.stop

    def resume_then_stop():
        os.kill(tool.proc.pid, signal.SIGCONT)
        return stop()
    tool.stop = resume_then_stop
    return tool


def combine(windows: list[dict], attaches: dict[str, str]) -> list[dict]:
    """One row per case: its windows' switches and mean pooled (sum of ns / switches)."""
    out = []
    for name, what in attaches.items():
        mine = [w for w in windows if w["case"] == name and w.get("mean_ns")]
        errors = [w["error"] for w in windows if w["case"] == name and w.get("error")]
        switches = sum(w["switches"] for w in mine)
        total = sum(w["mean_ns"] * w["switches"] for w in mine)
        ready = [w["ready_s"] for w in mine if w.get("ready_s") is not None]
        hist: dict[int, int] = {}
        for w in mine:
            for low, n in (w.get("hist") or {}).items():
                hist[int(low)] = hist.get(int(low), 0) + n
        row = {"case": name, "attaches": what, "windows": len(mine), "switches": switches,
               "mean_ns": total / switches if switches else None,
               "window_means_ns": [w["mean_ns"] for w in mine],
               "p50_ns": control.hist_quantile(hist, 0.5),
               "p90_ns": control.hist_quantile(hist, 0.9),
               "ready_s": sum(ready) / len(ready) if ready else None}
        if errors:
            row["error"] = errors[0]
        out.append(row)
    return out


# --- 2. lossless rate -------------------------------------------------------------------

def lossless(n_pfs: int, window: float, out_dir: Path, nice: int = 0) -> dict:
    """One recorder (at ``nice``: vftrace's --nice) for the whole search; each window's
    switches against its rows, and the recorder's share of the CPU in each: on the lab's
    one vCPU, pf_sched's kthreads at short slices keep it busy, and a reader that loses
    records with a low share was starved rather than slow."""
    csv = out_dir / f"lossless-{n_pfs}pf{f'-nice{nice}' if nice else ''}.csv"
    windows: list[dict] = []
    with pfsched.loaded(n_pfs, slice_us=LOSSLESS_SLICES_US[0], nr_vfs=NR_VFS) as bdfs:
        time.sleep(1)
        tool = vftrace(csv, *(["--nice", str(nice)] if nice else []))
        try:
            for slice_us in LOSSLESS_SLICES_US:
                log(f"lossless {n_pfs} PF{f' (nice {nice})' if nice else ''}: slice {slice_us} us")
                pfsched.set_param("slice_us", slice_us)
                time.sleep(0.5)                      # the previous slice's last sleep ends
                cpu = CpuShare(tool.proc.pid)
                w = measure(bdfs, window)
                windows.append({"slice_us": slice_us, **w, "cpu": cpu.result()})
        finally:
            pfsched.set_param("slice_us", LOSSLESS_SLICES_US[0])
            status = tool.stop()
    meta, rows, problems, _ = read_capture_keys(csv, with_stats=False)
    for w in windows:
        w["missing"] = missing_seqs(rows, w["seq"])
    best = None
    for w in windows:                                # the search stops at the first loss
        if w["missing"]:
            break
        best = w
    return {"pfs": n_pfs, "window_s": window, "recorder_nice": meta.get("nice", nice),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "windows": windows,
            "lost_total": meta.get("lost_total"), "reader_gaps": meta.get("reader_gaps"),
            "exit_status": status[0],
            "problems": problems, "lossless_slice_us": best and best["slice_us"],
            "lossless_rate_per_s": best and best["rate_per_s"]}


# --only: a section, and every section whose name starts with it
SECTIONS = ("inflation", "lossless", "lossless_npf", "metrics")
METRICS_SLICES_US = (500, 200, 100)
METRICS_PORT = 19435


def metrics_overhead(window: float, out_dir: Path) -> dict:
    """``vftrace serve`` on every PF, windows with and without a scrape every second at
    each slice: the records each window lost (by pf_sched's seqs against the capture),
    the scrapes' durations, and serve's RSS."""
    csv = out_dir / "metrics.csv"
    windows: list[dict] = []
    with pfsched.loaded(len(labutil.free_edu_devices()), slice_us=METRICS_SLICES_US[0],
                        nr_vfs=NR_VFS) as bdfs:
        time.sleep(1)
        n_pfs = len(bdfs)
        tool = Tool([sys.executable, "-m", "tracer.cli", "serve", "-o", str(csv),
                     "--metrics", f"127.0.0.1:{METRICS_PORT}"], "recording", "stderr")
        scraper = Scraper(f"http://127.0.0.1:{METRICS_PORT}/metrics")
        rss0 = rss_kb(tool.proc.pid)
        try:
            for slice_us in METRICS_SLICES_US:
                pfsched.set_param("slice_us", slice_us)
                time.sleep(0.5)
                for scraping in (False, True, True, False):     # ABBA: drift cancels
                    log(f"metrics: slice {slice_us} us, scrapes {'on' if scraping else 'off'}")
                    scraper.take()
                    (scraper.on.set if scraping else scraper.on.clear)()
                    w = measure(bdfs, window)
                    scraper.on.clear()
                    durations, reads, failures = scraper.take()
                    windows.append({"slice_us": slice_us, "scraping": scraping,
                                    "scrapes": len(durations), "failures": failures[:3],
                                    "scrape_s": durations, "read_s": reads, **w})
        finally:
            scraper.done.set()
            rss1 = rss_kb(tool.proc.pid)
            pfsched.set_param("slice_us", METRICS_SLICES_US[0])
            status = tool.stop()
    meta, rows, problems, _ = read_capture_keys(csv, with_stats=False)
    for w in windows:
        w["missing"] = missing_seqs(rows, w["seq"])
        del w["hist"]
    return {"pfs": n_pfs, "window_s": window,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "windows": windows,
            "rss_kb": [rss0, rss1], "lost_total": meta.get("lost_total"),
            "exit_status": status[0], "problems": problems}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="30 s lossless windows (default 5 s)")
    ap.add_argument("--window", type=float, default=10.0, help="inflation window, s")
    ap.add_argument("--rounds", type=int, default=2, help="inflation rounds (mirrored order)")
    ap.add_argument("-o", "--output", help="JSON (default build/bench/lab-RELEASE.json)")
    ap.add_argument("--only", choices=SECTIONS,
                    help="the sections whose names start with this (lossless: 1 PF and all)")
    ap.add_argument("--nice", type=int, default=0, metavar="N",
                    help="also search the lossless rate of every PF with the recorder at "
                         "vftrace --nice N (section lossless_npf_reniced)")
    args = ap.parse_args()
    release = platform.release()
    out = Path(args.output) if args.output else REPO / "build" / "bench" / f"lab-{release}.json"
    work = out.parent / f"captures-{release}"
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"kernel": release, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "edu_devices": len(labutil.edu_devices()), "full": args.full}
    lossless_window = 30.0 if args.full else 5.0
    sections = [("inflation", lambda: inflation(args.window, work, args.rounds)),
                ("lossless_1pf", lambda: lossless(1, lossless_window, work))]
    n_all = len(labutil.free_edu_devices())
    if n_all > 1:
        sections.append(("lossless_npf", lambda: lossless(n_all, lossless_window, work)))
        if args.nice:
            sections.append(("lossless_npf_reniced",
                             lambda: lossless(n_all, lossless_window, work, nice=args.nice)))
    sections.append(("metrics", lambda: metrics_overhead(lossless_window, work)))
    for name, fn in sections:
        if args.only and not name.startswith(args.only):
            continue
        try:
            result[name] = fn()
        except Exception as e:                      # keep what the other sections measured
            log(f"{name} failed: {e}")
            result[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
        out.write_text(json.dumps(result, indent=2))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
