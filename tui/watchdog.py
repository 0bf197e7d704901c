"""A stall detector for the dashboard's UI thread, for finding freezes in the field.

With ``VFTRACE_STALL_DUMP=FILE`` set, a daemon thread watches the App's frames: the App
beats when it draws (or has nothing to draw).  When no beat came for ``stall_s`` seconds
-- the UI thread is stuck, or the terminal has stopped taking frames -- it appends to FILE
the stacks of every thread (``faulthandler``), which threads are alive, and on Linux each
thread's kernel wait channel and the serial ports' counters, once per stall.  Any thread that
dies of an exception (Textual's output thread, the source reader, the pump) is logged
there too, with its traceback: a dead output thread freezes Textual without a word.
"""
from __future__ import annotations

import faulthandler
import os
import threading
import time
import traceback

ENV = "VFTRACE_STALL_DUMP"


class StallWatchdog:
    def __init__(self, path: str, stall_s: float = 5.0,
                 clock=time.monotonic) -> None:
        self.path, self.stall_s, self.clock = path, stall_s, clock
        self._last: float | None = None      # armed by the first beat: the App's start-up
        self._stop = threading.Event()
        self._stalled = False
        self._previous_hook = threading.excepthook
        self._thread = threading.Thread(target=self._watch, name="vftrace-stall-watchdog",
                                        daemon=True)

    @classmethod
    def from_env(cls) -> StallWatchdog | None:
        path = os.environ.get(ENV)
        return cls(path) if path else None

    def start(self) -> None:
        threading.excepthook = self._thread_died
        self._thread.start()

    def beat(self) -> None:
        self._last = self.clock()

    def stop(self) -> None:
        self._stop.set()
        threading.excepthook = self._previous_hook

    def _write(self, text: str, stacks: bool = False) -> None:
        with open(self.path, "a") as f:
            f.write(text)
            if stacks:
                f.flush()
                faulthandler.dump_traceback(f, all_threads=True)
            f.write("\n")

    def _thread_died(self, args) -> None:
        name = args.thread.name if args.thread is not None else "?"
        tb = "".join(traceback.format_exception(args.exc_type, args.exc_value,
                                                args.exc_traceback))
        self._write(f"thread {name!r} died at {time.strftime('%H:%M:%S')}:\n{tb}")
        self._previous_hook(args)

    def _watch(self) -> None:
        while not self._stop.wait(self.stall_s / 5):
            if self._last is None:             # not drawing yet: mounting under TCG took
                continue                       # over 5 s (a false stall in a CI run)
            idle = self.clock() - self._last
            if idle < self.stall_s:
                self._stalled = False
                continue
            if self._stalled:
                continue
            self._stalled = True
            alive = ", ".join(sorted(t.name for t in threading.enumerate()))
            self._write(f"UI tick stalled for {idle:.1f} s at {time.strftime('%H:%M:%S')}; "
                        f"threads alive: {alive}\n{kernel_view()}", stacks=True)


def kernel_view() -> str:
    """Where each of our threads waits in the kernel, and the serial ports' tx/rx counts
    (the lab's console is an emulated 16550): best effort, Linux only."""
    lines = []
    try:
        tids = sorted(os.listdir("/proc/self/task"), key=int)
    except OSError:
        return ""
    for tid in tids:
        base = f"/proc/self/task/{tid}"
        parts = []
        for name in ("comm", "wchan", "stack"):
            try:
                with open(f"{base}/{name}") as f:
                    parts.append(f.read().strip().replace("\n", " | "))
            except OSError:
                pass
        lines.append(f"  task {tid}: " + "  ".join(parts))
    for path in ("/proc/tty/driver/serial",):
        try:
            with open(path) as f:
                lines.append(f"{path}:\n" + f.read().strip())
        except OSError:
            pass
    try:
        with open("/proc/interrupts") as f:
            lines += [ln.rstrip() for ln in f if "ttyS" in ln or "serial" in ln]
    except OSError:
        pass
    return "\n".join(lines) + "\n"
