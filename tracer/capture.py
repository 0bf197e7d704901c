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
import io
import json
import os
import platform
import socket
import threading
from datetime import datetime, timezone
from operator import attrgetter
from pathlib import Path
from typing import Iterable, Iterator

from tracer import __version__
from tracer.schema import CALL_COLUMNS, COLUMNS, CallRecord, SwitchRecord

FLUSH_S = 0.5
FLUSH_ROWS = 2048       # ~250 KiB of switch rows per write


class CaptureError(Exception):
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
        _write_all(fd, (json.dumps(obj, indent=2, default=_jsonable) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _jsonable(value):
    """Filters arrive as sets; JSON has lists."""
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


class _CsvSink:
    """Whole-line, periodically flushed CSV output shared by both writers.

    Rows are queued as tuples and formatted in bulk at each flush, then written with
    one ``write`` so the file only ever grows by whole lines."""

    def __init__(self, path: str | os.PathLike, columns: tuple[str, ...]) -> None:
        self.path = Path(path)
        self.records = 0                         # rows in the file so far
        self._fd = _open_new(self.path)
        self._rows: list[tuple] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._error: Exception | None = None     # a flush failure in the timer thread
        self._emit(_csv_text([columns]))
        # A timer thread keeps a follower up to date when records stop arriving.
        self._flusher = threading.Thread(target=self._flush_loop, daemon=True,
                                         name=f"flush {self.path.name}")
        self._flusher.start()

    def _format(self, rows: list[tuple]) -> str:
        return _csv_text(rows)

    def _add_row(self, row: tuple) -> None:
        with self._lock:
            self._check()
            self._rows.append(row)
            if len(self._rows) >= FLUSH_ROWS:
                self._flush_locked()

    def _add_rows(self, rows: Iterable[tuple]) -> None:
        with self._lock:
            self._check()
            self._rows.extend(rows)
            if len(self._rows) >= FLUSH_ROWS:
                self._flush_locked()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if self._fd < 0:
            raise CaptureError(f"{self.path} is closed")

    def _flush_loop(self) -> None:
        while not self._closed.wait(FLUSH_S):
            try:
                self.flush()
            except Exception as e:        # reported to the writing thread instead
                self._error = e
                return

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if self._fd < 0 or not self._rows:
            return
        rows, self._rows = self._rows, []
        try:
            text = self._format(rows)
        except (TypeError, ValueError) as e:
            raise CaptureError(f"{self.path}: a row is not all integers ({e}); "
                               f"{len(rows)} rows dropped") from None
        self._emit(text)
        self.records += len(rows)

    def _emit(self, text: str) -> None:
        try:
            _write_all(self._fd, text.encode())
        except OSError as e:
            raise CaptureWriteError(f"cannot write {self.path}: {e.strerror}") from None

    def _close_file(self) -> None:
        self._closed.set()
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
_SWITCH_ROW_FORMAT = ",".join(["%d"] * len(COLUMNS)) + "\n"
_switch_row = attrgetter(*COLUMNS)


def format_switch_rows(rows: list[tuple]) -> str:
    fmt = _SWITCH_ROW_FORMAT
    return "".join([fmt % row for row in rows])


class CaptureWriter(_CsvSink):
    """Writes ``path`` (the switch CSV) and its meta file.

    ``meta`` gives the run's description (``switch_source``, ``probe_modes``,
    ``floor_ns``, ``budget_ns``, ``filters``...); tool, version, kernel, host,
    start_time and columns are filled in when not given.
    """

    def __init__(self, path: str | os.PathLike, meta: dict) -> None:
        self.meta_path = meta_path(path)
        if self.meta_path.is_symlink():
            raise CaptureError(f"refusing to write {self.meta_path}: it is a symlink")
        self.meta = {
            "tool": "vftrace", "version": __version__, "kernel": platform.release(),
            "host": socket.gethostname(), "start_time": utc_now(),
            "switch_source": None, "probe_modes": {}, "floor_ns": {}, "budget_ns": None,
            "filters": {}, **meta, "columns": list(COLUMNS), "complete": False,
        }
        super().__init__(path, COLUMNS)
        self._format = format_switch_rows
        try:
            write_json_atomic(self.meta_path, self.meta)
        except BaseException:
            self._close_file()
            raise

    def write(self, rec: SwitchRecord) -> None:
        self._add_row(_switch_row(rec))

    def write_many(self, recs: Iterable[SwitchRecord]) -> None:
        self._add_rows(map(_switch_row, recs))

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


def _call_row(rec: CallRecord) -> tuple:
    row = rec.as_row()
    return row if row[_CALL_SEQ] is not None else (*row[:_CALL_SEQ], "", *row[_CALL_SEQ + 1:])


# --- reading -----------------------------------------------------------------------------

def read_meta(path: str | os.PathLike, require: bool = True) -> dict:
    mp = meta_path(path)
    try:
        meta = json.loads(mp.read_text())
    except FileNotFoundError:
        if require:
            raise CaptureError(f"{mp} is missing (pass require_meta=False to read the CSV "
                               "alone)") from None
        return {}
    except (OSError, ValueError) as e:
        raise CaptureError(f"{mp} is unreadable: {e}".splitlines()[0]) from None
    if not isinstance(meta, dict):
        raise CaptureError(f"{mp} is not a JSON object")
    lost = meta.get("lost_records_per_cpu")
    if isinstance(lost, dict):   # JSON keys are strings; the CPUs are ints
        meta["lost_records_per_cpu"] = {int(k): v for k, v in lost.items()}
    return meta


def header_positions(header: list[str], columns: tuple[str, ...],
                     optional: frozenset[str] = frozenset()) -> list[int | None]:
    """Where each of ``columns`` is in a capture's header (None: an optional column an
    older writer did not have, read as "0"); ValueError names what is wrong."""
    if len(set(header)) != len(header):
        dup = sorted({c for c in header if header.count(c) > 1})
        raise ValueError(f"duplicate columns in header: {', '.join(dup)}")
    missing = [c for c in columns if c not in header and c not in optional]
    if missing:
        raise ValueError(f"header lacks column(s): {', '.join(missing)}")
    return [header.index(c) if c in header else None for c in columns]


def _rows(path: Path, columns: tuple[str, ...], problems: list[str] | None,
          optional: frozenset[str] = frozenset()) -> Iterator[tuple[int, list[str]]]:
    """Yield (line number, fields in ``columns`` order) for each whole row.

    A last line without its newline is a row cut by a crash or a writer still going:
    it is skipped and noted in ``problems``.  Anything else malformed is an error."""
    try:
        f = open(path, newline="")
    except OSError as e:
        raise CaptureError(f"cannot read {path}: {e.strerror}") from None
    with f:
        last_whole = [True]

        def lines():
            for line in f:
                last_whole[0] = line.endswith("\n")
                yield line

        reader = csv.reader(lines())
        header = next(reader, None)
        if header is None:
            raise CaptureError(f"{path}: empty file, no header")
        if not last_whole[0]:
            raise CaptureError(f"{path}: the header line is cut short")
        try:
            where = header_positions(header, columns, optional)
        except ValueError as e:
            raise CaptureError(f"{path}: {e}") from None
        width = len(header)
        for fields in reader:
            if not last_whole[0]:
                if problems is not None:
                    problems.append(f"line {reader.line_num}: truncated last line ignored")
                return
            if not fields:
                continue
            if len(fields) != width:
                raise CaptureError(f"{path}: line {reader.line_num}: {len(fields)} fields, "
                                   f"header has {width}")
            yield reader.line_num, [fields[i] if i is not None else "0" for i in where]


def _bad(path: Path, line: int, column: str, value: str) -> CaptureError:
    return CaptureError(f"{path}: line {line}: column {column} is not an integer: {value!r}")


def iter_capture(path: str | os.PathLike,
                 problems: list[str] | None = None) -> Iterator[SwitchRecord]:
    """Stream the switch records of a capture CSV (the meta file is not needed)."""
    path = Path(path)
    for line, fields in _rows(path, COLUMNS, problems):
        try:
            yield SwitchRecord(*map(int, fields))
        except ValueError:
            for name, value in zip(COLUMNS, fields):
                try:
                    int(value)
                except ValueError:
                    raise _bad(path, line, name, value) from None
            raise


def read_capture(path: str | os.PathLike, require_meta: bool = True
                 ) -> tuple[dict, list[SwitchRecord], list[str]]:
    """(meta, records, problems): problems are what was tolerated (a cut last line, a
    capture whose recorder never closed it, a row count differing from the meta)."""
    path = Path(path)
    meta = read_meta(path, require=require_meta)
    problems: list[str] = []
    if not meta:
        problems.append(f"no meta file ({meta_path(path).name})")
    elif not meta.get("complete"):
        problems.append("capture is not complete: the recorder did not close it")
    records = list(iter_capture(path, problems))
    if meta.get("complete") and meta.get("records") not in (None, len(records)):
        problems.append(f"meta says {meta['records']} records, the CSV has {len(records)}")
    return meta, records, problems


CALL_COLUMNS_ADDED = frozenset({"tid", "vcpu", "pf"})   # absent from 0.1.0's call files


def iter_calls(path: str | os.PathLike,
               problems: list[str] | None = None) -> Iterator[CallRecord]:
    """Stream a per-call CSV."""
    path = Path(path)
    for line, (kind, *nums) in _rows(path, CALL_COLUMNS, problems, CALL_COLUMNS_ADDED):
        values = []
        for name, value in zip(CALL_COLUMNS[1:], nums):
            if name == "seq" and value == "":
                values.append(None)
                continue
            try:
                values.append(int(value))
            except ValueError:
                raise _bad(path, line, name, value) from None
        yield CallRecord(kind, *values)
