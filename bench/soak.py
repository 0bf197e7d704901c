"""Soak: `vftrace record` for a long run under load, checked against pf_sched's counters.

    python bench/soak.py --boot [-k 6.12] [--minutes 10] [--pfs 3] [--slice-us 200] [--vms 2]
    python bench/soak.py [--minutes 10] ...        # already root inside the lab VM

pf_sched switches on several PFs with short slices while KVM guests (mmap mode) hammer
their VFs' BARs; one recorder is armed before the switching starts and stopped after it
ends, so every switch pf_sched made must be a row or a counted loss.  It prints:

* switches pf_sched made (debugfs) against rows recorded, per PF; missing rows and the
  switch records the kernel side reported lost (they must be equal: no silent loss);
* the recorder's RSS when armed, its peak, and at the end (memory stays bounded);
* the CPU the recorder had (its share of one CPU) and how busy the machine's CPUs were,
  so a reader that paused can be told starved (CPUs busy, its share low) from slow;
* the statistics core over the capture against pf_sched's own totals (count, mean ns);
* whether pf_sched unloaded cleanly afterwards.

A short run of the same function is a lab test (tests/lab/test_soak.py).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.lab import labutil, pfsched  # noqa: E402
from bench.capture_keys import read_capture_keys  # noqa: E402
from bench.procstat import CpuShare, rss_kb, thread_nices  # noqa: E402
from bench.report import bursts_text  # noqa: E402
from bench.scrape import Scraper  # noqa: E402
from tracer.lab.experiment import start_recorder, stop_process  # noqa: E402
from tracer.model import kernel_hist  # noqa: E402
from tracer.model.schema import reader_pause  # noqa: E402

LAB_LOCK = "/tmp/vftrace-lab.lock"


METRICS_PORT = 19436


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(seconds: float, n_pfs: int, slice_us: int, vms: int, out_dir: Path,
        sample_s: float = 10.0, scrape_s: float | None = None, recorder_nice: int = 0) -> dict:
    """One soak; returns its figures (see ``report``).  With ``scrape_s`` the recorder is
    ``vftrace serve`` (its capture too), its /metrics scraped that often throughout."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv = out_dir / f"soak-{labutil.kernel_release()}.csv"
    guests_json = out_dir / f"soak-{labutil.kernel_release()}.guests.json"
    guests_json.unlink(missing_ok=True)
    rss: list[tuple[float, int]] = []
    nice = ["--nice", str(recorder_nice)] if recorder_nice else []
    with pfsched.loaded(n_pfs, slice_us=slice_us, nr_vfs=4) as bdfs:
        pfsched.set_enabled(False)
        before = {b: pfsched.stats(b) for b in bdfs}
        if scrape_s:
            recorder, _ = start_recorder(csv, [*nice, "--metrics", f"127.0.0.1:{METRICS_PORT}"],
                                         command="serve")
            scraper = Scraper(f"http://127.0.0.1:{METRICS_PORT}/metrics", scrape_s)
            scraper.on.set()
        else:
            recorder, _ = start_recorder(csv, nice)
            scraper = None
        guests = None
        try:
            rss.append((0.0, rss_kb(recorder.pid) or 0))
            cpu = CpuShare(recorder.pid)
            guests = subprocess.Popen(
                [sys.executable, "-m", "tracer.lab.workloads.guests", "--mode", "mmap", "--vms",
                 str(vms), "--json", "--interval", str(sample_s), "--summary", str(guests_json)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
            pfsched.set_enabled(True)
            t0 = time.monotonic()
            while (elapsed := time.monotonic() - t0) < seconds:
                time.sleep(min(sample_s, seconds - elapsed))
                if recorder.poll() is not None or guests.poll() is not None:
                    break                           # reported below from their exit status
                rss.append((round(time.monotonic() - t0, 1), rss_kb(recorder.pid) or 0))
                log(f"{rss[-1][0]:.0f} s: recorder RSS {rss[-1][1] / 1024:.1f} MiB")
            ran_s = time.monotonic() - t0
            cpu_use = cpu.result() if recorder.poll() is None else None
            nices = thread_nices(recorder.pid) if recorder.poll() is None else None
            g_out, g_err = stop_process(guests, signal.SIGTERM, 60)
            pfsched.set_enabled(False)
            after = {b: pfsched.stats(b) for b in bdfs}
        finally:
            if guests is not None and guests.poll() is None:
                guests.kill()
            if scraper is not None:
                scraper.done.set()
            r_out, r_err = stop_process(recorder, signal.SIGINT, 300)
        pfsched.set_enabled(True)
    unloaded = not labutil.module_loaded("pf_sched")
    meta, rows, problems, stats = read_capture_keys(csv)
    guest_report = json.loads(guests_json.read_text()) if guests_json.exists() else {}
    return report(seconds=ran_s, slice_us=slice_us, vms=vms, before=before, after=after,
                  meta=meta, rows=rows, stats=stats, problems=problems, rss=rss, unloaded=unloaded,
                  recorder=(recorder.returncode, r_err.strip().splitlines()[-1:]),
                  guests=(guests.returncode, guest_report, g_err.strip().splitlines()[-1:]),
                  csv=csv, scrapes=scraper and scraper.take(), cpu=cpu_use,
                  recorder_nice=recorder_nice, thread_nices=nices)


def loss_bursts(rows: np.ndarray, merge_s: float = 1.0) -> dict:
    """When the missing rows went missing: each PF's seq gaps, placed at the time of the
    row before the gap, merged across PFs when less than ``merge_s`` apart.  A steady
    deficit loses a little all the time; a reader that stalls loses in bursts, and
    their spacing points at what stalled it.  ``rows``: (pf, seq, t_ns) a row."""
    gaps = []                                   # (time ns, rows missing)
    for pf in np.unique(rows[:, 0]):
        of_pf = rows[rows[:, 0] == pf]
        of_pf = of_pf[np.argsort(of_pf[:, 1], kind="stable")]
        step = np.diff(of_pf[:, 1])
        at = np.nonzero(step > 1)[0]
        gaps += zip(of_pf[at, 2].tolist(), (step[at] - 1).tolist())
    if not gaps:
        return {"bursts": 0}
    gaps.sort()
    bursts = [[gaps[0][0], gaps[0][1]]]
    for t, n in gaps[1:]:
        if t - bursts[-1][0] < merge_s * 1e9:
            bursts[-1][1] += n
        else:
            bursts.append([t, n])
    spacing = sorted((b[0] - a[0]) / 1e9 for a, b in zip(bursts, bursts[1:]))
    return {"bursts": len(bursts), "largest": max(n for _, n in bursts),
            "median_spacing_s": round(spacing[len(spacing) // 2], 1) if spacing else None}


def report(*, seconds, slice_us, vms, before, after, meta, rows, stats, problems, rss,
           unloaded, recorder, guests, csv, scrapes=None, cpu=None, recorder_nice=0,
           thread_nices=None) -> dict:
    """``rows``: (pf, seq, t_ns) a row of the capture; ``stats`` the core over them."""
    per_pf = []
    # every switch that closed, counted in the kernel whether or not its record came out
    hist_counts: dict[int, int] = {}
    for h in kernel_hist.from_meta(meta.get("kernel_histograms")) or []:
        if h.phase == "switch":
            hist_counts[h.pf] = hist_counts.get(h.pf, 0) + h.count
    snapshot = {g.key.pf: g for g in stats.snapshot().per_pf}
    for bdf in before:
        b, a = before[bdf], after[bdf]
        pf = a["pf"]
        first, last = b["seq"] + 1, a["seq"]          # the seqs pf_sched gave meanwhile
        got = rows[rows[:, 0] == pf, 1]
        seqs = np.unique(got)
        expected = int(np.count_nonzero((seqs >= first) & (seqs <= last)))   # JSON: no np.int64
        made = a["switches"] - b["switches"]
        total = a["total_ns_sum"] - b["total_ns_sum"]
        group = snapshot.get(pf)
        per_pf.append({
            "pf": pf, "switches_made": made, "rows": len(got),
            "missing": max(last - first + 1, 0) - expected,
            "unexpected": len(seqs) - expected, "duplicates": int(len(got) - len(seqs)),
            "stats_count": group.count if group else 0,
            "kernel_hist_count": hist_counts.get(pf),
            "source_mean_ns_module": round(total / made) if made else 0,
            "source_mean_ns_capture": round(group.means["source_ns"]) if group else 0,
            "switch_p50_ns": group.switch.p50 if group else 0,
            "switch_p99_ns": group.switch.p99 if group else 0,
        })
    kb = [k for _, k in rss]
    return {
        "kernel": labutil.kernel_release(), "seconds": round(seconds, 1), "slice_us": slice_us,
        "pfs": len(per_pf), "vms": vms, "per_pf": per_pf,
        "switches_made": sum(p["switches_made"] for p in per_pf),
        "rows": len(rows), "missing_rows": sum(p["missing"] for p in per_pf),
        "lost_total": meta.get("lost_total"), "lost_by_kind": meta.get("lost_by_kind", {}),
        "reader_gaps": meta.get("reader_gaps"), "loss_bursts": loss_bursts(rows),
        "capture_problems": problems[:5], "complete": meta.get("complete"),
        "stop_reason": meta.get("stop_reason"),
        "rss_kb": {"armed": kb[0] if kb else 0, "peak": max(kb, default=0),
                   "end": kb[-1] if kb else 0, "samples": rss},
        "recorder_exit": recorder[0], "recorder_said": recorder[1], "cpu": cpu,
        # what the capture says the recorder ran at, and its threads' values near the end
        "recorder_nice": meta.get("nice", recorder_nice), "recorder_thread_nices": thread_nices,
        "scrapes": None if scrapes is None else {
            "ok": len(scrapes[0]), "failed": len(scrapes[2]), "failures": scrapes[2][:3],
            "max_s": max(scrapes[0], default=None), "loop_read_max_s": max(scrapes[1], default=None)},
        "guests_exit": guests[0], "guests_errors": guests[1].get("errors"),
        "guest_accesses": sum(v["accesses"] for v in guests[1].get("vms", [])),
        "guests_said": guests[2], "pf_sched_unloaded": unloaded, "capture": str(csv),
    }


def cpu_text(cpu: dict) -> str:
    return (f"  CPU: the recorder had {cpu['recorder_cpu_s'] / cpu['wall_s']:.0%} of one CPU"
            f" ({cpu['recorder_cpu_s']} s in {cpu['wall_s']} s); the machine's {cpu['cpus']}"
            f" CPUs were {cpu['machine_busy']:.0%} busy")


def render(f: dict) -> str:
    mib = {k: f["rss_kb"][k] / 1024 for k in ("armed", "peak", "end")}
    lines = [
        f"soak on {f['kernel']}: {f['seconds']:.0f} s, {f['pfs']} PF(s), slice {f['slice_us']} us,"
        f" {f['vms']} mmap guest VM(s)"
        + (f", the recorder at nice {f['recorder_nice']}" if f.get("recorder_nice") else ""),
        f"  switches made {f['switches_made']}, rows {f['rows']}, missing {f['missing_rows']},"
        f" switch records reported lost {f['lost_by_kind'].get('switch', 0)}"
        f" (all kinds: {f['lost_total']})",
        f"  {reader_pause(f) or 'the reader pauses were not recorded (older vftrace)'}",
    ]
    if bursts_text(f):
        lines.append(f"  {bursts_text(f)}")
    for p in f["per_pf"]:
        lines.append(
            f"  pf{p['pf']}: made {p['switches_made']} rows {p['rows']} missing {p['missing']}"
            f" unexpected {p['unexpected']} dup {p['duplicates']} | stats count {p['stats_count']}"
            f" kernel histogram count {p.get('kernel_hist_count')}"
            f" | mean source ns module {p['source_mean_ns_module']} capture"
            f" {p['source_mean_ns_capture']} | switch p50 {p['switch_p50_ns']} p99"
            f" {p['switch_p99_ns']}")
    lines += [
        f"  recorder RSS: armed {mib['armed']:.1f} MiB, peak {mib['peak']:.1f} MiB, end"
        f" {mib['end']:.1f} MiB (growth {mib['end'] - mib['armed']:+.1f} MiB)",
        *([f"  /metrics scrapes: {f['scrapes']['ok']} answered, {f['scrapes']['failed']} failed,"
           f" slowest {f['scrapes']['max_s']:.2f} s (the recorder's loop: at most"
           f" {f['scrapes']['loop_read_max_s'] or 0:.3f} s)"] if f.get("scrapes") else []),
        *([cpu_text(f["cpu"])] if f.get("cpu") else []),
        f"  guests: {f['guest_accesses']} accesses, exit {f['guests_exit']},"
        f" errors {f['guests_errors'] or 'none'}",
        f"  recorder exit {f['recorder_exit']}, capture complete {f['complete']},"
        f" stop reason {f['stop_reason']!r}; pf_sched unloaded: {f['pf_sched_unloaded']}",
    ]
    return "\n".join(lines)


def boot(args: argparse.Namespace) -> int:
    """From the host: one lab boot per kernel, this script inside it."""
    inner = [str(REPO / ".venv/bin/python"), str(Path(__file__).resolve()),
             "--minutes", str(args.minutes), "--pfs", str(args.pfs), "--slice-us",
             str(args.slice_us), "--vms", str(args.vms), "--scrape-s", str(args.scrape_s),
             "--nice", str(args.recorder_nice), "-o", str(args.output)]
    status = 0
    for kernel in args.kernel or ["6.12"]:
        cmd = ["flock", LAB_LOCK, str(REPO / ".venv/bin/vftrace"), "lab", "-k", kernel,
               "--pfs", str(args.pfs), "-t", str(int(args.minutes * 60 + 900)), "--", *inner]
        status |= subprocess.run(cmd).returncode
    return status


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="examples:\n  python bench/soak.py --boot            # 10 min on 6.12\n"
               "  python bench/soak.py --boot -k 6.1 --minutes 2 --pfs 2 --slice-us 500",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--boot", action="store_true", help="boot the lab VM and run inside it")
    p.add_argument("-k", "--kernel", action="append", choices=("6.1", "6.12"),
                   help="with --boot: lab kernel (repeatable; default 6.12)")
    p.add_argument("-m", "--minutes", type=float, default=10.0)
    p.add_argument("--pfs", type=int, default=3, help="PFs switching (default 3)")
    p.add_argument("--slice-us", type=int, default=200, help="pf_sched slice (default 200)")
    p.add_argument("--vms", type=int, default=2, help="mmap guest VMs (default 2)")
    p.add_argument("--scrape-s", type=float, default=5.0,
                   help="record with vftrace serve and scrape its /metrics this often "
                        "(default 5; 0: vftrace record, no endpoint)")
    p.add_argument("--nice", dest="recorder_nice", type=int, default=0, metavar="N",
                   help="the recorder's --nice N: its threads, not the guests (default 0); "
                        "the figures and the verdict say so")
    p.add_argument("-o", "--output", type=Path, default=REPO / "build" / "soak")
    args = p.parse_args()
    if args.boot:
        return boot(args)
    if os.geteuid() != 0 or not labutil.in_lab():
        print("soak: error: run inside the lab VM as root, or pass --boot", file=sys.stderr)
        return 2
    figures = run(args.minutes * 60, args.pfs, args.slice_us, args.vms, args.output,
                  scrape_s=args.scrape_s or None, recorder_nice=args.recorder_nice)
    print(render(figures), flush=True)
    path = args.output / f"soak-{figures['kernel']}.json"
    path.write_text(json.dumps(figures, indent=1) + "\n")
    print(f"  figures: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
