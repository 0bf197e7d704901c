"""What the kernel itself counts about our BPF programs: the runs it skipped.

The kernel does not run a BPF program that would nest in another on the same CPU (an
fentry program's per-program guard, and from 6.7 the kprobe/tracepoint guard too); it
counts each skip in the program's ``recursion_misses`` (bpf_prog_info, Linux 5.12+).  A
skipped entry program is a call never timed; a skipped exit program, a start never
closed.  Read with BPF_OBJ_GET_INFO_BY_FD, so these are the kernel's figures, not ours.
"""
from __future__ import annotations

import ctypes
import errno
import os

BPF_OBJ_GET_INFO_BY_FD = 15
SYS_BPF = {"x86_64": 321, "aarch64": 280, "ppc64le": 361, "s390x": 351}


class BpfProgInfo(ctypes.Structure):
    """struct bpf_prog_info (include/uapi/linux/bpf.h), up to attach_btf_id."""
    _fields_ = [
        ("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32), ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64), ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64), ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32), ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16), ("ifindex", ctypes.c_uint32),
        ("gpl_compatible", ctypes.c_uint32), ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64), ("nr_jited_ksyms", ctypes.c_uint32),
        ("nr_jited_func_lens", ctypes.c_uint32), ("jited_ksyms", ctypes.c_uint64),
        ("jited_func_lens", ctypes.c_uint64), ("btf_id", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32), ("func_info", ctypes.c_uint64),
        ("nr_func_info", ctypes.c_uint32), ("nr_line_info", ctypes.c_uint32),
        ("line_info", ctypes.c_uint64), ("jited_line_info", ctypes.c_uint64),
        ("nr_jited_line_info", ctypes.c_uint32), ("line_info_rec_size", ctypes.c_uint32),
        ("jited_line_info_rec_size", ctypes.c_uint32), ("nr_prog_tags", ctypes.c_uint32),
        ("prog_tags", ctypes.c_uint64), ("run_time_ns", ctypes.c_uint64),
        ("run_cnt", ctypes.c_uint64), ("recursion_misses", ctypes.c_uint64),
        ("verified_insns", ctypes.c_uint32), ("attach_btf_obj_id", ctypes.c_uint32),
        ("attach_btf_id", ctypes.c_uint32), ("_pad", ctypes.c_uint32),
    ]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32),
                ("info", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)


def recursion_misses(prog_fd: int) -> int | None:
    """The runs of the program behind ``prog_fd`` the kernel skipped; None where this
    kernel does not count them (before 5.12) or cannot say."""
    nr = SYS_BPF.get(os.uname().machine)
    if nr is None:
        return None
    info = BpfProgInfo()
    attr = _InfoAttr(prog_fd, ctypes.sizeof(info), ctypes.addressof(info))
    if _libc.syscall(nr, BPF_OBJ_GET_INFO_BY_FD, ctypes.byref(attr), ctypes.sizeof(attr)) != 0:
        err = ctypes.get_errno()
        if err in (errno.EBADF, errno.EINVAL, errno.EPERM, errno.ENOSYS):
            return None
        raise OSError(err, os.strerror(err))
    # The kernel fills what it knows and says how much (info_len): older ones stop short.
    if attr.info_len < BpfProgInfo.recursion_misses.offset + 8:
        return None
    return int(info.recursion_misses)
