"""Member offsets read from BTF (tracer/kernel/btf.py), on a blob built here by the
format of Documentation/bpf/btf.rst, and on this machine's own kernel BTF."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest

from tests.need import need
from tracer.kernel import btf


def blob(types: list[bytes], names: list[str]) -> bytes:
    strings = b"\0" + b"".join(n.encode() + b"\0" for n in names)
    body = b"".join(types)
    header = struct.pack("<HBBI4I", btf.MAGIC, 1, 0, 24, 0, len(body), len(body), len(strings))
    return header + body + strings


def name_off(names: list[str], name: str) -> int:
    return 1 + sum(len(n) + 1 for n in names[:names.index(name)])


def test_a_member_inside_an_anonymous_union_and_after_other_kinds():
    names = ["int", "task_struct", "pid", "stack", "flags", "other", "E", "A"]
    n = lambda s: name_off(names, s)                                        # noqa: E731
    types = [
        struct.pack("<3I", n("int"), 1 << 24, 4) + struct.pack("<I", 32),    # 1 INT
        struct.pack("<3I", n("E"), (6 << 24) | 2, 4) + b"\0" * 16,            # 2 ENUM, 2 items
        struct.pack("<3I", 0, 3 << 24, 0) + struct.pack("<3I", 1, 1, 4),      # 3 ARRAY
        # 4 union { int flags; void *stack; } (anonymous)
        struct.pack("<3I", 0, (5 << 24) | 2, 8)
        + struct.pack("<3I", n("flags"), 1, 0) + struct.pack("<3I", n("stack"), 1, 0),
        # 5 struct other { int stack; } : a member of the same name elsewhere
        struct.pack("<3I", n("other"), (4 << 24) | 1, 4) + struct.pack("<3I", n("stack"), 1, 0),
        # 6 struct task_struct { int pid; <anonymous union at byte 16>; }
        struct.pack("<3I", n("task_struct"), (4 << 24) | 2, 24)
        + struct.pack("<3I", n("pid"), 1, 0) + struct.pack("<3I", 0, 4, 16 * 8),
    ]
    data = blob(types, names)
    assert btf.member_offset(data, "task_struct", "stack") == 16
    assert btf.member_offset(data, "task_struct", "pid") == 0
    assert btf.member_offset(data, "other", "stack") == 0
    assert btf.member_offset(data, "task_struct", "nope") is None
    assert btf.member_offset(data, "A", "stack") is None


def test_bad_data_is_refused_and_a_missing_file_is_no_offset(tmp_path):
    with pytest.raises(btf.BtfError):
        btf.member_offset(b"\x7fELF" + b"\0" * 40, "task_struct", "stack")
    assert btf.task_stack_offset(tmp_path / "none") is None
    (tmp_path / "bad").write_bytes(b"garbage")
    assert btf.task_stack_offset(tmp_path / "bad") is None


def test_this_kernels_task_struct():
    need(btf.VMLINUX.exists(), "this kernel has no /sys/kernel/btf/vmlinux (CONFIG_DEBUG_INFO_BTF)")
    data = btf.VMLINUX.read_bytes()
    stack = btf.member_offset(data, "task_struct", "stack")
    # x86-64: thread_info, __state and friends come first; a pointer is 8-aligned
    assert stack is not None and 0 < stack < 256 and stack % 8 == 0
    assert btf.member_offset(data, "list_head", "prev") == 8
    assert btf.task_stack_offset() == stack
