"""``vftrace calibrate`` (issue 7: placeholder until it lands)."""
from __future__ import annotations

COMMANDS: tuple[str, ...] = ()


def add_parsers(sub) -> None:
    pass


def run(args) -> int:
    raise NotImplementedError(args.command)
