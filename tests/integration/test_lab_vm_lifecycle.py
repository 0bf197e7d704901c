"""`vftrace lab` with real VMs: exit status and files come back, nothing outlives it.

These boot QEMU (about 20 s each) but need no root; each VM gets a unique memory size
so its QEMU process can be told apart from any other."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.need import need
from tracer.lab import kernels

REPO = Path(__file__).resolve().parents[2]


def require_lab():
    why = None
    if not shutil.which("qemu-system-x86_64"):
        why = "qemu-system-x86_64 missing (apt-get install qemu-system-x86, or make setup)"
    elif not kernels.installed_kernels():
        why = "no lab kernel in /boot with /lib/modules (make setup installs them)"
    elif not (Path(sys.executable).parent / "vng").exists() and not shutil.which("vng"):
        why = "virtme-ng (vng) missing from the environment (make setup)"
    need(why is None, why or "")


def qemu_pids(memory: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"qemu-system-x86_64 .*-m {memory} "],
                         capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def vftrace_lab(memory: str, *cmd: str, timeout: str | None = None,
                kernel_log: Path | None = None) -> subprocess.Popen:
    args = [sys.executable, "-m", "tracer.cli", "lab", "--pfs", "0", "--memory", memory]
    if timeout:
        args += ["--timeout", timeout]
    if kernel_log:
        args += ["--kernel-log", str(kernel_log)]
    return subprocess.Popen([*args, "--", *cmd], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)


def test_guest_exit_status_and_shared_writes_come_back(tmp_path):
    require_lab()
    marker = REPO / "build" / f"lab-write-{os.getpid()}"
    marker.parent.mkdir(exist_ok=True)
    marker.unlink(missing_ok=True)
    p = vftrace_lab("1101M", "sh", "-c", f"echo in-lab=$VFTRACE_LAB > {marker}; exit 7")
    out, err = p.communicate(timeout=300)
    assert p.returncode == 7, err
    assert marker.read_text().strip() == "in-lab=1"
    marker.unlink()
    assert not qemu_pids("1101M")


def test_timeout_stops_the_vm_says_where_it_was_and_leaves_no_qemu(tmp_path):
    """With --kernel-log, a VM stopped for hanging is examined first: QEMU names where
    each vCPU was (this boot's kernel symbols), and the guest's SysRq dumps (blocked
    tasks, every CPU's backtrace) reach the kernel log on the host."""
    require_lab()
    klog = tmp_path / "kernel.log"
    p = vftrace_lab("1102M", "sleep", "600", timeout="45", kernel_log=klog)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 124, err
    assert "timed out after 45 s" in err
    assert not qemu_pids("1102M")
    samples = [ln for ln in err.splitlines() if "vCPUs, sample" in ln]
    assert len(samples) == 3, err
    # a sleeping guest's vCPUs idle in the kernel: named functions, not raw addresses
    assert "cpu0 " in samples[0] and "+0x" in samples[0] and "no kernel symbols" not in samples[0]
    said = klog.read_text(errors="replace")
    assert "sysrq: Show Blocked State" in said and "NMI backtrace for cpu" in said, said[-2000:]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_stops_the_vm_and_leaves_no_qemu(sig):
    require_lab()
    memory = f"11{10 + sig}M"
    p = vftrace_lab(memory, "sleep", "600")
    deadline = time.monotonic() + 120
    while not qemu_pids(memory):
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline, "QEMU never started"
        time.sleep(0.5)
    time.sleep(3)                       # let the guest get going
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 128 + sig, err
    assert not qemu_pids(memory)
