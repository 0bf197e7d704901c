"""A real Prometheus (Debian's /usr/bin/prometheus, 2.42) scraping vftrace, for the unit
tier on the host and the lab tier in the VM (which shares this repository and the host's
/usr, nothing else): ``running_prometheus(targets, tmp_path)`` writes its config, starts
it on a free loopback port with its TSDB under ``tmp_path``, waits until it is ready, and
stops it on the way out, printing the tail of its log when the block failed."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Iterator

from tests.need import need

PROMETHEUS = "/usr/bin/prometheus"
MISSING = "prometheus missing: install Debian's prometheus (make setup)"
JOB = "vftrace"
READY_S = 60.0          # TSDB start-up; slower under the lab's TCG
STOP_S = 10.0
LOG_TAIL = 40


def prometheus_binary() -> str:
    """The prometheus binary; skipped outside CI, failed under CI, when there is none."""
    path = PROMETHEUS if os.access(PROMETHEUS, os.X_OK) else shutil.which("prometheus")
    need(path is not None, MISSING)
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Prometheus:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path, targets: list[str]):
        self.proc, self.url, self.log, self.targets = proc, url, log, targets

    def query(self, promql: str) -> list[tuple[dict[str, str], float]]:
        """An instant query, now: one (labels, value) per series (a scalar: one, no
        labels); AssertionError with Prometheus's own words if it refuses the query."""
        status, body = _get(f"{self.url}/api/v1/query?"
                            + urllib.parse.urlencode({"query": promql}))
        try:
            got = json.loads(body)
        except ValueError:
            got = {}
        if status != 200 or got.get("status") != "success":
            raise AssertionError(f"Prometheus refused {promql!r}: HTTP {status}: "
                                 f"{body[:500].decode(errors='replace')}")
        data = got["data"]
        if data["resultType"] == "vector":
            return [(r["metric"], float(r["value"][1])) for r in data["result"]]
        if data["resultType"] == "scalar":
            return [({}, float(data["result"][1]))]
        raise AssertionError(f"{promql!r}: a {data['resultType']}, not an instant vector")

    def scrapes(self) -> dict[str, int]:
        """Successful scrapes so far, per target (``instance``)."""
        return {labels.get("instance", ""): int(v) for labels, v in
                self.query(f'sum by (instance) (sum_over_time(up{{job="{JOB}"}}[1d]))')}

    def targets_health(self) -> list[dict]:
        status, body = _get(f"{self.url}/api/v1/targets")
        if status != 200:
            return [{"error": f"HTTP {status}"}]
        return [{k: t.get(k) for k in ("scrapeUrl", "health", "lastError", "lastScrape")}
                for t in json.loads(body)["data"]["activeTargets"]]

    def wait_for_scrapes(self, n: int, timeout: float = 30.0) -> dict[str, int]:
        """Wait until every target was scraped successfully ``n`` times; AssertionError,
        with each target's last error, if not within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        seen: dict[str, int] = {}
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited ({self.proc.returncode})")
            seen = self.scrapes()
            if all(seen.get(t, 0) >= n for t in self.targets):
                return seen
            if time.monotonic() > deadline:
                raise AssertionError(f"{n} successful scrapes of each of {self.targets} not "
                                     f"within {timeout:.0f} s: {seen}; targets "
                                     f"{self.targets_health()}")
            time.sleep(0.2)

    def log_tail(self, lines: int = LOG_TAIL) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError as e:
            return f"(no log: {e})"


def write_config(path: Path, targets: list[str], scrape_interval: str,
                 rule_files: list[Path] = ()) -> None:
    # JSON is YAML: no quoting rules to get wrong.  The timeout may not exceed the
    # interval (Prometheus's default is 10 s).
    path.write_text(json.dumps({
        "global": {"scrape_interval": scrape_interval, "scrape_timeout": scrape_interval,
                   "evaluation_interval": scrape_interval},
        "rule_files": [str(Path(f).resolve()) for f in rule_files],
        "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": list(targets)}]}],
    }, indent=2) + "\n")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _start(binary: str, config: Path, tmp: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle",
             "--log.level=info"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=tmp)
    return proc, f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def running_prometheus(targets: list[str], tmp_path, scrape_interval: str = "1s",
                       rule_files: list[Path] = ()) -> Iterator[Prometheus]:
    """Prometheus scraping ``targets`` (HOST:PORT, job "vftrace") every
    ``scrape_interval`` (and evaluating ``rule_files`` as often), ready when this yields;
    stopped (SIGTERM, then SIGKILL) after."""
    binary = prometheus_binary()
    tmp = Path(tmp_path) / "prometheus"
    tmp.mkdir(parents=True, exist_ok=True)
    config, log = tmp / "prometheus.yml", tmp / "prometheus.log"
    write_config(config, targets, scrape_interval, rule_files)
    prom = None
    for attempt in range(3):          # another process may take the free port meanwhile
        proc, url = _start(binary, config, tmp, log)
        prom = Prometheus(proc, url, log, list(targets))
        deadline = time.monotonic() + READY_S
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if _get(f"{url}/-/ready", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        else:
            _stop(proc)
            if "address already in use" in prom.log_tail() and attempt < 2:
                continue
            raise AssertionError(f"prometheus not ready within {READY_S:.0f} s "
                                 f"(exit {proc.returncode}); its log:\n{prom.log_tail()}")
        break
    try:
        yield prom
    except BaseException:
        print(f"--- prometheus log ({log}), last {LOG_TAIL} lines ---\n{prom.log_tail()}")
        raise
    finally:
        _stop(prom.proc)
