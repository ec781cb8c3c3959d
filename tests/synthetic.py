"""Synthetic inputs for fast tests: an analysis.json with a given sensitivity table, written by
the real :class:`tasa_edge.results.Analysis` (so it is what ``analyze`` would write)."""

from __future__ import annotations

from pathlib import Path


def write_analysis(src, path: Path, ppl: dict, task: dict, nbytes: dict, target: str = "gguf") -> Path:
    """``ppl`` / ``task`` / ``nbytes``: tensor -> format -> value, for model ``src``."""
    from tasa_edge.results import Analysis, Candidate, Mixture, SensitivityTable

    table = SensitivityTable(ppl, task, nbytes, {})
    chosen = Candidate(0.5, 1, 0.0, 0.0, 0.0, [])
    Analysis(model={"fingerprint": src.fingerprint, "name": src.name}, config={"target": target},
             mixture=Mixture(0.5, [chosen], chosen), table=table, lam=0.5, imatrix=None).save(path)
    return path
