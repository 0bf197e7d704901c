"""A short flag means one thing: across every vftrace subcommand (and the lab's own
scripts), each short flag stands for one long option."""
from __future__ import annotations

import argparse
from collections import defaultdict

import pytest

from tracer import cli
from tracer.lab import experiment
from tracer.lab.workloads import guests

# The house table: short flag -> long option, wherever it appears.
SHORT_FLAGS = {
    "-h": "--help", "-V": "--version",
    "-b": "--budget-ns", "-B": "--buffer-pages", "-c": "--calls", "-C": "--capture",
    "-d": "--duration",
    "-D": "--depth",
    "-F": "--follow", "-i": "--interval", "-j": "--json", "-k": "--kernel", "-l": "--label",
    "-m": "--probe-mode", "-M": "--mode", "-n": "--pfs", "-o": "--output", "-p": "--pid",
    "-P": "--pf-sched", "-q": "--quiet", "-r": "--record", "-s": "--switch", "-S": "--switches",
    "-t": "--timeout", "-x": "--speed",
}


def parsers() -> dict[str, argparse.ArgumentParser]:
    """Every parser by its prog: vftrace, its subcommands, the lab's scripts."""
    found: dict[str, argparse.ArgumentParser] = {}

    def walk(p: argparse.ArgumentParser) -> None:
        found[p.prog] = p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    walk(sub)

    for root in (cli.build_parser(), guests.build_parser(), experiment.build_parser()):
        walk(root)
    return found


def short_to_long() -> dict[str, dict[str, set[str]]]:
    """short flag -> long option -> the parsers where it means that."""
    table: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for prog, p in parsers().items():
        for action in p._actions:
            shorts = [o for o in action.option_strings if not o.startswith("--")]
            longs = [o for o in action.option_strings if o.startswith("--")]
            for s in shorts:
                assert longs, f"{prog}: {s} has no long name"
                table[s][longs[0]].add(prog)
    return table


def test_every_parser_is_seen():
    progs = set(parsers())
    for command in ("doctor", "lab", "pf-sched", "record", "live", "replay", "report",
                    "export", "calibrate"):
        assert f"vftrace {command}" in progs
    assert {"python -m tracer.lab.workloads.guests", "python -m tracer.lab.experiment run",
            "python -m tracer.lab.experiment compare"} <= progs


def test_each_short_flag_means_one_long_option_in_every_subcommand():
    clashes = {s: {long: sorted(progs) for long, progs in longs.items()}
               for s, longs in short_to_long().items() if len(longs) > 1}
    assert not clashes, clashes


def test_the_short_flags_are_the_house_table():
    used = {s: next(iter(longs)) for s, longs in short_to_long().items()}
    assert used == SHORT_FLAGS, "a new short flag: add it to SHORT_FLAGS (one meaning)"


def test_live_takes_its_capture_as_record_does():
    p = cli.build_parser()
    assert p.parse_args(["live", "-o", "cap.csv"]).output == "cap.csv"
    assert p.parse_args(["record", "-o", "cap.csv"]).output == "cap.csv"
    old = p.parse_args(["live", "--csv", "cap.csv"])             # the old name still works
    assert old.csv == "cap.csv" and old.output is None
    live = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    help_text = live.choices["live"].format_help()
    assert "-o FILE, --output FILE" in help_text and "--csv" not in help_text


@pytest.mark.parametrize("argv, says", [
    (["live", "-o", "a.csv", "--csv", "b.csv"], "--csv is -o/--output's old name"),
    (["live", "-o", "no/dir/x.csv"], "-o/--output no/dir/x.csv: directory no/dir does not exist"),
    (["live", "-o", "x.csv", "--calls", "x.csv"], "--calls x.csv: is the capture's file "
                                                  "(-o/--output x.csv)"),
    (["live", "-o", "x.meta.json"], "-o/--output x.meta.json: that name is for a capture's "
                                    "metadata"),
    (["live", "--csv", "no/dir/x.csv"], "--csv no/dir/x.csv: directory no/dir does not exist"),
])
def test_live_checks_its_capture_under_the_name_given(argv, says, capsys, tmp_path,
                                                      monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("vftrace live: error: ") and says in err, err
