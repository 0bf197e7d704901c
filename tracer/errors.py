"""The one error type every subcommand reports as a single line with exit status 2."""


class VftraceError(Exception):
    """Bad input or an impossible request: ``vftrace CMD: error: <message>``, exit 2.

    Subcommands raise it (or a subclass) with a message that names the problem and, where
    there is one, the fix; ``tracer.cli.main`` prints it without a traceback.
    """
