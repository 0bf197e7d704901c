"""Lab guests: KVM VMs whose vCPUs loop over loads and stores to a pf_sched VF's BAR.

One VM per VF, each with ``--vcpus`` vCPUs running a few bytes of real-mode code:

    loop: mov ax, [si]        ; load from the BAR
          inc ax
          mov [si], ax        ; store to the BAR
          inc dword es:[bx]   ; count the iteration in guest RAM (no exit)
          jmp loop

Two ways to give the guest its BAR (``--mode``):

* ``mmap``: the BAR is a memslot backed by ``mmap`` of ``/dev/pf_sched<N>`` at the VF's
  offset.  A switch zaps the mapping (MMU notifier, vCPU kicks, exits) and the next
  access faults into pf_sched, which blocks until the VF is on again.
* ``trap``: the BAR's guest-physical range has no memslot, so every access exits to
  user space (``KVM_EXIT_MMIO``) and is forwarded to ``pread``/``pwrite`` on the device,
  which blocks while the VF is off.

The guest counts its completed iterations in RAM (two BAR accesses each); this process
prints accesses/s per VM, as a table or (``--json``) one JSON object per line.  SIGINT or
SIGTERM (or ``--seconds``) stop it: every vCPU is kicked out of ``KVM_RUN`` and joined,
the final line has the totals.

Start guests only while the tracer is armed, and stop them before it detaches: under
QEMU's TCG, patching kernel text while a nested guest runs has crashed the lab kernel.
"""
from __future__ import annotations

import argparse
import errno
import json
import mmap
import os
import signal
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import VftraceError
from ...pfsched import control
from .kvm import KVM_EXIT_MMIO, RUN_UNION, KvmError, Vm

BAR_GPA = 0x80000            # real mode: DS = 0x8000 reaches the BAR at offset 0
COUNTER_GPA = 0x500          # one u64 iteration counter per vCPU
CODE_GPA = 0x1000
RAM_SIZE = 0x10000
VCPU_STRIDE = 64             # each vCPU's BAR word and counter on its own cache line
MODES = ("mmap", "trap")
MAX_EFAULTS = 1000           # in a row: beyond this the BAR is really gone
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


def bar_loop_code() -> bytes:
    loop = bytes([0x8B, 0x04,               # mov ax, [si]
                  0x40,                     # inc ax
                  0x89, 0x04,               # mov [si], ax
                  0x26, 0x66, 0xFF, 0x07])  # inc dword es:[bx]
    return loop + bytes([0xEB, (-(len(loop) + 2)) & 0xFF])   # jmp loop


class GuestError(VftraceError):
    """A one-line reason the guests cannot run."""


def pf_sched_geometry() -> tuple[int, int]:
    """(VFs per PF, BAR bytes per VF) of the loaded pf_sched."""
    try:
        nr_vfs = int(control.param("nr_vfs"))
        bar = int(control.param("bar_pages")) * mmap.PAGESIZE
    except OSError:
        raise GuestError("pf_sched is not loaded (vftrace pf-sched up)") from None
    return nr_vfs, bar


def placement(vms: int, pfs: int, nr_vfs: int) -> list[tuple[int, int]]:
    """(PF, VF) for each VM: one VF per VM, spread over the PFs first."""
    if vms > pfs * nr_vfs:
        raise GuestError(f"{vms} VMs need {vms} VFs; {pfs} PF(s) x {nr_vfs} VFs has "
                         f"{pfs * nr_vfs} (raise --vfs or --pfs)")
    return [(i % pfs, i // pfs) for i in range(vms)]


@dataclass
class GuestVm:
    """One VM on one VF, its vCPU threads and counters."""
    index: int
    pf: int
    vf: int
    mode: str
    vcpus: int
    bar_size: int
    vm: Vm = field(init=False)
    dev: int = field(init=False)
    mmio_exits: int = 0
    efault_retries: int = 0
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.vcpus * VCPU_STRIDE > self.bar_size:
            raise GuestError(f"{self.vcpus} vCPUs do not fit a {self.bar_size}-byte BAR")
        try:
            self.dev = os.open(f"/dev/pf_sched{self.pf}", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise GuestError(f"/dev/pf_sched{self.pf}: {e.strerror}") from None
        self.offset = self.vf * self.bar_size
        self.vm = Vm(RAM_SIZE)
        self.vm.load(CODE_GPA, bar_loop_code())
        self.bar_map = None
        if self.mode == "mmap":
            self.bar_map = mmap.mmap(self.dev, self.bar_size, mmap.MAP_SHARED,
                                     mmap.PROT_READ | mmap.PROT_WRITE, offset=self.offset)
            self.vm.add_slot(1, BAR_GPA, self.bar_map)
        for j in range(self.vcpus):
            self.vm.add_vcpu(rip=CODE_GPA, ds_base=BAR_GPA,
                             regs={"rsi": j * VCPU_STRIDE, "rbx": COUNTER_GPA + 8 * j})
        self.lock = threading.Lock()

    def iterations(self) -> int:
        return sum(struct.unpack_from("<Q", self.vm.mem, COUNTER_GPA + 8 * j)[0]
                   for j in range(self.vcpus))

    def accesses(self) -> int:
        return 2 * self.iterations()

    def run_vcpu(self, j: int, stop: threading.Event) -> None:
        vcpu = self.vm.vcpus[j]
        run = vcpu.run_page
        efaults = 0
        while not stop.is_set():
            try:
                reason = vcpu.run()
            except InterruptedError:        # kicked by stop(): look at the flag again
                continue
            except OSError as e:
                if e.errno == errno.EFAULT and self.mode == "mmap" and efaults < MAX_EFAULTS:
                    # A revoke raced KVM's lookup of the PFNMAP page it had just faulted
                    # in (the PTE zapped again before KVM read it): KVM_RUN says EFAULT and
                    # the VMM retries, which re-executes the access.
                    efaults += 1
                    with self.lock:
                        self.efault_retries += 1
                    continue
                self.errors.append(f"vm{self.index} vcpu{j}: KVM_RUN: {e.strerror}")
                return
            efaults = 0
            if reason != KVM_EXIT_MMIO:
                self.errors.append(f"vm{self.index} vcpu{j}: unexpected exit {reason}")
                return
            if not self._forward_mmio(run, j):
                return

    def _forward_mmio(self, run, j: int) -> bool:
        gpa, data, length, is_write = struct.unpack_from("=Q8sIB", run, RUN_UNION)
        off = gpa - BAR_GPA
        if not 0 <= off < self.bar_size:
            self.errors.append(f"vm{self.index} vcpu{j}: MMIO outside the BAR at {gpa:#x}")
            return False
        try:
            if is_write:
                os.pwrite(self.dev, data[:length], self.offset + off)
            else:
                got = os.pread(self.dev, length, self.offset + off)
                run[RUN_UNION + 8:RUN_UNION + 8 + length] = got
        except InterruptedError:
            return True                     # re-entered: the guest retries the access
        except OSError as e:
            self.errors.append(f"vm{self.index} vcpu{j}: {'pwrite' if is_write else 'pread'}:"
                               f" {e.strerror}")
            return False
        with self.lock:
            self.mmio_exits += 1
        return True

    def close(self) -> None:
        self.vm.close()
        if self.bar_map is not None:
            self.bar_map.close()
        os.close(self.dev)


class Guests:
    """The VMs and their vCPU threads; start(), sample(), stop()."""

    def __init__(self, mode: str, vms: int, vcpus: int, pfs: int | None = None):
        if mode not in MODES:
            raise GuestError(f"--mode {mode!r}: choose mmap or trap")
        nr_vfs, bar = pf_sched_geometry()
        pfs = pfs if pfs is not None else len(list(Path("/dev").glob("pf_sched[0-9]*")))
        if pfs < 1:
            raise GuestError("no /dev/pf_sched<N>: pf_sched has no PF bound (vftrace pf-sched up)")
        self.mode = mode
        self.vms: list[GuestVm] = []
        try:
            for i, (pf, vf) in enumerate(placement(vms, pfs, nr_vfs)):
                self.vms.append(GuestVm(i, pf, vf, mode, vcpus, bar))
        except BaseException:
            self.close()
            raise
        self.stop_event = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        # A no-op handler so the kick signal interrupts KVM_RUN without killing us.
        signal.signal(signal.SIGUSR1, lambda *_: None)
        for vm in self.vms:
            for j in range(vm.vcpus):
                t = threading.Thread(target=vm.run_vcpu, args=(j, self.stop_event),
                                     name=f"vm{vm.index}-vcpu{j}", daemon=True)
                t.start()
                self.threads.append(t)

    def sample(self) -> list[dict]:
        return [{"vm": vm.index, "pf": vm.pf, "vf": vm.vf, "vcpus": vm.vcpus,
                 "accesses": vm.accesses(), "mmio_exits": vm.mmio_exits,
                 "efault_retries": vm.efault_retries} for vm in self.vms]

    def stop(self, timeout: float = 10.0) -> list[str]:
        """Get every vCPU out of KVM_RUN and join it; what did not stop is reported.

        immediate_exit catches a thread about to enter KVM_RUN, the signal one inside it;
        the kick repeats because a vCPU blocked in pf_sched's (killable) fault wait only
        sees it once its VF is on again."""
        self.stop_event.set()
        for vm in self.vms:
            for vcpu in vm.vm.vcpus:
                vcpu.request_exit()
        deadline = time.monotonic() + timeout
        stuck = []
        for t in self.threads:
            while t.is_alive() and time.monotonic() < deadline:
                signal.pthread_kill(t.ident, signal.SIGUSR1)
                t.join(0.05)
            if t.is_alive():
                stuck.append(t.name)
        return stuck

    def errors(self) -> list[str]:
        return [e for vm in self.vms for e in vm.errors]

    def close(self) -> None:
        for vm in self.vms:
            vm.close()


def _table(rows: list[dict], rates: list[float], elapsed: float) -> str:
    lines = [f"t={elapsed:6.1f}s " + "  ".join(
        f"vm{r['vm']}(pf{r['pf']}/vf{r['vf']}) {rate:9.0f} acc/s" for r, rate in zip(rows, rates))]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    # Short flags as vftrace's (-M --mode, -j --json; tests/unit/test_flags.py): the ones
    # that mean something else there (-m, -n, -c, -s, -o) are long only.
    p = argparse.ArgumentParser(
        prog="python -m tracer.lab.workloads.guests",
        description="KVM guests looping over loads/stores to pf_sched VF BARs (lab, root).",
        epilog="examples:\n"
               "  python -m tracer.lab.workloads.guests --mode mmap --vms 2 --seconds 10\n"
               "  python -m tracer.lab.workloads.guests --mode trap --vcpus 2 --json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-M", "--mode", choices=MODES, default="mmap")
    p.add_argument("--vms", type=int, default=1, help="VMs, one VF each (default 1)")
    p.add_argument("--vcpus", type=int, default=1, help="vCPUs per VM (default 1)")
    p.add_argument("--seconds", type=float, help="stop after this long (default: signal)")
    p.add_argument("-i", "--interval", type=float, default=1.0, help="report every S seconds")
    p.add_argument("-j", "--json", action="store_true", help="one JSON object per report")
    p.add_argument("--summary", help="also write the final report (JSON) to this file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("vms", "vcpus"):
        if getattr(args, name) < 1:
            print(f"guests: error: --{name} must be at least 1", file=sys.stderr)
            return 2
    # The stop signals stay blocked (the vCPU threads inherit that) and the main thread
    # takes them with sigtimedwait: a Python handler that set an Event could run while
    # this thread held the Event's own lock, and the guests then never stopped.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        guests = Guests(args.mode, args.vms, args.vcpus)
    except (GuestError, KvmError, OSError) as e:
        print(f"guests: error: {e}", file=sys.stderr)
        return 2
    guests.start()
    t0 = time.monotonic()
    last, last_t = [0] * len(guests.vms), t0
    deadline = None if args.seconds is None else t0 + args.seconds

    def report(final: bool) -> dict:
        nonlocal last, last_t
        now = time.monotonic()
        rows = guests.sample()
        span = max(now - last_t, 1e-9)
        rates = [(r["accesses"] - prev) / span for r, prev in zip(rows, last)]
        last, last_t = [r["accesses"] for r in rows], now
        elapsed = now - t0
        for r, rate in zip(rows, rates):
            r["accesses_per_s"] = round(rate, 1)
            r["mean_accesses_per_s"] = round(r["accesses"] / elapsed, 1) if elapsed else 0.0
        obj = {"mode": args.mode, "elapsed_s": round(elapsed, 3), "final": final, "vms": rows}
        print(json.dumps(obj) if args.json else _table(rows, rates, elapsed), flush=True)
        return obj

    while not guests.errors():
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            break
        wait = args.interval if deadline is None else min(args.interval, deadline - now)
        if signal.sigtimedwait(STOP_SIGNALS, max(wait, 0.0)) is not None:
            break
        report(False)
    stuck = guests.stop()
    final = report(True)
    final["errors"] = guests.errors() + [f"{name} did not stop" for name in stuck]
    if args.summary:
        Path(args.summary).write_text(json.dumps(final) + "\n")
    guests.close()
    for e in final["errors"]:
        print(f"guests: error: {e}", file=sys.stderr)
    return 1 if final["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
