"""The dashboard's sources without Textual: replay pacing, following a growing capture."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tracer.capture.files import CaptureWriter, iter_calls, read_capture
from tracer.errors import VftraceError
from tracer.model.schema import COLUMNS, SwitchRecord
from tui.sources import Batch, FollowSource, ReplaySource, check_capture

DATA = Path(__file__).resolve().parents[1] / "data"
SMALL = DATA / "small.csv"


def drain(source, limit: int = 10_000) -> Batch:
    total = Batch()
    for _ in range(limit):
        b = source.read(0.0)
        total.merge(b)
        if b.finished:
            return total
    raise AssertionError("source never finished")


def rec(seq: int, t_ns: int = 0, pf: int = 0) -> SwitchRecord:
    values = dict.fromkeys(COLUMNS, 0)
    values.update(seq=seq, t_ns=t_ns or seq * 1_000_000, pf=pf, from_vf=0, to_vf=1,
                  switch_ns=1000 + seq)
    return SwitchRecord(**values)


def test_replay_at_max_speed_gives_every_record_and_call():
    meta, rows, _ = read_capture(SMALL)
    src = ReplaySource(SMALL, 0)
    header = src.start()
    assert header.switch_source == meta["switch_source"] and header.has_calls
    assert header.budget_ns == meta["budget_ns"] and header.kvm_vendor == meta["kvm_vendor"]
    got = drain(src)
    assert got.switches == rows
    assert len(got.calls) == len(list(iter_calls(DATA / meta["calls_file"])))
    assert got.lost_per_cpu == {} and got.guest_totals == meta["background"]
    assert got.status.startswith("end of capture") and not got.problems


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_replay_is_paced_by_t_ns_scaled_by_speed(tmp_path):
    path = tmp_path / "paced.csv"
    with CaptureWriter(path, {}) as w:                # records 1 s apart in trace time
        w.write_many([rec(i, t_ns=i * 1_000_000_000) for i in range(1, 6)])
    clock = FakeClock()
    src = ReplaySource(path, 2.0, clock=clock, sleep=clock.sleep)
    src.start()
    released = []                                     # (fake time, seq)
    while not (b := src.read(0.1)).finished or b.switches:
        released += [(round(clock.now - 100.0, 3), r.seq) for r in b.switches]
        if b.finished:
            break
    # At 2x, records 1 s apart in the capture arrive 0.5 s apart.
    assert [seq for _, seq in released] == [1, 2, 3, 4, 5]
    assert [t for t, _ in released] == [0.0, 0.5, 1.0, 1.5, 2.0]


def test_a_bad_line_in_a_replayed_capture_ends_it_with_a_problem(tmp_path):
    path = tmp_path / "bad.csv"
    shutil.copy(SMALL, path)
    with open(path, "a") as f:
        f.write("1,2,three\n")
    got = drain(ReplaySource(path, 0))
    assert len(got.switches) == len(read_capture(SMALL)[1])
    assert any("replay stopped" in p for p in got.problems)


@pytest.mark.parametrize("make, says", [
    (lambda d: d / "missing.csv", "no such file"),
    (lambda d: d, "is a directory"),
    (lambda d: shutil.copy(DATA / "small.meta.json", d / "x.meta.json") and d / "x.meta.json",
     "that is the metadata"),
    (lambda d: (d / "x.csv").write_text("a,b\n1,2\n") and d / "x.csv", "not a capture"),
    (lambda d: (d / "x.csv").write_bytes(b"\xff\xfe\x00garbage") and d / "x.csv",
     "not a capture"),
])
def test_what_is_not_a_capture_is_a_one_line_error(tmp_path, make, says):
    with pytest.raises(VftraceError) as err:
        check_capture(Path(make(tmp_path)))
    assert says in str(err.value) and "\n" not in str(err.value)


# --- follow ---------------------------------------------------------------------------

HEADER = ",".join(COLUMNS) + "\n"


def line(r: SwitchRecord) -> str:
    return ",".join(map(str, r.as_row())) + "\n"


def test_follow_waits_holds_half_lines_counts_garbage_and_notices_the_end(tmp_path):
    path = tmp_path / "growing.csv"
    src = FollowSource(path, poll_s=0)
    src.start()
    assert src.read(0).status == "waiting for growing.csv to appear"
    path.write_text(HEADER + line(rec(1)) + line(rec(2)))
    b = src.read(0)
    assert [r.seq for r in b.switches] == [1, 2]
    half = line(rec(3))
    with open(path, "a") as f:
        f.write(half[:7])                             # a writer mid-line
    assert src.read(0).switches == []
    with open(path, "a") as f:
        f.write(half[7:] + "this,is,garbage\n" + line(rec(4)))
    b = src.read(0)
    assert [r.seq for r in b.switches] == [3, 4] and b.bad_lines == 1
    assert "line 5: malformed" in b.problems[0]
    # The recorder finishes: its meta turns complete with the losses.
    meta = {"complete": True, "stop_reason": "SIGINT", "lost_records_per_cpu": {"1": 7},
            "switch_source": "pf_sched"}
    (tmp_path / "growing.meta.json").write_text(json.dumps(meta))
    b = src.read(0)
    assert b.status == "recorder finished (SIGINT)" and b.lost_per_cpu == {1: 7}
    assert b.header is not None and b.header.switch_source == "pf_sched"


def test_follow_starts_over_when_the_capture_is_replaced_or_truncated(tmp_path):
    path = tmp_path / "cap.csv"
    path.write_text(HEADER + line(rec(1)) + line(rec(2)))
    src = FollowSource(path, poll_s=0)
    assert len(src.read(0).switches) == 2
    replacement = tmp_path / "new.csv"
    replacement.write_text(HEADER + line(rec(10)))
    replacement.replace(path)                          # a new recording, same name
    b = src.read(0)
    assert b.restart and [r.seq for r in b.switches] == [10]
    path.write_text(HEADER)                            # truncated in place
    b = src.read(0)
    assert b.restart and b.switches == []


def test_follow_reads_the_calls_file_the_meta_names(tmp_path):
    path = tmp_path / "small.csv"
    for name in ("small.csv", "small.meta.json", "small.calls.csv"):
        shutil.copy(DATA / name, tmp_path / name)
    src = FollowSource(path, poll_s=0)
    got = Batch()
    for _ in range(20):
        got.merge(src.read(0))
    assert len(got.switches) == len(read_capture(SMALL)[1])
    assert len(got.calls) == len(list(iter_calls(DATA / "small.calls.csv")))
    assert got.status.startswith("recorder finished")


def test_batches_coalesce_and_a_restart_drops_what_came_before():
    a = Batch(switches=[rec(1)], lost_per_cpu={0: 1}, bad_lines=1, problems=["x"])
    a.merge(Batch(switches=[rec(2)], lost_per_cpu={0: 3}, status="s"))
    assert [r.seq for r in a.switches] == [1, 2] and a.lost_per_cpu == {0: 3}
    assert a.bad_lines == 1 and a.status == "s"
    a.merge(Batch(switches=[rec(9)], restart=True))
    assert [r.seq for r in a.switches] == [9] and a.restart and a.bad_lines == 0
