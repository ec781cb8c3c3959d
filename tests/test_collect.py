"""Gradient statistics of the analysis pass against a plain per-sample backward (tiny random llama)."""

from __future__ import annotations

import math

import pytest

from test_hf_convert import _bpe_tokenizer, _randomize_norms, tiny_llama  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def tiny_llama_tied(tmp_path_factory):
    """tiny_llama with the LM head tied to the token embedding (SmolLM2's and gemma-3's layout)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("tiny-llama-tied")
    n_tok = _bpe_tokenizer(d)
    cfg = LlamaConfig(vocab_size=n_tok + 12, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                      initializer_range=0.15, tie_word_embeddings=True, bos_token_id=1, eos_token_id=0)
    torch.manual_seed(1)
    model = LlamaForCausalLM(cfg)
    _randomize_norms(model, 1)
    model.save_pretrained(d)
    return d


@pytest.mark.parametrize("form,fisher_dtype,tied,head", [
    ("exact", "float32", False, "slices"), ("exact", "bfloat16", False, "slices"),
    ("factored", "float32", False, "slices"), ("block", "float32", False, "whole"),
    ("exact", "float32", True, "slices"), ("factored", "float32", True, "whole"),
    ("exact", "float32", True, "autograd"), ("exact", "float32", False, "autograd"),
    ("exact", "float32", True, "slices-bf16"), ("factored", "float32", False, "slices-bf16"),
    ("exact", "float32", False, "slices-rows"), ("factored", "float32", False, "slices-rows-bf16"),
    ("exact", "float32", True, "slices-rows"), ("exact", "float32", False, "slices-rows-ckpt"),
    ("factored", "float32", True, "autograd-ckpt"), ("exact", "float32", True, "slices-bf16-ckpt")])
def test_collect_matches_plain_backward_and_frees_gradients(tiny_llama, tiny_llama_tied, monkeypatch, form,
                                                            fisher_dtype, tied, head):  # noqa: F811
    """Traces and Fisher statistics equal those of a plain dense backward per sample, for an
    untied embedding (sparse rows) and a tied one (LM head gradient + the embedding's rows); the
    LM head done by hand in vocabulary slices of a few rows, in one slice, or through autograd;
    with the decoder layers checkpointed (recomputed in the backward pass) or not."""
    import torch

    from tasa_edge import analysis
    from tasa_edge.analysis import collect, encode, encode_pools, special_prefix

    ckpt = head.endswith("-ckpt")
    head = head.removesuffix("-ckpt")
    dtype = "bfloat16" if head.endswith("-bf16") else "float32"
    head = head.removesuffix("-bf16")
    emb_rows = head.endswith("-rows")          # the untied embedding read from the file by rows
    head = head.removesuffix("-rows")
    if head == "slices":
        monkeypatch.setattr(analysis.ChunkedHead, "CHUNK", 300)     # 4-5 vocabulary rows per slice
    elif head == "autograd":
        monkeypatch.setattr(analysis.ChunkedHead, "of", classmethod(lambda cls, model, by_param: None))
    calls = []
    by_hand = analysis.ChunkedHead.backward
    monkeypatch.setattr(analysis.ChunkedHead, "backward", lambda self, *a: calls.append(1) or by_hand(self, *a))
    from tasa_edge.results import AnalysisConfig
    from tasa_edge.data import TextSample
    from tasa_edge.model import ModelSource
    from tasa_edge.torch_model import gguf_params, load_torch_model

    src = ModelSource.open(tiny_llama_tied if tied else tiny_llama)
    model, tok = load_torch_model(src, device="cpu", dtype=dtype, embedding_rows=emb_rows)
    params = gguf_params(model, src)
    assert ("output.weight" in params) != tied and "token_embd.weight" in params
    # (a tied embedding is the LM head: always loaded whole)
    assert (params["token_embd.weight"].device.type == "meta") == (emb_rows and not tied)
    pools = {
        "general": [TextSample("enwiki", "g:1", "", "The quick brown fox jumps over the lazy dog."),
                    TextSample("enwiki", "g:2", "", "Paris is the capital of France, and Berlin of Germany.")],
        "task": [TextSample("gsm8k", "t:1", "Question: 2 and 2?\nAnswer:", " 2 + 2 = 4\n#### 4")],
        "target": [TextSample("gsm8k", "t:2", "Question: 3 and 3?\nAnswer:", " 3 + 3 = 6\n#### 6")],
    }
    cfg = AnalysisConfig(max_tokens=32, sketch_k=4, fisher=form, fisher_dtype=fisher_dtype, dtype=dtype,
                         checkpoint="on" if ckpt else "off")
    runs = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *a: runs.append(1))
    st = collect(model, encode_pools(tok, pools, cfg.max_tokens), params, pools, cfg, cache=None, show_progress=False)

    # checkpointed: the layer ran again in each backward pass (and the imatrix below counts it once)
    assert len(runs) == (8 if ckpt else 4)
    # nothing is left behind: no gradient buffers, no parameter requiring grad, no wrapped forward
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert all("forward" not in vars(m) for m in model.modules())
    assert st.n == {"general": 2, "task": 1}
    assert set(st.roles) == {"g:1", "g:2", "t:1", "t:2"}
    assert len(calls) == (0 if head == "autograd" else 4)

    # the reference: a plainly loaded model's dense gradients
    model, _ = load_torch_model(src, device="cpu", dtype=dtype)
    params = gguf_params(model, src)
    names = list(params)
    gen = torch.Generator().manual_seed(cfg.seed)
    sk = {}
    for n in names:
        rows, cols = params[n].shape
        sk[n] = (torch.randn(cfg.sketch_k, rows, generator=gen) / math.sqrt(rows),
                 torch.randn(cols, cfg.sketch_k, generator=gen) / math.sqrt(cols))
    for p in params.values():
        p.requires_grad_(True)
    want = {"general": {n: 0.0 for n in names}, "task": {n: 0.0 for n in names}}
    seen = {}     # the input of the first q projection: its per-column sum of squares (imatrix)
    model.model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda m, inp, out: seen.__setitem__("x2", inp[0].detach().float().square().sum((0, 1))))
    lengths = set()
    for role, samples in pools.items():
        for s in samples:
            ids, mask = encode(tok, s, cfg.max_tokens, special_prefix(tok))
            lengths.add(ids.shape[1] % analysis.PAD_MULTIPLE)
            assert st.tokens[s.id] == ids.shape[1]          # the sample's tokens, not its padding
            model.zero_grad(set_to_none=True)
            logits = model(input_ids=ids).logits[0, :-1].float()
            m = mask[0, 1:].bool()
            torch.nn.functional.cross_entropy(logits[m], ids[0, 1:][m]).backward()
            x2 = torch.from_numpy(st.acts[s.id]["blk.0.attn_q.weight"])
            assert torch.allclose(x2, seen["x2"], rtol=1e-3 if dtype == "float32" else 2e-2), s.id
            for j, n in enumerate(names):
                g = params[n].grad.float()
                a, b = sk[n]
                trace, want_trace = torch.from_numpy(st.traces[s.id][j]), (a @ g @ b).reshape(-1)
                # bf16 weights: both ways compute in bf16 but round at other points (the head's
                # dh is summed in float32 here), which the backward amplifies to a few % of the
                # largest entry: a check that the bf16 path runs and is not off by a term or a scale
                rt = 1e-4 if dtype == "float32" else 5e-2
                assert torch.allclose(trace, want_trace, rtol=rt, atol=max(1e-6, rt * float(want_trace.abs().max()))), (s.id, n)
                if role != "target":
                    want[role][n] = want[role][n] + g * g
    assert lengths != {0}              # the gradient pass padded these samples (to a multiple of 16)
    tol = 1e-4 if fisher_dtype == "float32" and dtype == "float32" else 1e-2 if dtype == "float32" else 5e-2
    for role in ("general", "task"):
        for n in names:
            got, w = st.fisher[role].parts[n], want[role][n]
            expect = {"exact": {"full": w}, "factored": {"rows": w.sum(1), "cols": w.sum(0)},
                      "block": {"blocks": w.reshape(w.shape[0], -1, 32).sum(-1)}}[form]
            assert set(got) == set(expect)
            for part, v in expect.items():
                assert got[part].dtype == (getattr(torch, fisher_dtype) if form == "exact" else torch.float32)
                # float32 summation order (the head's dlogits by slices, sparse + dense rows): errors
                # relative to the tensor's largest entry
                assert torch.allclose(got[part].float(), v, rtol=tol, atol=tol * (0.1 if dtype == "float32" else 1) * float(v.abs().max())), \
                    (role, n, part, float((got[part].float() - v).abs().max()), float(v.abs().max()))


@pytest.mark.parametrize("form", ["exact", "factored", "block"])
@pytest.mark.parametrize("chunk", [1 << 22, 200])  # whole tensors, and slices of a few rows
def test_sensitivities_are_fisher_weighted_roundtrip_error(tiny_llama, monkeypatch, chunk, form):  # noqa: F811
    """S = 1/2 sum F * (Q(w) - w)^2 with F in the chosen form, the errors taken on the exact
    stored weights (the model computes in bf16 here)."""
    import numpy as np
    import torch

    from tasa_edge import analysis, formats
    from tasa_edge.analysis import collect, format_menu, sensitivities
    from tasa_edge.data import TextSample
    from tasa_edge.formats import ggml
    from tasa_edge.model import ModelSource
    from tasa_edge.results import AnalysisConfig
    from tasa_edge.torch_model import gguf_params, load_torch_model, reference_weights

    src = ModelSource.open(tiny_llama)
    model, tok = load_torch_model(src, device="cpu", dtype="bfloat16")
    params = gguf_params(model, src)
    pools = {"general": [TextSample("enwiki", "g:1", "", "The quick brown fox jumps over the lazy dog.")],
             "task": [TextSample("gsm8k", "t:1", "Question: 2 and 2?\nAnswer:", " 2 + 2 = 4\n#### 4")]}
    cfg = AnalysisConfig(max_tokens=32, sketch_k=4, formats=("Q4_0", "Q8_0", "IQ4_NL"), fisher="exact", dtype="bfloat16")
    st = collect(model, analysis.encode_pools(tok, pools, cfg.max_tokens), params, pools, cfg, cache=None,
                 show_progress=False)
    exact = {k: acc for k, acc in st.fisher.items()}
    st.fisher = {k: acc.compact(form) for k, acc in exact.items()}
    menu = format_menu(src, cfg)
    monkeypatch.setattr(analysis, "SENSITIVITY_CHUNK", chunk)
    weights = reference_weights(model, src, params)
    table = sensitivities(src, weights, st, menu, cfg, None, show_progress=False)
    for name, fmts in menu.items():
        w = weights(name, 0, src.tensors[name].shape[0])
        assert w.dtype == np.float32 and not np.array_equal(w, params[name].detach().float().numpy())
        for f in fmts:
            d2 = (ggml.roundtrip(w, f) - w) ** 2
            for key, src_key in (("ppl", "general"), ("task", "task")):
                full = exact[src_key].parts[name]["full"].double()
                if form == "factored":
                    full = torch.outer(full.sum(1), full.sum(0)) / full.sum()
                elif form == "block":
                    full = full.reshape(full.shape[0], -1, 32).mean(-1).repeat_interleave(32, dim=1)
                want = 0.5 * float((full.numpy() * d2).sum())
                assert table.source(key)[name][f] == pytest.approx(want, rel=1e-4), (name, f, key)
            assert table.rel_err[name][f] == pytest.approx(np.sqrt(d2.sum()) / np.linalg.norm(w), rel=1e-4)
            assert table.bytes[name][f] == formats.get("gguf").nbytes(f, src.tensors[name].shape)
        assert table.ppl[name]["Q8_0"] < table.ppl[name]["Q4_0"]


def test_row_sampled_sensitivity_is_unbiased_and_close():
    """Sampling row stripes covers the wanted fraction, never a row twice, and the scaled sum of a
    smooth per-row quantity is close to the full one."""
    import numpy as np

    from tasa_edge.analysis import sample_rows

    rows = 50_000
    stripes = sample_rows(rows, 2730, 0.25, "x")
    covered = np.zeros(rows, bool)
    for r0, r1 in stripes:
        assert not covered[r0:r1].any() and r1 - r0 <= 2730
        covered[r0:r1] = True
    assert abs(covered.mean() - 0.25) < 0.01
    v = np.random.default_rng(0).lognormal(0, 1, rows)
    est = v[covered].sum() * rows / covered.sum()
    assert abs(est / v.sum() - 1) < 0.05
    assert sample_rows(500, 100, 0.25, "x") == [(0, 100), (100, 200), (200, 300), (300, 400), (400, 500)]
    assert sample_rows(rows, 2730, 0.25, "x") == stripes          # seeded: the same salt, the same rows
    assert len({tuple(sample_rows(rows, 2730, 0.25, s)) for s in "abcdefgh"}) > 1


def _tiny_analyze_args(tiny_llama, tmp_path):
    import json
    import sys

    task, general = tmp_path / "task.jsonl", tmp_path / "general.txt"
    task.write_text("".join(json.dumps({"question": f"{a} plus {b}?", "answer": f"{a + b}"}) + "\n"
                            for a in range(8) for b in range(6)))
    general.write_text("\n\n".join(f"The {w} sat on the mat number {i}." for i in range(12) for w in ("cat", "dog", "fox")))
    return [sys.executable, "-m", "tasa_edge.cli", "analyze", str(tiny_llama), "-o", str(tmp_path / "out"),
            "--task-data", str(task), "--general-data", str(general),
            "--n-general", "8", "--n-task", "8", "--n-target", "2", "--max-tokens", "64",
            "--no-chat-template"]   # the tiny tokenizer's template ("{{ messages }}") is no chat format


def test_a_pickle_at_the_gradient_cache_path_is_never_run(tiny_llama, tmp_path):  # noqa: F811
    """The cache is safetensors + JSON: a pickle put in its place is refused in one line, and the
    code it carries does not run."""
    import os
    import pickle
    import subprocess

    args = _tiny_analyze_args(tiny_llama, tmp_path)
    env = {**os.environ, "TASA_NO_PROGRESS": "1"}
    assert subprocess.run(args, capture_output=True, text=True, env=env).returncode == 0
    (cache,) = (tmp_path / "out").glob("gradstats-*")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    cache.write_bytes(pickle.dumps(Payload()))
    r = subprocess.run(args, capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "unreadable gradient cache" in r.stderr and "Traceback" not in r.stderr
    assert not marker.exists()


def test_analyze_with_a_device_profile_scores_the_profiles_fast_formats(tiny_llama, tmp_path):  # noqa: F811
    """``analyze --profile`` takes the device profile's formats for the target as the menu (those
    that fit each tensor), and its gradient cache is data only (safetensors, no pickle)."""
    import json
    import os
    import subprocess
    import sys

    from devices.profiles import load_profile
    from tasa_edge import formats

    task, general = tmp_path / "task.jsonl", tmp_path / "general.txt"
    task.write_text("".join(json.dumps({"question": f"{a} plus {b}?", "answer": f"{a + b}"}) + "\n"
                            for a in range(8) for b in range(6)))
    general.write_text("\n\n".join(f"The {w} sat on the mat number {i}." for i in range(12) for w in ("cat", "dog", "fox")))
    args = [sys.executable, "-m", "tasa_edge.cli", "analyze", str(tiny_llama), "-o", str(tmp_path / "out"),
            "--profile", "local-cpu", "--task-data", str(task), "--general-data", str(general),
            "--n-general", "8", "--n-task", "8", "--n-target", "2", "--max-tokens", "64",
            "--no-chat-template"]   # the tiny tokenizer's template ("{{ messages }}") is no chat format
    env = {**os.environ, "TASA_NO_PROGRESS": "1"}
    r = subprocess.run(args, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    tmp_path = tmp_path / "out"
    an = json.loads((tmp_path / "analysis.json").read_text())
    profile_menu = load_profile("local-cpu").menu("gguf")
    spec = formats.get("gguf")
    for name, fmts in an["config"]["formats"].items():
        assert set(fmts) <= set(profile_menu), name
    # 64-wide rows: only the profile's 32-block formats fit; its K- and IQ4_XS types do not
    assert set(an["config"]["formats"]["blk.0.attn_q.weight"]) == {f for f in profile_menu if spec.fits(f, (64, 64))}
    caches = list(tmp_path.glob("gradstats-*"))
    assert len(caches) == 1 and caches[0].suffix == ".safetensors"
    assert caches[0].read_bytes()[8:9] == b"{"   # safetensors: u64 header length, then a JSON header
    # the cached re-run does no backward pass and says so
    r = subprocess.run(args, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "0 backward passes" in r.stdout and "from the cache" in r.stdout
    r = subprocess.run(args + ["--formats", "Q4_0"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "not both" in r.stderr


def test_stratified_row_sample_keeps_the_heavy_rows_and_stays_unbiased():
    """The sensitivity pass's row sample: the rows holding most Fisher mass are scored exactly, the
    rest sampled and scaled; no row twice; on a quantity concentrated on a few rows (an embedding's
    calibration tokens) it is far closer to the full sum than the plain systematic sample."""
    import numpy as np

    from tasa_edge.analysis import sample_rows, score_plan

    rows, step = 50_000, 2730
    rng = np.random.default_rng(0)
    mass = np.zeros(rows)
    hot = rng.choice(rows, 600, replace=False)
    mass[hot] = rng.lognormal(0, 1, 600)
    mass /= mass.sum()
    v = mass * 1e3 + rng.lognormal(-3, 1, rows)            # the per-row contribution to a sensitivity
    plan = score_plan(rows, step, 0.25, "x", mass)
    seen = np.concatenate([idx for idx, _ in plan])
    assert len(seen) == len(set(seen.tolist())) and all(len(idx) <= step for idx, _ in plan)
    assert abs(len(seen) / rows - 0.25) < 0.01
    assert set(hot.tolist()) <= set(seen.tolist())        # every heavy row is scored exactly
    assert all(k == 1.0 for idx, k in plan if np.isin(idx, hot).any())
    est = sum(k * v[idx].sum() for idx, k in plan)
    systematic = sum(v[a:b].sum() for a, b in sample_rows(rows, step, 0.25, "x")) * 4
    assert abs(est / v.sum() - 1) < 0.01 < abs(systematic / v.sum() - 1)
    full = score_plan(rows, step, 1.0, "x", mass)
    assert np.array_equal(np.concatenate([idx for idx, _ in full]), np.arange(rows))
