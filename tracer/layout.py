"""The record layouts of ``bpf/vftrace.h`` as ctypes structures.

The header is the one definition: this module reads its ``#define VFT_*`` constants and
``struct vft_*`` bodies (one scalar or fixed array field per line) so the Python decoder
can never drift from the BPF side.
"""
from __future__ import annotations

import ctypes
import re
from functools import lru_cache

from .paths import bpf_dir

CTYPES = {"__u64": ctypes.c_uint64, "__s64": ctypes.c_int64, "__u32": ctypes.c_uint32,
          "__s32": ctypes.c_int32, "__u16": ctypes.c_uint16, "__u8": ctypes.c_uint8}
STRUCT_RE = re.compile(r"struct\s+(vft_\w+)\s*\{(.*?)\};", re.S)
FIELD_RE = re.compile(r"^\s*(__[us]\d+)\s+(\w+)(?:\[(\w+)\])?\s*;")
DEFINE_RE = re.compile(r"^#define\s+(VFT_\w+)\s+(\d+)\s*$", re.M)


class Header:
    def __init__(self, text: str):
        self.constants = {k: int(v) for k, v in DEFINE_RE.findall(text)}
        self.structs: dict[str, type[ctypes.Structure]] = {}
        for name, body in STRUCT_RE.findall(text):
            fields = []
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
                fields.append((field, t))
            self.structs[name] = type(name, (ctypes.Structure,), {"_fields_": fields})

    def kinds(self) -> dict[int, str]:
        """Call kinds by number: VFT_IOMMU_MAP -> 'iommu_map'."""
        skip = ("VFT_NR_", "VFT_LOST_", "VFT_MAX_", "VFT_CALIB_SAMPLES")
        return {v: k[4:].lower() for k, v in self.constants.items()
                if not k.startswith(skip)}


@lru_cache(maxsize=1)
def header() -> Header:
    return Header((bpf_dir() / "vftrace.h").read_text())


def decode(struct_name: str, data) -> ctypes.Structure:
    """A copy of one record from raw bytes (a ring/perf buffer sample)."""
    cls = header().structs[struct_name]
    if isinstance(data, int):                       # a pointer from BCC's callback
        return cls.from_buffer_copy(ctypes.string_at(data, ctypes.sizeof(cls)))
    return cls.from_buffer_copy(bytes(data[:ctypes.sizeof(cls)]))
