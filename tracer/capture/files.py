"""Capture files: ``x.csv`` (one row per switch) and ``x.meta.json`` beside it.

The CSV is plain enough for pandas/polars as is: a header of column names, then
integers only, no index column.  Rows reach the file as whole lines only (buffered in
memory and written with one ``write`` per flush), at least every ``FLUSH_S`` seconds and
on close, so a reader following the file never sees half a row and a crash loses at most
the last fraction of a second.  The meta file is written at start with
``"complete": false`` and replaced atomically on close.
"""
from __future__ import annotations

import csv
import errno
import functools
import io
import json
import os
import platform
import re
import socket
import stat
import threading
from collections import deque
from datetime import datetime, timezone
from operator import attrgetter
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

import numpy as np

from tracer import __version__
from tracer.errors import VftraceError
from tracer.model.schema import (CALL_COLUMNS, CALL_COLUMNS_ADDED, COLUMNS, COLUMNS_ADDED,
                                 INT64_MAX, INT64_MIN, MAY_BE_UNMEASURED, CallRecord,
                                 SwitchRecord, unmeasured)
from tracer.model.correction import CORRECTED_COLUMNS, HIT_COLUMNS, Correction
from tracer.model.filter import META_KEY as FILTERED_OUT, parse_meta as parse_filtered_out

FLUSH_S = 0.5
FLUSH_ROWS = 2048       # ~250 KiB of switch rows per write
# Rows queued for the flush thread beyond which the writing thread writes them itself: the
# bound on the queue's memory (~22 MiB of switch rows as arrays).
MAX_PENDING_ROWS = 32 * FLUSH_ROWS


class CaptureError(VftraceError):
    """A capture that cannot be written or read; the message is one line."""


class CaptureWriteError(CaptureError, OSError):
    """Writing failed (disk full, output gone): also an OSError, so a recorder that
    keeps what was written on OSError handles it without knowing this module."""


def meta_path(csv_path: str | os.PathLike) -> Path:
    """``x.csv`` -> ``x.meta.json`` (any other name just gains ``.meta.json``)."""
    p = Path(csv_path)
    return p.with_name((p.name[:-4] if p.name.endswith(".csv") else p.name) + ".meta.json")


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _open_new(path: Path, flags: int = os.O_TRUNC) -> int:
    """Open for writing without following a symlink planted at ``path``; mode 0666 so
    the user's umask decides the permissions."""
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | flags,
                       0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CaptureError(f"refusing to write {path}: it is a symlink") from None
        if e.errno == errno.EEXIST:
            raise CaptureError(f"cannot write {path}: it already exists") from None
        raise CaptureError(f"cannot write {path}: {e.strerror}") from None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write beside ``path`` then rename over it: a reader sees the old or the new file,
    never a partial one.  The rename replaces a symlink rather than following it, but a
    symlink there is refused anyway so the behaviour matches the CSV."""
    if path.is_symlink():
        raise CaptureError(f"refusing to write {path}: it is a symlink")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if os.path.lexists(tmp):        # left by a crashed run of the same pid, or planted
        os.unlink(tmp)
    fd = _open_new(tmp, os.O_EXCL)
    try:
        _write_all(fd, (meta_json(obj) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


_NUMBER = (int, float)


def _number_list(value) -> bool:
    """A list of numbers, or of lists of numbers (a histogram's [bucket, count] pairs)."""
    return isinstance(value, list) and len(value) > 1 and all(
        isinstance(x, _NUMBER) or (isinstance(x, list) and all(isinstance(y, _NUMBER) for y in x))
        for x in value)


def meta_json(obj: dict) -> str:
    """``obj`` as indented JSON, a list of numbers on one line: a 10-minute capture's
    kernel histograms are ~100k [bucket, count] pairs, which one number a line made a
    19 MB meta, 5x its compact size."""
    compact: list[str] = []
    token = os.urandom(8).hex()     # random: no string of a meta will spell a placeholder

    def swap(value):
        if isinstance(value, dict):
            return {k: swap(v) for k, v in value.items()}
        if _number_list(value):
            compact.append(json.dumps(value, separators=(",", ":")))
            return f"{token}{len(compact) - 1}"
        if isinstance(value, list):
            return [swap(v) for v in value]
        return value
    text = json.dumps(swap(obj), indent=2, default=_jsonable)
    return re.sub(f'"{token}(\\d+)"', lambda m: compact[int(m.group(1))], text)


def _jsonable(value):
    """Filters arrive as sets; JSON has lists."""
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


class _Refused:
    """Stands in for a sink's row queue once rows can no longer be written (closed, or
    the timer thread's flush failed): the next write raises why."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def append(self, row: tuple) -> None:
        raise self.error

    extend = append

    def __len__(self) -> int:
        return 0

    def clear(self) -> None:
        pass


class _CsvSink:
    """Whole-line, periodically flushed CSV output shared by both writers.

    Rows are queued (CaptureWriter's already formatted) and written at each flush with
    one ``write``, so the file only ever grows by whole lines.  The queue is a deque: the
    writing thread appends without a lock (deque appends and pops are atomic), and a
    flush pops under the lock what was queued, so rows reach the file in the order they
    were written.

    The flush thread formats and writes: every ``FLUSH_S``, and as soon as ``FLUSH_ROWS``
    rows are queued.  The writing thread is the recorder's reader of the ring buffers,
    which must not wait on a format (or on the lock while the flush thread formats)
    when the rings are filling; it flushes itself only once ``MAX_PENDING_ROWS`` are
    queued, which bounds the memory.  In a lab soak where the guests kept both CPUs busy,
    the reader formatting inline paused for seconds at a time and the rings overflowed."""

    def __init__(self, path: str | os.PathLike, columns: tuple[str, ...]) -> None:
        self.path = Path(path)
        self.records = 0                         # rows in the file so far
        self._fd = _open_new(self.path)
        self._rows: deque[tuple] | _Refused = deque()
        self._lock = threading.Lock()            # one flush at a time
        self._closed = threading.Event()
        self._wake = threading.Event()           # FLUSH_ROWS queued, or closing
        self._error: Exception | None = None     # a flush failure in the timer thread
        self._emit(_csv_text([columns]).encode())
        # A timer thread keeps a follower up to date when records stop arriving.
        self._flusher = threading.Thread(target=self._flush_loop, daemon=True,
                                         name=f"flush {self.path.name}")
        self._flusher.start()

    def _format(self, rows: list[tuple]) -> tuple[bytes, int]:
        """The queued items as the file's bytes, and how many lines they are."""
        text = _csv_text(rows)
        return text.encode(), text.count("\n")

    def _add_row(self, row: tuple) -> None:
        rows = self._rows
        rows.append(row)
        if len(rows) >= FLUSH_ROWS:
            self._hand_over(len(rows))

    def _add_rows(self, new: Iterable[tuple]) -> None:
        rows = self._rows
        rows.extend(new)
        if len(rows) >= FLUSH_ROWS:
            self._hand_over(len(rows))

    def _hand_over(self, pending: int) -> None:
        """``FLUSH_ROWS`` or more rows are queued: wake the flush thread, or flush here
        once ``pending`` rows are waiting for it (it gets too little CPU to keep up)."""
        if pending >= MAX_PENDING_ROWS:
            self.flush()
        elif not self._wake.is_set():
            self._wake.set()

    def _flush_loop(self) -> None:
        while True:
            self._wake.wait(FLUSH_S)
            self._wake.clear()            # a wake from now on is another round
            if self._closed.is_set():
                return                    # the close flushes what is left
            try:
                self.flush()
            except Exception as e:        # reported to the writing thread instead
                self._error = e
                self._rows = _Refused(e)
                return

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        queued = len(self._rows)
        if self._fd < 0 or not queued:
            return
        pop = self._rows.popleft             # only what is queued now: appends go on
        rows = [pop() for _ in range(queued)]
        try:
            data, lines = self._format(rows)
        except (TypeError, ValueError) as e:
            raise CaptureError(f"{self.path}: a row is not all integers ({e}); "
                               f"{len(rows)} rows dropped") from None
        self._emit(data)
        self.records += lines

    def _emit(self, data: bytes) -> None:
        try:
            _write_all(self._fd, data)
        except OSError as e:
            raise CaptureWriteError(f"cannot write {self.path}: {e.strerror}") from None

    def _close_file(self) -> None:
        self._closed.set()
        self._wake.set()
        if self._flusher is not threading.current_thread():
            self._flusher.join()
        with self._lock:
            if self._fd < 0:
                return
            try:
                self._flush_locked()
                _fsync(self._fd, self.path)
            finally:
                os.close(self._fd)
                self._fd = -1
                self._rows = _Refused(self._error or CaptureError(f"{self.path} is closed"))
            if self._error is not None:
                raise self._error


def _fsync(fd: int, path: Path) -> None:
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno != errno.EINVAL:     # EINVAL: a pipe or device, nothing to sync
            raise CaptureWriteError(f"cannot write {path}: {e.strerror}") from None


def _csv_text(rows: Iterable[tuple]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


# Every switch column is an int, and an int never needs CSV quoting, so a row is its
# values joined by commas: byte-for-byte what csv.writer writes (a test checks it), at
# half its cost, which is what keeps the recorder above 200k records/s with the stats.
def switch_row_format(unmeasured: Iterable[str] = (), corrected: bool | None = None) -> str:
    """The row format: ``%d`` a column, an empty field (``%.0s``) for each column the
    recorder did not measure, so that 0 always means a measured zero.  ``corrected``:
    the ``CORRECTED_COLUMNS`` follow, as values (True) or empty (False: no correction
    known); None: the record columns only."""
    skip = set(unmeasured)
    fields = ["%.0s" if c in skip else "%d" for c in COLUMNS]
    if corrected is not None:
        fields += ["%d" if corrected else ""] * len(CORRECTED_COLUMNS)
    return ",".join(fields) + "\n"


_SWITCH_ROW_FORMAT = switch_row_format()
_CORRECTION_INPUTS = {c: COLUMNS.index(c) for c in (
    *HIT_COLUMNS, "map_calls", "unmap_calls", "source_ns", "switch_ns", "revoke_ns",
    "grant_ns", "unmap_ns", "map_ns")}
_switch_row = attrgetter(*COLUMNS)


def format_switch_rows(rows: list[tuple]) -> str:
    fmt = _SWITCH_ROW_FORMAT
    return "".join([fmt % row for row in rows])


@functools.cache
def _arrow_csv():
    """pyarrow and the CSV options of write_rows' blocks, imported on first use (a few
    100 ms, which ``vftrace --help`` should not pay; seconds under the lab's TCG, which
    a recorder pays before it arms: ``load_block_formatter``)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    return pa, pacsv, pacsv.WriteOptions(include_header=False, quoting_style="none",
                                         batch_size=FLUSH_ROWS)


def load_block_formatter() -> None:
    """Import what ``CaptureWriter.write_rows`` formats with, ahead of the first rows."""
    _arrow_csv()


def _join_switch_lines(lines: list) -> str:
    try:
        return "".join(lines)
    except TypeError:               # a row write() could not format: say why
        for row in lines:
            if not isinstance(row, str):
                [_ for v in row for _ in ("%d" % v,)]   # raises, naming the bad value
        raise


class CaptureWriter(_CsvSink):
    """Writes ``path`` (the switch CSV) and its meta file.

    ``meta`` gives the run's description (``switch_source``, ``probe_modes``,
    ``floor_ns``, ``budget_ns``, ``filters``...); tool, version, kernel, host,
    start_time and columns are filled in when not given.  After the record columns come
    the ``CORRECTED_COLUMNS`` (tracer/model/correction.py): computed from each record
    and the meta's ``probe_costs``, empty when the meta has none.
    """

    def __init__(self, path: str | os.PathLike, meta: dict) -> None:
        self.meta_path = meta_path(path)
        if self.meta_path.is_symlink():
            raise CaptureError(f"refusing to write {self.meta_path}: it is a symlink")
        self.meta = {
            "tool": "vftrace", "version": __version__, "kernel": platform.release(),
            "host": socket.gethostname(), "start_time": utc_now(),
            "switch_source": None, "probe_modes": {}, "floor_ns": {}, "budget_ns": None,
            "filters": {}, **meta, "columns": [*COLUMNS, *CORRECTED_COLUMNS],
            "complete": False,
        }
        super().__init__(path, (*COLUMNS, *CORRECTED_COLUMNS))
        self._correction = Correction.from_meta(self.meta)
        self._corrected = self._correction.values if self._correction else None
        self._row_format = switch_row_format(unmeasured(self.meta), self._correction is not None)
        self._unmeasured_at = {COLUMNS.index(c) for c in unmeasured(self.meta) if c in COLUMNS}
        self._row_width = len(COLUMNS) + (len(CORRECTED_COLUMNS) if self._correction is not None else 0)
        # Rows are queued already formatted (write()): a str is not tracked by the
        # garbage collector, a tuple is (2048 queued ones set off three collections);
        # write_rows queues arrays, formatted at the flush.
        self._format = self._lines
        self._queued_lines = 0          # write_rows' lines since it last woke the flush
        self._appended = 0              # write_rows' lines so far (the writing thread's count)
        try:
            write_json_atomic(self.meta_path, self.meta)
        except BaseException:
            self._close_file()
            raise

    def write(self, rec: SwitchRecord) -> None:
        # _add_row inlined: this runs once per switch, at up to a few
        # 100k a second, while the record is still in the cache.
        rows = self._rows
        row = _switch_row(rec)
        try:
            if self._corrected is not None:
                row += self._corrected(rec)
            rows.append(self._row_format % row)
        except (TypeError, ValueError):
            rows.append(row)
        if len(rows) >= FLUSH_ROWS:
            self._hand_over(len(rows))

    def _line(self, rec: SwitchRecord) -> str | tuple:
        """write()'s row: its line, or the tuple the flush then refuses with the reason."""
        row = _switch_row(rec)
        try:
            if self._corrected is not None:
                row += self._corrected(rec)
            return self._row_format % row
        except (TypeError, ValueError):
            return row

    def write_many(self, recs: Iterable[SwitchRecord]) -> None:
        self._add_rows(map(self._line, recs))

    def write_rows(self, rows: np.ndarray) -> None:
        """Many switches as an int64 array in ``COLUMNS`` order: the lines ``write``
        gives them.  They are queued as an array (its corrected columns added) and
        formatted at the flush by Arrow's CSV writer, up to ``FLUSH_ROWS`` rows a call:
        compiled, about twice as fast as Python's int-to-text a row, but with a fixed
        cost a call that makes a call per small batch slower than Python."""
        for start in range(0, rows.shape[0], FLUSH_ROWS):   # a block stays in the cache
            block = rows[start:start + FLUSH_ROWS]
            n = block.shape[0]
            full = np.empty((n, self._row_width), np.int64)
            full[:, :len(COLUMNS)] = block
            if self._correction is not None:
                full[:, len(COLUMNS):] = self._correction.value_rows(
                    {c: block[:, i] for c, i in _CORRECTION_INPUTS.items()})
            self._rows.append(full)
            self._queued_lines += n
            self._appended += n
            if self._queued_lines >= FLUSH_ROWS:
                self._queued_lines = 0
                self._hand_over(self._appended - self.records)

    def _lines(self, items: list) -> tuple[bytes, int]:
        """The queued items as the file's bytes, and how many lines: write()'s lines as
        they are (one each), write_rows' arrays formatted together, up to ``FLUSH_ROWS``
        rows a call.  Bytes end to end: Arrow's output is written as it is, never
        decoded to str and encoded back."""
        out: list = []
        texts: list = []
        arrays: list[np.ndarray] = []
        queued = lines = 0
        for item in items:
            if isinstance(item, np.ndarray):
                if texts:
                    out.append(_join_switch_lines(texts).encode())
                    lines += len(texts)
                    texts = []
                if queued + item.shape[0] > FLUSH_ROWS and arrays:
                    out.append(self._arrow_lines(arrays))
                    arrays, queued = [], 0
                arrays.append(item)
                queued += item.shape[0]
                lines += item.shape[0]
                continue
            if arrays:
                out.append(self._arrow_lines(arrays))
                arrays, queued = [], 0
            texts.append(item)
        if arrays:
            out.append(self._arrow_lines(arrays))
        if texts:
            out.append(_join_switch_lines(texts).encode())
            lines += len(texts)
        return (out[0] if len(out) == 1 else b"".join(out)), lines

    def _arrow_lines(self, arrays: list[np.ndarray]):
        """The arrays' CSV lines (an Arrow buffer: bytes-like): an unmeasured column,
        and every corrected one when there is no correction, is a column of nulls, which
        Arrow writes as empty fields.  Columns are wrapped around the transposed block's
        memory (``from_buffers``), half the cost of ``pa.array`` a column."""
        pa, pacsv, options = _arrow_csv()
        block = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
        n = block.shape[0]
        by_column = np.ascontiguousarray(block.T)
        int64 = pa.int64()
        empty = pa.nulls(n, int64)

        def column(i):
            return pa.Array.from_buffers(int64, n, [None, pa.py_buffer(by_column[i])])
        columns = [empty if i in self._unmeasured_at else column(i)
                   for i in range(len(COLUMNS))]
        columns += ([column(i) for i in range(len(COLUMNS), block.shape[1])]
                    if self._correction is not None else [empty] * len(CORRECTED_COLUMNS))
        out = pa.BufferOutputStream()
        pacsv.write_csv(pa.RecordBatch.from_arrays(columns, names=self.meta["columns"]), out,
                        options)
        return out.getvalue()

    def close(self, stop_reason: str = "stopped", lost: dict[int, int] | None = None) -> None:
        """Flush, close the CSV and mark the meta complete.  ``lost`` is the count of
        records the kernel dropped, per CPU."""
        if self._fd < 0:
            return
        error = None
        try:
            self._close_file()
        except CaptureError as e:      # still finish the meta, saying what went wrong
            error = e
            stop_reason = f"{stop_reason}; write error: {e}"
        lost = {int(cpu): int(n) for cpu, n in (lost or {}).items()}
        acc = self.meta.get("switch_accounting")
        if isinstance(acc, dict) and not self.meta.get(FILTERED_OUT):
            # the last step of a record's way: the rows this file holds (a filter
            # leaves some out on purpose; then passed_on is the last step checked)
            acc["written"] = self.records
            acc["unaccounted"] = acc["kernel"] - acc["lost_in_kernel"] - self.records
        self.meta.update({
            "complete": True, "stop_time": utc_now(), "stop_reason": stop_reason,
            "lost_records_per_cpu": dict(sorted(lost.items())),   # JSON makes keys strings
            "lost_total": sum(lost.values()), "records": self.records,
        })
        write_json_atomic(self.meta_path, self.meta)
        if error is not None:
            raise error

    def __enter__(self) -> CaptureWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        reason = "stopped" if exc_type is None else f"error: {exc_type.__name__}: {exc}"
        self.close(stop_reason=reason.splitlines()[0] if reason else "stopped")


class CallWriter(_CsvSink):
    """The optional per-call CSV (``CALL_COLUMNS``); a None seq is an empty field."""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(path, CALL_COLUMNS)

    def write(self, rec: CallRecord) -> None:
        self._add_row(_call_row(rec))

    def write_many(self, recs: Iterable[CallRecord]) -> None:
        self._add_rows(map(_call_row, recs))

    def close(self) -> None:
        self._close_file()

    def __enter__(self) -> CallWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_CALL_SEQ = CALL_COLUMNS.index("seq")


_call_fields = attrgetter(*CALL_COLUMNS)


def _call_row(rec: CallRecord) -> tuple:
    row = _call_fields(rec)
    return row if row[_CALL_SEQ] is not None else (*row[:_CALL_SEQ], "", *row[_CALL_SEQ + 1:])


# --- reading -----------------------------------------------------------------------------
#
# Captures are untrusted input (copied between hosts, hand-edited, cut by a crash): the
# readers raise CaptureError, with a one-line message, and nothing else.  Rows before the
# first damaged one are always handed over first, so a consumer keeps what is whole.

MAX_LINE_BYTES = 64 << 10     # a row is ~300 bytes: a longer line is refused, not buffered
# A meta is a few KiB plus its kernel histograms: up to 32 (pf, vf) pairs x 4 phases of
# [bucket, count] pairs, a few MiB after a long run with wide spreads.
MAX_META_BYTES = 64 << 20

# The meta keys readers rely on and the JSON type each must have when present (null is
# always allowed): a hand-edited or foreign meta fails here, not deep in a front end.
_META_TYPES: dict[str, tuple[type, str]] = {
    **dict.fromkeys(("tool", "version", "kernel", "host", "start_time", "stop_time",
                     "stop_reason", "switch_source", "buffer", "kvm_vendor", "calls_file"),
                    (str, "a string")),
    **dict.fromkeys(("probe_modes", "floor_ns", "filters", "background", "workload",
                     "filtered_out", "kernel_histograms", "reader_gaps", "switch_accounting"),
                    (dict, "an object")),
    **dict.fromkeys(("warnings", "columns"), (list, "a list")),
    **dict.fromkeys(("budget_ns", "buffer_pages", "records", "lost_total", "partial_windows",
                     "late_releases", "late_release_ns", "orphan_releases", "late_exits",
                     "late_exit_ns", "orphan_exits", "unended_exits"), (int, "an integer")),
    "complete": (bool, "true or false"),
}


def read_meta(path: str | os.PathLike, require: bool = True) -> dict:
    """The meta file of capture ``path`` ({} when absent and not ``require``d)."""
    mp = meta_path(path)
    try:
        with _open_regular(mp) as f:
            data = f.read(MAX_META_BYTES + 1)
    except FileNotFoundError:
        if require:
            raise CaptureError(f"{mp} is missing (pass require_meta=False to read the CSV "
                               "alone)") from None
        return {}
    except OSError as e:
        raise CaptureError(f"{mp} is unreadable: {e.strerror}") from None
    if len(data) > MAX_META_BYTES:
        raise CaptureError(f"{mp} is over {MAX_META_BYTES >> 20} MiB: not a capture's meta file")
    try:
        meta = json.loads(data)
    except (ValueError, RecursionError) as e:    # RecursionError: absurdly nested JSON
        raise CaptureError(f"{mp} is unreadable: {e}".splitlines()[0]) from None
    if not isinstance(meta, dict):
        raise CaptureError(f"{mp} is not a JSON object")
    for key, (kind, name) in _META_TYPES.items():
        value = meta.get(key)
        if value is not None and (not isinstance(value, kind) or
                                  (kind is int and isinstance(value, bool))):
            raise CaptureError(f"{mp}: {key} is not {name}: {_short(value)}")
    try:
        parse_filtered_out(meta.get(FILTERED_OUT))
    except ValueError as e:
        raise CaptureError(f"{mp}: {e}") from None
    if meta.get("budget_ns") is not None and meta["budget_ns"] <= 0:
        raise CaptureError(f"{mp}: budget_ns {meta['budget_ns']} is not positive")
    lost = meta.get("lost_records_per_cpu")
    if lost is not None:                         # JSON keys are strings; the CPUs are ints
        meta["lost_records_per_cpu"] = _lost_per_cpu(mp, lost)
    return meta


def calls_path(path: str | os.PathLike, meta: dict) -> Path | None:
    """The per-call CSV the meta names, beside the capture; None when it names none or
    names anything but a plain file name (a meta is untrusted: no directory part, no
    ``..``, so a reader never opens a file elsewhere)."""
    name = meta.get("calls_file")
    if not isinstance(name, str) or not name or name in (".", "..") or \
            Path(name).name != name or "\0" in name:
        return None
    return Path(path).with_name(name)


def _open_regular(path: Path) -> BinaryIO:
    """Open for reading, refusing what is not a regular file: a FIFO planted at the path
    would block the reader for good (hence O_NONBLOCK, harmless for a regular file)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    return open(fd, "rb")


def _lost_per_cpu(mp: Path, lost) -> dict[int, int]:
    def count(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    try:
        out = {_strict_int(k): v for k, v in lost.items()}
    except (AttributeError, ValueError):
        out = None
    if out is None or not all(count(v) for v in out.values()):
        raise CaptureError(f"{mp}: lost_records_per_cpu is not a map of CPU to count")
    return out


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def header_positions(header: list[str], columns: tuple[str, ...],
                     optional: frozenset[str] = frozenset()) -> list[int | None]:
    """Where each of ``columns`` is in a capture's header (None: an optional column an
    older writer did not have, read as "0"); ValueError names what is wrong."""
    if len(set(header)) != len(header):
        dup = sorted({c for c in header if header.count(c) > 1})
        raise ValueError(f"duplicate columns in header: {', '.join(_short(c) for c in dup)}")
    missing = [c for c in columns if c not in header and c not in optional]
    if missing:
        raise ValueError(f"header lacks column(s): {', '.join(missing)}")
    return [header.index(c) if c in header else None for c in columns]


# int() also takes ' 7', '+7', '7_0' and non-ASCII digits; a capture holds none of them.
# Values are int64 (numpy and Parquet downstream): 18 digits always fit, so a row of
# such fields (one regex over the row joined by commas) takes the fast path.
_PLAIN_ROW = re.compile(r"(?:-?[0-9]{1,18},)*-?[0-9]{1,18}")
_INT = re.compile(r"-?[0-9]+")
_CALL_KIND = re.compile(r"[A-Za-z0-9_]+")
_SEQ_AT = CALL_COLUMNS.index("seq")
# A call row's numbers, seq (outside a switch) possibly empty.
_PLAIN_CALL_NUMBERS = re.compile(r"(?:-?[0-9]{1,18},){%d}(?:-?[0-9]{1,18})?(?:,-?[0-9]{1,18})*"
                                 % (_SEQ_AT - 1))


def _strict_int(text: str) -> int:
    """A plain decimal int64, or ValueError."""
    if not isinstance(text, str) or not _INT.fullmatch(text) or len(text) > 20:
        raise ValueError(text)
    value = int(text)
    if not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(text)
    return value


def _first_bad(columns: tuple[str, ...], fields: list[str]) -> tuple[str, str]:
    for name, value in zip(columns, fields):
        try:
            _strict_int(value)
        except ValueError:
            return name, value
    return columns[0], fields[0]                # not reached for a row that failed


# Where an empty field is a column the recorder did not measure (read as 0; the meta's
# ``unmeasured`` says which): only there.  Identity and the switch time are never empty.
_MAY_BE_EMPTY = tuple(i for i, c in enumerate(COLUMNS) if c in MAY_BE_UNMEASURED)


def switch_from_fields(fields: list[str]) -> SwitchRecord:
    """A SwitchRecord from its fields in ``COLUMNS`` order; ValueError names the first
    field that is not a plain int64."""
    if "" in fields:
        fields = list(fields)
        for i in _MAY_BE_EMPTY:
            if fields[i] == "":
                fields[i] = "0"
    try:
        if _PLAIN_ROW.fullmatch(",".join(fields)):
            return SwitchRecord(*map(int, fields))
        return SwitchRecord(*map(_strict_int, fields))
    except ValueError:                           # '', '-', '1-2': name the field
        name, value = _first_bad(COLUMNS, fields)
        raise ValueError(f"column {name} is not an integer: {_short(value)}") from None


def call_from_fields(fields: list[str]) -> CallRecord:
    """A CallRecord from its fields in ``CALL_COLUMNS`` order (an empty seq is None);
    ValueError names the first bad field."""
    kind, *nums = fields
    if not _CALL_KIND.fullmatch(kind):
        raise ValueError(f"column kind is not a call kind: {_short(kind)}")
    if _PLAIN_CALL_NUMBERS.fullmatch(",".join(nums)):
        seq = nums[_SEQ_AT - 1]
        if seq:
            return CallRecord(kind, *map(int, nums))
        return CallRecord(kind, *map(int, nums[:_SEQ_AT - 1]), None,
                          *map(int, nums[_SEQ_AT:]))
    values: list[int | None] = []
    for i, value in enumerate(nums, start=1):
        if i == _SEQ_AT and value == "":
            values.append(None)
            continue
        try:
            values.append(_strict_int(value))
        except ValueError:
            raise ValueError(f"column {CALL_COLUMNS[i]} is not an integer: "
                             f"{_short(value)}") from None
    return CallRecord(kind, *values)


class _LineCount:
    """Where ``_text_lines`` is: the line number and whether that line was whole."""
    number = 0
    whole = True


_BLOCK_BYTES = 1 << 20


def _text_lines(f, path: Path, at: _LineCount) -> Iterator[str]:
    """The file's lines without their newline, decoded a block at a time (damage further
    on does not hide the lines before it), each at most ``MAX_LINE_BYTES``; a last line
    without its newline comes last with ``at.whole`` false."""
    rest = b""
    while block := f.read(_BLOCK_BYTES):
        data = rest + block                      # rest is short: the copy is bounded
        end = data.rfind(b"\n") + 1
        rest = data[end:]
        if end:
            yield from _decoded(data[:end - 1].split(b"\n"), path, at)
        if len(rest) > MAX_LINE_BYTES:
            raise _overlong(path, at.number + 1)
    if rest:
        at.whole = False
        yield from _decoded([rest], path, at)


def _decoded(raw_lines: list[bytes], path: Path, at: _LineCount) -> Iterator[str]:
    for raw in raw_lines:
        at.number += 1
        if len(raw) > MAX_LINE_BYTES:
            raise _overlong(path, at.number)
        try:
            yield raw.decode()
        except UnicodeDecodeError:
            raise CaptureError(f"{path}: line {at.number} is not text (binary data?)") from None


def _overlong(path: Path, line: int) -> CaptureError:
    return CaptureError(f"{path}: line {line} is over {MAX_LINE_BYTES >> 10} KiB: not a "
                        "capture row")


def _rows(path: Path, columns: tuple[str, ...], problems: list[str] | None,
          optional: frozenset[str] = frozenset()) -> Iterator[tuple[int, list[str]]]:
    """Yield (line number, fields in ``columns`` order) for each whole row.

    The header is CSV (quoted names are fine); a row holds integers and plain words,
    never quoted, so it is split on commas.  A last line without its newline is a row
    cut by a crash or a writer still going: it is skipped and noted in ``problems``.
    Anything else malformed is an error."""
    try:
        f = _open_regular(path)
    except OSError as e:
        raise CaptureError(f"cannot read {path}: {e.strerror}") from None
    with f:
        at = _LineCount()
        lines = _text_lines(f, path, at)
        first = next(lines, None)
        if first is None:
            raise CaptureError(f"{path}: empty file, no header")
        if not at.whole:
            raise CaptureError(f"{path}: the header line is cut short")
        crlf = first.endswith("\r")
        try:
            header = next(csv.reader([first.removeprefix("\ufeff").removesuffix("\r")]), [])
            where = header_positions(header, columns, optional)
        except (csv.Error, ValueError) as e:
            raise CaptureError(f"{path}: {e}") from None
        width, n = len(header), len(columns)
        # as vftrace writes it: no reordering, derived columns (if any) after them
        in_order = where == list(range(n))
        for line in lines:
            if not at.whole:
                if problems is not None:
                    problems.append(f"line {at.number}: truncated last line ignored")
                return
            if crlf:
                line = line.removesuffix("\r")
            if not line:
                continue
            fields = line.split(",")
            if len(fields) != width:
                raise CaptureError(f"{path}: line {at.number}: {len(fields)} fields, "
                                   f"header has {width}")
            yield at.number, (fields[:n] if in_order else
                              [fields[i] if i is not None else "0" for i in where])


def iter_capture(path: str | os.PathLike,
                 problems: list[str] | None = None) -> Iterator[SwitchRecord]:
    """Stream the switch records of a capture CSV (the meta file is not needed)."""
    path = Path(path)
    plain = _PLAIN_ROW.fullmatch
    for line, fields in _rows(path, COLUMNS, problems, COLUMNS_ADDED):
        if plain(",".join(fields)):    # fields hold no comma: each is 1-18 digits, an int64
            yield SwitchRecord(*map(int, fields))
            continue
        try:
            rec = switch_from_fields(fields)
        except ValueError as e:
            raise CaptureError(f"{path}: line {line}: {e}") from None
        yield rec


def read_capture(path: str | os.PathLike, require_meta: bool = True
                 ) -> tuple[dict, list[SwitchRecord], list[str]]:
    """(meta, records, problems): problems are what was tolerated (a cut last line, a
    capture whose recorder never closed it, a row count differing from the meta)."""
    path = Path(path)
    meta = read_meta(path, require=require_meta)
    problems = meta_problems(path, meta)
    records = list(iter_capture(path, problems))
    problems += count_problems(meta, len(records))
    return meta, records, problems


def meta_problems(path: Path, meta: dict) -> list[str]:
    """What a capture's meta says is wrong with it before its rows are read."""
    if not meta:
        return [f"no meta file ({meta_path(path).name})"]
    if not meta.get("complete"):
        return ["capture is not complete: the recorder did not close it"]
    return []


def count_problems(meta: dict, rows: int) -> list[str]:
    """A complete capture whose row count is not the one its meta gives."""
    if meta.get("complete") and meta.get("records") not in (None, rows):
        return [f"meta says {meta['records']} records, the CSV has {rows}"]
    return []



def iter_calls(path: str | os.PathLike,
               problems: list[str] | None = None) -> Iterator[CallRecord]:
    """Stream a per-call CSV."""
    path = Path(path)
    for line, fields in _rows(path, CALL_COLUMNS, problems, CALL_COLUMNS_ADDED):
        try:
            rec = call_from_fields(fields)
        except ValueError as e:
            raise CaptureError(f"{path}: line {line}: {e}") from None
        yield rec
