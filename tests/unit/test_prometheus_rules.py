"""deploy/prometheus: the rule files and the example config pass promtool's checks, and
the rules' unit tests (tests/vftrace-rules-test.yml: hand-computed quantiles, when the
alerts fire and when they do not) pass ``promtool test rules``."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from tests.need import need
from tracer.metrics.exposition import BOUNDS_NS, LE

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy" / "prometheus"
RULES = ("vftrace-rules.yml", "vftrace-alerts.yml")
CONFIG = "prometheus.yml"
UNIT_TESTS = ("tests/vftrace-rules-test.yml",)
NO_PROMTOOL = "promtool missing: install Debian's prometheus (make setup)"


def promtool(*args: str) -> None:
    exe = shutil.which("promtool")
    need(exe is not None, NO_PROMTOOL)
    proc = subprocess.run([exe, *args], cwd=DEPLOY, capture_output=True, text=True,
                          timeout=300)
    out = f"$ promtool {' '.join(args)}  (in {DEPLOY})\n{proc.stdout}{proc.stderr}"
    print(out)
    assert proc.returncode == 0, out


def test_rule_files_pass_promtool_check_rules():
    promtool("check", "rules", *RULES)


def test_example_config_passes_promtool_check_config():
    promtool("check", "config", CONFIG)


def test_rule_unit_tests_pass():
    promtool("test", "rules", *UNIT_TESTS)


def test_unit_test_histograms_have_the_exposition_buckets():
    """Each input histogram lists every bound the exposition serves, in order, as the
    exposition spells it (le="1e-07"): otherwise histogram_quantile would interpolate
    over other buckets than a real scrape's, and the hand-computed values would not
    hold for vftrace's metrics."""
    want = [LE[b] for b in BOUNDS_NS] + ["+Inf"]
    series: dict[str, list[str]] = {}
    for path in UNIT_TESTS:
        for m in re.finditer(r"series: '(vftrace_\w+_bucket)\{([^}]*)\}'", (DEPLOY / path).read_text()):
            labels = m.group(2).split(",")
            le = [v for v in labels if v.startswith("le=")]
            assert len(le) == 1, m.group(0)
            rest = ",".join(v for v in labels if not v.startswith("le="))
            series.setdefault(f"{path}: {m.group(1)}{{{rest}}}", []).append(le[0][4:-1])
    assert series, "no histogram buckets in the rules' unit tests"
    for name, les in series.items():
        assert les == want, f"{name}: le values differ from tracer/metrics/exposition.py"
