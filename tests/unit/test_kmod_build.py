"""Host test: kmod/ (pf_sched.ko) builds with W=1 and no warnings for every kernel
whose headers are installed (/lib/modules/<release>/build), and the module that comes
out is one the tracer can use on that kernel: its vermagic names the release it was
built for, and it carries the parameters and tracepoints the source declares and vftrace
relies on.  The same checks run on build/kmod/<release>/pf_sched.ko, the module the lab
loads (scripts/build-kmod.sh)."""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.need import need
from tracer.pfsched.control import PARAMS as CONTROL_PARAMS

REPO = Path(__file__).resolve().parents[2]
KMOD = REPO / "kmod"
BUILT = REPO / "build" / "kmod"
NO_HEADERS = "no kernel headers under /lib/modules/*/build: run make setup"
# What the BPF program attaches to (bpf/vftrace.bpf.c: raw and classic tracepoints).
TRACER_TRACEPOINTS = {"vf_switch_begin", "vf_switch_end", "vf_access_wait"}


def kernel_build_dirs() -> list[Path]:
    return sorted(Path(d) for d in glob.glob("/lib/modules/*/build")
                  if (Path(d) / "Makefile").is_file())


def declared_params() -> set[str]:
    """Parameter names as kmod/*.c declares them (module_param, _named, _cb)."""
    pattern = re.compile(r"^\s*module_param(?:_named|_cb|_array)?\(\s*(\w+)\s*,", re.M)
    return {m.group(1) for f in KMOD.glob("*.c") for m in pattern.finditer(f.read_text())}


def declared_tracepoints() -> set[str]:
    pattern = re.compile(r"^\s*(?:TRACE_EVENT|DEFINE_EVENT)\(\s*(?:\w+\s*,\s*)?(\w+)\s*,", re.M)
    names = set()
    for f in KMOD.glob("*.h"):
        for m in pattern.finditer(f.read_text()):
            names.add(m.group(1))
    return names


def tool(name: str) -> str:
    path = shutil.which(name) or next((p for p in (f"/sbin/{name}", f"/usr/sbin/{name}")
                                       if os.path.exists(p)), None)
    need(path is not None, f"{name} is not installed (apt-get install "
                           f"{'kmod' if name == 'modinfo' else 'binutils'})")
    return path


def modinfo(ko: Path, field: str) -> list[str]:
    r = subprocess.run([tool("modinfo"), "-F", field, str(ko)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def check_module(ko: Path, release: str) -> None:
    """``ko`` is a pf_sched built for ``release`` that vftrace can load and trace."""
    vermagic = modinfo(ko, "vermagic")
    assert len(vermagic) == 1 and vermagic[0].split()[0] == release, \
        f"{ko}: vermagic {vermagic!r}, built for {release}"
    assert modinfo(ko, "name") == ["pf_sched"]
    # GPL: tracepoints and the IOMMU API are EXPORT_SYMBOL_GPL
    assert modinfo(ko, "license") == ["GPL"]
    params = {line.split(":", 1)[0] for line in modinfo(ko, "parm")}
    assert params == declared_params(), f"{ko}: parameters {sorted(params)}"
    assert set(CONTROL_PARAMS) <= params, "vftrace pf-sched sets a parameter the module lacks"

    r = subprocess.run([tool("nm"), str(ko)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    symbols = {parts[-1] for parts in map(str.split, r.stdout.splitlines()) if parts}
    tracepoints = declared_tracepoints()
    assert TRACER_TRACEPOINTS <= tracepoints
    for tp in tracepoints:
        # the tracepoint itself, its raw-tracepoint map (BPF raw_tp) and its trace event
        # (tracefs events/pf_sched/<tp>, which BCC's TRACEPOINT_PROBE and doctor use)
        for sym in (f"__tracepoint_{tp}", f"__bpf_trace_tp_map_{tp}", f"__event_{tp}"):
            assert sym in symbols, f"{ko}: no {sym}"


def test_sources_declare_what_the_checks_look_for():
    """The parsers above find what is there (a regex that matched nothing would make
    check_module's comparisons vacuous)."""
    assert declared_params() >= set(CONTROL_PARAMS) | {"enabled"}
    assert declared_tracepoints() >= TRACER_TRACEPOINTS
    # exactly one file instantiates the tracepoints
    creators = [p.name for p in KMOD.glob("*.c") if "#define CREATE_TRACE_POINTS" in p.read_text()]
    assert len(creators) == 1, creators


@pytest.mark.parametrize("kdir", kernel_build_dirs() or [None],
                         ids=lambda d: d.parent.name if d else "none")
def test_kmod_builds_without_warnings(kdir, tmp_path):
    if kdir is None:
        need(False, NO_HEADERS)
    if shutil.which("make") is None:
        need(False, "make is not installed (apt-get install make)")
    out = tmp_path / "kmod"
    out.mkdir()
    for pattern in ("Kbuild", "Makefile", "*.c", "*.h"):
        for f in KMOD.glob(pattern):
            shutil.copy2(f, out / f.name)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS")}
    r = subprocess.run(["make", "-C", str(out), f"KDIR={kdir}", "W=1"], env=env,
                       capture_output=True, text=True, timeout=600)
    log = r.stdout + r.stderr
    assert r.returncode == 0, f"build failed for {kdir}:\n{log[-4000:]}"
    warnings = [ln for ln in log.splitlines() if "warning:" in ln]
    assert not warnings, "W=1 warnings:\n" + "\n".join(warnings)
    check_module(out / "pf_sched.ko", kdir.parent.name)


@pytest.mark.parametrize("kdir", kernel_build_dirs() or [None],
                         ids=lambda d: d.parent.name if d else "none")
def test_the_labs_module_matches_its_kernel_and_the_sources(kdir):
    """build/kmod/<release>/pf_sched.ko, what the lab insmods on <release>."""
    if kdir is None:
        need(False, NO_HEADERS)
    release = kdir.parent.name
    ko = BUILT / release / "pf_sched.ko"
    need(ko.is_file(), f"{ko.relative_to(REPO)} is not built: run sh scripts/build-kmod.sh")
    check_module(ko, release)
