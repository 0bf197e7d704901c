"""The BPF programs loaded in the kernel, by name (no bpftool in the lab: the bpf() syscall).

A test compares the set before and after a run: whatever vftrace loaded must be gone."""
from __future__ import annotations

import ctypes
import os

from tracer.kernel.features import SYS_BPF

BPF_PROG_GET_NEXT_ID, BPF_PROG_GET_FD_BY_ID, BPF_OBJ_GET_INFO_BY_FD = 11, 13, 15
INFO_SIZE, INFO_ID, INFO_NAME = 80, 4, 64        # struct bpf_prog_info: id, name[16]

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _bpf(cmd: int, attr: ctypes.Array) -> int:
    return _libc.syscall(ctypes.c_long(SYS_BPF), ctypes.c_int(cmd), attr,
                         ctypes.c_uint(ctypes.sizeof(attr)))


def loaded_programs() -> dict[int, str]:
    """id -> name of every BPF program in the kernel."""
    out: dict[int, str] = {}
    prog_id = 0
    while True:
        attr = (ctypes.c_uint32 * 4)(prog_id, 0, 0, 0)       # start_id, next_id
        if _bpf(BPF_PROG_GET_NEXT_ID, attr) < 0:
            return out                                        # ENOENT: no more
        prog_id = attr[1]
        attr = (ctypes.c_uint32 * 4)(prog_id, 0, 0, 0)       # prog_id
        fd = _bpf(BPF_PROG_GET_FD_BY_ID, attr)
        if fd < 0:
            continue                                          # freed meanwhile
        try:
            info = ctypes.create_string_buffer(INFO_SIZE)
            get = (ctypes.c_uint64 * 2)()
            ctypes.memmove(get, (ctypes.c_uint32 * 2)(fd, INFO_SIZE), 8)   # bpf_fd, info_len
            get[1] = ctypes.addressof(info)                               # info
            if _bpf(BPF_OBJ_GET_INFO_BY_FD, get) == 0:
                raw = info.raw
                out[int.from_bytes(raw[INFO_ID:INFO_ID + 4], "little")] = \
                    raw[INFO_NAME:INFO_NAME + 16].split(b"\0")[0].decode()
        finally:
            os.close(fd)
