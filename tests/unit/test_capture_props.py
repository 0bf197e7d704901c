"""Property tests: captures are untrusted input for the reader and the follow parser.

Whatever the bytes, ``tracer.capture.files``'s readers raise nothing but ``CaptureError``, and
every whole row before the damage comes back intact (compared with the rows of the
undamaged capture); the follow parser (``tui.sources``) never raises at all, skips what
is malformed, and never buffers a line without bound.
"""
from __future__ import annotations

import ctypes
import json
import re
import tempfile
import tracemalloc
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tracer.capture.files import (MAX_LINE_BYTES, CaptureError, iter_calls, iter_capture,
                            meta_path, read_capture, read_meta)
from tracer.model.schema import (CALL_COLUMNS, CALL_COLUMNS_ADDED, COLUMNS, COLUMNS_ADDED,
                                 MAY_BE_UNMEASURED)
from tui.sources import (HeaderInfo, LineParser, Tailer, lost_from_meta,
                         parse_call, parse_switch)

DATA = Path(__file__).resolve().parents[1] / "data"
ROWS = 30                       # enough rows for damage to land before, in and after


def head(path: Path, rows: int = ROWS) -> bytes:
    with open(path, "rb") as f:
        return b"".join(f.readline() for _ in range(rows + 1))


def current_format(data: bytes) -> bytes:
    """small.csv predates the ``COLUMNS_ADDED``: its rows with them, as written now."""
    lines = data.decode().splitlines()
    added = [c for c in COLUMNS if c in COLUMNS_ADDED]
    rows = [line + "," + ",".join(str((i + k) % 3) for k in range(len(added)))
            for i, line in enumerate(lines[1:])]
    return "\n".join([lines[0] + "," + ",".join(added), *rows, ""]).encode()


SWITCHES = current_format(head(DATA / "small.csv"))
CALLS = head(DATA / "small.calls.csv")
SWITCH_LINES = SWITCHES.splitlines(keepends=True)
CALL_LINES = CALLS.splitlines(keepends=True)
# Which line (0: the header) each byte offset falls in.
LINE_AT = [i for i, line in enumerate(SWITCH_LINES) for _ in line]

PROPS = settings(max_examples=150, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture,
                                        HealthCheck.too_slow])


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


def put(directory: Path, data: bytes, name: str = "cap.csv") -> Path:
    path = directory / name
    path.write_bytes(data)
    meta_path(path).unlink(missing_ok=True)
    return path


def read_until_error(reader) -> tuple[list, CaptureError | None]:
    """What a reader hands over before it stops, and the CaptureError it stopped with.
    Any other exception fails the test."""
    got = []
    try:
        for item in reader:
            got.append(item)
    except CaptureError as e:
        assert "\n" not in str(e), e              # one line, for `vftrace X: error: ...`
        return got, e
    return got, None


def whole_rows_before(offset: int) -> int:
    """Rows wholly before the line that byte ``offset`` falls in."""
    return max(LINE_AT[offset] - 1, 0) if offset < len(LINE_AT) else len(SWITCH_LINES) - 1


@pytest.fixture(scope="module")
def expected(scratch):
    switches, error = read_until_error(iter_capture(put(scratch, SWITCHES, "ok.csv")))
    calls, call_error = read_until_error(iter_calls(put(scratch, CALLS, "ok.calls.csv")))
    assert error is None and call_error is None
    assert len(switches) == ROWS and len(calls) == ROWS
    return switches, calls


# --- the reader -------------------------------------------------------------------------

@PROPS
@given(data=st.binary(max_size=4096))
def test_arbitrary_bytes_only_ever_give_capture_error(scratch, data):
    path = put(scratch, data)
    for reader in (iter_capture(path), iter_calls(path)):
        read_until_error(reader)
    try:
        read_capture(path, require_meta=False)
    except CaptureError:
        pass


@PROPS
@given(st.data())
def test_a_capture_cut_at_any_byte_gives_its_whole_rows(scratch, expected, data):
    cut = data.draw(st.integers(0, len(SWITCHES)))
    path = put(scratch, SWITCHES[:cut])
    problems: list[str] = []
    got, error = read_until_error(iter_capture(path, problems))
    header_len = len(SWITCH_LINES[0])
    if cut < header_len:                          # no whole header: not a capture yet
        assert error is not None and got == []
        return
    assert error is None
    whole = SWITCHES[:cut].count(b"\n") - 1
    assert got == expected[0][:whole]
    assert bool(problems) == (not SWITCHES[:cut].endswith(b"\n"))


@PROPS
@given(st.data())
def test_a_per_call_file_cut_at_any_byte_gives_its_whole_rows(scratch, expected, data):
    cut = data.draw(st.integers(len(CALL_LINES[0]), len(CALLS)))
    got, error = read_until_error(iter_calls(put(scratch, CALLS[:cut], "c.calls.csv")))
    assert error is None
    assert got == expected[1][:CALLS[:cut].count(b"\n") - 1]


@PROPS
@given(st.data())
def test_damage_anywhere_keeps_every_whole_row_before_it(scratch, expected, data):
    offset = data.draw(st.integers(len(SWITCH_LINES[0]), len(SWITCHES)))
    junk = data.draw(st.binary(min_size=1, max_size=64) |
                     st.text(max_size=64).map(str.encode) |
                     st.sampled_from([b"\x00", b"\r", b'"', b",", b"\xff\xfe", b"-",
                                      b"1_0", b" 7", b"+7", "\u0663".encode()]))
    damaged = SWITCHES[:offset] + junk + SWITCHES[offset:]
    got, _ = read_until_error(iter_capture(put(scratch, damaged)))
    before = whole_rows_before(offset)
    assert got[:before] == expected[0][:before]


# What int() would take but no vftrace writer writes, and what does not fit int64.
NOT_PLAIN_INTS = st.sampled_from([" 7", "7 ", "+7", "7_0", "\u0663", "1e3", "0x1f", "7.0",
                                  "--7", "-", "", "9" * 19, "-" + "9" * 20, "1" * 5000])


@PROPS
@given(st.data())
def test_a_field_that_is_not_a_plain_integer_stops_the_reader_at_its_row(scratch, expected,
                                                                          data):
    row = data.draw(st.integers(1, ROWS))
    column = data.draw(st.integers(0, len(COLUMNS) - 1))
    bad = data.draw(NOT_PLAIN_INTS | st.text(max_size=12).filter(
        lambda t: not re.fullmatch(r"-?[0-9]+", t)))
    fields = SWITCH_LINES[row].decode().rstrip("\n").split(",")
    fields[column] = bad
    lines = [line.decode() for line in SWITCH_LINES]
    lines[row] = ",".join(fields) + "\n"
    got, error = read_until_error(iter_capture(put(scratch, "".join(lines).encode())))
    if bad == "" and COLUMNS[column] in MAY_BE_UNMEASURED:
        # An empty field there is a column the recorder did not measure: read as 0.
        assert error is None and got[row - 1] == replace(expected[0][row - 1],
                                                         **{COLUMNS[column]: 0})
        return
    assert error is not None                     # never read as some other number
    assert got == expected[0][:row - 1]


@PROPS
@given(st.permutations(range(len(COLUMNS))))
def test_columns_in_any_order_read_the_same(scratch, expected, order):
    table = [line.decode().rstrip("\n").split(",") for line in SWITCH_LINES]
    text = "".join(",".join(row[i] for i in order) + "\n" for row in table)
    got, error = read_until_error(iter_capture(put(scratch, text.encode())))
    assert error is None and got == expected[0]


@PROPS
@given(st.data())
def test_a_dropped_or_renamed_column_is_an_error_that_names_it(scratch, data):
    table = [line.decode().rstrip("\n").split(",") for line in SWITCH_LINES]
    # an added column is optional (an older capture lacks it): dropping it is no error
    column = data.draw(st.sampled_from([i for i, c in enumerate(COLUMNS)
                                        if c not in COLUMNS_ADDED]))
    if data.draw(st.booleans()):
        table = [row[:column] + row[column + 1:] for row in table]
    else:
        new_name = data.draw(st.from_regex(r"[a-z_]{1,12}", fullmatch=True))
        assume(new_name not in COLUMNS)
        table[0][column] = new_name
    got, error = read_until_error(
        iter_capture(put(scratch, "".join(",".join(r) + "\n" for r in table).encode())))
    assert got == [] and error is not None and COLUMNS[column] in str(error)


@PROPS
@given(st.sets(st.sampled_from(sorted(CALL_COLUMNS_ADDED))))
def test_old_call_files_without_the_added_columns_read_them_as_zero(scratch, expected,
                                                                    dropped):
    table = [line.decode().rstrip("\n").split(",") for line in CALL_LINES]
    keep = [i for i, name in enumerate(CALL_COLUMNS) if name not in dropped]
    text = "".join(",".join(row[i] for i in keep) + "\n" for row in table)
    got, error = read_until_error(iter_calls(put(scratch, text.encode(), "o.calls.csv")))
    assert error is None and len(got) == ROWS
    for old, new in zip(expected[1], got):
        for name in CALL_COLUMNS:
            want = 0 if name in dropped else getattr(old, name)
            assert getattr(new, name) == want, name


def test_a_10_mb_line_is_refused_without_being_read_whole(scratch, expected):
    path = scratch / "huge.csv"
    with open(path, "wb") as f:
        f.write(b"".join(SWITCH_LINES[:6]) + b"7" * (10 << 20) + b"\n" +
                b"".join(SWITCH_LINES[6:]))
    tracemalloc.start()
    try:
        got, error = read_until_error(iter_capture(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got == expected[0][:5]
    assert error is not None and "line 7 is over 64 KiB" in str(error)
    assert peak < 4 << 20, peak                   # a block or two, not the 10 MB line


# --- the meta file ----------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)
META_KEYS = ("kernel", "switch_source", "probe_modes", "floor_ns", "budget_ns", "filters",
             "warnings", "kvm_vendor", "calls_file", "background", "lost_records_per_cpu",
             "lost_total", "records", "stop_reason", "complete", "columns", "filtered_out")
metas = st.dictionaries(st.sampled_from(META_KEYS) | st.text(max_size=8), json_values,
                        max_size=8)


def meta_is_usable(meta: dict) -> None:
    """What the dashboard and the report do with an accepted meta must not raise."""
    HeaderInfo.from_meta(meta, "test")
    lost_from_meta(meta)
    from tracer.capture.files import calls_path
    from tracer.model.stats import Stats
    calls = calls_path(Path("d/x.csv"), meta)             # beside the capture, or none
    assert calls is None or calls.parent == Path("d")
    Stats().account(meta.get("filtered_out"))            # read_meta checked it
    assert meta.get("budget_ns") is None or meta["budget_ns"] > 0


@PROPS
@given(raw=st.binary(max_size=512) | metas.map(lambda m: json.dumps(m).encode()) |
       json_values.map(lambda v: json.dumps(v).encode()))
def test_any_meta_file_is_read_or_refused_in_one_line(scratch, raw):
    path = put(scratch, b"".join(SWITCH_LINES[:3]))
    meta_path(path).write_bytes(raw)
    try:
        meta = read_meta(path)
    except CaptureError as e:
        assert "\n" not in str(e)
        return
    assert isinstance(meta, dict)
    meta_is_usable(meta)
    lost = meta.get("lost_records_per_cpu")
    assert lost is None or all(isinstance(k, int) for k in lost)


@pytest.mark.parametrize("raw, says", [
    (None, "is missing"),
    (b"", "is unreadable"),
    (b"{\"complete\": tru", "is unreadable"),
    (b"[" * 100_000 + b"]" * 100_000, "is unreadable"),
    (b"\xff\xfe\x00garbage", "is unreadable"),
    (b"[1, 2]", "is not a JSON object"),
    (b"\"text\"", "is not a JSON object"),
    (b"{\"budget_ns\": \"fast\"}", "budget_ns is not an integer: 'fast'"),
    (b"{\"budget_ns\": true}", "budget_ns is not an integer: True"),
    (b"{\"probe_modes\": 3}", "probe_modes is not an object: 3"),
    (b"{\"warnings\": \"w\"}", "warnings is not a list"),
    (b"{\"complete\": 1}", "complete is not true or false"),
    (b"{\"lost_records_per_cpu\": {\"cpu0\": 1}}", "lost_records_per_cpu is not a map"),
    (b"{\"lost_records_per_cpu\": {\"0\": -1}}", "lost_records_per_cpu is not a map"),
    (b"{\"lost_records_per_cpu\": [1]}", "lost_records_per_cpu is not a map"),
])
def test_a_missing_or_corrupt_meta_is_one_capture_error(scratch, raw, says):
    path = put(scratch, b"".join(SWITCH_LINES[:3]))
    if raw is not None:
        meta_path(path).write_bytes(raw)
    with pytest.raises(CaptureError) as err:
        read_capture(path)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_a_huge_meta_is_refused_before_it_is_parsed(scratch):
    path = put(scratch, b"".join(SWITCH_LINES[:3]))
    meta_path(path).write_bytes(b"{\"warnings\": [\"" + b"w" * (65 << 20) + b"\"]}")
    with pytest.raises(CaptureError, match="is over 64 MiB"):
        read_meta(path)


# --- the follow parser ------------------------------------------------------------------

def follow(path: Path, columns=COLUMNS, parse=parse_switch, optional=frozenset()) -> Tailer:
    return Tailer(path, columns, parse, optional)


def poll_all(tailer: Tailer) -> tuple[list, int]:
    records, bad = [], 0
    while True:
        got, problems, n_bad, _ = tailer.poll()
        assert all("\n" not in p for p in problems)
        records += got
        bad += n_bad
        if tailer.at_eof:
            return records, bad


@PROPS
@given(chunks=st.lists(st.binary(max_size=300), max_size=8))
def test_following_arbitrary_bytes_never_raises(scratch, chunks):
    path = put(scratch, b"")
    for columns, parse, optional in ((COLUMNS, parse_switch, frozenset()),
                                     (CALL_COLUMNS, parse_call, CALL_COLUMNS_ADDED)):
        path.write_bytes(b"")
        tailer = follow(path, columns, parse, optional)
        for chunk in chunks:
            with open(path, "ab") as f:
                f.write(chunk)
            poll_all(tailer)
        tailer.close()


@PROPS
@given(st.data())
def test_following_a_capture_written_in_any_pieces_gives_every_row(scratch, expected, data):
    cuts = sorted(data.draw(st.lists(st.integers(0, len(SWITCHES)), max_size=10)))
    path = put(scratch, b"")
    tailer = follow(path)
    records, last = [], 0
    for cut in [*cuts, len(SWITCHES)]:
        with open(path, "ab") as f:
            f.write(SWITCHES[last:cut])
        last = cut
        got, bad = poll_all(tailer)
        assert bad == 0
        records += got
        assert records == expected[0][:max(SWITCHES[:cut].count(b"\n") - 1, 0)]
    tailer.close()
    assert records == expected[0]


@PROPS
@given(st.data())
def test_following_damage_skips_it_and_keeps_the_rows_around_it(scratch, expected, data):
    offset = data.draw(st.integers(len(SWITCH_LINES[0]), len(SWITCHES)))
    junk = data.draw(st.binary(min_size=1, max_size=64))
    path = put(scratch, SWITCHES[:offset] + junk + SWITCHES[offset:])
    tailer = follow(path)
    records, _ = poll_all(tailer)
    tailer.close()
    before = whole_rows_before(offset)
    assert records[:before] == expected[0][:before]
    # The rows after the damaged line are not lost either.
    after = [r for r in expected[0][before:] if r in records[before:]]
    assert len(after) >= ROWS - before - 1       # only the damaged line is lost


def test_following_a_line_that_never_ends_holds_a_bounded_buffer(scratch, expected):
    path = put(scratch, b"".join(SWITCH_LINES[:4]))
    tailer = follow(path)
    assert len(poll_all(tailer)[0]) == 3
    tracemalloc.start()
    try:
        for _ in range(20):                       # a writer gone mad: 20 MB, no newline
            with open(path, "ab") as f:
                f.write(b"9" * (1 << 20))
            poll_all(tailer)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak                   # without the bound: the whole 20 MB
    with open(path, "ab") as f:                   # the line ends; rows follow again
        f.write(b"\n" + b"".join(SWITCH_LINES[4:]))
    records, bad = poll_all(tailer)
    tailer.close()
    assert records == expected[0][3:]


def test_an_overlong_line_is_counted_once_as_malformed(scratch, expected):
    path = put(scratch, b"".join(SWITCH_LINES[:4]))
    tailer = follow(path)
    poll_all(tailer)
    bad_total = 0
    for _ in range(3):
        with open(path, "ab") as f:
            f.write(b"5" * (MAX_LINE_BYTES // 2 + 1))
        bad_total += poll_all(tailer)[1]
    with open(path, "ab") as f:
        f.write(b"\n" + SWITCH_LINES[4])
    records, bad = poll_all(tailer)
    tailer.close()
    assert bad_total + bad == 1 and records == [expected[0][3]]


@PROPS
@given(header=st.lists(st.text(max_size=10), max_size=40), line=st.text(max_size=200))
def test_the_line_parser_raises_only_value_error(header, line):
    for columns, parse, optional in ((COLUMNS, parse_switch, frozenset()),
                                     (CALL_COLUMNS, parse_call, CALL_COLUMNS_ADDED)):
        for make in (lambda: LineParser(header, columns, optional),
                     lambda: LineParser.from_line(",".join(header), columns, optional)):
            try:
                parser = make()
            except ValueError:
                continue
            try:
                parse(parser.fields(line))
            except ValueError:
                pass


# ---- the writer writes only what the reader reads ---------------------------------------

def _record_sizes() -> tuple[int, int]:
    from tracer.kernel import layout
    h = layout.header()
    return ctypes.sizeof(h.structs["vft_switch"]), ctypes.sizeof(h.structs["vft_call"])


SWITCH_SIZE, CALL_SIZE = _record_sizes()


def _tame(raw: bytes) -> bytes:
    """The same record with every 64-bit word's top byte cut to 4 bits: in range."""
    return bytes(b & 0x0F if i % 8 == 7 else b for i, b in enumerate(raw))


@PROPS
@given(switches=st.lists(st.binary(min_size=SWITCH_SIZE, max_size=SWITCH_SIZE), max_size=5),
       calls=st.lists(st.binary(min_size=CALL_SIZE, max_size=CALL_SIZE), max_size=5),
       tame=st.booleans())
def test_the_writer_never_writes_what_the_reader_rejects(scratch, switches, calls, tame):
    """Whatever bytes the kernel hands over, each record is written so that it reads
    back the same, or is counted out of range and not written: the reader never
    refuses a capture of ours (a wrapped negative once did, and lost the whole run)."""
    from tracer.capture.files import CallWriter, CaptureWriter
    from tracer.kernel.engine import Engine
    from tracer.kernel.probes import Plan
    if tame:
        switches, calls = list(map(_tame, switches)), list(map(_tame, calls))
    got, got_calls = [], []
    engine = Engine(Plan("pf_sched", "raw_tp"), budget_ns=100, on_switch=got.append,
                    on_call=got_calls.append)
    for raw in switches:
        engine._on_switch(raw)
    for raw in calls:
        engine._on_call(raw)
    engine.assembler.flush()
    assert len(got) + len(got_calls) + engine.out_of_range == len(switches) + len(calls)
    if tame:
        assert engine.out_of_range == 0
    path, calls_path = scratch / "writer.csv", scratch / "writer.calls.csv"
    with CaptureWriter(path, {}) as w, CallWriter(calls_path) as cw:
        for rec in got:
            w.write(rec)
        for rec in got_calls:
            cw.write(rec)
    meta, rows, problems = read_capture(path)
    assert not problems and rows == got
    assert list(iter_calls(calls_path)) == got_calls
