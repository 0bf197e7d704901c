"""Which hooks vftrace attaches, and how: fentry/fexit where it can, kprobes elsewhere.

Decided per hook from what the running kernel offers (functions in
``available_filter_functions``, their BTF for trampolines), then passed to the BPF C as
compile-time defines; nothing is pasted into the C source.
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from ..errors import VftraceError
from ..model.schema import DEFAULT_DEPTH, DEPTHS, HOOK_COLUMNS
from .features import BPF_F_MMAPABLE, Kernel

FENTRY, KPROBE, ABSENT = "fentry", "kprobe", "absent"
OFF = "off"                                # not hooked at this --depth (absent: not here)
MODE_DEFINE = {ABSENT: 0, OFF: 0, FENTRY: 1, KPROBE: 2}
BPF_TRACE_FENTRY = 24                      # enum bpf_attach_type
CALIB_CANDIDATES = ("security_task_getsid", "__task_pid_nr_ns")
# The cost calibration (costs.py): a near-empty function our task calls with getpgid(pid)
# (getpgid(0) skips it), and prctl's LSM hook for its windows' bookends.
COST_FUNC, COST_BOOKEND = "security_task_getpgid", "security_task_prctl"
SYNC_CANDIDATES = ("intel_iommu_tlb_sync", "amd_iommu_iotlb_sync", "arm_smmu_iotlb_sync")
# A test build: maps shrunk until they fill, windows deemed stale at once, kretprobes
# given too few instances, so that each drop counter can be made to fire (tests/lab/test_kernel_drops.py).  NAME=N,...
# of the defines below (KRETPROBE_MAXACTIVE is the attach's, not the C's).
MAP_SIZES_ENV = "VFTRACE_BPF_SIZES"
MAP_SIZE_DEFINES = ("VFT_MAX_OPEN", "VFT_TASK_SLOTS", "VFT_STARTS_MAX", "VFT_EXIT_STARTS_MAX",
                    "VFT_BG_MAX", "VFT_EXITS_MAX", "VFT_STALE_NS", "KRETPROBE_MAXACTIVE")
KRETPROBE_MAXACTIVE = 64        # instances per kretprobe: calls in flight at once


class ProbeError(VftraceError):
    """Nothing sensible can be attached: a one-line reason for the user."""


@dataclass(frozen=True)
class Hook:
    name: str                   # as reported to the user and in the capture's metadata
    define: str                 # the C define that selects its mode
    functions: tuple[str, ...]  # every one present is hooked (or the first, if pick_one)
    kprobe: str                 # kp_<kprobe> / krp_<kprobe> in vftrace.bpf.c
    fentry_ok: bool = True      # has FENTRY_PAIR variants in the C (vmlinux functions)
    timed: bool = True          # needs a return probe
    pick_one: bool = False
    why_absent: str = ""
    depth: str = "guests"       # the shallowest --depth that hooks it


HOOKS = (
    Hook("iommu_map", "MAP_MODE", ("iommu_map",), "map", depth="iommu"),
    Hook("iommu_unmap", "UNMAP_MODE", ("iommu_unmap", "iommu_unmap_fast"), "unmap",
         depth="iommu"),
    Hook("iotlb_sync", "SYNC_MODE", SYNC_CANDIDATES, "sync", pick_one=True, depth="mmu",
         why_absent="no known IOMMU driver iotlb_sync (intel/amd/arm-smmu) in this kernel"),
    Hook("mmu_zap", "ZAP_MODE", ("unmap_mapping_range",), "zap", depth="mmu"),
    Hook("mmu_notifier", "NOTIFIER_MODE", ("kvm_mmu_notifier_invalidate_range_start",),
         "notifier", fentry_ok=False, depth="mmu",
         why_absent="kvm is not loaded (modprobe kvm_intel or kvm_amd)"),
    Hook("vcpu_kick", "KICK_MODE", ("kvm_vcpu_kick", "kvm_make_all_cpus_request"), "kick",
         fentry_ok=False, timed=False, why_absent="kvm is not loaded (modprobe kvm_intel or kvm_amd)"),
    Hook("vfio_dma", "VFIO_MODE", ("vfio_iommu_type1_ioctl",), "vfio_ioctl", fentry_ok=False,
         why_absent="vfio_iommu_type1 is not loaded (modprobe vfio_iommu_type1)"),
)


@dataclass
class Choice:
    hook: Hook
    mode: str
    functions: tuple[str, ...] = ()
    note: str = ""


@dataclass
class Plan:
    """Everything the BPF program is compiled and attached with."""
    source: str                                   # pf_sched | func:SYM | tp:A:B,C:D
    source_mode: str                              # raw_tp | tp | fentry | kprobe
    choices: list[Choice] = field(default_factory=list)
    calib_func: str | None = None
    calib_modes: tuple[str, ...] = ()
    cost_func: str | None = None                  # None: no cost calibration possible
    cost_fentry: bool = False                     # an fentry pair compiled for cost_func
    have_kvm_tp: bool = False
    have_access_tp: bool = False
    ringbuf: bool = True
    wake_batch: bool = True                       # ring-buffer wake-ups batched (ring_flags)
    mapped_reader: bool = True                    # rings read from their pages (ringread)
    hist_mmap: bool = True                        # the kernel histograms' array mappable
    hist_slots: int = 32                          # (pf, vf) pairs with kernel histograms
    emit_calls: bool = False
    ringbuf_pages: int = 1024
    map_sizes: dict[str, int] = field(default_factory=dict)   # a test build's, else none
    task_stack_offset: int | None = None
    depth: str = DEFAULT_DEPTH

    def modes(self) -> dict[str, str]:
        out = {"switch": self.source_mode}
        out.update({c.hook.name: c.mode for c in self.choices})
        guests = DEPTHS.index(self.depth) >= DEPTHS.index("guests")
        out["kvm_exit"] = "tracepoint" if self.have_kvm_tp else ABSENT if guests else OFF
        out["vf_access_wait"] = (("raw_tp" if self.source_mode == "raw_tp" else "tracepoint")
                                 if self.have_access_tp else ABSENT if guests else OFF)
        return out

    def kretprobe_maxactive(self) -> int:
        """Instances per kretprobe: a test build's, else KRETPROBE_MAXACTIVE."""
        return self.map_sizes.get("KRETPROBE_MAXACTIVE", KRETPROBE_MAXACTIVE)

    def hit_types(self) -> tuple[str, ...]:
        """The probe types whose runs land in a window at this plan (the types the cost
        calibration measures): fentry and kprobe pairs of timed hooks, entry kprobes."""
        modes = {(c.mode, c.hook.timed) for c in self.choices}
        return tuple(t for t, hit in (("fentry", (FENTRY, True) in modes),
                                      ("kprobe", (KPROBE, True) in modes),
                                      ("entry", (KPROBE, False) in modes)) if hit)

    def unmeasured(self) -> list[str]:
        """The capture columns no hook of this plan measures (written empty)."""
        modes = self.modes()
        return sorted({col for hook, cols in HOOK_COLUMNS.items()
                       if modes.get(hook, ABSENT) in (ABSENT, OFF) for col in cols})

    def warnings(self) -> list[str]:
        out = [f"{c.hook.name}: {c.note}" for c in self.choices if c.note]
        if self.map_sizes:
            sizes = ",".join(f"{k}={v}" for k, v in self.map_sizes.items())
            out.append(f"test build: BPF maps shrunk ({MAP_SIZES_ENV}={sizes}): "
                       "switches and calls will be dropped (counted in kernel_drops)")
        return out

    def cflags(self, bpf_dir: Path, calib_tgid: int) -> list[str]:
        if self.source == "pf_sched":
            src = 1 if self.source_mode == "raw_tp" else 2
        else:
            src = 3 if self.source.startswith("func:") else 4
        d = {"SWITCH_SRC": src, "USE_RINGBUF": int(self.ringbuf), "EMIT_CALLS": int(self.emit_calls),
             "RINGBUF_PAGES": self.ringbuf_pages, "WAKE_BATCH": int(self.wake_batch), "HAVE_KVM_TP": int(self.have_kvm_tp),
             "HAVE_ACCESS_TP": int(self.have_access_tp), "CALIB_TGID": calib_tgid,
             "HIST_MAP_FLAGS": BPF_F_MMAPABLE if self.hist_mmap else 0,
             "VFT_HIST_SLOTS": self.hist_slots,
             "FUNC_MODE": MODE_DEFINE[FENTRY if self.source_mode == FENTRY else KPROBE],
             "CALIB_MODE": MODE_DEFINE[FENTRY if FENTRY in self.calib_modes else ABSENT]}
        for c in self.choices:
            d[c.hook.define] = MODE_DEFINE[c.mode]
            if c.hook.name == "iotlb_sync" and c.functions:
                d["SYNC_FUNC"] = c.functions[0]
        if self.source.startswith("func:"):
            d["SWITCH_FUNC"] = self.source[5:]
        if self.calib_func:
            d["CALIB_FUNC"] = self.calib_func
        d["COST_FUNC"] = self.cost_func or COST_FUNC
        d["COST_FENTRY"] = int(self.cost_fentry)
        if self.task_stack_offset is not None:
            d["VFT_TASK_STACK_OFFSET"] = self.task_stack_offset
        d.update(self.map_sizes)
        d.setdefault("SYNC_FUNC", "intel_iommu_tlb_sync")
        d.setdefault("CALIB_FUNC", CALIB_CANDIDATES[0])
        # Kernel headers warn under BCC's clang (IBT attributes, percpu address spaces).
        quiet = ["-Wno-ignored-attributes", "-Wno-duplicate-decl-specifier"]
        return [f"-I{bpf_dir}", *quiet] + [f"-D{k}={v}" for k, v in sorted(d.items())]


@lru_cache(maxsize=1)
def traceable_functions(tracefs: str) -> frozenset[str]:
    """Functions ftrace (so fentry and ftrace-based kprobes) can hook, modules included."""
    names = set()
    try:
        with open(os.path.join(tracefs, "available_filter_functions")) as f:
            for line in f:
                names.add(line.split(None, 1)[0])
    except OSError:
        pass
    return frozenset(names)


@lru_cache(maxsize=None)
def in_vmlinux_btf(func: str) -> bool:
    """Has vmlinux BTF for ``func`` (what BCC's KFUNC_PROBE needs; module BTF it cannot use)."""
    try:
        lib = ctypes.CDLL("libbpf.so.1")
    except OSError:
        return False
    quiet = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)(lambda *a: 0)
    lib.libbpf_set_print.restype = ctypes.c_void_p
    old = lib.libbpf_set_print(quiet)
    try:
        lib.libbpf_find_vmlinux_btf_id.argtypes = [ctypes.c_char_p, ctypes.c_int]
        return lib.libbpf_find_vmlinux_btf_id(func.encode(), BPF_TRACE_FENTRY) > 0
    finally:
        lib.libbpf_set_print(ctypes.c_void_p(old))


@dataclass
class KernelOffer:
    """What the running kernel offers to hook; tests pass their own."""
    functions: frozenset[str]
    btf: callable = in_vmlinux_btf
    fentry: bool = True
    kprobes: bool = True
    tracepoints: frozenset[str] = frozenset()
    raw_tp_in_modules: bool = True
    ringbuf: bool = True
    mmapable_array: bool = True
    task_stack_offset: int | None = None          # from BTF; None: the program includes sched.h

    @classmethod
    def probe(cls) -> "KernelOffer":
        from .features import check_all
        k = Kernel()
        if k.tracefs is None:
            raise ProbeError("tracefs is not mounted: mount -t tracefs nodev /sys/kernel/tracing")
        checks = {c.key: c.ok for c in check_all(k, bcc_probe=lambda: (True, ""))}
        tps = frozenset(f"{d.parent.name}:{d.name}" for d in (k.tracefs / "events").glob("*/*")
                        if d.is_dir())
        return cls(functions=traceable_functions(str(k.tracefs)), fentry=checks["fentry"],
                   kprobes=checks["kprobes"], tracepoints=tps,
                   raw_tp_in_modules="bpf_trace_modules" in k.ksyms, ringbuf=checks["ringbuf"],
                   mmapable_array=checks["mmapable_array"], task_stack_offset=k.task_stack_offset)


def choose_hook(hook: Hook, requested: str, offer: KernelOffer) -> Choice:
    present = tuple(f for f in hook.functions if f in offer.functions)
    if hook.pick_one:
        present = present[:1]
    if not present:
        why = hook.why_absent or f"{', '.join(hook.functions)} not in this kernel"
        return Choice(hook, ABSENT, (), f"skipped: {why}")
    fentry_possible = hook.fentry_ok and offer.fentry and all(offer.btf(f) for f in present)
    if requested in ("auto", FENTRY) and fentry_possible:
        return Choice(hook, FENTRY, present)
    if not offer.kprobes:
        return Choice(hook, ABSENT, (), "skipped: no fentry for it and no kprobes in this kernel")
    note = ""
    if requested == FENTRY:
        note = ("fentry impossible (module function: BCC attaches fentry to vmlinux only), "
                "using kprobes" if not hook.fentry_ok else "fentry impossible here, using kprobes")
    return Choice(hook, KPROBE, present, note)


def parse_source(spec: str | None, offer: KernelOffer) -> tuple[str, str]:
    """(source, mode) for --switch; raises ProbeError with a one-line reason."""
    if spec in (None, "pf_sched"):
        if "pf_sched:vf_switch_begin" not in offer.tracepoints:
            if spec is None:
                raise ProbeError("no switch source: pf_sched is not loaded; load it or give "
                                 "--switch func:SYMBOL or --switch tp:SYS:BEGIN,SYS:END")
            raise ProbeError("--switch pf_sched: the pf_sched module is not loaded "
                             "(insmod build/kmod/$(uname -r)/pf_sched.ko)")
        return "pf_sched", "raw_tp" if offer.raw_tp_in_modules else "tp"
    if spec.startswith("func:"):
        func = spec[5:]
        if not func or func not in offer.functions:
            raise ProbeError(f"--switch {spec}: no traceable kernel function {func!r} "
                             "(see /sys/kernel/tracing/available_filter_functions)")
        mode = FENTRY if offer.fentry and offer.btf(func) else KPROBE
        if mode == KPROBE and not offer.kprobes:
            raise ProbeError(f"--switch {spec}: neither fentry nor kprobes can attach to it here")
        return spec, mode
    if spec.startswith("tp:"):
        parts = spec[3:].split(",")
        if len(parts) != 2 or not all(p.count(":") == 1 and all(p.split(":")) for p in parts):
            raise ProbeError(f"--switch {spec}: give tp:SYS:BEGIN,SYS:END")
        for p in parts:
            if p not in offer.tracepoints:
                raise ProbeError(f"--switch {spec}: no tracepoint {p} (see /sys/kernel/tracing/events)")
        return spec, "tp"
    raise ProbeError(f"--switch {spec}: give pf_sched, func:SYMBOL or tp:SYS:BEGIN,SYS:END")


def map_size_overrides(env: dict[str, str] | os._Environ = os.environ) -> dict[str, int]:
    """A test build's map sizes from $VFTRACE_BPF_SIZES (``NAME=N,...``); {} normally."""
    spec = env.get(MAP_SIZES_ENV, "").strip()
    out: dict[str, int] = {}
    for item in filter(None, (i.strip() for i in spec.split(","))):
        name, _, n = item.partition("=")
        if name.strip() not in MAP_SIZE_DEFINES or not n.strip().isdigit() or int(n) < 1:
            raise ProbeError(f"{MAP_SIZES_ENV}: {item!r} is not NAME=N (N >= 1, NAME one of "
                             f"{', '.join(MAP_SIZE_DEFINES)})")
        out[name.strip()] = int(n)
    m = out.get("VFT_MAX_OPEN")
    if m is not None and (m > 32 or m & (m - 1)):
        raise ProbeError(f"{MAP_SIZES_ENV}: VFT_MAX_OPEN={m} is not a power of two up to 32")
    return out


def plan(spec: str | None, requested: str, offer: KernelOffer, *, ringbuf: bool = True,
         mapped_reader: bool = True, emit_calls: bool = False, depth: str = DEFAULT_DEPTH,
         hist_slots: int = 32, buffer_pages: int | None = None) -> Plan:
    if requested not in ("auto", FENTRY, KPROBE):
        raise ProbeError(f"--probe-mode {requested}: give auto, fentry or kprobe")
    if depth not in DEPTHS:
        raise ProbeError(f"--depth {depth}: give {', '.join(DEPTHS)}")
    source, source_mode = parse_source(spec, offer)
    if requested == KPROBE and source_mode == FENTRY:
        source_mode = KPROBE
    p = Plan(source, source_mode, ringbuf=ringbuf, mapped_reader=mapped_reader,
             hist_mmap=offer.mmapable_array,
             hist_slots=hist_slots,
             **({"ringbuf_pages": buffer_pages} if buffer_pages else {}),
             emit_calls=emit_calls,
             map_sizes=map_size_overrides(), task_stack_offset=offer.task_stack_offset,
             depth=depth)
    level = DEPTHS.index(depth)
    p.choices = [choose_hook(h, requested, offer) if DEPTHS.index(h.depth) <= level
                 else Choice(h, OFF) for h in HOOKS]
    if level >= DEPTHS.index("iommu") and not any(
            c.mode != ABSENT for c in p.choices if c.hook.name in ("iommu_map", "iommu_unmap")):
        raise ProbeError("neither iommu_map nor iommu_unmap can be hooked here (no fentry, no kprobes)")
    p.calib_func = next((f for f in CALIB_CANDIDATES if f in offer.functions), None)
    if p.calib_func:
        modes = []
        if offer.fentry and offer.btf(p.calib_func) and requested != KPROBE:
            modes.append(FENTRY)
        if offer.kprobes:
            modes.append(KPROBE)
        p.calib_modes = tuple(modes)
    if offer.kprobes and {COST_FUNC, COST_BOOKEND} <= offer.functions:
        p.cost_func = COST_FUNC
        p.cost_fentry = "fentry" in p.hit_types() and offer.btf(COST_FUNC)
    guests = level >= DEPTHS.index("guests")
    p.have_kvm_tp = guests and {"kvm:kvm_exit", "kvm:kvm_entry"} <= offer.tracepoints
    p.have_access_tp = guests and source == "pf_sched" and \
        "pf_sched:vf_access_wait" in offer.tracepoints
    return p
