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


# --- the command: exit status and output against trees whose answers we know -------------

TREES = {
    # name: (tree options, bcc importable, euid, can trace)
    "debian": (dict(kprobes=True, modules=True, headers=True, tracefs=True), True, 0, True),
    "kprobes_only": (dict(kprobes=True, modules=True, headers=True, tracefs=True,
                          trampolines=False), True, 0, True),
    "no_probe_mode": (dict(kprobes=False, modules=True, headers=True, tracefs=True,
                           trampolines=False), True, 0, False),
    "no_tracefs": (dict(kprobes=True, modules=True, headers=True, tracefs=False), True, 0, False),
    "no_headers": (dict(kprobes=True, modules=True, headers=False, tracefs=True), True, 0, False),
    "no_bcc": (dict(kprobes=True, modules=True, headers=True, tracefs=True), False, 0, False),
    "not_root": (dict(kprobes=True, modules=True, headers=True, tracefs=True), True, 1000, False),
}


@pytest.fixture
def doctor_on(monkeypatch, tmp_path):
    """Run ``vftrace doctor`` (the real command, through cli.main) on a fake tree: the
    kernel view and the BCC probe are the only stand-ins."""
    from tracer import cli
    monkeypatch.delenv("VFTRACE_LAB", raising=False)

    def run(name: str, *args: str) -> int:
        opts, bcc, euid, _ = TREES[name]
        root = tmp_path / name
        if not root.exists():
            make_tree(root, **opts)
        monkeypatch.setattr(doctor, "Kernel", lambda: fake_kernel(root, euid=euid))
        monkeypatch.setattr(doctor, "check_all",
                            lambda k: check_all(k, bcc_probe=has_bcc if bcc else no_bcc))
        return cli.main(["doctor", *args])

    return run


@pytest.mark.parametrize("name", TREES)
def test_doctor_exit_status_follows_the_kernel(doctor_on, capsys, name):
    expected = TREES[name][-1]
    rc = doctor_on(name, "--json")
    data = json.loads(capsys.readouterr().out)
    assert rc == (0 if expected else 1)
    assert data["can_trace"] is expected
    assert data["kernel"] == REL and data["in_lab"] is False
    rc = doctor_on(name)
    text = capsys.readouterr().out
    assert rc == (0 if expected else 1)
    assert ("tracing is possible" in text) is expected
    assert ("tracing is NOT possible" in text) is not expected


def test_doctor_json_reports_each_feature_of_the_tree(doctor_on, capsys):
    doctor_on("kprobes_only", "--json")
    checks = {c["key"]: c for c in json.loads(capsys.readouterr().out)["checks"]}
    # what make_tree put there (or left out), check by check
    assert {k for k, c in checks.items() if c["ok"]} == {
        "root", "bpf_syscall", "bcc", "btf", "kernel_headers", "kprobes", "raw_tracepoint",
        "ringbuf", "mmapable_array", "tracefs", "tp:kvm:kvm_exit", "tp:kvm:kvm_entry", "tp:iommu:map",
        "tp:iommu:unmap", "iommu", "modules", "kvm"}
    assert checks["iommu"]["detail"] == "dmar0"
    assert checks["kernel_headers"]["detail"].endswith(f"lib/modules/{REL}/build")
    assert checks["vfio_iommu_type1"]["detail"] == "available, not loaded"
    assert checks["pf_sched"]["detail"] == "not loaded"


def test_doctor_names_the_lab_when_it_runs_in_one(doctor_on, capsys, tmp_path):
    make_tree(tmp_path / "debian", **TREES["debian"][0])
    (tmp_path / "debian/proc/cmdline").write_text("virtme_initmount0=/ quiet\n")
    assert doctor_on("debian", "--json") == 0
    assert json.loads(capsys.readouterr().out)["in_lab"] is True
    doctor_on("debian")
    assert "on lab VM (virtme-ng)" in capsys.readouterr().out


def test_doctor_on_this_machine_reports_its_facts():
    """The real command on the real kernel, against what can be seen without doctor:
    the release, the euid, BTF, modules and BCC; a missing requirement means exit 1."""
    import importlib.util
    import os
    r = subprocess.run([sys.executable, "-m", "tracer.cli", "doctor", "--json"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode in (0, 1), r.stderr
    data = json.loads(r.stdout)
    release = os.uname().release
    assert data["kernel"] == release
    ok = {c["key"]: c["ok"] for c in data["checks"]}
    assert ok["root"] == (os.geteuid() == 0)
    assert ok["btf"] == Path("/sys/kernel/btf/vmlinux").is_file()
    assert ok["modules"] == Path("/proc/modules").is_file()
    assert ok["bcc"] == (importlib.util.find_spec("bcc") is not None)
    headers = (Path(f"/lib/modules/{release}/build/include").is_dir()
               or Path("/sys/kernel/kheaders.tar.xz").is_file()
               or "/kheaders.ko" in _modules_dep(release))
    tracefs = any(Path(p, "events").is_dir()
                  for p in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing"))
    assert ok["kernel_headers"] == headers and ok["tracefs"] == tracefs
    blocked = not (os.geteuid() == 0 and ok["bcc"] and headers and tracefs)
    if blocked:
        assert r.returncode == 1 and data["can_trace"] is False


def _modules_dep(release: str) -> str:
    try:
        return Path(f"/lib/modules/{release}/modules.dep").read_text()
    except OSError:
        return ""
