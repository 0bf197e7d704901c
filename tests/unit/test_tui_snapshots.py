"""Snapshot tests of the dashboard at a pinned size, from the shipped small capture.

What pytest-textual-snapshot's ``snap_compare`` does, done here with Textual's own
``export_screenshot``: pytest-textual-snapshot 1.1.0 pins syrupy 4.8.0, which refuses
pytest >= 9 (the project's pytest is 9.2), so it cannot be installed beside it.  The SVGs
live where that plugin keeps them (``__snapshots__/<module>/<test>.svg``) and are
normalised the same way (Rich's per-export id removed).

Update after an intended change:  VFTRACE_UPDATE_SNAPSHOTS=1 pytest tests/unit/test_tui_snapshots.py
and look at the new SVGs (a browser shows them) before committing them.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from tests.unit.tui_support import SIZE, SMALL, FrozenClock, caught_up, run_async
from tui.app import VftraceApp
from tui.sources import ReplaySource

SNAPSHOTS = Path(__file__).parent / "__snapshots__" / Path(__file__).stem
UPDATE = os.environ.get("VFTRACE_UPDATE_SNAPSHOTS") == "1"


def normalize_svg(svg: str) -> str:
    """Rich names its CSS classes ``terminal-<random id>-...``; the id is not content."""
    return re.sub(r"\bterminal-\d+-([\w-]+)", r"terminal-\1", svg)


def assert_snapshot(name: str, svg: str, tmp_path: Path) -> None:
    expected_path = SNAPSHOTS / f"{name}.svg"
    actual = normalize_svg(svg)
    if UPDATE:
        expected_path.parent.mkdir(parents=True, exist_ok=True)
        expected_path.write_text(actual)
        return
    assert expected_path.exists(), (f"no snapshot {expected_path}: create it with "
                                    "VFTRACE_UPDATE_SNAPSHOTS=1 and check it by eye")
    if normalize_svg(expected_path.read_text()) != actual:
        (tmp_path / f"{name}.svg").write_text(actual)
        raise AssertionError(f"the screen differs from {expected_path}; this run's screen "
                             f"is {tmp_path / f'{name}.svg'} (open both in a browser)")


async def settled_screenshot(pilot, app, redraw: bool = True) -> str:
    """The screen once two screenshots in a row agree (a slow machine may still be
    laying out or folding the last batch when the first one is taken)."""
    previous = None
    for _ in range(20):
        if redraw:
            app.refresh_view()
        await pilot.pause(0.05)
        current = app.export_screenshot()
        if previous is not None and normalize_svg(current) == normalize_svg(previous):
            return current
        previous = current
    return previous


async def screenshot_after_replay(*keys: str) -> str:
    app = VftraceApp(ReplaySource(SMALL, 0), clock=FrozenClock())
    async with app.run_test(size=SIZE) as pilot:
        await caught_up(pilot, app)
        for key in keys:
            await pilot.press(key)
            await pilot.pause()
        await pilot.pause()
        await pilot.wait_for_scheduled_animations()
        return await settled_screenshot(pilot, app, redraw=not keys)


@run_async
async def test_main_screen_after_replaying_the_small_capture(tmp_path):
    assert_snapshot("main_screen", await screenshot_after_replay(), tmp_path)


@run_async
async def test_help_screen(tmp_path):
    assert_snapshot("help_screen", await screenshot_after_replay("question_mark"), tmp_path)


@run_async
async def test_main_screen_sorted_by_p99_and_filtered_to_pf0(tmp_path):
    # p99 sort and a PF filter change which rows show and their order.
    app = VftraceApp(ReplaySource(SMALL, 0), clock=FrozenClock(), pfs={0})
    async with app.run_test(size=SIZE) as pilot:
        await caught_up(pilot, app)
        app.model.sort_by("p99")
        svg = await settled_screenshot(pilot, app)
    assert_snapshot("main_screen_pf0_by_p99", svg, tmp_path)
