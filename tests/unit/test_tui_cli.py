"""``vftrace live`` / ``vftrace replay`` on bad input: exit 2, one line, no traceback."""
from __future__ import annotations

import os
import shutil

import pytest

from tests.unit.tui_support import DATA, SMALL
from tracer.cli import main
from tui.cli import parse_speed


def run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


def assert_one_line_error(code: int, err: str, says: str, command: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"vftrace {command}: error: ") and says in lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("argv, says", [
    (["replay", "nonexistent.csv"], "nonexistent.csv: no such file"),
    (["replay", str(DATA)], "is a directory"),
    (["replay", str(DATA / "small.meta.json")], "that is the metadata"),
    (["replay", str(DATA / "README.md")], "not a capture"),
    (["replay", str(SMALL), "--speed", "fast"], "--speed fast: give a factor"),
    (["replay", str(SMALL), "--speed", "-2"], "--speed -2: give a factor"),
    (["replay", str(SMALL), "--speed", "nan"], "--speed nan"),
    (["replay", str(SMALL), "--budget-ns", "0"], "--budget-ns 0: must be positive"),
    (["replay", str(SMALL), "--budget-ns", "lots"], "invalid int value: 'lots'"),
    (["replay", str(SMALL), "--pf", "a"], "--pf 'a': give integers"),
    (["replay", "--follow", str(SMALL), "--speed", "2"], "--speed paces a finished capture"),
    (["replay", "--follow", "/nonexistent-dir/cap.csv"], "does not exist"),
    (["replay", str(SMALL)], "needs a terminal"),             # pytest's stdin is no TTY
    (["replay", "--follow", str(SMALL)], "needs a terminal"),
    (["replay"], "required: file"),
    (["live", "--budget-ns", "-5"], "--budget-ns -5: must be positive"),
    (["live", "--csv", "/nonexistent-dir/c.csv"], "--csv /nonexistent-dir/c.csv: directory"),
    (["live", "bogus"], "unexpected argument 'bogus'"),
    (["live", "-d", "0"], "--duration 0.0: must be positive"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, says):
    code, err = run(capsys, *argv)
    assert_one_line_error(code, err, says, argv[0])


def test_an_unreadable_capture_is_one_line(capsys, tmp_path, monkeypatch):
    """An open() that fails (permissions for a user; root cannot be locked out of a
    file, so the failure is injected) is one line naming the file."""
    path = tmp_path / "locked.csv"
    shutil.copy(SMALL, path)
    real_open = open

    def refuse(file, *args, **kwargs):
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", refuse)
    code, err = run(capsys, "replay", str(path))
    assert_one_line_error(code, err, "locked.csv", "replay")


def test_a_directory_is_not_a_capture(capsys, tmp_path):
    (tmp_path / "dir.csv").mkdir()
    code, err = run(capsys, "replay", str(tmp_path / "dir.csv"))
    assert_one_line_error(code, err, "is a directory", "replay")


def test_live_without_root_says_what_record_says(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    code, live_err = run(capsys, "live")
    assert_one_line_error(code, live_err, "needs root", "live")
    code, record_err = run(capsys, "record", "-o", str(tmp_path / "c.csv"))
    assert live_err.split(": error: ")[1] == record_err.split(": error: ")[1]


def test_help_lists_both_commands_with_examples(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "live" in out and "replay" in out
    for command in ("live", "replay"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = capsys.readouterr().out
        assert "examples:" in out and "q quit" in out


@pytest.mark.parametrize("text, speed", [("1", 1.0), ("0.5", 0.5), ("max", 0.0),
                                         ("MAX", 0.0), ("0", 0.0), ("10", 10.0)])
def test_speeds(text, speed):
    assert parse_speed(text) == speed
