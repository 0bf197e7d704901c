"""The fast per-record paths against the reference ones they replace.

Decoding: raw ``vft_switch`` / ``vft_call`` / ``vft_join`` samples are laid out by
ctypes from bpf/vftrace.h, as the kernel writes them, and the engine's struct-based
callbacks must give exactly what the ctypes path (``layout.decode`` + one getattr per
field) gives.  Then the other per-record paths made faster with it: ``Stats.add_rows``
(the dashboard's) against ``Stats.add_many``, ``Stats.add`` against ``add_many`` on
garbage values, and the capture writer's lock-free queue against the csv module.
"""
from __future__ import annotations

import csv
import ctypes
import random
import threading

import numpy as np
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from tracer.capture import files as capture
from tracer.capture.files import CaptureError, CaptureWriter, iter_capture
from tracer.kernel import layout
from tracer.kernel.engine import CALL_READ, SWITCH_READ, Engine
from tracer.model.correction import CORRECTED_COLUMNS
from tracer.model.schema import INT64_MAX
from tracer.kernel.probes import Plan
from tracer.model.schema import COLUMNS, CallRecord, SwitchRecord
from tracer.model.stats import MAX_VALUE, Stats
from tui.store import to_rows

HEADER = layout.header()
SWITCH = HEADER.structs["vft_switch"]
CALL = HEADER.structs["vft_call"]
JOIN = HEADER.structs["vft_join"]
U64_MAX = 2**64 - 1


# --- the reference: what Engine did before, one ctypes object and a getattr per field ---

def switch_via_ctypes(data, budget_ns: int) -> SwitchRecord:
    raw = layout.decode("vft_switch", data)
    values = {f: getattr(raw, f, 0) for f in COLUMNS}
    values["over_budget"] = int(raw.switch_ns > budget_ns)
    return SwitchRecord(**values)


def call_via_ctypes(data) -> CallRecord:
    c = layout.decode("vft_call", data)
    kind = HEADER.kinds().get(c.kind, str(c.kind))
    return CallRecord(kind=kind, t_ns=c.t_ns, ns=c.ns, size=c.size, pid=c.pid, cpu=c.cpu,
                      seq=c.seq or None, tid=c.tid, vcpu=c.vcpu, pf=c.pf)


# --- raw samples ----------------------------------------------------------------------

def field_range(ctype) -> tuple[int, int]:
    bits = 8 * ctypes.sizeof(ctype)
    if ctype._type_.islower():                 # c_int32 is "i", c_uint32 "I"...
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def field_values(cls) -> st.SearchStrategy[dict]:
    """Any value each field of ``cls`` can hold, extremes included."""
    fields = {}
    for name, ctype in cls._fields_:
        lo, hi = field_range(ctype)
        fields[name] = st.one_of(st.sampled_from([lo, hi, 0, 1, -1 if lo else hi - 1]),
                                 st.integers(lo, hi))
    return st.fixed_dictionaries(fields)


def extremes(cls, pick: int) -> dict:
    """Every field at its lowest (pick 0) or highest (pick 1) value."""
    return {name: field_range(ctype)[pick] for name, ctype in cls._fields_}


class Sample:
    """One record as the ring buffer holds it: its bytes, and its address (what BCC
    hands the callback) inside a buffer that also holds bytes after it."""

    def __init__(self, cls, values: dict) -> None:
        self.raw = cls(**values)
        self.bytes = bytes(self.raw)
        self._buffer = ctypes.create_string_buffer(self.bytes + b"\xff" * 16)
        self.address = ctypes.addressof(self._buffer)


def engine(budget_ns: int = 100) -> tuple[Engine, list, list]:
    """The engine's decoding half (start() is never called); records pass straight on."""
    switches, calls = [], []
    eng = Engine(Plan("pf_sched", "raw_tp"), budget_ns=budget_ns, on_switch=switches.append,
                 on_call=calls.append, hold_ns=0)
    eng.assembler.max_hold_ns = 0       # nor wait for exit ends (exits_pending is random)
    read = eng._on_switch

    def read_then_tick(data) -> None:   # as poll() does: read the buffers, then tick
        read(data)
        eng.assembler.tick()
    eng._on_switch = read_then_tick
    return eng, switches, calls


# --- decoding ---------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(values=field_values(SWITCH), budget=st.integers(0, U64_MAX))
@example(values={**extremes(SWITCH, 1), "from_vf": -1}, budget=100)
@example(values={**extremes(SWITCH, 0), "from_vf": -1, "to_vf": 3}, budget=0)
def test_switch_decoding_matches_ctypes(values, budget):
    sample = Sample(SWITCH, values)
    eng, switches, _ = engine(budget)
    # a field the engine reads above int64: counted, never passed on
    writable = max(values[k] for k in SWITCH_READ if k in values) <= INT64_MAX
    for data in (sample.address, sample.bytes, sample.bytes + b"ring padding"):
        eng._on_switch(data)
        if writable:
            assert switches.pop() == switch_via_ctypes(data, budget)
    assert eng.samples == 3
    assert eng.out_of_range == (0 if writable else 3)


def test_switch_extremes_read_as_the_kernel_wrote_them():
    # u64 fields at the largest value a capture holds (above it: counted, not written)
    values = {k: min(v, INT64_MAX) for k, v in extremes(SWITCH, 1).items()}
    values["from_vf"] = -1
    eng, switches, _ = engine(budget_ns=INT64_MAX - 1)
    sample = Sample(SWITCH, values)
    eng._on_switch(sample.address)
    rec = switches.pop()
    assert rec.from_vf == -1 and rec.to_vf == 2**31 - 1
    assert rec.seq == rec.switch_ns == rec.source_ns == INT64_MAX
    assert rec.pf == rec.unmap_calls == 2**32 - 1
    assert (rec.blocked_accesses, rec.blocked_ns, rec.over_budget) == (0, 0, 1)


@settings(max_examples=300, deadline=None)
@given(values=field_values(CALL), kind=st.one_of(st.sampled_from(sorted(HEADER.kinds())),
                                                 st.integers(0, 2**32 - 1)))
@example(values={**extremes(CALL, 1), "seq": 0}, kind=8)
def test_call_decoding_matches_ctypes(values, kind):
    assume(values.get("pf") != layout.header().constants["VFT_COST_PF"])
    sample = Sample(CALL, {**values, "kind": kind})
    eng, _, calls = engine()
    writable = max(values[k] for k in CALL_READ[1:] if k in values) <= INT64_MAX
    for data in (sample.address, sample.bytes):
        eng._on_call(data)
        if writable:
            assert calls.pop() == call_via_ctypes(data)
    assert not calls and eng.out_of_range == (0 if writable else 2)


def test_a_cost_calibration_call_is_not_a_record():
    eng, _, calls = engine()
    cost_pf = layout.header().constants["VFT_COST_PF"]
    for pf in (cost_pf, 3):
        sample = Sample(CALL, {"kind": 2, "seq": 1, "pf": pf})
        eng._on_call(sample.address)
    assert [c.pf for c in calls] == [3]


def test_call_outside_switches_has_no_seq():
    eng, _, calls = engine()
    samples = [Sample(CALL, {"kind": 1, "seq": 0, "t_ns": 5}), Sample(CALL, {"kind": 99, "seq": 7})]
    for sample in samples:
        eng._on_call(sample.address)
    assert calls[0].seq is None and calls[0].kind == "iommu_map"
    assert calls[1].seq == 7 and calls[1].kind == "99"


@settings(max_examples=200, deadline=None)
@given(values=field_values(JOIN))
def test_join_decoding_matches_ctypes(values):
    """Each join goes to the assembler by its kind: an exit's end or a release."""
    sample = Sample(JOIN, values)
    eng, _, _ = engine()
    joined = []
    eng.assembler.release = lambda pf, seq, ns: joined.append(("release", pf, seq, ns))
    eng.assembler.exit_end = lambda pf, seq, ns: joined.append(("exit", pf, seq, ns))
    eng._on_join(sample.address)
    r = layout.decode("vft_join", sample.bytes)
    kind = "exit" if r.kind == HEADER.constants["VFT_JOIN_EXIT"] else "release"
    if max(r.seq, r.ns) > INT64_MAX:        # counted, never joined
        assert joined == [] and eng.out_of_range == 1
    else:
        assert joined == [(kind, r.pf, r.seq, r.ns)]


def test_struct_layout_follows_ctypes_for_every_record():
    for name, cls in HEADER.structs.items():
        packed, fields = HEADER.record_struct(name)
        assert packed.size == ctypes.sizeof(cls), name
        assert fields == tuple(f for f, _ in cls._fields_), name


PADDED = """
#define VFT_N 2
struct vft_padded {
\t__u8 flag;       /* 7 bytes of padding follow */
\t__u64 big;
\t__s16 small;
\t__u32 arr[VFT_N];
\t__s32 last;     /* then 4 bytes of tail padding */
};
"""


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_reader_follows_c_padding_and_alignment(data):
    h = layout.Header(PADDED)
    cls = h.structs["vft_padded"]
    assert ctypes.sizeof(cls) == 32          # 1 + 7 pad + 8 + 2 + 2 pad + 8 + 4
    values = data.draw(st.fixed_dictionaries({
        name: st.integers(*field_range(t)) for name, t in cls._fields_ if name != "arr"}))
    raw = cls(**values)
    read = h.reader("vft_padded", ("last", "flag", "nothing", "small", "big"), missing=-7)
    expect = (raw.last, raw.flag, -7, raw.small, raw.big)
    assert read(bytes(raw)) == expect
    assert read(ctypes.addressof(raw)) == expect


def test_reader_refuses_what_it_cannot_read():
    h = layout.Header(PADDED)
    with pytest.raises(ValueError, match="array"):
        h.reader("vft_padded", ("big", "arr"))
    with pytest.raises(ValueError, match="no field"):
        h.reader("vft_padded", ())
    assert h.reader("vft_padded", ("big",))(bytes(h.structs["vft_padded"](big=9))) == (9,)


# --- statistics: the dashboard's array path and the per-record path ------------------------

def random_records(n: int, seed: int, garbage: bool = False) -> list[SwitchRecord]:
    rng = random.Random(seed)
    recs = []
    for i in range(n):
        values = [rng.randrange(0, 10**7) for _ in COLUMNS]
        values[COLUMNS.index("seq")] = i // 3 + rng.randrange(3)
        values[COLUMNS.index("pf")] = rng.randrange(3)
        values[COLUMNS.index("from_vf")] = rng.randrange(-1, 4)
        values[COLUMNS.index("to_vf")] = rng.randrange(4)
        if garbage and rng.random() < 0.05:
            values[COLUMNS.index(rng.choice(["switch_ns", "revoke_ns", "map_ns"]))] = \
                rng.choice([U64_MAX, 2**63, MAX_VALUE + 1, -2**63 - 1])
        recs.append(SwitchRecord(*values))
    return recs


@pytest.mark.parametrize("filters", [{}, {"pfs": {0, 2}}, {"vfs": {1}},
                                     {"pfs": {1}, "vfs": {0, 3}}])
@pytest.mark.parametrize("garbage", [False, True])
def test_add_rows_counts_what_add_many_counts(filters, garbage):
    recs = random_records(40_000, seed=len(filters), garbage=garbage)   # > one BATCH
    by_records, by_rows = Stats(5_000_000, **filters), Stats(5_000_000, **filters)
    by_records.add_many(recs, now=10.0)
    by_rows.add_rows(to_rows(recs), now=10.0)
    assert by_rows.snapshot(now=11.0) == by_records.snapshot(now=11.0)
    assert by_rows.snapshot(now=11.0).records == by_records.records > 0


def test_add_one_by_one_counts_what_add_many_counts_garbage_included():
    recs = random_records(20_000, seed=9, garbage=True)
    one_by_one, many = Stats(5_000_000), Stats(5_000_000)
    for r in recs:
        one_by_one.add(r, now=3.0)
    many.add_many(recs, now=3.0)
    snap = one_by_one.snapshot(now=4.0)
    assert snap == many.snapshot(now=4.0)
    assert snap.overall.switch.max == MAX_VALUE          # clamped, not fatal


def test_add_takes_the_values_the_record_had_when_added():
    s = Stats(100)
    r = random_records(1, seed=1)[0]
    s.add(r)
    switch = r.switch_ns
    r.switch_ns = 1                   # a later change does not reach the statistics
    assert s.snapshot().overall.switch.max == switch


# --- the capture writer ------------------------------------------------------------------

def test_write_and_write_many_give_what_the_csv_module_writes(tmp_path):
    recs = random_records(5000, seed=3)
    recs[0].from_vf, recs[1].seq = -1, U64_MAX
    one, many = CaptureWriter(tmp_path / "one.csv", {}), CaptureWriter(tmp_path / "many.csv", {})
    for r in recs:
        one.write(r)
    many.write_many(recs)
    one.close()
    many.close()
    with open(tmp_path / "expect.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        # no probe costs in the meta: the corrected columns are there, empty
        w.writerow([*COLUMNS, *CORRECTED_COLUMNS])
        w.writerows([*r.as_row(), *[""] * len(CORRECTED_COLUMNS)] for r in recs)
    expect = (tmp_path / "expect.csv").read_bytes()
    assert (tmp_path / "one.csv").read_bytes() == expect
    assert (tmp_path / "many.csv").read_bytes() == expect


CORRECTED_META = {
    "probe_costs": {"types": ["fentry", "kprobe", "entry"],
                    "fentry": {"median_ns": 41.5, "p10_ns": 30, "p90_ns": 61},
                    "kprobe": {"median_ns": 93, "p10_ns": 70, "p90_ns": 133},
                    "entry": {"median_ns": 7, "p10_ns": 5, "p90_ns": 12}},
    "floor_ns": {"fentry": {"median_ns": 20, "p10_ns": 10, "p90_ns": 31},
                 "kprobe": {"median_ns": 55, "p10_ns": 40, "p90_ns": 90}},
    "probe_modes": {"iommu_map": "fentry", "iommu_unmap": "kprobe"},
    "unmeasured": ["mmu_ns", "mmu_notifier_ns"]}


@pytest.mark.parametrize("meta", [{}, CORRECTED_META], ids=["uncorrected", "corrected"])
def test_write_rows_gives_what_write_gives(tmp_path, meta):
    """The live path's batches (int64 rows, one format operation per batch) against one
    record at a time: the same bytes, corrected and unmeasured columns included."""
    recs = random_records(5000, seed=4)
    for r in recs[::7]:                     # a handful of hit counts, as real windows have
        r.fentry_hits, r.kprobe_hits, r.entry_hits = r.seq % 5, r.seq % 3, r.seq % 2
    recs[0].from_vf = -1
    one = CaptureWriter(tmp_path / "one.csv", dict(meta))
    rows = CaptureWriter(tmp_path / "rows.csv", dict(meta))
    for r in recs:
        one.write(r)
    array = to_rows(recs)
    for start in (0, 1, 700, 3000):         # batches of any size, one of a single row
        rows.write_rows(array[start:{0: 1, 1: 700, 700: 3000, 3000: None}[start]])
    one.close()
    rows.close()
    assert (tmp_path / "rows.csv").read_bytes() == (tmp_path / "one.csv").read_bytes()
    assert rows.records == one.records == 5000 == rows.meta["records"]


@pytest.mark.parametrize("meta", [{}, CORRECTED_META], ids=["uncorrected", "corrected"])
def test_records_and_rows_interleaved_keep_their_order(tmp_path, meta):
    """write() queues lines, write_rows() arrays formatted at the flush: a capture fed
    both, with flushes between, holds them in the order they came."""
    recs = random_records(3000, seed=9)
    one = CaptureWriter(tmp_path / "one.csv", dict(meta))
    mixed = CaptureWriter(tmp_path / "mixed.csv", dict(meta))
    for r in recs:
        one.write(r)
    array = to_rows(recs)
    cuts = [0, 5, 6, 2100, 2101, 2400, 3000]
    for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
        if i % 2:
            for r in recs[a:b]:
                mixed.write(r)
        else:
            mixed.write_rows(array[a:b])
        if i == 3:
            mixed.flush()
    one.close()
    mixed.close()
    assert (tmp_path / "mixed.csv").read_bytes() == (tmp_path / "one.csv").read_bytes()
    assert mixed.records == 3000


def test_correction_of_many_rows_is_the_correction_of_each():
    from tracer.model.correction import Correction
    corr = Correction.from_meta(CORRECTED_META)
    recs = random_records(3000, seed=6)
    for r in recs:
        r.fentry_hits, r.kprobe_hits, r.entry_hits = r.seq % 4, r.seq % 3, r.pf
        r.source_ns = 0 if r.seq % 2 else r.source_ns
    array = to_rows(recs)
    got = corr.value_rows({c: array[:, i] for i, c in enumerate(COLUMNS)})
    assert got.tolist() == [list(corr.values(r)) for r in recs]


def test_rows_stay_in_order_while_the_timer_thread_flushes(tmp_path, monkeypatch):
    monkeypatch.setattr(capture, "FLUSH_S", 0.0005)       # flush as often as it can
    # and the writing thread flushes too, once this many rows wait for the flush thread
    monkeypatch.setattr(capture, "MAX_PENDING_ROWS", 3)
    recs = random_records(60_000, seed=4)
    w = CaptureWriter(tmp_path / "c.csv", {})
    flushes = []
    real_flush = w._flush_locked

    def counted() -> None:
        flushes.append(threading.current_thread() is w._flusher)
        real_flush()

    w._flush_locked = counted
    for r in recs:
        w.write(r)
    w.close()
    assert any(flushes) and not all(flushes)     # both threads flushed, interleaved
    assert list(iter_capture(tmp_path / "c.csv")) == recs
    assert w.records == len(recs)


def test_the_writing_thread_leaves_the_formatting_to_the_flush_thread(tmp_path, monkeypatch):
    """The writing thread is the reader of the ring buffers: while the flush thread
    formats (holding the lock), it goes on queuing rows, up to MAX_PENDING_ROWS; past
    that it waits for the flush, so the queue's memory stays bounded."""
    monkeypatch.setattr(capture, "MAX_PENDING_ROWS", 4 * capture.FLUSH_ROWS)
    n = capture.FLUSH_ROWS
    recs = random_records(6 * n, seed=11)
    array = to_rows(recs)
    w = CaptureWriter(tmp_path / "c.csv", {})
    formatting, release = threading.Event(), threading.Event()
    real_format = w._format

    def slow_format(items):
        if threading.current_thread() is w._flusher:
            formatting.set()
            release.wait(60)
        return real_format(items)

    w._format = slow_format
    w.write_rows(array[:n])                  # FLUSH_ROWS queued: the flush thread's turn
    assert formatting.wait(30)
    queued = threading.Thread(target=w.write_rows, args=(array[n:3 * n],))
    queued.start()
    queued.join(30)
    assert not queued.is_alive()             # not waiting on the flush thread's lock
    behind = threading.Thread(target=w.write_rows, args=(array[3 * n:],))
    behind.start()
    behind.join(0.5)
    assert behind.is_alive()                 # 4 x FLUSH_ROWS pending: it flushes itself
    release.set()
    behind.join(60)
    assert not behind.is_alive()
    w.close()
    assert list(iter_capture(tmp_path / "c.csv")) == recs and w.records == len(recs)


def test_write_after_close_is_an_error_not_a_silent_loss(tmp_path):
    w = CaptureWriter(tmp_path / "c.csv", {})
    w.write(random_records(1, seed=5)[0])
    w.close()
    with pytest.raises(CaptureError, match="is closed"):
        w.write(random_records(1, seed=6)[0])
    with pytest.raises(CaptureError, match="is closed"):
        w.write_many(random_records(2, seed=7))
    assert len(list(iter_capture(tmp_path / "c.csv"))) == 1


def test_non_integer_value_names_the_reason_when_flushed(tmp_path):
    w = CaptureWriter(tmp_path / "c.csv", {})
    good, bad = random_records(2, seed=8)
    bad.map_ns = "12"
    w.write(good)
    w.write_many([bad])
    with pytest.raises(CaptureError, match=r"not all integers \(.*number is required"):
        w.flush()


def test_rows_array_matches_the_records(tmp_path):
    recs = random_records(3000, seed=10)
    rows = to_rows(recs)
    assert rows.dtype == np.int64 and rows.tolist() == [list(r.as_row()) for r in recs]
