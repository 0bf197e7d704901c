"""The lab runner: kernel choice, the QEMU command it builds, and clean shutdown."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tracer import lab


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
    ks = lab.installed_kernels(*boot)
    assert [k.release for k in ks] == ["6.1.0-50-amd64", "6.1.0-56-amd64", "6.12.95+deb12-amd64"]


@pytest.mark.parametrize("spec, release", [
    (None, "6.12.95+deb12-amd64"),
    ("6.1", "6.1.0-56-amd64"),            # the newest of the series
    ("6.12", "6.12.95+deb12-amd64"),
    ("6.1.0-50-amd64", "6.1.0-50-amd64"),
])
def test_resolve_kernel(boot, spec, release):
    assert lab.resolve_kernel(spec, lab.installed_kernels(*boot)).release == release


def test_resolve_kernel_errors_name_what_is_installed(boot):
    with pytest.raises(lab.LabError, match=r"'6\.5'.*installed: 6\.1\.0-50-amd64"):
        lab.resolve_kernel("6.5", lab.installed_kernels(*boot))
    with pytest.raises(lab.LabError, match="make setup"):
        lab.resolve_kernel(None, [])


def test_version_key_orders_6_12_after_6_1():
    assert lab.version_key("6.12.95+deb12-amd64") > lab.version_key("6.1.0-56-amd64")
    assert lab.version_key("6.1.0-56-amd64") > lab.version_key("5.10.0-9-amd64")


def test_vng_argv_has_iommu_one_edu_per_pf_and_shares_the_tree(tmp_path):
    k = lab.LabKernel("6.1.0-56-amd64", Path("/boot/vmlinuz-6.1.0-56-amd64"))
    argv = lab.vng_argv(k, pfs=3, cpus=2, memory="2G", accel="tcg", share=tmp_path,
                        guest_cmd="true")
    qemu = next(a for a in argv if a.startswith("--qemu-opts="))
    assert qemu.count("-device edu") == 3
    assert "-device intel-iommu,intremap=on,caching-mode=on" in qemu
    assert "--disable-kvm" in argv and "--disable-microvm" in argv
    assert "-accel tcg,thread=single" in qemu       # see vng_argv: stale int3s with MTTCG
    assert argv[argv.index("--rwdir") + 1] == str(tmp_path)
    assert argv[argv.index("--append") + 1] == "intel_iommu=on"
    assert argv[-2:] == ["--exec", "true"]
    kvm = lab.vng_argv(k, pfs=1, cpus=2, memory="2G", accel="kvm", share=tmp_path, guest_cmd=None)
    assert "--disable-kvm" not in kvm and "--exec" not in kvm
    assert "kernel-irqchip=split" in next(a for a in kvm if a.startswith("--qemu-opts="))
    assert "thread=single" not in next(a for a in kvm if a.startswith("--qemu-opts="))


def test_guest_command_quotes_arguments_and_sets_the_lab_environment(tmp_path):
    line = lab.guest_command(["echo", "a b", "$HOME"], tmp_path, 2)
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


SLEEPER = [sys.executable, "-c", textwrap.dedent("""
    import subprocess, sys, time
    child = subprocess.Popen(["sleep", "600"])      # stands in for QEMU below vng
    print(child.pid, flush=True)
    time.sleep(600)
""")]


def test_timeout_kills_the_whole_process_group(capsys):
    t0 = time.monotonic()
    rc = lab.run_vm(SLEEPER, timeout=1.5, interactive=False)
    assert rc == 124
    assert time.monotonic() - t0 < 15
    assert "timed out after 1.5 s" in capsys.readouterr().err
    # Nothing of that group is left (the grandchild was in it too).
    out = subprocess.run(["pgrep", "-f", "sleep 600"], capture_output=True, text=True).stdout
    assert not [p for p in out.split() if p and os.getpgid(int(p)) != os.getpgrp()]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signal_stops_the_vm_and_leaves_no_process(sig, tmp_path):
    runner = tmp_path / "runner.py"
    runner.write_text(textwrap.dedent(f"""
        import sys
        from tracer import lab
        sys.exit(lab.run_vm({SLEEPER!r}, timeout=None, interactive=False))
    """))
    proc = subprocess.Popen([sys.executable, str(runner)], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])
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
    rc = lab.run_vm(SLEEPER, timeout=None, interactive=False, started=started, boot_timeout=1.0)
    assert rc == lab.BOOT_HANG and time.monotonic() - t0 < 15


def test_boot_watchdog_lets_a_started_command_run_to_its_exit_status(tmp_path):
    started = tmp_path / "started"
    argv = ["sh", "-c", f": > {started}; sleep 2; exit 3"]
    assert lab.run_vm(argv, timeout=None, interactive=False, started=started,
                      boot_timeout=1.0) == 3
