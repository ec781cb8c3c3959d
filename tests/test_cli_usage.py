"""Usage errors (unknown command or option, missing or malformed argument) print the usage
message and exit 2, never a traceback; user errors from --bpw/--bytes and output paths are one
line, refused before any work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd=None):
    env = {**os.environ, "TASA_NO_PROGRESS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "tasa_edge.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd or ROOT, env=env, timeout=300)


USAGE_CASES = {
    "unknown command": (["bogus"], "No such command"),
    "unknown option": (["analyze", "X", "--no-such-option"], "No such option: --no-such-option"),
    "unknown root option": (["--frobnicate"], "No such option"),
    "missing argument": (["export"], "Missing argument"),
    "missing option value": (["export", "m", "-o"], "requires an argument"),
    "missing required option": (["baseline", "smollm2-135m"], "Missing option"),
    "malformed integer": (["export", "m", "-o", "x.gguf", "--threads", "abc"], "Invalid value for '--threads'"),
    "malformed float": (["plan", "m", "--bpw", "four"], "Invalid value for '--bpw'"),
    "extra argument": (["inspect", "a", "b"], "unexpected extra argument"),
}


@pytest.mark.parametrize("args,needle", USAGE_CASES.values(), ids=USAGE_CASES.keys())
def test_usage_error_prints_usage_and_exits_2(args, needle):
    res = run_cli(*args)
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr + res.stdout
    assert "Error:" in res.stderr
    if "requires an argument" not in needle:  # click prints no usage line for a dangling option
        assert "Usage:" in res.stderr
    assert needle.lower() in res.stderr.lower(), res.stderr


def test_no_arguments_shows_help_without_traceback():
    res = run_cli()
    assert res.returncode in (0, 2)
    assert "Traceback" not in res.stderr + res.stdout
    assert "Usage:" in res.stdout + res.stderr


def test_version_exits_0():
    res = run_cli("--version")
    assert res.returncode == 0 and "tasa-edge" in res.stdout


def _one_line(res):
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    return lines[0]


def test_directory_as_gguf_output_is_refused_before_work(tmp_path):
    d = tmp_path / "adir"
    d.mkdir()
    line = _one_line(run_cli("export", "smollm2-135m", "--type", "Q8_0", "-o", d))
    assert "is a directory" in line
    assert list(d.iterdir()) == []


def test_file_as_output_parent_is_refused(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    line = _one_line(run_cli("baseline", "smollm2-135m", "-o", f / "out.gguf"))
    assert "not a directory" in line


def test_file_as_onnx_output_directory_is_refused(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    line = _one_line(run_cli("export", "smollm2-135m", "--format", "onnx", "--type", "int4_b32", "-o", f))
    assert "not a directory" in line


@pytest.mark.parametrize("flag,value,needle", [
    ("--bpw", "1e9", "(0, 32]"), ("--bpw", "0", "(0, 32]"), ("--bpw", "nan", "(0, 32]"),
    ("--bytes", "1", "never quantized"),
])
def test_impossible_budget_is_refused(tmp_path, flag, value, needle):
    """The budget is checked before the plan is solved (needs a valid analysis to get there)."""
    an = _tiny_analysis(tmp_path)
    line = _one_line(run_cli("plan", "smollm2-135m", "-a", an, "-o", tmp_path / "p.json", flag, value))
    assert needle in line
    assert not (tmp_path / "p.json").exists()


def _tiny_analysis(tmp_path: Path) -> Path:
    """A schema-valid analysis.json for smollm2 (every quantizable tensor, one format)."""
    from synthetic import write_analysis
    from tasa_edge.model import ModelSource
    from tasa_edge.zoo import resolve_model

    src = ModelSource.open(resolve_model("smollm2-135m"))
    one = {t.name: {"Q8_0": 1.0} for t in src.quantizable}
    return write_analysis(src, tmp_path / "analysis.json", one, one, {n: {"Q8_0": 100} for n in one})
