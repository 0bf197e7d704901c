"""KVM guests on pf_sched's VF BARs, recorded: what a switch costs the guests, in the lab."""
from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from tests.lab import labutil, pfsched
from tracer.capture.files import read_capture
from tracer.lab.experiment import record_with_guests
from tracer.model import exit_reasons

pytestmark = pytest.mark.lab
OUT = labutil.REPO / "build" / "lab-captures"
SECONDS = 8
NPF = {"svm": 0x400, "vmx": 48}          # the exit an access to an unbacked GPA takes


def guest_processes() -> list[str]:
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if "tracer.lab.workloads.guests" in line]


def recorded(name: str, mode: str, vcpus: int):
    csv = OUT / f"guests-{name}-{labutil.kernel_release()}.csv"
    guests, summary, err = record_with_guests(csv, mode=mode, vms=2, vcpus=vcpus,
                                              duration=SECONDS)
    meta, rows, problems = read_capture(csv)
    assert not problems, problems
    assert meta["lost_total"] == 0, err
    return guests, meta, rows


def assert_guests_progressed(guests: dict) -> None:
    """Every VM kept completing accesses across the run (no deadlock on a revoked VF)."""
    assert guests["returncode"] == 0 and not guests["errors"], guests
    reports = [r for r in guests["reports"] if not r["final"]]
    assert len(reports) >= SECONDS - 2
    for vm in range(2):
        counts = [r["vms"][vm]["accesses"] for r in reports]
        assert counts[0] > 0
        assert all(b > a for a, b in zip(counts, counts[1:])), counts


def test_mmap_guests_get_zapped_inside_switch_windows():
    with pfsched.loaded(2, slice_us=2000, nr_vfs=2) as bdfs:
        guests, meta, rows = recorded("mmap", "mmap", vcpus=2)
        truth = [pfsched.stats(b) for b in bdfs]
    assert_guests_progressed(guests)
    assert len(rows) > 200                                     # many switches went by
    # The revoke zaps the guests' BAR mappings: KVM's MMU notifier runs inside windows,
    # vCPUs are kicked out and exits land in the windows that caused them.
    assert sum(r.mmu_notifier_ns for r in rows) > 0
    assert sum(1 for r in rows if r.kvm_exits > 0) > 10
    in_window = [e for e in meta["background"]["kvm_exits"] if e["in_window"]]
    assert sum(e["count"] for e in in_window) > 0
    # Guest accesses fault into pf_sched and block while their VF is off; every release
    # pf_sched counted is in some row (the recorder was armed before the guests began).
    assert sum(r.blocked_accesses for r in rows) > 0
    assert sum(r.blocked_accesses for r in rows) <= sum(t["blocked_accesses"] for t in truth)
    assert not guest_processes()


def test_trap_guests_exit_on_every_access_and_block_while_off():
    with pfsched.loaded(2, slice_us=2000, nr_vfs=2) as bdfs:
        guests, meta, rows = recorded("trap", "trap", vcpus=1)
        truth = [pfsched.stats(b) for b in bdfs]
    assert_guests_progressed(guests)
    mmio = sum(vm["mmio_exits"] for vm in guests["vms"])
    assert mmio > 100
    # Each trapped access is one NPF/EPT-violation exit of a guest vCPU, recorded with
    # its VM's pid: at least as many as the accesses the guests forwarded.
    vendor = meta["kvm_vendor"]
    npf = sum(e["count"] for e in meta["background"]["kvm_exits"] if e["reason"] == NPF[vendor])
    assert npf >= mmio, (exit_reasons.name(NPF[vendor], vendor), npf, mmio)
    # Forwarded accesses block in pread/pwrite while their VF is off.
    assert sum(r.blocked_ns for r in rows) > 0
    assert sum(t["blocked_accesses"] for t in truth) >= sum(r.blocked_accesses for r in rows) > 0
    assert not guest_processes()


def test_stopping_the_guests_releases_pf_sched():
    """Each stop signal, sent right after a report (when the main thread is busy), stops
    every vCPU; no process and no reference is left: the module unloads."""
    with pfsched.loaded(1, slice_us=1000, nr_vfs=2):
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            proc = subprocess.Popen([sys.executable, "-m", "tracer.lab.workloads.guests",
                                     "--mode", "mmap", "--vms", "2", "--vcpus", "2", "--json",
                                     "--interval", "0.2"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    cwd=labutil.REPO)
            first = proc.stdout.readline()
            assert first.startswith("{"), proc.stderr.read()
            proc.send_signal(sig)
            try:
                out, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise AssertionError(f"guests still running 30 s after {sig.name}")
            assert proc.returncode == 0, (sig.name, err)
            assert '"final": true' in out
    # pfsched.loaded's exit ran rmmod, which fails while any file or mapping is open.
    assert "pf_sched" not in open("/proc/modules").read()
    assert not guest_processes()
