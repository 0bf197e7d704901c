"""The record layouts of ``bpf/vftrace.h`` as ctypes structures and struct decoders.

The header is the one definition: this module reads its ``#define VFT_*`` constants and
``struct vft_*`` bodies (one scalar or fixed array field per line) so the Python decoder
can never drift from the BPF side.  ``decode`` gives a ctypes copy of a record (the
reference); ``Header.reader`` gives the fast path the engine uses per sample: one
precompiled ``struct.Struct`` laid out from the same ctypes structure.
"""
from __future__ import annotations

import ctypes
import re
import struct
from functools import lru_cache
from itertools import repeat
from operator import itemgetter
from typing import Callable, Iterable, Sequence

import numpy as np

from ..paths import bpf_dir
from . import ringread

CTYPES = {"__u64": ctypes.c_uint64, "__s64": ctypes.c_int64, "__u32": ctypes.c_uint32,
          "__s32": ctypes.c_int32, "__u16": ctypes.c_uint16, "__s16": ctypes.c_int16,
          "__u8": ctypes.c_uint8, "__s8": ctypes.c_int8}
# struct codes with standard sizes ("=": native byte order, as the kernel wrote it)
STRUCT_CODES = {"__u64": "Q", "__s64": "q", "__u32": "I", "__s32": "i", "__u16": "H",
                "__s16": "h", "__u8": "B", "__s8": "b"}
NUMPY_CODES = {"__u64": "u8", "__s64": "i8", "__u32": "u4", "__s32": "i4", "__u16": "u2",
               "__s16": "i2", "__u8": "u1", "__s8": "i1"}
STRUCT_RE = re.compile(r"struct\s+(vft_\w+)\s*\{(.*?)\};", re.S)
FIELD_RE = re.compile(r"^\s*(__[us]\d+)\s+(\w+)(?:\[(\w+)\])?\s*;")
DEFINE_RE = re.compile(r"^#define\s+(VFT_\w+)\s+(\d+)\s*(?:/\*.*\*/\s*)?$", re.M)
NUMERIC_DEFINE_RE = re.compile(r"^#define\s+(VFT_\w+)\s+\d+\b.*$", re.M)

Reader = Callable[[object], tuple]
"""Raw sample (BCC's int address or a bytes-like object) -> the fields asked for."""


class Header:
    def __init__(self, text: str):
        self.constants = {k: int(v) for k, v in DEFINE_RE.findall(text)}
        # A numeric define the pattern misses (a comment running onto the next line) would
        # silently lose a constant, and with it, say, a drop counter: refuse it.
        for m in NUMERIC_DEFINE_RE.finditer(text):
            if m.group(1) not in self.constants:
                raise ValueError(f"vftrace.h: cannot parse {m.group(0).strip()!r} "
                                 "(keep a define and its comment on one line)")
        self.structs: dict[str, type[ctypes.Structure]] = {}
        self.field_types: dict[str, dict[str, str]] = {}     # struct -> field -> "__u64"
        for name, body in STRUCT_RE.findall(text):
            fields = []
            types = {}
            for line in body.splitlines():
                line = line.split("/*")[0]
                m = FIELD_RE.match(line)
                if not m:
                    if line.strip():
                        raise ValueError(f"vftrace.h: struct {name}: cannot parse {line.strip()!r}")
                    continue
                ctype, field, count = m.groups()
                t = CTYPES[ctype]
                if count:
                    t = t * (int(count) if count.isdigit() else self.constants[count])
                else:
                    types[field] = ctype
                fields.append((field, t))
            self.structs[name] = type(name, (ctypes.Structure,), {"_fields_": fields})
            self.field_types[name] = types

    def kinds(self) -> dict[int, str]:
        """Call kinds by number: VFT_IOMMU_MAP -> 'iommu_map'."""
        skip = ("VFT_NR_", "VFT_LOST_", "VFT_DROP_", "VFT_JOIN_", "VFT_MAX_",
                "VFT_CALIB_SAMPLES", "VFT_COST_", "VFT_HIST_", "VFT_RING_")
        return {v: k[4:].lower() for k, v in self.constants.items()
                if not k.startswith(skip)}

    def record_struct(self, struct_name: str) -> tuple[struct.Struct, tuple[str, ...]]:
        """A ``struct.Struct`` reading the scalar fields of ``struct_name`` at the offsets
        ctypes gives them (so C's alignment and padding are followed, not assumed), and
        the field names in the order it unpacks them.  Array fields are skipped."""
        cls = self.structs[struct_name]
        types = self.field_types[struct_name]
        fmt, names, at = ["="], [], 0
        for field, _ in cls._fields_:
            if field not in types:
                continue
            offset = getattr(cls, field).offset
            if offset > at:
                fmt.append(f"{offset - at}x")
            code = STRUCT_CODES[types[field]]
            fmt.append(code)
            names.append(field)
            at = offset + struct.calcsize("=" + code)
        size = ctypes.sizeof(cls)
        if size > at:
            fmt.append(f"{size - at}x")
        packed = struct.Struct("".join(fmt))
        assert packed.size == size, (struct_name, packed.size, size)
        return packed, tuple(names)

    def _picker(self, struct_name: str, names: Sequence[str]
                ) -> tuple[struct.Struct, Callable[[tuple], tuple], bool]:
        """The struct of ``struct_name``, a function picking ``names`` out of its
        unpacked values, and whether those values need ``missing`` appended first (a
        name the struct lacks picks that)."""
        packed, fields = self.record_struct(struct_name)
        arrays = {f for f, _ in self.structs[struct_name]._fields_} - set(fields)
        if arrays & set(names):
            raise ValueError(f"reader: {struct_name}: array fields are not read: "
                             f"{', '.join(sorted(arrays & set(names)))}")
        if not names:
            raise ValueError("reader: no field names given")
        position = {name: i for i, name in enumerate(fields)}
        absent = len(fields)                    # the index of the appended ``missing``
        picks = [position.get(name, absent) for name in names]
        pick = itemgetter(*picks)
        if len(picks) == 1:                     # itemgetter of one index gives no tuple
            one = pick
            pick = lambda values: (one(values),)        # noqa: E731
        return packed, pick, absent in picks

    def reader(self, struct_name: str, names: Sequence[str], missing: int = 0) -> Reader:
        """A function from one raw ``struct_name`` sample to the values of ``names``, in
        that order; a name the struct lacks reads as ``missing``.  What ``decode`` +
        ``getattr(rec, name, missing)`` give, without a ctypes object per record."""
        packed, pick, _ = self._picker(struct_name, names)
        unpack_from, pad = packed.unpack_from, (missing,)
        # BCC hands over an address: a ctypes array laid over it is a buffer unpack_from
        # reads in place (cheaper than copying it out with string_at, a foreign call).
        at_address = (ctypes.c_char * packed.size).from_address

        def read(data) -> tuple:
            if data.__class__ is int:
                data = at_address(data)
            return pick(unpack_from(data) + pad)

        return read

    def batch_reader(self, struct_name: str, names: Sequence[str],
                     missing: int = 0) -> Callable[[bytes], Iterable[tuple]]:
        """``reader`` for a batch: from ring slots back to back (``ringread``: each an
        8-byte header, the sample, padding) to the values of ``names`` per record, in
        one ``iter_unpack`` pass, with no Python frame per record."""
        packed, pick, padded = self._picker(struct_name, names)
        iter_unpack = ringread.batch_struct(packed, packed.size).iter_unpack
        if padded:
            pad = (missing,)
            return lambda batch: map(pick, map(tuple.__add__, iter_unpack(batch), repeat(pad)))
        return lambda batch: map(pick, iter_unpack(batch))

    def batch_columns(self, struct_name: str, names: Sequence[str]
                      ) -> Callable[[bytes], tuple[np.ndarray, np.ndarray]]:
        """The columnar twin of ``batch_reader``: from ring slots back to back to an
        (n, len(names)) int64 array, one column per name (a name the struct lacks is a
        column of 0), by one numpy view of the slots: no Python per record.  Also a
        mask of the records with an unsigned value above int64's range (a column
        cannot hold it: the caller counts and drops them)."""
        packed, _ = self.record_struct(struct_name)
        cls = self.structs[struct_name]
        types = self.field_types[struct_name]
        arrays = {f for f, _ in cls._fields_} - set(types)
        if arrays & set(names):
            raise ValueError(f"batch_columns: {struct_name}: array fields are not read: "
                             f"{', '.join(sorted(arrays & set(names)))}")
        known = [n for n in dict.fromkeys(names) if n in types]
        dtype = np.dtype({"names": known,
                          "formats": ["=" + NUMPY_CODES[types[n]] for n in known],
                          "offsets": [ringread.HEADER_BYTES + getattr(cls, n).offset
                                      for n in known],
                          "itemsize": ringread.slot_bytes(packed.size)})
        where = [(j, n) for j, n in enumerate(names) if n in types]
        wide = [n for n in known if types[n] == "__u64"]
        limit = np.uint64(2**63 - 1)

        def read(batch) -> tuple[np.ndarray, np.ndarray]:
            slots = np.frombuffer(batch, dtype)
            out = np.zeros((slots.shape[0], len(names)), np.int64)
            for j, n in where:
                out[:, j] = slots[n]        # a u64 above the range wraps: masked below
            unfit = np.zeros(slots.shape[0], bool)
            for n in wide:
                unfit |= slots[n] > limit
            return out, unfit

        return read


@lru_cache(maxsize=1)
def header() -> Header:
    return Header((bpf_dir() / "vftrace.h").read_text())


def decode(struct_name: str, data) -> ctypes.Structure:
    """A copy of one record from raw bytes (a ring/perf buffer sample)."""
    cls = header().structs[struct_name]
    if isinstance(data, int):                       # a pointer from BCC's callback
        return cls.from_buffer_copy(ctypes.string_at(data, ctypes.sizeof(cls)))
    return cls.from_buffer_copy(bytes(data[:ctypes.sizeof(cls)]))
