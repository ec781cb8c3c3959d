"""The package graph flows one way: core (tasa_edge) <- exporters <- devices, with only the CLI
importing everything; planning, plan I/O and reports load no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tasa_edge", "exporters", "devices")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every module ``path`` imports, at any depth (function-level imports count too); ``from
    pkg import sub`` is an import of the submodule, not of the package."""
    mod = _module_name(path)
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = {f"{target}.{a.name}" for a in node.names}
            out.update(subs & modules)
            if subs - modules:
                out.add(target)
    return out


def _graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    mods = {_module_name(p): p for p in files}
    return {m: {i for i in _imports(p, set(mods)) if i in mods and i != m} for m, p in mods.items()}


def test_core_imports_exporters_and_devices_only_from_the_cli():
    bad = sorted(f"{m} imports {i}" for m, deps in _graph().items() if m.startswith("tasa_edge") and m != "tasa_edge.cli"
                 for i in deps if i.split(".")[0] in ("exporters", "devices"))
    assert not bad, bad


def test_exporters_do_not_import_devices():
    bad = sorted(f"{m} imports {i}" for m, deps in _graph().items() if m.startswith("exporters")
                 for i in deps if i.startswith("devices"))
    assert not bad, bad


def test_no_import_cycles():
    g = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for d in g[m]:
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


@pytest.mark.parametrize("module", ["tasa_edge.planner", "tasa_edge.plan", "tasa_edge.illusion", "devices.report"])
def test_planning_and_reports_load_no_torch(module):
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", f"{module} loads {r.stdout.strip()}"


def test_quality_module_is_pure_numpy():
    deps = {i.split(".")[0] for i in _imports(ROOT / "tasa_edge" / "quality.py", set())}
    assert not deps & {"torch", "llama_cpp", "onnxruntime", "exporters", "devices"}


def test_test_double_is_not_in_the_package():
    assert not (ROOT / "devices" / "pybench.py").exists() and (ROOT / "tests" / "fakes" / "pybench.py").exists()
