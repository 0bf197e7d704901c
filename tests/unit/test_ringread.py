"""The mapped ring reader (tracer/kernel/ringread.py) and the engine's batch path.

The kernel's side is played by ``KernelRing``: the pages laid out as
``kernel/bpf/ringbuf.c`` maps them (consumer page, producer page, the data pages twice
in a row), records reserved busy and committed as ``bpf_ringbuf_commit`` does, positions
that run past the end of the ring and wrap.  The real kernel's rings are read by the lab
(tests/lab/test_record.py, the mapped and the callback reader on the same switches).
The decoders are checked against the per-record struct decoder on random bytes.
"""
from __future__ import annotations

import ctypes
import mmap
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tracer.kernel import layout, ringread
from tracer.kernel.engine import CALL_READ, SWITCH_READ

from .test_decode_fast import JOIN, SWITCH, engine

PAGE = mmap.PAGESIZE
HEADER = layout.header()


class KernelRing:
    """A ring buffer's pages, written as the kernel writes them."""

    def __init__(self, data_bytes: int, start: int = 0):
        self.size = data_bytes
        self.consumer = bytearray(PAGE)
        self.producer = bytearray(PAGE + 2 * data_bytes)
        self.head = start               # producer position
        struct.pack_into("=Q", self.consumer, 0, start)
        struct.pack_into("=Q", self.producer, 0, start)

    def consumed(self) -> int:
        return struct.unpack_from("=Q", self.consumer)[0]

    def _put(self, pos: int, blob: bytes) -> None:
        """At ring position ``pos``, in both mappings of the data pages."""
        for i in range(len(blob)):
            at = (pos + i) & (self.size - 1)
            self.producer[PAGE + at] = self.producer[PAGE + self.size + at] = blob[i]

    def reserve(self, size: int) -> int:
        slot = ringread.slot_bytes(size)
        assert self.head + slot - self.consumed() <= self.size, "ring full"
        pos = self.head
        self._put(pos, struct.pack("=II", size | ringread.BUSY, 0))
        self.head += slot
        struct.pack_into("=Q", self.producer, 0, self.head)
        return pos

    def commit(self, pos: int, sample: bytes, discard: bool = False) -> None:
        self._put(pos + ringread.HEADER_BYTES, sample)
        self._put(pos, struct.pack("=I", len(sample) | (ringread.DISCARD if discard else 0)))

    def output(self, sample: bytes) -> None:
        self.commit(self.reserve(len(sample)), sample)

    def reader(self, record_size: int) -> ringread.RingPages:
        return ringread.RingPages((self.consumer, self.producer), self.size, record_size)


def random_samples(cls, n: int, rng: random.Random) -> list[bytes]:
    """Random bytes; most u64 fields kept within int64 (so most records fit a column)."""
    size = ctypes.sizeof(cls)
    wide = [getattr(cls, f).offset for f, t in cls._fields_ if t is ctypes.c_uint64]
    out = []
    for _ in range(n):
        raw = bytearray(rng.randbytes(size))
        for at in wide:
            if rng.random() < 0.97:
                raw[at + 7] &= 0x7F
        out.append(bytes(raw))
    return out


def decode_each(name: str, names, samples: list[bytes]) -> list[tuple]:
    read = HEADER.reader(name, names)
    return [read(s) for s in samples]


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32), start_slots=st.integers(0, 200),
       chunks=st.lists(st.integers(0, 40), min_size=1, max_size=12),
       struct_name=st.sampled_from(["vft_switch", "vft_join", "vft_call"]))
def test_batches_decode_as_the_struct_decoder_across_wrap_around(seed, start_slots, chunks,
                                                                  struct_name):
    """Records written in chunks, each chunk read as one batch; the ring is small and
    starts at any position, so batches wrap past its end (the doubled mapping)."""
    cls = HEADER.structs[struct_name]
    names = {"vft_switch": (*SWITCH_READ, "exits_pending"), "vft_call": CALL_READ,
             "vft_join": ("kind", "pf", "seq", "ns")}[struct_name]
    rng = random.Random(seed)
    size = ctypes.sizeof(cls)
    data_bytes = 1 << (ringread.slot_bytes(size) * 41 - 1).bit_length()   # >= 41 slots
    ring = KernelRing(data_bytes, start=start_slots * ringread.slot_bytes(size) + 2**40)
    pages = ring.reader(size)
    batch_read = HEADER.batch_reader(struct_name, names)
    columns = HEADER.batch_columns(struct_name, names)
    for n in chunks:
        samples = random_samples(cls, n, rng)
        for s in samples:
            ring.output(s)
        batch = pages.read()
        assert len(batch) == n * pages.stride
        expected = decode_each(struct_name, names, samples)
        assert list(batch_read(batch)) == expected
        # the columnar decoder: the same values, a record that int64 cannot hold masked
        rows, unfit = columns(batch)
        assert rows.shape == (n, len(names)) and unfit.tolist() == [
            max(values) > 2**63 - 1 for values in expected]
        assert [r for r, bad in zip(rows.tolist(), unfit.tolist()) if not bad] == [
            list(values) for values in expected if max(values) <= 2**63 - 1]
        assert ring.consumed() == ring.head          # the space is handed back
    assert pages.foreign == 0


def test_a_busy_record_ends_the_batch_until_it_is_committed():
    size = ctypes.sizeof(JOIN)
    ring = KernelRing(4096)
    pages = ring.reader(size)
    first, second = bytes(JOIN(seq=1, ns=5)), bytes(JOIN(seq=2, ns=6))
    ring.output(first)
    held = ring.reserve(size)              # a second CPU still writing its record
    ring.output(bytes(JOIN(seq=3, ns=7)))  # committed after it: must wait its turn
    read = HEADER.batch_reader("vft_join", ("seq", "ns"))
    assert list(read(pages.read())) == [(1, 5)]
    assert ring.consumed() == ringread.slot_bytes(size)      # not past the busy record
    assert pages.read() == b""
    ring.commit(held, second)
    assert list(read(pages.read())) == [(2, 6), (3, 7)]
    assert ring.consumed() == ring.head


class CommitAfterScan:
    """The reader's view of the headers, with the kernel committing a record right after
    the reader's scan saw it busy (before the reader looks at that header again)."""

    def __init__(self, words, commit):
        self.words, self.commit = words, commit

    def __getitem__(self, key):
        out = self.words[key]
        if isinstance(key, slice) and self.commit:
            out = out.copy()            # what the scan saw
            commit, self.commit = self.commit, None
            commit()
        return out


def test_a_record_committed_between_the_scan_and_its_second_look_is_read_not_skipped():
    """Lab, 6.1: two records counted as foreign and lost, one of them a switch."""
    size = ctypes.sizeof(JOIN)
    ring = KernelRing(4096)
    pages = ring.reader(size)
    held = ring.reserve(size)
    pages._words = CommitAfterScan(pages._words, lambda: ring.commit(held, bytes(JOIN(seq=9))))
    read = HEADER.batch_reader("vft_join", ("seq",))
    assert list(read(pages.read())) == [(9,)]
    assert pages.foreign == 0 and ring.consumed() == ring.head


def test_discarded_and_foreign_records_are_skipped_and_counted():
    size = ctypes.sizeof(JOIN)
    ring = KernelRing(4096)
    pages = ring.reader(size)
    ring.output(bytes(JOIN(seq=1)))
    ring.commit(ring.reserve(size), bytes(JOIN(seq=2)), discard=True)
    ring.output(b"\x01" * 12)                      # not a vft_join
    ring.output(bytes(JOIN(seq=3)))
    read = HEADER.batch_reader("vft_join", ("seq",))
    assert [v for (v,) in read(pages.read())] == [1, 3]
    assert pages.foreign == 2 and ring.consumed() == ring.head


def test_ring_size_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        ringread.RingPages((bytearray(PAGE), bytearray(PAGE + 6000)), 3000, 64)


def test_batch_reader_pads_names_the_struct_lacks_and_refuses_arrays():
    h = layout.Header("""
struct vft_small {
\t__u32 a;
\t__u16 arr[2];
\t__u64 b;
};
""")
    raw = h.structs["vft_small"](a=7, b=9)
    slot = struct.pack("=II", ctypes.sizeof(raw), 0) + bytes(raw)
    slot += b"\0" * (ringread.slot_bytes(ctypes.sizeof(raw)) - len(slot))
    read = h.batch_reader("vft_small", ("b", "missing", "a"), missing=-1)
    assert list(read(slot * 3)) == [(9, -1, 7)] * 3
    assert list(h.batch_reader("vft_small", ("a",))(slot)) == [(7,)]
    with pytest.raises(ValueError, match="array"):
        h.batch_reader("vft_small", ("arr",))


def test_engine_batch_path_gives_what_its_per_record_path_gives():
    """The mapped reader's entry (a batch of ring slots) against BCC's (one address per
    record): the same SwitchRecords, and the same counts of what was not written."""
    rng = random.Random(5)
    samples = []
    for i in range(300):
        values = {"seq": i + 1, "pf": i % 3, "from_vf": i % 4 - 1, "to_vf": i % 4,
                  "switch_ns": rng.randrange(1, 10**6), "revoke_ns": rng.randrange(10**5),
                  "t_ns": i * 1000, "exits_pending": 0}
        if i % 50 == 7:
            values["grant_ns"] = 2**63 + 5             # above int64: counted, not written
        samples.append(bytes(SWITCH(**values)))
    one, one_out, _ = engine(budget_ns=500_000)
    for s in samples:
        one._on_switch(s)
    ring = KernelRing(1 << 17)
    for s in samples:
        ring.output(s)
    batched, batched_out, _ = engine(budget_ns=500_000)
    batched._on_switches(ring.reader(ctypes.sizeof(SWITCH)).read())
    batched.assembler.tick()
    assert batched_out == one_out and len(one_out) == 294
    assert (batched.samples, batched.out_of_range) == (one.samples, one.out_of_range) == (300, 6)
