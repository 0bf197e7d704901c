"""The dashboard's stall watchdog writes every thread's stack once per stall, and logs
a thread that dies of an exception (a dead Textual output thread freezes the screen)."""
from __future__ import annotations

import threading
import time

import pytest

from tui.watchdog import StallWatchdog


def wait_for(predicate, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def stalls(dump) -> int:
    return dump.read_text().count("UI tick stalled") if dump.exists() else 0


def test_a_stall_dumps_every_threads_stack_once_and_a_beat_rearms_it(tmp_path):
    dump = tmp_path / "stall.txt"
    dog = StallWatchdog(str(dump), stall_s=0.2)
    dog.start()
    try:
        time.sleep(0.6)
        assert stalls(dump) == 0                       # armed by the first beat only
        dog.beat()
        assert wait_for(lambda: stalls(dump) == 1)     # then no beat: a stall
        time.sleep(0.5)
        assert stalls(dump) == 1                       # written once per stall
        text = dump.read_text()
        assert "vftrace-stall-watchdog" in text and "Thread 0x" in text
        assert "task " in text                         # the kernel's view of each thread
        dog.beat()                                     # re-armed: the next stall is told
        assert wait_for(lambda: stalls(dump) == 2)
    finally:
        dog.stop()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_thread_dying_of_an_exception_is_logged_with_its_traceback(tmp_path):
    dump = tmp_path / "stall.txt"
    dog = StallWatchdog(str(dump), stall_s=60)
    dog.start()
    try:
        def boom():
            raise BlockingIOError(11, "Resource temporarily unavailable")
        t = threading.Thread(target=boom, name="textual-output")
        t.start()
        t.join()
    finally:
        dog.stop()
    text = dump.read_text()
    assert "thread 'textual-output' died" in text and "BlockingIOError" in text
    assert threading.excepthook is not dog._thread_died
