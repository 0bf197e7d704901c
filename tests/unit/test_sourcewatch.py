"""A PF leaving mid-trace is noticed once, named, and timed."""
from __future__ import annotations

from tracer.pfsched.watch import PfWatch, bound_pfs


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_a_pf_that_goes_away_is_reported_once(tmp_path):
    for bdf in ("0000:00:0a.0", "0000:00:0b.0"):
        (tmp_path / bdf).mkdir()
    (tmp_path / "bind").touch()                        # driver attributes are not PFs
    (tmp_path / "module").mkdir()
    clock = Clock()
    watch = PfWatch(tmp_path, clock)
    assert watch.present == {"0000:00:0a.0", "0000:00:0b.0"}
    clock.t += 2
    assert watch.check() == []
    (tmp_path / "0000:00:0b.0").rmdir()
    clock.t += 0.5
    assert watch.check() == []                        # at most one look per second
    clock.t += 1
    lines = watch.check()
    assert len(lines) == 1 and "0000:00:0b.0" in lines[0] and "after 3.5 s" in lines[0]
    clock.t += 5
    assert watch.check() == []                        # said once


def test_no_driver_directory_means_no_pfs(tmp_path):
    assert bound_pfs(tmp_path / "absent") == set()
