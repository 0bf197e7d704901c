"""The dashboard's stall watchdog writes every thread's stack once per stall, and logs
a thread that dies of an exception (a dead Textual output thread freezes the screen)."""
from __future__ import annotations

import threading
import time

from tui.watchdog import StallWatchdog


def test_a_stall_dumps_every_threads_stack_once_and_a_beat_rearms_it(tmp_path):
    dump = tmp_path / "stall.txt"
    dog = StallWatchdog(str(dump), stall_s=0.2)
    dog.start()
    try:
        time.sleep(0.8)                      # no beat: one stall, written once
        text = dump.read_text()
        assert text.count("UI tick stalled") == 1
        assert "vftrace-stall-watchdog" in text and "Thread 0x" in text
        dog.beat()
        time.sleep(0.1)
        dog.beat()
        time.sleep(0.6)                      # a second stall after the beats
        assert dump.read_text().count("UI tick stalled") == 2
    finally:
        dog.stop()


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
