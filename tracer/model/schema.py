"""The record shapes shared by the BPF decoder, the statistics core and the captures.

``COLUMNS`` is the contract of ``capture.csv``: its order is the CSV header order and the
field order of ``SwitchRecord``.  New columns go at the end so older readers, which
select columns by name, keep working.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

# Every column value is an int64: what a capture holds, the writer writes, the reader reads.
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1

COLUMNS: tuple[str, ...] = (
    "seq", "t_ns", "pf", "from_vf", "to_vf", "cpu",
    "switch_ns", "revoke_ns", "grant_ns",
    "unmap_calls", "unmap_ns", "unmap_max_ns", "unmap_bytes",
    "map_calls", "map_ns", "map_max_ns", "map_bytes",
    "sync_calls", "sync_ns",
    "mmu_ns", "mmu_notifier_ns",
    "kvm_exits", "exit_ns", "vcpu_kicks",
    "blocked_accesses", "blocked_ns",
    "source_ns", "over_budget",
    "mmu_calls", "mmu_notifier_calls", "fentry_hits", "kprobe_hits", "entry_hits",
)
# Columns added after a capture format was in use: a capture without them reads them as
# 0 (its recorder did not count them).  The same for the per-call file.
COLUMNS_ADDED = frozenset({"mmu_calls", "mmu_notifier_calls", "fentry_hits", "kprobe_hits",
                           "entry_hits"})
CALL_COLUMNS_ADDED = frozenset({"tid", "vcpu", "pf"})   # absent from 0.1.0's call files

# How much of a switch vftrace instruments (``--depth``), shallowest first: each depth
# hooks what the one before does and more, so costs less the less it hooks.
#   window  only the switch's bookends (pf_sched's tracepoints, or --switch)
#   iommu   + iommu_map/iommu_unmap: the functions BCC's funclatency would time
#   mmu     + the IOTLB flush and the zap of guests' mappings (MMU notifier)
#   guests  + KVM exits, vCPU kicks, blocked guest accesses, VFIO DMA (the default)
DEPTHS: tuple[str, ...] = ("window", "iommu", "mmu", "guests")
DEFAULT_DEPTH = "guests"

# The columns only a hook measures, by what measures them.  A capture that lacks the
# hook (a shallower --depth, or a kernel without it) leaves them empty, not 0: the
# meta's ``unmeasured`` lists them.  revoke/grant split at the first iommu_map.
HOOK_COLUMNS: dict[str, tuple[str, ...]] = {
    "iommu_map": ("map_calls", "map_ns", "map_max_ns", "map_bytes", "revoke_ns", "grant_ns"),
    "iommu_unmap": ("unmap_calls", "unmap_ns", "unmap_max_ns", "unmap_bytes"),
    "iotlb_sync": ("sync_calls", "sync_ns"),
    "mmu_zap": ("mmu_calls", "mmu_ns"),
    "mmu_notifier": ("mmu_notifier_calls", "mmu_notifier_ns"),
    "kvm_exit": ("kvm_exits", "exit_ns"),
    "vcpu_kick": ("vcpu_kicks",),
    "vf_access_wait": ("blocked_accesses", "blocked_ns"),
}
MAY_BE_UNMEASURED = frozenset(c for cols in HOOK_COLUMNS.values() for c in cols)


def unmeasured(meta: dict | None) -> frozenset[str]:
    """The columns a capture's recorder could not measure (older captures: none)."""
    names = (meta or {}).get("unmeasured") or ()
    return frozenset(n for n in names if n in MAY_BE_UNMEASURED) if isinstance(
        names, (list, tuple)) else frozenset()


def depth_of(meta: dict | None) -> str:
    """A capture's --depth (older captures hooked everything: guests)."""
    d = (meta or {}).get("depth")
    return d if d in DEPTHS else DEFAULT_DEPTH


def reader_pause(meta: dict | None) -> str | None:
    """The reader's longest pause between two reads of the buffers (meta "reader_gaps",
    from the engine's ReaderGaps), in words; None for older captures."""
    gaps = (meta or {}).get("reader_gaps")
    if not isinstance(gaps, dict) or not isinstance(gaps.get("longest_s"), (int, float)):
        return None
    at = gaps.get("longest_at_s")
    where = f" at {at:.0f} s" if isinstance(at, (int, float)) else ""
    over = gaps.get("over_1s")
    return (f"the reader paused up to {gaps['longest_s']:.2f} s{where}"
            + (f" ({over} pauses over 1 s)" if isinstance(over, int) and over else ""))


NO_VF = -1
"""``from_vf`` of a switch that had no outgoing VF (the first grant after idle)."""


@dataclass(slots=True)
class SwitchRecord:
    """One VF switch: the revoke of ``from_vf`` and the grant of ``to_vf`` on ``pf``.

    Every field is an int; durations are integer nanoseconds.  ``source_ns`` is the
    switch source's own timing (0 when it has none); ``over_budget`` is the kernel-side
    0/1 verdict against the budget in force when the record was made.
    """
    seq: int
    t_ns: int
    pf: int
    from_vf: int
    to_vf: int
    cpu: int
    switch_ns: int
    revoke_ns: int
    grant_ns: int
    unmap_calls: int
    unmap_ns: int
    unmap_max_ns: int
    unmap_bytes: int
    map_calls: int
    map_ns: int
    map_max_ns: int
    map_bytes: int
    sync_calls: int
    sync_ns: int
    mmu_ns: int
    mmu_notifier_ns: int
    kvm_exits: int
    exit_ns: int
    vcpu_kicks: int
    blocked_accesses: int
    blocked_ns: int
    source_ns: int
    over_budget: int
    # Added later (COLUMNS_ADDED); the hits are vftrace's own probe runs in the window,
    # by type, that tracer/model/correction.py takes off.
    mmu_calls: int = 0
    mmu_notifier_calls: int = 0
    fentry_hits: int = 0
    kprobe_hits: int = 0
    entry_hits: int = 0

    def as_row(self) -> tuple[int, ...]:
        """The values in ``COLUMNS`` order (what one CSV row holds)."""
        return tuple(getattr(self, name) for name in COLUMNS)


CALL_COLUMNS: tuple[str, ...] = ("kind", "t_ns", "ns", "size", "pid", "cpu", "seq",
                                 "tid", "vcpu", "pf")


@dataclass(slots=True)
class CallRecord:
    """One traced kernel call (iommu_map, iommu_unmap, iotlb_sync, vfio_map_dma, kvm_exit...).

    ``seq`` is the switch the call belongs to, or None when it happened outside any
    switch (it is written as an empty CSV field).  For ``kvm_exit`` rows ``size`` is the
    exit reason and ``vcpu`` the vCPU id; ``pf`` is the PF of the switch (with ``seq``).
    """
    kind: str
    t_ns: int
    ns: int
    size: int
    pid: int
    cpu: int
    seq: int | None
    tid: int = 0
    vcpu: int = 0
    pf: int = 0

    def as_row(self) -> tuple:
        return tuple(getattr(self, name) for name in CALL_COLUMNS)


# The dataclasses must never drift from the column tuples that define the file formats.
assert tuple(f.name for f in fields(SwitchRecord)) == COLUMNS
assert tuple(f.name for f in fields(CallRecord)) == CALL_COLUMNS
