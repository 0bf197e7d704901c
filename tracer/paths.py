"""Where vftrace's own files are, in a source tree and in an installed copy."""
from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def bpf_dir() -> Path:
    """The BPF C sources: inside the package when installed, ``bpf/`` in a source tree."""
    for candidate in (PACKAGE / "bpf", PACKAGE.parent / "bpf"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("vftrace's BPF sources are missing (expected tracer/bpf or bpf/)")


def source_tree() -> Path | None:
    """The repository this copy runs from, or None for an installed copy."""
    root = PACKAGE.parent
    return root if (root / "pyproject.toml").is_file() and (root / "kmod").is_dir() else None
