"""One PF/VF filter, applied after seq gaps are counted: ``vftrace record --vf`` and
``--pf``, ``live``, ``replay`` and ``report`` give the same numbers and no gap for what
the filter left out, while a switch the kernel really lost is still a gap."""
from __future__ import annotations

import json
import time

import pytest

from tracer.capture.files import meta_path, read_capture
from tracer.cli import build_parser
from tracer.kernel.probes import Plan
from tracer.model.filter import FilterGate, SwitchFilter, merge_meta
from tracer.model.stats import Stats
from tracer.pfsched import control
from tracer.record import headless, session as session_mod
from tracer.record.session import Session, TraceOptions
from tracer.report.load import load_capture
from tui.model import DashboardModel
from tracer.model.schema import COLUMNS
from tui.sources import Batch, LiveSource, ReplaySource
from tui.store import to_rows

from .test_session import FakeEngine, events, switch  # noqa: F401 (events: a fixture)

PFS, VFS = (0, 1), 4
LOST = {(1, 7)}                     # (pf, seq) the "kernel" loses: one real gap on PF 1


class SeqEngine(FakeEngine):
    """Per-PF seqs like pf_sched's; every VF of both PFs in turn; LOST never delivered."""

    per_poll = 40

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.n = 0
        self.seqs = dict.fromkeys(PFS, 0)

    def _emit(self):
        pf = self.n % len(PFS)
        seq = self.seqs[pf] = self.seqs[pf] + 1
        to_vf = (self.n // len(PFS)) % VFS
        self.n += 1
        if (pf, seq) not in LOST:
            self.on_switch(switch(seq, pf=pf, to_vf=to_vf))

    def poll(self, timeout_ms):
        for _ in range(self.per_poll if self.n < 400 else 0):
            self._emit()
        time.sleep(0.01)

    def close(self):
        FakeEngine.events.append("engine.close")
        self._emit()                                    # held records flushed at close


@pytest.fixture
def seq_kernel(monkeypatch, events):
    monkeypatch.setattr(session_mod, "require_root", lambda: None)
    monkeypatch.setattr(session_mod, "make_plan", lambda opts: Plan("pf_sched", "raw_tp"))
    monkeypatch.setattr(session_mod, "require_bcc", lambda: None)
    monkeypatch.setattr(control, "layout", lambda: None)
    import tracer.kernel.engine
    monkeypatch.setattr(tracer.kernel.engine, "Engine", SeqEngine)


def figures(snap):
    return snap.records, snap.ignored, snap.seq_gaps


FILTERS = [(["--vf", "0"], None, {0}), (["--pf", "1"], {1}, None),
           (["--pf", "0", "--vf", "2,3"], {0}, {2, 3})]


@pytest.mark.parametrize("flags, pfs, vfs", FILTERS)
def test_record_live_replay_report_agree_and_only_the_real_loss_is_a_gap(
        tmp_path, seq_kernel, capsys, flags, pfs, vfs):
    out = tmp_path / "rec.csv"
    args = build_parser().parse_args(["record", "-o", str(out), "-q", "-d", "0.3", *flags])
    assert headless.main(args) == 0
    summary = capsys.readouterr().out
    meta, rows, _ = read_capture(out)
    assert rows and all((pfs is None or r.pf in pfs) and
                        (vfs is None or r.to_vf in vfs or r.from_vf in vfs) for r in rows)
    want_gaps = {pf: int(pf == 1) for pf in PFS if pfs is None or pf in pfs}
    assert meta["filtered_out"] and sum(v["switches"] for v in meta["filtered_out"].values())

    # report: the capture alone, with its meta
    cap = load_capture(out)
    assert cap.snapshot.seq_gaps == want_gaps
    assert cap.records == len(rows)
    report = figures(cap.snapshot)

    # record's own end-of-run table says the same
    lost_line = [ln for ln in summary.splitlines() if ln.startswith("WARNING")]
    if 1 in want_gaps:
        assert lost_line and "1 seq gaps (pf1:1)" in lost_line[0]
    else:
        assert not any("seq gaps" in ln for ln in lost_line)
    assert f"VF switches: {len(rows)}" in summary
    assert f"filtered out: {report[1]} records" in summary

    # replay: the dashboard's model fed the capture, as the App does
    source = ReplaySource(out, 0.0)
    model = DashboardModel(100, pfs=pfs, vfs=vfs)
    model.account(source.start().meta)
    while True:
        batch = source.read(0.01)
        model.fold(batch, now=1.0)
        if batch.finished:
            break
    assert figures(model.snapshot(1.0)) == report
    # replay with no filter of its own (the capture is already filtered)
    source = ReplaySource(out, 0.0)
    model = DashboardModel(100)
    model.account(source.start().meta)
    while not (batch := source.read(0.01)).finished:
        model.fold(batch, now=1.0)
    model.fold(batch, now=1.0)
    assert figures(model.snapshot(1.0)) == report


@pytest.mark.parametrize("flags, pfs, vfs", FILTERS)
def test_live_counts_like_record(tmp_path, seq_kernel, flags, pfs, vfs):
    opts = TraceOptions(pfs=pfs, vfs=vfs)
    session = Session(opts, Plan("pf_sched", "raw_tp"), tool="vftrace live",
                      output=tmp_path / "live.csv", engine_factory=SeqEngine)
    live = LiveSource(session)
    model = DashboardModel(100, pfs=opts.pfs, vfs=opts.vfs)    # what tui.cli._live passes
    model.account(live.start().meta)
    deadline = time.monotonic() + 30
    while session.engine.n < 400 and time.monotonic() < deadline:
        model.fold(live.read(0.1), now=1.0)
    live.stop("done")
    model.fold(live.read(0.1), now=1.0)          # the final drain
    snap = model.snapshot(1.0)
    assert snap.seq_gaps == {pf: int(pf == 1) for pf in PFS if pfs is None or pf in pfs}
    cap = load_capture(tmp_path / "live.csv")
    assert figures(cap.snapshot) == figures(snap)


def test_an_unfiltered_capture_keeps_counting_gaps_from_its_rows(tmp_path, seq_kernel):
    out = tmp_path / "all.csv"
    args = build_parser().parse_args(["record", "-o", str(out), "-q", "-d", "0.3"])
    assert headless.main(args) == 0
    meta = json.loads(meta_path(out).read_text())
    assert "filtered_out" not in meta
    assert load_capture(out).snapshot.seq_gaps == {0: 0, 1: 1}


def kept_records(gate: FilterGate, recs) -> list:
    """The records the gate keeps, fed as the engine hands them over (int64 rows)."""
    rows = gate.rows(to_rows(recs))
    kept = set(zip(rows[:, COLUMNS.index("pf")].tolist(), rows[:, COLUMNS.index("seq")].tolist()))
    return [r for r in recs if (r.pf, r.seq) in kept]


def test_the_gate_counts_before_it_filters():
    recs = [switch(s, pf=0, to_vf=s % 3) for s in range(1, 11) if s != 5]    # 5 lost
    gate = FilterGate(SwitchFilter.of(None, {1}))
    kept = kept_records(gate, recs)
    assert gate.gaps() == {0: 1} and gate.left_out == {0: len(recs) - len(kept)}
    # a reader of only the kept rows, told what was left out, counts the same gap,
    # whether the left-out ones came before, between or after the kept ones
    stats = Stats()
    stats.add_many(kept)
    stats.account(gate.as_meta())
    assert stats.seq_gaps() == {0: 1} and stats.ignored == gate.left_out_total


def test_a_partial_account_never_invents_a_gap():
    recs = [switch(s, pf=0, to_vf=s % 2) for s in range(1, 101)]
    gate = FilterGate(SwitchFilter.of(None, {0}))
    kept = kept_records(gate, recs)
    stats = Stats()
    stats.account(gate.as_meta(), whole=False)      # a replay half-way through
    stats.add_many(kept[:10])
    assert stats.seq_gaps() == {0: 0}
    stats.add_many(kept[10:])
    stats.account(gate.as_meta(), whole=True)
    assert stats.seq_gaps() == {0: 0}


def test_merged_accounts_add_up():
    a = {"0": {"switches": 3, "first_seq": 1, "last_seq": 9}}
    b = {"0": {"switches": 2, "first_seq": 2, "last_seq": 12},
         "1": {"switches": 1, "first_seq": 4, "last_seq": 4}}
    assert merge_meta(a, b) == {"0": {"switches": 5, "first_seq": 1, "last_seq": 12},
                                "1": {"switches": 1, "first_seq": 4, "last_seq": 4}}


def test_a_bad_filtered_out_meta_is_a_one_line_error(tmp_path):
    from tracer.capture.files import CaptureError, read_meta
    (tmp_path / "x.csv").write_text("")
    meta_path(tmp_path / "x.csv").write_text(json.dumps(
        {"filtered_out": {"0": {"switches": "many"}}}))
    with pytest.raises(CaptureError, match="filtered_out"):
        read_meta(tmp_path / "x.csv")
