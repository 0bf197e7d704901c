"""`make lab`'s main job end to end, under stress: the lab VM ends in the live dashboard
in the user's terminal (here a tmux pane), pf_sched switching under two mmap KVM guests;
for two minutes the screen is sampled every few seconds and must keep moving, with every
panel filled; then `q` shuts it all down.

Boots a real VM (no root needed); driven with tmux send-keys/capture-pane.  The
dashboard's stall watchdog (``VFTRACE_STALL_DUMP``) writes every thread's stack into the
shared tree when its UI tick stops, and a failure shows it."""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest

from tests.integration.test_lab_vm_lifecycle import REPO, qemu_pids, require_lab
from tests.need import need

MEMORY = "1984M"                     # tells this test's QEMU apart from any other
START_S = 420                        # boot + BCC compile under TCG, with margin
STRESS_S = 120                       # how long the screen must keep moving
SAMPLE_S = 5


def tmux(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=check)


def figure(pattern: str, screen: str) -> str | None:
    m = re.search(pattern, screen)
    return m.group(1) if m else None


def switches(screen: str) -> int:
    return int(figure(r"switches (\d+)", screen) or 0)


def elapsed_s(screen: str) -> int:
    text = figure(r"elapsed (\d+:\d+(?::\d+)?)", screen) or "0:0"
    seconds = 0
    for part in text.split(":"):
        seconds = seconds * 60 + int(part)
    return seconds


def panels_filled(screen: str) -> list[str]:
    """What is still empty on a screen that has counted switches."""
    empty = []
    if "no switches yet" in screen:
        empty.append("distribution")
    if not re.search(r"^\s*pf0\s+\d+\s", screen, re.M):
        empty.append("per-PF table")
    if not re.search(r"^\s*\d+\s+0\s+\d+>\d+\s", screen, re.M):
        empty.append("switch list")
    if not re.search(r"KVM exits \d+", screen):
        empty.append("guests")
    if not re.search(r"switches/s \(trace time\): newest \d+", screen):
        empty.append("rate sparkline")
    return empty


def blocked_on_output(dump: str) -> list[str]:
    """The stall dumps (tui/watchdog.py) whose main thread (the one running the CLI) was
    waiting to hand output to Textual's writer thread: the terminal not taking it."""
    found = []
    for block in dump.split("\nThread ")[1:] + dump.split("\nCurrent thread ")[1:]:
        frames = block.split("\n\n")[0]
        if "tracer/cli.py" in frames and re.search(r"queue\.py\", line \d+ in put", frames):
            found.append(frames)
    return found


@pytest.mark.timeout(START_S + STRESS_S + 300)
def test_lab_dashboard_keeps_moving_for_two_minutes_and_q_shuts_the_vm_down(tmp_path):
    require_lab()
    need(shutil.which("tmux") is not None, "tmux missing (apt-get install tmux, or make setup)")
    session = f"vftrace-lab-{tmp_path.name}"
    rc = tmp_path / "rc"
    stalls = REPO / "build" / f"dashboard-stalls-{tmp_path.name}.txt"
    stalls.unlink(missing_ok=True)
    lab = shlex.join([str(sys.executable), "-m", "tracer.cli", "lab", "--mode", "mmap",
                      "--pfs", "1", "--vms", "2", "--memory", MEMORY])
    tmux("new-session", "-d", "-s", session, "-x", "120", "-y", "40", "-c", str(REPO),
         f"TERM=xterm-256color VFTRACE_STALL_DUMP={shlex.quote(str(stalls))} {lab}; "
         f"echo $? > {rc}; sleep 600")

    def screen() -> str:
        return tmux("capture-pane", "-p", "-t", session).stdout

    def evidence() -> str:
        dump = stalls.read_text() if stalls.exists() else "(no stall was detected)"
        return f"\n--- stall dump ---\n{dump}"

    try:
        deadline, shown, first = time.monotonic() + START_S, "", 0
        while time.monotonic() < deadline and not rc.exists():
            shown = screen()
            first = switches(shown)
            if first > 0:
                break
            time.sleep(3)
        assert first > 0, f"no switches on the dashboard after {START_S} s:\n{shown}"
        samples = []
        end = time.monotonic() + STRESS_S
        previous = (first, elapsed_s(shown))
        while time.monotonic() < end:
            time.sleep(SAMPLE_S)
            shown = screen()
            now = (switches(shown), elapsed_s(shown))
            samples.append(now)
            # Within 30 s (six samples).  Under TCG the guest's one emulation thread
            # also runs the emulated IOMMU and the guests, and the dashboard's frames
            # come 5-6.4 s apart at times: the stall dumps of fresh-clone runs A and B
            # show its main thread busy (folding statistics, rendering, the footer's
            # recompose), never blocked.  Two such gaps fell inside one 15 s window in
            # run B.  The freeze of #19 never moved again and blocked on the terminal:
            # that is checked below on every dump.
            previous = samples[-7] if len(samples) >= 7 else previous
            if len(samples) < 3:
                continue
            assert now[0] > previous[0] and now[1] > previous[1], (
                f"the dashboard stopped moving: {previous} -> {now} (switches, elapsed s) "
                f"after {len(samples)} samples:\n{shown}{evidence()}")
            assert not panels_filled(shown), (
                f"empty beside {now[0]} switches: {panels_filled(shown)}:\n{shown}{evidence()}")
            previous = now
        assert re.search(r"lost 0\b", shown), shown
        blocked = blocked_on_output(stalls.read_text()) if stalls.exists() else []
        assert not blocked, "the UI thread blocked on the terminal:\n" + "\n".join(blocked)
        tmux("send-keys", "-t", session, "q")
        deadline = time.monotonic() + 120
        while not rc.exists() and time.monotonic() < deadline:
            time.sleep(1)
        assert rc.exists(), "q did not end the lab:\n" + screen()
        assert rc.read_text().strip() == "0"
        assert not qemu_pids(MEMORY)
    finally:
        tmux("kill-session", "-t", session, check=False)
