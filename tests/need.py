"""Skip with the exact reason outside CI; fail under CI, where every test must run."""
from __future__ import annotations

import os

import pytest


def need(ok: bool, missing: str) -> None:
    if ok:
        return
    if os.environ.get("CI"):
        pytest.fail(f"cannot run in CI: {missing}")
    pytest.skip(missing)
