"""Stopping a child started in a process group of its own (``process_group=0``).

The workload of ``record -- CMD``, the lab's VM and the lab's guests each start things
of their own (QEMU, a VFIO test), so each is stopped as a group: SIGTERM to every member,
then SIGKILL to what is left after a grace period.  One copy of that rule, here."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import time

KILL_WAIT_S = 5.0           # after SIGKILL: members in uninterruptible sleep take a moment


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group.  A zombie grandchild that init
    has not reaped yet still answers kill(0), so /proc is read instead."""
    members = []
    try:
        entries = os.listdir("/proc")
    except OSError:                           # no /proc: fall back to the signal probe
        try:
            os.killpg(pgid, 0)
            return [pgid]
        except OSError:
            return []
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 2 and fields[0] not in (b"Z", b"X") and int(fields[2]) == pgid:
            members.append(int(name))
    return members


def signal_group(pgid: int, sig: int) -> None:
    """``killpg``, quiet when the group is already gone."""
    try:
        os.killpg(pgid, sig)
    except OSError as e:
        if e.errno != errno.ESRCH:
            raise


def stop_group(proc: subprocess.Popen, grace_s: float, sig: int = signal.SIGTERM) -> int:
    """``sig`` to the group led by ``proc``, SIGKILL to whatever is left after ``grace_s``;
    returns ``proc``'s exit status once every member is gone (or could not be killed)."""
    pgid = proc.pid
    signal_group(pgid, sig)
    if _wait_group(proc, pgid, grace_s):
        signal_group(pgid, signal.SIGKILL)
        _wait_group(proc, pgid, KILL_WAIT_S)
    return proc.wait()


def _wait_group(proc: subprocess.Popen, pgid: int, limit_s: float) -> bool:
    """True when members are still alive after ``limit_s``."""
    deadline = time.monotonic() + limit_s
    while True:
        proc.poll()                           # reap our child so it is not a zombie member
        if not group_members(pgid):
            return False
        if time.monotonic() >= deadline:
            return True
        time.sleep(0.05)
