"""``vftrace report``: table numbers against an independent numpy computation on the
shipped capture, losses shown, the figure's files (PNG size, SVG, self-contained HTML),
and one-line errors for bad input."""
from __future__ import annotations

import json
import re
import shutil
import struct
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from tracer.cli import main
from tracer.model.schema import COLUMNS

DATA = Path(__file__).resolve().parents[1] / "data"
SMALL = DATA / "small.csv"
REL = 0.0005              # the statistics core's histogram: <= 0.05% on percentiles


def load_columns(path: Path) -> dict[str, np.ndarray]:
    """The capture's columns read with numpy alone (not through tracer.capture.files)."""
    header = path.read_text().split("\n", 1)[0].split(",")
    table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.int64, ndmin=2)
    return {name: table[:, header.index(name)] if name in header else np.zeros(len(table), np.int64)
            for name in COLUMNS}       # small.csv predates COLUMNS_ADDED: they read as 0


def expected_row(cols: dict[str, np.ndarray], mask: np.ndarray, budget: int) -> dict:
    sw = cols["switch_ns"][mask]
    p50, p90, p99, p999 = np.percentile(sw, [50, 90, 99, 99.9], method="inverted_cdf")
    return {"count": int(mask.sum()), "p50": p50, "p90": p90, "p99": p99, "p999": p999,
            "max": int(sw.max()), "over_budget": int((sw > budget).sum()),
            "over_budget_share": float((sw > budget).mean()),
            "revoke_mean": cols["revoke_ns"][mask].mean(),
            "grant_mean": cols["grant_ns"][mask].mean(),
            "revoke_share": cols["revoke_ns"][mask].sum() / sw.sum(),
            "exits_per_switch": cols["kvm_exits"][mask].mean(),
            "exit_ns_per_switch": cols["exit_ns"][mask].mean(),
            "blocked_per_switch": cols["blocked_accesses"][mask].mean(),
            "blocked_ns_per_switch": cols["blocked_ns"][mask].mean()}


def group_mask(cols: dict[str, np.ndarray], group: str) -> np.ndarray:
    """'all', 'pf0', 'pf0/vf1' (incoming VF), 'pf0/0->1' or 'pf0/none->1'."""
    if group == "all":
        return np.ones(cols["seq"].size, dtype=bool)
    m = re.fullmatch(r"pf(\d+)(?:/vf(\d+)|/(none|\d+)->(\d+))?", group)
    assert m, group
    mask = cols["pf"] == int(m[1])
    if m[2] is not None:
        mask &= cols["to_vf"] == int(m[2])
    if m[4] is not None:
        mask &= (cols["from_vf"] == (-1 if m[3] == "none" else int(m[3])))
        mask &= cols["to_vf"] == int(m[4])
    return mask


def run_json(capsys, *args: str) -> dict:
    assert main(["report", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def check_rows_against_numpy(rows: list[dict], cols: dict, budget: int) -> None:
    for row in rows:
        want = expected_row(cols, group_mask(cols, row["group"]), budget)
        for key in ("count", "max", "over_budget"):
            assert row[key] == want[key], (row["group"], key)
        assert row["over_budget_share"] == pytest.approx(want["over_budget_share"], abs=1e-12)
        for key in ("p50", "p90", "p99", "p999"):
            assert row[key] == pytest.approx(want[key], rel=REL), (row["group"], key)
        for key in ("revoke_mean", "grant_mean", "revoke_share", "exits_per_switch",
                    "exit_ns_per_switch", "blocked_per_switch", "blocked_ns_per_switch"):
            assert row[key] == pytest.approx(want[key], rel=1e-9, abs=1e-9), (row["group"], key)


# --- numbers -----------------------------------------------------------------------------

def test_table_numbers_equal_an_independent_computation(capsys):
    cols = load_columns(SMALL)
    meta = json.loads((DATA / "small.meta.json").read_text())
    report = run_json(capsys, str(SMALL))
    cap = report["captures"][0]
    assert cap["records"] == cols["seq"].size == meta["records"]
    assert cap["budget_ns"] == meta["budget_ns"]
    groups = [r["group"] for r in cap["rows"]]
    pfs = sorted(set(cols["pf"].tolist()))
    pairs = {(p, f, t) for p, f, t in zip(cols["pf"].tolist(), cols["from_vf"].tolist(),
                                          cols["to_vf"].tolist())}
    # every level the issue asks for: overall, per PF, per VF, per from->to
    assert groups[0] == "all"
    assert {g for g in groups if re.fullmatch(r"pf\d+", g)} == {f"pf{p}" for p in pfs}
    assert len([g for g in groups if "->" in g]) == len(pairs)
    assert len([g for g in groups if "/vf" in g]) == len({(p, t) for p, _, t in pairs})
    check_rows_against_numpy(cap["rows"], cols, meta["budget_ns"])


def test_budget_override_gives_exact_shares(capsys):
    cols = load_columns(SMALL)
    budget = int(np.median(cols["switch_ns"]))      # about half the switches over it
    cap = run_json(capsys, str(SMALL), "--budget-ns", str(budget))["captures"][0]
    assert cap["budget_ns"] == budget
    assert 0.3 < cap["rows"][0]["over_budget_share"] < 0.7
    check_rows_against_numpy(cap["rows"], cols, budget)


def test_text_table_prints_the_same_rows(capsys):
    from tracer.model.units import fmt_ns
    report = run_json(capsys, str(SMALL))
    rows = report["captures"][0]["rows"]
    assert main(["report", str(SMALL)]) == 0
    text = capsys.readouterr().out
    lines = {line.split()[0]: line.split() for line in text.splitlines()
             if line.split() and line.split()[0] in {r["group"] for r in rows}}
    assert len(lines) == len(rows)
    for r in rows:
        cells = lines[r["group"]]
        assert cells[1] == str(r["count"])
        assert cells[2:7] == [fmt_ns(r[k]) for k in ("p50", "p90", "p99", "p999", "max")]
        assert cells[7:9] == ["-", "-"]        # P50_CORR, OWN%: small.csv has no costs
        assert cells[9] == f"{100 * r['over_budget_share']:.2f}%"
        assert cells[10:12] == [fmt_ns(r["revoke_mean"]), fmt_ns(r["grant_mean"])]
    assert "losses: lost records 0, seq gaps 0, partial windows 576" in text
    assert "WARNING" not in text
    assert "vftrace's own cost: unknown (no probe costs in this capture" in text


def test_kvm_exit_reasons_from_the_background_totals(capsys):
    meta = json.loads((DATA / "small.meta.json").read_text())
    cap = run_json(capsys, str(SMALL))["captures"][0]
    inside = sum(e["count"] for e in meta["background"]["kvm_exits"] if e["in_window"])
    outside = sum(e["count"] for e in meta["background"]["kvm_exits"] if not e["in_window"])
    assert sum(r["in_switch"] for r in cap["kvm_exits"]) == inside
    assert sum(r["outside"] for r in cap["kvm_exits"]) == outside
    assert "IOIO" in {r["reason"] for r in cap["kvm_exits"]}      # svm 0x7b, named


# --- losses are never silent -------------------------------------------------------------

def copy_capture(tmp_path: Path, name: str = "cap", **meta_changes) -> Path:
    csv_path = tmp_path / f"{name}.csv"
    shutil.copy(SMALL, csv_path)
    meta = json.loads((DATA / "small.meta.json").read_text())
    meta.update(meta_changes)
    (tmp_path / f"{name}.meta.json").write_text(json.dumps(meta))
    return csv_path


def test_a_lossy_capture_says_how_long_its_reader_paused(tmp_path, capsys):
    cap = copy_capture(tmp_path, lost_total=12,
                       reader_gaps={"longest_s": 3.2, "longest_at_s": 40, "over_1s": 2})
    assert main(["report", str(cap)]) == 0
    assert ("the reader paused up to 3.20 s at 40 s (2 pauses over 1 s) between two reads of "
            "the buffers") in capsys.readouterr().out
    bad = copy_capture(tmp_path, name="bad", lost_total=1, reader_gaps="long")
    assert main(["report", str(bad)]) == 2              # a hand-edited meta: one clear line
    assert "reader_gaps" in capsys.readouterr().err


def test_lost_records_are_a_prominent_warning(tmp_path, capsys):
    cap = copy_capture(tmp_path, lost_total=12, lost_records_per_cpu={"0": 5, "1": 7})
    assert main(["report", str(cap)]) == 0
    text = capsys.readouterr().out
    assert "WARNING: 12 records lost by the kernel (per CPU 0:5 1:7)" in text
    assert "lost records 12" in text
    data = run_json(capsys, str(cap))["captures"][0]
    assert data["lost_total"] == 12
    assert any(n["warning"] and "12 records lost" in n["text"] for n in data["notes"])


def test_truncated_capture_reports_whole_rows_and_says_so(tmp_path, capsys):
    cap = copy_capture(tmp_path)
    text = cap.read_text()
    cap.write_text(text[:text.rindex("\n", 0, len(text) - 1) + 1] + "99,100,1,")  # cut row
    whole = text.count("\n") - 1
    assert main(["report", str(cap)]) == 0
    out = capsys.readouterr().out
    assert "truncated last line ignored" in out and "WARNING" in out
    data = run_json(capsys, str(cap))["captures"][0]
    assert data["truncated"] is True
    assert data["records"] == whole - 1          # the last whole row went with the cut
    assert any(f"the CSV has {whole - 1}" in p for p in data["problems"])


def test_capture_without_meta_says_losses_are_unknown(tmp_path, capsys):
    cap = tmp_path / "bare.csv"
    shutil.copy(SMALL, cap)
    data = run_json(capsys, str(cap))["captures"][0]
    assert data["lost_total"] is None
    assert data["budget_ns"] == 100
    assert any("no meta file" in p for p in data["problems"])


# --- several captures -----------------------------------------------------------------------

def test_several_captures_are_labelled_and_compared(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    a = copy_capture(tmp_path / "x")
    b = copy_capture(tmp_path / "y")                  # same stem "cap": labels must differ
    data = run_json(capsys, str(a), str(b))
    assert [c["label"] for c in data["captures"]] == ["x/cap", "y/cap"]
    data = run_json(capsys, str(a), str(b), "-l", "strict", "-l", "batched")
    assert [c["label"] for c in data["captures"]] == ["strict", "batched"]
    assert main(["report", str(a), str(b), "-l", "strict", "-l", "batched"]) == 0
    text = capsys.readouterr().out
    assert "== comparison ==" in text
    assert re.search(r"^strict\s+all\s+4774", text, re.M)
    assert re.search(r"^batched\s+pf1\s+2387", text, re.M)


# --- files ---------------------------------------------------------------------------------

def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("size", [(1600, 1000), (900, 700)])
def test_png_is_a_valid_image_of_the_requested_size(tmp_path, capsys, size):
    from PIL import Image
    out = tmp_path / "r.png"
    assert main(["report", str(SMALL), "-o", str(out), "--size", f"{size[0]}x{size[1]}"]) == 0
    assert png_size(out) == size
    with Image.open(out) as im:
        im.verify()
    with Image.open(out) as im:
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert len(colours) > 50             # a drawn figure, not a blank canvas
    assert "wrote" in capsys.readouterr().err


def test_figure_has_four_panels_a_legend_and_the_loss_warning(tmp_path):
    from tracer.report.load import load_capture
    from tracer.report.plots import make_figure
    lossy = copy_capture(tmp_path, "lossy", lost_total=3, lost_records_per_cpu={"1": 3})
    caps = [load_capture(SMALL, "strict"), load_capture(lossy, "batched")]
    fig = make_figure(caps)
    axes = fig.get_axes()
    assert len(axes) == 4
    titles = " | ".join(ax.get_title() for ax in axes)
    for word in ("CDF", "Revoke vs grant", "over time", "exits per switch"):
        assert word in titles
    legend = axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == [
        "strict pf0", "strict pf1", "batched pf0", "batched pf1"]
    colours = [h.get_color() for h in legend.legend_handles]
    assert len(set(colours)) == 4
    assert axes[0].get_xscale() == "log"
    # the budget is marked on the CDF
    assert any(abs(line.get_xdata()[0] - 100) < 1e-9 for line in axes[0].get_lines()
               if len(line.get_xdata()) == 2)
    assert "batched: 3 records lost" in fig._supxlabel.get_text()


def test_many_pfs_fall_back_to_one_series_per_capture():
    from dataclasses import replace

    from tracer.report.load import load_capture
    from tracer.report.plots import MAX_SERIES_PER_PF, make_series
    cap = load_capture(SMALL)
    pfs = len(cap.snapshot.per_pf)
    few = [replace(cap, label=f"c{i}") for i in range(MAX_SERIES_PER_PF // pfs)]
    assert [s.label for s in make_series(few)][:pfs] == [f"c0 pf{p}" for p in range(pfs)]
    many = [replace(cap, label=f"c{i}") for i in range(MAX_SERIES_PER_PF // pfs + 1)]
    series = make_series(many)
    assert [s.label for s in series] == [c.label for c in many]
    assert all(s.column("switch_ns").size == cap.records for s in series)
    assert len({s.color for s in series}) == len(series)


def test_svg_and_pdf(tmp_path, capsys):
    svg = tmp_path / "r.svg"
    assert main(["report", str(SMALL), "-o", str(svg)]) == 0
    head = svg.read_text()[:2000]
    assert "<svg" in head and 'width="1152pt"' in head      # 1600 px at 72 pt/inch, dpi 100
    pdf = tmp_path / "r.pdf"
    assert main(["report", str(SMALL), "-o", str(pdf)]) == 0
    assert pdf.read_bytes()[:5] == b"%PDF-"


def test_the_same_capture_gives_the_same_svg(tmp_path, capsys):
    first, second = tmp_path / "a.svg", tmp_path / "b.svg"
    assert main(["report", str(SMALL), "-o", str(first)]) == 0
    assert main(["report", str(SMALL), "-o", str(second)]) == 0
    assert first.read_bytes() == second.read_bytes()       # reviewable diffs, no dates


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_html_is_one_self_contained_file(tmp_path, capsys):
    from tracer.model.units import fmt_ns
    out = tmp_path / "r.html"
    lossy = copy_capture(tmp_path, "lossy", lost_total=7, lost_records_per_cpu={"0": 7})
    assert main(["report", str(SMALL), str(lossy), "-o", str(out)]) == 0
    capsys.readouterr()
    text = out.read_text()
    parser = _Tags()
    parser.feed(text)
    names = [t for t, _ in parser.tags]
    assert "svg" in names and names.count("table") >= 3      # two captures + comparison
    assert "script" not in names and "link" not in names and "img" not in names
    for tag, attrs in parser.tags:
        for key in ("src", "href", "xlink:href"):
            value = attrs.get(key) or ""
            assert not re.match(r"\s*(https?:)?//", value), (tag, key, value)
    assert not re.search(r"url\(\s*['\"]?(https?:)?//", text)
    assert "WARNING: 7 records lost by the kernel" in text
    p50 = run_json(capsys, str(SMALL))["captures"][0]["rows"][0]["p50"]
    assert f"<td>{fmt_ns(p50)}</td>" in text


# --- bad input: one line, exit 2 -------------------------------------------------------------

def run_cli(capsys, *args: str) -> tuple[int, str]:
    rc = main(list(args))
    err = capsys.readouterr().err
    return rc, err


def assert_one_line_error(rc: int, err: str, says: str) -> None:
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("vftrace report: error:") or lines[0].startswith("vftrace")
    assert says in lines[0], lines[0]
    assert "Traceback" not in err


def test_bad_inputs(tmp_path, capsys):
    junk = tmp_path / "junk.csv"
    junk.write_text("hello,world\n1,2\n")
    binary = tmp_path / "bin.csv"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    corrupt = copy_capture(tmp_path, "corrupt")
    (tmp_path / "corrupt.meta.json").write_text("{not json")
    empty = tmp_path / "empty.csv"
    empty.write_text(",".join(COLUMNS) + "\n")
    odd_budget = copy_capture(tmp_path, "odd", budget_ns="fast")
    odd_lost = copy_capture(tmp_path, "odd_lost", lost_records_per_cpu=[1, 2])
    odd_cpu = copy_capture(tmp_path, "odd_cpu", lost_records_per_cpu={"cpu0": 1})
    cases = [
        (["report", str(odd_cpu)], "lost_records_per_cpu is not a map"),
        (["report", str(odd_budget)], "budget_ns is not an integer: 'fast'"),
        (["report", str(odd_lost)], "lost_records_per_cpu is not a map"),
        (["report", str(tmp_path / "nope.csv")], "no such file"),
        (["report", str(junk)], "header lacks column(s)"),
        (["report", str(binary)], "not a capture"),
        (["report", str(corrupt)], "corrupt.meta.json is unreadable"),
        (["report", str(DATA / "small.calls.csv")], "is a per-call file"),
        (["report", str(DATA / "small.meta.json")], "meta file"),
        (["report", str(empty), "-o", str(tmp_path / "e.png")], "nothing to plot"),
        (["report", str(SMALL), "-o", str(tmp_path / "missing" / "r.png")], "does not exist"),
        (["report", str(SMALL), "-o", str(tmp_path / "r.jpg")], "unknown format '.jpg'"),
        (["report", str(SMALL), "-o", str(tmp_path)], "is a directory"),
        (["report", str(SMALL), "--size", "big"], "WIDTHxHEIGHT"),
        (["report", str(SMALL), "--size", "10x10"], "pixels"),
        (["report", str(SMALL), "--budget-ns", "0"], "must be positive"),
        (["report", str(SMALL), "-l", "a", "-l", "b"], "2 --label values for 1 captures"),
    ]
    for args, says in cases:
        rc, err = run_cli(capsys, *args)
        assert_one_line_error(rc, err, says)
    assert not (tmp_path / "e.png").exists()


def test_empty_capture_prints_a_table_without_switches(tmp_path, capsys):
    empty = tmp_path / "empty.csv"
    empty.write_text(",".join(COLUMNS) + "\n")
    assert main(["report", str(empty)]) == 0
    assert "no switches in this capture" in capsys.readouterr().out


def test_help_has_examples():
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "tracer.cli", "report", "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "examples:" in r.stdout and "--size" in r.stdout


def test_interrupt_context_calls_and_negative_durations_are_reported(tmp_path, capsys):
    """Kept out of the switches by the kernel side, so never silent: the report says how
    many calls were interrupt-context (none charged to a window) and how many durations
    came out negative and were discarded (a warning: those rows are missing)."""
    meta = json.loads((DATA / "small.meta.json").read_text())
    background = dict(meta.get("background") or {})
    background["irq_calls"] = {"iommu_unmap": {"count": 3, "bytes": 61440},
                               "iotlb_sync": {"count": 3, "bytes": 0},
                               "iommu_map": {"count": 0, "bytes": 0}}
    background["negative_durations"] = {"switch": 2}
    background["unreadable_ring_records"] = 4
    cap = copy_capture(tmp_path, background=background)
    assert main(["report", str(cap)]) == 0
    text = capsys.readouterr().out
    assert "6 calls made in interrupt context (iommu_unmap 3, iotlb_sync 3)" in text
    assert "WARNING: 2 durations came out negative (switch 2)" in text
    assert "WARNING: 4 ring-buffer records were of a size the reader did not expect" in text
    notes = run_json(capsys, str(cap))["captures"][0]["notes"]
    assert any(not n["warning"] and "interrupt context" in n["text"] for n in notes)
    assert any(n["warning"] and "negative" in n["text"] for n in notes)
    plain = copy_capture(tmp_path, name="plain")             # the shipped capture: neither
    assert main(["report", str(plain)]) == 0
    text = capsys.readouterr().out
    assert "interrupt context" not in text and "negative" not in text and "ring-buffer" not in text
