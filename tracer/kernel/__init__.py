"""vftrace's side in the kernel: what this kernel offers (``features``, and ``doctor``, which
reports it), which hooks time a switch (``probes``), and the BPF program loaded and polled
(``engine``, with the record ``layout`` shared with ``bpf/`` and ``assemble``, which joins
blocked-access releases to their switches).  Imports only ``tracer.model`` (and
``tracer.paths`` for the BPF sources)."""
