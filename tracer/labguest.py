"""Inside the lab VM (or on a host with edu devices): pf_sched up, down and status.

The lab gives one QEMU ``edu`` device (1234:11e8) per simulated PF; ``up`` loads the
pf_sched built for the running kernel and hands it every free edu device through
``driver_override``.
"""
from __future__ import annotations

import platform
import subprocess
from pathlib import Path

from . import paths

EDU_VENDOR, EDU_DEVICE = "0x1234", "0x11e8"
PCI = Path("/sys/bus/pci")
DEBUGFS = Path("/sys/kernel/debug/pf_sched")
PARAMS = ("slice_us", "nr_vfs", "bar_pages", "unmap_mode")


class GuestError(Exception):
    pass


def kmod_path(name: str = "pf_sched") -> Path:
    root = paths.source_tree() or Path.cwd()
    return root / "build" / "kmod" / platform.release() / f"{name}.ko"


def edu_devices() -> list[str]:
    """PCI names of the edu devices, in bus order."""
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
        raise GuestError(f"{bdf}: {driver} did not bind (see dmesg)")


def loaded() -> bool:
    return Path("/sys/module/pf_sched").is_dir()


def up(params: dict[str, object]) -> list[str]:
    if not loaded():
        ko = kmod_path()
        if not ko.exists():
            raise GuestError(f"{ko} is not built: run `make kmod` on the host")
        args = [f"{k}={v}" for k, v in params.items() if v is not None]
        r = subprocess.run(["insmod", str(ko), *args], capture_output=True, text=True)
        if r.returncode:
            raise GuestError(f"insmod pf_sched failed: {r.stderr.strip()} (see dmesg)")
    free = [d for d in edu_devices() if current_driver(d) is None]
    if not free and not any(current_driver(d) == "pf_sched" for d in edu_devices()):
        raise GuestError("no free edu device to bind (boot the lab with --pfs N)")
    for bdf in free:
        bind(bdf, "pf_sched")
    return [d for d in edu_devices() if current_driver(d) == "pf_sched"]


def down() -> None:
    for bdf in edu_devices():
        if current_driver(bdf) == "pf_sched":
            unbind(bdf)
    if loaded():
        subprocess.run(["rmmod", "pf_sched"], check=True)


def status() -> str:
    if not loaded():
        return "pf_sched is not loaded"
    lines = []
    for d in sorted(DEBUGFS.glob("*/stats")):
        kv = dict(line.split(" ", 1) for line in d.read_text().splitlines() if " " in line)
        lines.append(f"{d.parent.name}: /dev/pf_sched{kv.get('pf')} mode={kv.get('mode')} "
                     f"unmap={kv.get('unmap_mode')} vfs={kv.get('nr_vfs')} "
                     f"active={kv.get('active_vf')} switches={kv.get('switches')}")
    slice_us = Path("/sys/module/pf_sched/parameters/slice_us").read_text().strip()
    return f"pf_sched: slice {slice_us} us, {len(lines)} PF(s)\n" + "\n".join(lines)


def main(args) -> int:
    if args.action == "up":
        bdfs = up({p: getattr(args, p) for p in PARAMS})
        print(f"pf_sched is switching on {len(bdfs)} PF(s): {', '.join(bdfs)}")
    elif args.action == "down":
        down()
    print(status())
    return 0
