"""Naming where a hung lab guest's vCPUs were (tracer/lab/postmortem.py), from QEMU's
``info registers -a`` and the guest's /proc/kallsyms copy.  The whole path, QEMU and the
guest's SysRq dumps included, runs in the lab harness's tests (test_lab.py boots it)."""
from __future__ import annotations

from tracer.lab import postmortem

REGISTERS = """CPU#0
RAX=0000000000000000 RBX=ffff8881001e8000 RCX=0000000000000001 RDX=0000000000000000
RSI=0000000000000083 RDI=00000000000a17fc RBP=ffffffffa021aa40 RSP=ffffffffa0203e98
R8 =0000000000000000 R9 =00000000313b0eba R10=00000000fffffffb R11=0000000000000001
RIP=ffffffff81a0010b RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1
CPU#1
RAX=0000000000000000 RBX=0000000000000000 RCX=0000000000000000 RDX=0000000000000000
RIP=ffffffffc0401234 RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=0
CPU#2
RIP=00007f0012345678 RFL=00000246 [---Z-P-] CPL=3 II=0 A20=1 SMM=0 HLT=0
"""

KALLSYMS = """ffffffff81000000 T _stext
ffffffff81a00100 T native_safe_halt
ffffffff81a00110 t amd_e400_idle
ffffffff81a00200 D some_data
ffffffffc0401200 t pf_sched_switch\t[pf_sched]
ffffffffc0401300 t pf_sched_end\t[pf_sched]
"""


def test_vcpu_rips_reads_each_cpus_rip():
    assert postmortem.vcpu_rips(REGISTERS) == {0: 0xffffffff81a0010b, 1: 0xffffffffc0401234,
                                                2: 0x00007f0012345678}


def test_kernel_symbols_name_text_addresses_with_their_module(tmp_path):
    f = tmp_path / "kallsyms"
    f.write_text(KALLSYMS)
    syms = postmortem.KernelSymbols(f)
    rips = postmortem.vcpu_rips(REGISTERS)
    assert syms.name(rips[0]) == "native_safe_halt+0xb"
    assert syms.name(rips[1]) == "pf_sched_switch+0x34 [pf_sched]"
    assert syms.name(rips[2]) == "user space"
    assert syms.name(0xffffffff80000000).startswith("not in the boot's symbols")
    assert postmortem.KernelSymbols(tmp_path / "missing").name(rips[0]) == "no kernel symbols"


def test_examine_without_a_monitor_says_so_and_does_not_raise(tmp_path):
    lines = postmortem.examine(tmp_path / "no.qmp", None)
    assert len(lines) == 1 and lines[0].startswith("no QEMU monitor")
