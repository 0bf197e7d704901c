"""`make lab`'s main job end to end: the lab VM ends in the live dashboard in the user's
terminal (here a tmux pane), pf_sched switching under KVM guests, and `q` shuts it all down.

Boots a real VM (no root needed); driven with tmux send-keys/capture-pane."""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest

from tests.need import need
from tests.unit.test_lab_vm_lifecycle import REPO, qemu_pids, require_lab

MEMORY = "1984M"                     # tells this test's QEMU apart from any other
START_S = 420                        # boot + BCC compile under TCG, with margin


def tmux(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=check)


def switches(screen: str) -> int:
    m = re.search(r"switches (\d+)", screen)
    return int(m.group(1)) if m else 0


@pytest.mark.timeout(START_S + 240)
def test_lab_ends_in_the_dashboard_and_q_shuts_the_vm_down(tmp_path):
    require_lab()
    need(shutil.which("tmux") is not None, "tmux missing (apt-get install tmux, or make setup)")
    session = f"vftrace-lab-{tmp_path.name}"
    rc = tmp_path / "rc"
    lab = shlex.join([str(sys.executable), "-m", "tracer.cli", "lab", "--mode", "mmap",
                      "--pfs", "1", "--vms", "2", "--memory", MEMORY])
    tmux("new-session", "-d", "-s", session, "-x", "120", "-y", "40", "-c", str(REPO),
         f"TERM=xterm-256color {lab}; echo $? > {rc}; sleep 600")
    try:
        deadline, screen, first = time.monotonic() + START_S, "", 0
        while time.monotonic() < deadline and not rc.exists():
            screen = tmux("capture-pane", "-p", "-t", session).stdout
            first = switches(screen)
            if first > 0:
                break
            time.sleep(3)
        assert first > 0, f"no switches on the dashboard after {START_S} s:\n{screen}"
        assert "pf0" in screen, screen
        time.sleep(5)
        screen = tmux("capture-pane", "-p", "-t", session).stdout
        assert switches(screen) > first, screen
        assert re.search(r"lost 0\b", screen), screen
        tmux("send-keys", "-t", session, "q")
        deadline = time.monotonic() + 120
        while not rc.exists() and time.monotonic() < deadline:
            time.sleep(1)
        assert rc.exists(), "q did not end the lab:\n" + tmux("capture-pane", "-p", "-t", session).stdout
        assert rc.read_text().strip() == "0"
        assert not qemu_pids(MEMORY)
    finally:
        tmux("kill-session", "-t", session, check=False)
