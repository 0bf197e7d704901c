"""Member offsets from the kernel's own BTF (``/sys/kernel/btf/vmlinux``).

The BPF program needs one field of ``struct task_struct`` (``stack``, to tell interrupt
context from task context).  Including ``<linux/sched.h>`` for it made BCC's clang parse
a large part of the kernel's headers at every start-up: ~40% of the compile (2.1-2.2 s
against 1.1-1.4 s on the dev host; in the lab a tier's test time fell ~18%).  The offset
read here is passed as a define instead; a kernel without BTF still gets the header.

The format is Documentation/bpf/btf.rst: a header, then the type section (``struct
btf_type`` and a per-kind trailer), then the string section."""
from __future__ import annotations

import struct
from pathlib import Path

from ..errors import VftraceError

VMLINUX = Path("/sys/kernel/btf/vmlinux")
MAGIC = 0xEB9F
KIND_STRUCT, KIND_UNION = 4, 5
# Bytes after each kind's 12-byte btf_type: fixed, or per vlen item.
_FIXED = {1: 4, 3: 12, 14: 4, 17: 4}                        # INT, ARRAY, VAR, DECL_TAG
_PER_ITEM = {4: 12, 5: 12, 6: 8, 13: 8, 15: 12, 19: 12}     # STRUCT UNION ENUM PROTO DATASEC ENUM64


class BtfError(VftraceError):
    """Data that is not little-endian BTF (the caller treats it as no BTF)."""


def member_offset(data: bytes, struct_name: str, member: str) -> int | None:
    """Byte offset of ``member`` in ``struct struct_name`` (looking through anonymous
    structs and unions); None when either is not there."""
    if len(data) < 24:
        raise BtfError("too short for a BTF header")
    magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
    if magic != MAGIC:
        raise BtfError(f"bad magic {magic:#x} (not little-endian BTF)")
    type_off, type_len, str_off, str_len = struct.unpack_from("<4I", data, 8)
    types_at, strings_at = hdr_len + type_off, hdr_len + str_off
    if strings_at + str_len > len(data) or types_at + type_len > len(data):
        raise BtfError("sections run past the end of the data")

    def name(off: int) -> str:
        end = data.index(b"\0", strings_at + off)
        return data[strings_at + off:end].decode()

    # One walk records where each type starts (ids start at 1); members are decoded
    # only for the types asked about.
    starts = [0]
    pos, end = types_at, types_at + type_len
    unpack = struct.unpack_from
    while pos < end:
        info = unpack("<I", data, pos + 4)[0]
        kind = (info >> 24) & 0x1F
        starts.append(pos)
        pos += 12 + (_PER_ITEM[kind] * (info & 0xFFFF) if kind in _PER_ITEM
                     else _FIXED.get(kind, 0))

    def kind_of(type_id: int) -> int:
        return (unpack("<I", data, starts[type_id] + 4)[0] >> 24) & 0x1F

    def find(type_id: int, depth: int) -> int | None:
        pos = starts[type_id]
        info = unpack("<I", data, pos + 4)[0]
        kflag = info >> 31
        for i in range(info & 0xFFFF):
            m_name, m_type, bits = unpack("<3I", data, pos + 12 + 12 * i)
            if kflag:
                bits &= 0xFFFFFF
            if m_name and name(m_name) == member:
                return bits // 8
            if not m_name and depth < 8 and 0 < m_type < len(starts) and \
                    kind_of(m_type) in (KIND_STRUCT, KIND_UNION):
                inner = find(m_type, depth + 1)
                if inner is not None:
                    return bits // 8 + inner
        return None

    wanted = struct_name.encode()
    for type_id in range(1, len(starts)):
        name_off, info = unpack("<2I", data, starts[type_id])
        if (info >> 24) & 0x1F == KIND_STRUCT and name_off and \
                data[strings_at + name_off:strings_at + name_off + len(wanted) + 1] == \
                wanted + b"\0":
            found = find(type_id, 0)
            if found is not None:
                return found
    return None


def task_stack_offset(path: Path = VMLINUX) -> int | None:
    """``offsetof(struct task_struct, stack)`` of the running kernel; None without BTF."""
    try:
        return member_offset(path.read_bytes(), "task_struct", "stack")
    except (OSError, BtfError):
        return None
