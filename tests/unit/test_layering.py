"""The tree's house rule: no package imports upward.

    model     records, statistics, units, exit-reason names, the PF/VF filter
    capture   capture files and the user's output files          (model)
    kernel    BPF loading, hook planning, feature probes         (model)
    metrics   the Prometheus endpoint over the statistics        (model)
    pfsched   pf_sched's sysfs and debugfs                       (-)
    record    the recording session and its front ends           (model capture kernel pfsched
                                                                  metrics)
    report    reports and exports of captures                    (model capture)
    lab       the VM runner, its presets and workloads           (all of the above but report)
    tui       the dashboard                                      (model capture record metrics)

``tracer/__init__.py`` (the version), ``errors.py`` and ``paths.py`` import nothing of
vftrace and every package but ``model`` may use them; ``tracer/cli.py`` is the front door
and may import anything.  Every import counts, a function's lazy one too.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BASE = "base"
CLI = "cli"
PACKAGES = ("model", "capture", "kernel", "metrics", "pfsched", "record", "report", "lab")
ALLOWED = {
    BASE: set(),
    "model": set(),
    "capture": {BASE, "model"},
    "kernel": {BASE, "model"},
    "metrics": {BASE, "model"},
    "pfsched": {BASE},
    "record": {BASE, "model", "capture", "kernel", "metrics", "pfsched"},
    "report": {BASE, "model", "capture"},
    "lab": {BASE, "model", "capture", "kernel", "metrics", "pfsched", "record"},
    "tui": {BASE, "model", "capture", "metrics", "record"},
    CLI: {BASE, *PACKAGES, "tui"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def layer(module: str) -> str | None:
    """The layer a module of vftrace belongs to; None for anything not vftrace's."""
    parts = module.split(".")
    if parts[0] == "tui":
        return "tui"
    if parts[0] != "tracer":
        return None
    if len(parts) == 1 or parts[1] in ("errors", "paths"):
        return BASE
    if parts[1] == "cli":
        return CLI
    if parts[1] in PACKAGES:
        return parts[1]
    raise AssertionError(f"{module}: in no layer; put it in one of tracer's packages "
                         f"({', '.join(PACKAGES)}) or add it to this test's rule")


def exists(module: str) -> bool:
    path = REPO.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported(source: str, module: str, package: bool) -> list[tuple[int, str]]:
    """(line, module) for every import in ``source``, relative ones resolved against
    ``module``; ``from X import name`` counts as ``X.name`` where that is a module."""
    here = module.split(".") if package else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((node.lineno, sub if exists(sub) else target))
    return found


def upward(source: str, module: str, package: bool = False) -> list[str]:
    mine = layer(module)
    return [f"{module}:{line} imports {target} ({layer(target)}), which {mine} may not use"
            for line, target in imported(source, module, package)
            if layer(target) not in (None, mine) and layer(target) not in ALLOWED[mine]]


SOURCES = sorted([*REPO.glob("tracer/**/*.py"), *REPO.glob("tui/**/*.py")])


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_module_imports_upward(path):
    problems = upward(path.read_text(), module_name(path), is_package(path))
    assert not problems, "\n".join(problems)


def test_tracer_holds_its_packages_and_only_the_shared_modules_beside_them():
    # A folder with no source in it (a moved module's stale __pycache__) is not a package.
    top = {p.name for p in (REPO / "tracer").iterdir()
           if p.suffix == ".py" or (p.is_dir() and any(p.glob("*.py")))}
    assert top == {"__init__.py", "cli.py", "errors.py", "paths.py", *PACKAGES}, top


@pytest.mark.parametrize("module, source, says", [
    ("tracer.report.load", "from tracer.record.session import check_output\n",
     "tracer.record.session (record), which report may not use"),
    ("tracer.report.tables", "def f():\n    from ..kernel import engine\n",
     "tracer.kernel.engine (kernel), which report may not use"),
    ("tracer.model.stats", "from .. import errors\n", "tracer.errors (base), which model"),
    ("tracer.kernel.engine", "from tracer import lab\n", "tracer.lab (lab), which kernel"),
    ("tui.store", "import tracer.lab.vm\n", "tracer.lab.vm (lab), which tui may not use"),
])
def test_the_rule_sees_upward_imports_of_every_form(module, source, says):
    (found,) = upward(source, module)
    assert says in found


def test_the_rule_lets_a_package_use_itself_and_what_lies_below():
    assert upward("from .schema import COLUMNS\n", "tracer.model.stats") == []
    assert upward("from ..capture.files import meta_path\nfrom .. import __version__\n"
                  "from ..kernel import probes\n", "tracer.record.session") == []
    assert upward("import numpy\nfrom textual.app import App\n", "tui.app") == []
