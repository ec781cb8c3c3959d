"""ONNX exporter: a bit plan -> an onnxruntime decoder with ``com.microsoft::MatMulNBits`` weights.

Design
------
* **Graph**: hand-built with ``onnx.helper`` (no tracer): the llama-family block (RMSNorm, rotary,
  GQA attention with KV concat, SwiGLU/GeLU MLP) in plain ONNX ops (opset >= 21), fp32. Covers
  llama / mistral / qwen2 (qkv bias) / qwen3 (q/k norm) / gemma3 (1+w norms, sandwich norms,
  scaled embedding, local/global rope, sliding-window layers). Weights come from the torch model
  of :func:`tasa_edge.torch_model.load_torch_model` -- the very weights the analysis scores -- and
  every HF parameter is matched to its plan entry through ``src.gguf_name`` (the one mapping).
* **I/O** (the Optimum / onnxruntime-genai convention): inputs ``input_ids`` [b, s] int64,
  ``attention_mask`` [b, past+s] int64, ``position_ids`` [b, s] int64,
  ``past_key_values.N.key|value`` [b, kv_heads, past, head_dim] float; outputs ``logits``
  [b, s, vocab] and ``present.N.key|value`` [b, kv_heads, past+s, head_dim].
* **Quantizer**: blockwise round-to-nearest along K (the input dimension), exactly
  :meth:`tasa_edge.formats.onnx.OnnxTarget.roundtrip` (the error the sensitivity analysis assumed):
  symmetric ``int`` formats map each block's largest-magnitude value to ``-2^(b-1)`` (onnxruntime's
  rule: all 2^b levels used) and are stored offset by ``2^(b-1)`` (MatMulNBits' default zero
  point, so no zero-point input); ``uint`` formats use ``[min(x,0), max(x,0)]`` with a packed
  uint8 zero point. ``quantizer="ort"`` calls onnxruntime's own C++ quantizer instead.
* **Embedding**: ``token_embd`` in a quantized format becomes ``com.microsoft::GatherBlockQuantized``
  over the same packed weights/scales; with tied embeddings the LM head is a MatMulNBits on that
  same initializer, so the file holds one quantized copy (as the plan's byte count assumes).
  A float ``token_embd`` is a Gather (and, if tied, a MatMul on its transpose).
* **Files**: ``model.onnx`` + ``model.onnx.data`` (always external data, streamed tensor by
  tensor), the tokenizer files and ``config.json``, and ``tasa_export.json``. The directory is
  built beside the target and renamed onto it at the end; on error nothing is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tasa_edge import __version__
from tasa_edge.errors import TasaError
from tasa_edge.fsutil import default_mode
from tasa_edge.model import ModelSource
from tasa_edge.formats.onnx import QUANTIZERS, parse_format, quantize_blockwise
from tasa_edge.plan import BitPlan, model_block, plan_nbytes
from tasa_edge.progress import progress_bar

from .genai_export import builder_refuses, copy_genai_files, genai_available, rewrite, run_builder, stage_hf_dir

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
EXPORT_INFO = "tasa_export.json"
EXPORT_FORMAT = "tasa-edge/onnx-export"
MIN_OPSET = 21

#: HF ``model_type`` -> family handled by the graph builder.
_FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "gemma3_text": "gemma3"}
#: Families whose onnxruntime-genai builder graph is used under ``graph="auto"``. Not gemma-3:
#: onnxruntime-genai 0.18's builder fails on transformers 5's per-layer-type ``rope_parameters``
#: (``KeyError: 'rope_type'``), so gemma-3 keeps the plain onnxruntime graph.
GENAI_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
GRAPHS = ("auto", "genai", "plain")
_ALIGN = 64               # byte alignment of tensors in the external data file
_INLINE_MAX = 1024        # tensors up to this many bytes stay inside model.onnx
_NEG = float(np.finfo(np.float32).min)


@dataclass
class OnnxExportResult:
    path: Path                 # the output directory
    model_path: Path           # .../model.onnx
    nbytes: int                # model.onnx + model.onnx.data on disk
    tensor_bytes: int          # weight bytes written (the plan's size measure)
    bpw: float                 # 8 * tensor_bytes / parameters
    seconds: float
    types: dict[str, int] = field(default_factory=dict)        # plan format -> tensor count
    ops: dict[str, int] = field(default_factory=dict)          # MatMul / MatMulNBits / Gather... counts
    graph: str = "plain"       # "genai" (onnxruntime-genai's builder graph) or "plain"


# ============================================================================ graph builder
class _Graph:
    """Nodes + initializers; big initializers are streamed into the external data file."""

    def __init__(self, data_path: Path):
        from onnx import TensorProto

        self.TP = TensorProto
        self.nodes = []
        self.inits = []
        self.inputs = []
        self.outputs = []
        self._n = 0
        self._consts: dict[tuple, str] = {}
        self.data_path = data_path
        self._fh = open(data_path, "wb")
        self.tensor_bytes = 0
        self.ops: dict[str, int] = {}

    def close(self):
        if not self._fh.closed:
            self._fh.close()

    # -- values
    def _name(self, base: str) -> str:
        self._n += 1
        return f"{base}_{self._n}"

    def op(self, op_type: str, inputs: list[str], *, name: str | None = None, outputs: int = 1,
           domain: str | None = None, **attrs):
        from onnx import helper

        base = name or op_type
        outs = [self._name(f"/{base}/out{i}" if outputs > 1 else f"/{base}") for i in range(outputs)]
        node = helper.make_node(op_type, inputs, outs, name=self._name(base), domain=domain, **attrs)
        self.nodes.append(node)
        self.ops[op_type] = self.ops.get(op_type, 0) + 1
        return outs if outputs > 1 else outs[0]

    def out(self, op_type: str, inputs: list[str], output: str, **attrs):
        """A node writing a named graph output."""
        from onnx import helper

        self.nodes.append(helper.make_node(op_type, inputs, [output], name=self._name(op_type), **attrs))
        self.ops[op_type] = self.ops.get(op_type, 0) + 1
        return output

    def const(self, value, dtype=np.float32) -> str:
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.weight(self._name("const"), arr, count=False)
        return self._consts[key]

    def ints(self, *values) -> str:
        return self.const(list(values), np.int64)

    def weight(self, name: str, arr: np.ndarray, count: bool = True) -> str:
        """Add an initializer (external data when larger than a few hundred bytes)."""
        from onnx import numpy_helper

        arr = np.ascontiguousarray(arr)
        if count:
            self.tensor_bytes += arr.nbytes
        if arr.nbytes <= _INLINE_MAX:
            self.inits.append(numpy_helper.from_array(arr, name))
            return name
        t = self.TP()
        t.name = name
        t.data_type = {np.dtype(np.float32): self.TP.FLOAT, np.dtype(np.uint8): self.TP.UINT8,
                       np.dtype(np.int64): self.TP.INT64}[arr.dtype]
        t.dims.extend(arr.shape)
        off = self._fh.tell()
        pad = (-off) % _ALIGN
        if pad:
            self._fh.write(b"\0" * pad)
            off += pad
        self._fh.write(arr.tobytes())
        t.data_location = self.TP.EXTERNAL
        for k, v in (("location", DATA_FILE), ("offset", str(off)), ("length", str(arr.nbytes))):
            e = t.external_data.add()
            e.key, e.value = k, v
        self.inits.append(t)
        return name

    # -- helpers
    def shape_slice(self, x: str, start: int, end: int) -> str:
        return self.op("Shape", [x], start=start, end=end)


@dataclass
class _QWeight:
    packed: str
    scales: str
    zp: str | None
    bits: int
    block: int
    k: int
    n: int


class _Builder:
    def __init__(self, g: _Graph, model, src: ModelSource, plan: BitPlan, accuracy_level: int, quantizer: str):
        self.g, self.model, self.src, self.plan = g, model, src, plan
        self.acc = accuracy_level
        self.quantizer = quantizer
        self.cfg = getattr(model.config, "text_config", None) or model.config
        self.family = _FAMILIES[self.cfg.model_type]
        self.used: dict[str, str] = {}                  # gguf name -> format applied
        self._qcache: dict[str, _QWeight] = {}

    # ------------------------------------------------------------ weights
    def _gguf(self, hf_name: str) -> str | None:
        g = self.src.gguf_name(hf_name)
        return g if g in self.src.tensors else None

    def _fmt(self, gname: str | None) -> str:
        if gname is None or gname not in self.plan.tensors:
            return "float"
        return self.plan.tensors[gname]

    def _quantized(self, gname: str, w: np.ndarray, fmt: str) -> _QWeight:
        if gname in self._qcache:
            return self._qcache[gname]
        bits, block, sym = parse_format(fmt)
        packed, scales, zp = quantize_blockwise(w, bits, block, sym, self.quantizer)
        g = self.g
        q = _QWeight(g.weight(f"{gname}.q{bits}", packed), g.weight(f"{gname}.scales", scales),
                     None if zp is None else g.weight(f"{gname}.zero_points", zp),
                     bits, block, int(w.shape[1]), int(w.shape[0]))
        self._qcache[gname] = q
        self.used[gname] = fmt
        return q

    def linear(self, x: str, lin, hf_name: str, gname: str | None = None, tag: str = "") -> str:
        """``x @ W.T (+ b)`` as MatMul (float) or MatMulNBits (plan format)."""
        gname = gname or self._gguf(hf_name + ".weight")
        fmt = self._fmt(gname)
        w = lin.weight.detach().float().cpu().numpy()
        tag = tag or hf_name
        if fmt == "float":
            if gname is not None:
                self.used[gname] = fmt
            wt = self.g.weight(f"{gname or hf_name}.T", np.ascontiguousarray(w.T))
            y = self.g.op("MatMul", [x, wt], name=f"{tag}/MatMul")
        else:
            y = self.matmul_nbits(x, self._quantized(gname, w, fmt), tag)
        bias = getattr(lin, "bias", None)
        if bias is not None:
            b = self.g.weight(f"{hf_name}.bias", bias.detach().float().cpu().numpy())
            y = self.g.op("Add", [y, b], name=f"{tag}/bias")
        return y

    def matmul_nbits(self, x: str, q: _QWeight, tag: str) -> str:
        ins = [x, q.packed, q.scales] + ([q.zp] if q.zp else [])
        return self.g.op("MatMulNBits", ins, name=f"{tag}/MatMulNBits", domain="com.microsoft",
                         K=q.k, N=q.n, bits=q.bits, block_size=q.block, accuracy_level=self.acc)

    def norm(self, x: str, mod, hf_name: str) -> str:
        """RMSNorm over the last axis (gemma: scale 1 + w)."""
        g = self.g
        w = mod.weight.detach().float().cpu().numpy()
        if self.family == "gemma3":
            w = (1.0 + w).astype(np.float32)
        eps = float(getattr(mod, "variance_epsilon", getattr(mod, "eps", self.cfg.rms_norm_eps)))
        sq = g.op("Mul", [x, x], name=f"{hf_name}/sq")
        ms = g.op("ReduceMean", [sq, g.ints(-1)], name=f"{hf_name}/mean", keepdims=1)
        rs = g.op("Sqrt", [g.op("Add", [ms, g.const(eps)], name=f"{hf_name}/eps")], name=f"{hf_name}/sqrt")
        y = g.op("Div", [x, rs], name=f"{hf_name}/div")
        return g.op("Mul", [y, g.weight(hf_name + ".weight", w)], name=f"{hf_name}/scale")

    # ------------------------------------------------------------ graph
    def build(self, show_progress: bool) -> dict:
        from onnx import TensorProto, helper

        g, cfg, model = self.g, self.cfg, self.model
        inner = model.model
        layers = inner.layers
        n_layers = len(layers)
        n_heads = int(cfg.num_attention_heads)
        n_kv = int(cfg.num_key_value_heads)
        hd = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads)
        groups = n_heads // n_kv
        vocab = int(cfg.vocab_size)

        f32, i64 = TensorProto.FLOAT, TensorProto.INT64
        g.inputs += [
            helper.make_tensor_value_info("input_ids", i64, ["batch_size", "sequence_length"]),
            helper.make_tensor_value_info("attention_mask", i64, ["batch_size", "total_sequence_length"]),
            helper.make_tensor_value_info("position_ids", i64, ["batch_size", "sequence_length"]),
        ]
        g.outputs.append(helper.make_tensor_value_info("logits", f32, ["batch_size", "sequence_length", vocab]))
        for i in range(n_layers):
            for kv in ("key", "value"):
                g.inputs.append(helper.make_tensor_value_info(
                    f"past_key_values.{i}.{kv}", f32, ["batch_size", n_kv, "past_sequence_length", hd]))
                g.outputs.append(helper.make_tensor_value_info(
                    f"present.{i}.{kv}", f32, ["batch_size", n_kv, "total_sequence_length", hd]))

        # ---- masks: bias [b, 1, 1, s, t] (0 or float min), per attention kind
        past_len = g.op("Squeeze", [g.shape_slice("past_key_values.0.key", 2, 3)], name="mask/past_len")
        seq_len = g.op("Squeeze", [g.shape_slice("input_ids", 1, 2)], name="mask/seq_len")
        tot_len = g.op("Squeeze", [g.shape_slice("attention_mask", 1, 2)], name="mask/total_len")
        q_end = g.op("Add", [past_len, seq_len], name="mask/q_end")
        one, zero = g.const(1, np.int64), g.const(0, np.int64)
        q_pos = g.op("Unsqueeze", [g.op("Range", [past_len, q_end, one], name="mask/q_pos"), g.ints(1)], name="mask/q_col")
        k_pos = g.op("Range", [zero, tot_len, one], name="mask/k_pos")
        causal = g.op("LessOrEqual", [k_pos, q_pos], name="mask/causal")                       # [s, t]
        pad = g.op("Unsqueeze", [g.op("Cast", ["attention_mask"], name="mask/pad", to=TensorProto.BOOL), g.ints(1, 2)],
                   name="mask/pad4")                                                           # [b,1,1,t]
        allowed = g.op("And", [causal, pad], name="mask/allowed")                                # [b,1,s,t]
        neg, zf = g.const(_NEG), g.const(0.0)

        def bias_of(mask: str, tag: str) -> str:
            b = g.op("Where", [mask, zf, neg], name=f"mask/{tag}/bias")
            return g.op("Unsqueeze", [b, g.ints(1)], name=f"mask/{tag}/bias5")                 # [b,1,1,s,t]

        layer_types = self._layer_types(n_layers)
        biases = {"full_attention": bias_of(allowed, "full")}
        if "sliding_attention" in layer_types:
            window = int(cfg.sliding_window)
            dist = g.op("Sub", [q_pos, k_pos], name="mask/dist")
            inwin = g.op("Less", [dist, g.const(window, np.int64)], name="mask/in_window")
            biases["sliding_attention"] = bias_of(g.op("And", [allowed, inwin], name="mask/sliding"), "sliding")

        # ---- rotary cos/sin [b, 1, s, hd] per rope kind
        pos_f = g.op("Unsqueeze", [g.op("Cast", ["position_ids"], name="rope/pos", to=TensorProto.FLOAT), g.ints(-1)],
                     name="rope/pos3")
        rope = {}
        for lt in sorted(set(layer_types)):
            inv_freq, scaling = self._rope(lt)
            if inv_freq.shape[0] * 2 != hd:
                raise TasaError(f"partial rotary embeddings are not supported (rotary dim {2 * inv_freq.shape[0]}, head_dim {hd})")
            freqs = g.op("Mul", [pos_f, g.weight(f"rope.{lt}.inv_freq", inv_freq, count=False)], name=f"rope/{lt}/freqs")
            emb = g.op("Concat", [freqs, freqs], name=f"rope/{lt}/emb", axis=-1)
            cs = []
            for fn in ("Cos", "Sin"):
                v = g.op(fn, [emb], name=f"rope/{lt}/{fn}")
                if scaling != 1.0:
                    v = g.op("Mul", [v, g.const(scaling)], name=f"rope/{lt}/{fn}/scale")
                cs.append(g.op("Unsqueeze", [v, g.ints(1)], name=f"rope/{lt}/{fn}4"))
            rope[lt] = tuple(cs)

        # ---- embedding
        h = self.embedding("input_ids")

        scaling = float(cfg.query_pre_attn_scalar) ** -0.5 if self.family == "gemma3" else hd ** -0.5
        with progress_bar("build ONNX", total=n_layers + 1, enabled=show_progress) as advance:
            for i, layer in enumerate(layers):
                p = f"model.layers.{i}"
                att = layer.self_attn
                x = self.norm(h, layer.input_layernorm, f"{p}.input_layernorm")
                q = self.linear(x, att.q_proj, f"{p}.self_attn.q_proj")
                k = self.linear(x, att.k_proj, f"{p}.self_attn.k_proj")
                v = self.linear(x, att.v_proj, f"{p}.self_attn.v_proj")
                q = g.op("Reshape", [q, g.ints(0, 0, n_heads, hd)], name=f"{p}/q4")
                k = g.op("Reshape", [k, g.ints(0, 0, n_kv, hd)], name=f"{p}/k4")
                v = g.op("Reshape", [v, g.ints(0, 0, n_kv, hd)], name=f"{p}/v4")
                if getattr(att, "q_norm", None) is not None:
                    q = self.norm(q, att.q_norm, f"{p}.self_attn.q_norm")
                    k = self.norm(k, att.k_norm, f"{p}.self_attn.k_norm")
                q = g.op("Transpose", [q], name=f"{p}/qT", perm=[0, 2, 1, 3])                  # [b,h,s,hd]
                k = g.op("Transpose", [k], name=f"{p}/kT", perm=[0, 2, 1, 3])                  # [b,kv,s,hd]
                v = g.op("Transpose", [v], name=f"{p}/vT", perm=[0, 2, 1, 3])
                cos, sin = rope[layer_types[i]]
                q = self.rotary(q, cos, sin, hd, f"{p}/rope_q")
                k = self.rotary(k, cos, sin, hd, f"{p}/rope_k")
                k_all = g.out("Concat", [f"past_key_values.{i}.key", k], f"present.{i}.key", axis=2)
                v_all = g.out("Concat", [f"past_key_values.{i}.value", v], f"present.{i}.value", axis=2)
                q = g.op("Mul", [q, g.const(scaling)], name=f"{p}/q_scale")
                q5 = g.op("Reshape", [q, g.ints(0, n_kv, groups, -1, hd)], name=f"{p}/q5")     # [b,kv,g,s,hd]
                kt = g.op("Transpose", [k_all], name=f"{p}/kT_all", perm=[0, 1, 3, 2])
                kt5 = g.op("Unsqueeze", [kt, g.ints(2)], name=f"{p}/kT5")                      # [b,kv,1,hd,t]
                scores = g.op("MatMul", [q5, kt5], name=f"{p}/scores")                         # [b,kv,g,s,t]
                soft = getattr(cfg, "attn_logit_softcapping", None)
                if soft:
                    scores = self.softcap(scores, float(soft), f"{p}/softcap")
                scores = g.op("Add", [scores, biases[layer_types[i]]], name=f"{p}/masked")
                probs = g.op("Softmax", [scores], name=f"{p}/softmax", axis=-1)
                v5 = g.op("Unsqueeze", [v_all, g.ints(2)], name=f"{p}/v5")
                ctx = g.op("MatMul", [probs, v5], name=f"{p}/ctx")                             # [b,kv,g,s,hd]
                ctx = g.op("Reshape", [ctx, g.ints(0, n_heads, -1, hd)], name=f"{p}/ctx4")
                ctx = g.op("Transpose", [ctx], name=f"{p}/ctxT", perm=[0, 2, 1, 3])
                ctx = g.op("Reshape", [ctx, g.ints(0, 0, n_heads * hd)], name=f"{p}/ctx3")
                a = self.linear(ctx, att.o_proj, f"{p}.self_attn.o_proj")
                if self.family == "gemma3":
                    a = self.norm(a, layer.post_attention_layernorm, f"{p}.post_attention_layernorm")
                    h = g.op("Add", [h, a], name=f"{p}/res1")
                    x = self.norm(h, layer.pre_feedforward_layernorm, f"{p}.pre_feedforward_layernorm")
                else:
                    h = g.op("Add", [h, a], name=f"{p}/res1")
                    x = self.norm(h, layer.post_attention_layernorm, f"{p}.post_attention_layernorm")
                m = self.mlp(x, layer.mlp, f"{p}.mlp")
                if self.family == "gemma3":
                    m = self.norm(m, layer.post_feedforward_layernorm, f"{p}.post_feedforward_layernorm")
                h = g.op("Add", [h, m], name=f"{p}/res2")
                advance(1)

            h = self.norm(h, inner.norm, "model.norm")
            logits = self.lm_head(h)
            cap = getattr(cfg, "final_logit_softcapping", None)
            if cap:
                logits = self.softcap(logits, float(cap), "lm_head/softcap")
            g.out("Identity", [logits], "logits")
            advance(1)
        return {
            "n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": n_kv, "head_dim": hd, "vocab_size": vocab,
            "layer_types": layer_types,
        }

    def _layer_types(self, n_layers: int) -> list[str]:
        cfg = self.cfg
        if cfg.model_type == "mistral":
            kind = "sliding_attention" if getattr(cfg, "sliding_window", None) else "full_attention"
            return [kind] * n_layers
        lts = getattr(cfg, "layer_types", None)
        if lts:
            lts = list(lts)
            if any(t not in ("full_attention", "sliding_attention") for t in lts):
                raise TasaError(f"unsupported attention layer types {sorted(set(lts))}")
            if "sliding_attention" in lts and not getattr(cfg, "sliding_window", None):
                lts = ["full_attention"] * n_layers
            return lts
        return ["full_attention"] * n_layers

    def _rope(self, layer_type: str) -> tuple[np.ndarray, float]:
        rot = self.model.model.rotary_emb
        if hasattr(rot, f"{layer_type}_inv_freq"):
            inv = getattr(rot, f"{layer_type}_inv_freq")
            scale = getattr(rot, f"{layer_type}_attention_scaling", 1.0)
            rtype = getattr(rot, "rope_type", {}).get(layer_type, "default")
        else:
            inv, scale, rtype = rot.inv_freq, getattr(rot, "attention_scaling", 1.0), getattr(rot, "rope_type", "default")
        if rtype in ("dynamic", "longrope"):
            raise TasaError(f"rope type '{rtype}' depends on the sequence length; the ONNX exporter supports static rope only")
        return inv.detach().float().cpu().numpy(), float(scale)

    def rotary(self, x: str, cos: str, sin: str, hd: int, tag: str) -> str:
        g = self.g
        half = hd // 2
        x1 = g.op("Slice", [x, g.ints(0), g.ints(half), g.ints(-1)], name=f"{tag}/x1")
        x2 = g.op("Slice", [x, g.ints(half), g.ints(hd), g.ints(-1)], name=f"{tag}/x2")
        rot = g.op("Concat", [g.op("Neg", [x2], name=f"{tag}/neg"), x1], name=f"{tag}/rot", axis=-1)
        a = g.op("Mul", [x, cos], name=f"{tag}/cos")
        b = g.op("Mul", [rot, sin], name=f"{tag}/sin")
        return g.op("Add", [a, b], name=f"{tag}/out")

    def softcap(self, x: str, cap: float, tag: str) -> str:
        g = self.g
        t = g.op("Tanh", [g.op("Div", [x, g.const(cap)], name=f"{tag}/div")], name=f"{tag}/tanh")
        return g.op("Mul", [t, g.const(cap)], name=f"{tag}/mul")

    def mlp(self, x: str, mlp, p: str) -> str:
        g = self.g
        gate = self.linear(x, mlp.gate_proj, f"{p}.gate_proj")
        up = self.linear(x, mlp.up_proj, f"{p}.up_proj")
        act = getattr(self.cfg, "hidden_activation", None) or self.cfg.hidden_act
        if act == "silu":
            a = g.op("Mul", [gate, g.op("Sigmoid", [gate], name=f"{p}/sigmoid")], name=f"{p}/silu")
        elif act in ("gelu_pytorch_tanh", "gelu_tanh"):
            a = g.op("Gelu", [gate], name=f"{p}/gelu", approximate="tanh")
        elif act == "gelu":
            a = g.op("Gelu", [gate], name=f"{p}/gelu")
        else:
            raise TasaError(f"unsupported MLP activation '{act}'")
        return self.linear(g.op("Mul", [a, up], name=f"{p}/gated"), mlp.down_proj, f"{p}.down_proj")

    def embedding(self, ids: str) -> str:
        g = self.g
        emb = self.model.model.embed_tokens
        gname = self._gguf("model.embed_tokens.weight")
        fmt = self._fmt(gname)
        w = emb.weight.detach().float().cpu().numpy()
        d = w.shape[1]
        if fmt == "float":
            if gname is not None:
                self.used[gname] = fmt
            self._emb_float = g.weight(f"{gname or 'model.embed_tokens'}", w)
            h = g.op("Gather", [self._emb_float, ids], name="embed/Gather", axis=0)
        else:
            q = self._quantized(gname, w, fmt)
            # the MatMulNBits initializers, viewed 2-D: data [V, kb*block*bits/8], scales [V, kb],
            # packed zero points [V, ceil(kb*bits/8)] -- one stored copy shared with a tied LM head
            data2 = g.op("Reshape", [q.packed, g.ints(q.n, -1)], name="embed/data2d")
            ins = [data2, ids, q.scales] + ([q.zp] if q.zp else [])
            h = g.op("GatherBlockQuantized", ins, name="embed/GatherBlockQuantized", domain="com.microsoft",
                     gather_axis=0, quantize_axis=1, block_size=q.block, bits=q.bits)    # [b,s,kb*block]
            if d % q.block:
                h = g.op("Slice", [h, g.ints(0), g.ints(d), g.ints(-1)], name="embed/unpad")
        scale = getattr(emb, "embed_scale", None)
        if scale is not None:
            s = float(scale.to(emb.weight.dtype)) if hasattr(scale, "to") else float(scale)
            h = g.op("Mul", [h, g.const(s)], name="embed/scale")
        return h

    def lm_head(self, h: str) -> str:
        g = self.g
        head = self.model.get_output_embeddings()
        emb = self.model.model.embed_tokens
        tied = head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr()
        gname = self._gguf("lm_head.weight")
        if tied:
            # tied: the LM head reuses token_embd's (quantized or float) weights
            gname = self._gguf("model.embed_tokens.weight")
            fmt = self._fmt(gname)
            if fmt == "float":
                wt = g.op("Transpose", [self._emb_float], name="lm_head/T", perm=[1, 0])
                return g.op("MatMul", [h, wt], name="lm_head/MatMul")
            return self.matmul_nbits(h, self._qcache[gname], "lm_head")
        return self.linear(h, head, "lm_head", gname=gname)


# ============================================================================ export
def export_onnx(
    src: ModelSource,
    plan: BitPlan,
    out_dir: str | Path,
    *,
    accuracy_level: int = 4,
    opset: int = MIN_OPSET,
    show_progress: bool = True,
    quantizer: str = "rtn",
    graph: str = "auto",
) -> OnnxExportResult:
    """Write ``src`` as an ONNX decoder (KV cache) quantized per ``plan`` into ``out_dir`` (atomic).

    ``graph``: ``genai`` (onnxruntime-genai's builder graph + ``genai_config.json``, runs with
    ``og.Model(dir)``), ``plain`` (our own plain-op graph for onnxruntime alone) or ``auto``
    (genai for the families in :data:`GENAI_FAMILIES` when onnxruntime-genai is installed).
    """
    out = Path(out_dir)
    _check_inputs(src, plan, out, accuracy_level, opset, quantizer)
    if graph not in GRAPHS:
        raise TasaError(f"unknown ONNX graph {graph!r} (expected one of {', '.join(GRAPHS)})")
    t0 = time.perf_counter()

    from tasa_edge.torch_model import hf_dir_for

    hf_dir = hf_dir_for(src, show_progress=show_progress)
    cfg = json.loads((hf_dir / "config.json").read_text())
    mtype = (cfg.get("text_config") or cfg).get("model_type")
    if mtype not in _FAMILIES:
        raise TasaError(f"the ONNX exporter does not support model type '{mtype}' (supported: {', '.join(sorted(_FAMILIES))})")
    graph = _choose_graph(graph, mtype, cfg)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    if graph == "genai":
        try:
            return _export_genai(src, plan, out, tmp, hf_dir, mtype, accuracy_level, quantizer, show_progress, t0)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    from tasa_edge.torch_model import load_torch_model
    graph = None
    try:
        import torch

        with _quiet_transformers(not show_progress):
            model, _tok = load_torch_model(src, device="cpu", dtype=torch.float32)
        graph = _Graph(tmp / DATA_FILE)
        with torch.no_grad():
            b = _Builder(graph, model, src, plan, accuracy_level, quantizer)
            io = b.build(show_progress)
        graph.close()
        unused = sorted(set(plan.tensors) - set(b.used))
        if unused:
            raise TasaError(f"plan tensor {unused[0]} has no matching weight in the {mtype} graph ({len(unused)} unused)")
        del model
        model_path = tmp / MODEL_FILE
        _save_model(graph, model_path, opset, src)
        _check_model(model_path)
        _copy_hf_files(hf_dir, tmp)
        tensor_bytes = graph.tensor_bytes
        predicted = plan_nbytes(plan, src)
        types = plan.types_used()
        info = {
            "format": EXPORT_FORMAT, "version": 1, "tool": f"tasa-edge {__version__}",
            "model": model_block(src),
            "plan": {
                "target": plan.target, "budget": plan.budget, "method": plan.provenance.get("method"),
                "predicted": plan.predicted, "types": types, "tensors": dict(plan.tensors),
            },
            "onnx": {
                "graph": "plain", "runtime": "onnxruntime",
                "file": MODEL_FILE, "external_data": DATA_FILE, "opset": opset, "accuracy_level": accuracy_level,
                "quantizer": quantizer, "ops": dict(sorted(graph.ops.items())), "model_type": mtype, **io,
                "inputs": ["input_ids", "attention_mask", "position_ids", "past_key_values.{i}.key", "past_key_values.{i}.value"],
                "outputs": ["logits", "present.{i}.key", "present.{i}.value"],
                "tied_embeddings": _tied_note(plan, src),
            },
            "bytes": {"tensors": tensor_bytes, "predicted_tensors": predicted["total"]},
            "bpw": 8.0 * tensor_bytes / max(1, src.n_params),
            # numpy shapes (input dimension last) of every model tensor, for `tasa-edge inspect DIR`
            "tensor_shapes": {t.name: [int(x) for x in t.shape] for t in src.tensors.values()},
        }
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=1) + "\n")
        _install(tmp, out)
    except BaseException:
        if graph is not None:
            graph.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - t0
    nbytes = sum((out / f).stat().st_size for f in (MODEL_FILE, DATA_FILE))
    return OnnxExportResult(out, out / MODEL_FILE, nbytes, tensor_bytes, 8.0 * tensor_bytes / max(1, src.n_params),
                            seconds, types, dict(sorted(graph.ops.items())))


def _choose_graph(graph: str, mtype: str, cfg: dict) -> str:
    """``auto``: genai where onnxruntime-genai is installed and its builder handles the model, else
    plain (the reason on stderr); ``genai`` refuses in one line where ``auto`` would fall back."""
    if graph == "plain":
        return graph
    why = genai_available()
    if why is None and mtype not in GENAI_FAMILIES:
        why = f"onnxruntime-genai's graph is not supported for model type '{mtype}'"
    if why is None:
        why = builder_refuses(cfg)
        why = None if why is None else f"onnxruntime-genai's builder cannot export this model: {why}"
    if graph == "auto":
        if why is not None:
            print(f"note: plain onnxruntime graph ({why})", file=sys.stderr)
        return "plain" if why else "genai"
    if why is not None:
        raise TasaError(why + "; use --onnx-graph plain")
    return graph


def _export_genai(src: ModelSource, plan: BitPlan, out: Path, tmp: Path, hf_dir: Path, mtype: str,
                  accuracy_level: int, quantizer: str, show_progress: bool, t0: float) -> OnnxExportResult:
    """genai's builder (float32) in ``tmp/.build``, then the plan's MatMulNBits into ``tmp``."""
    stage, build = tmp / ".hf", tmp / ".build"
    stage_hf_dir(hf_dir, stage, mtype)
    tb = time.perf_counter()
    run_builder(stage, build, tmp / ".cache", "fp32", {"fuse_qkv": "false"}, show_progress)
    builder_s = time.perf_counter() - tb
    res = rewrite(build, tmp, src, plan, accuracy_level, quantizer, show_progress)
    res.builder_seconds = builder_s
    genai_files = copy_genai_files(build, tmp)
    for d in (stage, build, tmp / ".cache"):
        shutil.rmtree(d, ignore_errors=True)
    _copy_hf_files(hf_dir, tmp, keep_existing=True)
    _check_loads(tmp / MODEL_FILE)
    predicted = plan_nbytes(plan, src)
    info = {
        "format": EXPORT_FORMAT, "version": 1, "tool": f"tasa-edge {__version__}",
        "model": model_block(src),
        "plan": {
            "target": plan.target, "budget": plan.budget, "method": plan.provenance.get("method"),
            "predicted": plan.predicted, "types": plan.types_used(), "tensors": dict(plan.tensors),
        },
        "onnx": {
            "graph": "genai", "runtime": "onnxruntime-genai",
            "builder": f"onnxruntime_genai.models.builder {_version('onnxruntime-genai')} (fp32, cpu, fuse_qkv=false)",
            "file": MODEL_FILE, "external_data": DATA_FILE, "accuracy_level": accuracy_level,
            "quantizer": quantizer, "ops": res.ops, "nodes": res.nodes_after, "model_type": mtype,
            "genai_files": genai_files, "tied_embeddings": _tied_note(plan, src),
        },
        "bytes": {"tensors": res.tensor_bytes, "predicted_tensors": predicted["total"]},
        "bpw": 8.0 * res.tensor_bytes / max(1, src.n_params),
        "tensor_shapes": {t.name: [int(x) for x in t.shape] for t in src.tensors.values()},
    }
    (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=1) + "\n")
    _install(tmp, out)
    seconds = time.perf_counter() - t0
    nbytes = sum((out / f).stat().st_size for f in (MODEL_FILE, DATA_FILE))
    return OnnxExportResult(out, out / MODEL_FILE, nbytes, res.tensor_bytes, 8.0 * res.tensor_bytes / max(1, src.n_params),
                            seconds, plan.types_used(), res.ops, graph="genai")


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


@contextlib.contextmanager
def _quiet_transformers(quiet: bool):
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if quiet and was:
            hf_logging.enable_progress_bar()


def _tied_note(plan: BitPlan, src: ModelSource) -> str:
    fmt = plan.tensors.get("token_embd.weight", "float")
    if "output.weight" in src.tensors:
        return "untied: token_embd and output are separate tensors"
    if fmt == "float":
        return "tied, float: Gather + MatMul on the transposed embedding (one stored copy)"
    return f"tied, {fmt}: GatherBlockQuantized + MatMulNBits share one quantized copy"


def _check_inputs(src: ModelSource, plan: BitPlan, out: Path, accuracy_level: int, opset: int, quantizer: str) -> None:
    if plan.target != "onnx":
        raise TasaError(f"plan target is '{plan.target}', the ONNX exporter needs an 'onnx' plan")
    for fmt in set(plan.tensors.values()):
        parse_format(fmt)      # int3 / int5 / bad block sizes -> one-line TasaError
    plan.validate(src)
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise TasaError(f"accuracy_level must be 0..4 (MatMulNBits), got {accuracy_level}")
    if opset < MIN_OPSET:
        raise TasaError(f"opset must be >= {MIN_OPSET}, got {opset}")
    if quantizer not in QUANTIZERS:
        raise TasaError(f"unknown quantizer {quantizer!r} (expected one of {QUANTIZERS})")
    if out.exists():
        if not out.is_dir():
            raise TasaError(f"output {out} exists and is not a directory")
        if any(out.iterdir()) and not (out / EXPORT_INFO).exists():
            raise TasaError(f"output directory {out} is not empty and is not a tasa-edge ONNX export; refusing to replace it")


def _save_model(graph: _Graph, path: Path, opset: int, src: ModelSource) -> None:
    import onnx
    from onnx import helper

    g = helper.make_graph(graph.nodes, "tasa_edge_decoder", graph.inputs, graph.outputs, graph.inits)
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)]
    m = helper.make_model(g, opset_imports=opsets, producer_name="tasa-edge", producer_version=__version__)
    m.ir_version = helper.find_min_ir_version_for(opsets, True)
    for k, v in (("tasa_edge.model", src.name), ("tasa_edge.fingerprint", src.fingerprint)):
        p = m.metadata_props.add()
        p.key, p.value = k, v
    onnx.save_model(m, str(path))


def _check_model(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # pragma: no cover - a bug in the builder
        raise TasaError(f"exported ONNX graph fails onnx.checker: {exc}") from exc


def _check_loads(path: Path) -> None:
    """genai's graph uses onnxruntime contrib ops in the default domain (SimplifiedLayerNormalization),
    which onnx.checker does not know: check that onnxruntime's CPU provider loads it instead."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    try:
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # pragma: no cover - a bug in the rewrite
        raise TasaError(f"onnxruntime cannot load the exported genai graph: {str(exc).splitlines()[0]}") from exc
    del sess


_SKIP_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".onnx", ".onnx.data")


def _copy_hf_files(hf_dir: Path, dest: Path, keep_existing: bool = False) -> None:
    """config.json, tokenizer files, chat template ... (not the weights)."""
    for f in sorted(Path(hf_dir).iterdir()):
        if not f.is_file() or f.name.endswith(_SKIP_SUFFIXES) or f.name.endswith(".index.json"):
            continue
        if f.name in (MODEL_FILE, DATA_FILE, EXPORT_INFO) or (keep_existing and (dest / f.name).exists()):
            continue
        shutil.copy2(f, dest / f.name)


def _install(tmp: Path, out: Path) -> None:
    """Rename the finished temp directory onto ``out`` (replacing a previous export)."""
    os.chmod(tmp, default_mode(0o777))  # mkdtemp makes 0700
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.rmdir(old)
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    with contextlib.suppress(OSError):
        shutil.rmtree(old)
