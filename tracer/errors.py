"""The one error root: every refusal vftrace reports is a ``VftraceError``.

``tracer.cli.main`` catches it once, for every subcommand, and prints
``vftrace CMD: error: <message>`` with exit status 2, no traceback.  The subclasses say
which part refused, so a caller can catch just that part's refusals; each lives with the
code that raises it:

    VftraceError
      UsageError          the command line itself (argparse), tracer/errors.py
      CaptureError        reading or writing a capture, tracer/capture/files.py
        CaptureWriteError   writing failed (also an OSError: disk full, output gone)
      OutputError         a user's output file that cannot be written, tracer/capture/output.py
      ProbeError          nothing sensible can be attached, tracer/kernel/probes.py
      RecordError         recording cannot start, tracer/record/session.py
      MetricsError        the --metrics endpoint cannot be served, tracer/metrics/server.py
      GuestError          pf_sched up/down/status refused, tracer/pfsched/control.py
      LabError            the lab cannot run, tracer/lab/__init__.py
        ExperimentError     the lab's experiment failed, tracer/lab/experiment.py
      GuestError          the lab's KVM guests cannot run, tracer/lab/workloads/guests.py

What the system refuses (an ``OSError``: permissions, a full disk) is not a VftraceError;
``tracer.cli.main`` reports it as one line too.
"""


class VftraceError(Exception):
    """Bad input or an impossible request: ``vftrace CMD: error: <message>``, exit 2.

    Subcommands raise it (or a subclass) with a one-line message that names the problem
    and, where there is one, the fix; ``tracer.cli.main`` prints it without a traceback.
    """


class UsageError(VftraceError):
    """The command line does not parse: reported under the parser's own name
    (``vftrace record: error: ...``), which may not be a command that ran."""

    def __init__(self, message: str, prog: str) -> None:
        super().__init__(message)
        self.prog = prog
