"""Capture files, the only code that reads or writes them: ``files`` (the CSV of switches,
its ``.meta.json`` and the per-call CSV) and ``output`` (any file vftrace writes for the
user: checked first, never written through a symlink, replaced whole).  Imports only
``tracer.model``."""
