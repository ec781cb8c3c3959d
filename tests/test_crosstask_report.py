"""benchmarks/crosstask.py: paired test and the partial-results report, on hand-made results."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

crosstask = pytest.importorskip("crosstask")


def test_mcnemar_exact():
    r = crosstask.mcnemar([True, True, True, False, False], [False, False, True, False, True])
    assert (r["a_only"], r["b_only"], r["n"]) == (2, 1, 5)
    assert r["p"] == pytest.approx(1.0)  # 2 vs 1 discordant: two-sided binomial p = 1
    r = crosstask.mcnemar([True] * 8 + [False] * 2, [False] * 10)
    assert r["p"] == pytest.approx(2 * 0.5 ** 8)
    assert crosstask.mcnemar([True, False], [True, False])["p"] == 1.0


def test_report_marks_what_has_not_run(tmp_path):
    score = {"correct": 3, "n": 10, "accuracy": 0.3, "lo": 0.108, "hi": 0.603}
    res = {"model": "m", "args": {"bpw": 3.5}, "argv": ["--limit", "10"], "status": "partial (limited run)",
           "plans": {"tasa-gsm8k": {"bpw": 3.5, "kld": {"gsm8k": {"kld": 0.05}, "humaneval": {"kld": 0.07}},
                                    "eval": {"gsm8k": {"scores": {"flexible-extract": score, "strict-match": score}}}},
                     "ppl-only": {"bpw": 3.5}},
           "paired": {}, "missing": ["ppl-only on gsm8k"]}
    crosstask.report(res, tmp_path)
    md = (tmp_path / "results.md").read_text()
    assert "partial (limited run)" in md
    row = next(x for x in md.splitlines() if x.startswith("| tasa-gsm8k"))
    assert "0.300 [0.108, 0.603] (n=10)" in row and "0.0500" in row and row.count("not run") == 1
    row = next(x for x in md.splitlines() if x.startswith("| ppl-only"))
    assert row.count("not run") == 4
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "partial (limited run)"
