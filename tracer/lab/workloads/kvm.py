"""A minimal KVM virtual machine driven through the KVM API (``/dev/kvm`` ioctls).

Enough to run a few bytes of 16-bit real-mode guest code on one vCPU and see its exits:
the lab's smoke tests use it to show that nested KVM works and ``kvm:kvm_exit`` fires.
"""
from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import struct
from dataclasses import dataclass

KVMIO = 0xAE


def _io(nr: int) -> int:
    return (KVMIO << 8) | nr


def _iow(nr: int, size: int) -> int:
    return (1 << 30) | (size << 16) | (KVMIO << 8) | nr


def _ior(nr: int, size: int) -> int:
    return (2 << 30) | (size << 16) | (KVMIO << 8) | nr


KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_CREATE_VCPU = _io(0x41)
REGION = struct.Struct("=IIQQQ")              # struct kvm_userspace_memory_region
KVM_SET_USER_MEMORY_REGION = _iow(0x46, REGION.size)
KVM_RUN = _io(0x80)
REGS_SIZE, SREGS_SIZE = 18 * 8, 312           # struct kvm_regs, struct kvm_sregs (x86)
KVM_GET_REGS, KVM_SET_REGS = _ior(0x81, REGS_SIZE), _iow(0x82, REGS_SIZE)
KVM_GET_SREGS, KVM_SET_SREGS = _ior(0x83, SREGS_SIZE), _iow(0x84, SREGS_SIZE)

KVM_EXIT_IO, KVM_EXIT_HLT, KVM_EXIT_MMIO = 2, 5, 6
EXIT_NAMES = {KVM_EXIT_IO: "io", KVM_EXIT_HLT: "hlt", KVM_EXIT_MMIO: "mmio"}
RUN_IMMEDIATE_EXIT = 1                         # offsetof(struct kvm_run, immediate_exit)
RUN_EXIT_REASON = 8                            # offsetof(struct kvm_run, exit_reason)
RUN_UNION = 32                                 # offsetof(struct kvm_run, io / mmio)
REG_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10",
             "r11", "r12", "r13", "r14", "r15", "rip", "rflags")   # struct kvm_regs
RIP, RFLAGS = REG_NAMES.index("rip"), REG_NAMES.index("rflags")
SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")      # struct kvm_sregs
SEGMENT_SIZE = 24                                                # struct kvm_segment


class KvmError(OSError):
    pass


def io_loop_code(port: int, count: int) -> bytes:
    """Real-mode code: ``out port, al`` ``count`` times (one exit each), then ``hlt``."""
    code = bytes([0xB9]) + struct.pack("<H", count)          # mov cx, count
    loop = bytes([0xB0, 0x42, 0xE6, port & 0xFF])           # mov al, 0x42; out port, al
    code += loop + bytes([0xE2, (-(len(loop) + 2)) & 0xFF])  # loop back to the out
    return code + bytes([0xF4])                               # hlt


@dataclass
class Exit:
    reason: int
    port: int = 0

    @property
    def name(self) -> str:
        return EXIT_NAMES.get(self.reason, str(self.reason))


class Vcpu:
    """One vCPU in 16-bit real mode, its ``kvm_run`` page mapped."""

    def __init__(self, vm: Vm, index: int, rip: int, ds_base: int = 0,
                 regs: dict[str, int] | None = None):
        self.fd = fcntl.ioctl(vm.fd, KVM_CREATE_VCPU, index)
        self.run_page = mmap.mmap(self.fd, vm.run_size, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        sregs = bytearray(SREGS_SIZE)
        fcntl.ioctl(self.fd, KVM_GET_SREGS, sregs)
        for seg, base in (("cs", 0), ("ds", ds_base), ("es", 0)):
            at = SEGMENTS.index(seg) * SEGMENT_SIZE
            struct.pack_into("=Q", sregs, at, base)                    # .base
            struct.pack_into("=H", sregs, at + 12, base >> 4)          # .selector
        fcntl.ioctl(self.fd, KVM_SET_SREGS, bytes(sregs))
        self.rip, self.regs = rip, dict(regs or {})
        self.restart()

    def restart(self) -> None:
        """Point the vCPU at its code again (after a ``hlt``)."""
        values = [0] * 18
        for name, value in self.regs.items():
            values[REG_NAMES.index(name)] = value
        values[RIP], values[RFLAGS] = self.rip, 0x2
        fcntl.ioctl(self.fd, KVM_SET_REGS, struct.pack("=18Q", *values))

    def run(self) -> int:
        """KVM_RUN until the next exit to user space; returns the exit reason.
        Raises InterruptedError when a signal kicked the vCPU out."""
        fcntl.ioctl(self.fd, KVM_RUN, 0)
        return struct.unpack_from("=I", self.run_page, RUN_EXIT_REASON)[0]

    def request_exit(self) -> None:
        """Make every KVM_RUN from now on return EINTR at once.  With a signal kick this
        closes the race of a kick that lands just before the thread enters KVM_RUN
        (Documentation/virt/kvm/api.rst, ``immediate_exit``)."""
        self.run_page[RUN_IMMEDIATE_EXIT] = 1

    def close(self) -> None:
        self.run_page.close()
        os.close(self.fd)


class Vm:
    """A VM with RAM at guest physical 0 (memslot 0) and real-mode vCPUs."""

    def __init__(self, mem_size: int = 0x10000):
        self.kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        try:
            if fcntl.ioctl(self.kvm, KVM_GET_API_VERSION) != 12:
                raise KvmError("unexpected KVM API version")
            self.fd = fcntl.ioctl(self.kvm, KVM_CREATE_VM, 0)
        except BaseException:
            os.close(self.kvm)
            raise
        self.run_size = fcntl.ioctl(self.kvm, KVM_GET_VCPU_MMAP_SIZE)
        self.mem = mmap.mmap(-1, mem_size, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        self.vcpus: list[Vcpu] = []
        self.add_slot(0, 0, self.mem)

    def add_slot(self, slot: int, gpa: int, backing: mmap.mmap) -> None:
        """Back guest physical [gpa, gpa + len) with a mapping of ours (memslot)."""
        addr = ctypes.addressof(ctypes.c_char.from_buffer(backing))
        fcntl.ioctl(self.fd, KVM_SET_USER_MEMORY_REGION,
                    REGION.pack(slot, 0, gpa, len(backing), addr))

    def load(self, gpa: int, code: bytes) -> None:
        self.mem[gpa:gpa + len(code)] = code

    def add_vcpu(self, rip: int, ds_base: int = 0, regs: dict[str, int] | None = None) -> Vcpu:
        vcpu = Vcpu(self, len(self.vcpus), rip, ds_base, regs)
        self.vcpus.append(vcpu)
        return vcpu

    def close(self) -> None:
        for vcpu in self.vcpus:
            vcpu.close()
        os.close(self.fd)
        os.close(self.kvm)
        # The memslots hold the memory until the VM fd is gone; closing it after is safe.
        try:
            self.mem.close()
        except BufferError:     # a ctypes view still exported: freed with the object
            pass


class TinyVM:
    """One VM, one memory slot at guest physical 0, one vCPU in real mode."""

    def __init__(self, code: bytes, mem_size: int = 0x10000, entry: int = 0x1000):
        self.vm = Vm(mem_size)
        self.vm.load(entry, code)
        self.vcpu = self.vm.add_vcpu(rip=entry)
        self.mem = self.vm.mem

    def restart(self) -> None:
        self.vcpu.restart()

    def run_once(self) -> Exit:
        reason = self.vcpu.run()
        port = 0
        if reason == KVM_EXIT_IO:
            port = struct.unpack_from("=BBHIQ", self.vcpu.run_page, RUN_UNION)[2]
        return Exit(reason, port)

    def run_until_hlt(self, max_exits: int = 100000) -> list[Exit]:
        exits = []
        for _ in range(max_exits):
            e = self.run_once()
            exits.append(e)
            if e.reason == KVM_EXIT_HLT:
                return exits
            if e.reason != KVM_EXIT_IO:
                raise KvmError(f"unexpected KVM exit {e.name}")
        raise KvmError(f"guest did not halt within {max_exits} exits")

    def close(self) -> None:
        self.vm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def main(argv: list[str] | None = None) -> int:
    """Run a tiny VM's port-write loop again and again for a while; print how many exits
    reached user space.

    One VM for the whole run, never one per round: creating and destroying VMs flips the
    kernel's preempt-notifier static key each time, live-patching ``__schedule``; under
    QEMU's TCG that patching races with other vCPUs and has crashed the lab kernel
    (``Oops: int3`` in ``__schedule``)."""
    import argparse
    import time
    p = argparse.ArgumentParser(prog="python -m tracer.lab.workloads.kvm")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--outs", type=int, default=200, help="port writes per VM run")
    p.add_argument("--pause-ms", type=float, default=0.0, help="sleep between runs")
    args = p.parse_args(argv)
    exits, deadline = 0, time.monotonic() + args.seconds
    with TinyVM(io_loop_code(port=0x10, count=args.outs)) as vm:
        while time.monotonic() < deadline:
            exits += len(vm.run_until_hlt())
            vm.restart()
            if args.pause_ms:
                time.sleep(args.pause_ms / 1000)
    print(exits)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
