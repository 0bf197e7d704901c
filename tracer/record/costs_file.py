"""Probe costs saved by ``vftrace calibrate --switches -o FILE`` and read back by
``record``/``live``/``serve --costs FILE``: measured once on real switches (tens of
seconds), used by every capture made on that kernel instead of the start-up calibration.

The file says the kernel it was measured on and the hit types it has a cost for; a
capture may use it only on that kernel, and only if every probe type its depth runs in a
window has a cost there.  Anything else is refused in one line before anything loads.
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

from ..capture.output import atomic_output
from ..errors import VftraceError

FORMAT = "vftrace-probe-costs/1"


def save(path: Path, plan, probe_costs: dict, floor: dict) -> None:
    """Written whole or not at all, never through a symlink (capture/output.py)."""
    with atomic_output(path) as f:
        f.write(json.dumps({
            "format": FORMAT, "kernel": platform.release(), "host": platform.node(),
            "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "depth": plan.depth, "probe_modes": plan.modes(), "floor_ns": floor,
            "probe_costs": probe_costs}, indent=2) + "\n")


def load(path_arg: str, flag: str = "--costs") -> dict:
    """The file's probe costs, with where they came from (kept in the capture's meta)."""
    path = Path(path_arg)
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        raise VftraceError(f"{flag} {path}: no such file (make one with "
                           "vftrace calibrate --switches -o FILE)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VftraceError(f"{flag} {path}: not a probe-costs file ({e})") from None
    if not isinstance(saved, dict) or saved.get("format") != FORMAT or \
            not isinstance(saved.get("probe_costs"), dict):
        raise VftraceError(f"{flag} {path}: not a probe-costs file (want format {FORMAT}, "
                           "from vftrace calibrate --switches -o FILE)")
    if saved.get("kernel") != platform.release():
        raise VftraceError(f"{flag} {path}: measured on kernel {saved.get('kernel')}, this is "
                           f"{platform.release()}; calibrate again on this kernel")
    return {**saved["probe_costs"], "file": str(path), "measured": saved.get("measured"),
            "measured_depth": saved.get("depth")}


def check(costs: dict, hit_types, flag: str = "--costs") -> None:
    """Refuse a file without a cost for one of the types this plan's windows run."""
    from ..model.correction import Cost
    missing = [t for t in hit_types if Cost.of(costs.get(t)) is None]
    if missing:
        raise VftraceError(f"{flag} {costs.get('file')}: no cost for {', '.join(missing)} "
                           f"probes (measured at --depth {costs.get('measured_depth')}); "
                           "calibrate at this --depth and --probe-mode")
