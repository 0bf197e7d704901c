"""Recording: one ``session`` (plan the probes, arm the engine, write the capture, stop
cleanly) behind both ``vftrace record`` (``headless``, with the end-of-run ``summary``) and
the dashboard's live source; ``instances`` notices other recorders, ``calibrate`` measures
the tracer's own floor and probe costs (``costs_file`` keeps those measured on real
switches for ``--costs``).  Imports ``tracer.model``, ``tracer.capture``, ``tracer.kernel`` and
``tracer.pfsched``."""
