"""One error root: every refusal is a VftraceError, and ``tracer.cli.main`` reports any
of them, from any subcommand, the same way: ``vftrace CMD: error: <message>``, exit 2."""
from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest

from tracer import cli
from tracer.capture.files import CaptureError, CaptureWriteError
from tracer.capture.output import OutputError
from tracer.errors import UsageError, VftraceError
from tracer.kernel.probes import ProbeError
from tracer.lab import LabError
from tracer.lab.experiment import ExperimentError
from tracer.lab.workloads import guests
from tracer.metrics.server import MetricsError
from tracer.pfsched import control
from tracer.record.session import RecordError

REPO = Path(__file__).resolve().parents[2]
MODULES = sorted(".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
                 for p in [*REPO.glob("tracer/**/*.py"), *REPO.glob("tui/**/*.py")])


def test_every_exception_vftrace_defines_is_a_vftrace_error_or_the_systems():
    """A new error class joins the tree: a VftraceError (one line, exit 2) or, for what
    the system refuses, an OSError; only private control-flow classes (``_Stop``) are
    neither."""
    strays = []
    for name in MODULES:
        module = importlib.import_module(name)
        for attr, obj in vars(module).items():
            if (inspect.isclass(obj) and issubclass(obj, BaseException)
                    and obj.__module__ == name and not attr.startswith("_")
                    and not issubclass(obj, (VftraceError, OSError))):
                strays.append(f"{name}.{attr}")
    assert not strays, f"not VftraceErrors: {strays}"


@pytest.mark.parametrize("error", [UsageError, CaptureError, CaptureWriteError, OutputError,
                                   ProbeError, RecordError, control.GuestError, LabError,
                                   ExperimentError, guests.GuestError, MetricsError])
def test_each_part_keeps_its_own_name_under_the_one_root(error):
    assert issubclass(error, VftraceError)


def test_the_narrower_names_still_catch_what_they_caught():
    assert issubclass(ExperimentError, LabError)
    assert issubclass(CaptureWriteError, CaptureError) and issubclass(CaptureWriteError, OSError)


# argv that parses for every subcommand: main then runs its handler
ARGV = {"doctor": ["doctor"], "lab": ["lab"], "pf-sched": ["pf-sched", "status"],
        "record": ["record"], "serve": ["serve"], "live": ["live"], "replay": ["replay", "x.csv"],
        "report": ["report", "x.csv"], "export": ["export", "x.csv"],
        "calibrate": ["calibrate"]}
ERRORS = [CaptureError, OutputError, ProbeError, RecordError, control.GuestError, LabError,
          ExperimentError, VftraceError]


def subcommands() -> list[str]:
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    return list(sub.choices)


def test_the_table_covers_every_subcommand():
    assert sorted(ARGV) == sorted(subcommands())


@pytest.mark.parametrize("command", sorted(ARGV))
def test_any_vftrace_error_of_any_subcommand_is_one_line_exit_2(command, monkeypatch, capsys):
    args = cli.build_parser().parse_args(ARGV[command])
    module, _, function = args.handler.partition(":")
    for error in ERRORS:
        def refuse(_args, error=error):
            raise error(f"{error.__name__} says no")
        monkeypatch.setattr(importlib.import_module(module), function, refuse)
        assert cli.main(ARGV[command]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err == f"vftrace {command}: error: {error.__name__} says no\n"


def test_a_bad_command_line_is_reported_under_the_parser_that_refused_it(capsys):
    assert cli.main(["record", "--budget-ns", "many"]) == 2
    assert capsys.readouterr().err == ("vftrace record: error: argument -b/--budget-ns: "
                                       "invalid int value: 'many' (see vftrace record --help)\n")
    assert cli.main([]) == 2
    assert capsys.readouterr().err.startswith("vftrace: error: the following arguments are "
                                              "required: COMMAND")


def test_what_the_system_refuses_is_one_line_too(monkeypatch, capsys):
    def refuse(_args):
        raise PermissionError(13, "Permission denied", "/sys/module/pf_sched/parameters/slice_us")
    monkeypatch.setattr(control, "main", refuse)
    assert cli.main(["pf-sched", "status"]) == 2
    assert capsys.readouterr().err == ("vftrace pf-sched: error: Permission denied: "
                                       "/sys/module/pf_sched/parameters/slice_us\n")
