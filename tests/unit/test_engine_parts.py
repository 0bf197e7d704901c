"""The tracer's pure parts: the shared record layout, hook planning, joining releases."""
from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tracer.kernel import layout, probes
from tracer.kernel.assemble import Assembler
from tracer.kernel.engine import program_text
from tracer.model.schema import COLUMNS, SwitchRecord
from tracer.paths import bpf_dir

# ---- layout -----------------------------------------------------------------------------


def test_header_structs_have_no_padding_and_cover_the_capture_columns():
    h = layout.header()
    sw = h.structs["vft_switch"]
    fields = [f for f, _ in sw._fields_]
    assert ctypes.sizeof(sw) == sum(ctypes.sizeof(t) for _, t in sw._fields_)
    # Every measured column comes from the kernel record (over_budget is decided here).
    assert set(COLUMNS) - {"over_budget", "blocked_accesses", "blocked_ns"} <= set(fields)
    assert h.constants["VFT_IOMMU_MAP"] == 1 and h.kinds()[1] == "iommu_map"
    assert ctypes.sizeof(h.structs["vft_call"]) == 4 * 8 + 6 * 4


def test_decode_reads_what_the_kernel_wrote():
    cls = layout.header().structs["vft_switch"]
    raw = cls(seq=7, t_ns=123, switch_ns=900, pf=2, from_vf=-1, to_vf=3, map_calls=1)
    rec = layout.decode("vft_switch", bytes(raw) + b"trailing ring padding")
    assert (rec.seq, rec.pf, rec.from_vf, rec.to_vf, rec.switch_ns) == (7, 2, -1, 3, 900)


def test_header_parser_refuses_what_it_cannot_read():
    with pytest.raises(ValueError, match="cannot parse"):
        layout.Header("struct vft_x {\n\tunsigned long long a;\n};")
    # a constant whose comment runs on was once skipped, and its drop counter with it
    with pytest.raises(ValueError, match="VFT_DROP_X"):
        layout.Header("#define VFT_DROP_X 8   /* a comment\n\t * that runs on */\n")


def test_prog_info_layout_matches_the_uapi_header(tmp_path):
    """recursion_misses is read at the offset the kernel's own header gives it."""
    from tracer.kernel.proginfo import BpfProgInfo
    header = "/usr/include/linux/bpf.h"
    src = tmp_path / "off.c"
    src.write_text(f'#include <stddef.h>\n#include "{header}"\n#include <stdio.h>\n'
                   'int main(void) { printf("%zu %zu\\n", '
                   'offsetof(struct bpf_prog_info, recursion_misses), '
                   'sizeof(struct bpf_prog_info)); return 0; }\n')
    subprocess.run(["cc", "-o", str(tmp_path / "off"), str(src)], check=True)
    off, size = map(int, subprocess.run([str(tmp_path / "off")], capture_output=True,
                                        text=True, check=True).stdout.split())
    assert BpfProgInfo.recursion_misses.offset == off
    assert ctypes.sizeof(BpfProgInfo) <= size


# ---- planning hooks ---------------------------------------------------------------------

ALL = frozenset({"iommu_map", "iommu_unmap", "iommu_unmap_fast", "intel_iommu_tlb_sync",
                 "unmap_mapping_range", "kvm_mmu_notifier_invalidate_range_start",
                 "kvm_vcpu_kick", "kvm_make_all_cpus_request", "vfio_iommu_type1_ioctl",
                 "security_task_getsid", "pf_switch"})
VMLINUX = {"iommu_map", "iommu_unmap", "iommu_unmap_fast", "intel_iommu_tlb_sync",
           "unmap_mapping_range", "security_task_getsid"}
TPS = frozenset({"pf_sched:vf_switch_begin", "pf_sched:vf_switch_end",
                 "pf_sched:vf_access_wait", "kvm:kvm_exit", "kvm:kvm_entry"})


def offer(**kw) -> probes.KernelOffer:
    base = dict(functions=ALL, btf=lambda f: f in VMLINUX, tracepoints=TPS)
    base.update(kw)
    return probes.KernelOffer(**base)


def modes(plan):
    return {c.hook.name: c.mode for c in plan.choices}


def test_auto_prefers_fentry_for_vmlinux_and_kprobes_for_modules():
    p = probes.plan(None, "auto", offer())
    m = modes(p)
    assert m["iommu_map"] == m["iommu_unmap"] == m["mmu_zap"] == m["iotlb_sync"] == "fentry"
    assert m["vfio_dma"] == m["mmu_notifier"] == m["vcpu_kick"] == "kprobe"
    assert p.source == "pf_sched" and p.source_mode == "raw_tp"
    assert p.calib_modes == ("fentry", "kprobe") and p.have_kvm_tp and p.have_access_tp
    flags = p.cflags(bpf_dir(), 1)
    assert "-DMAP_MODE=1" in flags and "-DVFIO_MODE=2" in flags
    assert "-DSYNC_FUNC=intel_iommu_tlb_sync" in flags and "-DSWITCH_SRC=1" in flags


def test_a_test_build_shrinks_maps_by_define_and_says_so(monkeypatch):
    assert probes.map_size_overrides({}) == {}
    env = {probes.MAP_SIZES_ENV: "VFT_MAX_OPEN=2, VFT_EXITS_MAX=1"}
    assert probes.map_size_overrides(env) == {"VFT_MAX_OPEN": 2, "VFT_EXITS_MAX": 1}
    monkeypatch.setenv(probes.MAP_SIZES_ENV, "VFT_STARTS_MAX=1")
    p = probes.plan(None, "auto", offer())
    assert "-DVFT_STARTS_MAX=1" in p.cflags(bpf_dir(), 1)
    assert any("test build" in w and "VFT_STARTS_MAX=1" in w for w in p.warnings())
    for bad in ("VFT_NOPE=1", "VFT_EXITS_MAX=0", "VFT_EXITS_MAX", "VFT_MAX_OPEN=3",
                "VFT_MAX_OPEN=64"):
        with pytest.raises(probes.ProbeError, match=probes.MAP_SIZES_ENV):
            probes.map_size_overrides({probes.MAP_SIZES_ENV: bad})


def test_kprobe_mode_everywhere_and_fentry_request_falls_back_with_a_note():
    assert set(modes(probes.plan(None, "kprobe", offer())).values()) == {"kprobe"}
    p = probes.plan(None, "fentry", offer())
    notes = {c.hook.name: c.note for c in p.choices}
    assert "module function" in notes["vfio_dma"] and modes(p)["vfio_dma"] == "kprobe"


def test_absent_hooks_are_skipped_with_how_to_get_them_not_fatal():
    p = probes.plan(None, "auto", offer(functions=ALL - {"vfio_iommu_type1_ioctl", "kvm_vcpu_kick",
                                                          "kvm_make_all_cpus_request"}))
    assert modes(p)["vfio_dma"] == "absent" and modes(p)["vcpu_kick"] == "absent"
    assert any("modprobe vfio_iommu_type1" in w for w in p.warnings())


def test_no_fentry_no_kprobes_for_iommu_is_an_error():
    with pytest.raises(probes.ProbeError, match="neither iommu_map nor iommu_unmap"):
        probes.plan(None, "auto", offer(fentry=False, kprobes=False))


@pytest.mark.parametrize("spec, says", [
    ("func:nope", "no traceable kernel function 'nope'"),
    ("func:", "no traceable kernel function ''"),
    ("tp:a:b", "give tp:SYS:BEGIN,SYS:END"),
    ("tp:x:y,kvm:kvm_exit", "no tracepoint x:y"),
    ("bogus", "give pf_sched, func:SYMBOL or tp:SYS:BEGIN,SYS:END"),
])
def test_bad_switch_specs(spec, says):
    with pytest.raises(probes.ProbeError, match=says.replace("(", r"\(").replace(")", r"\)")):
        probes.plan(spec, "auto", offer())


def test_default_source_needs_pf_sched_loaded():
    with pytest.raises(probes.ProbeError, match="pf_sched is not loaded"):
        probes.plan(None, "auto", offer(tracepoints=frozenset()))


def test_func_and_tp_sources():
    p = probes.plan("func:pf_switch", "auto", offer())
    assert p.source_mode == "kprobe" and "-DSWITCH_FUNC=pf_switch" in p.cflags(bpf_dir(), 1)
    assert not p.have_access_tp
    p = probes.plan("func:iommu_map", "auto", offer())
    assert p.source_mode == "fentry"
    p = probes.plan("tp:kvm:kvm_exit,kvm:kvm_entry", "auto", offer())
    assert p.source_mode == "tp" and "-DSWITCH_SRC=4" in p.cflags(bpf_dir(), 1)


def test_hist_pairs_size_the_kernel_histograms_by_define():
    assert "-DVFT_HIST_SLOTS=32" in probes.plan(None, "auto", offer()).cflags(bpf_dir(), 1)
    p = probes.plan(None, "auto", offer(), hist_slots=200)
    assert "-DVFT_HIST_SLOTS=200" in p.cflags(bpf_dir(), 1)
    p = probes.plan(None, "auto", offer(mmapable_array=False))
    assert "-DHIST_MAP_FLAGS=0" in p.cflags(bpf_dir(), 1)


def test_buffer_pages_size_the_ring_buffers_by_define():
    from tracer.cli import build_parser
    from tracer.record.session import BUFFER_PAGES, TraceOptions, make_plan
    assert f"-DRINGBUF_PAGES={BUFFER_PAGES}" in probes.plan(None, "auto", offer()).cflags(bpf_dir(), 1)
    opts = TraceOptions.from_args(build_parser().parse_args(["record", "-o", "c.csv", "-B", "64"]))
    p = make_plan(opts, offer())
    assert p.ringbuf_pages == 64 and "-DRINGBUF_PAGES=64" in p.cflags(bpf_dir(), 1)


def test_ebpf_text_is_the_source_with_the_plans_defines_and_header():
    text = program_text(probes.plan(None, "kprobe", offer()), 42)
    assert text.startswith("#define ") and "#define CALIB_TGID 42\n" in text
    assert "#define MAP_MODE 2\n" in text and "struct vft_switch {" in text
    assert '#include "vftrace.h"' not in text


class Rings:
    """Ring buffers as libbpf consumes them: in the order they were opened, each until it
    is empty, while the "kernel" may go on writing to any of them."""

    def __init__(self):
        self.order, self.queues, self.cbs = [], {}, {}
        self.during_read = None         # called once, while the calls ring is read

    def __getitem__(self, name):
        rings = self

        class Ring:
            def open_ring_buffer(self, cb):
                rings.order.append(name)
                rings.queues[name], rings.cbs[name] = [], cb

        return Ring()

    def ring_buffer_consume(self):
        for name in self.order:
            q = self.queues[name]
            while q:
                if self.during_read and name == "calls":
                    hook, self.during_read = self.during_read, None
                    hook()
                self.cbs[name](None, q.pop(0), 0)


def test_a_call_read_in_the_last_drain_has_its_exit_join_read_too(monkeypatch):
    """A kvm_entry writes an exit's join, then its call.  If the kernel does both while the
    reader is in the middle of one pass, a call read must not leave its join behind (the
    final drain: CI, 6.12, wrote a 59 ms exit's call row and missed 59 ms in its switch)."""
    from tracer.kernel.engine import Engine
    got, calls = [], []
    eng = Engine(probes.plan(None, "auto", offer(), emit_calls=True, mapped_reader=False),
                 budget_ns=1, on_switch=got.append, on_call=calls.append)
    rings = eng.bpf = Rings()
    monkeypatch.setattr(Engine, "_on_join", lambda self, d: self.assembler.exit_end(0, 1, d))
    monkeypatch.setattr(Engine, "_on_call", lambda self, d: calls.append(d))
    monkeypatch.setattr(Engine, "_on_switch",
                        lambda self, d: self.assembler.switch_values(
                            tuple(getattr(rec(0, 1), c) for c in COLUMNS), 1))
    eng._open_buffers()
    rings.queues["switches"].append("the switch")
    rings.queues["calls"].append("an exit outside windows")

    def kernel_ends_the_exit():         # the calls ring is the busy one
        rings.queues["joins"].append(59_000_000)
        rings.queues["calls"].append("the exit's call")

    rings.during_read = kernel_ends_the_exit
    eng._drain_buffers()
    eng.assembler.flush()
    assert "the exit's call" in calls
    assert [(r.seq, r.exit_ns) for r in got] == [(1, 59_000_000)]
    assert eng.assembler.unended_exits == 0


# ---- assembler -------------------------------------------------------------------------


def rec(pf, seq):
    return SwitchRecord(**{c: 0 for c in COLUMNS} | {"pf": pf, "seq": seq})


class Clock:
    t = 0

    def __call__(self):
        return self.t


def test_releases_join_their_switch_before_or_after_it_arrives():
    out, clock = [], Clock()
    a = Assembler(out.append, hold_ns=100, clock=clock)
    a.release(0, 5, 30)                 # released before its record reached user space
    a.switch(rec(0, 5))
    a.release(0, 5, 12)
    a.switch(rec(1, 5))                 # another PF, same seq: not mixed up
    a.release(1, 5, 7)
    assert out == []                    # still held
    clock.t = 150
    a.tick()
    got = {(r.pf, r.seq): (r.blocked_accesses, r.blocked_ns) for r in out}
    assert got == {(0, 5): (2, 42), (1, 5): (1, 7)}
    a.release(0, 5, 1)                  # too late: counted, not lost silently
    assert a.late_releases == 1


def test_flush_passes_everything_on_and_counts_unmatched_releases():
    out = []
    a = Assembler(out.append, hold_ns=10**12)
    a.switch(rec(0, 1))
    a.release(3, 9, 5)
    a.flush()
    assert [r.seq for r in out] == [1] and a.orphan_releases == 1


def test_joins_of_lost_switches_are_orphans_once_a_later_switch_is_passed_on():
    """A switch whose record the kernel lost never comes: its joins are dropped (and
    counted) when a newer switch of its PF is passed on, so the joins stay few however
    many records are lost; another PF's, and a newer switch's, wait."""
    out, clock = [], Clock()
    a = Assembler(out.append, hold_ns=100, clock=clock)
    for seq in range(1, 1001, 2):           # every other switch lost in the kernel
        a.release(0, seq + 1, 3)            # its own, newer one: waits for its record
        a.exit_end(0, seq - 1, 5) if seq > 1 else None
        a.switch(rec(0, seq))
        clock.t += 1
        a.tick()
    assert len(a.joins) < 120               # the held switches' ones only, not 1000
    a.release(1, 7, 2)                      # pf 1 has passed nothing on: it waits
    clock.t += 1000
    a.tick()
    assert [r.seq for r in out] == list(range(1, 1001, 2))
    assert (1, 7) in a.joins and (0, 1000) in a.joins
    assert a.orphan_releases == 499 and a.orphan_exits == 499
    a.switch(rec(0, 1000))
    a.flush()
    assert out[-1].blocked_accesses == 1 and a.orphan_releases == 500    # pf 1's at the end


def test_exit_ends_add_their_time_to_the_switch_they_began_in():
    """An exit that outlived its window: its time goes to that switch (pf, seq), not to
    the one open when it ended; a record already passed on counts it late, with its ns."""
    out, clock = [], Clock()
    a = Assembler(out.append, hold_ns=100, clock=clock)
    a.exit_end(0, 5, 1000)              # before its record arrived
    a.switch(rec(0, 5))
    a.switch(rec(0, 6))
    a.exit_end(0, 5, 300)               # while 6 is the newest: still 5's
    a.release(0, 5, 40)
    clock.t = 150
    a.tick()
    got = {r.seq: (r.exit_ns, r.blocked_accesses, r.blocked_ns) for r in out}
    assert got == {5: (1300, 1, 40), 6: (0, 0, 0)}
    a.exit_end(0, 6, 77)                # too late
    assert (a.late_exits, a.late_exit_ns, a.late_releases) == (1, 77, 0)
    a.release(0, 6, 33)                 # too late too: counted with its blocked time
    assert (a.late_releases, a.late_release_ns) == (1, 33)
    a.exit_end(2, 1, 5)                 # its switch never comes: orphaned at the end
    a.flush()
    assert a.orphan_exits == 1 and a.orphan_releases == 0


def test_a_switch_waits_for_the_exit_ends_the_kernel_said_are_to_come():
    """However late its exits' ends arrive (a loaded machine), a switch is held until
    they are in, up to max_hold_ns; then it goes on and a later end counts late."""
    out, clock = [], Clock()
    a = Assembler(out.append, hold_ns=100, clock=clock, max_hold_ns=1000)
    a.switch_values(tuple(getattr(rec(0, 1), c) for c in COLUMNS), 2)
    a.switch(rec(0, 2))
    clock.t = 500
    a.tick()
    assert out == [] and a.awaiting_exit_ends() == 1    # 1 waits for two ends, 2 behind it
    a.exit_end(0, 1, 30)
    a.tick()
    assert out == [] and a.awaiting_exit_ends() == 1
    a.exit_end(0, 1, 12)
    assert a.awaiting_exit_ends() == 0
    a.tick()
    assert [(r.seq, r.exit_ns) for r in out] == [(1, 42), (2, 0)]
    a.switch_values(tuple(getattr(rec(0, 3), c) for c in COLUMNS), 1)
    clock.t = 1600                      # its end never came (a VM torn down mid-exit)
    a.tick()
    assert [r.seq for r in out][-1] == 3 and a.late_exits == 0 and a.unended_exits == 1
    a.exit_end(0, 3, 5)
    assert (a.late_exits, a.late_exit_ns) == (1, 5)
    a.switch_values(tuple(getattr(rec(0, 4), c) for c in COLUMNS), 3)
    a.exit_end(0, 4, 9)
    a.flush()                           # the stop: two of its three ends never came
    assert [(r.seq, r.exit_ns) for r in out][-1] == (4, 9) and a.unended_exits == 3


def test_a_reader_starved_past_max_hold_reads_the_waiting_ends_before_giving_up():
    """CI run I (6.12): the recorder was starved for over max_hold_ns after reading a
    switch that awaited an exit's end; on waking it read newer switches first, and the
    first of them gave the held switch up, so the end, already in the joins buffer,
    counted late.  Only tick(), after every buffer is read, may give up on a switch."""
    out, clock = [], Clock()
    a = Assembler(out.append, hold_ns=100, clock=clock, max_hold_ns=1000)
    a.switch_values(tuple(getattr(rec(0, 1), c) for c in COLUMNS), 1)
    clock.t = 5000                      # starved; then the switches buffer is read first
    a.switch(rec(0, 2))
    a.switch(rec(0, 3))
    assert out == []
    a.exit_end(0, 1, 35)                # then the joins buffer
    a.tick()
    assert [(r.seq, r.exit_ns) for r in out] == [(1, 35)] and a.late_exits == 0
    clock.t = 5100                      # the newer ones after their own hold
    a.tick()
    assert [r.seq for r in out] == [1, 2, 3]


# ---- record's command line --------------------------------------------------------------


@pytest.mark.parametrize("args, says", [
    (["record"], "give -o/--output capture.csv"),
    (["record", "-o", "/nonexistent-dir/c.csv"], "directory /nonexistent-dir does not exist"),
    (["record", "-o", "c.csv", "--budget-ns", "0"], "--budget-ns 0: must be positive"),
    (["record", "-o", "c.csv", "--hist-pairs", "0"], "--hist-pairs 0: give 1 to 256"),
    (["live", "--hist-pairs", "5000"], "--hist-pairs 5000: give 1 to 256"),
    (["record", "-o", "c.csv", "--duration", "-1"], "--duration -1.0: must be positive"),
    (["record", "-o", "c.csv", "--vf", "1,x"], "--vf 'x': give integers"),
    (["record", "-o", "c.csv", "--probe-mode", "uprobe"], "invalid choice: 'uprobe'"),
])
def test_record_bad_input_is_one_line(args, says, tmp_path):
    r = subprocess.run([sys.executable, "-m", "tracer.cli", *args], capture_output=True,
                       text=True, cwd=tmp_path, timeout=60,
                       env={"PYTHONPATH": str(bpf_dir().parent), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert says in r.stderr


def _ops():
    """Random runs of what the engine feeds an assembler: batches of switches (per-PF
    seqs going up, some awaiting exit ends), joins for any (pf, seq), time passing."""
    batch = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2)), min_size=1, max_size=6)
    join = st.tuples(st.sampled_from(["release", "exit"]), st.integers(0, 2),
                     st.integers(1, 30), st.integers(1, 1000))
    return st.lists(st.one_of(st.tuples(st.just("batch"), batch),
                              st.tuples(st.just("join"), join),
                              st.tuples(st.just("wait"), st.integers(1, 700)),
                              st.tuples(st.just("tick"), st.none())), max_size=60)


@settings(max_examples=200, deadline=None)
@given(ops=_ops())
def test_batches_of_rows_give_what_switches_one_at_a_time_give(ops):
    """The mapped reader hands the assembler arrays, BCC's callback one switch at a
    time: the same records come out, in the same order, with the same joins and counts."""
    import numpy as np
    from tracer.kernel.assemble import records_of

    clock = Clock()
    one_out, rows_out = [], []
    one = Assembler(one_out.append, hold_ns=100, clock=clock, max_hold_ns=400)
    by_rows = Assembler(hold_ns=100, clock=clock, max_hold_ns=400,
                        emit_rows=records_of(rows_out.append))
    seqs = {0: 0, 1: 0, 2: 0}
    for op, arg in ops:
        if op == "batch":
            values, pending = [], []
            for pf, ends in arg:
                seqs[pf] += 1
                values.append(tuple(getattr(rec(pf, seqs[pf]), c) for c in COLUMNS))
                pending.append(ends)
            for v, p in zip(values, pending):
                one.switch_values(v, p)
            by_rows.switch_rows(np.array(values, np.int64), np.array(pending))
        elif op == "join":
            kind, pf, seq, ns = arg
            for a in (one, by_rows):
                (a.release if kind == "release" else a.exit_end)(pf, seq, ns)
        elif op == "wait":
            clock.t += arg
        else:
            one.tick()
            by_rows.tick()
        assert one_out == rows_out
    one.flush()
    by_rows.flush()
    assert one_out == rows_out
    counts = ("late_releases", "late_release_ns", "orphan_releases", "late_exits",
              "late_exit_ns", "orphan_exits", "unended_exits")
    assert [getattr(one, c) for c in counts] == [getattr(by_rows, c) for c in counts]


def test_reader_gaps_keep_the_longest_time_between_two_reads_and_when():
    from tracer.kernel.engine import ReaderGaps
    t = iter([1.0, 5.0, 10.0, 10.1, 10.2, 13.7, 13.8, 15.0, 15.1])
    gaps = ReaderGaps(clock=lambda: next(t))
    gaps.read()                               # the calibration's reads, before arming,
    gaps.read()                               # are no gap: nothing was filling then
    gaps.armed()
    assert gaps.as_meta() == {"longest_s": 0.0, "longest_at_s": None, "over_1s": 0}
    for _ in range(6):
        gaps.read()
    assert gaps.as_meta() == {"longest_s": 3.5, "longest_at_s": 0.2, "over_1s": 2}
    t = iter([0.0, 7.5, 7.6])
    late = ReaderGaps(clock=lambda: next(t))
    late.armed()
    late.read()                               # stopped before its first read
    late.read()
    assert late.as_meta() == {"longest_s": 7.5, "longest_at_s": 0.0, "over_1s": 1}
