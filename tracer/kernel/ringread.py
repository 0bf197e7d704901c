"""BPF ring buffers read from their mapped pages, a batch of records at a time.

BCC's reader (libbpf's ``ring_buffer__poll``) calls into Python once per record through
a ctypes callback, the largest per-record cost of the live path.  This reads the pages
libbpf reads (``kernel/bpf/ringbuf.c``):

- offset 0, one page, read-write: the consumer position (ours to advance);
- offset one page, one page, read-only: the producer position;
- then the data pages, mapped twice in a row, so records that wrap the ring's end are
  still one contiguous run.

Each record is an 8-byte header (u32 length with BUSY, bit 31, while the producer
writes it, and DISCARD, bit 30; u32 page offset), then the sample, the whole padded to
8 bytes.  All of one of our rings' records have one size (one struct per ring), so a
batch is the run of headers equal to that size, up to the first busy one: checked with
one numpy comparison, copied out in one slice, then released by storing the consumer
position.

Ordering: libbpf loads the positions with acquire and stores with release.  On x86 plain
loads are not reordered with loads, nor stores with earlier loads, so plain ones are
those; elsewhere ``supported()`` says no and BCC's callback reader runs instead.
"""
from __future__ import annotations

import mmap
import platform
import select
import struct
from typing import Callable, Sequence

import numpy as np

BUSY = 1 << 31
DISCARD = 1 << 30
HEADER_BYTES = 8


def slot_bytes(size: int) -> int:
    """The ring bytes one ``size``-byte sample takes: header, sample, 8-byte alignment."""
    return (size + HEADER_BYTES + 7) & ~7


def supported() -> str | None:
    """None when the mapped reader can run here, else why not."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"mapped ring reader needs x86's load/store ordering (this is {platform.machine()})"
    return None


class RingPages:
    """One ring buffer's pages, read a batch at a time.

    ``mapping`` is the ring's map fd (``mmap``'d here) or, for tests, a ``(consumer,
    producer_and_data)`` pair of writable buffers laid out as the kernel's."""

    def __init__(self, mapping, data_bytes: int, record_size: int):
        if data_bytes <= 0 or data_bytes & (data_bytes - 1):
            raise ValueError(f"ring size {data_bytes}: not a power of two")
        page = mmap.PAGESIZE
        self._maps: list[mmap.mmap] = []
        if isinstance(mapping, int):
            consumer = mmap.mmap(mapping, page, mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
            producer = mmap.mmap(mapping, page + 2 * data_bytes, mmap.MAP_SHARED,
                                 mmap.PROT_READ, offset=page)
            self._maps = [consumer, producer]
        else:
            consumer, producer = mapping
        self._consumer = np.frombuffer(consumer, np.uint64, 1)
        self._producer = np.frombuffer(producer, np.uint64, 1)
        self._data = memoryview(producer)[page:page + 2 * data_bytes]
        self._words = np.frombuffer(self._data, np.uint32)
        self.mask = data_bytes - 1
        self.record_size = record_size
        self.stride = slot_bytes(record_size)
        self.position = int(self._consumer[0])
        self.foreign = 0          # records of another size, or discarded: skipped, counted

    def read(self) -> bytes:
        """The complete records from the consumer position on, back to back as ring
        slots (``stride`` bytes each: header, then sample); the space is released."""
        produced = int(self._producer[0])
        chunks = []
        step = self.stride // 4
        while self.position < produced:
            at = self.position & self.mask
            n = (produced - self.position) // self.stride
            if n:
                start = at // 4
                headers = self._words[start:start + n * step:step]
                bad = np.flatnonzero(headers != self.record_size)
                good = int(bad[0]) if bad.size else n
                if good:
                    chunks.append(bytes(self._data[at:at + good * self.stride]))
                    self.position += good * self.stride
                    continue
            header = int(self._words[at // 4])
            if header & BUSY or (header == self.record_size and not n):
                break                   # still being written: the next read takes it
            if header == self.record_size:
                continue                # committed since the scan saw it busy: take it now
            self.foreign += 1
            self.position += slot_bytes(header & ~(BUSY | DISCARD))
        if chunks or self.position != int(self._consumer[0]):
            self._consumer[0] = self.position       # copied out first: now release
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def close(self) -> None:
        del self._consumer, self._producer, self._words
        self._data.release()
        for m in self._maps:
            m.close()
        self._maps = []


class MappedRings:
    """The engine's rings, each with its batch handler, read in the order given in every
    pass (the order matters: see Engine._open_buffers).  ``poll`` waits for a wake-up
    (batched in the kernel: ring_flags in vftrace.bpf.c) or the timeout, then reads
    every ring whether woken or not, so a trickle shows within the timeout."""

    def __init__(self, rings: Sequence[tuple[int, RingPages, Callable[[bytes], None]]]):
        self.rings = [(pages, handle) for _, pages, handle in rings]
        self._epoll = select.epoll()
        for fd, _, _ in rings:
            self._epoll.register(fd, select.EPOLLIN)

    def poll(self, timeout_ms: int) -> None:
        self._epoll.poll(timeout_ms / 1000)
        self.consume()

    def consume(self) -> None:
        for pages, handle in self.rings:
            batch = pages.read()
            if batch:
                handle(batch)

    @property
    def foreign(self) -> int:
        return sum(pages.foreign for pages, _ in self.rings)

    def close(self) -> None:
        self._epoll.close()
        for pages, _ in self.rings:
            pages.close()


def batch_struct(packed: struct.Struct, size: int) -> struct.Struct:
    """``packed`` (one sample) as one ring slot: the header skipped, the tail padded."""
    tail = slot_bytes(size) - HEADER_BYTES - packed.size
    return struct.Struct(f"={HEADER_BYTES}x{packed.format.lstrip('=')}" + (f"{tail}x" if tail else ""))
