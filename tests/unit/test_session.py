"""The recording session's order of operations, with a fake engine (no BCC, no root).

The rule under test: a workload (``-- CMD``) starts only after the probes are armed, and
on every way a run can end it is stopped before the probes are detached, which is before
the capture is closed.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tracer.capture.files import read_capture
from tracer.cli import build_parser
from tracer.kernel.probes import Plan
from tracer.model import kernel_hist
from tracer.model.stats import Histogram
from tracer.model.schema import COLUMNS, SwitchRecord
from tracer.record import headless, session as session_mod
from tracer.record.procgroup import group_members
from tracer.record.session import RecordError, Session, TraceOptions, Workload
from tui.sources import Batch, LiveSource
from tui.store import to_rows

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def switch(seq: int, pf: int = 0, to_vf: int = 1) -> SwitchRecord:
    values = dict.fromkeys(COLUMNS, 0)
    values.update(seq=seq, t_ns=seq * 1000, pf=pf, from_vf=to_vf - 1, to_vf=to_vf,
                  switch_ns=500 + seq, revoke_ns=300, grant_ns=200 + seq)
    return SwitchRecord(**values)


class FakeEngine:
    """The parts of tracer.kernel.engine.Engine a Session uses; every step lands in ``events``."""

    events: list[str] = []
    fail_start = False
    per_poll = 3

    def __init__(self, plan, *, budget_ns, on_switch_rows, on_call=None, probe_costs=None):
        self.plan, self.on_call = plan, on_call
        # the engine hands over batches of rows; one switch is a batch of one here
        self.on_switch = lambda rec: on_switch_rows(to_rows([rec]))
        self.floor = SimpleNamespace(as_meta=lambda: {"function": "f"}, modes={})
        self.probe_costs = probe_costs or {}
        self.warnings = ["a hook failed"]
        self.reader, self.reader_note = "callback", None
        self.assembler = SimpleNamespace(late_releases=1, late_release_ns=9,
                                         orphan_releases=0, late_exits=2,
                                         late_exit_ns=50, orphan_exits=0, unended_exits=1,
                                         flush=lambda: None)
        self.bpf = None
        self.seq = 0
        self.samples = 0
        self.reads = SimpleNamespace(as_meta=lambda: {"longest_s": 2.5, "longest_at_s": 1.0,
                                                      "over_1s": 1})

    def start(self):
        FakeEngine.events.append("engine.start")
        if FakeEngine.fail_start:
            raise Exception("bpf: failed to compile\nmore lines")
        self.bpf = object()

    def poll(self, timeout_ms):
        for _ in range(self.per_poll):
            self.seq += 1
            self.samples += 1
            self.on_switch(switch(self.seq, pf=self.seq % 2))
        time.sleep(min(timeout_ms, 20) / 1000)

    def lost_per_cpu(self):
        return {1: 4}

    def lost_by_kind(self):
        return {"switch": 3, "call": 0, "join": 1}

    def drain(self):
        pass

    def partial_windows(self):
        return 0

    def kernel_histograms(self):
        return []

    def kernel_histograms_meta(self):
        # every switch made, and the 3 lost_by_kind says were lost in the kernel
        h = Histogram()
        h.add_array(np.full(self.seq + 3, 1000, np.int64))
        return {**kernel_hist.to_meta([kernel_hist.KernelHist(0, 0, "switch", h,
                                                               1000 * h.total)], 0),
                "read": "fake"}

    def background(self):
        return {"calls_by_pid": {}, "kvm_exits": [{"pid": 7, "vcpu": 0, "reason": 120,
                                                   "in_window": False, "count": 3, "ns": 9}]}

    def close(self):
        FakeEngine.events.append("engine.close")
        self.seq += 1
        self.on_switch(switch(self.seq))           # held records flushed at close
        self.bpf = None


@pytest.fixture
def events(monkeypatch):
    FakeEngine.events = events = []
    FakeEngine.fail_start = False
    real_start, real_stop = Workload.start, Workload.stop

    def start(self):
        events.append("workload.start")
        real_start(self)

    def stop(self):
        events.append("workload.stop")
        status = real_stop(self)
        # Nothing of the workload's process group may outlive its stop.
        assert self.proc is None or not group_members(self.proc.pid)
        return status

    monkeypatch.setattr(Workload, "start", start)
    monkeypatch.setattr(Workload, "stop", stop)
    real_close = session_mod.CaptureWriter.close

    def close(self, *a, **kw):
        events.append("capture.close")
        return real_close(self, *a, **kw)

    monkeypatch.setattr(session_mod.CaptureWriter, "close", close)
    return events


def make_session(tmp_path, workload=None, duration=None, **kw) -> Session:
    opts = TraceOptions(workload=workload, duration=duration,
                        ready_file=tmp_path / "ready")
    return Session(opts, Plan("pf_sched", "raw_tp"), tool="test", output=tmp_path / "c.csv",
                   engine_factory=FakeEngine, **kw)


def run_until_stop(s: Session, limit_s: float = 20) -> str:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        reason = s.poll(20)
        if reason is not None:
            return reason
    raise AssertionError("the session never asked to stop")


def assert_order(events):
    assert events.index("engine.start") < events.index("workload.start")
    assert events.index("workload.start") < events.index("workload.stop")
    assert events.index("workload.stop") < events.index("engine.close")
    assert events.index("engine.close") < events.index("capture.close")


def test_workload_exiting_by_itself_ends_the_run(tmp_path, events):
    s = make_session(tmp_path, workload=[sys.executable, "-c", "import sys; sys.exit(3)"])
    s.start()
    assert (tmp_path / "ready").exists()
    reason = run_until_stop(s)
    assert reason == "workload exited (3)"
    meta = s.stop(reason)
    assert_order(events)
    assert meta["workload"] == {"argv": s.workload.argv, "exit_status": 3,
                                "stopped_by_vftrace": False}
    assert s.workload_warning() == f"workload {' '.join(s.workload.argv)} exited with status 3"
    on_disk, rows, problems = read_capture(tmp_path / "c.csv")
    assert on_disk["workload"]["exit_status"] == 3 and on_disk["stop_reason"] == reason
    assert on_disk["lost_total"] == 4 and not problems
    assert on_disk["lost_by_kind"] == {"switch": 3, "call": 0, "join": 1}
    assert (on_disk["late_exits"], on_disk["late_exit_ns"], on_disk["unended_exits"]) == (2, 50, 1)
    assert (on_disk["late_releases"], on_disk["late_release_ns"]) == (1, 9)
    assert on_disk["reader_gaps"] == {"longest_s": 2.5, "longest_at_s": 1.0, "over_1s": 1}
    # the fake made every switch a record but the 3 it says the kernel lost; the one it
    # flushes at close came after the kernel's count was read: -1, and no warning
    acc = on_disk["switch_accounting"]
    assert (acc["lost_in_kernel"], acc["written"], acc["unaccounted"]) == (3, len(rows), -1), acc
    assert acc["read"] == acc["passed_on"] == len(rows) - 1
    assert kernel_hist.accounting_warning(on_disk) is None
    assert on_disk["kernel_histograms"]["read"] == "fake"
    assert len(rows) == s.engine.seq          # every switch, the one flushed at close too


def test_duration_stops_the_workload_before_the_probes(tmp_path, events):
    s = make_session(tmp_path, workload=SLEEPER, duration=0.3)
    s.start()
    assert run_until_stop(s) == "duration"
    meta = s.stop("duration")
    assert_order(events)
    assert meta["workload"]["stopped_by_vftrace"] is True
    assert meta["workload"]["exit_status"] == -signal.SIGTERM
    assert s.workload_warning() is None          # we stopped it: not its failure


def test_a_signal_stops_the_workload_before_the_probes(tmp_path, events):
    s = make_session(tmp_path, workload=SLEEPER, signals=True)
    previous = signal.getsignal(signal.SIGTERM)
    s.start()
    os.kill(os.getpid(), signal.SIGTERM)
    assert run_until_stop(s) == "SIGTERM"
    s.stop("SIGTERM")
    assert_order(events)
    assert signal.getsignal(signal.SIGTERM) == previous


def test_quitting_the_dashboard_stops_the_workload_before_the_probes(tmp_path, events):
    live = LiveSource(make_session(tmp_path, workload=SLEEPER))
    live.start()
    batch = live.read(0.05)
    # the live engine's switches come as int64 rows, a batch at a time
    assert batch.switch_count() and not batch.switches
    assert all(r.dtype == np.int64 and r.shape[1] == len(COLUMNS) for r in batch.switch_rows)
    live.stop("quit")
    assert_order(events)
    meta = live.session.meta
    assert meta["stop_reason"] == "quit" and meta["workload"]["stopped_by_vftrace"]
    live.stop("quit again")                      # idempotent
    assert events.count("engine.close") == 1


def test_the_live_source_stops_itself_when_the_workload_ends(tmp_path, events):
    live = LiveSource(make_session(tmp_path, workload=[sys.executable, "-c", "pass"]))
    live.start()
    deadline = time.monotonic() + 20
    while not (batch := live.read(0.02)).finished:
        assert time.monotonic() < deadline
    assert_order(events)
    assert batch.status == "recording stopped: workload exited (0)"
    assert batch.lost_per_cpu == {1: 4}
    assert batch.guest_totals["kvm_exits"][0]["count"] == 3


def test_an_error_while_polling_still_stops_in_order(tmp_path, events, monkeypatch):
    s = make_session(tmp_path, workload=SLEEPER)
    s.start()

    def broken(_ms):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(s.engine, "poll", broken)
    with pytest.raises(OSError):
        try:
            s.poll(10)
        finally:
            s.stop("error: disk full")
    assert_order(events)


def test_a_failed_engine_start_starts_no_workload(tmp_path, events):
    FakeEngine.fail_start = True
    s = make_session(tmp_path, workload=SLEEPER)
    with pytest.raises(RecordError, match="could not load the BPF program: bpf: failed to "
                                          "compile$"):
        s.start()
    assert "workload.start" not in events and events[-1] == "engine.close"
    assert not (tmp_path / "ready").exists()


def test_a_workload_that_cannot_start_detaches_the_probes(tmp_path, events):
    s = make_session(tmp_path, workload=[str(tmp_path / "no-such-program")])
    with pytest.raises(RecordError, match="cannot start the workload"):
        s.start()
    assert events[:2] == ["engine.start", "workload.start"]
    assert "engine.close" in events and "capture.close" in events


def test_the_whole_process_group_is_stopped_and_sigterm_escalates(tmp_path):
    script = ("import signal, subprocess, sys, time\n"
              "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
              "print(child.pid, flush=True)\n"
              "time.sleep(60)\n")
    w = Workload([sys.executable, "-c", script], grace_s=0.3, stdout=subprocess.PIPE)
    w.start()
    grandchild = int(w.proc.stdout.readline())
    assert grandchild in group_members(w.proc.pid)
    assert w.stop() == -signal.SIGKILL                # it ignored SIGTERM
    assert not group_members(w.proc.pid)
    w.proc.stdout.close()


def test_filters_decide_what_the_capture_keeps_and_the_callback_sees_all(tmp_path, events):
    # The callback's statistics count seqs before they filter (no false gaps); the
    # capture keeps what the filter keeps and its meta says what was left out.
    seen = []
    opts = TraceOptions(pfs={1})
    s = Session(opts, Plan("pf_sched", "raw_tp"), tool="test", output=tmp_path / "c.csv",
                engine_factory=FakeEngine, on_switch=seen.append)
    s.start()
    s.poll(10)
    s.stop("done")
    meta, rows, _ = read_capture(tmp_path / "c.csv")
    assert rows and all(r.pf == 1 for r in rows)
    assert [r.seq for r in rows] == [r.seq for r in seen if r.pf == 1]
    assert meta["filtered_out"]["0"]["switches"] == sum(r.pf == 0 for r in seen)


# --- vftrace record end to end, on the fake engine --------------------------------------

def record_args(tmp_path, *extra):
    return build_parser().parse_args(["record", "-o", str(tmp_path / "rec.csv"), "-q", *extra])


@pytest.fixture
def fake_kernel(monkeypatch):
    monkeypatch.setattr(session_mod, "require_root", lambda: None)
    monkeypatch.setattr(session_mod, "make_plan", lambda opts: Plan("pf_sched", "raw_tp"))
    monkeypatch.setattr(session_mod, "require_bcc", lambda: None)
    import tracer.kernel.engine
    monkeypatch.setattr(tracer.kernel.engine, "Engine", FakeEngine)


def test_record_with_a_workload_keeps_its_messages_and_exit_status(tmp_path, events,
                                                                   fake_kernel, capsys):
    args = record_args(tmp_path, "--", sys.executable, "-c", "import sys; sys.exit(5)")
    assert headless.main(args) == 0                  # the workload's failure is a warning
    out, err = capsys.readouterr()
    assert_order(events)
    assert "vftrace: warning: a hook failed" in err
    assert "vftrace: recording pf_sched to" in err and "Ctrl-C to stop" in err
    assert "exited with status 5" in err
    assert f"vftrace: wrote {tmp_path / 'rec.csv'}" in err
    meta, rows, _ = read_capture(tmp_path / "rec.csv")
    assert f"VF switches: {len(rows)}" in out
    assert meta["tool"] == "vftrace record" and meta["workload"]["exit_status"] == 5


def test_record_duration_without_workload(tmp_path, events, fake_kernel, capsys):
    assert headless.main(record_args(tmp_path, "-d", "0.2")) == 0
    meta, rows, _ = read_capture(tmp_path / "rec.csv")
    assert meta["stop_reason"] == "duration" and "workload" not in meta and rows
    assert events == ["engine.start", "engine.close", "capture.close"]


@pytest.mark.parametrize("argv, message", [
    (["--pf", "x"], "--pf 'x': give integers, e.g. --pf 0,1"),
    (["--budget-ns", "0"], "--budget-ns 0: must be positive"),
    (["-d", "-1"], "--duration -1.0: must be positive"),
    (["bogus"], "unexpected argument 'bogus'"),
    (["--"], "-- without a command"),
])
def test_record_bad_options_are_record_errors(tmp_path, argv, message):
    with pytest.raises(RecordError) as err:
        headless.main(record_args(tmp_path, *argv))
    assert message in str(err.value)


def test_record_needs_root_with_the_same_message(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(RecordError, match=r"^needs root \(BPF tracing needs CAP_BPF and "
                                          r"CAP_PERFMON\); run with sudo$"):
        headless.main(record_args(tmp_path))


def test_record_and_live_share_the_trace_options():
    rec = build_parser().parse_args(["record", "-o", "x.csv", "-s", "func:f", "--pf", "1",
                                     "-b", "7", "-m", "kprobe", "-c", "c.csv"])
    live = build_parser().parse_args(["live", "-s", "func:f", "--pf", "1", "-b", "7", "-m",
                                      "kprobe", "-c", "c.csv"])
    names = ("switch", "pf", "vf", "pid", "budget_ns", "probe_mode", "calls", "perf_buffer", "callback_reader",
             "ebpf", "ready_file", "cmd")
    assert {n: getattr(rec, n) for n in names} == {n: getattr(live, n) for n in names}
    assert Path(TraceOptions.from_args(live, "live").calls) == Path("c.csv")


def test_a_write_error_while_live_stops_in_order_and_keeps_the_capture(tmp_path, events,
                                                                       monkeypatch):
    live = LiveSource(make_session(tmp_path, workload=SLEEPER))
    live.start()

    def disk_full(_ms):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(live.session.engine, "poll", disk_full)
    got, deadline = Batch(), time.monotonic() + 20      # the pump thread meets the error
    while not got.finished:
        assert time.monotonic() < deadline
        got.merge(live.read(0.05))
    assert got.status.startswith("recording stopped: error:")
    assert "the capture up to here is kept" in got.problems[0]
    assert_order(events)
    assert read_capture(tmp_path / "c.csv")[0]["complete"]


def test_the_dashboards_reader_never_waits_behind_a_blocking_poll(tmp_path, events,
                                                                    monkeypatch):
    """The pump may sit in the engine's poll for its whole timeout; the UI's reader must
    not queue behind it (it did: the pump held the reader's condition lock across the
    poll and re-took it at once, so under load `make lab`'s dashboard stopped receiving
    records).  Deterministic: the poll is held open until the test has read."""
    import threading
    live = LiveSource(make_session(tmp_path, workload=SLEEPER))
    in_poll, release = threading.Event(), threading.Event()

    def blocking_poll(engine, _ms):
        engine.seq += 1
        engine.on_switch(switch(engine.seq))
        in_poll.set()
        release.wait(30)

    monkeypatch.setattr(FakeEngine, "poll", blocking_poll)
    live.start()
    assert in_poll.wait(10)
    timer = threading.Timer(5, release.set)     # a reader stuck behind the poll fails
    timer.start()
    try:
        batch = live.read(0.05)                 # the pump is inside poll right now
        assert not release.is_set(), "read() waited for the poll to end"
        assert batch.switch_count() == 0        # the record is handed over after the poll
    finally:
        timer.cancel()
        release.set()
    got, deadline = Batch(), time.monotonic() + 10
    while not got.switch_count():
        assert time.monotonic() < deadline
        got.merge(live.read(0.05))
    assert got.switch_rows[0][0, COLUMNS.index("seq")] == 1
    live.stop("quit")
    assert_order(events)


def test_live_metrics_are_read_by_the_pump_and_every_scrape_counts_more(tmp_path, events,
                                                                         monkeypatch):
    """--metrics on live: the dashboard's reading thread feeds the endpoint's statistics
    and asks the pump (the engine's owner) for the meta and kernel histograms; a scrape
    gets a fresh answer within a turn of the pump, never a stale one, while the pump
    keeps polling (it re-takes its lock at once after each poll)."""
    from prometheus_client.parser import text_string_to_metric_families
    from tracer.metrics.exposition import render
    from tracer.metrics.tap import TappedSource
    from tracer.model.stats import Stats
    def busy_poll(self, timeout_ms):   # a poll that keeps the CPU, as a loaded engine's
        for _ in range(self.per_poll):
            self.seq += 1
            self.on_switch(switch(self.seq, pf=self.seq % 2))
        end = time.perf_counter() + 0.02
        while time.perf_counter() < end:
            pass

    monkeypatch.setattr(FakeEngine, "poll", busy_poll)
    tapped = TappedSource(LiveSource(make_session(tmp_path, workload=SLEEPER)), Stats(100))
    tapped.start()
    stop = threading.Event()

    def reader():                     # the dashboard's reading thread
        while not stop.is_set():
            tapped.read(0.05)

    t = threading.Thread(target=reader)
    t.start()
    try:
        counts = []
        for _ in range(4):
            time.sleep(0.2)
            t0 = time.monotonic()
            state = tapped.tap.state()
            assert time.monotonic() - t0 < 1.5 and not state.stale
            got = {s.name: s.value for f in text_string_to_metric_families(render(state).decode())
                   for s in f.samples
                   if s.name in ("vftrace_switches_total", "vftrace_lost_records_total")}
            counts.append(sum(g.count for g in state.vfs.values()))
            assert got["vftrace_lost_records_total"] >= 0
        assert counts == sorted(counts) and counts[-1] > counts[0], counts
        assert state.exits and state.exits[0]["count"] == 3       # the engine's, via the pump
    finally:
        stop.set()
        t.join()
        tapped.stop("test over")
    assert not tapped.tap.state().stale                           # the final state, at once
