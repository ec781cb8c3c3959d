"""A one-way package graph: tasa_edge (core) <- exporters <- devices; only tasa_edge/cli.py, the
command line, imports exporters and devices from the core.  Checked on the source (every import
statement, also those inside functions), so no test run is needed to notice a new back edge."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: back edges from the core that predate this rule and are being removed by the redesign in
#: progress (issue 10: the format registry / model / analysis split); no new ones.
PENDING = {"exporters.hf_convert", "exporters.onnx_export"}


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
    return out


def _offenders(package: str, forbidden: tuple[str, ...], allowed=frozenset(), skip=()) -> list[str]:
    bad = []
    for f in sorted((ROOT / package).rglob("*.py")):
        rel = f.relative_to(ROOT).as_posix()
        if rel in skip:
            continue
        for mod in sorted(_imports(f)):
            if mod.split(".")[0] in forbidden and mod not in allowed:
                bad.append(f"{rel} imports {mod}")
    return bad


def test_core_imports_neither_exporters_nor_devices():
    assert _offenders("tasa_edge", ("exporters", "devices"), PENDING, skip=("tasa_edge/cli.py",)) == []


def test_exporters_do_not_import_devices():
    assert _offenders("exporters", ("devices",)) == []


def test_quality_module_is_pure_numpy():
    mods = _imports(ROOT / "tasa_edge" / "quality.py")
    assert not {m.split(".")[0] for m in mods} & {"torch", "llama_cpp", "onnxruntime", "exporters", "devices"}


def test_test_double_is_not_in_the_package():
    assert not (ROOT / "devices" / "pybench.py").exists() and (ROOT / "tests" / "fakes" / "pybench.py").exists()
