"""A Prometheus-like client for the benches: GET /metrics every few seconds."""
from __future__ import annotations

import re
import threading
import time
import urllib.request


class Scraper:
    """A Prometheus-like client: GET /metrics every ``every_s`` while ``on``; the time
    each scrape took, and the failures."""

    def __init__(self, url: str, every_s: float = 1.0) -> None:
        self.url, self.every_s = url, every_s
        self.on = threading.Event()
        self.done = threading.Event()
        self.durations: list[float] = []
        self.reads: list[float] = []          # what each took the recorder's loop
        self.failures: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.is_set():
            if self.on.is_set():
                t0 = time.monotonic()
                try:
                    with urllib.request.urlopen(self.url, timeout=30) as r:
                        body = r.read().decode()
                    self.durations.append(time.monotonic() - t0)
                    m = re.search(r"^vftrace_metrics_read_seconds (\S+)$", body, re.M)
                    if m:
                        self.reads.append(float(m.group(1)))
                except OSError as e:
                    self.failures.append(str(e))
            self.done.wait(self.every_s)

    def take(self) -> tuple[list[float], list[float], list[str]]:
        d, r, f = self.durations, self.reads, self.failures
        self.durations, self.reads, self.failures = [], [], []
        return d, r, f
