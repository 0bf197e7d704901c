"""Inside the lab VM (or on a host with edu devices): pf_sched up, down and status.

The lab gives one QEMU ``edu`` device (1234:11e8) per simulated PF; ``up`` loads the
pf_sched built for the running kernel and hands it every free edu device through
``driver_override``.
"""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

from .. import paths
from ..errors import VftraceError

EDU_VENDOR, EDU_DEVICE = "0x1234", "0x11e8"
PCI = Path("/sys/bus/pci")
DEBUGFS = Path("/sys/kernel/debug/pf_sched")
PARAMS = ("slice_us", "nr_vfs", "bar_pages", "unmap_mode")
MODULE_PARAMS = Path("/sys/module/pf_sched/parameters")
# pf_sched's own limits (kmod/pf_sched_main.c), checked here so a typo is not an insmod error.
PARAM_RANGES = {"slice_us": (0, 10_000_000), "nr_vfs": (1, 64), "bar_pages": (1, 256)}
RUNTIME_PARAMS = ("slice_us", "unmap_mode")      # writable while loaded (0644); others 0444
MISC = Path("/sys/class/misc")                    # /dev/pf_sched<N>, one per PF


class GuestError(VftraceError):
    """A one-line reason pf_sched cannot be set up, taken down or read."""


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


# -- reading and setting the loaded module: the one copy every caller uses ---------------

def read_stats(path: Path) -> dict[str, int | str]:
    """One PF's debugfs ``stats`` file: ``key value`` lines, integers as int."""
    out: dict[str, int | str] = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(" ")
        out[key] = int(value) if value.lstrip("-").isdigit() else value
    return out


def stats(bdf: str) -> dict[str, int | str]:
    """The counters pf_sched keeps for the PF at ``bdf`` (needs root and debugfs)."""
    return read_stats(DEBUGFS / bdf / "stats")


HIST_SUB = 16          # pf_sched's total_hist: buckets per power of two (PF_HIST_SUB)


def parse_hist(text: str) -> dict[int, int]:
    """A ``total_hist`` file: {bucket's smallest ns: switches}; a bucket from LOW >= 16
    spans LOW / 16 ns (below 16 each ns has its own)."""
    out: dict[int, int] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            if line.split()[1:2] == ["sub_buckets"] and int(line.split()[2]) != HIST_SUB:
                raise ValueError(f"total_hist has {line.split()[2]} sub-buckets, "
                                 f"this reader {HIST_SUB}")
            continue
        low, count = line.split()
        out[int(low)] = int(count)
    return out


def total_hist(bdf: str) -> dict[int, int]:
    """pf_sched's histogram of its own switch timings (t2 - t0, total_ns) for one PF."""
    return parse_hist((DEBUGFS / bdf / "total_hist").read_text())


def hist_delta(after: dict[int, int], before: dict[int, int]) -> dict[int, int]:
    """The switches between two reads of a histogram."""
    return {low: n - before.get(low, 0) for low, n in after.items() if n - before.get(low, 0)}


def hist_bucket_low(ns: int) -> int:
    """The smallest value of the total_hist bucket that ``ns`` falls in (the module's
    pf_hist_bucket then pf_hist_low, for values up to 2^39 ns)."""
    if ns < HIST_SUB:
        return ns
    shift = ns.bit_length() - HIST_SUB.bit_length()     # keep the top 5 bits
    return (ns >> shift) << shift


def hist_width(low: int) -> int:
    return 1 if low < HIST_SUB else low // HIST_SUB


def hist_quantile(hist: dict[int, int], q: float) -> float | None:
    """The q-quantile (0..1) of a histogram, interpolated inside its bucket: within one
    bucket's width (under 1/16 of its value) of the exact one."""
    total = sum(hist.values())
    if not total:
        return None
    rank, seen = q * total, 0
    for low in sorted(hist):
        n = hist[low]
        if seen + n >= rank:
            return low + hist_width(low) * (rank - seen) / n
        seen += n
    low = max(hist)
    return float(low + hist_width(low))


def param(name: str) -> str:
    return (MODULE_PARAMS / name).read_text().strip()


def set_param(name: str, value) -> None:
    (MODULE_PARAMS / name).write_text(str(value))


def layout() -> dict[int, int] | None:
    """PF index -> VF count of the loaded pf_sched (None: not loaded, or not readable)."""
    found: dict[int, int] = {}
    for path in DEBUGFS.glob("*/stats"):            # per PF, needs root
        try:
            kv = read_stats(path)
            found[int(kv["pf"])] = int(kv["nr_vfs"])
        except (OSError, KeyError, ValueError):
            continue
    if found:
        return found
    try:                                  # no debugfs: the devices and the module parameter
        nr_vfs = int(param("nr_vfs"))
    except (OSError, ValueError):
        return None
    for dev in MISC.glob("pf_sched[0-9]*"):
        found[int(dev.name[len("pf_sched"):])] = nr_vfs
    return found or None


def check_params(params: dict[str, object]) -> None:
    for name, (lo, hi) in PARAM_RANGES.items():
        value = params.get(name)
        if value is not None and not lo <= value <= hi:
            raise GuestError(f"--{name.replace('_', '-')} {value}: give {lo} to {hi}")


def apply_to_loaded(params: dict[str, object]) -> None:
    """pf_sched is already loaded: set what can change at run time, refuse the rest
    rather than ignore it."""
    for name, value in params.items():
        if value is None:
            continue
        if name in RUNTIME_PARAMS:
            (MODULE_PARAMS / name).write_text(str(value))
            continue
        current = (MODULE_PARAMS / name).read_text().strip()
        if current != str(value):
            raise GuestError(f"--{name.replace('_', '-')} {value}: pf_sched is loaded with "
                             f"{name} {current}; run `vftrace pf-sched down` first")


def up(params: dict[str, object]) -> list[str]:
    check_params(params)
    if loaded():
        apply_to_loaded(params)
    else:
        ko = kmod_path()
        if not ko.exists():
            raise GuestError(f"{ko} is not built: run `make kmod` on the host")
        args = [f"{k}={v}" for k, v in params.items() if v is not None]
        r = subprocess.run(["insmod", str(ko), *args], capture_output=True, text=True)
        if r.returncode:
            why = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
            raise GuestError(f"insmod pf_sched failed: {why} (see dmesg)")
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
        try:
            r = subprocess.run(["rmmod", "pf_sched"], capture_output=True, text=True)
        except OSError as e:
            raise GuestError(f"cannot run rmmod: {e.strerror}") from None
        if r.returncode:
            why = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
            held = ", ".join(f"pid {pid} ({comm})" for pid, comm in holders())
            raise GuestError(f"rmmod pf_sched failed: {why}; " + (
                f"/dev/pf_sched* is held by {held}: stop them and retry" if held else
                "no process has /dev/pf_sched* open or mapped (see lsmod and dmesg)"))


def holders(proc: Path = Path("/proc")) -> list[tuple[int, str]]:
    """(pid, command name) of the processes with a /dev/pf_sched* device open or mapped
    (a guest's BAR mmap outlives the close of its file descriptor)."""
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        if _opens_pf_sched(entry) or _maps_pf_sched(entry):
            try:
                comm = (entry / "comm").read_text().strip()
            except OSError:
                comm = "?"
            found.append((int(entry.name), comm))
    return sorted(found)


def _opens_pf_sched(pid_dir: Path) -> bool:
    try:
        fds = list((pid_dir / "fd").iterdir())
    except OSError:                       # gone, or not ours to look at
        return False
    for fd in fds:
        try:
            if os.readlink(fd).startswith("/dev/pf_sched"):
                return True
        except OSError:
            continue
    return False


def _maps_pf_sched(pid_dir: Path) -> bool:
    try:
        with open(pid_dir / "maps") as f:
            return any(" /dev/pf_sched" in line for line in f)
    except OSError:
        return False


def status() -> str:
    if not loaded():
        return "pf_sched is not loaded"
    lines = []
    for d in sorted(DEBUGFS.glob("*/stats")):
        kv = read_stats(d)
        lines.append(f"{d.parent.name}: /dev/pf_sched{kv.get('pf')} mode={kv.get('mode')} "
                     f"unmap={kv.get('unmap_mode')} vfs={kv.get('nr_vfs')} "
                     f"active={kv.get('active_vf')} switches={kv.get('switches')}")
    slice_us = param("slice_us")
    return f"pf_sched: slice {slice_us} us, {len(lines)} PF(s)\n" + "\n".join(lines)


def main(args) -> int:
    given = [p for p in PARAMS if getattr(args, p) is not None]
    if given and args.action != "up":
        raise GuestError(f"--{given[0].replace('_', '-')} sets up pf_sched; `vftrace pf-sched "
                         f"{args.action}` takes no parameters")
    if args.action == "up":
        bdfs = up({p: getattr(args, p) for p in PARAMS})
        print(f"pf_sched is switching on {len(bdfs)} PF(s): {', '.join(bdfs)}")
    elif args.action == "down":
        down()
    print(status())
    return 0
