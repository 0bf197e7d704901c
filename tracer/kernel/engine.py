"""The live BPF source: compiles vftrace.bpf.c with BCC, attaches it, measures its own
floor, and turns ring-buffer samples into SwitchRecords and CallRecords."""
from __future__ import annotations

import ctypes
import os
import statistics
import time
import sys
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

import numpy as np

from . import costs, layout, probes, proginfo, ringread
from .assemble import Assembler
from .histograms import HistogramReader
from ..paths import bpf_dir
from .probes import ABSENT, FENTRY, KPROBE, Plan
from ..model import kernel_hist
from ..model.kernel_hist import RAW_PHASES, KernelHist
from ..model.schema import CALL_COLUMNS, COLUMNS, INT64_MAX, CallRecord, SwitchRecord

CALIB_CALLS = 3000
EXIT_END_WAIT_S = 1.0      # at stop, the longest wait for the last windows' exit ends
# What the kernel's vft_switch gives, in SwitchRecord order: all but over_budget, which is
# decided here and spliced in (blocked_* are absent from it and read as 0 until joins
# add to them).
OVER_BUDGET = COLUMNS.index("over_budget")
SWITCH_READ = tuple(c for c in COLUMNS if c != "over_budget")
SWITCH_NS = COLUMNS.index("switch_ns")
CALL_READ = ("kind", *CALL_COLUMNS[1:])
CALL_SEQ = CALL_COLUMNS.index("seq")
CALL_PF = CALL_COLUMNS.index("pf")


@dataclass
class Floor:
    """What a probe pair adds to a near-empty call, per probe mode."""
    func: str | None = None
    modes: dict[str, dict] = field(default_factory=dict)

    def as_meta(self) -> dict:
        return {"function": self.func, **self.modes}


def program_text(plan: Plan, calib_tgid: int) -> str:
    """The program as BCC compiles it: the defines, then the source (for --ebpf)."""
    defines = [f.removeprefix("-D").replace("=", " ", 1) for f in plan.cflags(bpf_dir(), calib_tgid)
               if f.startswith("-D")]
    src = (bpf_dir() / "vftrace.bpf.c").read_text()
    hdr = (bpf_dir() / "vftrace.h").read_text()
    src = src.replace('#include "vftrace.h"\n', hdr)
    return "".join(f"#define {d}\n" for d in defines) + "\n" + src


class ReaderGaps:
    """How long the buffers went unread: the longest time between the ends of two reads
    (a wait of up to the poll's timeout, the handling, and whatever kept the reader from
    coming back: a front end, another thread holding the GIL, a descheduled vCPU).
    Records are lost when that outlasts what the buffer holds at the switch rate, so a
    lossy capture says whether its reader paused, when, and for how long."""

    LONG_S = 1.0

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.first = self.last = None
        self.longest_s, self.longest_at_s, self.over_1s = 0.0, None, 0

    def armed(self) -> None:
        """The buffers start filling: the wait until the first read is a gap too (the
        calibration's reads before arming are not)."""
        self.first = self.last = self.clock()
        self.longest_s, self.longest_at_s, self.over_1s = 0.0, None, 0

    def read(self) -> None:
        now = self.clock()
        if self.last is None:
            self.first = now
        else:
            gap = now - self.last
            if gap > self.longest_s:
                self.longest_s, self.longest_at_s = gap, self.last - self.first
            self.over_1s += gap > self.LONG_S
        self.last = now

    def as_meta(self) -> dict:
        return {"longest_s": round(self.longest_s, 3),
                "longest_at_s": None if self.longest_at_s is None else round(self.longest_at_s, 3),
                "over_1s": self.over_1s}


class Engine:
    def __init__(self, plan: Plan, *, budget_ns: int,
                 on_switch: Callable[[SwitchRecord], None] | None = None,
                 on_call: Callable[[CallRecord], None] | None = None, hold_ns: int = 250_000_000,
                 probe_costs: dict | None = None,
                 on_switch_rows: Callable[[np.ndarray], None] | None = None):
        """Switches go to ``on_switch`` one record at a time, or to ``on_switch_rows`` a
        batch at a time (an int64 array, ``COLUMNS`` order: no Python per switch).
        ``probe_costs``: costs measured on real switches beforehand (vftrace calibrate
        --switches); given, the start-up cost calibration is skipped."""
        self.plan, self.budget_ns, self.on_call = plan, budget_ns, on_call
        self.saved_costs = probe_costs
        self.assembler = Assembler(on_switch, hold_ns, emit_rows=on_switch_rows)
        self.kinds = layout.header().kinds()
        self.bpf = None
        self.histograms: HistogramReader | None = None
        self.floor = Floor(plan.calib_func)
        self.probe_costs: dict = {}     # costs.CostCalibration's, for the capture's meta
        self.warnings: list[str] = plan.warnings()
        self.user_lost = 0          # perf buffer losses reported to user space
        self.samples = 0
        # Records with a value no capture can hold (above int64: a wrapped negative that a
        # kernel-side guard missed): counted, never written (the reader would refuse it).
        self.out_of_range = 0
        self.rings: ringread.MappedRings | None = None      # else BCC's callbacks
        self.reader = "perf" if not plan.ringbuf else "callback"   # which reader ran (meta)
        self.reader_note: str | None = None         # why the mapped reader did not
        self.unreadable = 0         # ring records of a size not ours, skipped (a bug if any)
        self.reads = ReaderGaps()
        self.hist_corrected = False     # the kernel keeps corrected histograms (costs set)

    # -- set-up -------------------------------------------------------------------------
    def start(self) -> None:
        from bcc import BPF
        self.bpf = BPF(src_file=str(bpf_dir() / "vftrace.bpf.c"),
                       cflags=self.plan.cflags(bpf_dir(), os.getpid()))
        self._attach_source()
        self._calibrate()
        self._check_irq_test()
        # Open before the cost calibration: with --calls its windows' calls are emitted
        # as production's are, and drained (and dropped: VFT_COST_PF) between its batches.
        self._open_buffers()
        self._measure_costs()
        self._set_hist_costs()
        # After the calibrations: they take seconds under emulation, and a kprobe attached
        # before arming runs (and can miss returns) for nothing.
        for choice in self.plan.choices:
            if choice.mode == KPROBE:
                self._attach_kprobes(choice)
        self.bpf["armed"][ctypes.c_int(0)] = ctypes.c_uint32(1)
        self.reads.armed()              # records can pile up from here: gaps count from now

    def _attach_source(self) -> None:
        src, b = self.plan.source, self.bpf
        if src.startswith("func:") and self.plan.source_mode == KPROBE:
            b.attach_kprobe(event=src[5:], fn_name="switch_begin")
            b.attach_kretprobe(event=src[5:], fn_name="switch_end")
        elif src.startswith("tp:"):
            begin, end = src[3:].split(",")
            b.attach_tracepoint(tp=begin, fn_name="switch_begin")
            b.attach_tracepoint(tp=end, fn_name="switch_end")
        # pf_sched's (raw) tracepoints and fentry windows are attached by BCC itself.

    def _attach_kprobes(self, choice: probes.Choice) -> None:
        name = choice.hook.kprobe
        attached = []
        for fn in choice.functions:
            try:
                self.bpf.attach_kprobe(event=fn, fn_name=f"kp_{name}")
                if choice.hook.timed:
                    self.bpf.attach_kretprobe(
                        event=fn, fn_name=f"krp_{name}",
                        maxactive=self.plan.kretprobe_maxactive())
                attached.append(fn)
            except Exception as e:          # BCC raises bare Exception on attach failure
                self.warnings.append(f"{choice.hook.name}: kprobe on {fn} failed ({e}); skipped")
        if not attached:
            choice.mode = ABSENT
        choice.functions = tuple(attached)

    def _calibrate(self) -> None:
        """Time the same probe pair around a near-empty call we make ourselves."""
        func = self.plan.calib_func
        if not func:
            self.warnings.append("floor: no calibration function in this kernel; floor unknown")
            return
        trigger = (lambda: os.getsid(os.getpid())) if func == "security_task_getsid" else os.getpid
        for mode in self.plan.calib_modes:
            count = self.bpf["calib_count"]
            count[ctypes.c_int(0)] = ctypes.c_uint64(0)
            if mode == KPROBE:
                self.bpf.attach_kprobe(event=func, fn_name="kp_calib")
                self.bpf.attach_kretprobe(event=func, fn_name="krp_calib")
            for _ in range(CALIB_CALLS):
                trigger()
            n = min(count[ctypes.c_int(0)].value, layout.header().constants["VFT_CALIB_SAMPLES"])
            table = self.bpf["calib"]
            vals = sorted(table[ctypes.c_int(i)].value for i in range(n))
            if mode == FENTRY:
                self.bpf.detach_kretfunc(fn_name=func.encode())
                self.bpf.detach_kfunc(fn_name=func.encode())
            else:
                self.bpf.detach_kretprobe(event=func)
                self.bpf.detach_kprobe(event=func)
            if len(vals) < 10:
                self.warnings.append(f"floor: {mode} calibration saw {len(vals)} calls of {func}")
                continue
            q = statistics.quantiles(vals, n=10)
            self.floor.modes[mode] = {"median_ns": int(statistics.median(vals)),
                                      "p10_ns": int(q[0]), "p90_ns": int(q[-1]),
                                      "samples": len(vals)}

    def _set_hist_costs(self) -> None:
        """The probe costs, as the corrected columns take them, into the switch
        program's hist_costs: from now on its histograms keep the corrected switch
        time of every switch too (none without costs: nothing would be corrected)."""
        from ..model.correction import Correction
        correction = Correction.from_meta({"probe_costs": self.probe_costs})
        self.hist_corrected = correction is not None
        if correction is None:
            return
        costs = layout.header().structs["vft_hist_costs"](
            *correction.cost_milli_ns, 1)       # fentry, kprobe, entry (HIT_TYPES); set
        self.bpf["hist_costs"][ctypes.c_int(0)] = costs

    def _measure_costs(self) -> None:
        """What each probe type costs a window (costs.py), for the corrected columns."""
        if self.saved_costs is not None:
            self.probe_costs = {**self.saved_costs, "types": list(self.plan.hit_types())}
            if self.plan.cost_func and self.plan.cost_fentry:      # BCC attached it at load
                self.bpf.detach_kretfunc(fn_name=self.plan.cost_func.encode())
                self.bpf.detach_kfunc(fn_name=self.plan.cost_func.encode())
            return
        if not self.plan.cost_func:
            # the types listed without a cost: the capture says it is not corrected
            self.probe_costs = {"types": list(self.plan.hit_types())}
            if self.plan.hit_types():
                self.warnings.append(
                    f"probe costs: need kprobes and {probes.COST_FUNC}/{probes.COST_BOOKEND} "
                    "to measure them; switch times are not corrected for vftrace's own cost")
            return
        self.probe_costs, warnings = costs.CostCalibration(
            self.bpf, self.plan.cost_func, probes.COST_BOOKEND, self.plan.hit_types(),
            self.plan.cost_fentry, drain=self._drain_buffers).run()
        self.warnings.extend(warnings)

    def _check_irq_test(self) -> None:
        """The calibration calls are ours, made in task context: if the BPF side's test put
        any of them in interrupt context, the test is wrong on this kernel, and calls are
        matched to windows by task alone (as before the test existed), said in a warning."""
        if not self.plan.calib_func:
            return
        wrong = int(self.bpf["calib_irq"][ctypes.c_int(0)].value)
        if wrong:
            self.bpf["irq_test_off"][ctypes.c_int(0)] = ctypes.c_uint32(1)
            self.warnings.append(
                f"interrupt context: {wrong} of our own task-context calibration calls looked "
                "like interrupt context; calls are matched to windows by task alone")

    def _open_buffers(self) -> None:
        b = self.bpf
        # Read in this order in every pass (libbpf consumes rings in the order added): a
        # kvm_entry emits an exit's join before its call, so a call read in a pass has its
        # join already in the joins ring, read later in that same pass.  In the final
        # drain the other order could write an exit's call row without adding its time to
        # the switch (CI, 6.12: 59 ms of one switch's exit_ns missing).
        names = [("joins", self._on_join), ("switches", self._on_switch)]
        if self.plan.emit_calls:
            names.insert(0, ("calls", self._on_call))
        if self.plan.ringbuf:
            self.reader_note = ("BCC's callback reader asked for (--callback-reader)"
                                if not self.plan.mapped_reader else ringread.supported())
            if self.reader_note is None:
                self._map_rings([name for name, _ in names])
                return
            if self.plan.mapped_reader:
                self.warnings.append(f"{self.reader_note}: BCC's per-record callback "
                                     "reads the rings instead (slower, same records)")
        for name, cb in names:
            if self.plan.ringbuf:
                # An int back: BCC's wrapper otherwise raises and catches a TypeError
                # converting None, once per record.
                b[name].open_ring_buffer(lambda ctx, data, size, cb=cb: cb(data) or 0)
            else:
                b[name].open_perf_buffer(lambda cpu, data, size, cb=cb: cb(data),
                                         page_cnt=self.plan.ringbuf_pages // 4 or 8,
                                         lost_cb=self._on_perf_lost)

    def _map_rings(self, names: list[str]) -> None:
        """The rings read from their pages, a batch at a time (ringread)."""
        structs = {"switches": "vft_switch", "joins": "vft_join", "calls": "vft_call"}
        handlers = {"switches": self._on_switches, "joins": self._on_joins,
                    "calls": self._on_calls}
        rings = []
        for name in names:
            table = self.bpf[name]
            size = ctypes.sizeof(layout.header().structs[structs[name]])
            rings.append((table.map_fd, ringread.RingPages(table.map_fd, table.max_entries, size),
                          handlers[name]))
        self.rings = ringread.MappedRings(rings)
        self.reader = "mapped"

    # -- running ------------------------------------------------------------------------
    def poll(self, timeout_ms: int = 100) -> None:
        """Wait up to ``timeout_ms`` for records and hand over what the buffers hold.
        Ring wake-ups are batched in the kernel (ring_flags): the buffers are read after
        the wait whether it was woken or not, so a trickle is never older than that."""
        if self.rings is not None:
            self.rings.poll(timeout_ms)
        elif self.plan.ringbuf:
            self.bpf.ring_buffer_poll(timeout_ms)
            self.bpf.ring_buffer_consume()
        else:
            self.bpf.perf_buffer_poll(timeout_ms)
        self.reads.read()
        self.assembler.tick()

    # Per-sample decoding: one precompiled struct per buffer (layout.Header.reader), made
    # on first use; a cached_property is a plain instance attribute after that.
    @cached_property
    def _read_switch(self) -> layout.Reader:
        # its columns, then how many of its exits' ends are still to come as joins
        return layout.header().reader("vft_switch", (*SWITCH_READ, "exits_pending"))

    @cached_property
    def _read_call(self) -> layout.Reader:
        return layout.header().reader("vft_call", CALL_READ)

    @cached_property
    def _read_join(self) -> layout.Reader:
        return layout.header().reader("vft_join", ("kind", "pf", "seq", "ns"))

    @cached_property
    def _cost_pf(self) -> int:
        return layout.header().constants["VFT_COST_PF"]

    @cached_property
    def _join_exit(self) -> int:
        return layout.header().constants["VFT_JOIN_EXIT"]

    # A record read one at a time (BCC's callbacks: ``data`` is its address) or a batch
    # of them (the mapped reader: ring slots back to back) takes the same path from its
    # decoded values on.
    @cached_property
    def _switch_columns(self):
        # every column (over_budget and blocked_* read as 0), then exits_pending
        return layout.header().batch_columns("vft_switch", (*COLUMNS, "exits_pending"))

    @cached_property
    def _read_calls(self):
        return layout.header().batch_reader("vft_call", CALL_READ)

    @cached_property
    def _read_joins(self):
        return layout.header().batch_reader("vft_join", ("kind", "pf", "seq", "ns"))

    def _on_switch(self, data) -> None:
        self._switch(self._read_switch(data))

    def _on_switches(self, batch: bytes) -> None:
        """A batch from the mapped reader: decoded, checked and held as arrays."""
        cols, unfit = self._switch_columns(batch)
        self.samples += cols.shape[0]
        if unfit.any():
            self.out_of_range += int(unfit.sum())
            cols = cols[~unfit]
        rows = cols[:, :len(COLUMNS)]
        rows[:, OVER_BUDGET] = rows[:, SWITCH_NS] > self.budget_ns
        self.assembler.switch_rows(rows, cols[:, len(COLUMNS)])

    def _switch(self, values: tuple) -> None:
        *values, pending = values
        self.samples += 1
        if max(values) > INT64_MAX:
            self.out_of_range += 1
            return
        values.insert(OVER_BUDGET, 1 if values[SWITCH_NS] > self.budget_ns else 0)
        self.assembler.switch_values(tuple(values), pending)

    def _on_join(self, data) -> None:
        self._join(self._read_join(data))

    def _on_joins(self, batch: bytes) -> None:
        for values in self._read_joins(batch):
            self._join(values)

    def _join(self, values: tuple) -> None:
        kind, pf, seq, ns = values
        if ns > INT64_MAX or seq > INT64_MAX:
            self.out_of_range += 1
            return
        if kind == self._join_exit:
            self.assembler.exit_end(pf, seq, ns)
        else:
            self.assembler.release(pf, seq, ns)

    def _on_call(self, data) -> None:
        if self.on_call:
            self._call(self._read_call(data))

    def _on_calls(self, batch: bytes) -> None:
        if self.on_call:
            for values in self._read_calls(batch):
                self._call(values)

    def _call(self, values: tuple) -> None:
        kind, *values = values
        if values[CALL_PF - 1] == self._cost_pf:
            return                  # a cost calibration's call (tracer/kernel/costs.py)
        if max(values) > INT64_MAX:
            self.out_of_range += 1
            return
        values[CALL_SEQ - 1] = values[CALL_SEQ - 1] or None       # 0: outside switches
        self.on_call(CallRecord(self.kinds.get(kind) or str(kind), *values))

    def _on_perf_lost(self, count: int) -> None:
        self.user_lost += count

    # -- read-outs ----------------------------------------------------------------------
    def lost_per_cpu(self) -> dict[int, int]:
        """Records the kernel could not hand over, per CPU (all buffers)."""
        out: dict[int, int] = {}
        if self.bpf is None:
            return out
        table = self.bpf["lost"]
        for idx in range(layout.header().constants["VFT_NR_LOST"]):
            for cpu, v in enumerate(table[ctypes.c_int(idx)]):
                if v:
                    out[cpu] = out.get(cpu, 0) + int(v)
        if self.user_lost:
            out[-1] = self.user_lost        # perf buffer overruns, CPU not reported
        return out

    def lost_by_kind(self) -> dict[str, int]:
        """The same losses by what was lost: a lost "switch" is a missing capture row."""
        out: dict[str, int] = {}
        if self.bpf is None:
            return out
        table = self.bpf["lost"]
        for name, idx in layout.header().constants.items():     # VFT_LOST_SWITCH, ...
            if name.startswith("VFT_LOST_"):
                out[name.removeprefix("VFT_LOST_").lower()] = sum(
                    int(v) for v in table[ctypes.c_int(idx)])
        if self.user_lost:
            out["perf_overrun"] = self.user_lost    # perf buffer: the kind is not reported
        return out

    def kernel_histograms(self) -> list[KernelHist]:
        """The kernel's histograms of every switch that closed, of the phases measured
        (revoke and grant need the iommu_map hook)."""
        if self.bpf is None:
            return []
        if self.histograms is None:         # mapped on first use (a floor-only run never)
            self.histograms = HistogramReader(self.bpf, self.plan.hist_mmap,
                                              self.plan.hist_slots)
        phases = RAW_PHASES if "revoke_ns" not in self.plan.unmeasured() else ("switch",)
        if self.hist_corrected:
            phases += ("corrected",)
        return self.histograms.read(phases)

    def kernel_histograms_meta(self) -> dict:
        hists = self.kernel_histograms()
        return {**kernel_hist.to_meta(hists, self.kernel_drops(skipped=None).get("hist_slot", 0)),
                "read": self.histograms.mode if self.histograms else None}

    def kernel_drops(self, skipped: dict[str, int] | None | bool = True) -> dict[str, int]:
        """What the kernel side could not keep besides full buffers (VFT_DROP_*, see
        vftrace.h): windows it could not record, maps that were full.  Every one is
        listed, zeros too, so a capture says they were counted."""
        if self.bpf is None:
            return {}
        table = self.bpf["drops"]
        out = {name.removeprefix("VFT_DROP_").lower(): sum(int(v) for v in table[ctypes.c_int(idx)])
               for name, idx in layout.header().constants.items() if name.startswith("VFT_DROP_")}
        if skipped is True:                     # not read by the caller already
            skipped = self.skipped_runs()
        if skipped is not None:
            out["skipped_runs"] = sum(skipped.values())
        return out

    def skipped_runs(self) -> dict[str, int] | None:
        """Runs of our programs the kernel skipped, per program that had any (the
        kernel's own recursion_misses); None where this kernel does not count them."""
        if self.bpf is None:
            return {}
        out: dict[str, int] = {}
        known = False
        for name, fn in self.bpf.funcs.items():
            n = proginfo.recursion_misses(fn.fd)
            if n is None:
                continue
            known = True
            if n:
                out[name.decode() if isinstance(name, bytes) else str(name)] = n
        return out if known else None

    def partial_windows(self) -> int:
        return int(self.bpf["partial"][ctypes.c_int(0)].value) if self.bpf else 0

    def background(self) -> dict:
        """Totals outside/inside windows: iommu and VFIO calls per pid, calls made in
        interrupt context (never in a window) per kind, KVM exits, the durations that
        came out negative, per kind ("switch": a window), counted instead of written, and
        what the kernel side could not keep (kernel_drops)."""
        calls = {}
        for k, v in self.bpf["bg_calls"].items():
            calls.setdefault(str(k.pid), {})[self.kinds.get(k.kind, str(k.kind))] = {
                "count": v.count, "ns": v.ns, "max_ns": v.max_ns, "bytes": v.bytes}
        exits = []
        for k, v in self.bpf["exits"].items():
            exits.append({"pid": k.pid, "vcpu": k.vcpu, "reason": k.reason,
                          "in_window": bool(k.in_window), "count": v.count, "ns": v.ns})
        skipped = self.skipped_runs()
        return {"calls_by_pid": calls, "irq_calls": self._irq_calls(), "kvm_exits": exits,
                "negative_durations": self._negative_durations(),
                "kernel_drops": self.kernel_drops(skipped), "skipped_runs": skipped,
                "out_of_range_records": self.out_of_range,
                "unreadable_ring_records": self.rings.foreign if self.rings else self.unreadable}

    def _per_kind(self, name: str) -> dict[int, list]:
        """A per-CPU array indexed by call kind: kind -> the per-CPU values."""
        table = self.bpf[name]
        return {kind: list(table[ctypes.c_int(kind)])
                for kind in range(layout.header().constants["VFT_NR_KINDS"])}

    def _irq_calls(self) -> dict[str, dict]:
        out = {}
        for kind, cpus in self._per_kind("irq_calls").items():
            count = sum(int(v.count) for v in cpus)
            if count:
                out[self.kinds.get(kind, str(kind))] = {
                    "count": count, "bytes": sum(int(v.bytes) for v in cpus)}
        return out

    def _negative_durations(self) -> dict[str, int]:
        out = {}
        for kind, cpus in self._per_kind("negative").items():
            if n := sum(int(v) for v in cpus):
                out["switch" if kind == 0 else self.kinds.get(kind, str(kind))] = n
        return out

    def _drain_buffers(self) -> None:
        """Hand over what the buffers hold now, without waiting."""
        if self.rings is not None:
            self.rings.consume()
        elif self.plan.ringbuf:
            self.bpf.ring_buffer_consume()
        else:
            self.bpf.perf_buffer_poll(0)

    def drain(self) -> None:
        """Stop making records and hand over every one already in the buffers.

        The reader can lag the kernel by a fraction of a second at high call rates;
        without this, what was still queued at stop would be dropped silently."""
        if self.bpf is None:
            return
        self.bpf["armed"][ctypes.c_int(0)] = ctypes.c_uint32(0)
        time.sleep(0.05)                # let windows already open close and emit
        self._drain_buffers()
        # Exits that began in the last windows end as their vCPUs run on: wait a little
        # for their ends.  What has not ended by then is counted (unended_exits).
        deadline = time.monotonic() + EXIT_END_WAIT_S
        while self.assembler.awaiting_exit_ends() and time.monotonic() < deadline:
            time.sleep(0.02)
            self._drain_buffers()

    def close(self) -> None:
        self.drain()
        self.assembler.flush()
        if self.histograms is not None:
            self.histograms.close()
            self.histograms = None
        if self.rings is not None:
            self.unreadable = self.rings.foreign
            self.rings.close()
            self.rings = None
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None


def warn(msg: str) -> None:
    print(f"vftrace: warning: {msg}", file=sys.stderr)
