"""The lab's guests presets (``vftrace lab --mode``, ``--record``, ``experiment``): the
script the guest side runs, and what it wrote copied back to where the user asked."""
from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

from . import LabError
from .kernels import LabKernel


class Preset:
    """The guests presets: pf_sched with the given geometry, KVM guests on its VFs, then
    the dashboard (``--mode``), a headless capture copied back (``--record FILE``) or the
    whole experiment (``experiment``).  The guest side runs from a script written into
    the shared tree, so the kernel command line stays short."""

    def __init__(self, args, kind: str, run_dir: Path, kernel: LabKernel):
        self.args, self.kind, self.run_dir, self.kernel = args, kind, run_dir, kernel
        self.command: list[str] = []
        self.shell: Path | None = None

    @classmethod
    def from_args(cls, args, cmd: list[str], share: Path, kernel: LabKernel) -> Preset:
        kind = "experiment" if cmd[:1] == ["experiment"] else "record" if args.record else "live"
        if kind == "experiment" and len(cmd) > 1:
            raise LabError(f"experiment takes options before it, not {shlex.join(cmd[1:])!r} "
                           "(e.g. vftrace lab -d 20 experiment)")
        if kind != "experiment" and cmd:
            raise LabError("--mode/--record run the guests preset; give no command with them")
        if kind == "record" and not args.mode:
            raise LabError("--record needs --mode mmap or --mode trap")
        for name, lo, hi in (("vms", 1, 64), ("vcpus", 1, 8), ("vfs", 1, 64),
                             ("slice_us", 1, 10_000_000)):
            value = getattr(args, name)
            if not lo <= value <= hi:
                raise LabError(f"--{name.replace('_', '-')} {value}: give {lo} to {hi}")
        if args.duration <= 0:
            raise LabError(f"--duration {args.duration}: give a positive number of seconds")
        pfs = max(args.pfs, 1)
        if args.vms > pfs * args.vfs:
            raise LabError(f"--vms {args.vms}: one VF per guest, and {pfs} PF(s) x {args.vfs} "
                           "VFs is fewer (raise --vfs or --pfs)")
        if args.record:
            from ..record.session import RecordError, check_capture_output
            try:
                check_capture_output(args.record, "--record")
            except RecordError as e:
                raise LabError(str(e)) from None
        args.pfs = pfs
        run_dir = share / "build" / ".lab-run" / f"run-{os.getpid()}"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        preset = cls(args, kind, run_dir, kernel)
        preset._write(share)
        return preset

    def _guests(self, mode: str) -> str:
        a = self.args
        return (f"python -m tracer.lab.workloads.guests --mode {mode} --vms {a.vms} "
                f"--vcpus {a.vcpus}")

    def _write(self, share: Path) -> None:
        a = self.args
        up = (f"vftrace pf-sched up --slice-us {a.slice_us} --nr-vfs {a.vfs} "
              f"--unmap-mode {a.unmap_mode} >&2")
        run = shlex.quote(str(self.run_dir))
        if self.kind == "experiment":
            body = (f"set -e\n{up}\nexec python -m tracer.lab.experiment compare "
                    f"-o {run}/experiment -d {a.duration:g} --vms {a.vms} --vcpus {a.vcpus}\n")
        elif self.kind == "record":
            body = (f"set -e\n{up}\nexec python -m tracer.lab.experiment run --mode {a.mode} "
                    f"-o {run}/capture.csv -d {a.duration:g} --vms {a.vms} --vcpus {a.vcpus}\n")
        else:
            # Interactive: a --shell script, so the dashboard gets the terminal; leaving
            # it (q) ends the script and so the VM.  The tracer starts the guests once it
            # is armed and stops them before it detaches (see tracer/lab/experiment.py).  The
            # guests' vCPUs spin; niced, they leave the dashboard and its reader the CPU
            # they need (un-niced, the reader starved and the ring buffer overflowed).
            # The dashboard's stall watchdog (tui/watchdog.py) reaches the guest too.
            stall = os.environ.get("VFTRACE_STALL_DUMP")
            body = (f"cd {shlex.quote(str(share))}\n"
                    f"export VFTRACE_LAB=1 VFTRACE_LAB_PFS={a.pfs} "
                    + (f"VFTRACE_STALL_DUMP={shlex.quote(stall)} " if stall else "")
                    + f"PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH\n"
                    f"{up} || {{ echo 'pf_sched did not start; a shell instead'; exec bash -i; }}\n"
                    f"exec vftrace live -- nice -n 10 {self._guests(a.mode)}\n")
        script = self.run_dir / ("shell.sh" if self.kind == "live" else "run.sh")
        script.write_text("#!/bin/sh\n" + body)
        script.chmod(0o755)
        if self.kind == "live":
            self.shell = script
        else:
            self.command = ["sh", str(script)]

    def discard(self) -> None:
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def finish(self, rc: int) -> int:
        """Copy what the guest side wrote to where the user asked; the run dir goes."""
        try:
            if self.kind == "record":
                src = self.run_dir / "capture.csv"
                if not src.exists():
                    print("vftrace lab: no capture was written (see above)", file=sys.stderr)
                    return rc or 1
                out = Path(self.args.record)
                copy_out(src, out)
                copy_out(self.run_dir / "capture.meta.json", out.with_suffix(".meta.json"))
                guests = self.run_dir / "capture.guests.json"
                if guests.exists():
                    copy_out(guests, out.with_suffix(".guests.json"))
                print(f"vftrace lab: wrote {out} (+ .meta.json, .guests.json)", file=sys.stderr)
            elif self.kind == "experiment":
                src = self.run_dir / "experiment"
                if not (src / "comparison.csv").exists():
                    print("vftrace lab: the experiment did not finish (see above)", file=sys.stderr)
                    return rc or 1
                out = Path(self.args.output or Path("build") / "experiment" / self.kernel.release)
                # Into the directory as it is: it is the user's, nothing of theirs is removed.
                shutil.copytree(src, out, dirs_exist_ok=True, copy_function=copy_out)
                print(f"vftrace lab: wrote {out}/comparison.csv, comparison.txt and the "
                      "captures", file=sys.stderr)
            return rc
        finally:
            shutil.rmtree(self.run_dir, ignore_errors=True)


def copy_out(src, dst) -> None:
    """Copy to where the user asked, never writing through a symlink planted there."""
    try:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o666)
    except OSError as e:
        raise LabError(f"cannot write {dst}: {e.strerror}"
                       + (" (a symlink: refusing to write through it)"
                          if Path(dst).is_symlink() else "")) from None
    with open(src, "rb") as f, os.fdopen(fd, "wb") as out:
        shutil.copyfileobj(f, out)
