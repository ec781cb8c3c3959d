"""bench's summary table on a narrow terminal: file names are never cut to "…" (numbered rows and
the names listed whole below the table when they do not fit)."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

import devices.cli as dcli

NAMES = ["SmolLM2-135M-Instruct-tasa-4.6bpw-with-imatrix.gguf", "SmolLM2-135M-Instruct-llama.cpp-Q4_K_M.gguf",
         "model-onnx-int4_b32-accuracy-level-4"]


def _report():
    models = []
    for i, n in enumerate(NAMES):
        models.append({"name": n, "file_bytes": 80 * 2**20 + i, "bpw": 4.6, "load_s": 0.1, "peak_rss_bytes": 2**28,
                       "speed": {"pp": {"ts_mean": 512.3}, "tg": {"ts_mean": 61.2}},
                       "quality": {"general": {"kld": 0.05}, "task": {"kld": 0.02, "top1": 0.9}},
                       "gsm8k": {"flexible_extract": 0.25}})
    models.append({"name": "broken-" + NAMES[0], "file_bytes": 1, "error": "boom"})
    return {"machine": {"cpu": "test cpu", "threads": 2}, "settings": {"pp": 64, "tg": 16},
            "target": {"kind": "local"}, "models": models}


@pytest.mark.parametrize("columns", ["40", "60", "100", "250"])
def test_names_are_never_truncated(monkeypatch, columns):
    monkeypatch.setenv("COLUMNS", columns)
    buf = io.StringIO()
    monkeypatch.setattr(dcli, "console", Console(file=buf))
    dcli.print_summary(_report())
    text = buf.getvalue()
    assert "…" not in text
    lines = text.splitlines()
    for n in NAMES:
        # whole on one line: in the table when it fits, else in the numbered list below it
        assert any(n in ln for ln in lines), (n, text)
    legend = [ln for ln in lines if ln.startswith("#")]
    if int(columns) >= 250:
        assert not legend and any(NAMES[0] in ln and "│" in ln for ln in lines)
    else:
        assert legend == [f"#{i} {n}" for i, n in enumerate(NAMES + ["broken-" + NAMES[0]], 1)]
