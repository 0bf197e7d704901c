"""Bad input never gives a traceback: one line ``vftrace CMD: error: ...``, exit status 2.

The end-to-end cases run the real command as a subprocess; every one fails in option or
file checking, before anything needs root, BPF or the lab.  What needs a kernel to go
wrong (a missing --switch symbol, filters naming PFs pf_sched lacks, rmmod failing) runs
in process against a fake kernel.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tracer.cli import main
from tracer.kernel import probes
from tracer.model.schema import COLUMNS
from tracer.pfsched import control
from tracer.record import session as session_mod
from tui.sources import FollowSource, ReplaySource

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
SMALL_LINES = (DATA / "small.csv").read_text().splitlines(keepends=True)
HEADER = SMALL_LINES[0]


# Root writes anywhere through CAP_DAC_OVERRIDE; without it, a mode-0555 directory it owns
# is as read-only for it as for anyone (setpriv is util-linux, in every Debian).
NO_DAC_OVERRIDE = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


def vftrace(cwd: Path, *args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([*prefix, sys.executable, "-m", "tracer.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


def assert_one_line_error(rc: int, out: str, err: str, command: str, says: str) -> None:
    assert rc == 2, (out, err)
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"vftrace {command}: error:"), lines[0]
    assert says in lines[0], lines[0]
    assert "Traceback" not in out + err


def with_field(line: str, column: str, value: str) -> str:
    fields = line.rstrip("\n").split(",")
    fields[COLUMNS.index(column)] = value
    return ",".join(fields) + "\n"


def make_files(d: Path) -> None:
    """Every kind of damaged capture, side by side in ``d``."""
    for name in ("small.csv", "small.meta.json", "small.calls.csv"):
        shutil.copy(DATA / name, d / name)
    rows = SMALL_LINES[1:20]
    files = {
        "empty.csv": "",
        "header_only.csv": HEADER,
        "cut_header.csv": HEADER[:40],
        "wrong_cols.csv": HEADER.replace("switch_ns", "switch_time") + "".join(rows),
        "dup_cols.csv": HEADER.replace("grant_ns", "seq") + "".join(rows),
        "short_row.csv": HEADER + rows[0] + "1,2,3\n" + "".join(rows[1:]),
        "not_a_number.csv": HEADER + rows[0] + with_field(rows[1], "cpu", "x"),
        "float.csv": HEADER + rows[0] + with_field(rows[1], "switch_ns", "12.5"),
        "too_big.csv": HEADER + with_field(rows[0], "revoke_ns", "9" * 20),
        "quoted.csv": HEADER + rows[0] + '"1,2\n' + "".join(rows[1:]),
        "huge_line.csv": HEADER + rows[0] + "7" * (10 << 20) + "\n" + "".join(rows[1:]),
        "stray_cr.csv": HEADER + rows[0].replace(",", "\r,", 1),
    }
    for name, text in files.items():
        (d / name).write_text(text)
    (d / "binary.csv").write_bytes(bytes(range(256)) * 8)
    (d / "image.csv").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
    (d / "nul.csv").write_bytes(HEADER.encode() + b"1,\x00\x00,3\n")
    metas = {
        "bad_json": "{not json",
        "not_object": "[1, 2]",
        "deep": "[" * 100_000 + "]" * 100_000,
        "lost_keys": '{"lost_records_per_cpu": {"cpu0": 1}, "complete": true}',
        "typed": '{"probe_modes": 3}',
        "budget": '{"budget_ns": "fast"}',
    }
    for name, text in metas.items():
        (d / f"{name}.csv").write_text(HEADER + "".join(rows))
        (d / f"{name}.meta.json").write_text(text)
    (d / "binary_meta.csv").write_text(HEADER + "".join(rows))
    (d / "binary_meta.meta.json").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    (d / "victim.txt").write_text("precious\n")
    (d / "link.csv").symlink_to("victim.txt")
    (d / "a_dir").mkdir()
    (d / "a_file").write_text("")
    os.mkfifo(d / "fifo.csv")
    (d / "fifo_meta.csv").write_text(HEADER + "".join(rows))
    os.mkfifo(d / "fifo_meta.meta.json")            # would block a plain open() for good


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bad_input")
    make_files(d)
    return d


CASES = [
    # the parser itself
    ([], "vftrace", "required: COMMAND"),
    (["frobnicate"], "vftrace", "invalid choice: 'frobnicate'"),
    # record (everything below fails before root is asked for)
    (["record", "-o", "o.csv", "-d", "abc"], "record", "invalid number of seconds: 'abc'"),
    (["record", "-o", "o.csv", "-d", "nan"], "record", "finite number of seconds"),
    (["record", "-o", "o.csv", "-d", "inf"], "record", "finite number of seconds"),
    (["record", "-o", "o.csv", "-d", "-1"], "record", "--duration -1.0: must be positive"),
    (["record", "-o", "o.csv", "-b", "0"], "record", "--budget-ns 0: must be positive"),
    (["record", "-o", "o.csv", "-b", "1e3"], "record", "invalid int value: '1e3'"),
    (["record", "-o", "o.csv", "-B", "1000"], "record", "--buffer-pages 1000: give a power of two"),
    (["record", "-o", "o.csv", "--buffer-pages", "4"], "record", "from 8 to 65536"),
    (["live", "--buffer-pages", "131072"], "live", "--buffer-pages 131072: give a power of two"),
    (["record", "-o", "o.csv", "--pf", "x"], "record", "--pf 'x': give integers"),
    (["record", "-o", "o.csv", "--pf", "0,"], "record", "--pf '': give integers"),
    (["record", "-o", "o.csv", "--vf", "-2"], "record", "--vf -2: must not be negative"),
    (["record", "-o", "o.csv", "--pid", str(2**40)], "record", "out of range"),
    (["record", "-o", "o.csv", "--switch", "func:"], "record", "give func:SYMBOL"),
    (["record", "-o", "o.csv", "--switch", "func:a b"], "record", "give func:SYMBOL"),
    (["record", "-o", "o.csv", "--switch", "tp:sched"], "record", "give tp:SYS:BEGIN,SYS:END"),
    (["record", "-o", "o.csv", "--switch", "kprobe:x"], "record",
     "give pf_sched, func:SYMBOL or tp:SYS:BEGIN,SYS:END"),
    (["record", "-o", "o.csv", "-m", "uprobe"], "record", "invalid choice: 'uprobe'"),
    (["record", "-o", "no/such/dir/o.csv"], "record", "directory no/such/dir does not exist"),
    (["record", "-o", "a_file/o.csv"], "record", "directory a_file is not a directory"),
    (["record", "-o", "a_dir"], "record", "is a directory"),
    (["record", "-o", ""], "record", "give a file name"),
    (["record", "-o", "small.meta.json"], "record", "that name is for a capture's metadata"),
    (["record", "-o", "o.csv", "--calls", "o.csv"], "record", "is the capture's file"),
    (["record", "-o", "o.csv", "--calls", "o.meta.json"], "record", "is the capture's file"),
    (["record", "-o", "o.csv", "--calls", "no/dir/c.csv"], "record", "does not exist"),
    (["record", "-o", "o.csv", "stray"], "record", "unexpected argument 'stray'"),
    (["record", "-o", "o.csv", "--"], "record", "-- without a command"),
    # live
    (["live", "--csv", "no/dir/x.csv"], "live", "directory no/dir does not exist"),
    (["live", "--csv", "x.csv", "--calls", "x.csv"], "live", "is the capture's file"),
    (["live", "-d", "0"], "live", "--duration 0.0: must be positive"),
    (["live", "-d", "inf"], "live", "finite number of seconds"),
    (["live", "--pf", "q"], "live", "--pf 'q': give integers"),
    (["live", "--switch", "tp:a:b"], "live", "give tp:SYS:BEGIN,SYS:END"),
    # replay
    (["replay", "missing.csv"], "replay", "no such file"),
    (["replay", "a_dir"], "replay", "is a directory"),
    (["replay", "fifo.csv"], "replay", "not a regular file"),
    (["replay", "--follow", "fifo.csv"], "replay", "not a regular file"),
    (["replay", "empty.csv"], "replay", "not a capture"),
    (["replay", "binary.csv"], "replay", "not a capture"),
    (["replay", "small.meta.json"], "replay", "that is the metadata"),
    (["replay", "wrong_cols.csv"], "replay", "header lacks switch_ns"),
    (["replay", "small.csv", "-x", "fast"], "replay", "--speed fast"),
    (["replay", "small.csv", "-x", "inf"], "replay", "--speed inf"),
    (["replay", "small.csv", "-b", "0"], "replay", "--budget-ns 0"),
    (["replay", "small.csv", "--pf", "z"], "replay", "--pf 'z'"),
    (["replay", "small.csv", "--pf", "7"], "replay", "has no switch on PF 7 (its PFs: 0, 1)"),
    (["replay", "small.csv", "--vf", "9"], "replay", "no switch from or to VF 9"),
    (["replay", "small.csv", "--pf", "1", "--vf", "5"], "replay",
     "VF 5 on PF 1 (its VFs: 0, 1, 2, 3)"),
    (["replay", "small.csv", "--follow", "-x", "2"], "replay", "--speed paces"),
    (["replay", "--follow", "no/dir/c.csv"], "replay", "directory no/dir does not exist"),
    # report
    (["report", "missing.csv"], "report", "no such file"),
    (["report", "fifo.csv"], "report", "not a regular file"),
    (["report", "empty.csv"], "report", "empty file, no header"),
    (["report", "cut_header.csv"], "report", "header line is cut short"),
    (["report", "binary.csv"], "report", "not a capture"),
    (["report", "nul.csv"], "report", "line 2: 3 fields, header has 28"),
    (["report", "quoted.csv"], "report", "line 3: 2 fields, header has 28"),
    (["report", "stray_cr.csv"], "report", "line 2: column seq is not an integer"),
    (["report", "wrong_cols.csv"], "report", "header lacks column(s): switch_ns"),
    (["report", "dup_cols.csv"], "report", "duplicate columns in header: 'seq'"),
    (["report", "short_row.csv"], "report", "line 3: 3 fields, header has 28"),
    (["report", "not_a_number.csv"], "report", "line 3: column cpu is not an integer: 'x'"),
    (["report", "float.csv"], "report", "column switch_ns is not an integer: '12.5'"),
    (["report", "too_big.csv"], "report", "column revoke_ns is not an integer"),
    (["report", "huge_line.csv"], "report", "line 3 is over 64 KiB"),
    (["report", "bad_json.csv"], "report", "bad_json.meta.json is unreadable"),
    (["report", "binary_meta.csv"], "report", "binary_meta.meta.json is unreadable"),
    (["report", "deep.csv"], "report", "deep.meta.json is unreadable"),
    (["report", "not_object.csv"], "report", "is not a JSON object"),
    (["report", "lost_keys.csv"], "report", "lost_records_per_cpu is not a map"),
    (["report", "typed.csv"], "report", "probe_modes is not an object: 3"),
    (["report", "budget.csv"], "report", "budget_ns is not an integer: 'fast'"),
    (["report", "fifo_meta.csv"], "report", "fifo_meta.meta.json is unreadable: not a "
                                            "regular file"),
    (["replay", "fifo_meta.csv", "--pf", "9"], "replay", "has no switch on PF 9"),
    (["report", "small.calls.csv"], "report", "is a per-call file"),
    (["report", "small.csv", "--size", "big"], "report", "WIDTHxHEIGHT"),
    (["report", "small.csv", "-o", "r.txt"], "report", "unknown format '.txt'"),
    (["report", "small.csv", "-o", "no/dir/r.html"], "report", "does not exist"),
    (["report", "small.csv", "-o", "small.csv"], "report", "is an input"),
    (["report", "small.csv", "-o", "link.csv"], "report", "is a symlink"),
    # export
    (["export", "small.csv"], "export", "nothing to export"),
    (["export", "binary.csv", "--perfetto", "t.json"], "export", "not a capture"),
    (["export", "small.csv", "--perfetto", "no/dir/t.json"], "export", "does not exist"),
    (["export", "small.csv", "--perfetto", "t.json", "--parquet", "t.json"], "export",
     "give a different file to each"),
    (["export", "small.csv", "--no-calls", "--calls", "small.calls.csv", "--perfetto", "t.json"],
     "export", "--no-calls leaves the per-call rows out and --calls asks for them"),
    (["export", "small.csv", "--no-calls", "--calls-parquet", "c.parquet"], "export",
     "--no-calls leaves the per-call rows out and --calls-parquet asks for them"),
    (["export", "small.csv", "--calls", "missing.csv", "--perfetto", "t.json"], "export",
     "--calls missing.csv: no such file"),
    (["export", "small.csv", "--calls", "binary.csv", "--perfetto", "t.json"], "export",
     "header lacks column(s): kind"),
    (["export", "small.csv", "--calls", "image.csv", "--perfetto", "t.json"], "export",
     "line 1 is not text (binary data?)"),
    # calibrate --capture reads without root
    (["calibrate", "--capture", "binary.csv"], "calibrate", "header lacks column(s): seq"),
    (["calibrate", "--capture", "image.csv"], "calibrate", "line 1 is not text"),
    (["calibrate", "--capture", "huge_line.csv"], "calibrate", "over 64 KiB"),
    (["calibrate", "--capture", "nul.csv"], "calibrate", "3 fields, header has 28"),
    (["calibrate", "--capture", "lost_keys.csv"], "calibrate", "lost_records_per_cpu"),
    (["calibrate", "--capture", "deep.csv"], "calibrate", "is unreadable"),
    (["calibrate", "--capture", "too_big.csv"], "calibrate", "is not an integer"),
    (["calibrate", "--capture", "fifo_meta.csv"], "calibrate", "not a regular file"),
    # pf-sched: its numbers are checked before insmod
    (["pf-sched", "up", "--nr-vfs", "0"], "pf-sched", "--nr-vfs 0: give 1 to 64"),
    (["pf-sched", "up", "--bar-pages", "999"], "pf-sched", "--bar-pages 999: give 1 to 256"),
    (["pf-sched", "up", "--slice-us", "-5"], "pf-sched", "--slice-us -5: give 0 to"),
    (["pf-sched", "sideways"], "pf-sched", "invalid choice: 'sideways'"),
    (["pf-sched", "down", "--slice-us", "5"], "pf-sched", "`vftrace pf-sched down` takes no "
                                                          "parameters"),
    # lab: numbers that are floats but not durations
    (["lab", "-t", "nan", "--dry-run", "--", "true"], "lab", "finite number of seconds"),
    (["lab", "--boot-timeout", "inf", "--dry-run", "--", "true"], "lab", "finite number"),
]


@pytest.mark.parametrize("args, command, says", CASES,
                         ids=[" ".join(c[0]) or "(none)" for c in CASES])
def test_bad_input_is_one_line_and_exit_2(files, args, command, says):
    r = vftrace(files, *args)
    if command == "vftrace":                     # no subcommand to name
        lines = r.stderr.splitlines()
        assert r.returncode == 2 and len(lines) == 1, r.stderr
        assert lines[0].startswith("vftrace: error:") and says in lines[0], lines[0]
        assert "Traceback" not in r.stdout + r.stderr
    else:
        assert_one_line_error(r.returncode, r.stdout, r.stderr, command, says)
    assert (files / "victim.txt").read_text() == "precious\n"
    assert not (files / "o.csv").exists() and not (files / "x.csv").exists()


@pytest.mark.parametrize("args, command", [
    (["record", "-o", "ro/x.csv"], "record"),
    (["live", "--csv", "ro/x.csv"], "live"),
    (["report", "small.csv", "-o", "ro/r.html"], "report"),
    (["export", "small.csv", "--perfetto", "ro/t.json"], "export"),
])
def test_an_output_in_a_read_only_directory_is_one_line(files, args, command):
    (files / "ro").mkdir(exist_ok=True)
    (files / "ro").chmod(0o555)
    r = vftrace(files, *args, prefix=tuple(NO_DAC_OVERRIDE) if os.geteuid() == 0 else ())
    assert_one_line_error(r.returncode, r.stdout, r.stderr, command,
                          "directory ro is not writable")


def test_a_read_only_directory_is_refused_before_recording(tmp_path, monkeypatch, capsys):
    """The same check as above, under root too: os.access is what decides."""
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == tmp_path
                        and mode == os.W_OK else real_access(p, mode, **kw))
    rc = main(["record", "-o", str(tmp_path / "x.csv")])
    assert_one_line_error(rc, "", capsys.readouterr().err, "record", "is not writable")


# --- what needs a kernel to go wrong, against a fake one ----------------------------------

@pytest.fixture
def fake_root(monkeypatch):
    """Root granted and a kernel offering a few functions and pf_sched's tracepoints;
    nothing can be attached (BCC is never reached: every case fails before)."""
    offer = probes.KernelOffer(functions=frozenset({"iommu_map", "iommu_unmap"}),
                               btf=lambda f: False,
                               tracepoints=frozenset({"pf_sched:vf_switch_begin"}))
    monkeypatch.setattr(session_mod, "require_root", lambda: None)
    monkeypatch.setattr(probes.KernelOffer, "probe", classmethod(lambda cls: offer))

    def no_bcc():
        raise AssertionError("BCC reached: the bad input was not caught")

    monkeypatch.setattr(session_mod, "require_bcc", no_bcc)
    return offer


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_a_switch_function_the_kernel_lacks_is_one_line(fake_root, tmp_path, capsys):
    rc, out, err = run(capsys, "record", "-o", str(tmp_path / "x.csv"),
                       "--switch", "func:no_such_function")
    assert_one_line_error(rc, out, err, "record", "no traceable kernel function "
                          "'no_such_function'")
    rc, out, err = run(capsys, "live", "--switch", "tp:nope:a,nope:b")
    assert_one_line_error(rc, out, err, "live", "no tracepoint nope:a")


@pytest.mark.parametrize("argv, says", [
    (["--pf", "5"], "--pf 5: pf_sched has no PF 5 (it has 0, 1)"),
    (["--pf", "0,7"], "--pf 7: pf_sched has no PF 7"),
    (["--vf", "4"], "--vf 4: pf_sched has VFs 0 to 3 on each PF"),
    (["--pf", "1", "--vf", "2"], "--vf 2: pf_sched has VFs 0 to 1 on the PFs asked for"),
])
def test_filters_naming_what_pf_sched_lacks_are_one_line(fake_root, monkeypatch, tmp_path,
                                                         capsys, argv, says):
    monkeypatch.setattr(control, "layout", lambda: {0: 4, 1: 2})
    rc, out, err = run(capsys, "record", "-o", str(tmp_path / "x.csv"), *argv)
    assert_one_line_error(rc, out, err, "record", says)
    assert not (tmp_path / "x.csv").exists()


def test_pf_sched_layout_from_debugfs_or_from_its_devices(tmp_path, monkeypatch):
    debugfs, misc, params = tmp_path / "debugfs", tmp_path / "misc", tmp_path / "params"
    for d in (debugfs, misc, params):
        d.mkdir()
    monkeypatch.setattr(control, "DEBUGFS", debugfs)
    monkeypatch.setattr(control, "MISC", misc)
    monkeypatch.setattr(control, "MODULE_PARAMS", params)
    assert control.layout() is None                             # not loaded: no check
    (params / "nr_vfs").write_text("3\n")
    (misc / "pf_sched0").mkdir()
    (misc / "pf_sched2").mkdir()
    assert control.layout() == {0: 3, 2: 3}
    for bdf, pf, vfs in (("0000:00:04.0", 0, 4), ("0000:00:05.0", 1, 8)):
        (debugfs / bdf).mkdir()
        (debugfs / bdf / "stats").write_text(f"pf {pf}\nmode iommu\nnr_vfs {vfs}\n")
    assert control.layout() == {0: 4, 1: 8}


def fake_proc(root: Path) -> Path:
    """/proc with a guest holding /dev/pf_sched0 open, one with a BAR mapped (its fd
    closed) and a bystander."""
    def process(pid: int, comm: str, fds: dict[str, str], maps: str) -> None:
        d = root / str(pid)
        (d / "fd").mkdir(parents=True)
        (d / "comm").write_text(comm + "\n")
        (d / "maps").write_text(maps)
        for fd, target in fds.items():
            (d / "fd" / fd).symlink_to(target)

    process(4242, "qemu-system-x86", {"0": "/dev/null", "7": "/dev/pf_sched0"}, "")
    process(5151, "python3", {"1": "/dev/pts/0"},
            "7f00-7f10 rw-s 00000000 00:05 12 /dev/pf_sched1\n")
    process(6000, "bash", {"0": "/dev/pts/0"}, "5600-5700 r-xp 00000000 08:01 3 /usr/bin/bash\n")
    (root / "self").mkdir()
    return root


def test_holders_are_the_processes_with_pf_sched_open_or_mapped(tmp_path):
    assert control.holders(fake_proc(tmp_path)) == [(4242, "qemu-system-x86"),
                                                    (5151, "python3")]


def test_pf_sched_down_when_rmmod_fails_names_who_holds_it(tmp_path, monkeypatch, capsys):
    proc = fake_proc(tmp_path)
    monkeypatch.setattr(control, "edu_devices", lambda: [])
    monkeypatch.setattr(control, "loaded", lambda: True)
    real_holders = control.holders
    monkeypatch.setattr(control, "holders", lambda: real_holders(proc))

    def rmmod(argv, **kw):
        assert argv == ["rmmod", "pf_sched"]
        return subprocess.CompletedProcess(argv, 1, "", "rmmod: ERROR: Module pf_sched is "
                                                        "in use\n")

    monkeypatch.setattr(control.subprocess, "run", rmmod)
    rc, out, err = run(capsys, "pf-sched", "down")
    assert_one_line_error(rc, out, err, "pf-sched", "rmmod pf_sched failed: rmmod: ERROR: "
                          "Module pf_sched is in use; /dev/pf_sched* is held by pid 4242 "
                          "(qemu-system-x86), pid 5151 (python3): stop them and retry")
    monkeypatch.setattr(control, "holders", lambda: [])
    rc, out, err = run(capsys, "pf-sched", "down")
    assert_one_line_error(rc, out, err, "pf-sched", "no process has /dev/pf_sched* open")


def test_pf_sched_up_when_loaded_applies_what_it_can_and_refuses_the_rest(tmp_path,
                                                                          monkeypatch):
    params = tmp_path / "parameters"
    params.mkdir()
    for name, value in (("slice_us", "2000"), ("nr_vfs", "4"), ("bar_pages", "4"),
                        ("unmap_mode", "strict")):
        (params / name).write_text(value + "\n")
    monkeypatch.setattr(control, "MODULE_PARAMS", params)
    monkeypatch.setattr(control, "loaded", lambda: True)
    monkeypatch.setattr(control, "edu_devices", lambda: ["0000:00:04.0"])
    monkeypatch.setattr(control, "current_driver", lambda bdf: "pf_sched")
    assert control.up({"slice_us": 500, "nr_vfs": 4, "bar_pages": None,
                       "unmap_mode": "batched"}) == ["0000:00:04.0"]
    assert (params / "slice_us").read_text() == "500"
    assert (params / "unmap_mode").read_text() == "batched"
    with pytest.raises(control.GuestError, match=r"--nr-vfs 8: pf_sched is loaded with "
                                                 r"nr_vfs 4; run `vftrace pf-sched down`"):
        control.up({"slice_us": None, "nr_vfs": 8, "bar_pages": None, "unmap_mode": None})


def test_an_os_error_from_any_command_is_one_line(monkeypatch, capsys):
    import tracer.kernel.doctor

    def denied(args):
        raise PermissionError(13, "Permission denied", "/sys/kernel/tracing")

    monkeypatch.setattr(tracer.kernel.doctor, "main", denied)
    rc, out, err = run(capsys, "doctor")
    assert_one_line_error(rc, out, err, "doctor",
                          "Permission denied: /sys/kernel/tracing")


# --- damaged captures in the dashboard's sources ------------------------------------------

def test_a_replay_of_a_truncated_capture_shows_what_is_whole(tmp_path):
    path = tmp_path / "cut.csv"
    path.write_text("".join(SMALL_LINES[:11]) + SMALL_LINES[11][:17])
    src = ReplaySource(path, speed=0)
    src.start()
    switches, problems = [], []
    for _ in range(100):
        batch = src.read(0)
        switches += batch.switches
        problems += batch.problems
        if batch.finished:
            break
    assert [r.seq for r in switches] == [int(line.split(",")[0]) for line in SMALL_LINES[1:11]]
    assert "line 12: truncated last line ignored" in problems
    assert batch.status == "end of capture (10 switches)"


def test_a_replay_stops_at_damage_with_what_came_before_it(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("".join(SMALL_LINES[:6]) + "\x00\xff garbage\n" + "".join(SMALL_LINES[6:9]))
    src = ReplaySource(path, speed=0)
    src.start()
    batch = src.read(0)
    assert len(batch.switches) == 5 and batch.finished
    assert any("replay stopped" in p and "line 7" in p for p in batch.problems)


def test_following_a_capture_with_a_corrupt_meta_says_so_and_goes_on(tmp_path):
    path = tmp_path / "cap.csv"
    path.write_text("".join(SMALL_LINES[:4]))
    (tmp_path / "cap.meta.json").write_text(json.dumps({"floor_ns": [1], "complete": True}))
    src = FollowSource(path, poll_s=0, sleep=lambda s: None)
    src.start()
    batch = src.read(0)
    assert len(batch.switches) == 3
    assert any("floor_ns is not an object" in p for p in batch.problems)
    assert src.read(0).problems == []                 # told once, not on every poll


def test_following_a_calls_file_that_is_not_a_file_drops_only_the_calls(tmp_path):
    path = tmp_path / "cap.csv"
    path.write_text("".join(SMALL_LINES[:4]))
    (tmp_path / "cap.meta.json").write_text(json.dumps({"calls_file": "cap.calls.csv"}))
    os.mkfifo(tmp_path / "cap.calls.csv")
    src = FollowSource(path, poll_s=0, sleep=lambda s: None)
    src.start()
    batch = src.read(0)
    assert len(batch.switches) == 3 and batch.calls == []
    assert any("per-call rows stopped" in p and "not a regular file" in p
               for p in batch.problems)
    with open(path, "a") as f:
        f.write(SMALL_LINES[4])
    assert len(src.read(0).switches) == 1
