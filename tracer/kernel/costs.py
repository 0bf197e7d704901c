"""What one run of each of vftrace's probe types costs a window, measured on the
production code path before recording starts.

Our own task opens a window as a switch source would (``prctl(VFT_COST_BEGIN)``, seen by
``kp_cost_bookend``), calls a near-empty kernel function ``CALLS`` times, and closes it
(``prctl(VFT_COST_END)``); the kernel's record of that window (``cost_window``) says how
long it was and how many probe runs it counted.  The production programs of one type
are attached to that function for half the windows, in ABBA order (without, with,
with, without) so that drift cancels: ``kp_unmap``/``krp_unmap`` (a kprobe pair),
``kp_kick`` (an entry kprobe), and the fentry pair of ``call_enter``/``call_exit``
compiled for it (an fentry program is bound to its function at load).  One round gives
(median with - median without) / CALLS; the cost is the median over rounds, its spread
their p10-p90.  The windows go through ``window_begin``/``window_end`` and each run
through the same handler code a switch's calls do.
"""
from __future__ import annotations

import ctypes
import os
import statistics
from dataclasses import dataclass, field

from . import layout

ROUNDS = 9
WINDOWS = 11         # per arm of a round
CALLS = 64           # probe runs per window


@dataclass
class CostRun:
    """One type's rounds."""
    per_round_ns: list[float] = field(default_factory=list)
    miscounted: int = 0          # windows whose hit count was not CALLS (or 0 without)

    def as_meta(self) -> dict:
        v = sorted(self.per_round_ns)
        q = statistics.quantiles(v, n=10, method="inclusive") if len(v) > 1 else v * 9
        return {"median_ns": round(statistics.median(v), 1), "p10_ns": round(q[0], 1),
                "p90_ns": round(q[-1], 1), "rounds": len(v), "miscounted": self.miscounted}


class CostCalibration:
    """Runs the calibration on a loaded BPF program (``bpf``: BCC's BPF object)."""

    def __init__(self, bpf, func: str, bookend: str, types: tuple[str, ...],
                 fentry_compiled: bool, drain=lambda: None) -> None:
        """``drain`` empties the output buffers: with --calls every run emits a call
        record, as in production, and a full buffer would count them as lost."""
        self.bpf, self.func, self.bookend, self.drain = bpf, func, bookend, drain
        self.types = tuple(t for t in types if t != "fentry" or fentry_compiled)
        self.fentry_compiled = fentry_compiled
        c = layout.header().constants
        self.begin, self.end = c["VFT_COST_BEGIN"], c["VFT_COST_END"]
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong,
                                    ctypes.c_ulong, ctypes.c_ulong]
        self.pid = os.getpid()
        self._fentry_on = fentry_compiled        # BCC attached it at load

    # -- attaching ------------------------------------------------------------------
    def _fentry(self, on: bool) -> None:
        if on == self._fentry_on:
            return
        name = self.func.encode()
        if on:
            self.bpf.attach_kfunc(fn_name=name)
            self.bpf.attach_kretfunc(fn_name=name)
        else:
            self.bpf.detach_kretfunc(fn_name=name)
            self.bpf.detach_kfunc(fn_name=name)
        self._fentry_on = on

    def _attach(self, hit_type: str, on: bool) -> None:
        if hit_type == "fentry":
            self._fentry(on)
        elif hit_type == "kprobe":
            if on:
                self.bpf.attach_kprobe(event=self.func, fn_name="kp_unmap")
                self.bpf.attach_kretprobe(event=self.func, fn_name="krp_unmap")
            else:
                self.bpf.detach_kretprobe(event=self.func)
                self.bpf.detach_kprobe(event=self.func)
        elif on:
            self.bpf.attach_kprobe(event=self.func, fn_name="kp_kick")
        else:
            self.bpf.detach_kprobe(event=self.func)

    # -- measuring ------------------------------------------------------------------
    def _window(self) -> tuple[int, int]:
        """One window's (switch_ns, probe runs counted in it)."""
        prctl, getpgid, pid = self.libc.prctl, os.getpgid, self.pid
        prctl(self.begin, 0, 0, 0, 0)
        for _ in range(CALLS):
            getpgid(pid)
        prctl(self.end, 0, 0, 0, 0)
        rec = self.bpf["cost_window"][ctypes.c_int(0)]
        return int(rec.switch_ns), int(rec.fentry_hits + rec.kprobe_hits + rec.entry_hits)

    def _arm(self, run: CostRun, with_probe: bool) -> list[int]:
        out = []
        for _ in range(WINDOWS):
            ns, hits = self._window()
            if hits != (CALLS if with_probe else 0):
                run.miscounted += 1
                continue
            out.append(ns)
        self.drain()
        return out

    def run(self) -> tuple[dict, list[str]]:
        """(``probe_costs`` for the capture's meta, warnings)."""
        warnings: list[str] = []
        meta: dict = {"function": self.func, "calls_per_window": CALLS, "windows": WINDOWS,
                      "types": list(self.types)}
        if not self.types:
            self._fentry(False)
            return meta, warnings
        calibrating = self.bpf["calibrating"]
        self._fentry(False)
        self.bpf.attach_kprobe(event=self.bookend, fn_name="kp_cost_bookend")
        calibrating[ctypes.c_int(0)] = ctypes.c_uint32(1)
        try:
            self._window()                       # warm: first-touch of the maps
            for hit_type in self.types:
                run = CostRun()
                for _ in range(ROUNDS):
                    without = self._arm(run, False)
                    self._attach(hit_type, True)
                    with_ = self._arm(run, True) + self._arm(run, True)
                    self._attach(hit_type, False)
                    without += self._arm(run, False)
                    if without and with_:
                        run.per_round_ns.append(
                            (statistics.median(with_) - statistics.median(without)) / CALLS)
                if not run.per_round_ns:
                    warnings.append(f"probe costs: no {hit_type} window counted its "
                                    f"{CALLS} runs; {hit_type} hits left uncorrected")
                    continue
                meta[hit_type] = run.as_meta()
                if run.miscounted:
                    warnings.append(f"probe costs: {run.miscounted} {hit_type} calibration "
                                    "windows miscounted their probe runs and were left out")
        finally:
            calibrating[ctypes.c_int(0)] = ctypes.c_uint32(0)
            self.bpf.detach_kprobe(event=self.bookend)
        return meta, warnings
