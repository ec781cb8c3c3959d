"""Data-parallel analysis over torch.distributed: torchrun with 2 gloo ranks on CPU gives the
analysis of one process; bad jobs (a rank that dies, never joins, or analyses another model) end
with one line and no analysis.json."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--n-general", "4", "--n-task", "4", "--n-target", "2", "--max-tokens", "128", "--formats", "Q4_0,Q8_0"]
#: the stated tolerance of a 2-rank analysis against one process: the same per-sample gradients
#: (same kernels, one thread each), Fisher sums added in another order
RTOL = 1e-4


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(TASA_NO_PROGRESS="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)
    return env


def _cli(*args, env=None, timeout=900):
    return subprocess.run([sys.executable, "-m", "tasa_edge.cli", *args], cwd=ROOT, env=env or _env(),
                          capture_output=True, text=True, timeout=timeout)


def _torchrun(n: int, *args, timeout=900):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
                           "-m", "tasa_edge.cli", *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, *args) -> subprocess.Popen:
    """One rank started as a launcher (srun, a hand-written script) starts it: env:// variables."""
    env = _env(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port))
    return subprocess.Popen([sys.executable, "-m", "tasa_edge.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _one_error_line(stderr: str, needle: str) -> None:
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not re.match(r"rank \d+/\d+ joined \(", ln)]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and needle in lines[0], stderr


@pytest.mark.slow
def test_two_gloo_ranks_under_torchrun_give_the_analysis_of_one_process(tmp_path):
    one = _cli("analyze", "smollm2-135m", *ARGS, "-o", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    two = _torchrun(2, "analyze", "smollm2-135m", *ARGS, "-o", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr
    assert "rank 0/2 joined (gloo)" in two.stderr and "rank 1/2 joined (gloo)" in two.stderr
    a = json.loads((tmp_path / "one" / "analysis.json").read_text())
    b = json.loads((tmp_path / "two" / "analysis.json").read_text())

    assert b["timings"]["ranks"] == 2 and b["timings"]["n_backward"] == a["timings"]["n_backward"] == 10
    assert b["mixture"]["chosen"] == a["mixture"]["chosen"]
    for ca, cb in zip(a["mixture"]["candidates"], b["mixture"]["candidates"], strict=True):
        assert cb["members"] == ca["members"]
        assert cb["score"] == pytest.approx(ca["score"], rel=RTOL, abs=1e-7)
    for col in ("ppl", "task"):
        ta, tb = a["table"][col], b["table"][col]
        assert list(tb) == list(ta)                    # every tensor, in the one-process order
        x = np.array([ta[n][f] for n in ta for f in ta[n]])
        y = np.array([tb[n][f] for n in ta for f in ta[n]])
        np.testing.assert_allclose(y, x, rtol=RTOL)
    assert b["table"]["bytes"] == a["table"]["bytes"]
    # rank 0 alone wrote the outputs; each rank kept the cache of its share
    assert sorted(p.name.split(".", 1)[1] for p in (tmp_path / "two").glob("gradstats-*")) == [
        "rank0of2.safetensors", "rank1of2.safetensors", "safetensors"]
    assert (tmp_path / "two" / "imatrix.gguf").is_file()

    # resume: the merged cache serves a second job (and one process) without a backward pass
    again = _torchrun(2, "analyze", "smollm2-135m", *ARGS, "-o", str(tmp_path / "two"))
    assert again.returncode == 0, again.stderr
    c = json.loads((tmp_path / "two" / "analysis.json").read_text())
    assert c["timings"]["n_backward"] == 0 and c["timings"]["n_cached"] == 10
    assert c["table"] == b["table"]
    solo = _cli("analyze", "smollm2-135m", *ARGS, "-o", str(tmp_path / "two"))
    assert solo.returncode == 0, solo.stderr
    assert json.loads((tmp_path / "two" / "analysis.json").read_text())["timings"]["n_backward"] == 0


@pytest.mark.slow
def test_a_rank_that_dies_ends_the_job_with_one_line_and_no_analysis(tmp_path):
    port = _free_port()
    args = ["analyze", "smollm2-135m", *ARGS, "-o", str(tmp_path), "--dist-timeout", "120"]
    r0, r1 = _rank(0, 2, port, *args), _rank(1, 2, port, *args)
    try:
        for line in r1.stderr:                         # rank 1 has joined the job: now it dies
            if "joined" in line:
                break
        r1.send_signal(signal.SIGKILL)
        r1.wait(30)
        _, err = r0.communicate(timeout=600)
    finally:
        for p in (r0, r1):
            if p.poll() is None:
                p.kill()
    assert r0.returncode == 1, err
    _one_error_line(err, "distributed analysis failed: a rank left the job")
    assert not (tmp_path / "analysis.json").exists()


def test_a_rank_that_never_joins_times_out_with_one_line(tmp_path):
    p = _rank(0, 2, _free_port(), "analyze", "smollm2-135m", *ARGS, "-o", str(tmp_path), "--dist-timeout", "5")
    _, err = p.communicate(timeout=300)
    assert p.returncode == 1, err
    _one_error_line(err, "could not join the job")
    assert not (tmp_path / "analysis.json").exists()


@pytest.mark.slow
def test_ranks_that_analyse_different_models_are_refused(tmp_path):
    port = _free_port()
    ps = [_rank(0, 2, port, "analyze", "smollm2-135m", *ARGS, "-o", str(tmp_path)),
          _rank(1, 2, port, "analyze", "gemma3-270m", *ARGS, "-o", str(tmp_path))]
    errs = [p.communicate(timeout=600)[1] for p in ps]
    for p, err in zip(ps, errs):
        assert p.returncode == 2, err
        _one_error_line(err, "rank(s) 1 have another model, configuration or sample pools than rank 0")
    assert not (tmp_path / "analysis.json").exists()
