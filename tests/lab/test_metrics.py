"""`vftrace serve` scraped by a real Prometheus inside the lab VM, against pf_sched's own
counts: what Prometheus stores is every switch the module made, and its p99 is the
capture's within the buckets' stated error."""
from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.lab import labutil, pfsched
from tests.promserver import running_prometheus
from tracer.capture.files import read_capture
from tracer.model import kernel_hist

from .test_kernel_hist import kernel_counts_per_pf, switches_per_pf
from .test_record import OUT, window

pytestmark = pytest.mark.lab
START_S = 600          # BCC's compile and the cost calibration, under TCG
QUANTILE_ERROR = 0.25  # tracer/metrics/exposition.py: neighbouring bounds <= 25% apart


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(csv, port: int) -> tuple[subprocess.Popen, str]:
    ready = csv.with_name(csv.name + ".ready")
    ready.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tracer.cli", "serve", "-o", str(csv), "--depth", "iommu",
         "--metrics", f"127.0.0.1:{port}", "--ready-file", str(ready)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    said = b""
    deadline = time.monotonic() + START_S
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"vftrace serve did not start: {said.decode()}{err}")
        if select.select([proc.stderr.fileno()], [], [], 0.05)[0]:
            said += os.read(proc.stderr.fileno(), 65536)
    return proc, said.decode(errors="replace")


def one(prom, query: str) -> float:
    got = prom.query(query)
    assert len(got) == 1, (query, got)
    return got[0][1]


def test_prometheus_scrapes_every_switch_pf_sched_made(tmp_path):
    OUT.mkdir(parents=True, exist_ok=True)
    csv = OUT / f"serve-{labutil.kernel_release()}.csv"
    port = free_port()
    with pfsched.loaded(2, slice_us=3000) as pfs:
        pfsched.set_enabled(False)
        proc, said = start_serve(csv, port)
        try:
            assert f"Prometheus metrics at http://127.0.0.1:{port}/metrics" in said, said
            with running_prometheus([f"127.0.0.1:{port}"], tmp_path, "1s") as prom:
                prom.wait_for_scrapes(2, timeout=60)
                before, after = window(pfs, lambda: time.sleep(8))
                made = switches_per_pf(before, after)
                # pf_sched is gated off: wait for a scrape that holds every switch.
                deadline = time.monotonic() + 60
                seen: dict[int, float] = {}
                while time.monotonic() < deadline:
                    seen = {int(labels["pf"]): v for labels, v in prom.query(
                        'sum by (pf) (vftrace_switches_total{job="vftrace"})')}
                    if seen == made:
                        break
                    time.sleep(1)
                by_pf = {pf: seen.get(pf) for pf in made}
                assert by_pf == made, f"Prometheus {seen}, pf_sched made {made}"
                p99_prom = one(prom, 'histogram_quantile(0.99, sum by (le) ('
                                     'vftrace_switch_duration_seconds_bucket{phase="switch"}))')
                records = one(prom, "sum(vftrace_switch_records_total)")
                assert one(prom, 'up{job="vftrace"}') == 1
                assert one(prom, "vftrace_metrics_stale") == 0
                info = prom.query("vftrace_info")
                assert info and info[0][0]["switch_source"] == "pf_sched", info
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    meta, rows, problems = read_capture(csv)
    assert not problems
    lost = meta["lost_by_kind"].get("switch", 0)
    assert len(rows) + lost == sum(made.values())
    assert records == len(rows)
    hists = kernel_hist.from_meta(meta["kernel_histograms"])
    assert kernel_counts_per_pf(hists) == made
    p99_own = kernel_hist.merged(hists).percentiles([99])[0] / 1e9
    assert abs(p99_prom - p99_own) <= QUANTILE_ERROR * p99_own, (p99_prom, p99_own)
    print(f"Prometheus in the lab: {sum(made.values())} switches as pf_sched made them "
          f"({len(rows)} records, {lost} lost); p99 {p99_prom * 1e9:.0f} ns from the "
          f"buckets against {p99_own * 1e9:.0f} ns exact "
          f"({100 * (p99_prom / p99_own - 1):+.1f}%)")
