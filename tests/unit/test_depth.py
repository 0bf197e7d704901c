"""``--depth``: what each depth hooks, and that the columns it does not hook are empty in
the capture and shown as not measured by every front end (never as a measured 0)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.unit.test_engine_parts import offer
from tracer.capture.files import CaptureError, CaptureWriter, iter_capture, read_capture
from tracer.cli import main
from tracer.kernel import probes
from tracer.model.schema import COLUMNS, DEPTHS, HOOK_COLUMNS, depth_of, unmeasured
from tracer.model.stats import Stats
from tracer.paths import bpf_dir
from tracer.record.summary import format_summary

SMALL = Path(__file__).resolve().parents[1] / "data" / "small.csv"
IOMMU = {"iommu_map", "iommu_unmap"}
MMU = IOMMU | {"iotlb_sync", "mmu_zap", "mmu_notifier"}
GUESTS = MMU | {"vcpu_kick", "vfio_dma", "kvm_exit", "vf_access_wait"}
HOOKED = {"window": set(), "iommu": IOMMU, "mmu": MMU, "guests": GUESTS}


@pytest.mark.parametrize("depth", DEPTHS)
def test_each_depth_hooks_exactly_its_hooks_and_no_deeper_one(depth):
    p = probes.plan(None, "auto", offer(), depth=depth)
    modes = p.modes()
    hooked = {name for name, mode in modes.items() if name != "switch" and mode != "off"}
    assert hooked == HOOKED[depth]
    assert all(modes[name] == "off" for name in GUESTS - HOOKED[depth])
    flags = p.cflags(bpf_dir(), 1)
    for c in p.choices:                     # a hook not at this depth is compiled out
        assert (f"-D{c.hook.define}=0" in flags) == (c.hook.name not in HOOKED[depth])
    assert (f"-DHAVE_KVM_TP={int(depth == 'guests')}" in flags)
    assert (f"-DHAVE_ACCESS_TP={int(depth == 'guests')}" in flags)
    # What it does not hook is what it does not measure, and nothing else.
    assert set(p.unmeasured()) == {col for hook, cols in HOOK_COLUMNS.items()
                                   if hook not in HOOKED[depth] for col in cols}
    assert not p.warnings()                 # leaving a hook out on purpose is not a warning


def test_a_hook_the_kernel_lacks_is_unmeasured_too_and_window_needs_no_iommu_hook():
    p = probes.plan(None, "auto", offer(tracepoints=probes.KernelOffer(
        functions=frozenset()).tracepoints | {"pf_sched:vf_switch_begin"}))
    assert p.modes()["kvm_exit"] == "absent" and {"kvm_exits", "exit_ns"} <= set(p.unmeasured())
    with pytest.raises(probes.ProbeError, match="neither iommu_map nor iommu_unmap"):
        probes.plan(None, "auto", offer(fentry=False, kprobes=False), depth="iommu")
    assert probes.plan(None, "auto", offer(fentry=False, kprobes=False), depth="window")
    with pytest.raises(probes.ProbeError, match="--depth deep: give window, iommu, mmu, guests"):
        probes.plan(None, "auto", offer(), depth="deep")


def test_the_depth_flag_is_checked_before_root_or_the_kernel(capsys):
    assert main(["record", "--depth", "deep"]) == 2
    assert "invalid choice: 'deep'" in capsys.readouterr().err


def window_capture(tmp_path: Path, depth: str = "window") -> tuple[Path, list]:
    """The shipped capture's rows, written again as a recorder at ``depth`` writes them."""
    _, rows, _ = read_capture(SMALL)
    meta = json.loads(SMALL.with_suffix(".meta.json").read_text())
    plan = probes.plan(None, "auto", offer(), depth=depth)
    meta.update(depth=depth, unmeasured=plan.unmeasured())
    meta.pop("columns", None)
    out = tmp_path / f"{depth}.csv"
    with CaptureWriter(out, meta) as w:
        w.write_many(rows[:100])
        w.write(rows[100])
    return out, rows[:101]


def test_unmeasured_columns_are_written_empty_and_read_back_as_zero(tmp_path):
    path, rows = window_capture(tmp_path)
    meta, back, problems = read_capture(path)
    assert not problems and len(back) == len(rows)
    skip = unmeasured(meta)
    assert skip == set(probes.plan(None, "auto", offer(), depth="window").unmeasured())
    header, *lines = path.read_text().splitlines()
    for line in lines:
        for name, field in zip(COLUMNS, line.split(",")):
            assert (field == "") == (name in skip), (name, field)
    for got, wrote in zip(back, rows):
        for name in COLUMNS:
            assert getattr(got, name) == (0 if name in skip else getattr(wrote, name))
    # An identity column or the switch time is never empty: that is still damage.
    for name in ("seq", "pf", "switch_ns"):
        at = COLUMNS.index(name)
        fields = lines[0].split(",")
        fields[at] = ""
        bad = tmp_path / f"bad-{name}.csv"
        bad.write_text("\n".join([header, ",".join(fields)]) + "\n")
        with pytest.raises(CaptureError, match=f"column {name} is not an integer"):
            list(iter_capture(bad))


def test_old_captures_hooked_everything():
    meta = json.loads(SMALL.with_suffix(".meta.json").read_text())
    assert "depth" not in meta and depth_of(meta) == "guests" and unmeasured(meta) == set()
    assert unmeasured({"unmeasured": "kvm_exits"}) == set()      # not a list: ignored
    assert unmeasured({"unmeasured": ["seq", "kvm_exits"]}) == {"kvm_exits"}


def test_summary_report_and_export_show_not_measured_not_zero(tmp_path, capsys):
    path, rows = window_capture(tmp_path)
    meta, _, _ = read_capture(path)
    stats = Stats(budget_ns=100)
    for r in rows:
        stats.add(r)
    text = format_summary(stats.snapshot(), meta)
    assert "depth: window" in text and "not measured at depth window" in text
    header = next(line for line in text.splitlines() if line.startswith("GROUP"))
    overall = next(line for line in text.splitlines() if line.startswith("all"))
    cells = dict(zip(header.split(), overall.split()))
    assert cells["REVOKE"] == cells["GRANT"] == cells["EXITS/SW"] == cells["BLOCKED/SW"] == "-"
    assert cells["P50"] != "-"

    assert main(["report", "--json", str(path)]) == 0
    cap = json.loads(capsys.readouterr().out)["captures"][0]
    assert cap["depth"] == "window" and "kvm_exits" in cap["unmeasured"]
    for row in cap["rows"]:
        assert row["exits_per_switch"] is None and row["revoke_mean"] is None
        assert row["p50"] is not None
    assert main(["report", str(path)]) == 0
    assert "depth window" in capsys.readouterr().out

    out = tmp_path / "trace.json"
    assert main(["export", str(path), "--perfetto", str(out)]) == 0
    trace = json.loads(out.read_text())
    assert trace["metadata"]["depth"] == "window"
    cats = {e.get("cat") for e in trace["traceEvents"] if e.get("ph") == "X"}
    assert "switch" in cats and not {"revoke", "grant"} & cats     # no split without its hook
    args = next(e["args"] for e in trace["traceEvents"] if e.get("cat") == "switch")
    assert "revoke_ns" not in args and "kvm_exits" not in args


def test_the_dashboard_shows_the_depth_and_not_measured_cells(tmp_path):
    from tests.unit.tui_support import SIZE, FrozenClock, caught_up, run_async, table_rows
    from tracer.model.group_columns import NOT_MEASURED
    from tui.app import VftraceApp
    from tui.model import GROUP_COLUMNS
    from tui.sources import ReplaySource

    path, rows = window_capture(tmp_path)
    app = VftraceApp(ReplaySource(path, 0), clock=FrozenClock())

    @run_async
    async def run():
        async with app.run_test(size=SIZE) as pilot:
            await caught_up(pilot, app)
            return (table_rows(app, "switches"), table_rows(app, "groups"),
                    "\n".join(line.plain for line in app.header_lines))
    switches, groups, header = run()
    assert "depth window" in header
    assert switches and all(r[4:] == [NOT_MEASURED] * 4 and r[3] != NOT_MEASURED
                            for r in switches)          # revoke, grant, exits, blocked
    names = [c.name for c in GROUP_COLUMNS]
    for row in groups:
        cells = dict(zip(names, row))
        assert cells["exits"] == cells["blocked_time"] == cells["revoke"] == NOT_MEASURED
        assert cells["p50"] != NOT_MEASURED
