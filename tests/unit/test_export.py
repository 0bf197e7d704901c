"""``vftrace export``: the Perfetto (Chrome JSON) timeline's tracks, slices and nesting,
the Parquet round trip, and one-line errors."""
from __future__ import annotations

import csv
import json
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from tracer.cli import main
from tracer.model import exit_reasons
from tracer.model.schema import CALL_COLUMNS, COLUMNS

DATA = Path(__file__).resolve().parents[1] / "data"
SMALL = DATA / "small.csv"
CALLS = DATA / "small.calls.csv"


def ns(us: float) -> int:
    """Trace microseconds back to integer nanoseconds (from the trace's clock origin)."""
    return round(us * 1000)


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def export_trace(tmp_path: Path, capsys, *extra: str, capture: Path = SMALL) -> dict:
    out = tmp_path / "trace.json"
    assert main(["export", str(capture), "--perfetto", str(out), *extra]) == 0
    capsys.readouterr()
    with open(out) as f:
        return json.load(f)


def slices(trace: dict) -> list[dict]:
    return [e for e in trace["traceEvents"] if e["ph"] == "X"]


def names(trace: dict, kind: str) -> dict[tuple, str]:
    """(pid,) -> process name or (pid, tid) -> thread name, from the "M" events."""
    out = {}
    for e in trace["traceEvents"]:
        if e["ph"] == "M" and e["name"] == kind:
            key = (e["pid"],) if kind == "process_name" else (e["pid"], e["tid"])
            out[key] = e["args"]["name"]
    return out


def assert_tracks_nest(events: list[dict]) -> None:
    """On every (pid, tid), each slice lies inside the open one before it or after it:
    what the trace format needs to draw a track as a tree."""
    tracks: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
    for e in events:
        assert isinstance(e["ts"], (int, float)) and isinstance(e["dur"], (int, float))
        assert e["dur"] >= 0
        tracks[(e["pid"], e["tid"])].append((ns(e["ts"]), ns(e["ts"]) + ns(e["dur"])))
    for key, spans in tracks.items():
        open_ends: list[int] = []
        for start, end in sorted(spans, key=lambda s: (s[0], -s[1])):
            while open_ends and open_ends[-1] <= start:
                open_ends.pop()
            assert not open_ends or end <= open_ends[-1], (key, start, end, open_ends[-1])
            open_ends.append(end)


@pytest.fixture(scope="module")
def small_trace(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("trace") / "trace.json"
    assert main(["export", str(SMALL), "--perfetto", str(out)]) == 0
    with open(out) as f:
        return json.load(f)


def test_switch_slices_match_the_capture(small_trace):
    rows = read_csv_rows(SMALL)
    process = names(small_trace, "process_name")
    switches = [e for e in slices(small_trace) if e["cat"] == "switch"]
    assert len(switches) == len(rows)
    origin = small_trace["metadata"]["clock_origin_ns"]
    assert 0 <= min(int(r["t_ns"]) for r in rows) - origin < 10**9
    by_key = {(int(r["pf"]), int(r["seq"])): r for r in rows}
    for e in switches:
        pf = int(process[(e["pid"],)].removeprefix("PF "))
        r = by_key[(pf, e["args"]["seq"])]
        assert ns(e["ts"]) + origin == int(r["t_ns"])
        assert ns(e["dur"]) == int(r["switch_ns"])
        assert e["name"] == f"vf{r['from_vf']}->vf{r['to_vf']}"
        for column in ("kvm_exits", "unmap_calls", "map_ns", "source_ns", "over_budget"):
            assert e["args"].get(column, 0) == int(r[column]), column   # zeros left out
    assert {process[(e["pid"],)] for e in switches} == {f"PF {p}" for p in
                                                        {r["pf"] for r in rows}}


def test_revoke_and_grant_are_children_that_split_the_switch(small_trace):
    events = slices(small_trace)
    parents = {(e["pid"], e["tid"], e["args"]["seq"]): e for e in events
               if e["cat"] == "switch"}
    children = [e for e in events if e["cat"] in ("revoke", "grant")]
    assert Counter(e["cat"] for e in children) == {"revoke": len(parents),
                                                   "grant": len(parents)}
    for c in children:
        p = parents[(c["pid"], c["tid"], c["args"]["seq"])]   # same track as its switch
        start, end = ns(p["ts"]), ns(p["ts"]) + ns(p["dur"])
        revoke, grant = p["args"]["revoke_ns"], p["args"]["grant_ns"]
        if c["cat"] == "revoke":
            assert (ns(c["ts"]), ns(c["dur"])) == (start, revoke)
        else:
            assert (ns(c["ts"]), ns(c["ts"]) + ns(c["dur"])) == (start + revoke, end)
            assert ns(c["dur"]) == grant


def test_every_track_nests(small_trace):
    assert_tracks_nest(slices(small_trace))


def test_calls_of_a_switch_sit_inside_it_on_the_pf_track(small_trace):
    calls = read_csv_rows(CALLS)
    in_switch = Counter(c["kind"] for c in calls if c["seq"] and c["kind"] != "kvm_exit")
    events = slices(small_trace)
    switches = {(e["pid"], e["tid"], e["args"]["seq"]): e for e in events
                if e["cat"] == "switch"}
    on_pf = [e for e in events if e["cat"] == "call" and "seq" in e["args"]]
    assert Counter(e["name"] for e in on_pf) == in_switch
    for e in on_pf:
        s = switches[(e["pid"], e["tid"], e["args"]["seq"])]
        assert ns(s["ts"]) <= ns(e["ts"])
        assert ns(e["ts"]) + ns(e["dur"]) <= ns(s["ts"]) + ns(s["dur"])


def test_one_track_per_vcpu_holds_its_kvm_exits(small_trace):
    meta = json.loads((DATA / "small.meta.json").read_text())
    exits = [c for c in read_csv_rows(CALLS) if c["kind"] == "kvm_exit"]
    events = [e for e in slices(small_trace) if e["cat"] == "kvm_exit"]
    assert len(events) == len(exits)
    process, thread = names(small_trace, "process_name"), names(small_trace, "thread_name")
    for pid, tid, vcpu in {(int(c["pid"]), int(c["tid"]), int(c["vcpu"])) for c in exits}:
        assert process[(pid,)] == f"VM {pid}"
        assert thread[(pid, tid)].startswith(f"vCPU {vcpu}")
    want = Counter(exit_reasons.name(int(c["size"]), meta["kvm_vendor"]) for c in exits)
    assert Counter(e["name"] for e in events) == want
    assert "IOIO" in want
    first = min(exits, key=lambda c: int(c["t_ns"]))
    e = min(events, key=lambda e: e["ts"])
    origin = small_trace["metadata"]["clock_origin_ns"]
    assert (ns(e["ts"]) + origin, ns(e["dur"])) == (int(first["t_ns"]), int(first["ns"]))


def test_calls_outside_switches_go_to_their_process(small_trace):
    calls = read_csv_rows(CALLS)
    outside = [c for c in calls if not c["seq"] and c["kind"] != "kvm_exit"]
    assert outside                                   # the shipped capture has some
    process = names(small_trace, "process_name")
    events = [e for e in slices(small_trace) if e["cat"] == "call" and "seq" not in e["args"]]
    assert Counter((e["pid"], e["name"]) for e in events) == Counter(
        (int(c["pid"]), c["kind"]) for c in outside)
    assert all(process[(e["pid"],)] in (f"pid {e['pid']}", f"VM {e['pid']}") for e in events)


def test_trace_metadata_carries_the_capture_meta(small_trace):
    meta = json.loads((DATA / "small.meta.json").read_text())
    md = small_trace["metadata"]
    for key in ("kernel", "lost_total", "lost_records_per_cpu", "partial_windows",
                "budget_ns", "probe_modes", "warnings"):
        assert md[key] == meta[key], key
    assert md["slices"]["switches"] == meta["records"]


def test_no_calls_gives_switches_only(tmp_path, capsys):
    trace = export_trace(tmp_path, capsys, "--no-calls")
    assert {e["cat"] for e in slices(trace)} == {"switch", "revoke", "grant"}


def test_missing_calls_file_warns_and_exports_switches(tmp_path, capsys):
    cap = tmp_path / "cap.csv"
    shutil.copy(SMALL, cap)
    shutil.copy(DATA / "small.meta.json", tmp_path / "cap.meta.json")   # calls_file absent here
    out = tmp_path / "t.json"
    assert main(["export", str(cap), "--perfetto", str(out)]) == 0
    assert "small.calls.csv is missing" in capsys.readouterr().err
    assert {e["cat"] for e in slices(json.loads(out.read_text()))} == {
        "switch", "revoke", "grant"}


def write_capture(tmp_path: Path, rows: list[dict], calls: list[dict]) -> Path:
    """A hand-made capture: every column 0 unless given."""
    path = tmp_path / "made.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow([r.get(c, 0) for c in COLUMNS])
    with open(tmp_path / "made.calls.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(CALL_COLUMNS)
        for c in calls:
            w.writerow([c.get(k, "" if k == "seq" else 0) for k in CALL_COLUMNS])
    (tmp_path / "made.meta.json").write_text(json.dumps({
        "complete": True, "records": len(rows), "lost_total": 0, "budget_ns": 100,
        "kvm_vendor": "vmx", "calls_file": "made.calls.csv"}))
    return path


def test_a_host_up_for_months_keeps_nanoseconds(tmp_path, capsys):
    base = 200 * 86400 * 10**9 + 123_456_789          # CLOCK_MONOTONIC after 200 days
    rows = [dict(seq=1, t_ns=base + 1, pf=0, from_vf=0, to_vf=1, switch_ns=1001,
                 revoke_ns=333, grant_ns=668)]
    calls = [dict(kind="iommu_unmap", t_ns=base + 2, ns=331, seq=1, pf=0, pid=7, tid=7)]
    trace = export_trace(tmp_path, capsys, capture=write_capture(tmp_path, rows, calls))
    origin = trace["metadata"]["clock_origin_ns"]
    assert origin % 10**9 == 0
    got = {e["cat"]: (ns(e["ts"]) + origin, ns(e["dur"])) for e in slices(trace)}
    assert got == {"switch": (base + 1, 1001), "revoke": (base + 1, 333),
                   "grant": (base + 334, 668), "call": (base + 2, 331)}
    assert_tracks_nest(slices(trace))


def test_slices_that_cannot_nest_move_to_overlap_threads_not_dropped(tmp_path, capsys):
    rows = [  # two switches of PF 0 that overlap (a broken switch source), one after
        dict(seq=1, t_ns=1000, pf=0, from_vf=0, to_vf=1, switch_ns=500, revoke_ns=300,
             grant_ns=200),
        dict(seq=2, t_ns=1200, pf=0, from_vf=1, to_vf=2, switch_ns=600, revoke_ns=100,
             grant_ns=500),
        dict(seq=3, t_ns=5000, pf=0, from_vf=-1, to_vf=3, switch_ns=100, revoke_ns=0,
             grant_ns=100),
    ]
    calls = [
        dict(kind="iommu_unmap", t_ns=1010, ns=100, seq=1, pf=0, pid=7, tid=7),
        dict(kind="iommu_map", t_ns=4000, ns=50, seq=3, pf=0, pid=7, tid=7),  # before seq 3
        dict(kind="kvm_exit", t_ns=1100, ns=400, size=30, pid=50, tid=51, vcpu=1, seq=1),
        dict(kind="kvm_exit", t_ns=1300, ns=400, size=30, pid=50, tid=51, vcpu=1),  # overlaps
        dict(kind="vfio_map_dma", t_ns=900, ns=40, size=4096, pid=50, tid=52),
    ]
    trace = export_trace(tmp_path, capsys, capture=write_capture(tmp_path, rows, calls))
    events = slices(trace)
    assert_tracks_nest(events)
    assert Counter(e["cat"] for e in events) == {"switch": 3, "revoke": 2, "grant": 3,
                                                 "call": 3, "kvm_exit": 2}
    thread = names(trace, "thread_name")
    overlap = {k for k, v in thread.items() if "overlapping" in v}
    assert len({k[0] for k in overlap}) == 2                  # the PF and the VM
    switch_tracks = {(e["pid"], e["tid"]) for e in events if e["cat"] == "switch"}
    assert len(switch_tracks) == 2                            # seq 2 moved aside
    assert next(e for e in events if e["cat"] == "switch" and e["args"]["seq"] == 3
                )["name"] == "none->vf3"
    assert {e["name"] for e in events if e["cat"] == "kvm_exit"} == {"IO_INSTRUCTION"}
    assert names(trace, "process_name")[(50,)] == "VM 50"
    vfio = next(e for e in events if e["name"] == "vfio_map_dma")
    assert vfio["pid"] == 50 and thread[(50, vfio["tid"])] == "kernel calls"


# --- parquet -------------------------------------------------------------------------------

def test_parquet_round_trip_equals_the_csv(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tracer.report.parquet import read_meta
    out = tmp_path / "cap.parquet"
    assert main(["export", str(SMALL), "--parquet", str(out)]) == 0
    assert "4774 switches" in capsys.readouterr().err
    table = pq.read_table(out)
    assert table.column_names == list(COLUMNS)
    assert all(f.type == pa.int64() for f in table.schema)
    want = np.loadtxt(SMALL, delimiter=",", skiprows=1, dtype=np.int64)
    old = SMALL.read_text().split("\n", 1)[0].split(",")      # small.csv predates the added
    assert all(not table.column(c).to_numpy().any() for c in COLUMNS if c not in old)  # columns
    got = np.column_stack([table.column(c).to_numpy() for c in old])
    assert np.array_equal(got, want)
    assert read_meta(out) == json.loads((DATA / "small.meta.json").read_text())


def test_calls_parquet_round_trip(tmp_path, capsys):
    import pyarrow.parquet as pq
    out = tmp_path / "calls.parquet"
    assert main(["export", str(SMALL), "--calls-parquet", str(out)]) == 0
    capsys.readouterr()
    table = pq.read_table(out).to_pylist()
    rows = read_csv_rows(CALLS)
    assert len(table) == len(rows)
    for got, want in zip(table, rows):
        assert got["kind"] == want["kind"]
        assert got["seq"] == (int(want["seq"]) if want["seq"] else None)
        for k in CALL_COLUMNS[1:]:
            if k != "seq":
                assert got[k] == int(want[k]), k


def test_truncated_capture_exports_whole_rows_and_warns(tmp_path, capsys):
    import pyarrow.parquet as pq
    cap = tmp_path / "cut.csv"
    text = SMALL.read_text()
    cap.write_text(text + "99,100,1,")
    meta = json.loads((DATA / "small.meta.json").read_text())
    (tmp_path / "cut.meta.json").write_text(json.dumps(meta))
    out = tmp_path / "cut.parquet"
    assert main(["export", str(cap), "--parquet", str(out), "--no-calls"]) == 0
    assert "truncated last line ignored" in capsys.readouterr().err
    assert pq.read_table(out).num_rows == meta["records"]


def test_export_bad_inputs(tmp_path, capsys):
    junk = tmp_path / "junk.csv"
    junk.write_text("a,b\n1,2\n")
    cap = tmp_path / "cap.csv"
    shutil.copy(SMALL, cap)
    shutil.copy(DATA / "small.meta.json", tmp_path / "cap.meta.json")
    meta_before = (tmp_path / "cap.meta.json").read_bytes()
    cases = [
        (["export", str(SMALL)], "nothing to export"),
        (["export", str(tmp_path / "nope.csv"), "--perfetto", str(tmp_path / "t.json")],
         "no such file"),
        (["export", str(junk), "--perfetto", str(tmp_path / "t.json")], "header lacks column(s)"),
        (["export", str(SMALL), "--perfetto", str(tmp_path / "no" / "t.json")], "does not exist"),
        (["export", str(SMALL), "--perfetto", str(tmp_path / "x"),
          "--parquet", str(tmp_path / "x")], "a different file"),
        (["export", str(cap), "--parquet", str(cap)], "is an input"),
        (["export", str(cap), "--perfetto", str(tmp_path / "cap.meta.json")], "is an input"),
        (["export", str(SMALL), "--perfetto", str(tmp_path / "t.json"), "--calls",
          str(tmp_path / "none.csv")], "--calls"),
    ]
    for args, says in cases:
        rc = main(args)
        err = capsys.readouterr().err
        assert rc == 2
        lines = err.strip().splitlines()
        assert len(lines) == 1 and says in lines[0], err
        assert lines[0].startswith("vftrace export: error:")
    assert not (tmp_path / "t.json").exists()      # nothing half-written left behind
    assert cap.read_bytes() == SMALL.read_bytes()
    assert (tmp_path / "cap.meta.json").read_bytes() == meta_before


def test_flow_arrows_lead_from_a_switch_to_the_exits_in_its_window(small_trace):
    exits_in_windows = [c for c in read_csv_rows(CALLS) if c["kind"] == "kvm_exit" and c["seq"]]
    assert exits_in_windows
    events = small_trace["traceEvents"]
    starts = {e["id"]: e for e in events if e["ph"] == "s"}
    finishes = {e["id"]: e for e in events if e["ph"] == "f"}
    assert starts.keys() == finishes.keys()
    assert len(starts) == len(exits_in_windows)
    xs = slices(small_trace)
    switches = defaultdict(list)
    exits = {}
    for e in xs:
        if e["cat"] == "switch":
            switches[(e["pid"], e["tid"])].append(e)
        elif e["cat"] == "kvm_exit":
            exits[(e["pid"], e["tid"], ns(e["ts"]))] = e
    for fid, s in starts.items():
        f = finishes[fid]
        assert f["bp"] == "e"
        target = exits[(f["pid"], f["tid"], ns(f["ts"]))]       # an exit starts there
        source = [sw for sw in switches[(s["pid"], s["tid"])]
                  if ns(sw["ts"]) <= ns(s["ts"]) < ns(sw["ts"]) + ns(sw["dur"])]
        assert len(source) == 1                                  # inside one switch
        assert source[0]["args"]["seq"] == target["args"]["seq"]
