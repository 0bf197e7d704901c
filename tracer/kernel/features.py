"""Kernel feature probing, in one place.

Everything vftrace needs from the kernel is probed here (like libbpf-tools'
``fentry_can_attach`` and kvm_stat's ``check_access``): ``vftrace doctor`` prints the
results and the tracer picks probe modes from them.  Each probe reads what the kernel
exposes (sysfs, procfs, tracefs, the kernel config) or asks the ``bpf()`` syscall
directly, so it works even where BCC itself is missing.
"""
from __future__ import annotations

import ctypes
import errno
import gzip
import os
import platform
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from . import btf

# Levels: what a missing feature costs.
REQUIRED = "required"        # nothing can be traced without it
PROBES = "probes"            # one of fentry / kprobes is required
OPTIONAL = "optional"        # some hooks or the lab's module need it

SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine())
BPF_MAP_CREATE = 0
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_RINGBUF = 27
BPF_F_MMAPABLE = 1 << 10

TRACEPOINTS = ("kvm:kvm_exit", "kvm:kvm_entry", "iommu:map", "iommu:unmap")


@dataclass(frozen=True)
class Check:
    key: str
    ok: bool
    detail: str
    fix: str = ""
    level: str = OPTIONAL


class Kernel:
    """A view of the running kernel.  ``root`` lets tests point it at a fake tree."""

    def __init__(self, root: Path | str = "/", release: str | None = None,
                 euid: int | None = None, bpf_syscall=None):
        self.root = Path(root)
        self.release = release or platform.release()
        self.euid = os.geteuid() if euid is None else euid
        self._bpf = bpf_syscall or bpf_map_create

    def path(self, p: str) -> Path:
        return self.root / p.lstrip("/")

    @cached_property
    def config(self) -> dict[str, str]:
        """CONFIG_* of the running kernel, from /proc/config.gz or /boot/config-REL."""
        for src in (self.path("/proc/config.gz"), self.path(f"/boot/config-{self.release}")):
            try:
                raw = gzip.decompress(src.read_bytes()) if src.suffix == ".gz" else src.read_bytes()
            except OSError:
                continue
            cfg = {}
            for line in raw.decode(errors="replace").splitlines():
                if line.startswith("CONFIG_") and "=" in line:
                    k, v = line.split("=", 1)
                    cfg[k] = v
                elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
                    cfg[line[2:-len(" is not set")]] = "n"
            return cfg
        return {}

    def config_says(self, option: str) -> bool | None:
        """True/False when the config is readable, None when it is not."""
        if not self.config:
            return None
        return self.config.get(option, "n") in ("y", "m")

    @cached_property
    def ksyms(self) -> set[str]:
        names = set()
        try:
            with open(self.path("/proc/kallsyms")) as f:
                for line in f:
                    parts = line.split()
                    if len(parts) >= 3:
                        names.add(parts[2])
        except OSError:
            pass
        return names

    @cached_property
    def tracefs(self) -> Path | None:
        for p in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing"):
            if self.path(p + "/events").is_dir():
                return self.path(p)
        return None

    @cached_property
    def task_stack_offset(self) -> int | None:
        """offsetof(struct task_struct, stack), from the kernel's BTF (see btf.py)."""
        return btf.task_stack_offset(self.path(str(btf.VMLINUX)))

    def has_tracepoint(self, name: str) -> bool:
        sys_, _, event = name.partition(":")
        return self.tracefs is not None and (self.tracefs / "events" / sys_ / event).is_dir()

    def module_loaded(self, name: str) -> bool:
        return self.path(f"/sys/module/{name}").is_dir()

    def module_available(self, name: str) -> bool:
        """Loadable from /lib/modules (listed in modules.dep, with - or _ in the name)."""
        try:
            dep = self.path(f"/lib/modules/{self.release}/modules.dep").read_text()
        except OSError:
            return False
        stems = {name, name.replace("_", "-")}
        for line in dep.splitlines():
            base = line.split(":", 1)[0].rsplit("/", 1)[-1].split(".ko", 1)[0]
            if base in stems:
                return True
        return False

    @cached_property
    def headers_dir(self) -> Path | None:
        build = self.path(f"/lib/modules/{self.release}/build")
        if (build / "include").is_dir():
            return build
        return None

    @property
    def in_lab(self) -> bool:
        try:
            cmdline = self.path("/proc/cmdline").read_text()
        except OSError:
            cmdline = ""
        return "virtme" in cmdline or os.environ.get("VFTRACE_LAB") == "1"

    def bpf_map_ok(self, map_type: int, key: int, value: int, entries: int,
                   flags: int = 0) -> tuple[bool, int]:
        return self._bpf(map_type, key, value, entries, flags)


def bpf_map_create(map_type: int, key_size: int, value_size: int, max_entries: int,
                   flags: int = 0) -> tuple[bool, int]:
    """Create (then close) a BPF map with the raw syscall: (ok, errno)."""
    if SYS_BPF is None:
        return False, errno.ENOSYS
    attr = (ctypes.c_uint32 * 32)()          # union bpf_attr, zero-filled
    attr[0], attr[1], attr[2], attr[3], attr[4] = map_type, key_size, value_size, max_entries, flags
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    fd = libc.syscall(ctypes.c_long(SYS_BPF), ctypes.c_int(BPF_MAP_CREATE),
                      ctypes.byref(attr), ctypes.c_uint(ctypes.sizeof(attr)))
    if fd < 0:
        return False, ctypes.get_errno()
    os.close(fd)
    return True, 0


def _bcc_importable() -> tuple[bool, str]:
    try:
        import bcc  # noqa: F401  (Debian's python3-bpfcc)
    except ImportError as e:
        return False, str(e)
    version = getattr(bcc, "__version__", "?")
    return True, f"bcc {version} ({Path(bcc.__file__).parent})"


def check_all(k: Kernel | None = None, bcc_probe=_bcc_importable) -> list[Check]:
    """Every check doctor reports, in the order a user fixes them."""
    k = k or Kernel()
    out: list[Check] = []
    add = out.append

    add(Check("root", k.euid == 0, "running as root" if k.euid == 0 else f"euid {k.euid}",
              "run vftrace as root (sudo): BPF tracing needs CAP_BPF and CAP_PERFMON", REQUIRED))

    ok, err = k.bpf_map_ok(BPF_MAP_TYPE_ARRAY, 4, 8, 1)
    if ok:
        detail, fix = "bpf() creates maps", ""
    elif err == errno.EPERM:
        detail, fix = "bpf() refused (EPERM)", "run as root; check kernel.unprivileged_bpf_disabled and lockdown"
    else:
        detail, fix = f"bpf() failed: {os.strerror(err)}", "a kernel with CONFIG_BPF_SYSCALL=y"
    add(Check("bpf_syscall", ok, detail, fix, REQUIRED))

    bcc_ok, bcc_detail = bcc_probe()
    add(Check("bcc", bcc_ok, bcc_detail,
              "apt-get install python3-bpfcc (Debian's BCC; PyPI's 'bcc' is a different package) "
              "and use a Python that sees the system site packages", REQUIRED))

    has_btf = k.path("/sys/kernel/btf/vmlinux").is_file()
    where = (f"task_struct.stack at {k.task_stack_offset}: <linux/sched.h> not compiled"
             if k.task_stack_offset is not None else "task_struct.stack not found in it")
    add(Check("btf", has_btf, f"/sys/kernel/btf/vmlinux ({where})" if has_btf
              else "no /sys/kernel/btf/vmlinux: no fentry, and a slower compile",
              "a kernel with CONFIG_DEBUG_INFO_BTF=y (Debian's kernels have it)", OPTIONAL))

    hdr = k.headers_dir
    kheaders = k.path("/sys/kernel/kheaders.tar.xz").is_file() or k.module_available("kheaders")
    add(Check("kernel_headers", hdr is not None or kheaders,
              str(hdr) if hdr else ("kheaders (CONFIG_IKHEADERS)" if kheaders
                                    else f"no /lib/modules/{k.release}/build"),
              f"apt-get install linux-headers-{k.release} (BCC compiles against them)", REQUIRED))

    cfg_kprobes = k.config_says("CONFIG_KPROBES")
    kprobe_pmu = k.path("/sys/bus/event_source/devices/kprobe").is_dir()
    kprobes = kprobe_pmu or bool(k.tracefs and (k.tracefs / "kprobe_events").exists())
    if kprobes:
        detail = "kprobe PMU present" if kprobe_pmu else "tracefs kprobe_events"
    elif cfg_kprobes is False:
        detail = "kernel built without CONFIG_KPROBES"
    else:
        detail = "no kprobe PMU and no kprobe_events"
    add(Check("kprobes", kprobes, detail,
              "a kernel with CONFIG_KPROBES=y and CONFIG_KPROBE_EVENTS=y (Debian's linux-image-amd64)",
              PROBES))

    tramp = "bpf_trampoline_link_prog" in k.ksyms
    direct = k.config_says("CONFIG_DYNAMIC_FTRACE_WITH_DIRECT_CALLS")
    fentry = (has_btf and tramp and platform.machine() == "x86_64" and direct is not False)
    why = ("BTF + BPF trampolines" if fentry else
           "no BTF" if not has_btf else
           "no bpf_trampoline_link_prog in kallsyms" if not tramp else
           "no CONFIG_DYNAMIC_FTRACE_WITH_DIRECT_CALLS")
    add(Check("fentry", fentry, why,
              "a kernel with CONFIG_DEBUG_INFO_BTF=y and CONFIG_DYNAMIC_FTRACE_WITH_DIRECT_CALLS=y "
              "(x86_64); otherwise vftrace falls back to kprobes", PROBES))

    raw_tp = bool({"bpf_find_raw_tracepoint", "bpf_get_raw_tracepoint"} & k.ksyms)
    add(Check("raw_tracepoint", raw_tp, "supported" if raw_tp else "not in kallsyms",
              "a kernel >= 4.17; otherwise vftrace uses classic tracepoints", OPTIONAL))

    ok, err = k.bpf_map_ok(BPF_MAP_TYPE_RINGBUF, 0, 0, 4096 * 16)
    add(Check("ringbuf", ok, "BPF ring buffer" if ok else f"no ring buffer ({os.strerror(err)})",
              "a kernel >= 5.8; otherwise vftrace falls back to the perf buffer", OPTIONAL))

    ok, err = k.bpf_map_ok(BPF_MAP_TYPE_ARRAY, 4, 8, 512, BPF_F_MMAPABLE)
    add(Check("mmapable_array", ok, "mappable BPF arrays" if ok
              else f"no mappable arrays ({os.strerror(err)})",
              "a kernel >= 5.5; otherwise the kernel histograms are read key by key, slower",
              OPTIONAL))

    add(Check("tracefs", k.tracefs is not None, str(k.tracefs) if k.tracefs else "not mounted",
              "mount -t tracefs nodev /sys/kernel/tracing", REQUIRED))

    for tp in TRACEPOINTS:
        have = k.has_tracepoint(tp)
        sys_ = tp.split(":")[0]
        fix = ("modprobe kvm_intel or kvm_amd (kvm's tracepoints appear with the module)"
               if sys_ == "kvm" else "a kernel with CONFIG_IOMMU_API (iommu tracepoints)")
        if k.tracefs is None:
            fix = "mount tracefs first"
        add(Check(f"tp:{tp}", have, "present" if have else "absent", fix, OPTIONAL))

    iommus = sorted(p.name for p in k.path("/sys/class/iommu").glob("*"))
    add(Check("iommu", bool(iommus), ", ".join(iommus) if iommus else "no IOMMU registered",
              "enable VT-d/AMD-Vi in firmware and boot with intel_iommu=on (or amd_iommu=on)",
              OPTIONAL))

    modules = k.path("/proc/modules").is_file()
    add(Check("modules", modules, "loadable modules" if modules else "kernel built without CONFIG_MODULES",
              "a kernel with CONFIG_MODULES=y (needed to load pf_sched)", OPTIONAL))

    add(_module_check(k, "vfio_iommu_type1", "modprobe vfio_iommu_type1 (CONFIG_VFIO_IOMMU_TYPE1)"))
    kvm = k.module_loaded("kvm") or k.path("/dev/kvm").exists()
    add(Check("kvm", kvm, "/dev/kvm" if kvm else "not loaded",
              "modprobe kvm_intel or kvm_amd (CONFIG_KVM); needs VT-x/AMD-V", OPTIONAL))
    add(Check("pf_sched", k.module_loaded("pf_sched"),
              "loaded" if k.module_loaded("pf_sched") else "not loaded",
              f"make kmod && insmod build/kmod/{k.release}/pf_sched.ko, or run in the lab (vftrace lab)",
              OPTIONAL))
    return out


def _module_check(k: Kernel, name: str, fix: str) -> Check:
    if k.module_loaded(name):
        return Check(name, True, "loaded", fix)
    if k.module_available(name):
        return Check(name, False, "available, not loaded", f"modprobe {name}")
    return Check(name, False, "not in this kernel", fix)


def can_trace(checks: list[Check]) -> bool:
    """Tracing is possible when every required check passes and one probe mode works."""
    by_key = {c.key: c for c in checks}
    required = all(c.ok for c in checks if c.level == REQUIRED)
    return required and (by_key["kprobes"].ok or by_key["fentry"].ok)
