"""The global --quiet flag: no progress bars, the same as TASA_NO_PROGRESS=1."""

from __future__ import annotations

import os

from typer.testing import CliRunner

from tasa_edge import progress
from tasa_edge.cli import app


def test_quiet_sets_tasa_no_progress_and_bars_are_off(monkeypatch):
    monkeypatch.delenv("TASA_NO_PROGRESS", raising=False)
    drawn = []
    monkeypatch.setattr(progress, "Progress", lambda *a, **k: drawn.append(1))   # would draw a bar
    res = CliRunner().invoke(app, ["--quiet", "--version"])
    assert res.exit_code == 0 and "tasa-edge" in res.output
    assert os.environ.get("TASA_NO_PROGRESS") == "1"          # children (bench workers) inherit it
    with progress.progress_bar("work", 10) as advance:
        advance(5)
    assert drawn == []


def test_quiet_and_verbose_are_in_the_help():
    out = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"}).output
    assert "--quiet" in out and "--verbose" in out and "TASA_NO_PROGRESS" in out
