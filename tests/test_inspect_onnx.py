"""`tasa-edge inspect` on an ONNX export directory: the per-tensor formats of its tasa_export.json,
sized by the format registry; a directory that is not an export is a one-line error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tasa_edge.errors import TasaError
from tasa_edge.inspect import inspect_path

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args):
    env = {**os.environ, "TASA_NO_PROGRESS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "tasa_edge.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    from test_onnx_export import _tiny_hf_model

    from exporters.onnx_export import export_onnx
    from tasa_edge.model import ModelSource
    from tasa_edge.plan import BitPlan

    d = tmp_path_factory.mktemp("onnx")
    _tiny_hf_model("qwen3", d / "hf")                      # tied embeddings
    src = ModelSource.open(d / "hf")
    plan = BitPlan.uniform(src, "int4_b32", target="onnx")
    plan.tensors[next(iter(plan.tensors))] = "int8_b32"
    res = export_onnx(src, plan, d / "model-onnx", show_progress=False)
    return src, plan, res


def test_inspect_onnx_directory_matches_the_export(tiny_export):
    src, plan, res = tiny_export
    rep = inspect_path(res.path)
    assert rep["bytes"] == res.tensor_bytes == rep["exported_tensor_bytes"]
    by_name = {r["name"]: r for r in rep["tensors"]}
    assert set(by_name) == set(src.tensors)
    for name, fmt in plan.tensors.items():
        assert by_name[name]["type"] == fmt
    assert rep["by_type"]["int8_b32"]["tensors"] == 1
    assert rep["file_bytes"] > 0


def test_inspect_onnx_directory_cli_table(tiny_export):
    _, _, res = tiny_export
    r = run_cli("inspect", res.path)
    assert r.returncode == 0, r.stderr
    assert "int4_b32" in r.stdout and "bits/weight" in r.stdout
    r = run_cli("inspect", res.path, "--json")
    assert json.loads(r.stdout)["bytes"] == res.tensor_bytes


def test_older_export_without_shapes_needs_model(tiny_export, tmp_path):
    import shutil

    _, _, res = tiny_export
    old = tmp_path / "old"
    shutil.copytree(res.path, old)
    info = json.loads((old / "tasa_export.json").read_text())
    del info["tensor_shapes"]
    (old / "tasa_export.json").write_text(json.dumps(info))
    with pytest.raises(TasaError, match="pass --model"):
        inspect_path(old)
    assert inspect_path(old, model=str(tiny_export[0].path))["bytes"] == res.tensor_bytes


def test_plain_directory_is_a_one_line_error(tmp_path):
    (tmp_path / "x.txt").write_text("x")
    r = run_cli("inspect", tmp_path)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "not a tasa-edge ONNX export" in lines[0], r.stderr
    assert "Is a directory" not in r.stderr
