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
import time
from dataclasses import dataclass, field

from . import layout
from .probes import FENTRY, KPROBE

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


# --- on real switches ---------------------------------------------------------------------

SWITCH_ROUNDS = 9
SWITCH_ARM = 100             # accepted switches per arm
ARM_TIMEOUT_S = 10.0         # an arm that sees fewer switches ends here (counted short)
ARM_READ_S = 0.25            # an arm's records are read this often (a few hundred at most)


class SwitchCostCalibration:
    """What one probe run costs a *real* switch: the source's own switches, with the
    production hooks of one type detached (without) and attached (with), in ABBA rounds.

    The synthetic calibration above times a hot loop of calls; a real switch runs its
    probes once each between other work, so their code and maps are cold and each run
    costs more (x3-x7 in the TCG lab).  Here the workload is the switch itself: the cost
    of a type is (median switch with - median switch without) over the with-arm's runs
    of that type per switch, per round; its median over rounds, its spread their
    p10-p90.  Which arm a record belongs to is read from its own hit counts (0 runs of
    the type: without), so a record still in the buffer when the hooks flip is never
    misfiled, and a switch the flip cut in two (fewer runs than its arm's usual) is left
    out.

    Use: ``cal = SwitchCostCalibration(plan)``; ``Engine(plan, on_switch=cal.collect)``;
    ``engine.start()``; ``cal.run(engine)``.
    """

    def __init__(self, plan, *, rounds: int = SWITCH_ROUNDS, per_arm: int = SWITCH_ARM,
                 arm_timeout_s: float = ARM_TIMEOUT_S, read_every_s: float = ARM_READ_S) -> None:
        self.plan, self.rounds, self.per_arm, self.arm_timeout_s = \
            plan, rounds, per_arm, arm_timeout_s
        self.read_every_s = read_every_s
        self._arm: list[tuple[int, tuple[int, int, int]]] | None = None

    def collect(self, rec) -> None:
        """The engine's ``on_switch``: keeps (the corrected base, hits) while an arm runs."""
        if self._arm is not None:
            base = rec.source_ns if rec.source_ns > 0 else rec.switch_ns
            self._arm.append((base, (rec.fentry_hits, rec.kprobe_hits, rec.entry_hits)))

    # -- which hooks are of a type, and flipping them --------------------------------
    def hooks(self, hit_type: str) -> list[tuple[object, str]]:
        """(choice, function) of every hook whose runs count as ``hit_type``."""
        mode, timed = {"fentry": (FENTRY, True), "kprobe": (KPROBE, True),
                       "entry": (KPROBE, False)}[hit_type]
        return [(c, fn) for c in self.plan.choices
                if c.mode == mode and c.hook.timed == timed for fn in c.functions]

    def _flip(self, bpf, hit_type: str, on: bool) -> None:
        for choice, fn in self.hooks(hit_type):
            if hit_type == "fentry":
                if on:
                    bpf.attach_kfunc(fn_name=fn.encode())
                    bpf.attach_kretfunc(fn_name=fn.encode())
                else:
                    bpf.detach_kretfunc(fn_name=fn.encode())
                    bpf.detach_kfunc(fn_name=fn.encode())
                continue
            name = choice.hook.kprobe
            if on:
                bpf.attach_kprobe(event=fn, fn_name=f"kp_{name}")
                if choice.hook.timed:
                    bpf.attach_kretprobe(event=fn, fn_name=f"krp_{name}",
                                         maxactive=self.plan.kretprobe_maxactive())
            else:
                if choice.hook.timed:
                    bpf.detach_kretprobe(event=fn)
                bpf.detach_kprobe(event=fn)

    # -- measuring ------------------------------------------------------------------
    def _flip_and_discard(self, engine, hit_type: str, on: bool) -> None:
        """Flip, then drop what the buffer holds: a flip takes seconds under emulation
        (every attach patches kernel text), and the switches made meanwhile ran some of
        the hooks only; left in, they outnumbered the arm's whole ones (lab, 2 PFs)."""
        self._flip(engine.bpf, hit_type, on)
        engine.poll(0)

    def _run_arm(self, engine, index: int, with_probe: bool, short: list[int]) -> list:
        """One arm's records, read in batches rather than as they come: a reader woken per
        record would run while the switches it measures do, and under emulation (one TCG
        thread for every vCPU) take the thread from them; a host's spare CPU would not."""
        self._arm = []
        deadline = time.monotonic() + self.arm_timeout_s
        while time.monotonic() < deadline:
            time.sleep(self.read_every_s)
            engine.poll(0)
            if sum(1 for _, h in self._arm if (h[index] > 0) == with_probe) >= self.per_arm:
                break
        else:
            short[0] += 1
        got, self._arm = self._arm, None
        return [(ns, h[index]) for ns, h in got if (h[index] > 0) == with_probe]

    def run(self, engine, synthetic: dict | None = None,
            progress=lambda msg: None) -> tuple[dict, list[str]]:
        """(``probe_costs`` for a capture's meta, warnings).  A type no real switch ran
        (kicks with no guest running) keeps its ``synthetic`` cost, said in its entry."""
        warnings: list[str] = []
        types = self.plan.hit_types()
        meta: dict = {"method": "switches", "types": list(types), "rounds": self.rounds,
                      "switches_per_arm": self.per_arm, "source": self.plan.source,
                      "depth": self.plan.depth}
        index = {"fentry": 0, "kprobe": 1, "entry": 2}
        for hit_type in types:
            run, short, used, detail = CostRun(), [0], 0, []
            for r in range(self.rounds):
                progress(f"{hit_type}: round {r + 1} of {self.rounds}")
                self._flip_and_discard(engine, hit_type, False)
                without = self._run_arm(engine, index[hit_type], False, short)
                self._flip_and_discard(engine, hit_type, True)
                with_ = self._run_arm(engine, index[hit_type], True, short)
                if not with_ and without:
                    break               # switches come, none runs this type: no guests?
                with_ += self._run_arm(engine, index[hit_type], True, short)
                self._flip_and_discard(engine, hit_type, False)
                without += self._run_arm(engine, index[hit_type], False, short)
                self._flip(engine.bpf, hit_type, True)          # as production has it
                if not with_ or not without:
                    continue
                usual = statistics.mode(h for _, h in with_)
                whole = [ns for ns, h in with_ if h == usual]
                bare = [ns for ns, _ in without]
                run.miscounted += len(with_) - len(whole)
                used += len(whole) + len(bare)
                run.per_round_ns.append((statistics.median(whole) -
                                         statistics.median(bare)) / usual)
                detail.append({"runs": usual, "cost_ns": round(run.per_round_ns[-1], 1),
                               "with": arm_figures(whole), "without": arm_figures(bare)})
            if not run.per_round_ns:
                kept = (synthetic or {}).get(hit_type)
                if kept:
                    meta[hit_type] = {**kept, "method": "synthetic"}
                warnings.append(f"probe costs: no switch ran a {hit_type} probe; "
                                + ("its synthetic cost is kept" if kept else
                                   f"{hit_type} hits left uncorrected"))
                continue
            meta[hit_type] = {**run.as_meta(), "method": "switches", "switches": used,
                              "per_round": detail}
            if short[0]:
                warnings.append(f"probe costs: {short[0]} {hit_type} arms ended after "
                                f"{self.arm_timeout_s:.0f} s with fewer than {self.per_arm} "
                                "switches (is the source switching?)")
        return meta, warnings


def arm_figures(values: list[float]) -> dict:
    """p50 and p90 (nearest rank) and the count of one arm's switches."""
    v = sorted(values)
    return {"p50_ns": v[max(0, -(-len(v) // 2) - 1)], "p90_ns": v[max(0, -(-len(v) * 9 // 10) - 1)],
            "n": len(v)}


def held_out(entry: dict) -> dict | None:
    """How well the cost corrects switches it was not measured on: for each round, the
    with-arm's p50 and p90 less its runs times the median cost of the *other* rounds,
    against the same round's switches with the hooks detached (interleaved within
    seconds, so the lab's drift is out of it).  Relative errors: their median and range."""
    rounds = (entry or {}).get("per_round") or []
    if len(rounds) < 3:
        return None
    costs = [r["cost_ns"] for r in rounds]
    out: dict = {}
    for q in ("p50_ns", "p90_ns"):
        errs = []
        for i, r in enumerate(rounds):
            others = costs[:i] + costs[i + 1:]
            corrected = r["with"][q] - r["runs"] * statistics.median(others)
            errs.append(corrected / r["without"][q] - 1)
        out[q] = {"median": statistics.median(errs), "min": min(errs), "max": max(errs)}
    return out
