"""doctor inside the lab: it knows where it is and says tracing is possible."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.lab


def test_doctor_in_the_lab_can_trace_with_both_probe_modes():
    r = subprocess.run([sys.executable, "-m", "tracer.cli", "doctor", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads(r.stdout)
    checks = {c["key"]: c for c in data["checks"]}
    assert data["in_lab"] and data["can_trace"]
    for key in ("root", "bpf_syscall", "bcc", "btf", "kernel_headers", "kprobes", "fentry",
                "ringbuf", "tracefs", "iommu", "modules", "tp:kvm:kvm_exit", "tp:iommu:map"):
        assert checks[key]["ok"], checks[key]
    text = subprocess.run([sys.executable, "-m", "tracer.cli", "doctor"],
                          capture_output=True, text=True, timeout=120).stdout
    assert "on lab VM (virtme-ng)" in text and "tracing is possible" in text
