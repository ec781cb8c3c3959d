"""Hugging Face directory -> GGUF: tensor layout (q/k rope permutation, Gemma norms) and metadata.

Fast tests use tiny random models written by transformers itself and compare llama.cpp's logits
on the exported GGUF with transformers' logits. The slow test round-trips the packaged
SmolLM2-135M GGUF through a transformers-saved HF directory and back.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from exporters.gguf_export import export_gguf
from exporters.hf_convert import detect_bpe_pre
from tasa_edge.hf_layout import permute_qk, unpermute_qk
from tasa_edge.errors import TasaError
from tasa_edge.model import ModelSource
from tasa_edge.plan import BitPlan

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "In 2024 there were 365 days, 12 months and 52 weeks.",
    "Hello world! How are you today? I am fine, thank you.",
] * 4


def _fields(path) -> dict:
    from gguf import GGUFReader

    return {k: f.contents() for k, f in GGUFReader(path, "r").fields.items()}


def _llama_logits(path, ids: list[int]) -> np.ndarray:
    pytest.importorskip("llama_cpp")
    from tasa_edge.llama_run import open_llama

    with open_llama(path, n_ctx=64, n_threads=2) as llm:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)


def _hf_logits(model_dir, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return m(torch.tensor([ids])).logits[0].float().numpy()


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _randomize_norms(model, seed: int) -> None:
    """Random RMSNorm weights and biases, so a wrong convention or layout shows in the logits."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (0.0 if "gemma" in type(model).__name__.lower() else 1.0))
            elif name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


# --------------------------------------------------------------------------- q/k permutation


def test_permute_qk_is_interleave_and_invertible():
    # one head of dim 4: HF [x0, x1, y0, y1] -> GGUF [x0, y0, x1, y1]
    w = np.array([[0.0], [1.0], [2.0], [3.0]], dtype=np.float32)
    assert permute_qk(w, 1)[:, 0].tolist() == [0.0, 2.0, 1.0, 3.0]
    rng = np.random.default_rng(0)
    for n_head, head_dim, cols in ((9, 64, 576), (3, 64, 576), (4, 16, 1)):
        w = rng.standard_normal((n_head * head_dim, cols)).astype(np.float32)
        p = permute_qk(w, n_head)
        assert not np.array_equal(p, w)
        np.testing.assert_array_equal(unpermute_qk(p, n_head), w)
        # rows stay within their head
        np.testing.assert_array_equal(np.sort(p[:head_dim], axis=0), np.sort(w[:head_dim], axis=0))
    bias = rng.standard_normal(8 * 16).astype(np.float32)  # 1-D q/k biases permute the same way
    np.testing.assert_array_equal(unpermute_qk(permute_qk(bias, 8), 8), bias)
    with pytest.raises(TasaError):
        permute_qk(np.zeros((10, 4), np.float32), 3)


def test_detect_bpe_pre():
    bl = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    digits = {"type": "Digits", "individual_digits": True}
    assert detect_bpe_pre({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [digits, bl]}}, "llama") == "smollm"
    assert detect_bpe_pre({"pre_tokenizer": bl}, "llama") == "gpt-2"
    from exporters.hf_convert import _LLAMA3_RE, _QWEN2_RE

    def split(rx):
        return {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": rx}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False},
        ]}

    assert detect_bpe_pre({"pre_tokenizer": split(_LLAMA3_RE)}, "llama") == "llama-bpe"
    assert detect_bpe_pre({"pre_tokenizer": split(_QWEN2_RE)}, "llama") == "qwen2"
    assert detect_bpe_pre({"pre_tokenizer": split("x+")}, "qwen3") == "qwen2"
    assert detect_bpe_pre({"pre_tokenizer": split("x+")}, "llama") == "default"


# --------------------------------------------------------------------------- tiny random llama


def _bpe_tokenizer(d, vocab_size: int = 300) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(TEXTS, trainer)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|endoftext|>", "chat_template": "{{ messages }}"}
    ))
    return tok.get_vocab_size()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("tiny-llama")
    n_tok = _bpe_tokenizer(d)
    cfg = LlamaConfig(
        vocab_size=n_tok + 12,  # padded embedding, like many real checkpoints
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
        initializer_range=0.15, tie_word_embeddings=False, bos_token_id=1, eos_token_id=0,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    _randomize_norms(model, 1)
    model.save_pretrained(d)
    return d


def test_tiny_llama_logits_match_transformers(tiny_llama, tmp_path, monkeypatch):
    src = ModelSource.open(tiny_llama)
    assert src.arch == "llama"
    out = tmp_path / "tiny-llama.gguf"
    export_gguf(src, BitPlan.uniform(src, "F32"), out, show_progress=False)

    f = _fields(out)
    assert f["llama.rope.dimension_count"] == 16
    assert f["llama.attention.head_count_kv"] == 2
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert len(f["tokenizer.ggml.tokens"]) == f["llama.vocab_size"] == src.tensors["token_embd.weight"].shape[0]
    assert f["tokenizer.ggml.token_type"][1] == 3  # <|im_start|>: control
    assert f["tokenizer.ggml.token_type"][-1] == 5  # padding row: unused
    assert f["tokenizer.ggml.bos_token_id"] == 1 and f["tokenizer.ggml.add_bos_token"] is False
    assert f["tokenizer.chat_template"] == "{{ messages }}"

    ids = [1, 40, 77, 120, 5, 250, 33, 64, 90, 200, 17, 150]
    want = _hf_logits(tiny_llama, ids)
    got = _llama_logits(out, ids)
    assert _rel_err(got, want) < 5e-3
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9

    # negative control: without the q/k permutation llama.cpp computes something else
    import tasa_edge.hf_layout as hl

    monkeypatch.setattr(hl, "hf_tensor_to_gguf", lambda s, n, a: np.asarray(a, np.float32))
    bad = tmp_path / "tiny-llama-unpermuted.gguf"
    export_gguf(ModelSource.open(tiny_llama), BitPlan.uniform(src, "F32"), bad, show_progress=False)
    assert _rel_err(_llama_logits(bad, ids), want) > 5 * _rel_err(got, want)


def test_tiny_llama_tokenizer_matches_transformers(tiny_llama, tmp_path):
    pytest.importorskip("llama_cpp")
    from transformers import AutoTokenizer

    from tasa_edge.llama_run import open_llama

    src = ModelSource.open(tiny_llama)
    out = tmp_path / "tok.gguf"
    export_gguf(src, BitPlan.uniform(src, "F32"), out, show_progress=False)
    hf = AutoTokenizer.from_pretrained(tiny_llama)
    with open_llama(out, n_ctx=64, n_threads=1) as llm:
        for text in TEXTS[:4] + ["<|im_start|>Hello there"]:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == hf.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_tiny_qwen_logits_match_transformers(arch, tmp_path):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    d = tmp_path / arch
    d.mkdir()
    n_tok = _bpe_tokenizer(d)
    common = dict(
        vocab_size=n_tok + 12, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=100000.0,
        initializer_range=0.15, tie_word_embeddings=False, bos_token_id=1, eos_token_id=0,
    )
    torch.manual_seed(0)
    if arch == "qwen2":  # q/k/v biases
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:  # q/k norms, head_dim != hidden / heads
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=32, **common))
    _randomize_norms(model, 3)
    model.save_pretrained(d)

    src = ModelSource.open(d)
    assert src.arch == arch
    out = tmp_path / f"{arch}.gguf"
    export_gguf(src, BitPlan.uniform(src, "F32"), out, show_progress=False)
    f = _fields(out)
    assert f[f"{arch}.rope.freq_base"] == 100000.0
    if arch == "qwen3":
        assert f["qwen3.attention.key_length"] == f["qwen3.attention.value_length"] == 32
    ids = [1, 40, 77, 120, 5, 250, 33, 64, 90, 200, 17, 150]
    want = _hf_logits(d, ids)
    got = _llama_logits(out, ids)
    assert _rel_err(got, want) < 5e-3


def test_llama3_rope_scaling_and_missing_tokenizer_are_refused(tiny_llama, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_llama, d)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (d / name).unlink()
    src = ModelSource.open(d)
    with pytest.raises(TasaError, match="no tokenizer"):
        export_gguf(src, BitPlan.uniform(src, "F32"), tmp_path / "x.gguf", show_progress=False)
    assert not (tmp_path / "x.gguf").exists()

    shutil.copy(tiny_llama / "tokenizer.json", d / "tokenizer.json")
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_theta"] = 500000.0
    cfg["rope_scaling"] = {"rope_type": "llama3", "factor": 32.0, "original_max_position_embeddings": 8192}
    (d / "config.json").write_text(json.dumps(cfg))
    src = ModelSource.open(d)
    with pytest.raises(TasaError, match="rope scaling type 'llama3'"):
        export_gguf(src, BitPlan.uniform(src, "F32"), tmp_path / "y.gguf", show_progress=False)


# --------------------------------------------------------------------------- tiny random gemma3


def _spm_tokenizer(d) -> int:
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXTS), model_writer=buf, vocab_size=330, model_type="bpe",
        byte_fallback=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3, hard_vocab_limit=False,
        add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",
        minloglevel=2,  # like Gemma: no dummy prefix, whitespace kept as is
    )
    (d / "tokenizer.model").write_bytes(buf.getvalue())
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "add_eos_token": False}
    ))
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    return sp.vocab_size()


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory):
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    d = tmp_path_factory.mktemp("tiny-gemma3")
    n_tok = _spm_tokenizer(d)
    cfg = Gemma3TextConfig(
        vocab_size=n_tok + 6, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64,
        max_position_embeddings=512, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
        final_logit_softcapping=30.0, initializer_range=0.1, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(cfg)
    _randomize_norms(model, 2)
    model.save_pretrained(d)
    return d


def test_tiny_gemma3_norms_and_metadata(tiny_gemma3, tmp_path):
    from safetensors.numpy import load_file

    src = ModelSource.open(tiny_gemma3)
    assert src.arch == "gemma3"
    raw = {}
    for f in tiny_gemma3.glob("*.safetensors"):
        raw.update(load_file(f))
    norms = [t for t in src.tensors.values() if t.name.endswith("norm.weight")]
    assert {t.name.split(".")[-2] for t in norms} >= {
        "attn_norm", "attn_q_norm", "attn_k_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm", "output_norm"
    }
    for t in src.tensors.values():
        want = raw[t.hf_name].astype(np.float32) + (1.0 if t in norms else 0.0)
        np.testing.assert_array_equal(src.read(t.name), want)

    out = tmp_path / "tiny-gemma3.gguf"
    export_gguf(src, BitPlan.uniform(src, "F32"), out, show_progress=False)
    f = _fields(out)
    assert f["general.architecture"] == "gemma3"
    expect = {
        "gemma3.context_length": 512, "gemma3.embedding_length": 256, "gemma3.block_count": 2,
        "gemma3.feed_forward_length": 512, "gemma3.attention.head_count": 4,
        "gemma3.attention.head_count_kv": 2, "gemma3.attention.key_length": 64,
        "gemma3.attention.value_length": 64, "gemma3.attention.sliding_window": 4,
        "gemma3.attention.sliding_window_pattern": [True, False],
        "gemma3.rope.freq_base": 1_000_000.0, "gemma3.rope.freq_base_swa": 10_000.0,
        "gemma3.final_logit_softcapping": 30.0, "gemma3.vocab_size": src.tensors["token_embd.weight"].shape[0],
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_space_prefix": False, "tokenizer.ggml.bos_token_id": 2,
        "tokenizer.ggml.eos_token_id": 1,
    }
    for k, v in expect.items():
        assert f.get(k) == pytest.approx(v), k
    assert f["gemma3.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert len(f["tokenizer.ggml.tokens"]) == f["gemma3.vocab_size"]


def test_tiny_gemma3_logits_match_transformers(tiny_gemma3, tmp_path):
    src = ModelSource.open(tiny_gemma3)
    out = tmp_path / "g.gguf"
    export_gguf(src, BitPlan.uniform(src, "F32"), out, show_progress=False)
    ids = [2, 40, 77, 120, 5, 250, 33, 64, 90, 200, 17, 150]  # longer than the 4-token window
    want = _hf_logits(tiny_gemma3, ids)
    got = _llama_logits(out, ids)
    assert _rel_err(got, want) < 5e-3
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9

    # the SentencePiece vocabulary tokenizes like sentencepiece itself (BOS added, no dummy prefix)
    import sentencepiece as spm

    from tasa_edge.llama_run import open_llama

    sp = spm.SentencePieceProcessor(model_file=str(tiny_gemma3 / "tokenizer.model"))
    with open_llama(out, n_ctx=64, n_threads=1) as llm:
        for text in TEXTS[:4] + ["Zebras quizzically vex 7 jumping wombats!\n"]:
            assert llm.tokenize(text.encode()) == [2] + sp.encode(text)


# --------------------------------------------------------------------------- real models (slow)


@pytest.mark.slow
def test_gemma3_tokenizer_json_only_tokenizes_like_the_gguf(tmp_path):
    """A SentencePiece-converted tokenizer.json without tokenizer.model (what transformers writes
    for a Gemma GGUF): llama.cpp must tokenize with it exactly like with the original GGUF."""
    pytest.importorskip("llama_cpp")
    import random
    from types import SimpleNamespace

    import gguf
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from exporters.hf_convert import write_hf_tokenizer
    from tasa_edge.model import TensorInfo
    from tasa_edge.zoo import resolve_model

    orig = resolve_model("gemma3-270m")
    d = tmp_path / "tok"
    AutoTokenizer.from_pretrained(orig.parent, gguf_file=orig.name).save_pretrained(d)
    assert not (d / "tokenizer.model").exists()
    n_vocab = 262144
    src = SimpleNamespace(path=d, arch="gemma3", tensors={
        "token_embd.weight": TensorInfo("token_embd.weight", (n_vocab, 640), "F32"),
    })
    out = tmp_path / "vocab.gguf"
    w = gguf.GGUFWriter(out, arch="gemma3")
    write_hf_tokenizer(src, w, n_vocab)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()

    rng = random.Random(0)
    texts = [
        "Hello world, it is 2024 and   spaces\n\nnewlines <start_of_turn>user hi<end_of_turn>",
        " leading space. Ünïcödé 😀 日本語のテキスト",
        "antidisestablishmentarianism unbelievably thermodynamics supercalifragilistic",
    ] + [" ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 12)))
                  for _ in range(30)) for _ in range(3)]
    toks = []
    for p in (out, orig):
        llm = Llama(model_path=str(p), vocab_only=True, verbose=False)
        toks.append([llm.tokenize(t.encode(), special=True) for t in texts])
        llm.close()
    assert toks[0] == toks[1]
    f = _fields(out)
    assert f["tokenizer.ggml.model"] == "llama" and f["tokenizer.ggml.add_bos_token"] is True
    assert f["tokenizer.ggml.add_space_prefix"] is False



#: SmolLM2's own tokenizer.json pre-tokenizer. transformers' GGUF -> tokenizer.json converter
#: drops the Digits step, so the fixture puts back what the real checkpoint ships.
SMOLLM_PRE = {"type": "Sequence", "pretokenizers": [
    {"type": "Digits", "individual_digits": True},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
]}


@pytest.fixture(scope="module")
def smollm_hf(tmp_path_factory, smollm_path):
    """The packaged SmolLM2 GGUF as a transformers-saved HF directory (float32 safetensors)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = tmp_path_factory.mktemp("smollm2-hf")
    tok = AutoTokenizer.from_pretrained(smollm_path.parent, gguf_file=smollm_path.name)
    model = AutoModelForCausalLM.from_pretrained(smollm_path.parent, gguf_file=smollm_path.name, dtype=torch.float32)
    # the weights are already dequantized; transformers only refuses to save models it marks as GGUF-quantized
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(d)
    tok.save_pretrained(d)
    del model
    tj = json.loads((d / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = SMOLLM_PRE
    (d / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    return d


@pytest.mark.slow
def test_smollm2_hf_dir_gives_back_gguf_layout(smollm_hf, smollm):
    hf = ModelSource.open(smollm_hf)
    assert hf.arch == "llama" and hf.n_layers == 30
    assert set(hf.tensors) == set(smollm.tensors)
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.29.attn_q.weight"):
        a, b = hf.read(name), smollm.read(name)
        # float32 checkpoint of the dequantized Q4_1 weights: the same numbers, GGUF row order
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    # and the HF file really is in HF's rotate-half order
    from safetensors import safe_open

    with safe_open(next(smollm_hf.glob("*.safetensors")), framework="numpy") as fh:
        raw_q = fh.get_tensor(hf.tensors["blk.0.attn_q.weight"].hf_name)
    assert np.abs(raw_q - smollm.read("blk.0.attn_q.weight")).max() > 0.01


@pytest.mark.slow
def test_smollm2_hf_export_matches_gguf_export(smollm_hf, smollm, tmp_path):
    pytest.importorskip("llama_cpp")
    from conftest import gguf_tensors

    from tasa_edge.llama_run import generate, open_llama

    hf = ModelSource.open(smollm_hf)
    a, b = tmp_path / "from-hf.gguf", tmp_path / "from-gguf.gguf"
    export_gguf(hf, BitPlan.uniform(hf, "Q8_0"), a, show_progress=False)
    export_gguf(smollm, BitPlan.uniform(smollm, "Q8_0"), b, show_progress=False)

    ta, tb = gguf_tensors(a), gguf_tensors(b)
    assert ta.keys() == tb.keys()
    assert [n for n in ta if ta[n] != tb[n]] == []

    fa, fb = _fields(a), _fields(b)
    for k, v in fb.items():
        if k.startswith(("llama.", "tokenizer.")) or k == "general.file_type":
            assert fa.get(k) == v, k
    assert fa["tokenizer.ggml.pre"] == "smollm"

    prompt = "The capital of France is"
    ga = generate(a, prompt, max_tokens=8, n_ctx=256)
    gb = generate(b, prompt, max_tokens=8, n_ctx=256)
    assert ga == gb and ga.strip()

    text = "In 2024, SmolLM2 said: <|im_start|>Hello, wörld! 12345"
    with open_llama(a, n_ctx=256, n_threads=1) as la:
        toks_a = [la.tokenize(text.encode()), la.tokenize(text.encode(), special=True)]
    with open_llama(b, n_ctx=256, n_threads=1) as lb:
        toks_b = [lb.tokenize(text.encode()), lb.tokenize(text.encode(), special=True)]
    assert toks_a == toks_b
