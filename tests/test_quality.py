"""One quality module: tasa_edge.quality against direct float64 formulas, and the README's numbers
(tasa_edge.evaluate) against `tasa-edge bench` (devices.harness) on the same files and samples."""

from __future__ import annotations

import numpy as np
import pytest

from tasa_edge import quality


def _lsm64(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@pytest.fixture
def logits():
    rng = np.random.default_rng(0)
    ref = rng.normal(0, 3, (57, 1000)).astype(np.float32)
    q = ref + rng.normal(0, 0.7, ref.shape).astype(np.float32)
    tgt = rng.integers(0, 1000, 57)
    return ref, q, tgt


def test_log_softmax_matches_float64(logits):
    ref, _, _ = logits
    lp = quality.log_softmax(ref)
    assert lp.dtype == np.float32 and lp.shape == ref.shape
    np.testing.assert_allclose(lp, _lsm64(ref), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.exp(lp.astype(np.float64)).sum(-1), 1.0, atol=1e-5)


def test_kl_top1_targets_match_float64_formulas(logits):
    ref, q, tgt = logits
    lp16, tgt_lp, top1 = quality.reference_rows(ref, tgt)
    assert lp16.dtype == np.float16 and tgt_lp.dtype == np.float32 and top1.dtype == np.int32
    lp64, lq64 = _lsm64(ref), _lsm64(q)
    idx = np.arange(tgt.size)
    np.testing.assert_allclose(tgt_lp, lp64[idx, tgt], rtol=1e-6, atol=1e-5)
    assert np.array_equal(top1, lp64.argmax(-1))
    kl, same, lq_t = quality.score_rows(lp16, top1, q, tgt)
    assert kl.dtype == np.float64
    # KL(P_ref || P_q) with the reference as stored (float16), then with the exact reference
    s64 = lp16.astype(np.float64)
    np.testing.assert_allclose(kl, (np.exp(s64) * (s64 - lq64)).sum(-1), rtol=1e-5, atol=1e-7)
    exact = (np.exp(lp64) * (lp64 - lq64)).sum(-1)
    assert abs(kl.mean() - exact.mean()) < 2e-3 * exact.mean()      # float16 store error
    assert np.array_equal(same, lq64.argmax(-1) == lp64.argmax(-1))
    np.testing.assert_allclose(lq_t, lq64[idx, tgt], rtol=1e-6, atol=1e-5)

    m = quality.summarize(lq_t, kl, same, tgt_lp)
    assert m["n"] == tgt.size
    assert m["kld"] == pytest.approx(kl.mean(), rel=1e-12)
    assert m["kld_se"] == pytest.approx(kl.std(ddof=1) / np.sqrt(kl.size), rel=1e-12)
    assert m["kld_p99"] == pytest.approx(np.quantile(kl, 0.99), rel=1e-12) and m["kld_max"] == kl.max()
    assert m["top1"] == pytest.approx(same.mean())
    assert m["top1_se"] == pytest.approx(same.std(ddof=1) / np.sqrt(same.size), rel=1e-12)
    assert m["ppl"] == pytest.approx(np.exp(-lq64[idx, tgt].mean()), rel=1e-5)
    assert m["ppl_ref"] == pytest.approx(np.exp(-lp64[idx, tgt].mean()), rel=1e-5)
    assert m["delta_p"] == pytest.approx((np.exp(lq64[idx, tgt]) - np.exp(lp64[idx, tgt])).mean(), abs=1e-6)
    assert quality.compare_logits(ref, q, tgt) == m


def test_rows_are_independent_of_chunking(logits):
    """Row-wise functions: scoring in blocks (the harness' chunks, one sequence at a time) gives
    the same bits as scoring everything at once."""
    ref, q, tgt = logits
    whole = quality.score_rows(*quality.reference_rows(ref, tgt)[::2], q, tgt)
    parts = []
    for a, b in ((0, 20), (20, 21), (21, 57)):
        lp, _, top1 = quality.reference_rows(ref[a:b], tgt[a:b])
        parts.append(quality.score_rows(lp, top1, q[a:b], tgt[a:b]))
    for i in range(3):
        assert np.array_equal(whole[i], np.concatenate([p[i] for p in parts]))


def test_identity_and_no_reference(logits):
    ref, _, tgt = logits
    m = quality.compare_logits(ref, ref, tgt)
    assert abs(m["kld"]) < 1e-3 and m["top1"] == 1.0 and m["delta_p"] == pytest.approx(0, abs=1e-3)
    no_t = quality.compare_logits(ref, ref)
    assert set(no_t) == {"n", "kld", "kld_se", "kld_p99", "kld_max", "top1", "top1_se"}
    lq_t = quality.target_logprobs(ref, tgt)
    assert quality.summarize(lq_t) == {"n": tgt.size, "ppl": quality.perplexity(lq_t)}
    with pytest.raises(ValueError, match="vocabulary size 999"):
        quality.score_rows(quality.reference_rows(ref)[0], np.zeros(57), ref[:, :999])
    assert quality.std_error(np.array([1.0])) == 0.0


def test_general_text_is_scored_on_the_second_half_of_its_window_as_llama_perplexity():
    """General text: one window, its second half scored (llama-perplexity's ``first = n_ctx/2``:
    logits n_ctx/2 .. n_ctx-2 predict tokens n_ctx/2+1 .. n_ctx-1), with or without a BOS; a task
    sample: the answer tokens after the question; too short to leave a token: None."""
    from tasa_edge.data import TextSample
    from tasa_edge.evaluate import sample_tokens

    def tok_bos(t):   # one token per word, BOS 0 first
        return [0] + [len(w) + 1 for w in t.split()]

    def tok_plain(t):
        return [len(w) + 1 for w in t.split()]

    doc = TextSample("enwiki", "enwiki:1", "", " ".join(["w"] * 300))
    for tok, bos in ((tok_bos, 1), (tok_plain, 0)):
        ids, start = sample_tokens(tok, doc, 128)
        assert len(ids) == 128 and start == 65          # 63 tokens scored, as llama-perplexity -c 128
        ids, start = sample_tokens(tok, TextSample("enwiki", "e:2", "", "a bb ccc dddd e"), 128)
        assert len(ids) == 5 + bos and start == len(ids) // 2 + 1
    task = TextSample("gsm8k", "gsm8k:1", "Question: two words\nAnswer:", " forty two")
    ids, start = sample_tokens(tok_bos, task, 128)
    assert start == len(tok_bos(task.prompt)) == 5 and ids[start:] == tok_bos(" forty two")[1:]
    assert sample_tokens(tok_plain, TextSample("enwiki", "e:3", "", "one"), 128) is None


@pytest.mark.slow
def test_readme_numbers_and_bench_give_identical_kld(tmp_path, smollm, smollm_f32):
    """The README's path (tasa_edge.evaluate) and `tasa-edge bench` (devices.harness: tokenizer,
    reference child, model child, chunk files, aggregate) on the same Q4_0 file and held-out
    samples report the same KLD, top-1, perplexities and Δp: equal floats, not approximately.

    Uniform Q5_0: on some x86 hosts with AMX / AVX512-VNNI, llama-cpp-python 0.3.36's batched
    kernels for Q4_0 / Q4_1 / Q8_0 / K-quants crash (a bare ``Llama.eval`` of 59 tokens); Q5_0 runs
    everywhere, and the equality does not depend on the type."""
    from devices.harness import TASK_CTX, Size, Tokenizer, bench, eval_samples
    from exporters.gguf_export import export_gguf
    from tasa_edge.evaluate import kld_vs_reference, reference_logprobs
    from tasa_edge.plan import BitPlan

    size = Size("tiny", pp=8, tg=2, reps=1, general_docs=2, general_tokens=64, task_examples=3,
                gsm8k_examples=0, shots=0, max_gen_tokens=0)
    qf = tmp_path / "smollm2-Q5_0.gguf"
    export_gguf(smollm, BitPlan.uniform(smollm, "Q5_0"), qf, show_progress=False)
    rep = bench([qf], reference=smollm_f32, size=size, threads=1, out_dir=tmp_path / "bench", show_progress=False)
    e = rep["models"][0]
    assert e["error"] is None
    tok = Tokenizer("gguf", smollm_f32)
    start0 = max(1, len(tok("")))
    tok.close()
    samples = eval_samples(size)
    for set_name, max_tokens in (("task", TASK_CTX), ("general", size.general_tokens + start0)):
        ref = reference_logprobs(smollm_f32, samples[set_name], max_tokens, n_threads=1)
        readme = kld_vs_reference(ref, qf, n_threads=1)
        benched = e["quality"][set_name]
        print(f"\n{set_name}: README path {readme}\n{set_name}: tasa-edge bench {benched}")
        assert readme["n"] > 20 and readme["kld"] > 0.01
        assert readme == benched
        # the README's default threading (every core) scores the same bits
        assert kld_vs_reference(ref, qf)["kld"] == benched["kld"]


@pytest.mark.slow
def test_first_position_script_second_half_is_what_the_readme_path_scores(smollm_path, smollm_f32):
    """benchmarks/first_position.py's "second half" is the general KLD that tasa_edge.evaluate
    reports (same positions; float64 against the float16 store: within 1%), and its whole-document
    mean contains the first position; bad input ends with one line and exit 2."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "benchmarks"))
    from first_position import by_position

    from tasa_edge.data import load_general
    from tasa_edge.evaluate import kld_vs_reference, reference_logprobs

    docs = load_general("eval")[:3]
    r = by_position(smollm_f32, smollm_path, docs, 64, 1)
    k = kld_vs_reference(reference_logprobs(smollm_f32, docs, 64, n_threads=1), smollm_path, n_threads=1)
    assert k["n"] == r["half_positions"] and r["positions"] > 1.9 * r["half_positions"]
    assert r["half"] == pytest.approx(k["kld"], rel=0.01) and k["kld"] > 0
    assert 0 < r["first_share"] < 1 and r["first_mean"] > 0
    p = subprocess.run([sys.executable, str(root / "benchmarks/first_position.py"), "--model", "smollm2-135m",
                        "--docs", "0"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "--docs" in p.stderr
