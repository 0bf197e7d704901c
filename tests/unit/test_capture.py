"""Capture files: round trips, crash tolerance, strict headers, symlink refusal."""
from __future__ import annotations

import csv
import json
import os
import stat
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracer.model.correction import CORRECTED_COLUMNS
from tracer.capture.files import (CallWriter, CaptureError, CaptureWriter, iter_calls,
                            iter_capture, meta_path, read_capture, read_meta)
from tracer.model.schema import CALL_COLUMNS, COLUMNS, CallRecord, SwitchRecord

META = {"switch_source": "pf_sched", "probe_modes": {"iommu_map": "fentry"},
        "floor_ns": {"iommu_map": 40}, "budget_ns": 100_000, "filters": {"pfs": [0]}}


def rec(i: int) -> SwitchRecord:
    return SwitchRecord(*[i * 31 + k for k in range(len(COLUMNS))])


def write(path, recs, **close):
    w = CaptureWriter(path, META)
    w.write_many(recs)
    w.close(**close)


def test_meta_path_naming(tmp_path):
    assert meta_path(tmp_path / "x.csv") == tmp_path / "x.meta.json"
    assert meta_path(tmp_path / "run") == tmp_path / "run.meta.json"


def test_round_trip_with_meta(tmp_path):
    path = tmp_path / "capture.csv"
    recs = [rec(i) for i in range(1000)]
    recs[3].from_vf = -1
    write(path, recs, stop_reason="SIGINT", lost={0: 2, 3: 5})
    meta, back, problems = read_capture(path)
    assert back == recs and problems == []
    assert meta["complete"] is True and meta["records"] == 1000
    assert meta["stop_reason"] == "SIGINT"
    assert meta["lost_records_per_cpu"] == {0: 2, 3: 5} and meta["lost_total"] == 7
    for key in ("tool", "version", "kernel", "host", "start_time", "stop_time",
                "switch_source", "probe_modes", "floor_ns", "budget_ns", "filters"):
        assert key in meta, key
    assert meta["columns"] == [*COLUMNS, *CORRECTED_COLUMNS]
    assert meta["probe_modes"] == {"iommu_map": "fentry"} and meta["budget_ns"] == 100_000
    assert meta["start_time"].endswith("Z") and "T" in meta["start_time"]


def test_meta_written_at_start_incomplete(tmp_path):
    path = tmp_path / "c.csv"
    w = CaptureWriter(path, META)
    try:
        started = json.loads(meta_path(path).read_text())
        assert started["complete"] is False and started["columns"] == [*COLUMNS,
                                                                        *CORRECTED_COLUMNS]
        _, _, problems = read_capture(path)
        assert any("not complete" in p for p in problems)
    finally:
        w.close()
    assert json.loads(meta_path(path).read_text())["complete"] is True
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_csv_module_parses_plain_integers(tmp_path):
    path = tmp_path / "c.csv"
    write(path, [rec(i) for i in range(5)])
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == (*COLUMNS, *CORRECTED_COLUMNS)
    assert len(rows) == 6
    n = len(COLUMNS)
    assert all(field.lstrip("-").isdigit() for row in rows[1:] for field in row[:n])
    assert all(field == "" for row in rows[1:] for field in row[n:])   # no probe costs
    assert [int(x) for x in rows[1][:n]] == list(rec(0).as_row())
    assert path.read_bytes().endswith(b"\n")


def test_corrected_columns_follow_the_record_columns_when_costs_are_known(tmp_path):
    from tracer.model.correction import Correction
    meta = {"switch_source": "pf_sched", "probe_modes": {"iommu_map": "fentry"},
            "floor_ns": {"fentry": {"median_ns": 50, "p10_ns": 40, "p90_ns": 60}},
            "probe_costs": {"types": ["fentry"],
                            "fentry": {"median_ns": 900, "p10_ns": 800, "p90_ns": 1200}}}
    recs = [rec(i) for i in range(50)]
    for i, r in enumerate(recs):
        r.fentry_hits, r.source_ns = i % 4, 10_000 + i
    path = tmp_path / "c.csv"
    with CaptureWriter(path, meta) as w:
        w.write_many(recs[:25])
        for r in recs[25:]:
            w.write(r)
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    n = len(COLUMNS)
    c = Correction.from_meta(meta)
    assert [tuple(int(x) for x in row[n:]) for row in rows[1:]] == [c.values(r) for r in recs]
    assert [int(row[n]) for row in rows[1:5]] == [10_000, 10_001 - 900, 10_002 - 1800,
                                                   10_003 - 2700]
    assert list(iter_capture(path)) == recs         # readers take the record columns


def test_follower_sees_whole_rows_within_flush_interval(tmp_path):
    path = tmp_path / "c.csv"
    w = CaptureWriter(path, META)
    try:
        w.write(rec(1))
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            data = path.read_bytes()
            if data.count(b"\n") == 2:
                break
            time.sleep(0.05)
        assert data.count(b"\n") == 2 and data.endswith(b"\n")
        assert list(iter_capture(path)) == [rec(1)]
    finally:
        w.close()


def test_truncated_last_line_is_ignored_and_reported(tmp_path):
    path = tmp_path / "c.csv"
    write(path, [rec(i) for i in range(3)])
    with open(path, "a") as f:
        f.write("99,100,1,")               # a crash mid-row
    meta, back, problems = read_capture(path)
    assert back == [rec(i) for i in range(3)]
    assert any("truncated last line" in p and "line 5" in p for p in problems)
    assert any("records" in p for p in problems) is False   # meta count still matches


def test_header_cut_short_is_an_error(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("seq,t_ns,p")
    with pytest.raises(CaptureError, match="header"):
        list(iter_capture(path))


def test_missing_columns_named(tmp_path):
    path = tmp_path / "c.csv"
    cols = [c for c in COLUMNS if c not in ("grant_ns", "cpu")]
    path.write_text(",".join(cols) + "\n" + ",".join("1" * len(cols)) + "\n")
    with pytest.raises(CaptureError) as e:
        list(iter_capture(path))
    assert "cpu" in str(e.value) and "grant_ns" in str(e.value)
    assert "\n" not in str(e.value)


def test_non_numeric_field_names_line_and_column(tmp_path):
    path = tmp_path / "c.csv"
    write(path, [rec(i) for i in range(3)])
    lines = path.read_text().splitlines(keepends=True)
    fields = lines[2].rstrip("\n").split(",")
    fields[COLUMNS.index("revoke_ns")] = "12.5"
    lines[2] = ",".join(fields) + "\n"
    path.write_text("".join(lines))
    with pytest.raises(CaptureError, match=r"line 3: column revoke_ns is not an integer: '12.5'"):
        read_capture(path)


def test_wrong_field_count_is_an_error(tmp_path):
    path = tmp_path / "c.csv"
    write(path, [rec(0)])
    with open(path, "a") as f:
        f.write("1,2,3\n")
    with pytest.raises(CaptureError, match="line 3: 3 fields"):
        read_capture(path)


def test_extra_columns_and_other_order_are_accepted(tmp_path):
    path = tmp_path / "c.csv"
    header = ["future_col", *reversed(COLUMNS)]
    row = ["7", *map(str, reversed(rec(4).as_row()))]
    path.write_text(",".join(header) + "\n" + ",".join(row) + "\n")
    _, back, problems = read_capture(path, require_meta=False)
    assert back == [rec(4)]
    assert problems == ["no meta file (c.meta.json)"]


def test_missing_meta_is_an_error_unless_allowed(tmp_path):
    path = tmp_path / "c.csv"
    write(path, [rec(0)])
    meta_path(path).unlink()
    with pytest.raises(CaptureError, match="meta.json is missing"):
        read_capture(path)
    assert read_capture(path, require_meta=False)[1] == [rec(0)]


def test_symlink_at_output_path_is_refused(tmp_path):
    target = tmp_path / "victim"
    target.write_text("precious\n")
    link = tmp_path / "c.csv"
    link.symlink_to(target)
    with pytest.raises(CaptureError, match="symlink"):
        CaptureWriter(link, META)
    assert target.read_text() == "precious\n"
    assert not meta_path(link).exists()


def test_symlink_at_meta_path_is_refused(tmp_path):
    target = tmp_path / "victim"
    target.write_text("precious\n")
    meta_path(tmp_path / "c.csv").symlink_to(target)
    with pytest.raises(CaptureError, match="symlink"):
        CaptureWriter(tmp_path / "c.csv", META)
    assert target.read_text() == "precious\n"


def test_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        write(tmp_path / "c.csv", [rec(0)])
    finally:
        os.umask(old)
    for p in (tmp_path / "c.csv", tmp_path / "c.meta.json"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o640, p


def test_context_manager_records_error_reason(tmp_path):
    path = tmp_path / "c.csv"
    with pytest.raises(RuntimeError):
        with CaptureWriter(path, META) as w:
            w.write(rec(0))
            raise RuntimeError("boom")
    meta = read_meta(path)
    assert meta["complete"] and meta["stop_reason"] == "error: RuntimeError: boom"
    assert meta["records"] == 1


def test_call_writer_round_trip(tmp_path):
    path = tmp_path / "calls.csv"
    calls = [CallRecord("iommu_map", 1, 200, 4096, 7, 0, 3, 7, 0, 1),
             CallRecord("kvm_exit", 2, 900, 30, 8, 1, None, 9, 2, 0)]
    with CallWriter(path) as w:
        w.write_many(calls)
    assert path.read_text().splitlines() == [",".join(CALL_COLUMNS),
                                             "iommu_map,1,200,4096,7,0,3,7,0,1",
                                             "kvm_exit,2,900,30,8,1,,9,2,0"]
    assert list(iter_calls(path)) == calls


def test_call_reader_takes_files_without_the_added_columns(tmp_path):
    path = tmp_path / "old.csv"
    path.write_text("kind,t_ns,ns,size,pid,cpu,seq\niommu_map,1,200,4096,7,0,3\n")
    assert list(iter_calls(path)) == [CallRecord("iommu_map", 1, 200, 4096, 7, 0, 3)]


def test_call_writer_refuses_symlink(tmp_path):
    (tmp_path / "calls.csv").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(CaptureError, match="symlink"):
        CallWriter(tmp_path / "calls.csv")
    assert not (tmp_path / "elsewhere").exists()


ints64 = st.integers(min_value=-2**63, max_value=2**63 - 1)
records = st.builds(SwitchRecord, *[ints64 for _ in COLUMNS])


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(records, max_size=40))
def test_property_write_read_round_trip(tmp_path, recs):
    path = tmp_path / "prop.csv"
    write(path, recs, stop_reason="done", lost={})
    meta, back, problems = read_capture(path)
    assert back == recs
    assert problems == [] and meta["records"] == len(recs)


def test_fast_row_format_matches_csv_module():
    from tracer.capture.files import _csv_text, format_switch_rows
    rows = [rec(i).as_row() for i in range(50)] + [(-(2**63),) * len(COLUMNS)]
    assert format_switch_rows(rows) == _csv_text(rows)


def test_non_integer_row_is_an_error_not_a_silent_gap(tmp_path):
    w = CaptureWriter(tmp_path / "c.csv", META)
    bad = rec(0)
    bad.switch_ns = None
    w.write(bad)
    with pytest.raises(CaptureError, match="not all integers"):
        w.close()
    meta, back, problems = read_capture(tmp_path / "c.csv")
    assert back == [] and problems == []
    assert meta["records"] == 0 and "write error" in meta["stop_reason"]


def test_meta_accepts_sets_as_filters(tmp_path):
    write(tmp_path / "c.csv", [], stop_reason="x")
    w = CaptureWriter(tmp_path / "d.csv", {**META, "filters": {"vfs": {3, 1}}})
    w.close()
    assert read_meta(tmp_path / "d.csv")["filters"] == {"vfs": [1, 3]}


def test_killed_writer_leaves_only_whole_rows(tmp_path):
    """SIGKILL mid-run: the CSV holds whole rows only and the meta says incomplete."""
    import signal
    import subprocess
    import sys
    path = tmp_path / "c.csv"
    child = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
sys.path.insert(0, {str(__import__('pathlib').Path(__file__).resolve().parents[2])!r})
from tracer.capture.files import CaptureWriter
from tracer.model.schema import COLUMNS, SwitchRecord
w = CaptureWriter({str(path)!r}, {{}})
i = 0
while True:
    w.write(SwitchRecord(*[i * 31 + k for k in range(len(COLUMNS))]))
    i += 1
    if i == 20000:
        print("going", flush=True)
    if i > 20000:
        time.sleep(0.0005)               # keep the read-back small
"""], stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b"going\n"
        time.sleep(0.7)                       # past at least one timed flush
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    meta, back, problems = read_capture(path)
    assert meta["complete"] is False
    assert problems == ["capture is not complete: the recorder did not close it"]
    assert len(back) >= 20000 - 2048
    assert back == [rec(i) for i in range(len(back))]
    assert path.read_bytes().endswith(b"\n")


def test_write_failure_is_an_oserror_too(tmp_path):
    from tracer.capture.files import CaptureWriteError
    w = CaptureWriter(tmp_path / "c.csv", META)
    os.close(w._fd)                          # the output vanishes under the writer
    w._fd = os.open("/dev/full", os.O_WRONLY)
    w.write(rec(0))
    with pytest.raises(OSError) as e:
        w.flush()
    assert isinstance(e.value, CaptureWriteError) and "cannot write" in str(e.value)
    w._rows.clear()
    w.close()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64) | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=5),
    max_leaves=30)


@given(st.dictionaries(st.text(max_size=6), json_values, max_size=6))
@settings(max_examples=300, deadline=None)
def test_meta_json_reads_back_as_what_was_written(meta):
    from tracer.capture.files import meta_json
    assert json.loads(meta_json(meta)) == meta


def test_a_long_runs_kernel_histograms_keep_the_meta_small_and_readable(tmp_path):
    """A 10-minute soak's meta was 19 MB, one number a line, and over the reader's
    limit: a capture vftrace could not read back.  Lists of numbers go on one line."""
    groups = [{"pf": pf, "vf": vf, "phase": phase, "count": 10**6, "sum_ns": 10**11,
               "min_ns": 20_000, "max_ns": 12_000_000,
               "buckets": [[b, 1 + b % 7] for b in range(5000, 25_000, 2)]}
              for pf in range(3) for vf in range(4)
              for phase in ("switch", "revoke", "grant", "corrected")]
    w = CaptureWriter(tmp_path / "c.csv", {"kernel_histograms": {
        "sub_bits": 10, "max_bits": 32, "slots_full": 0, "groups": groups}})
    w.close()
    mp = meta_path(tmp_path / "c.csv")
    text = mp.read_text()
    assert '"buckets": [[5000,3],[5002,5],' in text
    assert len(text) < 8 << 20, len(text)
    meta, _rows, problems = read_capture(tmp_path / "c.csv")
    assert not problems and meta["kernel_histograms"]["groups"] == groups
    assert '\n  "columns": [\n    "seq",' in text       # strings still one a line
