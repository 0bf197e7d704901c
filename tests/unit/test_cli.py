"""The command line: one-line errors with a non-zero exit, never a traceback."""
from __future__ import annotations

import argparse
import re
import subprocess
import sys

import pytest

from tracer import __version__
from tracer.cli import build_parser


def vftrace(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tracer.cli", *args],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args, says", [
    ([], "required: COMMAND"),
    (["bogus"], "invalid choice: 'bogus'"),
    (["lab", "--pfs", "many"], "invalid int value: 'many'"),
    (["lab", "--pfs", "-1", "--dry-run", "--", "true"], "--pfs -1"),
    (["lab", "--memory", "lots", "--dry-run", "--", "true"], "--memory lots"),
    (["lab", "--timeout", "0", "--dry-run", "--", "true"], "--timeout 0"),
    (["lab", "--kernel", "2.6", "--dry-run", "--", "true"], "no installed kernel matches '2.6'"),
    (["lab", "--kernel", "/nonexistent/vmlinuz-9.9", "--dry-run", "--", "true"],
     "/nonexistent/vmlinuz-9.9 does not exist"),
    (["lab", "--accel", "warp"], "invalid choice: 'warp'"),
    (["doctor", "--frobnicate"], "unrecognized arguments: --frobnicate"),
])
def test_bad_input_is_one_line_and_exit_2(args, says):
    r = vftrace(*args)
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert says in lines[0]
    assert "Traceback" not in r.stderr


def subcommands() -> list[str]:
    """The subcommands the parser really has (its own and the front ends')."""
    (action,) = [a for a in build_parser()._actions
                 if isinstance(a, argparse._SubParsersAction)]
    return list(action.choices)


def test_version_and_help_name_every_subcommand():
    assert vftrace("--version").stdout.strip() == f"vftrace {__version__}"
    r = vftrace("--help")
    assert r.returncode == 0
    listed = re.findall(r"^    (\S+)  +\S", r.stdout.split("options:")[0], re.M)
    assert listed == subcommands()         # each one, with its one-line help, in order
    assert "examples:" in r.stdout


@pytest.mark.parametrize("sub", subcommands())
def test_every_subcommand_has_help_with_examples(sub):
    r = vftrace(sub, "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"usage: vftrace {sub} ")
    examples = r.stdout.split("examples:", 1)
    assert len(examples) == 2, f"vftrace {sub} --help has no examples"
    assert f"vftrace {sub}" in examples[1]


def test_a_lab_command_too_long_for_the_kernel_cmdline_is_refused():
    r = vftrace("lab", "--dry-run", "--", "echo", "x" * 2000)
    assert r.returncode == 2 and "kernel's command line" in r.stderr
