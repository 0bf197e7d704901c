"""``vftrace lab``: the whole stack in a VM with an emulated VT-d IOMMU.

A Debian kernel is booted by virtme-ng under QEMU (q35, ``intel-iommu``, one QEMU
``edu`` PCI device per simulated PF), with this machine's root file system read-only
and the repository shared read-write, so what a guest command writes there is on the
host afterwards.  QEMU runs in its own process group, which is killed on exit, Ctrl-C,
SIGTERM or timeout, so no QEMU outlives the command.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .. import paths
from ..record.procgroup import stop_group
from . import LabError, postmortem
from .kernels import LabKernel, installed_kernels, resolve_kernel
from .presets import Preset

KVM_OK_MARK = "VFTRACE_KVM_BOOTED"
KVM_PROBE_TIMEOUT = 90
STOP_GRACE_S = 5.0
BOOT_TIMEOUT_S = 150      # a TCG boot takes ~20 s; ~60 s on a loaded 2-core machine
BOOT_ATTEMPTS = 3
BOOT_HANG = -1            # run_vm's verdict when the guest never started the command
# virtme-ng hands --exec to the guest base64-encoded on the kernel command line, which
# x86 truncates at 2048 bytes (COMMAND_LINE_SIZE) with its own ~700 bytes of parameters.
MAX_GUEST_CMD = 900


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vftrace"


def tool(name: str) -> str:
    """A tool from this Python's bin dir (the project venv) or PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise LabError(f"{name} not found: run `make setup` (installs virtme-ng and QEMU)")
    return found


def qemu_binary() -> str:
    qemu = shutil.which("qemu-system-x86_64")
    if not qemu:
        raise LabError("qemu-system-x86_64 not found: apt-get install qemu-system-x86 (or `make setup`)")
    return qemu


def qemu_version() -> str:
    out = subprocess.run([qemu_binary(), "--version"], capture_output=True, text=True).stdout
    return out.splitlines()[0] if out else "unknown"


def kvm_usable() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


# What virtme-ng (1.42: virtme/commands/run.py, Arch_x86.qemuargs in
# virtme/architectures.py) puts on QEMU's command line for the machine before our
# --qemu-opts, which come last.  With KVM it names no machine type, so QEMU's default
# (i440fx) would be used, on which intel-iommu cannot be plugged ("expects a dynamic
# sysbus device type for the machine"); the lab names q35 itself on both paths.  QEMU
# merges repeated -machine options (``accel=kvm:tcg`` + ``q35,kernel-irqchip=split``).
VNG_MACHINE = {
    "kvm": ["-machine", "accel=kvm:tcg", "-cpu", "host,topoext=on"],
    "tcg": ["-machine", "q35", "-cpu", "max"],
}
# Interrupt remapping (intremap=on) with KVM needs the split irqchip: with the default
# in-kernel one QEMU refuses intel-iommu ("Interrupt Remapping cannot work with
# kernel-irqchip=on").  Under TCG the option means nothing.
LAB_MACHINE = {"kvm": "q35,kernel-irqchip=split", "tcg": "q35"}
IOMMU_DEVICE = "intel-iommu,intremap=on,caching-mode=on"
QEMU_CHECK_TIMEOUT = 30
_QMP_QUIT = '{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n'


# The guest kernel's log level on the kept console (--kernel-log): warnings and worse
# (soft lockups, hung tasks, RCU stalls, oopses, WARNs), not the boot's chatter, which
# under TCG costs an emulated port write per character.
KERNEL_LOG_LEVEL = 5


def kernel_symbols(share: Path) -> Path:
    """Where the guest leaves this boot's text symbols (in the shared tree, the only place
    it can write to the host); removed when the VM is gone."""
    return share / "build" / ".lab-run" / f"kallsyms-{os.getpid()}"


def qmp_socket() -> Path:
    """Where a lab VM with --kernel-log listens for QMP (postmortem.examine)."""
    return Path(tempfile.gettempdir()) / f"vftrace-lab-{os.getpid()}.qmp"


def lab_qemu_opts(accel: str, pfs: int, kernel_log: Path | None = None) -> list[str]:
    """What the lab adds to vng's QEMU command line: the machine and its devices.

    vng sends the kernel's console (ttyS0) to /dev/null when it runs a command; with
    ``kernel_log`` a virtio console (hvc0, on a virtio-serial device of its own) writes it to that
    file on the host, so a guest that hangs or oopses leaves its last words.  Not a
    second 8250 port: the 8250 driver has one console, bound to the first ttyS named."""
    opts = ["-machine", LAB_MACHINE[accel], "-device", IOMMU_DEVICE] + ["-device", "edu"] * pfs
    if kernel_log is not None:
        opts += ["-chardev", f"file,id=vftrace-klog,path={kernel_log}",
                 "-device", "virtio-serial-pci,id=vftrace-klog-bus",
                 "-device", "virtconsole,bus=vftrace-klog-bus.0,chardev=vftrace-klog",
                 "-qmp", f"unix:{qmp_socket()},server=on,wait=off"]
    if accel == "tcg":
        # One TCG thread for all vCPUs: with multi-threaded TCG, kernel text patched
        # (probes attached, static keys flipped) while a nested KVM guest ran has left
        # stale int3s executing on the other vCPU ("Oops: int3" in __schedule; ~half of
        # the runs with guests).  Serialised vCPUs saw none; the lab gets slower, not wrong.
        opts = ["-accel", "tcg,thread=single", *opts]
    return opts


def vng_argv(kernel: LabKernel, *, pfs: int, cpus: int, memory: str, accel: str,
             share: Path, guest_cmd: str | None, shell: Path | None = None,
             kernel_log: Path | None = None) -> list[str]:
    argv = [tool("vng"), "--run", str(kernel.image), "--disable-microvm",
            "--cpus", str(cpus), "--memory", memory, "--rwdir", str(share),
            "--append", "intel_iommu=on"]
    if kernel_log is not None:
        # After vng's own console=ttyS0 and loglevel=1, so these win.
        # SysRq from the keyboard for every key: a hung guest's dumps (postmortem.py).
        argv += ["--append", "console=hvc0", "--append", f"loglevel={KERNEL_LOG_LEVEL}",
                 "--append", "sysrq_always_enabled"]
    argv.append("--qemu-opts=" + shlex.join(lab_qemu_opts(accel, pfs, kernel_log)))
    if accel == "tcg":
        argv.append("--disable-kvm")
    if guest_cmd is not None:
        argv += ["--exec", guest_cmd]
    elif shell is not None:
        argv += ["--shell", str(shell)]
    return argv


def qemu_model(argv: list[str]) -> list[str]:
    """The QEMU options that make the machine and its devices, from a vng command line:
    what vng adds for the machine (see VNG_MACHINE), then the lab's --qemu-opts."""
    accel = "tcg" if "--disable-kvm" in argv else "kvm"
    opts = next((a.split("=", 1)[1] for a in argv if a.startswith("--qemu-opts=")), "")
    return [*VNG_MACHINE[accel], *shlex.split(opts)]


def for_accel(model: list[str], accel: str) -> list[str]:
    """``model`` as it starts under ``accel`` alone: "tcg" (no KVM needed; ``-cpu host``
    becomes ``max``, irqchip options are ignored) or "kvm" (no silent TCG fallback)."""
    out: list[str] = []
    it = iter(model)
    for opt in it:
        value = next(it, "") if opt in ("-machine", "-M", "-accel", "-cpu") else None
        if opt in ("-machine", "-M"):
            parts = [p for p in value.split(",") if p and not p.startswith("accel=")]
            if accel == "kvm" and len(parts) < len(value.split(",")):
                parts.append("accel=kvm")
            if parts:
                out += ["-machine", ",".join(parts)]
        elif opt == "-accel":
            if accel == "tcg" and value.split(",")[0] == "tcg":
                out += [opt, value]
        elif opt == "-cpu":
            out += [opt, "max" if accel == "tcg" and value.split(",")[0] == "host" else value]
        elif value is None:
            out.append(opt)
        else:
            out += [opt, value]
    if accel == "tcg" and "-accel" not in out:
        out = ["-accel", "tcg", *out]
    return out


def qemu_starts(opts: list[str]) -> str | None:
    """Start QEMU with ``opts`` stopped before the first instruction (-S), with no
    kernel and no default devices, and quit it over QMP.  None when it started and quit
    cleanly, else what QEMU said: the machine, the accelerator and every device have been
    created by then, so a rejected option or device model shows here in ~0.1 s."""
    argv = [qemu_binary(), *opts, "-nodefaults", "-display", "none", "-S", "-qmp", "stdio"]
    try:
        res = subprocess.run(argv, input=_QMP_QUIT, capture_output=True, text=True,
                             timeout=QEMU_CHECK_TIMEOUT)
    except subprocess.TimeoutExpired:
        return f"QEMU did not quit within {QEMU_CHECK_TIMEOUT} s"
    if res.returncode == 0 and "host-qmp-quit" in res.stdout:
        return None
    said = [line.removeprefix(argv[0] + ": ").removeprefix("qemu-system-x86_64: ")
            for line in res.stderr.splitlines() if line.strip() and "warning:" not in line]
    how = (f"killed by {signal.Signals(-res.returncode).name}" if res.returncode < 0
           else f"exit status {res.returncode}")
    return f"{said[0][:300]} ({how})" if said else how


def check_qemu_line(argv: list[str]) -> None:
    """Does QEMU accept the machine and device model of this vng command line?  Checked
    under TCG, so it needs no KVM: a rejection is vftrace's bug, never the host's."""
    accel = "tcg" if "--disable-kvm" in argv else "kvm"
    opts = for_accel(qemu_model(argv), "tcg")
    why = qemu_starts(opts)
    if why:
        raise LabError(f"QEMU rejects the lab's {accel.upper()} machine: {why}. This is a "
                       f"vftrace bug, please report it (nothing was cached"
                       f"{'; use --accel tcg meanwhile' if accel == 'kvm' else ''}; "
                       f"QEMU options: {shlex.join(opts)})")


def kvm_starts(argv: list[str]) -> tuple[bool, str]:
    """Does this host's KVM create the lab's machine (stopped, no kernel)?  If it does not
    but a bare q35 VM starts, the lab's command line is at fault (LabError); if neither
    starts, it is the host's KVM."""
    why = qemu_starts(for_accel(qemu_model(argv), "kvm"))
    if why is None:
        return True, "KVM starts the lab's machine"
    bare = for_accel([*VNG_MACHINE["kvm"], "-machine", "q35"], "kvm")
    bare_why = qemu_starts(bare)
    if bare_why is None:
        raise LabError(f"QEMU with KVM rejects the lab's machine, though a bare q35 KVM VM "
                       f"starts here: {why}. This is a vftrace bug, please report it "
                       f"(nothing was cached; use --accel tcg meanwhile)")
    return False, f"KVM cannot start a q35 VM here: {bare_why}"


def guest_command(cmd: list[str], share: Path, pfs: int, pf_sched: bool = False,
                  started: Path | None = None, symbols: Path | None = None) -> str:
    """The shell line the guest runs: in the shared tree, with the lab's environment.

    It first creates ``started`` (in the shared tree) so the host knows the boot is over,
    and with ``symbols`` copies the kernel's text symbols there: Debian's System.map is a
    placeholder and KASLR moves them each boot, so this boot's are what can name where a
    hung guest's vCPUs were (postmortem.py)."""
    env = {"VFTRACE_LAB": "1", "VFTRACE_LAB_PFS": str(pfs), "PYTHONUNBUFFERED": "1"}
    for passthrough in ("CI", "VFTRACE_BUDGET_NS", "VFTRACE_LAB_PROGRESS", "PYTEST_ADDOPTS", "TERM",
                        "COLUMNS", "LINES"):
        if passthrough in os.environ:
            env[passthrough] = os.environ[passthrough]
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    venv_bin = shlex.quote(str(Path(sys.executable).parent))
    mark = f": > {shlex.quote(str(started))} && " if started else ""
    if symbols is not None:
        mark += f"grep -i ' [tw] ' /proc/kallsyms > {shlex.quote(str(symbols))}; "
    start = "vftrace pf-sched up >&2 && " if pf_sched else ""
    return (f"{mark}cd {shlex.quote(str(share))} && export {exports} PATH={venv_bin}:$PATH "
            f"&& {start}exec {shlex.join(cmd)}")


def _child_env() -> dict[str, str]:
    env = os.environ.copy()
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"
    return env


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the VM's process group, then SIGKILL what is left after a grace period."""
    stop_group(proc, STOP_GRACE_S)


class _Stop(Exception):
    def __init__(self, signum: int):
        self.signum = signum


def run_vm(argv: list[str], timeout: float | None, interactive: bool,
           started: Path | None = None, boot_timeout: float = BOOT_TIMEOUT_S,
           examine=None) -> int:
    """Run vng in its own process group; return the guest's exit status.

    124 on timeout (like coreutils' timeout), 128+N when stopped by signal N, BOOT_HANG
    when ``started`` did not appear within ``boot_timeout`` (the VM is stopped).  Before a
    VM is stopped for its timeout or by SIGTERM (a harness that saw it hang),
    ``examine()`` may ask QEMU what the guest was doing."""
    stdin = None if interactive or not sys.stdin.isatty() else subprocess.DEVNULL
    started_vm: list[subprocess.Popen] = []
    pending: list[int] = []

    def on_signal(signum, _frame):
        if not started_vm:          # before the VM exists: stopped right after it starts
            pending.append(signum)
            return
        raise _Stop(signum)

    # The handlers go in before the VM starts: a stop signal in between would otherwise
    # end this process by default and leave QEMU running in its own process group.
    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        proc = subprocess.Popen(argv, env=_child_env(), stdin=stdin, process_group=0)
    except BaseException:
        for s, h in handlers.items():
            signal.signal(s, h)
        raise
    started_vm.append(proc)
    tty_fd = None
    t0 = time.monotonic()
    deadline = t0 + timeout if timeout else None
    boot_deadline = t0 + boot_timeout if started else None
    try:
        if pending:
            raise _Stop(pending[0])
        if interactive:
            tty_fd = sys.stdin.fileno()
            old_ttou = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
            os.tcsetpgrp(tty_fd, proc.pid)          # the VM's console gets the keyboard
            os.killpg(proc.pid, signal.SIGCONT)     # in case it touched the tty first (SIGTTIN)
        while True:
            now = time.monotonic()
            wake = min(d for d in (deadline, boot_deadline, now + 3600) if d is not None)
            step = wake - now if boot_deadline is None else min(wake - now, 0.5)
            try:
                return proc.wait(timeout=max(0.0, step))
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            if boot_deadline is not None:
                if started.exists():
                    boot_deadline = None
                elif now >= boot_deadline:
                    _stop_group(proc)
                    return BOOT_HANG
            if deadline is not None and now >= deadline:
                print(f"vftrace lab: timed out after {timeout:g} s; stopping the VM", file=sys.stderr)
                if examine:
                    examine()
                _stop_group(proc)
                return 124
    except _Stop as stop:
        print(f"vftrace lab: {signal.Signals(stop.signum).name}; stopping the VM", file=sys.stderr)
        if examine and stop.signum == signal.SIGTERM:
            examine()
        _stop_group(proc)
        return 128 + stop.signum
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        if tty_fd is not None:
            os.tcsetpgrp(tty_fd, os.getpgrp())
            signal.signal(signal.SIGTTOU, old_ttou)
        _stop_group(proc)                       # stragglers of a VM that exited on its own


def _boot_probe(argv: list[str]) -> tuple[bool, str]:
    """Boot the kernel with KVM and run one echo in it."""
    try:
        res = subprocess.run(argv, env=_child_env(), capture_output=True, text=True,
                             timeout=KVM_PROBE_TIMEOUT, stdin=subprocess.DEVNULL,
                             process_group=0)
    except subprocess.TimeoutExpired:
        return False, f"KVM boot did not finish in {KVM_PROBE_TIMEOUT} s"
    if res.returncode == 0 and KVM_OK_MARK in res.stdout:
        return True, "KVM boots a standard kernel"
    tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
    return False, f"KVM boot failed: {tail[:160]}"


def probe_kvm(kernel: LabKernel) -> tuple[bool, str]:
    """Does QEMU with KVM boot the lab here?  Tried once, then cached.

    The command line is checked first (QEMU under TCG, no KVM needed): a rejected one is a
    vftrace bug, raised as LabError and never cached.  Only what this host's KVM does with
    a valid command line (start the machine, then boot a kernel) is cached."""
    if not kvm_usable():
        return False, "no usable /dev/kvm"
    argv = vng_argv(kernel, pfs=1, cpus=1, memory="512M", accel="kvm",
                    share=Path("/tmp"), guest_cmd=f"echo {KVM_OK_MARK}")
    check_qemu_line(argv)
    # The key holds the whole command, so a changed lab command is probed anew.
    key = "|".join((os.uname().release, qemu_version(), shlex.join(argv)))
    cache = cache_dir() / "kvm-probe.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    if isinstance(known.get(digest), dict) and {"ok", "why"} <= known[digest].keys():
        return known[digest]["ok"], known[digest]["why"]
    ok, why = kvm_starts(argv)
    if ok:
        print(f"vftrace lab: probing whether KVM boots {kernel.release} here (once)...",
              file=sys.stderr)
        ok, why = _boot_probe(argv)
    known[digest] = {"ok": ok, "why": why, "key": key}
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(known, indent=1))
    except OSError as e:
        print(f"vftrace lab: warning: cannot cache the KVM probe in {cache}: {e.strerror}",
              file=sys.stderr)
    return ok, why


def choose_accel(requested: str, kernel: LabKernel) -> tuple[str, str]:
    if requested == "tcg":
        return "tcg", "requested"
    if requested == "kvm":
        if not kvm_usable():
            raise LabError("--accel kvm: /dev/kvm is missing or not accessible")
        return "kvm", "requested"
    ok, why = probe_kvm(kernel)
    return ("kvm" if ok else "tcg"), why


def share_dir() -> Path:
    return paths.source_tree() or Path.cwd()


def _lab_command(args, kernel: LabKernel, share: Path, shell: Path | None, cmd: list[str],
                 started: Path | None) -> tuple[str, str, list[str]]:
    """The accelerator, why, and the vng command line; outside a dry run, checked with QEMU."""
    qemu_version()
    if args.dry_run:
        # No probe and no QEMU run: print the path asked for (TCG for auto), even where
        # it would not run.
        accel, why = ("tcg" if args.accel == "auto" else args.accel), "dry run"
        if accel == "kvm" and not kvm_usable():
            print("vftrace lab: warning: /dev/kvm is missing or not accessible here; this "
                  "is the KVM command line, which would not run on this host",
                  file=sys.stderr)
    else:
        accel, why = choose_accel(args.accel, kernel)
    argv = vng_argv(kernel, pfs=args.pfs, cpus=args.cpus, memory=args.memory, accel=accel,
                    share=share, shell=shell, kernel_log=args.kernel_log,
                    guest_cmd=None if started is None else guest_command(
                        cmd, share, args.pfs, args.pf_sched, started,
                        kernel_symbols(share) if args.kernel_log else None))
    if started is not None and len(argv[-1]) > MAX_GUEST_CMD:
        raise LabError(f"the command is {len(argv[-1])} bytes with the lab's set-up, over the "
                       f"{MAX_GUEST_CMD} that fit on the guest kernel's command line; "
                       "put it in a script in the shared tree and run that")
    if not args.dry_run:
        check_qemu_line(argv)
        if accel == "kvm":
            ok, no = kvm_starts(argv)
            if not ok:
                raise LabError(f"--accel {args.accel}: {no} (use --accel tcg)")
    return accel, why, argv


def main(args) -> int:
    if args.pfs < 0 or args.pfs > 16:
        raise LabError(f"--pfs {args.pfs}: give 0 to 16 PFs")
    if args.cpus < 1 or args.cpus > 64:
        raise LabError(f"--cpus {args.cpus}: give 1 to 64")
    if not re.fullmatch(r"\d+[MG]", args.memory):
        raise LabError(f"--memory {args.memory}: give a size like 2G or 1536M")
    if args.pf_sched and args.pfs < 1:
        raise LabError("--pf-sched needs at least one PF (--pfs N)")
    if args.boot_timeout <= 0:
        raise LabError(f"--boot-timeout {args.boot_timeout}: give a positive number of seconds")
    if args.timeout is not None and args.timeout <= 0:
        raise LabError(f"--timeout {args.timeout}: give a positive number of seconds")
    if args.kernel_log is not None:
        args.kernel_log = Path(args.kernel_log).resolve()
        if "," in str(args.kernel_log):
            raise LabError(f"--kernel-log {args.kernel_log}: QEMU cannot take a path with a comma")
        try:
            args.kernel_log.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LabError(f"--kernel-log {args.kernel_log}: {e.strerror}") from None
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    kernel = resolve_kernel(args.kernel, installed_kernels())
    share = share_dir()
    preset = Preset.from_args(args, cmd, share, kernel) if (
        args.mode or args.record or cmd[:1] == ["experiment"]) else None
    shell = (paths.source_tree() or share) / "scripts" / "lab-shell.sh" if args.pf_sched else None
    if preset is not None:
        cmd, shell = preset.command, preset.shell
    interactive = not cmd
    if interactive and not sys.stdin.isatty() and not args.dry_run:
        if preset:
            preset.discard()
        raise LabError("no command given and stdin is not a terminal: pass `-- CMD...`"
                       + (" (or --record FILE for the guests preset)" if preset else ""))
    started = None if interactive else share / "build" / ".lab-run" / f"started-{os.getpid()}"
    try:
        accel, why, argv = _lab_command(args, kernel, share, shell, cmd, started)
    except LabError:
        if preset:
            preset.discard()
        raise
    if args.dry_run:
        print(shlex.join(argv))
        if preset:
            preset.discard()
        return 0
    print(f"vftrace lab: {kernel.release}, {accel.upper()} ({why}), {args.pfs} PF(s), "
          f"{args.cpus} CPUs, {args.memory}; sharing {share}", file=sys.stderr)
    examine = None
    if args.kernel_log is not None:
        def examine():
            for line in postmortem.examine(qmp_socket(), kernel_symbols(share)):
                print(f"vftrace lab: {line}", file=sys.stderr)
            print(f"vftrace lab: the guest kernel's log is in {args.kernel_log}", file=sys.stderr)
    if started is None:
        rc = run_vm(argv, args.timeout, interactive, examine=examine)
        return preset.finish(rc) if preset else rc
    started.parent.mkdir(parents=True, exist_ok=True)
    try:
        for attempt in range(1, BOOT_ATTEMPTS + 1):
            started.unlink(missing_ok=True)
            rc = run_vm(argv, args.timeout, interactive, started, args.boot_timeout, examine)
            if rc != BOOT_HANG:
                return preset.finish(rc) if preset else rc
            print(f"vftrace lab: the guest did not start the command within {args.boot_timeout:g} s "
                  f"(a stuck boot); attempt {attempt} of {BOOT_ATTEMPTS}", file=sys.stderr)
        raise LabError(f"the VM did not boot in {BOOT_ATTEMPTS} attempts of {args.boot_timeout:g} s")
    finally:
        started.unlink(missing_ok=True)
        kernel_symbols(share).unlink(missing_ok=True)
