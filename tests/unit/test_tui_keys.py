"""The dashboard's keys are declared once (``tui.keys.KEYS``); the bindings, the footer,
the help screen, the command palette, the epilogs and the README all say the same."""
from __future__ import annotations

import re
from pathlib import Path

from tests.unit.tui_support import SIZE, FedSource, FrozenClock, run_async
from tui import keys
from tui.app import VftraceApp
from tui.cli import LIVE_EPILOG, REPLAY_EPILOG
from tui.widgets import HELP_TEXT, HelpScreen

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_key_has_its_action_and_one_meaning():
    names = [name for k in keys.KEYS for name in k.keys]
    assert len(names) == len(set(names)), "a key bound twice"
    for k in keys.KEYS:
        assert callable(getattr(VftraceApp, f"action_{k.action}", None)), k.action
        assert len(k.displays) == len(k.keys)


def test_the_bindings_are_the_table():
    bound = {(b.key, b.action, b.description) for b in VftraceApp.BINDINGS}
    assert bound == {(name, k.action, k.label) for k in keys.KEYS for name in k.keys}
    shown = [b.key for b in VftraceApp.BINDINGS if b.show]
    assert shown == [k.keys[0] for k in keys.KEYS]          # one footer entry per action
    assert VftraceApp.COMMAND_PALETTE_BINDING == keys.PALETTE_KEY


def test_the_help_screen_lists_every_key_and_what_it_does():
    for k in keys.KEYS:
        line = next(li for li in HELP_TEXT.splitlines() if li.endswith(k.description))
        assert re.sub(r"\[/?b\]", "", line).split()[0] == k.displays[0]
    assert keys.PALETTE_KEY in HELP_TEXT
    help_bound = {name for b in HelpScreen.BINDINGS for name in b.key.split(",")}
    assert {*keys.by_action("quit").keys, *keys.by_action("help").keys} <= help_bound


def test_the_epilogs_name_every_key():
    for epilog in (LIVE_EPILOG, REPLAY_EPILOG):
        assert epilog.splitlines()[-1] == keys.epilog_line()
    assert keys.epilog_line() == ("keys: p pause, r reset, e export, f filter, b budget, "
                                  "s sort, q quit, ? help")


def test_the_readme_names_every_key():
    sentence = re.search(r"^Keys: (.*?);", README.read_text(), re.M | re.S).group(1)
    named = re.findall(r"`([^`]+)`", sentence)
    assert named == [k.displays[0] for k in keys.KEYS]


@run_async
async def test_the_palette_offers_every_action():
    app = VftraceApp(FedSource(), clock=FrozenClock())
    async with app.run_test(size=SIZE):
        offered = list(app.get_system_commands(app.screen))
        commands = {c.title: c for c in offered}
        assert len(commands) == len(offered), "two palette entries with one title"
        for k in keys.KEYS:
            assert commands[k.title].callback == getattr(app, f"action_{k.action}")
            assert commands[k.title].help.endswith(f"({k.displays[0]})")
