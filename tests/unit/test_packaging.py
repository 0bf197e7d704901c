"""An installed copy carries its BPF sources and its entry point."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_wheel_ships_bpf_sources_inside_the_tracer_package(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                        str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    wheel = next(tmp_path.glob("vftrace-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("tracer/bpf/vftrace.bpf.c", "tracer/bpf/vftrace.h", "tracer/cli.py", "tui/__init__.py",
              "tracer/kernel/engine.py", "tracer/lab/workloads/guests.py"):
        assert f in names, f
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "vftrace = tracer.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
    # Nothing of the test suite, the module build or the venv leaks into it.
    assert not [n for n in names if n.startswith(("tests/", "build/", "kmod/", ".venv/"))]
