"""What the kernel counts itself, to check vftrace against: tracefs hist triggers.

``ExitLatency`` counts every KVM exit and its duration per vCPU thread with the kernel's
own event machinery, no BPF involved (Documentation/trace/histogram.rst, "latency"
example): a hist on ``kvm:kvm_exit`` saves the exit's timestamp per thread, the one on
``kvm:kvm_entry`` computes the latency and fires a synthetic event, whose own hist sums
it per thread.  The trace clock is set to ``mono``, the clock of bpf_ktime_get_ns().
"""
from __future__ import annotations

import re
from pathlib import Path

from tracer.model.schema import DEPTHS

TRACEFS = Path("/sys/kernel/tracing")
SYNTH = "vft_check_exit"
ENTRY_KEY = re.compile(r"\{\s*(\w+):\s*(\d+)\s*\}\s*hitcount:\s*(\d+)(.*)$")
LOG2_KEY = re.compile(r"\{\s*lat:\s*~\s*2\^(\d+)\s*\}\s*hitcount:\s*(\d+)")


def _write(path: Path, text: str, append: bool = False) -> None:
    with open(path, "a" if append else "w") as f:
        f.write(text + "\n")


def _read_hist(path: Path) -> dict[int, dict[str, int]]:
    """{key value: {"hitcount": n, <val>: sum, ...}} from a hist file."""
    out: dict[int, dict[str, int]] = {}
    for line in path.read_text().splitlines():
        m = ENTRY_KEY.match(line.strip())
        if not m:
            continue
        vals = {"hitcount": int(m.group(3))}
        for name, value in re.findall(r"(\w+):\s*(\d+)", m.group(4)):
            vals[name] = int(value)
        out[int(m.group(2))] = vals
    return out


class ExitLatency:
    """Per-thread KVM exit counts and total exit time, as the kernel's hists saw them."""

    EXIT_TRIGGER = "hist:keys=common_pid:ts0=common_timestamp"
    ENTRY_TRIGGER = (f"hist:keys=common_pid:lat=common_timestamp-$ts0:"
                     f"onmatch(kvm.kvm_exit).trace({SYNTH},common_pid,$lat)")
    SYNTH_TRIGGER = "hist:keys=tid:vals=hitcount,lat"
    LOG2_TRIGGER = "hist:keys=lat.log2:vals=hitcount"      # exits per latency octave

    def __init__(self) -> None:
        self.exit_dir = TRACEFS / "events/kvm/kvm_exit"
        self.entry_dir = TRACEFS / "events/kvm/kvm_entry"
        self.synth_dir = TRACEFS / "events/synthetic" / SYNTH
        self.old_clock = "local"

    def __enter__(self) -> "ExitLatency":
        clock = (TRACEFS / "trace_clock").read_text()
        self.old_clock = re.search(r"\[(\w+)\]", clock).group(1)
        _write(TRACEFS / "trace_clock", "mono")
        _write(TRACEFS / "synthetic_events", f"{SYNTH} int tid; u64 lat")
        _write(self.synth_dir / "trigger", self.SYNTH_TRIGGER)
        _write(self.synth_dir / "trigger", self.LOG2_TRIGGER, append=True)
        _write(self.exit_dir / "trigger", self.EXIT_TRIGGER)
        _write(self.entry_dir / "trigger", self.ENTRY_TRIGGER)
        return self

    def exits(self) -> dict[int, int]:
        """Exits begun, per thread (the kvm_exit hist's hitcount)."""
        return {tid: v["hitcount"] for tid, v in _read_hist(self.exit_dir / "hist").items()}

    def latency(self) -> dict[int, tuple[int, int]]:
        """Exits ended, per thread: (count, total ns)."""
        return {tid: (v["hitcount"], v.get("lat", 0))
                for tid, v in _read_hist(self.synth_dir / "hist").items()}

    def latency_log2(self) -> dict[int, int]:
        """Exits ended, per latency bucket: {b: count} for ns in (2^(b-1), 2^b] (the
        hist's ``.log2``: ilog2(roundup_pow_of_two(ns)))."""
        out: dict[int, int] = {}
        for line in (self.synth_dir / "hist").read_text().splitlines():
            m = LOG2_KEY.match(line.strip())
            if m:
                out[int(m.group(1))] = out.get(int(m.group(1)), 0) + int(m.group(2))
        return out

    def __exit__(self, *exc) -> None:
        # Removed in reverse order: the entry hist refers to the exit one and the
        # synthetic event; the synthetic event goes last.
        for path, trigger in ((self.entry_dir, self.ENTRY_TRIGGER),
                              (self.exit_dir, self.EXIT_TRIGGER),
                              (self.synth_dir, self.LOG2_TRIGGER),
                              (self.synth_dir, self.SYNTH_TRIGGER)):
            try:
                _write(path / "trigger", "!" + trigger)
            except OSError:
                pass
        try:
            _write(TRACEFS / "synthetic_events", f"!{SYNTH}", append=True)
        except OSError:
            pass
        _write(TRACEFS / "trace_clock", self.old_clock)


# --- what the kernel has attached: its own lists, not vftrace's ---------------------------

KPROBE_LIST = Path("/sys/kernel/debug/kprobes/list")
ENABLED_FUNCTIONS = TRACEFS / "enabled_functions"
BPF_PROG_GET_NEXT_ID, BPF_PROG_GET_FD_BY_ID = 11, 13
PROG_TYPES = {2: "kprobe", 5: "tracepoint", 17: "raw_tracepoint", 26: "tracing"}


def hooked_functions() -> dict[str, set[str]]:
    """Every kernel function something is hooked to, by how: ``kprobe``/``kretprobe``
    (the kprobes debugfs list, perf-PMU kprobes included) and ``ftrace`` (functions with
    an ftrace hook: fentry/fexit trampolines and ftrace-based kprobes alike)."""
    out: dict[str, set[str]] = {"kprobe": set(), "kretprobe": set(), "ftrace": set()}
    for line in KPROBE_LIST.read_text().splitlines():
        parts = line.split()         # ADDRESS  k|r  SYMBOL+OFFSET  [FLAGS...]
        if len(parts) >= 3 and parts[1] in ("k", "r"):
            out["kprobe" if parts[1] == "k" else "kretprobe"].add(parts[2].split("+")[0])
    for line in ENABLED_FUNCTIONS.read_text().splitlines():
        if line and not line[0].isspace():
            out["ftrace"].add(line.split()[0])
    return out


def bpf_programs() -> dict[int, str]:
    """Every BPF program loaded in the kernel: id -> type (BPF_PROG_GET_NEXT_ID)."""
    import ctypes
    import os

    from tracer.kernel import proginfo

    nr = proginfo.SYS_BPF[os.uname().machine]
    libc = ctypes.CDLL(None, use_errno=True)
    out, prog_id = {}, 0
    while True:
        attr = (ctypes.c_uint32 * 4)(prog_id, 0, 0, 0)     # start_id, next_id, open_flags
        if libc.syscall(nr, BPF_PROG_GET_NEXT_ID, attr, ctypes.sizeof(attr)) != 0:
            return out                                       # ENOENT: the last one
        prog_id = attr[1]
        fd_attr = (ctypes.c_uint32 * 4)(prog_id, 0, 0, 0)   # prog_id, next_id, open_flags
        fd = libc.syscall(nr, BPF_PROG_GET_FD_BY_ID, fd_attr, ctypes.sizeof(fd_attr))
        if fd < 0:
            continue                                         # unloaded meanwhile
        try:
            info = proginfo.BpfProgInfo()
            info_attr = proginfo._InfoAttr(fd, ctypes.sizeof(info), ctypes.addressof(info))
            if libc.syscall(nr, proginfo.BPF_OBJ_GET_INFO_BY_FD, ctypes.byref(info_attr),
                            ctypes.sizeof(info_attr)) == 0:
                out[prog_id] = PROG_TYPES.get(info.type, str(info.type))
        finally:
            os.close(fd)


# What each --depth adds, written out here rather than taken from vftrace's planner.
# (functions timed with fentry/fexit, with a kprobe+kretprobe, counted with a kprobe)
ADDS = {
    "window": ((), (), ()),
    "iommu": (("iommu_map", "iommu_unmap", "iommu_unmap_fast"), (), ()),
    "mmu": (("intel_iommu_tlb_sync", "unmap_mapping_range"),
            ("kvm_mmu_notifier_invalidate_range_start",), ()),
    "guests": ((), ("vfio_iommu_type1_ioctl",), ("kvm_vcpu_kick", "kvm_make_all_cpus_request")),
}
# Tracepoint programs: pf_sched's begin/end; at guests also vf_access_wait, kvm_exit,
# kvm_entry and sched_process_exit (a vCPU thread that dies mid-exit).
TRACEPOINT_PROGRAMS = {"window": 2, "iommu": 2, "mmu": 2, "guests": 6}


def expected_hooks(depth: str, present: set[str]) -> dict[str, set[str]]:
    fentry, timed, counted = set(), set(), set()
    for d in DEPTHS[:DEPTHS.index(depth) + 1]:
        f, t, c = ADDS[d]
        fentry |= set(f)
        timed |= set(t)
        counted |= set(c)
    fentry, timed, counted = fentry & present, timed & present, counted & present
    return {"kprobe": timed | counted, "kretprobe": timed,
            "ftrace": fentry | timed | counted}         # kprobes at an entry use ftrace


class Attached:
    """What was hooked and loaded since it was made, against what a depth should add."""

    def __init__(self) -> None:
        self.hooked = hooked_functions()
        self.programs = bpf_programs()

    def check(self, depth: str) -> str:
        """Asserts the kernel's lists gained exactly ``depth``'s hooks; what they gained."""
        with open(TRACEFS / "available_filter_functions") as f:
            present = {line.split()[0] for line in f}
        assert {"kvm_vcpu_kick", "iommu_map"} <= present, "the lab loads kvm, has an IOMMU"
        gained = {kind: names - self.hooked[kind] for kind, names in hooked_functions().items()}
        new = [t for i, t in bpf_programs().items() if i not in self.programs]
        assert gained == expected_hooks(depth, present), (depth, gained)
        tracepoints = sum(t in ("tracepoint", "raw_tracepoint") for t in new)
        assert tracepoints == TRACEPOINT_PROGRAMS[depth], (depth, new)
        return (f"hooked {sorted(gained['ftrace'])}, kprobes {sorted(gained['kprobe'])}, "
                f"{tracepoints} tracepoint programs")
