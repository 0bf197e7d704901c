"""pf_sched, the time-slicing PF driver in ``kmod/``, seen from user space: ``control``
loads and unloads it, binds the lab's edu devices to it and reports its state (``vftrace
pf-sched``); ``watch`` notices a PF that leaves while a recording runs.  Imports nothing
else of vftrace but ``tracer.paths``."""
