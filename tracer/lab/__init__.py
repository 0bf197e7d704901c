"""The lab: the whole stack in a VM with an emulated VT-d IOMMU (``vm``, ``vftrace lab``),
pf_sched and KVM guests on its VFs, and the experiment comparing BAR modes; the guests
and VFIO workloads are in ``workloads``.  It runs the recorder, so it may import any part
of ``tracer``."""
from ..errors import VftraceError


class LabError(VftraceError):
    """A one-line, user-facing reason the lab cannot run."""
