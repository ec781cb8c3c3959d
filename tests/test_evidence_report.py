"""benchmarks/evidence.py: the goal's three-valued verdict and the partial-results report, on hand-made results."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

evidence = pytest.importorskip("evidence")


def _res(vs_packaged: str | None, vs_q3: str | None, vs_q4: str | None = "inverted") -> dict:
    files = {"packaged": {"bpw": 4.9}, "tasa-3.5": {"bpw": 3.5}, "llama-Q3_K_M": {"bpw": 3.9}, "llama-Q4_K_S": {"bpw": 4.6}}
    paired = {}
    for name, v in (("tasa-3.5 vs packaged", vs_packaged), ("tasa-3.5 vs llama-Q3_K_M", vs_q3), ("tasa-3.5 vs llama-Q4_K_S", vs_q4)):
        if v is not None:
            paired[name] = {"gsm8k": {"verdict": v, "a_only": 1, "b_only": 1, "pvalue": 0.5}}
    return {"files": files, "paired": paired}


@pytest.mark.parametrize("vs_packaged,vs_q3,want", [
    ("inconclusive", "inverted", "met"),          # not below the packaged file, above the nearest mix
    ("inverted", "inverted", "met"),
    ("not inverted", "inverted", "not met"),      # significantly below the packaged file
    ("inconclusive", "not inverted", "not met"),  # the nearest mix is significantly better
    ("inconclusive", "inconclusive", "inconclusive"),
    (None, "inverted", "not run"),
])
def test_goal_verdict_uses_the_nearest_mix(vs_packaged, vs_q3, want):
    g = evidence.goal(_res(vs_packaged, vs_q3, vs_q4="not inverted"), 3.5, ["Q3_K_M", "Q4_K_S"])
    assert g["nearest_mix"] == "Q3_K_M" and g["verdict"] == want


def test_goal_not_run_without_the_tasa_file():
    res = _res("inverted", "inverted")
    del res["files"]["tasa-3.5"]["bpw"]
    assert evidence.goal(res, 3.5, ["Q3_K_M"])["verdict"] == "not run"


def test_report_marks_what_has_not_run():
    acc = {"correct": 3, "n": 10, "accuracy": 0.3, "lo": 0.108, "hi": 0.603}
    kld = {"estimate": 0.05, "lo": 0.04, "hi": 0.06}
    res = {"model": "m", "status": "partial (stopped; a re-run resumes)",
           "args": {"bpw": [3.0, 3.5, 4.0], "argv": ["--limit", "10"]},
           "files": {"packaged": {"bpw": 4.9, "eval": {"gsm8k": {"scores": {"flexible-extract": acc, "strict-match": acc}}}},
                     "tasa-3.5": {"bpw": 3.5, "kld": {"gsm8k": {"kld": kld}}},
                     "llama-Q3_K_M": {},
                     "humaneval-3.5": {"bpw": 3.5},
                     "seed1-3.5": {}},
           "paired": {}, "seeds": {}, "goal": {"verdict": "not run"},
           "missing": ["tasa-3.5 on gsm8k", "file llama-Q3_K_M"]}
    md = evidence.render(res)
    assert "partial (stopped; a re-run resumes)" in md and "--limit 10" in md
    lines = md.splitlines()
    row = next(x for x in lines if x.startswith("| packaged"))
    assert "0.300 [0.108, 0.603] (n=10)" in row and row.count("not run") == 2  # both KLDs
    row = next(x for x in lines if x.startswith("| tasa-3.5"))
    assert "0.0500 [0.0400, 0.0600]" in row and row.count("not run") == 3
    assert next(x for x in lines if x.startswith("| llama-Q3_K_M")).count("not made") == 1
    assert next(x for x in lines if x.startswith("| seed1-3.5")).count("not made") == 1
    assert "Not run yet: tasa-3.5 on gsm8k; file llama-Q3_K_M." in md
    assert "**not run**" in md
