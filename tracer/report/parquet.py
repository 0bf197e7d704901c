"""``vftrace export --parquet``: a capture as Parquet for large-capture analysis
(pandas, polars, DuckDB read it column by column, typed, compressed).

Schema: the CSV's columns in ``COLUMNS`` order, all int64; the capture's meta goes
into the file's key-value metadata under ``vftrace.meta`` (JSON), so the file stands
alone.  Per-call rows (``--calls-parquet``) keep ``kind`` as a string and ``seq`` as a
nullable int64 (no switch = null).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np

from tracer.model.schema import CALL_COLUMNS, COLUMNS, CallRecord, SwitchRecord

META_KEY = b"vftrace.meta"
ROW_GROUP = 131072


def _schema(fields, meta: dict):
    import pyarrow as pa
    return pa.schema(fields, metadata={META_KEY: json.dumps(meta, default=str).encode()})


def switch_schema(meta: dict):
    import pyarrow as pa
    return _schema([(name, pa.int64()) for name in COLUMNS], meta)


def call_schema(meta: dict):
    import pyarrow as pa
    return _schema([(name, pa.string() if name == "kind" else pa.int64())
                    for name in CALL_COLUMNS], meta)


def _batched(chunks: Iterable[list], size: int) -> Iterable[list]:
    """Regroup reader chunks into row groups of ``size`` rows."""
    pending: list = []
    for chunk in chunks:
        pending.extend(chunk)
        while len(pending) >= size:
            yield pending[:size]
            pending = pending[size:]
    if pending:
        yield pending


def write_switches(path: Path, chunks: Iterable[list[SwitchRecord]], meta: dict) -> int:
    """Write switch records (in chunks) to ``path``; returns the row count."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    schema = switch_schema(meta)
    rows = 0
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for batch in _batched(chunks, ROW_GROUP):
            table = np.array([r.as_row() for r in batch], dtype=np.int64)
            writer.write_table(pa.Table.from_arrays(
                [pa.array(table[:, i]) for i in range(len(COLUMNS))], schema=schema))
            rows += len(batch)
        if not rows:
            writer.write_table(schema.empty_table())
    return rows


def write_calls(path: Path, chunks: Iterable[list[CallRecord]], meta: dict) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq
    schema = call_schema(meta)
    rows = 0
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for batch in _batched(chunks, ROW_GROUP):
            columns = list(zip(*(r.as_row() for r in batch)))
            writer.write_table(pa.Table.from_arrays(
                [pa.array(col, type=f.type) for col, f in zip(columns, schema)], schema=schema))
            rows += len(batch)
        if not rows:
            writer.write_table(schema.empty_table())
    return rows


def read_meta(path: Path) -> dict:
    """The capture meta stored in a Parquet file by ``write_switches``/``write_calls``."""
    import pyarrow.parquet as pq
    return json.loads(pq.read_schema(path).metadata[META_KEY])
