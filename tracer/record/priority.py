"""--nice N: vftrace's own threads at another priority, its ``-- CMD`` workload not.

Linux keeps a nice value per thread: setpriority(PRIO_PROCESS, tid) changes one thread
(so ``renice -p PID`` reaches only the main thread), and a new thread or child process
starts with its creator's.  So every thread there is gets the value once, the threads
started later inherit it, and the workload is forked from a short-lived thread set back
to the caller's value, so it competes with the rest of the host as it would have.

Why a recorder needs it: on a host whose CPUs the switching threads and the guests keep
busy, the reader gets only its fair share of them and the rings overflow in bursts (the
10-minute 6.12 lab soak: 144 of 1,462,630 switches lost at nice 0, none of 1,531,161 at
-10; README, "Lost records").
"""
from __future__ import annotations

import os
import threading
from typing import Callable, TypeVar

from ..errors import VftraceError

NICE_MIN, NICE_MAX = -20, 19
T = TypeVar("T")


class PriorityError(VftraceError):
    """A one-line reason the priority could not be set."""


def check_nice(nice: int | None) -> int | None:
    if nice is not None and not NICE_MIN <= nice <= NICE_MAX:
        raise PriorityError(f"--nice {nice}: give {NICE_MIN} (first) to {NICE_MAX} (last)")
    return nice


def thread_nice() -> int:
    """The calling thread's nice value (who=0 is the calling thread on Linux)."""
    return os.getpriority(os.PRIO_PROCESS, 0)


def _set_thread(tid: int, nice: int) -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, tid, nice)
    except PermissionError:
        raise PriorityError(f"--nice {nice}: not permitted; a value below the current one "
                            "needs root or CAP_SYS_NICE") from None


def set_process_nice(nice: int) -> int:
    """Every thread of this process at ``nice``; returns the calling thread's value before."""
    before = thread_nice()
    for tid in os.listdir("/proc/self/task"):
        try:
            _set_thread(int(tid), nice)
        except ProcessLookupError:            # a thread that ended meanwhile
            pass
    return before


def call_at_nice(nice: int, fn: Callable[[], T]) -> T:
    """``fn()`` on a thread of its own at ``nice``: a process it forks starts at that value
    while the rest of this process keeps its own."""
    out: dict = {}

    def run() -> None:
        try:
            _set_thread(0, nice)
            out["value"] = fn()
        except BaseException as e:            # re-raised in the caller's thread
            out["error"] = e

    t = threading.Thread(target=run, name="vftrace-spawn")
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]
