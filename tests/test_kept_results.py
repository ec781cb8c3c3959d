"""The benchmark results a later session resumes from are committed, not ignored: the evidence
run's state (an ignored imatrix.gguf there was lost with its machine), the device runs' analyses and
their profiles' progress files (the repetitions benchmarks/decode_spread.py reads); the large files
beside them stay ignored."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

KEPT = [
    "benchmarks/evidence/some-model/state/analysis-gsm8k/analysis.json",
    "benchmarks/evidence/some-model/state/analysis-gsm8k/imatrix.gguf",
    "benchmarks/evidence/some-model/state/plans/tasa-3.5.plan.json",
    "benchmarks/evidence/some-model/state/kld/tasa-3.5.gsm8k.json",
    "benchmarks/evidence/some-model/state/eval/tasa-3.5-gsm8k/generations.jsonl",
    "benchmarks/device/analysis-some-model/analysis.json",
    "benchmarks/device/analysis-some-model/imatrix.gguf",
    "benchmarks/device/some-model.profile-progress.json",     # a profile's repetitions (decode_spread.py)
]
IGNORED = [
    "benchmarks/evidence/some-model/work/tasa-3.5.gguf",
    "benchmarks/evidence/some-model/state/eval/tasa-3.5-gsm8k/task/gsm8k_eval.jsonl",
    "benchmarks/device/analysis-some-model/gradstats-0-0.safetensors",
]


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_resumable_results_are_committed_and_large_files_ignored():
    def ignored(path: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT).returncode == 0

    assert [p for p in KEPT if ignored(p)] == []
    assert [p for p in IGNORED if not ignored(p)] == []
