"""The real dashboard (`vftrace live`) over pf_sched, driven in tmux as a user would."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.lab import labutil, pfsched
from tests.promserver import free_port
from tracer.capture.files import read_capture

pytestmark = pytest.mark.lab
START_S = 300                   # BCC compiles slowly under TCG


def tmux(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=check)


def pane(session: str) -> str:
    return tmux("capture-pane", "-p", "-t", session).stdout


def switches_shown(screen: str) -> int:
    m = re.search(r"switches (\d+)", screen)
    return int(m.group(1)) if m else 0


def scraped_switches(port: int) -> float:
    """``sum(vftrace_switches_total)`` of one scrape of the dashboard's endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        body = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
               if line.startswith("vftrace_switches_total{"))


def test_live_dashboard_streams_switches_and_quits_on_q(tmp_path):
    session = f"vftrace-{os.getpid()}"
    capture = tmp_path / "live.csv"
    port = free_port()
    cmd = shlex.join([sys.executable, "-m", "tracer.cli", "live", "--csv", str(capture),
                      "--metrics", f"127.0.0.1:{port}"])
    with pfsched.loaded(1, slice_us=2000) as bdfs:
        stalls = tmp_path / "stalls.txt"        # the watchdog's dumps (tui/watchdog.py)
        tmux("new-session", "-d", "-s", session, "-x", "120", "-y", "40",
             f"TERM=xterm-256color VFTRACE_STALL_DUMP={stalls} {cmd}; "
             f"echo exited $? > {tmp_path}/rc; sleep 600")
        try:
            deadline, screen, first = time.monotonic() + START_S, "", 0
            while time.monotonic() < deadline:
                screen = pane(session)
                first = switches_shown(screen)
                if first > 0:
                    break
                time.sleep(2)
            assert first > 0, f"no switches on screen after {START_S} s:\n{screen}"
            # The header and the tables are drawn in one refresh, but tmux can catch a
            # frame half written when the terminal lags (a CI run caught the header at
            # 5,854 switches over empty tables): a few more captures for the rest of it.
            deadline = time.monotonic() + 30
            while "pf0" not in screen and time.monotonic() < deadline:
                time.sleep(2)
                screen = pane(session)
            assert "pf0" in screen and "lost 0" in screen, screen
            # It keeps streaming.  Within 30 s, not 3: in CI this VM's one TCG thread
            # shares two cores with the other kernel's VM and the unit tests, and once
            # the whole guest got no CPU for 3 s (CI run A: same screen, same elapsed
            # 00:07, nothing to draw); alone, 4 of 4 runs moved within 3 s.  A frozen
            # dashboard (#19) never moves again, so this still catches it.
            deadline = time.monotonic() + 30
            later = first
            while later <= first and time.monotonic() < deadline:
                time.sleep(1)
                later = switches_shown(pane(session))
            assert later > first, pane(session) + (stalls.read_text() if stalls.exists() else "")
            # Scraped while it streams (the endpoint's read-outs run in the dashboard's
            # reading thread): every scrape counts more switches, and the screen moves on.
            counted = [scraped_switches(port) for _ in range(3) if time.sleep(1) is None]
            assert counted[0] > 0 and counted == sorted(counted) and counted[-1] > counted[0], \
                counted
            shown = switches_shown(pane(session))
            deadline = time.monotonic() + 30
            while switches_shown(pane(session)) <= shown and time.monotonic() < deadline:
                time.sleep(1)
            assert switches_shown(pane(session)) > shown, "the screen stopped after scrapes:\n" \
                + pane(session) + (stalls.read_text() if stalls.exists() else "")
            tmux("send-keys", "-t", session, "q")
            deadline = time.monotonic() + 60
            while not (tmp_path / "rc").exists() and time.monotonic() < deadline:
                time.sleep(0.5)
            truth = pfsched.stats(bdfs[0])["switches"]       # every switch so far
            assert (tmp_path / "rc").read_text().split() == ["exited", "0"], pane(session)
        finally:
            tmux("kill-session", "-t", session, check=False)
    # q stopped the recording cleanly: the capture is closed and whole, nothing is left
    # attached in the kernel.
    meta, rows, problems = read_capture(capture)
    assert meta["complete"] and not problems
    assert later <= len(rows) <= truth
    assert not labutil.vftrace_kprobes()
