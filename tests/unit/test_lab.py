"""The lab runner: kernel choice, the QEMU command it builds, and clean shutdown."""
from __future__ import annotations

import importlib.util
import inspect
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.need import need
from tracer import cli
from tracer.lab import LabError, kernels, vm


@pytest.fixture
def boot(tmp_path):
    """A fake /boot and /lib/modules with three kernels, one without modules."""
    b, m = tmp_path / "boot", tmp_path / "modules"
    b.mkdir(), m.mkdir()
    for rel in ("6.1.0-50-amd64", "6.1.0-56-amd64", "6.12.95+deb12-amd64", "5.10.0-9-amd64"):
        (b / f"vmlinuz-{rel}").write_bytes(b"\0")
        if rel != "5.10.0-9-amd64":
            (m / rel).mkdir()
    return b, m


def test_installed_kernels_are_ordered_and_need_modules(boot):
    ks = kernels.installed_kernels(*boot)
    assert [k.release for k in ks] == ["6.1.0-50-amd64", "6.1.0-56-amd64", "6.12.95+deb12-amd64"]


@pytest.mark.parametrize("spec, release", [
    (None, "6.12.95+deb12-amd64"),
    ("6.1", "6.1.0-56-amd64"),            # the newest of the series
    ("6.12", "6.12.95+deb12-amd64"),
    ("6.1.0-50-amd64", "6.1.0-50-amd64"),
])
def test_resolve_kernel(boot, spec, release):
    assert kernels.resolve_kernel(spec, kernels.installed_kernels(*boot)).release == release


def test_resolve_kernel_errors_name_what_is_installed(boot):
    with pytest.raises(LabError, match=r"'6\.5'.*installed: 6\.1\.0-50-amd64"):
        kernels.resolve_kernel("6.5", kernels.installed_kernels(*boot))
    with pytest.raises(LabError, match="make setup"):
        kernels.resolve_kernel(None, [])


def test_version_key_orders_6_12_after_6_1():
    assert kernels.version_key("6.12.95+deb12-amd64") > kernels.version_key("6.1.0-56-amd64")
    assert kernels.version_key("6.1.0-56-amd64") > kernels.version_key("5.10.0-9-amd64")


def test_vng_argv_has_iommu_one_edu_per_pf_and_shares_the_tree(tmp_path):
    k = kernels.LabKernel("6.1.0-56-amd64", Path("/boot/vmlinuz-6.1.0-56-amd64"))
    argv = vm.vng_argv(k, pfs=3, cpus=2, memory="2G", accel="tcg", share=tmp_path,
                       guest_cmd="true")
    qemu = next(a for a in argv if a.startswith("--qemu-opts="))
    assert qemu.count("-device edu") == 3
    assert "-device intel-iommu,intremap=on,caching-mode=on" in qemu
    assert "-machine q35 " in qemu                  # named on both paths (vng does not with KVM)
    assert "--disable-kvm" in argv and "--disable-microvm" in argv
    assert "-accel tcg,thread=single" in qemu       # see lab_qemu_opts: stale int3s with MTTCG
    assert argv[argv.index("--rwdir") + 1] == str(tmp_path)
    assert argv[argv.index("--append") + 1] == "intel_iommu=on"
    assert argv[-2:] == ["--exec", "true"]
    kvm = vm.vng_argv(k, pfs=1, cpus=2, memory="2G", accel="kvm", share=tmp_path, guest_cmd=None)
    assert "--disable-kvm" not in kvm and "--exec" not in kvm
    assert "-machine q35,kernel-irqchip=split " in next(a for a in kvm if a.startswith("--qemu-opts="))
    assert "thread=single" not in next(a for a in kvm if a.startswith("--qemu-opts="))


def test_the_tcg_line_with_a_kernel_log_is_accepted_by_qemu(one_kernel, tmp_path):
    """The kept kernel log is a virtio console of its own (the 8250 driver has one console,
    taken by vng's ttyS0), and a QMP socket for the post-mortem; QEMU must take both."""
    need(QEMU is not None, NO_QEMU)
    argv = vm.vng_argv(one_kernel, pfs=1, cpus=2, memory="2G", accel="tcg", share=tmp_path,
                       guest_cmd="true", kernel_log=tmp_path / "k.log")
    appended = [argv[i + 1] for i, a in enumerate(argv) if a == "--append"]
    assert appended[1:] == ["console=hvc0", f"loglevel={vm.KERNEL_LOG_LEVEL}", "sysrq_always_enabled"]
    qemu = next(a for a in argv if a.startswith("--qemu-opts="))
    assert f"path={tmp_path / 'k.log'}" in qemu and "-qmp unix:" in qemu
    vm.check_qemu_line(argv)


def test_the_guest_copies_its_kernel_symbols_into_the_shared_tree(tmp_path):
    syms = vm.kernel_symbols(tmp_path)
    assert tmp_path in syms.parents            # the only place the guest writes to the host
    line = vm.guest_command(["true"], tmp_path, 1, symbols=syms)
    assert f"/proc/kallsyms > {syms}" in line


def test_guest_command_quotes_arguments_and_sets_the_lab_environment(tmp_path):
    line = vm.guest_command(["echo", "a b", "$HOME"], tmp_path, 2)
    out = subprocess.run(["sh", "-c", line.replace("&& exec ", "&& env && exec ", 1)],
                         capture_output=True, text=True).stdout
    assert "VFTRACE_LAB=1" in out and "VFTRACE_LAB_PFS=2" in out
    assert out.rstrip().endswith("a b $HOME")


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


# A shell, not Python: it starts in milliseconds even on a loaded machine, so its child
# (which stands in for QEMU below vng) exists and is printed well before the timeout.
SLEEPER = ["sh", "-c", "sleep 600 & echo $!; wait"]


def test_timeout_kills_the_whole_process_group(capfd):
    t0 = time.monotonic()
    rc = vm.run_vm(SLEEPER, timeout=3, interactive=False)
    assert rc == 124
    assert time.monotonic() - t0 < 15
    out, err = capfd.readouterr()
    assert "timed out after 3 s" in err
    assert out.split(), "the sleeper did not start within the 3 s timeout"
    # Nothing of that group is left (the grandchild, which printed its pid, was in it too).
    # Its pid, not `pgrep sleep`: other processes on the machine may sleep too.
    grandchild = Path(f"/proc/{out.split()[0]}/stat")
    deadline = time.monotonic() + 5
    while grandchild.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not grandchild.exists() or grandchild.read_text().split(")")[-1].split()[0] == "Z"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signal_stops_the_vm_and_leaves_no_process(sig, tmp_path):
    runner = tmp_path / "runner.py"
    runner.write_text(textwrap.dedent(f"""
        import sys
        from tracer.lab import vm
        sys.exit(vm.run_vm({SLEEPER!r}, timeout=None, interactive=False))
    """))
    repo = Path(__file__).resolve().parents[2]      # this tree's tracer, whatever is installed
    proc = subprocess.Popen([sys.executable, str(runner)], stdout=subprocess.PIPE, text=True,
                            cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)})
    grandchild = int(proc.stdout.readline())
    pgid = os.getpgid(grandchild)
    assert pgid != os.getpgrp()
    proc.send_signal(sig)
    assert proc.wait(timeout=20) == 128 + sig
    deadline = time.monotonic() + 5
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not group_alive(pgid), "a process of the VM's group outlived the runner"


def test_boot_watchdog_stops_a_vm_that_never_starts_the_command(tmp_path):
    started = tmp_path / "started"
    t0 = time.monotonic()
    rc = vm.run_vm(SLEEPER, timeout=None, interactive=False, started=started, boot_timeout=1.0)
    assert rc == vm.BOOT_HANG and time.monotonic() - t0 < 15


def test_boot_watchdog_lets_a_started_command_run_to_its_exit_status(tmp_path):
    started = tmp_path / "started"
    argv = ["sh", "-c", f": > {started}; sleep 2; exit 3"]
    assert vm.run_vm(argv, timeout=None, interactive=False, started=started,
                     boot_timeout=1.0) == 3


# The accelerator: QEMU itself checks the machine and device model (no KVM, no boot).

QEMU = shutil.which("qemu-system-x86_64")
NO_QEMU = "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86, or make setup)"
QMP = ('{"execute": "qmp_capabilities"}\n'
       '{"execute": "qom-get", "arguments": {"path": "/machine", "property": "type"}}\n'
       '{"execute": "quit"}\n')


def start_stopped(opts: list[str]) -> subprocess.CompletedProcess:
    """QEMU with ``opts``, stopped before the first instruction, quit over QMP."""
    return subprocess.run([QEMU, *opts, "-nodefaults", "-display", "none", "-S", "-qmp", "stdio"],
                          input=QMP, capture_output=True, text=True, timeout=30)


@pytest.fixture
def one_kernel(tmp_path, monkeypatch):
    """One installed lab kernel, vng and the cache where the test says, no VM."""
    image = tmp_path / "vmlinuz-6.12.95+deb12-amd64"
    image.write_bytes(b"\0")
    kernel = kernels.LabKernel("6.12.95+deb12-amd64", image)
    monkeypatch.setattr(vm, "installed_kernels", lambda *a: [kernel])
    monkeypatch.setattr(vm, "tool", lambda name: f"/opt/venv/bin/{name}")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def no_vm(*a, **k):
        raise AssertionError("the test would have started a VM")
    monkeypatch.setattr(vm, "run_vm", no_vm)
    monkeypatch.setattr(vm, "_boot_probe", no_vm)
    return kernel


def test_dry_run_prints_the_kvm_line_and_qemu_accepts_its_machine(one_kernel, monkeypatch,
                                                                   capsys):
    need(QEMU is not None, NO_QEMU)
    monkeypatch.setattr(vm, "kvm_usable", lambda: False)      # printed even without KVM
    assert cli.main(["lab", "--dry-run", "--accel", "kvm", "--pfs", "2", "--", "true"]) == 0
    out, err = capsys.readouterr()
    assert "warning: /dev/kvm is missing or not accessible" in err and "Traceback" not in err
    argv = shlex.split(out)
    assert "--disable-kvm" not in argv                          # the KVM path
    opts = shlex.split(next(a for a in argv if a.startswith("--qemu-opts=")).split("=", 1)[1])
    assert opts[opts.index("-machine") + 1] == "q35,kernel-irqchip=split"
    # vng puts its machine options before ours; with KVM that is an accelerator and
    # -cpu host, no machine type (test_virtme_adds_no_machine_type_with_kvm).  Started
    # under TCG instead (no KVM here; `host` needs KVM, so `max`), nothing else changed:
    vng_adds = [a.replace("accel=kvm:tcg", "accel=tcg").replace("host,topoext=on", "max")
                for a in vm.VNG_MACHINE["kvm"]]
    res = start_stopped([*vng_adds, *opts])
    assert res.returncode == 0 and "host-qmp-quit" in res.stdout, res.stderr
    assert '"return": "pc-q35-' in res.stdout and opts.count("edu") == 2
    # Without our -machine, QEMU's default machine would be used: the bug of issue #19.
    i = opts.index("-machine")
    res = start_stopped([*vng_adds, *opts[:i], *opts[i + 2:]])
    assert res.returncode != 0 and "dynamic sysbus device" in res.stderr


def test_virtme_adds_no_machine_type_with_kvm():
    """vm.VNG_MACHINE is what virtme-ng adds; with KVM it names no machine type."""
    need(importlib.util.find_spec("virtme") is not None, "virtme-ng is not installed (make setup)")
    from virtme import architectures
    from virtme.commands import run
    x86 = architectures.get("x86_64")
    kvm, tcg = x86.qemuargs(True, True, False), x86.qemuargs(True, False, False)
    assert "-machine" not in kvm and "-M" not in kvm
    assert kvm[kvm.index("-cpu"):kvm.index("-cpu") + 2] == vm.VNG_MACHINE["kvm"][2:]
    assert '"-machine", "accel=kvm:tcg"' in inspect.getsource(run)
    assert vm.VNG_MACHINE["kvm"][:2] == ["-machine", "accel=kvm:tcg"]
    at = tcg.index("-machine")
    assert tcg[at:at + 4] == vm.VNG_MACHINE["tcg"]


def test_the_tcg_line_is_accepted_by_qemu(one_kernel, tmp_path):
    need(QEMU is not None, NO_QEMU)
    vm.check_qemu_line(vm.vng_argv(one_kernel, pfs=2, cpus=2, memory="2G", accel="tcg",
                                   share=tmp_path, guest_cmd="true"))


@pytest.mark.parametrize("name, value, said", [
    ("LAB_MACHINE", {"kvm": "pc,kernel-irqchip=split", "tcg": "pc"}, "dynamic sysbus device"),
    ("IOMMU_DEVICE", "intel-iommu,intremap=maybe", "'intremap' does not accept value 'maybe'"),
    ("IOMMU_DEVICE", "no-such-iommu", "'no-such-iommu' is not a valid device model name"),
])
def test_a_wrong_device_model_is_a_vftrace_bug_and_is_not_cached(one_kernel, monkeypatch,
                                                                  capsys, tmp_path, name,
                                                                  value, said):
    need(QEMU is not None, NO_QEMU)
    monkeypatch.setattr(vm, name, value)
    monkeypatch.setattr(vm, "kvm_usable", lambda: True)

    def no_kvm(*a):
        raise AssertionError("KVM was tried with a command line QEMU rejects")
    monkeypatch.setattr(vm, "kvm_starts", no_kvm)
    with pytest.raises(LabError, match="vftrace bug") as e:
        vm.probe_kvm(one_kernel)
    assert said in str(e.value) and "nothing was cached" in str(e.value)
    assert not (tmp_path / "cache" / "vftrace" / "kvm-probe.json").exists()
    # The command says so in one line, without a traceback, and exits non-zero.
    assert cli.main(["lab", "--", "true"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and said in err and "Traceback" not in err
    assert not (tmp_path / "cache" / "vftrace" / "kvm-probe.json").exists()


@pytest.mark.parametrize("starts, boots, why", [
    ((False, "KVM cannot start a q35 VM here: boom"), None, "KVM cannot start a q35 VM here"),
    ((True, "KVM starts the lab's machine"), (False, "KVM boot failed: oops"), "KVM boot failed"),
])
def test_what_this_hosts_kvm_does_is_cached_under_the_command_line(one_kernel, monkeypatch,
                                                                   tmp_path, starts, boots, why):
    need(QEMU is not None, NO_QEMU)                 # the command line is checked for real
    monkeypatch.setattr(vm, "kvm_usable", lambda: True)
    calls = []
    monkeypatch.setattr(vm, "kvm_starts", lambda argv: calls.append("start") or starts)
    monkeypatch.setattr(vm, "_boot_probe", lambda argv: calls.append("boot") or boots)
    assert vm.probe_kvm(one_kernel) == (False, starts[1] if boots is None else boots[1])
    assert vm.probe_kvm(one_kernel)[1].startswith(why)
    assert calls == (["start"] if boots is None else ["start", "boot"])     # once
    (entry,) = json.loads((tmp_path / "cache" / "vftrace" / "kvm-probe.json").read_text()).values()
    assert entry["ok"] is False and "-machine q35,kernel-irqchip=split" in entry["key"]


def test_kvm_starts_tells_the_hosts_kvm_from_the_command_line(monkeypatch, tmp_path):
    argv = ["vng", "--qemu-opts=-machine q35,kernel-irqchip=split -device intel-iommu -device edu"]
    tried = []

    def qemu(bare_says):
        def starts(opts):
            tried.append(opts)
            return "lab says no" if "edu" in opts else bare_says
        return starts
    monkeypatch.setattr(vm, "qemu_starts", qemu(None))
    with pytest.raises(LabError, match="lab says no.*vftrace bug"):
        vm.kvm_starts(argv)
    # With KVM for real: no silent TCG fallback, vng's CPU model.
    assert tried[0][:4] == ["-machine", "accel=kvm", "-cpu", "host,topoext=on"]
    assert "-accel" not in tried[0] and "-machine" in tried[1] and "edu" not in tried[1]
    monkeypatch.setattr(vm, "qemu_starts", qemu("MSR 0x10a (killed by SIGABRT)"))
    assert vm.kvm_starts(argv) == (False, "KVM cannot start a q35 VM here: MSR 0x10a "
                                          "(killed by SIGABRT)")


def test_for_accel_starts_either_path_under_tcg_alone():
    kvm = vm.qemu_model(["vng", "--qemu-opts=-machine q35,kernel-irqchip=split -device edu"])
    assert vm.for_accel(kvm, "tcg") == ["-accel", "tcg", "-cpu", "max", "-machine",
                                        "q35,kernel-irqchip=split", "-device", "edu"]
    tcg = vm.qemu_model(["vng", "--qemu-opts=-accel tcg,thread=single -machine q35", "--disable-kvm"])
    assert vm.for_accel(tcg, "tcg") == ["-machine", "q35", "-cpu", "max", "-accel",
                                        "tcg,thread=single", "-machine", "q35"]
