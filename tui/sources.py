"""Where the dashboard's records come from: a finished capture, a growing one, or the kernel.

The App is given one ``Source`` (so tests can give it their own).  ``start()`` returns
what the header shows; ``read(timeout)`` is called in a worker thread, blocks for at most
about ``timeout`` seconds and returns a ``Batch``; ``stop(reason)`` ends the source (for
the live one: stop the workload, detach the probes, close the capture).  Nothing here
imports Textual.
"""
from __future__ import annotations

import csv
import os
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol

from tracer.capture.files import (MAX_LINE_BYTES, CaptureError, call_from_fields, calls_path,
                            header_positions,
                            iter_calls, iter_capture, meta_path, read_meta, switch_from_fields)
from tracer.errors import VftraceError
from tracer.metrics.owner import OwnerRead
from tracer.model import kernel_hist
from tracer.model.schema import (CALL_COLUMNS, CALL_COLUMNS_ADDED, COLUMNS, COLUMNS_ADDED,
                                 DEFAULT_DEPTH, CallRecord, SwitchRecord, depth_of, unmeasured)

MAX_PROBLEMS = 50                 # problem lines kept per batch (the count is kept apart)
REPLAY_CHUNK = 2048               # records per batch at --speed max
FOLLOW_READ_BYTES = 4 << 20       # per poll, so a huge backlog still streams in steps


@dataclass
class HeaderInfo:
    """What the header shows about the source (from a capture's meta or the session)."""
    origin: str
    kernel: str | None = None
    switch_source: str | None = None
    probe_modes: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    floor_ns: dict = field(default_factory=dict)
    budget_ns: int | None = None
    kvm_vendor: str | None = None
    filters: dict = field(default_factory=dict)
    has_calls: bool = False          # per-call rows will come (guest rates from them)
    meta: dict = field(default_factory=dict)
    depth: str = DEFAULT_DEPTH
    unmeasured: frozenset[str] = frozenset()   # columns shown as not measured

    @classmethod
    def from_meta(cls, meta: dict, origin: str, has_calls: bool = False) -> HeaderInfo:
        budget = meta.get("budget_ns")
        return cls(origin=origin, kernel=meta.get("kernel"),
                   switch_source=meta.get("switch_source"),
                   probe_modes=dict(meta.get("probe_modes") or {}),
                   warnings=[str(w) for w in meta.get("warnings") or []],
                   floor_ns=dict(meta.get("floor_ns") or {}),
                   budget_ns=budget if isinstance(budget, int) and budget > 0 else None,
                   kvm_vendor=meta.get("kvm_vendor"), filters=dict(meta.get("filters") or {}),
                   has_calls=has_calls, meta=meta, depth=depth_of(meta),
                   unmeasured=unmeasured(meta))


@dataclass
class Batch:
    """What one read (or several, coalesced) brought.  ``lost_per_cpu`` and
    ``guest_totals`` are cumulative: a later value replaces an earlier one."""
    switches: list[SwitchRecord] = field(default_factory=list)
    # switches as int64 arrays in COLUMNS order (the live engine's batches), after those
    switch_rows: list = field(default_factory=list)
    calls: list[CallRecord] = field(default_factory=list)
    guest_totals: dict | None = None
    lost_per_cpu: dict[int, int] | None = None
    problems: list[str] = field(default_factory=list)
    bad_lines: int = 0
    status: str | None = None
    finished: bool = False
    restart: bool = False            # the capture was replaced or truncated: start over
    header: HeaderInfo | None = None

    def merge(self, later: Batch) -> None:
        """Fold ``later`` into this batch (the worker coalesces bursts this way)."""
        if later.restart:
            self.switches, self.switch_rows, self.calls, self.restart = [], [], [], True
            self.problems, self.bad_lines = [], 0
        self.switches.extend(later.switches)
        self.switch_rows.extend(later.switch_rows)
        self.calls.extend(later.calls)
        for name in ("guest_totals", "lost_per_cpu", "status", "header"):
            if getattr(later, name) is not None:
                setattr(self, name, getattr(later, name))
        room = MAX_PROBLEMS - len(self.problems)
        self.problems.extend(later.problems[:max(room, 0)])
        self.bad_lines += later.bad_lines
        self.finished = self.finished or later.finished

    def is_empty(self) -> bool:
        return self == Batch()

    def switch_count(self) -> int:
        return len(self.switches) + sum(r.shape[0] for r in self.switch_rows)


class Source(Protocol):
    description: str

    def start(self) -> HeaderInfo: ...

    def read(self, timeout: float) -> Batch: ...

    def stop(self, reason: str) -> None: ...


# --- capture files -------------------------------------------------------------------

def check_capture(path: Path) -> None:
    """A readable capture CSV, or a one-line VftraceError saying what it is instead."""
    if not path.exists():
        raise VftraceError(f"{path}: no such file (give a capture CSV written by vftrace "
                           "record, or --follow to wait for one)")
    if path.is_dir():
        raise VftraceError(f"{path}: is a directory; give a capture CSV")
    if not path.is_file():                   # a FIFO or a device: open() could block
        raise VftraceError(f"{path}: not a regular file; give a capture CSV")
    try:
        with open(path, newline="") as f:
            first = f.readline(1 << 16)
    except OSError as e:
        raise VftraceError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise VftraceError(f"{path}: not a capture (binary data, no CSV header)") from None
    try:
        header = next(csv.reader([first.removeprefix("\ufeff")]), [])
    except csv.Error:
        header = []
    missing = [c for c in COLUMNS if c not in header and c not in COLUMNS_ADDED]
    if not first or missing:
        hint = " (that is the metadata; give the .csv beside it)" \
            if path.name.endswith(".json") else ""
        raise VftraceError(f"{path}: not a capture: header lacks {', '.join(missing[:3])}"
                           f"{'...' if len(missing) > 3 else ''}{hint}")


def load_meta(path: Path) -> tuple[dict, list[str]]:
    """The capture's meta (empty when absent) and what is worth telling about it."""
    try:
        meta = read_meta(path, require=False)
    except CaptureError as e:
        return {}, [str(e)]
    if not meta:
        return {}, [f"no meta file ({meta_path(path).name}): header details unknown"]
    return meta, [] if meta.get("complete") else ["capture is not complete: its recorder "
                                                  "did not close it"]


def lost_from_meta(meta: dict) -> dict[int, int]:
    lost = meta.get("lost_records_per_cpu") or {}
    try:
        return {int(cpu): int(n) for cpu, n in lost.items()}
    except (AttributeError, TypeError, ValueError):
        return {}


def meta_kernel_histograms(meta: dict) -> list | None:
    """A capture meta's histograms of every switch; None without them, or unreadable
    (``kernel_hist.exact_line`` says which to the dashboard)."""
    try:
        return kernel_hist.from_meta((meta or {}).get("kernel_histograms"))
    except ValueError:
        return None


class ReplaySource:
    """A finished capture, paced by the records' ``t_ns`` scaled by ``speed`` (0: as fast
    as possible).  The per-call rows named by the meta are replayed on the same clock."""

    def __init__(self, path: str | os.PathLike, speed: float = 1.0, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep,
                 chunk: int = REPLAY_CHUNK) -> None:
        self.path = Path(path)
        check_capture(self.path)
        self.speed = speed
        self.clock, self.sleep, self.chunk = clock, sleep, chunk
        self.meta, self._meta_problems = load_meta(self.path)
        self.calls_file = calls_path(self.path, self.meta)
        if self.calls_file is not None and not self.calls_file.is_file():
            self._meta_problems.append(f"per-call file {self.calls_file.name} not found: "
                                       "guest rates unavailable")
            self.calls_file = None
        pace = "max speed" if not speed else f"{speed:g}x"
        self.description = f"replay {self.path.name} ({pace})"
        self._header: HeaderInfo | None = None
        self._problems: list[str] = []
        self._switches: Iterator[SwitchRecord] | None = None
        self._calls: Iterator[CallRecord] | None = None
        self._next_switch: SwitchRecord | None = None
        self._next_call: CallRecord | None = None
        self._t0: int | None = None
        self._w0 = 0.0
        self._count = 0
        self._done = False
        self._first = True

    def start(self) -> HeaderInfo:
        if self._header is None:
            self._header = HeaderInfo.from_meta(self.meta, self.description,
                                                has_calls=self.calls_file is not None)
            self._switches = iter_capture(self.path, self._problems)
            self._next_switch = self._pull_switch()
            if self.calls_file is not None:
                self._calls = iter_calls(self.calls_file, self._problems)
                self._next_call = self._pull_call()
            firsts = [r.t_ns for r in (self._next_switch, self._next_call) if r is not None]
            self._t0 = min(firsts) if firsts else 0
            self._w0 = self.clock()
        return self._header

    def _pull_switch(self) -> SwitchRecord | None:
        try:
            return next(self._switches, None)
        except CaptureError as e:
            self._problems.append(f"replay stopped: {e}")
            return None

    def _pull_call(self) -> CallRecord | None:
        try:
            return next(self._calls, None) if self._calls is not None else None
        except CaptureError as e:
            self._problems.append(f"per-call rows stopped: {e}")
            return None

    def read(self, timeout: float) -> Batch:
        self.start()
        batch = Batch()
        if self._first:
            self._first = False
            batch.problems.extend(self._meta_problems)
            batch.lost_per_cpu = lost_from_meta(self.meta)
            batch.guest_totals = self.meta.get("background") or None
            batch.status = f"replaying {'at max speed' if not self.speed else f'{self.speed:g}x'}"
        if self._done:
            self.sleep(timeout)
            return batch
        if self.speed:
            horizon = self._due_horizon(timeout)
        else:
            horizon = None
        while self._next_switch is not None and len(batch.switches) < self.chunk:
            if horizon is not None and self._next_switch.t_ns > horizon:
                break
            batch.switches.append(self._next_switch)
            self._next_switch = self._pull_switch()
        if not self.speed:          # calls up to the newest switch; all of them at the end
            horizon = None if self._next_switch is None else \
                max((r.t_ns for r in batch.switches), default=self._t0)
        while self._next_call is not None and (horizon is None or self._next_call.t_ns <= horizon):
            batch.calls.append(self._next_call)
            self._next_call = self._pull_call()
        self._count += len(batch.switches)
        batch.problems.extend(self._problems[:MAX_PROBLEMS])
        del self._problems[:]
        if self._next_switch is None and self._next_call is None:
            self._done = batch.finished = True
            batch.status = f"end of capture ({self._count} switches)"
        return batch

    def metrics_view(self) -> tuple[dict, list | None]:
        """The meta, and the capture's histograms of every switch: they hold the whole
        run, so they count once the replay has reached its end (until then, the records
        so far)."""
        return self.meta, meta_kernel_histograms(self.meta) if self._done else None

    def _due_horizon(self, timeout: float) -> int:
        """The newest trace time due by now; waits (up to ``timeout``) if none is due."""
        def horizon() -> int:
            return self._t0 + int((self.clock() - self._w0) * self.speed * 1e9)

        nexts = [r.t_ns for r in (self._next_switch, self._next_call) if r is not None]
        due = horizon()
        if nexts and min(nexts) > due:
            wait = (min(nexts) - due) / 1e9 / self.speed
            self.sleep(min(wait, timeout))
            due = horizon()
        return due

    def stop(self, reason: str) -> None:
        for it in (self._switches, self._calls):
            close = getattr(it, "close", None)
            if close is not None:
                close()
        self._done = True


# --- following a growing capture ------------------------------------------------------

class LineParser:
    """Rows of a capture CSV one line at a time, with the header checks of
    ``tracer.capture.files`` (required columns, no duplicates; optional columns read as 0)."""

    def __init__(self, header: list[str], columns: tuple[str, ...],
                 optional: frozenset[str] = frozenset()) -> None:
        try:
            self.where = header_positions(header, columns, optional)
        except ValueError as e:
            raise ValueError(f"not a capture: {e}") from None
        self.width = len(header)

    @classmethod
    def from_line(cls, line: str, columns: tuple[str, ...],
                  optional: frozenset[str] = frozenset()) -> LineParser:
        """The parser for a header line; ValueError says why it is not a capture's."""
        try:
            header = next(csv.reader([line.removeprefix("\ufeff")]), [])
        except csv.Error as e:                  # a stray CR or quote, an overlong field
            raise ValueError(f"not a capture: unreadable header ({e})") from None
        return cls(header, columns, optional)

    def fields(self, line: str) -> list[str]:
        """The fields in ``columns`` order; ValueError when the line is malformed."""
        parts = line.split(",")                   # integers and plain words: never quoted
        if len(parts) != self.width:
            raise ValueError(f"{len(parts)} fields, header has {self.width}")
        return [parts[i] if i is not None else "0" for i in self.where]


# The same field checks as the capture reader (plain ASCII integers, a word for a kind).
parse_switch = switch_from_fields
parse_call = call_from_fields


class Tailer:
    """``tail -f`` of one CSV: whole lines only, a malformed one counted (never fatal),
    truncation or replacement noticed (the reader then starts over)."""

    def __init__(self, path: Path, columns: tuple[str, ...], parse: Callable,
                 optional: frozenset[str] = frozenset()) -> None:
        self.path, self.columns, self.parse, self.optional = path, columns, parse, optional
        self._f = None
        self._ident: tuple[int, int] | None = None
        self._offset = 0
        self._partial = b""
        self._skipping = False                   # inside an overlong line: drop to its end
        self._parser: LineParser | None = None
        self._line = 0
        self.header_problem: str | None = None
        self.at_eof = False

    @property
    def opened(self) -> bool:
        return self._f is not None

    def _open(self) -> bool:
        try:
            # O_NONBLOCK: a FIFO planted at the path must not hang the reader thread.
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return False
        except OSError as e:
            raise VftraceError(f"cannot read {self.path}: {e.strerror}") from None
        f = open(fd, "rb")
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            f.close()
            raise VftraceError(f"{self.path}: not a regular file; give a capture CSV")
        self._f, self._ident = f, (st.st_dev, st.st_ino)
        self._offset, self._partial, self._parser, self._line = 0, b"", None, 0
        self._skipping = False
        self.header_problem = None
        return True

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def poll(self) -> tuple[list, list[str], int, bool]:
        """(records, problems, malformed line count, restarted)."""
        restarted = False
        if self._f is None and not self._open():
            self.at_eof = True
            return [], [], 0, False
        try:
            st = os.stat(self.path)
            replaced = (st.st_dev, st.st_ino) != self._ident
        except FileNotFoundError:
            st, replaced = None, False              # deleted: keep what we have
        if replaced or (st is not None and st.st_size < self._offset):
            self.close()
            restarted = True
            if not self._open():
                return [], [], 0, True
        self._f.seek(self._offset)
        data = self._f.read(FOLLOW_READ_BYTES)
        self._offset += len(data)
        self.at_eof = len(data) < FOLLOW_READ_BYTES
        records, problems, bad = [], [], 0
        if self._skipping:                           # the rest of an overlong line
            end = data.find(b"\n")
            self._skipping = end < 0
            data = b"" if end < 0 else data[end + 1:]
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()                  # a line without its newline yet
        if len(self._partial) > MAX_LINE_BYTES:      # never buffered without bound
            self._partial, self._skipping = b"", True
            lines.append(None)                       # counted in place, after the others
        for raw in lines:
            self._line += 1
            if raw is None or len(raw) > MAX_LINE_BYTES:
                text, why = None, f"over {MAX_LINE_BYTES >> 10} KiB"
            else:
                try:
                    text, why = raw.decode().rstrip("\r"), ""
                except UnicodeDecodeError:
                    text, why = None, "not text"
            if self._parser is None and self.header_problem is None:
                if text is None:
                    self.header_problem = f"not a capture: the header line is {why}"
                else:
                    self._parse_header(text)
                continue
            if text == "":
                continue
            if self.header_problem is not None:
                bad += 1
                continue
            try:
                if text is None:
                    raise ValueError(why)
                records.append(self.parse(self._parser.fields(text)))
            except (ValueError, TypeError) as e:
                bad += 1
                if len(problems) < 5:
                    problems.append(f"{self.path.name} line {self._line}: malformed, "
                                    f"skipped ({str(e)[:80]})")
        if self.header_problem is not None and bad:
            problems.append(f"{self.path.name}: {self.header_problem}")
        return records, problems, bad, restarted

    def _parse_header(self, text: str) -> None:
        try:
            self._parser = LineParser.from_line(text, self.columns, self.optional)
        except ValueError as e:
            self.header_problem = str(e)


class FollowSource:
    """A capture another process is writing (``tail -f``): waits for the file, holds a
    partial last line until it is whole, notices the recorder finishing (the meta turns
    ``complete``) and the capture being truncated or replaced."""

    def __init__(self, path: str | os.PathLike, *, poll_s: float = 0.2,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise VftraceError(f"{self.path}: is a directory; give a capture CSV")
        if not self.path.parent.is_dir():
            raise VftraceError(f"{self.path}: directory {self.path.parent} does not exist")
        if self.path.exists() and not self.path.is_file():
            raise VftraceError(f"{self.path}: not a regular file; give a capture CSV")
        self.poll_s, self.sleep = poll_s, sleep
        self.description = f"follow {self.path.name}"
        self._switches = Tailer(self.path, COLUMNS, parse_switch, COLUMNS_ADDED)
        self._calls: Tailer | None = None
        self._meta_stamp: tuple | None = None
        self.meta: dict = {}
        self._finished_told = False
        self._header: HeaderInfo | None = None
        self._waiting_told = False
        self._meta_problem: str | None = None    # told once per change of the meta file

    def start(self) -> HeaderInfo:
        if self._header is None:
            self._refresh_meta()
            self._header = self._make_header()
        return self._header

    def _make_header(self) -> HeaderInfo:
        return HeaderInfo.from_meta(self.meta, self.description,
                                    has_calls=self._calls is not None)

    def _refresh_meta(self) -> bool:
        """Re-read the meta when it changed (it is replaced atomically by the writer)."""
        mp = meta_path(self.path)
        try:
            st = mp.stat()
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp == self._meta_stamp:
            return False
        self._meta_stamp = stamp
        try:
            self.meta = read_meta(self.path, require=False) if stamp else {}
        except CaptureError as e:                # the file is untrusted: shown, not fatal
            self.meta, self._meta_problem = {}, f"{e}; header details unknown"
        cp = calls_path(self.path, self.meta)
        if cp is not None and (self._calls is None or self._calls.path != cp):
            self._calls = Tailer(cp, CALL_COLUMNS, parse_call, CALL_COLUMNS_ADDED)
        return True

    def read(self, timeout: float) -> Batch:
        self.start()
        batch = Batch()
        if self._refresh_meta():
            batch.header = self._header = self._make_header()
            if not self.meta.get("complete"):
                self._finished_told = False
        if self._meta_problem is not None:
            batch.problems.append(self._meta_problem)
            self._meta_problem = None
        records, problems, bad, restarted = self._switches.poll()
        if restarted:
            batch.restart = True
            problems.insert(0, f"{self.path.name} was truncated or replaced: started over")
            self._finished_told = False
            if self._calls is not None:
                self._calls.close()
        batch.switches, batch.bad_lines = records, bad
        batch.problems.extend(problems)
        if self._calls is not None:
            try:
                calls, call_problems, call_bad, _ = self._calls.poll()
            except VftraceError as e:            # the switches go on without the calls
                calls, call_problems, call_bad = [], [f"per-call rows stopped: {e}"], 0
                self._calls.close()
                self._calls = None
            batch.calls = calls
            batch.problems.extend(call_problems)
            batch.bad_lines += call_bad
        if not self._switches.opened:
            if not self._waiting_told:
                batch.status = f"waiting for {self.path.name} to appear"
                self._waiting_told = True
        elif self._waiting_told or restarted:
            batch.status = f"following {self.path.name}"
            self._waiting_told = False
        elif batch.switches and batch.status is None and not self._finished_told:
            batch.status = f"following {self.path.name}"
        if (self.meta.get("complete") and self._switches.at_eof and not self._finished_told
                and self._switches.opened):
            self._finished_told = True
            batch.status = f"recorder finished ({self.meta.get('stop_reason', 'stopped')})"
            batch.lost_per_cpu = lost_from_meta(self.meta)
            batch.guest_totals = self.meta.get("background") or None
        if not records and self._switches.at_eof:
            self.sleep(min(self.poll_s, timeout))
        return batch

    def metrics_view(self) -> tuple[dict, list | None]:
        """The meta, and its histograms of every switch (written when the recorder stops)."""
        return self.meta, meta_kernel_histograms(self.meta)

    def stop(self, reason: str) -> None:
        self._switches.close()
        if self._calls is not None:
            self._calls.close()


# --- the live engine -------------------------------------------------------------------

METRICS_WAIT_S = 2.0      # a scrape's longest wait for the pump's read-out


class LiveSource:
    """The BPF engine through ``tracer.record.session.Session`` (root only).

    A pump thread polls the engine from the moment the probes are armed, whatever the
    dashboard is doing: the ring buffer is drained even while Textual starts up or
    redraws (under the lab's emulation that took long enough for the buffers to
    overflow).  The engine's callbacks fill a batch only the pump touches (it holds
    ``_session_lock``, never ``_cond``, across the blocking poll); after each poll that
    batch is swapped into ``_pending`` under ``_cond``, which is held only for the swap, so
    ``read`` never waits behind a poll.  Guest totals and losses are polled about once a
    second (cumulative; the dashboard takes rates by difference)."""

    def __init__(self, session, *, totals_every_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.session = session
        self.session.on_switch_rows = self._on_switch_rows
        self.session.on_call = self._on_call
        out = session.output
        self.description = "live" + (f" -> {out.name}" if out is not None else "")
        self.totals_every_s, self.clock = totals_every_s, clock
        self._polled = Batch()                   # filled by the callbacks, under _session_lock
        self._pending = Batch()                  # handed to read(), under _cond
        self._cond = threading.Condition()
        self._session_lock = threading.Lock()    # poll and stop never overlap
        self._last_totals = float("-inf")
        self._header: HeaderInfo | None = None
        self._finished = False
        self._stop_pump = threading.Event()
        self._pump: threading.Thread | None = None
        # metrics_view asks, the pump (the engine's owner) answers between two polls
        self._metrics = OwnerRead(lambda: (self.session.current_meta(),
                                           self.session.kernel_histograms()), METRICS_WAIT_S)

    def _on_switch_rows(self, rows) -> None:
        self._polled.switch_rows.append(rows)    # under _session_lock: inside poll or stop

    def _on_call(self, rec: CallRecord) -> None:
        self._polled.calls.append(rec)

    def start(self) -> HeaderInfo:
        if self._header is None:
            self.session.start()
            self._header = HeaderInfo.from_meta(self.session.meta, self.description,
                                                has_calls=self.session.opts.calls is not None)
            self._pump = threading.Thread(target=self._run_pump, name="vftrace-pump",
                                          daemon=True)
            self._pump.start()
        return self._header

    def _take_polled(self) -> Batch:
        """What the callbacks collected (caller holds ``_session_lock``)."""
        polled, self._polled = self._polled, Batch()
        polled.problems.extend(self.session.take_warnings())
        return polled

    def _hand_over(self, polled: Batch) -> None:
        with self._cond:
            self._pending.merge(polled)
            self._cond.notify_all()

    def _run_pump(self) -> None:
        while not self._stop_pump.is_set():
            problems: list[str] = []
            with self._session_lock:
                if self._finished:
                    return
                try:
                    reason = self.session.poll(100)
                except OSError as e:             # disk full, output gone: keep what was written
                    reason = f"error: {e}"
                    problems.append(f"{e}; the capture up to here is kept")
                except Exception as e:           # must not die silently with the probes on
                    reason = f"error: {type(e).__name__}: {e}"
                    problems.append(f"reading the engine failed: {e}")
                self._metrics.service()
                now = self.clock()
                totals = reason is not None or now - self._last_totals >= self.totals_every_s
                if reason is not None:
                    self._stop_locked(reason)
                polled = self._take_polled()
                polled.problems.extend(problems)
                if totals:
                    self._last_totals = now
                    try:                # a failed read-out is shown; the pump goes on
                        polled.lost_per_cpu = self.session.lost_per_cpu()
                        polled.guest_totals = self.session.background() or None
                    except Exception as e:
                        polled.problems.append(f"reading the kernel's totals failed: {e}")
            if reason is not None:
                polled.finished = True
                polled.status = f"recording stopped: {reason}"
            self._hand_over(polled)
            if reason is not None:
                return

    def metrics_view(self) -> tuple[dict, list | None]:
        """The session's meta as it stands and the kernel's histograms, read by the pump
        between two polls (it owns the engine): asked for here, answered within a turn.
        Not by taking ``_session_lock`` here: the pump re-takes it at once after each
        poll, and a waiter on it starved for seconds (lab, 6.1: every scrape stale)."""
        view, _ = self._metrics.get()
        return view or ({}, None)

    def read(self, timeout: float) -> Batch:
        with self._cond:
            if self._pending.is_empty():
                self._cond.wait(timeout)
            batch, self._pending = self._pending, Batch()
            return batch

    def _stop_locked(self, reason: str) -> None:
        if not self._finished:
            self._finished = True
            try:
                self.session.stop(reason)       # workload, then probes, then the capture
            finally:
                self._metrics.close()           # the final meta, for every later ask

    def stop(self, reason: str) -> None:
        self._stop_pump.set()
        if self._pump is not None and self._pump is not threading.current_thread():
            self._pump.join()
        with self._session_lock:
            self._stop_locked(reason)
            polled = self._take_polled()     # the final drain's records
        if not polled.is_empty():
            self._hand_over(polled)
