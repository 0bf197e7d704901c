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

REPO = Path(__file__).resolve().parents[2]
EDU_VENDOR, EDU_DEVICE = "0x1234", "0x11e8"
PCI = Path("/sys/bus/pci")


def kernel_release() -> str:
    return platform.release()


def kmod_path(name: str = "pf_sched") -> Path:
    """The module built for the running kernel by ``make kmod`` (build/kmod/<release>/)."""
    return REPO / "build" / "kmod" / kernel_release() / f"{name}.ko"


def edu_devices() -> list[str]:
    """PCI names (0000:00:0a.0, ...) of the lab's edu devices, in bus order."""
    found = []
    for dev in sorted((PCI / "devices").iterdir()):
        if (dev / "vendor").read_text().strip() == EDU_VENDOR and \
                (dev / "device").read_text().strip() == EDU_DEVICE:
            found.append(dev.name)
    return found


def current_driver(bdf: str) -> str | None:
    link = PCI / "devices" / bdf / "driver"
    return link.resolve().name if link.exists() else None


def unbind(bdf: str) -> None:
    drv = current_driver(bdf)
    if drv:
        (PCI / "drivers" / drv / "unbind").write_text(bdf)
    (PCI / "devices" / bdf / "driver_override").write_text("\n")


def bind(bdf: str, driver: str) -> None:
    """Hand ``bdf`` to ``driver`` through driver_override (the driver must be loaded)."""
    unbind(bdf)
    (PCI / "devices" / bdf / "driver_override").write_text(driver)
    (PCI / "drivers_probe").write_text(bdf)
    if current_driver(bdf) != driver:
        raise RuntimeError(f"{bdf}: {driver} did not bind (see dmesg)")


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
