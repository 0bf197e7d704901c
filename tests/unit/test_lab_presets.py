"""The lab's guests presets and the experiment's comparison (no VM needed)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tracer import cli
from tracer.lab import LabError, experiment, kernels, presets
from tracer.lab.workloads import guests

KERNEL = kernels.LabKernel("6.12.95+deb12-amd64", Path("/boot/vmlinuz-6.12.95+deb12-amd64"))


def lab_args(*argv: str):
    return cli.build_parser().parse_args(["lab", *argv])


@pytest.fixture
def share(tmp_path):
    return tmp_path


def preset(share, *argv: str, cmd=()):
    args = lab_args(*argv)
    return presets.Preset.from_args(args, list(cmd), share, KERNEL)


def test_live_preset_runs_pf_sched_then_the_dashboard_with_the_guests(share):
    p = preset(share, "--mode", "trap", "--vms", "3", "--vcpus", "2", "--vfs", "2",
               "--pfs", "2", "--slice-us", "500", "--unmap-mode", "batched")
    script = p.shell.read_text()
    up = script.index("vftrace pf-sched up --slice-us 500 --nr-vfs 2 --unmap-mode batched")
    live = script.index("exec vftrace live -- nice -n 10 python -m tracer.lab.workloads.guests --mode trap "
                        "--vms 3 --vcpus 2")
    assert up < live and p.command == []
    p.discard()
    assert not p.run_dir.exists()


def test_record_and_experiment_presets_run_a_script_and_copy_results_back(share, tmp_path):
    out = tmp_path / "out" / "trap.csv"
    out.parent.mkdir()
    p = preset(share, "--mode", "trap", "--record", str(out), "-d", "7")
    assert p.command[0] == "sh" and "tracer.lab.experiment run --mode trap" in Path(p.command[1]).read_text()
    for name in ("capture.csv", "capture.meta.json", "capture.guests.json"):
        (p.run_dir / name).write_text(name)
    assert p.finish(0) == 0
    assert out.read_text() == "capture.csv"
    assert out.with_suffix(".meta.json").read_text() == "capture.meta.json"
    assert not p.run_dir.exists()

    e = preset(share, "-d", "3", "-o", str(tmp_path / "exp"), cmd=["experiment"])
    assert "tracer.lab.experiment compare" in Path(e.command[1]).read_text()
    assert e.finish(0) == 1                         # nothing was written: a failure
    e = preset(share, "-o", str(tmp_path / "exp"), cmd=["experiment"])
    (e.run_dir / "experiment").mkdir()
    (e.run_dir / "experiment" / "comparison.csv").write_text("x")
    assert e.finish(0) == 0 and (tmp_path / "exp" / "comparison.csv").read_text() == "x"


@pytest.mark.parametrize("argv, cmd, message", [
    (["--record", "x.csv"], [], "--record needs --mode"),
    (["--mode", "mmap", "--vms", "0"], [], "--vms 0: give 1 to 64"),
    (["--mode", "mmap", "--vms", "5"], [], "one VF per guest"),
    (["--mode", "mmap", "-d", "0"], [], "--duration 0"),
    (["--mode", "mmap", "--record", "/no/such/dir/x.csv"], [], "does not exist"),
    (["--mode", "mmap"], ["true"], "give no command"),
    ([], ["experiment", "-d", "3"], "options before it"),
])
def test_preset_bad_input_is_one_clear_line(share, argv, cmd, message):
    with pytest.raises(LabError, match=message):
        preset(share, *argv, cmd=cmd)


def test_vms_go_one_per_vf_across_pfs_first():
    assert guests.placement(3, 2, 4) == [(0, 0), (1, 0), (0, 1)]
    with pytest.raises(guests.GuestError, match="need 5 VFs"):
        guests.placement(5, 1, 4)


def test_guest_code_is_a_closed_loop_of_two_bar_accesses():
    code = guests.bar_loop_code()
    assert code[:2] == bytes([0x8B, 0x04]) and code[3:5] == bytes([0x89, 0x04])
    assert code[-2] == 0xEB and code[-1] == (-len(code)) & 0xFF    # jmp back to the start


def rows(**over):
    base = {"mode": "mmap", "unmap_mode": "strict", "switches": 10, "lost": 0,
            "switch_p50_ns": 1000, "switch_p90_ns": 2000, "switch_p99_ns": 3000,
            "revoke_mean_ns": 750, "grant_mean_ns": 250, "unmap_mean_ns": 500,
            "mmu_zap_mean_ns": 200, "map_mean_ns": 100, "exits_per_switch": 2.0,
            "kicks_per_switch": 1.0, "blocked_per_switch": 0.5,
            "blocked_ns_per_switch": 4000, "guest_accesses_per_s": 1000,
            "guest_efault_retries": 0, "capture": "x.csv"}
    return {**base, **over}


def test_comparison_says_what_the_ratios_are_and_that_the_lab_is_emulated():
    table = [rows(), rows(unmap_mode="batched", switch_p50_ns=500),
             rows(mode="trap", guest_accesses_per_s=10, exits_per_switch=0.5)]
    text = experiment.comparison_table(table) + experiment.conclusion(table)
    assert "mmap vs trap: 100.00x" in text
    assert "strict vs batched unmaps: 2.00x" in text
    assert "revoke is 75% of a switch" in text
    assert "emulat" in text
    assert len(experiment.comparison_table(table).splitlines()) == 4
