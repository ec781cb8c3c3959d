"""ONNX export (MatMulNBits) on the real packaged SmolLM2-135M: numerics, mixed plans, generation.

These tests cover the plain onnxruntime graph (``graph="plain"``); the onnxruntime-genai graph
(the default) is tested in ``test_onnx_genai.py``. One float export and a handful of quantized exports are shared per module; texts are short.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from exporters.onnx_export import DATA_FILE, EXPORT_INFO, MODEL_FILE, export_onnx
from tasa_edge import formats
from tasa_edge.errors import TasaError
from tasa_edge.formats.onnx import dequantize_blockwise, parse_format as parse_onnx_format, quantize_blockwise
from tasa_edge.plan import BitPlan, model_block


from tasa_edge.names import kind_of, layer_of


def onnx_roundtrip(w, fmt):
    return formats.get("onnx").roundtrip(w, fmt)

PROMPT = "The capital of France is"
MAX_TOKENS = 64          # per text in the KLD comparisons


def _plan(src, rule, name: str) -> BitPlan:
    plan = BitPlan("onnx", model_block(src), {t.name: rule(t.name) for t in src.quantizable},
                   provenance={"method": name})
    plan.stamp(src)
    return plan


def mix248(name: str) -> str:
    """2/4/8 mix: ffn int4_b32 (three ffn_up int2_b32), attn_v/attn_output int8_b32, rest int4_b128."""
    k, layer = kind_of(name), layer_of(name)
    if k in ("attn_v", "attn_output"):
        return "int8_b32"
    if k == "ffn_up" and layer in (10, 15, 20):
        return "int2_b32"
    if k.startswith("ffn"):
        return "int4_b32"
    return "int4_b128"


def mix48(name: str) -> str:
    """int4/int8 mix, at least int4_b32 everywhere (asymmetric uint8 on the embedding)."""
    k = kind_of(name)
    if k == "token_embd":
        return "uint8_b32"
    if k in ("attn_v", "attn_output", "ffn_down"):
        return "int8_b32"
    return "int4_b32"


def _onnx_graph(path):
    import onnx

    return onnx.load(str(path / MODEL_FILE), load_external_data=False).graph


# ============================================================================ no model needed
@pytest.mark.parametrize("fmt", ["int2_b32", "uint2_b32", "int4_b32", "uint4_b64", "int8_b32", "uint8_b16"])
def test_quantizer_is_onnx_roundtrip_and_onnxruntime_reads_it_back(fmt):
    """quantize -> our dequantize == analysis.onnx_roundtrip (bit for bit), and onnxruntime's
    MatMulNBits / GatherBlockQuantized (fp32 compute) decode the packed weights to the same values."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    bits, block, sym = parse_onnx_format(fmt)
    rng = np.random.default_rng(bits * 100 + block)
    n, k = 24, 200                                   # K not a multiple of the block: padded last block
    w = rng.standard_normal((n, k)).astype(np.float32)
    w[3] = 0.0                                       # an all-zero row (scale 0 -> 1)
    w[5] = np.abs(w[5])                              # one-signed rows exercise the zero points
    packed, scales, zp = quantize_blockwise(w, bits, block, sym)
    kb = -(-k // block)
    assert packed.shape == (n, kb, block * bits // 8) and scales.shape == (n, kb)
    assert (zp is None) == sym
    deq = dequantize_blockwise(packed, scales, zp, bits, block, k)
    np.testing.assert_array_equal(deq, onnx_roundtrip(w, fmt))

    inits = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "S"),
             numpy_helper.from_array(np.array([n, -1], np.int64), "shape2")]
    zin = []
    if zp is not None:
        inits.append(numpy_helper.from_array(zp, "Z"))
        zin = ["Z"]
    nodes = [
        helper.make_node("MatMulNBits", ["A", "B", "S"] + zin, ["Y"], domain="com.microsoft",
                         K=k, N=n, bits=bits, block_size=block, accuracy_level=0),
        helper.make_node("Reshape", ["B", "shape2"], ["B2"]),
        helper.make_node("GatherBlockQuantized", ["B2", "idx", "S"] + zin, ["E"], domain="com.microsoft",
                         gather_axis=0, quantize_axis=1, block_size=block, bits=bits),
    ]
    graph = helper.make_graph(
        nodes, "t",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k]),
         helper.make_tensor_value_info("idx", TensorProto.INT64, [None])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("E", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y, e = sess.run(None, {"A": np.eye(k, dtype=np.float32), "idx": np.arange(n, dtype=np.int64)})
    np.testing.assert_allclose(y.T, deq, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(e[:, :k], deq, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fmt", ["int2_b32", "uint2_b32", "int4_b32", "uint4_b64", "int8_b32"])
def test_ort_quantizer_option_decodes_consistently(fmt):
    """quantizer="ort" (onnxruntime's C++ blockwise quantizer) writes the same layout; for uint 2/4-bit
    it is the same RTN as onnx_roundtrip, and symmetric formats follow the same full-range rule."""
    bits, block, sym = parse_onnx_format(fmt)
    w = np.random.default_rng(7).standard_normal((16, 200)).astype(np.float32)
    packed, scales, zp = quantize_blockwise(w, bits, block, sym, quantizer="ort")
    deq = dequantize_blockwise(packed, scales, zp, bits, block, w.shape[1])
    rtn = onnx_roundtrip(w, fmt)
    if not sym and bits < 8:
        np.testing.assert_array_equal(deq, rtn)
    if sym:
        # same rule (max magnitude -> -2^(b-1)); rounding ties may differ in a few codes
        assert np.mean(deq == rtn) > 0.99
    assert np.abs(deq - w).max() <= np.abs(w).max() / (2 ** (bits - 1) if sym else 2 ** bits - 1) * 1.01 + 1e-6


# ============================================================================ tiny random HF models
_TINY_ARCH = {"llama3": ("llama", "LlamaForCausalLM"), "qwen2": ("qwen2", "Qwen2ForCausalLM"),
              "qwen3": ("qwen3", "Qwen3ForCausalLM"), "mistral": ("mistral", "MistralForCausalLM")}


def _tiny_hf_model(kind: str, d):
    """A 2-layer random model of each llama-family variant (+ a word-level tokenizer), saved to ``d``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    vocab = 96
    kw = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=128, initializer_range=0.3,
              tie_word_embeddings=kind == "qwen3")
    if kind == "llama3":      # llama3 rope scaling
        kw["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    if kind == "mistral":     # a sliding window shorter than the test sequence
        kw["sliding_window"] = 5
    model_type, arch = _TINY_ARCH[kind]
    cfg = AutoConfig.for_model(model_type, **kw)
    cfg.architectures = [arch]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)          # qwen2 qkv biases
            elif "norm" in name:
                p.normal_(1.0, 0.2)
    model.save_pretrained(d)
    words = {f"w{i}": i for i in range(vocab)}
    words["<unk>"] = 0
    tk = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="w1", eos_token="w2").save_pretrained(d)
    return model


@pytest.mark.parametrize("kind", sorted(_TINY_ARCH))
def test_tiny_llama_family_models_match_transformers(kind, tmp_path):
    """llama (llama3 rope) / qwen2 (qkv bias) / qwen3 (q/k norm, tied) / mistral (sliding window):
    float export == transformers (prefill + one KV-cache step), and a uint4 export with fp32 compute
    (accuracy_level 0) == transformers with every plan tensor replaced by onnx_roundtrip."""
    import torch

    from tasa_edge.model import ModelSource
    from tasa_edge.onnx_run import OnnxDecoder
    from tasa_edge.torch_model import gguf_params

    model = _tiny_hf_model(kind, tmp_path / "hf")
    src = ModelSource.open(tmp_path / "hf")
    ids = [int(i) for i in np.random.default_rng(1).integers(3, 96, 12)]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()

    res = export_onnx(src, BitPlan.uniform(src, "float", target="onnx"), tmp_path / "float", show_progress=False,
                      graph="plain")
    dec = OnnxDecoder.open(res.path, n_threads=1)
    pre, _ = dec.step(np.array([ids]), dec.empty_past(), 0)
    _, past = dec.step(np.array([ids[:-1]]), dec.empty_past(), 0)
    last, _ = dec.step(np.array([ids[-1:]]), past, len(ids) - 1)
    assert np.abs(pre[0] - ref).max() < 1e-4 * np.abs(ref).max()
    assert np.abs(last[0, -1] - ref[-1]).max() < 1e-4 * np.abs(ref).max()

    plan = BitPlan.uniform(src, "uint4_b32", target="onnx")
    res = export_onnx(src, plan, tmp_path / "q", accuracy_level=0, show_progress=False, graph="plain")
    assert res.tensor_bytes == plan.predicted["bytes"]
    with torch.no_grad():
        for name, p in gguf_params(model, src).items():
            p.copy_(torch.from_numpy(onnx_roundtrip(p.numpy(), plan.tensors[name])))
        sim = model(torch.tensor([ids])).logits[0].numpy()
    q, _ = OnnxDecoder.open(res.path, n_threads=1).step(np.array([ids]), dec.empty_past(), 0)
    assert np.abs(q[0] - sim).max() < 1e-4 * np.abs(sim).max()
    assert np.abs(q[0] - ref).max() > 1e-2          # the quantization did change the model


# ============================================================================ real model
@pytest.fixture(scope="module")
def torch_ref(smollm):
    from tasa_edge.torch_model import load_torch_model

    return load_torch_model(smollm, device="cpu")


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="module")
def float_export(smollm, onnx_dir):
    return export_onnx(smollm, BitPlan.uniform(smollm, "float", target="onnx"), onnx_dir / "float", show_progress=False,
                       graph="plain")


@pytest.fixture(scope="module")
def texts():
    from tasa_edge.data import load_general

    return [s.target[:400] for s in load_general("eval")[:3]]


@pytest.fixture(scope="module")
def float_logits(float_export, texts):
    from tasa_edge import onnx_run

    return onnx_run.logits(float_export.path, texts, max_tokens=MAX_TOKENS)


@pytest.fixture(scope="module")
def exported(smollm, onnx_dir):
    """name -> (plan, result), exported lazily and shared across tests."""
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            rules = {"mix248": mix248, "mix48": mix48}
            plan = _plan(smollm, rules[name], name) if name in rules else BitPlan.uniform(smollm, name, target="onnx")
            cache[name] = (plan, export_onnx(smollm, plan, onnx_dir / name, show_progress=False, graph="plain"))
        return cache[name]

    return get


def _kld(ref, q) -> dict:
    from tasa_edge.quality import compare_logits

    for (t0, _), (t1, _) in zip(ref, q):
        assert np.array_equal(t0, t1)
    return compare_logits(np.concatenate([r[1] for r in ref]), np.concatenate([x[1] for x in q]))


@pytest.mark.slow
def test_float_export_matches_transformers_prefill_decode_and_padding(float_export, torch_ref):
    import torch

    from tasa_edge.onnx_run import OnnxDecoder

    model, tok = torch_ref
    dec = OnnxDecoder.open(float_export.path)
    ids = dec.encode("The Eiffel tower was built in 1889 for the World's Fair in Paris, and today it")
    assert ids == tok(
        "The Eiffel tower was built in 1889 for the World's Fair in Paris, and today it").input_ids
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()

    pre, _ = dec.step(np.array([ids]), dec.empty_past(), 0)
    d_prefill = float(np.abs(pre[0] - ref).max())
    _, past = dec.step(np.array([ids[:-1]]), dec.empty_past(), 0)
    last, present = dec.step(np.array([ids[-1:]]), past, len(ids) - 1)
    d_decode = float(np.abs(last[0, -1] - ref[-1]).max())
    assert present["past_key_values.0.key"].shape == (1, dec.n_kv, len(ids), dec.head_dim)

    # left padding: 3 masked pad tokens in front, positions restart at 0 for the real tokens
    n_pad = 3
    feed_ids = np.array([[tok.pad_token_id or 0] * n_pad + ids])
    feed = {"input_ids": feed_ids, "attention_mask": np.array([[0] * n_pad + [1] * len(ids)]),
            "position_ids": np.array([[0] * n_pad + list(range(len(ids)))]), **dec.empty_past()}
    padded = dec.session.run(["logits"], feed)[0][0, n_pad:]
    d_pad = float(np.abs(padded - ref).max())
    print(f"\nfloat ONNX vs transformers: max|Δlogit| prefill {d_prefill:.2e}, decode {d_decode:.2e}, "
          f"left-padded {d_pad:.2e} (logit scale {np.abs(ref).max():.1f})")
    assert d_prefill < 2e-3 and d_decode < 2e-3 and d_pad < 2e-3
    assert int(pre[0, -1].argmax()) == int(ref[-1].argmax())


@pytest.mark.slow
def test_export_directory_layout_and_sizes(float_export, smollm, onnx_dir):
    import onnx

    out = float_export.path
    names = {p.name for p in out.iterdir()}
    assert {MODEL_FILE, DATA_FILE, EXPORT_INFO, "config.json", "tokenizer.json"} <= names
    assert not any(n.endswith(".safetensors") for n in names)
    assert not [p for p in onnx_dir.iterdir() if p.name.startswith(".")], "temp dirs left behind"
    onnx.checker.check_model(str(out / MODEL_FILE))
    info = json.loads((out / EXPORT_INFO).read_text())
    assert info["model"]["fingerprint"] == smollm.fingerprint
    assert info["bytes"]["tensors"] == info["bytes"]["predicted_tensors"] == float_export.tensor_bytes
    assert float_export.bpw == pytest.approx(32.0, abs=1e-6)
    graph = _onnx_graph(out)
    assert [i.name for i in graph.input][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert {o.name for o in graph.output} >= {"logits", "present.29.key", "present.29.value"}
    assert {i.name for i in graph.input} >= {"past_key_values.0.key", "past_key_values.29.value"}
    assert max(o.version for o in onnx.load(str(out / MODEL_FILE), load_external_data=False).opset_import
               if o.domain in ("", "ai.onnx")) >= 21


@pytest.mark.slow
def test_mixed_248_plan_nodes_follow_the_plan_and_weights_are_onnx_roundtrip(exported, smollm, torch_ref):
    import onnx
    from onnx import numpy_helper

    from tasa_edge.torch_model import gguf_params

    plan, res = exported("mix248")
    model_path = res.path / MODEL_FILE
    onnx.checker.check_model(str(model_path))
    assert res.tensor_bytes == plan.predicted["bytes"]
    graph = _onnx_graph(res.path)
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nbits]
    assert {a["bits"] for a in attrs} == {2, 4, 8}
    assert all(a["accuracy_level"] == 4 for a in attrs)
    # every quantized linear: bits/block/zero points as the plan says (B is named '<gguf>.q<bits>')
    seen = set()
    for node, a in zip(nbits, attrs):
        gname = node.input[1].rsplit(".q", 1)[0]
        bits, block, sym = parse_onnx_format(plan.tensors[gname])
        assert (a["bits"], a["block_size"], len(node.input) == 3) == (bits, block, sym), gname
        seen.add(gname)
    assert seen == set(plan.tensors)                 # 210 linears + the tied LM head on token_embd
    assert len(nbits) == len(plan.tensors)
    assert sum(n.op_type == "GatherBlockQuantized" for n in graph.node) == 1

    # the stored weights decode to exactly what the analysis assumed (onnx_roundtrip of the torch weight)
    full = onnx.load(str(model_path))
    inits = {t.name: t for t in full.graph.initializer}
    params = gguf_params(torch_ref[0], smollm)
    for gname in ("token_embd.weight", "blk.10.ffn_up.weight", "blk.3.attn_v.weight", "blk.0.attn_q.weight"):
        fmt = plan.tensors[gname]
        bits, block, sym = parse_onnx_format(fmt)
        w = params[gname].detach().float().numpy()
        packed = numpy_helper.to_array(inits[f"{gname}.q{bits}"])
        scales = numpy_helper.to_array(inits[f"{gname}.scales"])
        deq = dequantize_blockwise(packed, scales, None, bits, block, w.shape[1])
        np.testing.assert_array_equal(deq, onnx_roundtrip(w, fmt), err_msg=gname)


@pytest.mark.slow
def test_mixed_plans_beat_the_uniform_plan_one_level_lower(exported, float_logits, texts):
    """Dominance checks: each mix is at least as fine as the uniform plan on every tensor.

    mix248 (int2 on 3 of 210 tensors, else >= int4) vs uniform int2_b32; mix48 (>= int4_b32
    everywhere) vs uniform int4_b128. All at accuracy_level 4."""
    from tasa_edge import onnx_run

    rows = {}
    for name in ("mix248", "int2_b32", "mix48", "int4_b128"):
        plan, res = exported(name)
        q = onnx_run.logits(res.path, texts, max_tokens=MAX_TOKENS)
        rows[name] = (_kld(float_logits, q), res)
        assert res.tensor_bytes == plan.predicted["bytes"], name
    print()
    for name, (m, res) in rows.items():
        print(f"{name:10s} {res.nbytes / 2**20:6.1f} MiB  {res.bpw:5.2f} bpw  KLD {m['kld']:.4f}  top1 {m['top1']:.3f}  (n={m['n']})")
    assert rows["mix248"][0]["kld"] < rows["int2_b32"][0]["kld"]
    assert rows["mix48"][0]["kld"] < rows["int4_b128"][0]["kld"]
    assert rows["mix48"][0]["top1"] > rows["int4_b128"][0]["top1"]


@pytest.mark.slow
def test_int4_int8_mixed_model_generates_paris(exported):
    from tasa_edge import onnx_run

    _plan, res = exported("mix48")
    text = onnx_run.generate(res.path, PROMPT, max_new_tokens=6)
    print(f"\n{PROMPT!r} -> {text!r}")
    assert "Paris" in text


# ============================================================================ bad input
def _assert_rejected(src, plan, out, match):
    with pytest.raises(TasaError, match=match) as ei:
        export_onnx(src, plan, out, show_progress=False)
    assert "\n" not in str(ei.value)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_bad_plans_are_one_line_errors_and_leave_nothing(tmp_path, smollm):
    good = BitPlan.uniform(smollm, "int4_b32", target="onnx")
    out = tmp_path / "out"

    other = BitPlan.from_dict(good.to_dict())
    other.model = dict(other.model, fingerprint="sha256:" + "0" * 32, name="SomeOtherModel")
    _assert_rejected(smollm, other, out, "plan is for model SomeOtherModel")

    _assert_rejected(smollm, BitPlan.uniform(smollm, "Q4_K", target="gguf"), out, "needs an 'onnx' plan")

    for bad in ("int3_b32", "int5_b32", "uint16_b32", "int4_b24", "Q4_K"):
        p = BitPlan.from_dict(good.to_dict())
        p.tensors["blk.4.ffn_down.weight"] = bad
        _assert_rejected(smollm, p, out, "ONNX format")

    p = BitPlan.from_dict(good.to_dict())
    del p.tensors["blk.4.ffn_down.weight"]
    _assert_rejected(smollm, p, out, "does not cover")

    with pytest.raises(TasaError, match="accuracy_level"):
        export_onnx(smollm, good, out, accuracy_level=7, show_progress=False)
    with pytest.raises(TasaError, match="opset"):
        export_onnx(smollm, good, out, opset=17, show_progress=False)
    assert not out.exists()

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(TasaError, match="not a tasa-edge ONNX export"):
        export_onnx(smollm, good, foreign, show_progress=False)
    assert (foreign / "notes.txt").read_text() == "keep me"


@pytest.mark.slow
def test_failure_mid_export_leaves_nothing(tmp_path, smollm, monkeypatch):
    import exporters.onnx_export as ox

    def boom(self, show_progress):
        self.g.weight("junk", np.zeros(4096, np.float32))     # something was already written
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(ox._Builder, "build", boom)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk on fire"):
        export_onnx(smollm, BitPlan.uniform(smollm, "int4_b32", target="onnx"), out, show_progress=False, graph="plain")
    assert list(tmp_path.iterdir()) == []
