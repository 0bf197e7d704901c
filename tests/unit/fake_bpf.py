"""What BCC's attach and detach calls leave attached, for fakes of its BPF object."""
from __future__ import annotations


class AttachTracker:
    """``attached``: ("kfunc"|"kretfunc", function) and ("kprobe"|"kretprobe", event)."""

    def __init__(self, attached=()) -> None:
        self.attached = set(attached)

    def attach_kfunc(self, fn_name):
        self.attached.add(("kfunc", fn_name.decode()))

    def attach_kretfunc(self, fn_name):
        self.attached.add(("kretfunc", fn_name.decode()))

    def detach_kfunc(self, fn_name):
        self.attached.remove(("kfunc", fn_name.decode()))

    def detach_kretfunc(self, fn_name):
        self.attached.remove(("kretfunc", fn_name.decode()))

    def attach_kprobe(self, event, fn_name):
        self.attached.add(("kprobe", event))

    def attach_kretprobe(self, event, fn_name, maxactive=0):
        self.attached.add(("kretprobe", event))

    def detach_kprobe(self, event):
        self.attached.remove(("kprobe", event))

    def detach_kretprobe(self, event):
        self.attached.remove(("kretprobe", event))
