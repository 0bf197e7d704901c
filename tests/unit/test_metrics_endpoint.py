"""The ``--metrics`` endpoint as a scraper meets it: the real ``vftrace replay`` headless
(stdin not a terminal) scraped by a real Prometheus, whose p99 of every switch must be
vftrace's own within the buckets' stated error (exposition.py: neighbouring bounds at
most 25% apart) and whose counters must hold every switch, also those whose records were
lost; ``promtool`` on the exposition; a bad address in one line; clients that stall or
talk nonsense; SIGTERM mid-scrape; HTTPS."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.need import need
from tests.promserver import free_port, running_prometheus
from tracer.capture.files import CaptureWriter, read_capture
from tracer.model.kernel_hist import KernelHist, to_meta
from tracer.model.stats import Histogram

REPO = Path(__file__).resolve().parents[2]
SMALL = REPO / "tests" / "data" / "small.csv"
QUANTILE_ERROR = 0.25        # exposition.py: neighbouring bounds are at most 25% apart
LOST = 600                   # switch records the lossy capture lost (kernel-counted)
START_S = 30.0
P99 = ('histogram_quantile(0.99, sum by (le) (vftrace_switch_duration_seconds_bucket'
       '{{phase="switch",instance="{0}"}}))')


class Replay:
    """``vftrace replay CAP --speed max --metrics ADDR`` with no terminal, its stderr read
    line by line as it comes."""

    def __init__(self, capture: Path, address: str = "127.0.0.1:0", extra: tuple = ()):
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tracer.cli", "replay", str(capture), "--speed", "max",
             "--metrics", address, *extra],
            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        notice = self.wait_for("Prometheus metrics at ")
        self.url = re.search(r"(https?://\S+/metrics)", notice).group(1)
        self.port = int(re.search(r":(\d+)/metrics", self.url).group(1))
        self.target = f"127.0.0.1:{self.port}"
        self.wait_for("end of capture")

    def _read(self) -> None:
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self.lines.append(None)          # EOF
            self._cond.notify_all()

    @property
    def stderr(self) -> str:
        with self._cond:
            return "".join(x for x in self.lines if x is not None)

    def wait_for(self, text: str, timeout: float = START_S) -> str:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if line is not None and text in line:
                        return line
                left = deadline - time.monotonic()
                if None in self.lines or left <= 0:
                    break
                self._cond.wait(left)
        self.stop()
        pytest.fail(f"vftrace replay never said {text!r} (exit {self.proc.returncode}):\n"
                    f"{self.stderr}")

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, as a service manager would; SIGKILL if it outstays ``timeout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        return self.proc.returncode


@contextlib.contextmanager
def replaying(capture: Path, address: str = "127.0.0.1:0", extra: tuple = ()):
    r = Replay(capture, address, extra)
    try:
        yield r
    finally:
        r.stop()


def scrape(url: str, timeout: float = 5.0, context=None) -> str:
    with urllib.request.urlopen(url, timeout=timeout, context=context) as resp:
        assert resp.status == 200
        return resp.read().decode()


def own_report(capture: Path) -> dict:
    """``vftrace report CAP --json``'s capture, in process."""
    from tracer.cli import main
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["report", str(capture), "--json"]) == 0
    return json.loads(out.getvalue())["captures"][0]


def write_lossy_capture(path: Path) -> tuple[int, list[int]]:
    """small.csv's rows, plus LOST switches whose records were lost (their values spread
    log-uniformly over 100 ns .. 10 ms): the kernel histograms of every switch, per (pf,
    incoming vf), and the lost count go into the meta as the recorder writes them.
    Returns the rows kept and every switch's value."""
    meta, rows, problems = read_capture(SMALL)
    assert not problems
    lost = np.rint(10 ** np.random.default_rng(7).uniform(2, 7, LOST)).astype(np.int64)
    groups: dict[tuple[int, int], list[int]] = {}
    for r in rows:
        groups.setdefault((r.pf, r.to_vf), []).append(r.switch_ns)
    keys = sorted(groups)
    for i, v in enumerate(lost):
        groups[keys[i % len(keys)]].append(int(v))
    hists = []
    for (pf, vf), values in sorted(groups.items()):
        h = Histogram()
        h.add_array(np.array(values, dtype=np.int64))
        hists.append(KernelHist(pf, vf, "switch", h, int(sum(values))))
    # What else a recorder writes beside them: the kernel side's drops, every one listed.
    background = {**meta.get("background", {}),
                  "kernel_drops": {"no_slot": 0, "hist_slot": 0, "skipped_runs": 0}}
    w = CaptureWriter(path, {**meta, "kernel_histograms": to_meta(hists, 0),
                             "lost_by_kind": {"switch": LOST}, "background": background})
    w.write_many(rows)
    w.close(lost={0: LOST})
    return len(rows), [v for values in groups.values() for v in values]


def one(prom, query: str) -> float:
    got = prom.query(query)
    assert len(got) == 1, (query, got)
    return got[0][1]


@pytest.fixture(scope="module")
def scraped(tmp_path_factory):
    """One Prometheus scraping two replays to their end: a lossy capture with kernel
    histograms, and small.csv (lossless, none)."""
    d = tmp_path_factory.mktemp("scraped")
    lossy = d / "lossy.csv"
    rows, every = write_lossy_capture(lossy)
    with replaying(lossy) as a, replaying(SMALL) as b:
        with running_prometheus([a.target, b.target], d, "1s") as prom:
            prom.wait_for_scrapes(2, timeout=30)
            yield prom, {"lossy": (lossy, a.target, rows, every),
                         "small": (SMALL, b.target)}
        assert a.stop() == 0, a.stderr
        assert b.stop() == 0, b.stderr


def test_prometheus_holds_every_switch_of_a_lossy_capture_and_its_p99(scraped):
    prom, caps = scraped
    capture, target, rows, every = caps["lossy"]
    own = own_report(capture)
    p99_own = own["every_switch"]["p99_ns"] / 1e9
    assert own["every_switch"]["count"] == rows + LOST == len(every)
    # The capture tells the two apart: the records' own p99 is not every switch's.
    p99_records = next(r for r in own["rows"] if r["group"] == "all")["p99"] / 1e9
    assert abs(p99_records - p99_own) > QUANTILE_ERROR * p99_own, (p99_records, p99_own)
    p99_prom = one(prom, P99.format(target))
    assert abs(p99_prom - p99_own) <= QUANTILE_ERROR * p99_own, (p99_prom, p99_own)
    sel = f'{{instance="{target}"}}'
    switches = one(prom, f"sum(vftrace_switches_total{sel})")
    records = one(prom, f"sum(vftrace_switch_records_total{sel})")
    assert switches == rows + LOST, (switches, rows, LOST)
    assert records == rows
    assert one(prom, f'sum(vftrace_lost_records_total{{instance="{target}",kind="switch"}})') \
        == LOST
    assert one(prom, f'up{{job="vftrace",instance="{target}"}}') == 1
    assert one(prom, f"vftrace_metrics_stale{sel}") == 0
    print(f"lossy: Prometheus p99 {p99_prom * 1e9:.0f} ns, vftrace's {p99_own * 1e9:.0f} ns "
          f"({100 * (p99_prom / p99_own - 1):+.1f}%); switches_total {switches:.0f} = "
          f"{rows} rows + {LOST} lost; records p99 {p99_records * 1e9:.0f} ns")


def test_prometheus_p99_of_a_lossless_capture_is_the_reports(scraped):
    prom, caps = scraped
    capture, target = caps["small"]
    own = own_report(capture)
    assert own["every_switch"] is None and own["lost_total"] == 0
    overall = next(r for r in own["rows"] if r["group"] == "all")
    p99_own = overall["p99"] / 1e9
    p99_prom = one(prom, P99.format(target))
    assert abs(p99_prom - p99_own) <= QUANTILE_ERROR * p99_own, (p99_prom, p99_own)
    sel = f'{{instance="{target}"}}'
    switches = one(prom, f"sum(vftrace_switches_total{sel})")
    assert switches == one(prom, f"sum(vftrace_switch_records_total{sel})") \
        == overall["count"] == own["records"]
    assert one(prom, f'up{{job="vftrace",instance="{target}"}}') == 1
    print(f"small: Prometheus p99 {p99_prom * 1e9:.0f} ns, vftrace's {p99_own * 1e9:.0f} ns "
          f"({100 * (p99_prom / p99_own - 1):+.1f}%); switches_total {switches:.0f} = "
          f"{own['records']} rows")


def test_promtool_accepts_the_exposition(tmp_path):
    promtool = "/usr/bin/promtool" if os.access("/usr/bin/promtool", os.X_OK) \
        else shutil.which("promtool")
    need(promtool is not None, "promtool missing: install Debian's prometheus (make setup)")
    lossy = tmp_path / "lossy.csv"
    write_lossy_capture(lossy)
    for capture in (lossy, SMALL):
        with replaying(capture) as r:
            body = scrape(r.url)
        assert "vftrace_switch_duration_seconds_bucket" in body
        check = subprocess.run([promtool, "check", "metrics"], input=body,
                               capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, f"{capture.name}: {check.stdout}{check.stderr}"


def assert_one_line_error(r: subprocess.CompletedProcess, says: str) -> None:
    lines = r.stderr.splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("vftrace replay: error:"), lines[0]
    assert says in lines[0], lines[0]
    assert "Traceback" not in r.stdout + r.stderr


def run_replay(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "tracer.cli", "replay", str(SMALL),
                           "--speed", "max", *args], cwd=REPO, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("address,says", [("127.0.0.1:notaport", "'notaport' is not a number"),
                                          ("nohostport", "give HOST:PORT")])
def test_a_bad_address_is_one_line_and_exit_2(address, says):
    assert_one_line_error(run_replay("--metrics", address), says)


def test_a_port_in_use_is_one_line_and_exit_2():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        r = run_replay("--metrics", f"127.0.0.1:{port}")
    assert_one_line_error(r, f"127.0.0.1:{port}: cannot listen")


def test_clients_that_stall_or_talk_nonsense_do_not_stop_the_scrapes():
    with replaying(SMALL) as r:
        silent = socket.create_connection(("127.0.0.1", r.port), timeout=5)
        garbage = socket.create_connection(("127.0.0.1", r.port), timeout=5)
        try:
            garbage.sendall(b"\x16\x03\x01\x00\xff\xfe garbage \x00\x01\r\n\r\n")
            for _ in range(2):
                t0 = time.monotonic()
                body = scrape(r.url)
                assert "vftrace_switches_total" in body
                assert time.monotonic() - t0 < 3.0
            assert r.proc.poll() is None
            assert r.stop() == 0, r.stderr         # the silent client still connected
        finally:
            silent.close()
            garbage.close()
        assert "Traceback" not in r.stderr, r.stderr


def test_sigterm_mid_scrape_exits_0_and_frees_the_port():
    port = free_port()
    with replaying(SMALL, f"127.0.0.1:{port}") as r:
        assert r.port == port
        with socket.create_connection(("127.0.0.1", port), timeout=5) as mid:
            mid.sendall(b"GET /metr")                   # a request line cut short
            time.sleep(0.3)
            t0 = time.monotonic()
            r.proc.send_signal(signal.SIGTERM)
            try:
                code = r.proc.wait(5)
            except subprocess.TimeoutExpired:
                pytest.fail(f"still running 5 s after SIGTERM mid-scrape:\n{r.stderr}")
            took = time.monotonic() - t0
        assert code == 0, r.stderr
        assert "Traceback" not in r.stderr, r.stderr
    # Free: a server can listen there again (with SO_REUSEADDR, as every HTTP server,
    # vftrace's own included, binds: the cut connection may sit in TIME_WAIT).
    with socket.socket() as again:
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))
        again.listen()
    with replaying(SMALL, f"127.0.0.1:{port}") as r2:
        assert "vftrace_switches_total" in scrape(r2.url)
    print(f"SIGTERM mid-scrape: exit 0 after {took:.2f} s; port {port} served again")


def test_metrics_over_tls(tmp_path):
    openssl = shutil.which("openssl")
    need(openssl is not None, "openssl missing: install Debian's openssl to make a "
                              "self-signed certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj",
                    "/CN=localhost", "-days", "1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    with replaying(SMALL, extra=("--metrics-tls", str(cert), str(key))) as r:
        assert r.url.startswith("https://"), r.url
        unverified = ssl.create_default_context()
        unverified.check_hostname = False
        unverified.verify_mode = ssl.CERT_NONE
        # A client that connects and never says hello holds its own thread only.
        with socket.create_connection(("127.0.0.1", r.port), timeout=5):
            for _ in range(2):
                t0 = time.monotonic()
                assert "vftrace_switches_total" in scrape(r.url, context=unverified)
                assert time.monotonic() - t0 < 3.0
        assert r.stop() == 0, r.stderr
    missing = tmp_path / "nonexistent.pem"
    assert_one_line_error(run_replay("--metrics", "127.0.0.1:0", "--metrics-tls",
                                     str(missing), str(key)),
                          "cannot load the certificate and key")


def readme_queries() -> list[str]:
    """The PromQL lines of the README's ```promql block (comments left out)."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"```promql\n(.*?)```", text, re.S)
    assert block, "README.md has no ```promql block"
    return [line for line in block.group(1).splitlines() if line.strip()
            and not line.startswith("#")]


def shipped_rule_files() -> list[Path]:
    """The rule files deploy/prometheus/prometheus.yml loads (relative to it)."""
    config = REPO / "deploy" / "prometheus" / "prometheus.yml"
    text = config.read_text()
    names = re.findall(r"^\s*-\s*(\S+\.yml)\s*$", text.split("rule_files:")[1].split(
        "scrape_configs:")[0], re.M)
    assert names, text
    return [config.parent / n for n in names]


def test_the_readme_queries_and_the_shipped_rules_answer_from_a_real_prometheus(tmp_path):
    """What a newcomer does: the README's scrape config with its rule files, pointed at
    vftrace; every README query and every recording rule then gives series."""
    rules = shipped_rule_files()
    recorded = [name for f in rules
                for name in re.findall(r"^\s*-?\s*record:\s*(\S+)", f.read_text(), re.M)]
    assert len(recorded) >= 5
    capture = tmp_path / "lossy.csv"
    write_lossy_capture(capture)
    with replaying(capture) as r, running_prometheus([r.target], tmp_path, "1s", rules) as prom:
        prom.wait_for_scrapes(3, timeout=30)
        for q in readme_queries():
            assert prom.query(q), f"README query gave no series: {q}"
        deadline = time.monotonic() + 20
        missing = recorded
        while missing and time.monotonic() < deadline:
            missing = [name for name in recorded if not prom.query(name)]
            time.sleep(0.5)
        assert not missing, f"recording rules never evaluated to a series: {missing}"
        assert prom.query('ALERTS{alertname="VftraceMetricsStale"}') == []
    print(f"README: {len(readme_queries())} queries and {len(recorded)} recording rules "
          "answered")
