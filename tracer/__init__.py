"""vftrace: live BPF timing of SR-IOV VF time-slicing switches."""

__version__ = "0.1.0"
