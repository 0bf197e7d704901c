"""Lab smoke tests: BCC, kprobes, tracepoints, VFIO and nested KVM really work here."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.lab import labutil
from tracer.kernel import btf
from tracer.lab.workloads import kvm, vfio

pytestmark = pytest.mark.lab
SMOKE_C = Path(__file__).parent / "bpf" / "smoke.bpf.c"
MAP_CALLS, MAP_BYTES, UNMAP_CALLS, UNMAP_BYTES, KVM_EXITS = range(5)


@pytest.fixture(scope="module")
def probes():
    """The smoke program compiled and attached, filtering on this process."""
    bcc = pytest.importorskip("bcc", reason="python3-bpfcc missing in the lab")
    b = bcc.BPF(src_file=str(SMOKE_C), cflags=[f"-DFILTER_TGID={os.getpid()}"])
    b.attach_kprobe(event="iommu_map", fn_name="on_iommu_map")
    b.attach_kprobe(event="iommu_unmap", fn_name="on_iommu_unmap")
    b.attach_kprobe(event="iommu_unmap_fast", fn_name="on_iommu_unmap")
    yield b
    b.cleanup()


def read_counts(b) -> list[int]:
    t = b["counts"]
    return [t[t.Key(i)].value for i in range(5)]


def test_bcc_attaches_kprobe_and_kvm_exit_tracepoint(probes):
    assert probes.num_open_kprobes() == 3
    assert probes.num_open_tracepoints() == 1
    # BCC attaches through the perf kprobe PMU: the kernel's own list shows the kprobe.
    # (At +0x4 past the ENDBR on IBT kernels such as 6.12.)
    registered = Path("/sys/kernel/debug/kprobes/list").read_text()
    assert re.search(r"\biommu_map\+0x[0-9a-f]+\b", registered), registered


def test_the_task_stack_offset_read_from_btf_is_the_kernel_headers_offsetof():
    """The recorder reads task_struct.stack at the offset the kernel's BTF gives
    (tracer/kernel/btf.py) instead of compiling <linux/sched.h> at every start: the
    kernel's own headers must put it at the same place."""
    bcc = pytest.importorskip("bcc", reason="python3-bpfcc missing in the lab")
    off = btf.task_stack_offset()
    assert off is not None, "no /sys/kernel/btf/vmlinux in the lab kernel"
    text = ("#include <linux/sched.h>\n"
            f"_Static_assert(offsetof(struct task_struct, stack) == {off}, \"BTF's offset\");\n"
            "int nothing(void *ctx) { return 0; }\n")
    bcc.BPF(text=text).cleanup()         # a failed assertion is a compile error


def test_vfio_dma_map_reaches_iommu_map_and_unmap(probes):
    labutil.modprobe("vfio-pci")
    free = labutil.free_edu_devices()
    assert free, f"no free edu device (have {labutil.edu_devices()})"
    cycles, size = 8, 1 << 20
    with labutil.bound_to(free[-1], "vfio-pci") as bdf, vfio.Container(bdf) as container:
        # Container set-up maps pages of its own (type1 probes for fine-grained superpages),
        # so only the cycles are counted.
        before = read_counts(probes)
        unmapped = vfio.map_unmap_cycles(container, cycles, size)
        after = read_counts(probes)
    delta = [a - b for a, b in zip(after, before)]
    assert unmapped == cycles * size
    assert delta[MAP_CALLS] >= cycles and delta[UNMAP_CALLS] >= cycles, delta
    # Every byte VFIO pinned and mapped went through iommu_map, and back out.
    assert delta[MAP_BYTES] == cycles * size, delta
    assert delta[UNMAP_BYTES] == cycles * size, delta


def test_kvm_guest_runs_and_its_exits_are_seen(probes):
    if not Path("/dev/kvm").exists():
        pytest.fail("no /dev/kvm in the lab: nested KVM (kvm_amd/kvm_intel) did not load")
    outs = 50
    probes["exit_reasons"].clear()
    before = read_counts(probes)
    with kvm.TinyVM(kvm.io_loop_code(port=0x10, count=outs)) as vm:
        exits = vm.run_until_hlt()
    after = read_counts(probes)
    io = [e for e in exits if e.reason == kvm.KVM_EXIT_IO]
    assert len(io) == outs and all(e.port == 0x10 for e in io)
    assert exits[-1].reason == kvm.KVM_EXIT_HLT
    seen = after[KVM_EXITS] - before[KVM_EXITS]
    assert seen >= outs + 1, f"kvm:kvm_exit fired {seen} times for {outs + 1} exits to user space"
    # One hardware exit reason (IOIO on SVM, IO_INSTRUCTION on VMX) covers the outs.
    by_reason = {k.value: v.value for k, v in probes["exit_reasons"].items()}
    assert max(by_reason.values()) >= outs, by_reason
