"""A read-out made by the thread that owns the data, for the threads that ask for it
(the metrics tap, the live pump): no lock on the owner's path, no Prometheus import."""
from __future__ import annotations

import threading
from typing import Callable, Generic, TypeVar

WAIT_S = 2.0
T = TypeVar("T")


class OwnerRead(Generic[T]):
    """A read-out that only the data's owner may make, asked for by other threads.

    A reader's ``get`` asks and waits (up to ``wait_s``); the owner calls ``service`` at
    every turn of its loop and builds the value when asked.  ``get`` returns the value and
    whether it is this ask's answer (not the previous value: the owner was late, or its
    build failed).  After ``close`` (the owner's last build) every ``get`` returns at once.
    """

    def __init__(self, build: Callable[[], T], wait_s: float = WAIT_S) -> None:
        self.build, self.wait_s = build, wait_s
        self._cond = threading.Condition()
        self._asked = False
        self._generation = 0
        self._value: T | None = None
        self._ok = False
        self._closed = False
        self.build_errors = 0

    # -- the owner's side ---------------------------------------------------------------
    def service(self) -> None:
        """At every turn of the owner's loop: builds the value if asked."""
        if self._asked:              # a plain read: a missed turn only delays the answer
            self._publish()

    def close(self) -> None:
        """The owner stops: a last value, for good."""
        self._publish()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _publish(self) -> None:
        try:
            value, ok = self.build(), True
        except Exception:           # a read-out failed: the previous value, not fresh
            self.build_errors += 1
            value, ok = self._value, False
        with self._cond:
            self._asked = False
            self._value, self._ok = value, ok
            self._generation += 1
            self._cond.notify_all()

    # -- a reader's side ----------------------------------------------------------------
    def get(self) -> tuple[T | None, bool]:
        with self._cond:
            if self._closed:
                return self._value, self._ok
            wanted = self._generation + 1
            self._asked = True
            self._cond.wait_for(lambda: self._generation >= wanted or self._closed,
                                timeout=self.wait_s)
            return self._value, self._ok and self._generation >= wanted
