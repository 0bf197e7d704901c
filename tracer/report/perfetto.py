"""``vftrace export --perfetto``: a capture as a Chrome JSON trace for Perfetto and
``chrome://tracing``.

Tracks (a track is a (pid, tid) pair of the trace format):

* ``PF n``: one process per PF whose main thread holds the switch slices, each with its
  ``revoke`` and ``grant`` children and, below those, the per-call rows of that switch
  (iommu_unmap, iotlb_sync, mmu_zap, iommu_map...).
* ``VM <pid>``: one process per VM with a thread per vCPU holding its KVM exits (when
  the capture has per-call rows), so a switch and the guest stalls it caused share one
  screen on the same clock; a flow arrow leads from each switch to every exit that
  began in its window.
* ``pid <pid>``: calls outside any switch (vfio_map_dma, background unmaps...) on a
  ``kernel calls`` thread of the process that made them.

The trace format draws slices of one track as a tree, so every slice must nest inside
or lie beside the ones before it.  Slices that would break that (overlapping switches
of one PF, a call outside its switch's window) go to extra ``overlapping`` threads of
the same process instead of being dropped or drawn wrongly.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, TextIO

from tracer.model import exit_reasons
from tracer.model.schema import COLUMNS, CallRecord, SwitchRecord, depth_of, unmeasured

# Synthetic ids sit above Linux's largest pid (pid_max <= 2**22), so they never collide
# with the real processes and threads of the VMs.
PF_PID_BASE = 0x40000000
SYNTHETIC_TID_BASE = 0x48000000

# Always in a switch slice's args; the other columns only when non-zero, which keeps
# the JSON of a large capture about half as big.
SWITCH_KEY_ARGS = ("seq", "from_vf", "to_vf", "cpu", "switch_ns", "revoke_ns", "grant_ns")
SWITCH_MORE_ARGS = tuple(c for c in COLUMNS if c not in ("t_ns", "pf", *SWITCH_KEY_ARGS))


def us(ns: int) -> float:
    """Trace timestamps are microseconds as doubles: exact to the nanosecond while
    ``ns`` stays below ~10**15, which is why they count from ``clock_origin_ns``."""
    return ns / 1000


@dataclass(slots=True)
class Slice:
    start: int                    # ns
    end: int                      # ns
    name: str
    cat: str
    args: dict
    rank: int                     # 0 switch, 1 phase, 2 call: the parent first at a tie
    needs_parent: bool = False    # a call must sit inside its switch
    top_level: bool = False       # a switch must not sit inside another slice


@dataclass
class Track:
    """The slices of one logical track; ``lanes`` spreads them over threads so each
    thread's slices nest properly."""
    pid: int
    name: str
    slices: list[Slice] = field(default_factory=list)

    def lanes(self) -> list[list[Slice]]:
        lanes: list[list[Slice]] = []
        stacks: list[list[int]] = []          # per lane: end times of the open slices
        for s in sorted(self.slices, key=lambda s: (s.start, -s.end, s.rank)):
            placed = False
            for i, stack in enumerate(stacks):
                while stack and stack[-1] <= s.start:
                    stack.pop()
                fits = not stack or stack[-1] >= s.end
                if i == 0 and ((s.top_level and stack) or (s.needs_parent and not stack)):
                    fits = False
                if fits:
                    stack.append(s.end)
                    lanes[i].append(s)
                    placed = True
                    break
            if not placed:
                stacks.append([s.end])
                lanes.append([s])
        return lanes


class TraceBuilder:
    """Collects switches and calls, then writes the trace."""

    def __init__(self, meta: dict) -> None:
        self.meta = meta
        self.vendor = meta.get("kvm_vendor")
        # Columns not measured (a shallower --depth) are left out of the args, and a
        # switch is not split into revoke and grant without the split's hook.
        skip = unmeasured(meta)
        self.key_args = tuple(c for c in SWITCH_KEY_ARGS if c not in skip)
        self.split = "revoke_ns" not in skip
        self.pf_tracks: dict[int, Track] = {}
        self.switch_keys: set[tuple[int, int]] = set()                   # (pf, seq)
        self.vcpu_tracks: dict[tuple[int, int], Track] = {}             # (pid, tid)
        self.vcpu_ids: dict[tuple[int, int], int] = {}
        self.process_tracks: dict[int, Track] = {}
        self.switches = self.exits = self.calls = 0

    def _pf_track(self, pf: int) -> Track:
        if pf not in self.pf_tracks:
            self.pf_tracks[pf] = Track(PF_PID_BASE + pf, "switches")
        return self.pf_tracks[pf]

    def add_switch(self, r: SwitchRecord) -> None:
        self.switches += 1
        end = r.t_ns + max(r.switch_ns, 0)
        src = "none" if r.from_vf < 0 else f"vf{r.from_vf}"
        args = {name: getattr(r, name) for name in self.key_args}
        args.update((name, v) for name in SWITCH_MORE_ARGS if (v := getattr(r, name)))
        track = self._pf_track(r.pf)
        track.slices.append(Slice(r.t_ns, end, f"{src}->vf{r.to_vf}", "switch", args, 0,
                                  top_level=True))
        self.switch_keys.add((r.pf, r.seq))
        if not self.split:
            return
        # revoke: window start to the first iommu_map entry; grant: the rest.
        split = r.t_ns + min(max(r.revoke_ns, 0), max(r.switch_ns, 0))
        if split > r.t_ns:
            track.slices.append(Slice(r.t_ns, split, f"revoke {src}", "revoke",
                                      {"seq": r.seq, "revoke_ns": r.revoke_ns}, 1,
                                      needs_parent=True))
        if end > split:
            track.slices.append(Slice(split, end, f"grant vf{r.to_vf}", "grant",
                                      {"seq": r.seq, "grant_ns": r.grant_ns}, 1,
                                      needs_parent=True))

    def add_call(self, c: CallRecord) -> None:
        end = c.t_ns + max(c.ns, 0)
        args = {"ns": c.ns, "pid": c.pid, "tid": c.tid, "cpu": c.cpu}
        if c.seq is not None:
            args.update(seq=c.seq, pf=c.pf)
        if c.kind == "kvm_exit":
            self.exits += 1
            key = (c.pid, c.tid)
            if key not in self.vcpu_tracks:
                self.vcpu_tracks[key] = Track(c.pid, f"vCPU {c.vcpu} (tid {c.tid})")
                self.vcpu_ids[key] = c.vcpu
            args.update(reason=c.size, vcpu=c.vcpu)
            name = exit_reasons.name(c.size, self.vendor)
            self.vcpu_tracks[key].slices.append(Slice(c.t_ns, end, name, "kvm_exit", args, 2))
            return
        self.calls += 1
        args["size"] = c.size
        if c.seq is not None and (c.pf, c.seq) in self.switch_keys:
            self._pf_track(c.pf).slices.append(Slice(c.t_ns, end, c.kind, "call", args, 2,
                                                     needs_parent=True))
            return
        # Outside any switch (or its switch is not in the capture): the process's track.
        if c.pid not in self.process_tracks:
            self.process_tracks[c.pid] = Track(c.pid, "kernel calls")
        self.process_tracks[c.pid].slices.append(Slice(c.t_ns, end, c.kind, "call", args, 2))

    # --- output ---------------------------------------------------------------------

    def _tracks(self) -> Iterable[Track]:
        yield from self.pf_tracks.values()
        yield from self.vcpu_tracks.values()
        yield from self.process_tracks.values()

    def clock_origin_ns(self) -> int:
        """The whole second of CLOCK_MONOTONIC just before the first slice: trace times
        count from it.  A host up for months has a clock near 10**16 ns, where doubles in
        microseconds would lose nanoseconds and break the nesting."""
        first = min((s.start for t in self._tracks() for s in t.slices), default=0)
        return first - first % 1_000_000_000

    def events(self, origin: int = 0) -> Iterable[dict]:
        """Metadata and "X" complete events track by track, then a flow arrow from each
        switch to every KVM exit that began in its window; times from ``origin`` ns."""
        next_tid = [SYNTHETIC_TID_BASE]
        placed_switches: dict[tuple[int, int], tuple[int, int, Slice]] = {}
        placed_exits: list[tuple[int, int, Slice]] = []

        def synthetic_tid() -> int:
            next_tid[0] += 1
            return next_tid[0]

        def meta_event(kind: str, pid: int, tid: int, **args) -> dict:
            return {"ph": "M", "name": kind, "pid": pid, "tid": tid, "args": args}

        def slices(track: Track, tid: int, thread_name: str, sort: int,
                   pf: int | None = None) -> Iterable[dict]:
            for lane_no, lane in enumerate(track.lanes()):
                lane_tid = tid if lane_no == 0 else synthetic_tid()
                name = thread_name if lane_no == 0 else f"{thread_name} (overlapping {lane_no})"
                yield meta_event("thread_name", track.pid, lane_tid, name=name)
                yield meta_event("thread_sort_index", track.pid, lane_tid,
                                 sort_index=sort + lane_no)
                for s in lane:
                    if s.cat == "switch" and pf is not None:
                        placed_switches[(pf, s.args["seq"])] = (track.pid, lane_tid, s)
                    elif s.cat == "kvm_exit" and "seq" in s.args:
                        placed_exits.append((track.pid, lane_tid, s))
                    yield {"ph": "X", "name": s.name, "cat": s.cat, "ts": us(s.start - origin),
                           "dur": us(s.end - s.start), "pid": track.pid, "tid": lane_tid,
                           "args": s.args}

        for pf, track in sorted(self.pf_tracks.items()):
            yield meta_event("process_name", track.pid, 0, name=f"PF {pf}")
            yield meta_event("process_sort_index", track.pid, 0, sort_index=-1000 + pf)
            yield from slices(track, track.pid, "switches", 0, pf)
        vm_pids = sorted({pid for pid, _ in self.vcpu_tracks})
        for pid in sorted({*vm_pids, *self.process_tracks}):
            yield meta_event("process_name", pid, 0,
                             name=f"VM {pid}" if pid in vm_pids else f"pid {pid}")
            yield meta_event("process_sort_index", pid, 0, sort_index=pid)
            for (vm, tid), track in sorted(self.vcpu_tracks.items()):
                if vm == pid:
                    yield from slices(track, tid, track.name, self.vcpu_ids[(vm, tid)] * 100)
            if pid in self.process_tracks:
                yield from slices(self.process_tracks[pid], synthetic_tid(), "kernel calls",
                                  1_000_000)
        yield from self._flows(placed_switches, placed_exits, origin)

    @staticmethod
    def _flows(switches: dict, exits: list, origin: int) -> Iterable[dict]:
        """Flow events (v1: "s" binds to the slice open at its ts, "f" with bp "e" to
        the slice open at its own): switch -> exit, for exits with a seq."""
        flow_id = 0
        for pid, tid, exit_slice in exits:
            found = switches.get((exit_slice.args["pf"], exit_slice.args["seq"]))
            if found is None:
                continue
            sw_pid, sw_tid, sw = found
            # The arrow leaves the switch where the exit began, kept inside the switch.
            at = min(max(exit_slice.start, sw.start), max(sw.start, sw.end - 1))
            flow_id += 1
            common = {"name": "stall", "cat": "stall", "id": flow_id}
            yield {"ph": "s", "ts": us(at - origin), "pid": sw_pid, "tid": sw_tid, **common}
            yield {"ph": "f", "bp": "e", "ts": us(exit_slice.start - origin), "pid": pid,
                   "tid": tid, **common}

    def trace_metadata(self, capture: Path, problems: list[str], origin: int) -> dict:
        meta = {k: v for k, v in self.meta.items() if k != "columns"}
        meta.update(capture=str(capture), problems=problems, clock_origin_ns=origin,
                    depth=depth_of(self.meta), unmeasured=sorted(unmeasured(self.meta)),
                    clock="CLOCK_MONOTONIC ns = clock_origin_ns + ts * 1000", slices={
                        "switches": self.switches, "kvm_exits": self.exits,
                        "calls": self.calls})
        return meta

    def write(self, out: TextIO, capture: Path, problems: list[str]) -> None:
        """Streamed, one event per line, so a large capture never needs the whole JSON
        text in memory."""
        origin = self.clock_origin_ns()
        out.write('{"displayTimeUnit": "ns",\n"metadata": ')
        out.write(json.dumps(self.trace_metadata(capture, problems, origin), default=str))
        out.write(',\n"traceEvents": [\n')
        first = True
        for event in self.events(origin):
            if not first:
                out.write(",\n")
            out.write(json.dumps(event, separators=(",", ":")))
            first = False
        out.write("\n]}\n")
