"""The dashboard's keys, declared once.

The app's bindings (and so its footer), the help screen, the command palette and the
``live``/``replay`` epilogs are all made from ``KEYS``; README.md's "Keys:" sentence is
checked against it (tests/unit/test_tui_keys.py).  No Textual here: ``vftrace --help``
reads it too.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Key:
    keys: tuple[str, ...]     # Textual key names; the first is the one shown in the footer
    action: str               # the app's action_<action>
    label: str                # the footer's word (and, lower-cased, the epilogs')
    title: str                # the command palette's entry
    description: str          # the help screen's line (and the palette entry's help)
    shown: tuple[str, ...] = ()   # how the keys read, where their names are not it

    @property
    def displays(self) -> tuple[str, ...]:
        return self.shown or self.keys


KEYS: tuple[Key, ...] = (
    Key(("p",), "toggle_pause", "Pause", "Pause / resume",
        "pause / resume the display (records keep being counted)"),
    Key(("r",), "reset", "Reset", "Reset statistics",
        "reset the statistics (and the records kept for export)"),
    Key(("e",), "export", "Export", "Export capture",
        "export what the dashboard holds to a capture CSV (+ .meta.json)"),
    Key(("f",), "filter", "Filter", "Filter PF/VF",
        "filter: only some PFs / VFs (rebuilt from the kept records)"),
    Key(("b",), "budget", "Budget", "Set budget",
        "set the switch budget (over-budget shares are recomputed)"),
    Key(("s",), "sort", "Sort", "Sort table",
        "sort the per-PF / per-VF table by the next column"),
    Key(("q",), "quit", "Quit", "Quit",
        "quit (live: stops the workload, detaches the probes, closes the capture)"),
    Key(("question_mark", "f1"), "help", "Help", "Help", "this help", shown=("?", "F1")),
)

# Textual's own: the command palette (the app sets COMMAND_PALETTE_BINDING from it)
PALETTE_KEY = "ctrl+p"
PALETTE_DESCRIPTION = "command palette (every action above, by name)"

HELP_KEY_WIDTH = 9          # the help screen's key column


def by_action(action: str) -> Key:
    return next(k for k in KEYS if k.action == action)


def bindings() -> list[tuple[str, str, str, str | None, bool]]:
    """(key, action, label, key_display, show) for textual.binding.Binding: a key's
    first name in the footer, the others bound but not shown."""
    out = []
    for k in KEYS:
        for i, (name, display) in enumerate(zip(k.keys, k.displays)):
            out.append((name, k.action, k.label, display if display != name else None, i == 0))
    return out


def help_lines() -> list[str]:
    """The help screen's key list (Rich markup): the first name in bold."""
    def line(names: tuple[str, ...], text: str) -> str:
        first, *others = names
        plain = " / ".join(names)
        pad = " " * max(1, HELP_KEY_WIDTH - len(plain))
        return f"  [b]{first}[/b]{''.join(' / ' + o for o in others)}{pad}{text}"
    return ([line(k.displays, k.description) for k in KEYS]
            + [line((PALETTE_KEY,), PALETTE_DESCRIPTION)])


def close_help_keys() -> tuple[str, ...]:
    """What closes the help screen: escape, and the keys of quit and of help itself."""
    return ("escape", *by_action("quit").keys, *by_action("help").keys)


def close_help_hint() -> str:
    """``escape, q or ? closes this screen``."""
    names = ["escape", by_action("quit").displays[0], by_action("help").displays[0]]
    return f"{', '.join(names[:-1])} or {names[-1]} closes this screen"


def epilog_line() -> str:
    """``keys: p pause, r reset, ...`` for the ``live`` and ``replay`` help."""
    return "keys: " + ", ".join(f"{k.displays[0]} {k.label.lower()}" for k in KEYS)
