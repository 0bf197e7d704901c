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
RUN_EXIT_REASON = 8                            # offsetof(struct kvm_run, exit_reason)
RUN_UNION = 32                                 # offsetof(struct kvm_run, io / mmio)
RIP, RFLAGS = 16, 17                           # indexes in struct kvm_regs


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


class TinyVM:
    """One VM, one memory slot at guest physical 0, one vCPU in real mode."""

    def __init__(self, code: bytes, mem_size: int = 0x10000, entry: int = 0x1000):
        self.kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        if fcntl.ioctl(self.kvm, KVM_GET_API_VERSION) != 12:
            raise KvmError("unexpected KVM API version")
        self.vm = fcntl.ioctl(self.kvm, KVM_CREATE_VM, 0)
        self.mem = mmap.mmap(-1, mem_size, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        self.mem[entry:entry + len(code)] = code
        addr = ctypes.addressof(ctypes.c_char.from_buffer(self.mem))
        fcntl.ioctl(self.vm, KVM_SET_USER_MEMORY_REGION, REGION.pack(0, 0, 0, mem_size, addr))
        self.vcpu = fcntl.ioctl(self.vm, KVM_CREATE_VCPU, 0)
        run_size = fcntl.ioctl(self.kvm, KVM_GET_VCPU_MMAP_SIZE)
        self.run_page = mmap.mmap(self.vcpu, run_size, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        sregs = bytearray(SREGS_SIZE)
        fcntl.ioctl(self.vcpu, KVM_GET_SREGS, sregs)
        struct.pack_into("=Q", sregs, 0, 0)      # cs.base = 0
        struct.pack_into("=H", sregs, 12, 0)     # cs.selector = 0
        fcntl.ioctl(self.vcpu, KVM_SET_SREGS, bytes(sregs))
        regs = [0] * 18
        regs[RIP], regs[RFLAGS] = entry, 0x2
        fcntl.ioctl(self.vcpu, KVM_SET_REGS, struct.pack("=18Q", *regs))

    def run_once(self) -> Exit:
        fcntl.ioctl(self.vcpu, KVM_RUN, 0)
        reason = struct.unpack_from("=I", self.run_page, RUN_EXIT_REASON)[0]
        port = 0
        if reason == KVM_EXIT_IO:
            port = struct.unpack_from("=BBHIQ", self.run_page, RUN_UNION)[2]
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
        self.run_page.close()
        for fd in (self.vcpu, self.vm, self.kvm):
            os.close(fd)
        self.mem.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def main(argv: list[str] | None = None) -> int:
    """Run tiny VMs back to back for a while; print how many exits reached user space."""
    import argparse
    import time
    p = argparse.ArgumentParser(prog="python -m tracer.workloads.kvm")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--outs", type=int, default=200, help="port writes per VM run")
    args = p.parse_args(argv)
    exits, deadline = 0, time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        with TinyVM(io_loop_code(port=0x10, count=args.outs)) as vm:
            exits += len(vm.run_until_hlt())
    print(exits)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
