"""doctor's verdicts on fake kernel trees and on this machine's real kernel."""
from __future__ import annotations

import errno
import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tracer.kernel import doctor
from tracer.kernel.features import Kernel, can_trace, check_all

REL = "6.1.0-56-amd64"


def make_tree(root: Path, *, kprobes: bool, modules: bool, headers: bool, tracefs: bool,
              trampolines: bool = True, kvm: bool = True) -> Path:
    cfg = ["CONFIG_BPF_SYSCALL=y", "CONFIG_DEBUG_INFO_BTF=y",
           "CONFIG_DYNAMIC_FTRACE_WITH_DIRECT_CALLS=y",
           "CONFIG_KPROBES=y" if kprobes else "# CONFIG_KPROBES is not set",
           "CONFIG_MODULES=y" if modules else "# CONFIG_MODULES is not set"]
    (root / "proc").mkdir(parents=True)
    (root / "proc/config.gz").write_bytes(gzip.compress("\n".join(cfg).encode()))
    syms = ["ffffffff81000000 T bpf_find_raw_tracepoint"]
    if trampolines:
        syms.append("ffffffff81000010 T bpf_trampoline_link_prog")
    (root / "proc/kallsyms").write_text("\n".join(syms) + "\n")
    (root / "proc/cmdline").write_text("quiet\n")
    (root / "sys/kernel/btf").mkdir(parents=True)
    (root / "sys/kernel/btf/vmlinux").write_bytes(b"\0")
    if kprobes:
        (root / "sys/bus/event_source/devices/kprobe").mkdir(parents=True)
    if modules:
        (root / "proc/modules").write_text("")
        (root / f"lib/modules/{REL}").mkdir(parents=True)
        (root / f"lib/modules/{REL}/modules.dep").write_text(
            "kernel/drivers/vfio/vfio_iommu_type1.ko.xz: kernel/drivers/vfio/vfio.ko.xz\n")
    if headers:
        (root / f"lib/modules/{REL}/build/include").mkdir(parents=True)
    if tracefs:
        for tp in ("kvm/kvm_exit", "kvm/kvm_entry", "iommu/map", "iommu/unmap"):
            (root / "sys/kernel/tracing/events" / tp).mkdir(parents=True)
    if kvm:
        (root / "sys/module/kvm").mkdir(parents=True)
    (root / "sys/class/iommu/dmar0").mkdir(parents=True)
    return root


def fake_kernel(root: Path, euid: int = 0, bpf_errno: int = 0) -> Kernel:
    return Kernel(root, release=REL, euid=euid,
                  bpf_syscall=lambda *a: (bpf_errno == 0, bpf_errno))


def no_bcc():
    return False, "No module named 'bcc'"


def has_bcc():
    return True, "bcc 0.26.0"


def by_key(checks):
    return {c.key: c for c in checks}


def test_a_debian_kernel_can_trace_with_both_probe_modes(tmp_path):
    k = fake_kernel(make_tree(tmp_path, kprobes=True, modules=True, headers=True, tracefs=True))
    checks = check_all(k, bcc_probe=has_bcc)
    assert can_trace(checks)
    text, ok = doctor.report(checks, k)
    assert ok and "tracing is possible (probe modes: fentry, kprobes)" in text
    c = by_key(checks)
    assert not c["vfio_iommu_type1"].ok and c["vfio_iommu_type1"].fix == "modprobe vfio_iommu_type1"
    assert "insmod" in c["pf_sched"].fix


def test_a_kernel_like_this_hosts_says_only_the_lab_works(tmp_path):
    k = fake_kernel(make_tree(tmp_path, kprobes=False, modules=False, headers=False, tracefs=False))
    checks = check_all(k, bcc_probe=has_bcc)
    assert not can_trace(checks)
    text, ok = doctor.report(checks, k)
    assert not ok
    assert "kernel built without CONFIG_KPROBES" in text
    assert "only the lab works" in text and "make lab" in text
    assert "mount -t tracefs nodev /sys/kernel/tracing" in text
    assert f"apt-get install linux-headers-{REL}" in text


@pytest.mark.parametrize("change, missing, fix", [
    (dict(euid=1000), "root", "sudo"),
    (dict(bpf_errno=errno.EPERM), "bpf_syscall", "unprivileged_bpf_disabled"),
])
def test_required_features_block_tracing_and_say_how_to_fix(tmp_path, change, missing, fix):
    k = fake_kernel(make_tree(tmp_path, kprobes=True, modules=True, headers=True, tracefs=True),
                    **change)
    checks = check_all(k, bcc_probe=has_bcc)
    assert not can_trace(checks)
    assert not by_key(checks)[missing].ok and fix in by_key(checks)[missing].fix


def test_missing_bcc_names_the_debian_package(tmp_path):
    k = fake_kernel(make_tree(tmp_path, kprobes=True, modules=True, headers=True, tracefs=True))
    checks = check_all(k, bcc_probe=no_bcc)
    assert not can_trace(checks)
    assert "python3-bpfcc" in by_key(checks)["bcc"].fix


def test_kprobes_alone_are_enough_when_trampolines_are_missing(tmp_path):
    k = fake_kernel(make_tree(tmp_path, kprobes=True, modules=True, headers=True, tracefs=True,
                              trampolines=False))
    checks = check_all(k, bcc_probe=has_bcc)
    assert can_trace(checks) and not by_key(checks)["fentry"].ok
    assert "bpf_trampoline_link_prog" in by_key(checks)["fentry"].detail


def test_doctor_on_this_machine_agrees_with_its_own_checks():
    """The real command on the real kernel: exit status and verdict match the probes."""
    r = subprocess.run([sys.executable, "-m", "tracer.cli", "doctor", "--json"],
                       capture_output=True, text=True, timeout=60)
    data = json.loads(r.stdout)
    assert r.returncode == (0 if data["can_trace"] else 1)
    text = subprocess.run([sys.executable, "-m", "tracer.cli", "doctor"],
                          capture_output=True, text=True, timeout=60).stdout
    if data["can_trace"]:
        assert "tracing is possible" in text
    else:
        assert "tracing is NOT possible" in text
        kp = next(c for c in data["checks"] if c["key"] == "kprobes")
        if not kp["ok"] and not data["in_lab"]:
            assert "only the lab works" in text
