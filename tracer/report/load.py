"""Load captures for reports: the statistics core's snapshot plus the few columns the
plots need, read in one streaming pass so memory stays proportional to those columns.

Every problem a user can cause (a missing file, a file that is not a capture, a corrupt
meta) becomes a one-line ``VftraceError``; output files are ``tracer.capture.output``'s.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from itertools import islice
from operator import attrgetter
from pathlib import Path
from typing import Iterator

import numpy as np

from tracer.capture import files as capture_files
from tracer.capture.files import CaptureError, iter_calls, iter_capture, meta_path, read_meta
from tracer.errors import VftraceError
from tracer.model.correction import Correction
from tracer.model.schema import CALL_COLUMNS, CallRecord, SwitchRecord, depth_of, unmeasured
from tracer.model.stats import Snapshot, Stats

DEFAULT_BUDGET_NS = 100          # vftrace record's default, for a capture without meta
CHUNK = 16384
PLOT_COLUMNS = ("seq", "t_ns", "pf", "from_vf", "to_vf", "switch_ns", "revoke_ns",
                "grant_ns", "kvm_exits", "exit_ns", "blocked_ns")


@dataclass
class Capture:
    """One capture as the report sees it.

    ``problems`` are what was tolerated while reading (a cut last line, a recorder that
    never closed the file, a row count differing from the meta); ``columns`` holds the
    ``PLOT_COLUMNS`` as int64 arrays in file order.
    """
    path: Path
    label: str
    meta: dict
    budget_ns: int
    snapshot: Snapshot
    columns: dict[str, np.ndarray]
    problems: list[str] = field(default_factory=list)

    @property
    def records(self) -> int:
        return self.snapshot.records

    @property
    def lost_total(self) -> int | None:
        """Records the kernel dropped, or None when the meta does not say (no meta, or
        a recorder that never closed the capture)."""
        if "lost_total" in self.meta:
            return int(self.meta["lost_total"])
        per_cpu = self.meta.get("lost_records_per_cpu")
        return sum(per_cpu.values()) if isinstance(per_cpu, dict) else None

    @property
    def depth(self) -> str:
        return depth_of(self.meta)

    @property
    def unmeasured(self) -> frozenset[str]:
        """Columns its recorder did not measure (a shallower --depth): shown as such."""
        return unmeasured(self.meta)

    @property
    def truncated(self) -> bool:
        return any("truncated" in p for p in self.problems)

    @property
    def duration_s(self) -> float:
        t = self.columns["t_ns"]
        return float(t.max() - t.min()) / 1e9 if t.size else 0.0


def check_input(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise VftraceError(f"{p}: no such file; give a capture CSV written by vftrace record")
    if p.is_dir():
        raise VftraceError(f"{p}: is a directory; give a capture CSV written by vftrace record")
    if not p.is_file():                      # a FIFO or a device: reading could block
        raise VftraceError(f"{p}: not a regular file; give a capture CSV written by vftrace "
                           "record")
    if p.name.endswith(".meta.json"):
        raise VftraceError(f"{p}: is a capture's meta file; give the capture CSV beside it")
    _refuse_calls_file(p)
    return p


def _refuse_calls_file(p: Path) -> None:
    """A per-call CSV passed instead of the capture gets a pointed message rather than
    'header lacks columns'."""
    try:
        with open(p, newline="") as f:
            first = f.readline(4096)
    except OSError as e:
        raise VftraceError(f"cannot read {p}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise VftraceError(f"{p}: not a capture (not a text CSV file)") from None
    if first.rstrip("\r\n").split(",")[:2] == list(CALL_COLUMNS[:2]):
        raise VftraceError(f"{p}: is a per-call file (vftrace record --calls); "
                           "give the capture CSV it belongs to")


def load_meta(path: Path) -> tuple[dict, list[str]]:
    """The capture's meta (empty when there is none) and what is wrong with it."""
    meta = read_meta(path, require=False)     # checks the keys it knows, numbers too
    problems = []
    if not meta:
        problems.append(f"no meta file ({meta_path(path).name}): lost records, budget and "
                        "probe modes unknown")
    elif not meta.get("complete"):
        problems.append("capture is not complete: the recorder did not close it, so lost "
                        "records are unknown")
    return meta, problems


def switch_chunks(path: Path, problems: list[str]) -> Iterator[list[SwitchRecord]]:
    """The capture's switch records in lists of ``CHUNK``; read errors become
    VftraceError."""
    records = iter_capture(path, problems)
    try:
        while chunk := list(islice(records, CHUNK)):
            yield chunk
    except CaptureError as e:
        raise VftraceError(f"{e} (is it a capture written by vftrace record?)") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise VftraceError(f"{path}: not a capture CSV ({e})".splitlines()[0]) from None


def call_chunks(path: Path, problems: list[str]) -> Iterator[list[CallRecord]]:
    calls = iter_calls(path, problems)
    try:
        while chunk := list(islice(calls, CHUNK)):
            yield chunk
    except CaptureError as e:
        raise VftraceError(f"{e} (is it a per-call file written by vftrace record --calls?)"
                           ) from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise VftraceError(f"{path}: not a per-call CSV ({e})".splitlines()[0]) from None


def calls_path(path: Path, meta: dict, override: str | os.PathLike | None = None
               ) -> Path | None:
    """The per-call CSV of a capture: ``override``, else the meta's ``calls_file`` next
    to the capture (``tracer.capture.files.calls_path``); None when it has none."""
    if override is not None:
        p = Path(override)
        if not p.is_file():
            raise VftraceError(f"--calls {p}: no such file")
        return p
    return capture_files.calls_path(path, meta)


_PLOT_GETTER = attrgetter(*PLOT_COLUMNS)


def load_capture(path: str | os.PathLike, label: str | None = None,
                 budget_ns: int | None = None) -> Capture:
    """Read one capture: its meta, the statistics core's snapshot (budget from
    ``budget_ns``, else the meta, else vftrace record's default) and the plot columns."""
    p = check_input(path)
    meta, problems = load_meta(p)
    budget = budget_ns if budget_ns is not None else meta.get("budget_ns") or DEFAULT_BUDGET_NS
    stats = Stats(int(budget), correction=Correction.from_meta(meta))
    if meta.get("complete"):
        stats.account(meta.get("filtered_out"))      # what --pf/--vf left out: no gap
    elif (meta.get("filters") or {}).get("vf"):
        problems.append("recorded with --vf and not closed: the seq gaps below include "
                        "the switches the filter left out")
    parts: list[np.ndarray] = []
    for chunk in switch_chunks(p, problems):
        stats.add_many(chunk, now=0.0)
        parts.append(np.array([_PLOT_GETTER(r) for r in chunk], dtype=np.int64))
    table = np.concatenate(parts) if parts else np.zeros((0, len(PLOT_COLUMNS)), np.int64)
    columns = {name: np.ascontiguousarray(table[:, i]) for i, name in enumerate(PLOT_COLUMNS)}
    snapshot = stats.snapshot(now=0.0)
    if meta.get("complete") and meta.get("records") not in (None, snapshot.records):
        problems.append(f"meta says {meta['records']} records, the CSV has {snapshot.records}")
    return Capture(path=p, label=label or p.stem, meta=meta, budget_ns=int(budget),
                   snapshot=snapshot, columns=columns, problems=problems)


def unique_labels(paths: list[Path], given: list[str] | None) -> list[str]:
    """``--label`` values in order, then file stems; stems that collide gain their
    directory's name so a legend never shows two identical entries."""
    given = list(given or [])
    if len(given) > len(paths):
        raise VftraceError(f"{len(given)} --label values for {len(paths)} captures; "
                           "give at most one per capture, in order")
    stems = given + [p.stem for p in paths[len(given):]]
    labels = [f"{p.parent.name}/{p.stem}" if i >= len(given) and stems.count(stems[i]) > 1
              and p.parent.name else stems[i] for i, p in enumerate(paths)]
    seen: dict[str, int] = {}
    for i, lab in enumerate(labels):     # still equal (same file twice): number them
        seen[lab] = seen.get(lab, 0) + 1
        if labels.count(lab) > 1:
            labels[i] = f"{lab} #{seen[lab]}"
    return labels

