"""Shared by the dashboard's tests (no tests here): a fed source, waiting helpers, table reads."""
from __future__ import annotations

import asyncio
import functools
import queue
import time
from pathlib import Path

from tracer.capture.files import read_capture
from tui.sources import Batch, HeaderInfo

DATA = Path(__file__).resolve().parents[1] / "data"
SMALL = DATA / "small.csv"
SIZE = (120, 40)


def run_async(test):
    """Run an ``async def`` test in its own event loop (no asyncio pytest plugin needed)."""
    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        return asyncio.run(test(*args, **kwargs))
    return wrapper


class FedSource:
    """A Source whose batches the test pushes (``feed``); records ``stop`` calls."""

    description = "fed by the test"

    def __init__(self, meta: dict | None = None) -> None:
        self.meta = meta if meta is not None else read_capture(SMALL)[0]
        self.batches: queue.Queue[Batch] = queue.Queue()
        self.stopped: list[str] = []

    def start(self) -> HeaderInfo:
        return HeaderInfo.from_meta(self.meta, self.description)

    def feed(self, batch: Batch) -> None:
        self.batches.put(batch)

    def read(self, timeout: float) -> Batch:
        try:
            return self.batches.get(timeout=timeout)
        except queue.Empty:
            return Batch()

    def stop(self, reason: str) -> None:
        self.stopped.append(reason)


class FrozenClock:
    """The injected clock: only the test moves it."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def wait_for(pilot, condition, what: str, limit_s: float = 30.0) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.02)


async def caught_up(pilot, app) -> None:
    """The source finished, every batch folded, the screen redrawn from the model."""
    await wait_for(pilot, lambda: app.model.finished and app.reader_done.is_set(),
                   "the source to finish")
    await pilot.pause()
    app.refresh_view()
    await pilot.pause()


def table_rows(app, table_id: str) -> list[list[str]]:
    table = app.w(table_id)
    if table_id in ("switches", "groups"):          # text, not a DataTable
        return [list(r) for r in table.rows]
    return [[str(getattr(c, "plain", c)) for c in table.get_row_at(i)]
            for i in range(table.row_count)]


def group_counts(app) -> dict[str, int]:
    return {row[0]: int(row[1]) for row in table_rows(app, "groups")}
