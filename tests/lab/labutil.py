"""Helpers shared by the lab tests (they run as root inside the lab VM).

The lab boots with one QEMU ``edu`` device (1234:11e8) per simulated PF.  Tests take
devices from :func:`edu_devices`, bind them to the driver they need and must hand
them back unbound (use :func:`bound_to` as a context manager) so the next test finds
them free.
"""
from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from pathlib import Path

from tracer.pfsched.control import bind, current_driver, edu_devices, kmod_path, unbind  # noqa: F401

REPO = Path(__file__).resolve().parents[2]


def kernel_release() -> str:
    return platform.release()


@contextlib.contextmanager
def bound_to(bdf: str, driver: str):
    bind(bdf, driver)
    try:
        yield bdf
    finally:
        unbind(bdf)


def free_edu_devices() -> list[str]:
    return [d for d in edu_devices() if current_driver(d) is None]


def run(cmd: list[str] | str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, shell=isinstance(cmd, str), check=check, text=True,
                          capture_output=True, **kw)


def modprobe(name: str) -> None:
    run(["modprobe", name])


def module_loaded(name: str) -> bool:
    return Path("/sys/module", name).exists()


def dmesg() -> str:
    return run(["dmesg"]).stdout


def in_lab() -> bool:
    return os.environ.get("VFTRACE_LAB") == "1"


def vftrace_kprobes() -> list[str]:
    """kprobe events BCC made for vftrace (its legacy names end in _bcc_<pid>)."""
    events = "/sys/kernel/tracing/kprobe_events"
    if not os.path.exists(events):
        events = "/sys/kernel/debug/tracing/kprobe_events"
    with open(events) as f:
        return [line for line in f if "kp_" in line or "krp_" in line or "bcc" in line.lower()]


KERNEL_HALF = 0xFFFF_8000_0000_0000      # x86-64: every kernel address is at or above this


def kernel_address_like(paths) -> list[str]:
    """Numbers in these files that could be kernel addresses: hex words with the kernel's
    prefix, or integers in the kernel half of the address space (either signedness)."""
    import re
    found = []
    for path in paths:
        text = Path(path).read_text()
        found += [f"{path}: {m}" for m in re.findall(r"0x[fF]{4}[0-9a-fA-F]{12}", text)]
        for m in re.findall(r"-?\d{15,}", text):
            value = int(m) & 0xFFFF_FFFF_FFFF_FFFF
            if value >= KERNEL_HALF:
                found.append(f"{path}: {m}")
    return found


# Each timed hook's calls column in a window's record.
HOOK_CALLS = {"iommu_map": "map_calls", "iommu_unmap": "unmap_calls",
              "iotlb_sync": "sync_calls", "mmu_zap": "mmu_calls",
              "mmu_notifier": "mmu_notifier_calls"}


def assert_hits_are_the_calls(meta: dict, rows: list) -> dict[str, int]:
    """Each window counted one probe run of each type per call its hooks of that type
    timed (a pair per call), and one entry run per vCPU kick; and every type that ran
    has a calibrated cost.  Returns the hits per type over ``rows``."""
    modes = meta["probe_modes"]
    for r in rows:
        want = {"fentry": 0, "kprobe": 0}
        for hook, col in HOOK_CALLS.items():
            if modes.get(hook) in want:
                want[modes[hook]] += getattr(r, col)
        got = {"fentry": r.fentry_hits, "kprobe": r.kprobe_hits}
        assert got == want and r.entry_hits == r.vcpu_kicks, (r, modes)
    totals = {t: sum(getattr(r, f"{t}_hits") for r in rows) for t in ("fentry", "kprobe", "entry")}
    costs = meta["probe_costs"]
    for t, n in totals.items():
        if n:
            assert t in costs["types"] and costs[t]["median_ns"] > 0, costs
    return totals


def assert_no_kernel_drops(meta: dict) -> dict[str, int]:
    """Every map and window the BPF side keeps had room (kernel_drops all zero).

    skipped_runs is the exception: the lab's own block and network devices unmap DMA in
    interrupt context, and one such unmap that lands while our program for the same hook
    runs on that CPU is skipped by the kernel (recursion_misses), counted, and not ours
    to prevent.  An interrupt never runs in a switch's window on its thread's stack, so
    the caller's switch-for-switch checks still hold exactly.  Returns the skipped runs
    per program, for the caller to print."""
    background = meta["background"]
    drops = {k: v for k, v in background["kernel_drops"].items() if k != "skipped_runs"}
    assert not any(drops.values()), background
    return background.get("skipped_runs") or {}
