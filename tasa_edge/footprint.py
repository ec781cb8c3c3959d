"""What an analysis will cost before it runs: peak memory and time per sample from shapes only.

``tasa-edge analyze MODEL --dry-run`` reads a GGUF header or an HF ``config.json`` (no weights
needed: LLaMA-3-8B's config alone is enough), and predicts for the chosen device, sizes and dtype:

    peak = runtime + weights + Fisher statistics + one sample's working set

* runtime: the interpreter with torch and transformers (:data:`RUNTIME_BYTES`; a GGUF source's
  header is read without gguf-py's reader, whose parsed vocabulary would cost ~3.3 kB per token;
  the tokenizer encodes every sample before the model loads and is freed);
* weights: every distinct parameter once (tied embeddings once) in the gradient-pass dtype; on the
  CPU an untied token embedding is not held (``RowEmbedding`` reads its rows from the file);
* Fisher statistics of both sources in the chosen form (:mod:`tasa_edge.fisher`), the random
  sketches of the gradient traces (:data:`SKETCH_K` x (rows + cols) per tensor), and per sample its
  records (the k x k trace of every tensor, the importance sums of every block matrix's input);
* working set of one forward+backward: the activations autograd keeps, per token and layer
  :data:`ACT_PER_TOKEN_D` x d_model + :data:`ACT_PER_TOKEN_FF` x d_ff values plus the attention
  scores (heads x tokens) -- with layer checkpointing (``--checkpoint``; ``auto`` turns it on
  above :data:`CHECKPOINT_ABOVE`) each layer's input and one layer's activations instead; the LM
  head done by hand in vocabulary slices (``ChunkedHead``): one float32 [tokens x vocab] buffer
  (:data:`LOGIT_COPIES`) and a few float32 slices of its gradient (:data:`HEAD_SLICES` x ``GRAD_CHUNK``); the largest block matrix's gradient in the weights' dtype
  (autograd's, freed by the statistics hook as it arrives).

The coefficients were measured on this CPU with bf16 weights. Activations: one sample through
``collect``, VmHWM over the resident set before it (SmolLM2 253 MB at 64 tokens, 655 MB at 256
before the head was sliced; a 16-layer model with a small vocabulary 207 MB for 205 M parameters).
Whole analyses of the packaged models (peak RSS of ``analyze`` at 4 + 4 + 2 samples of 128 tokens:
SmolLM2 969 MiB, gemma-3 1377 MiB, predicted 893 and 1223: −8%, −11%) are checked against the
prediction by ``tests/test_footprint.py``; Qwen2.5-Coder at the CLI defaults, layers checkpointed
(``benchmarks/scaling.py --defaults-run``): 4110 MiB, predicted 3807, −7%. What the model leaves
out: the kernels oneDNN compiles for each new (16-token bucket) sample length, ~20-30 MB each on Qwen.
Not measured on CUDA (no GPU here): the device may allocate differently.
On CUDA the weights, statistics, sketches and working set live on the GPU; the host keeps the
runtime and the per-sample records.

Time per sample = (6 x tokens x matmul parameters + 12 x layers x tokens^2 x heads x head_dim,
plus one more forward of the layers when they are checkpointed)
FLOPs / the device's sustained throughput in the gradient-pass dtype: measured with one matmul of
the model's own width on this machine (``measure_throughput``), or given (``--device-tflops``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import TasaError
from .formats.base import n_elements
from .jsonio import load_hf_config
from .names import is_quantizable

GIB = 1 << 30
RUNTIME_BYTES = int(0.40 * GIB)
#: the gradient-trace sketch size (:class:`~tasa_edge.results.AnalysisConfig`'s ``sketch_k``)
SKETCH_K = 16
ACT_PER_TOKEN_D = 16
ACT_PER_TOKEN_FF = 4
LOGIT_COPIES = 1
HEAD_SLICES = 3
GRAD_CHUNK = 1 << 22
#: FLOPs a matmul benchmark reaches vs a whole forward+backward of a transformer block
MODEL_EFFICIENCY = 0.5
#: ``--checkpoint auto`` recomputes the layers when keeping all their activations would cost more
#: than this (Qwen2.5-1.5B at 192 tokens: ~0.63 GiB, on; SmolLM2 and gemma-3-270m: < 0.2 GiB, off --
#: the recompute costs about one more forward per sample)
CHECKPOINT_ABOVE = 256 << 20


@dataclass
class Shapes:
    arch: str
    n_layer: int
    d_model: int
    d_ff: int
    vocab: int
    n_head: int
    n_head_kv: int
    head_dim: int
    tied: bool
    tensors: dict[str, tuple[int, ...]] = field(default_factory=dict)
    gguf: bool = False

    @property
    def n_params(self) -> int:
        return sum(n_elements(s) for s in self.tensors.values())

    def quantizable(self) -> dict[str, tuple[int, ...]]:
        return {n: s for n, s in self.tensors.items() if is_quantizable(n, s)}


def shapes_from_config(path: str | Path) -> Shapes:
    """Tensor shapes of a llama-family model (llama, mistral, qwen2, qwen3, gemma3) from its HF
    ``config.json`` (a file or the directory holding it), without any weights."""
    p = Path(path)
    p = p / "config.json" if p.is_dir() else p
    if not p.is_file():
        raise TasaError(f"no config.json at {path}")
    cfg = load_hf_config(p)           # bounded read, checked structure
    cfg = cfg.get("text_config", cfg)
    try:
        d, ff, layers = int(cfg["hidden_size"]), int(cfg["intermediate_size"]), int(cfg["num_hidden_layers"])
        heads = int(cfg["num_attention_heads"])
        vocab = int(cfg["vocab_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise TasaError(f"{p}: config.json lacks {exc} (need hidden_size, intermediate_size, num_hidden_layers, "
                        "num_attention_heads, vocab_size)") from None
    kv = int(cfg.get("num_key_value_heads") or heads)
    hd = int(cfg.get("head_dim") or d // heads)
    mt = str(cfg.get("model_type", "llama"))
    arch = {"mistral": "llama", "gemma3_text": "gemma3"}.get(mt, mt)
    tied = bool(cfg.get("tie_word_embeddings", arch == "gemma3"))
    t: dict[str, tuple[int, ...]] = {"token_embd.weight": (vocab, d)}
    for i in range(layers):
        b = f"blk.{i}."
        t.update({b + "attn_norm.weight": (d,), b + "attn_q.weight": (heads * hd, d), b + "attn_k.weight": (kv * hd, d),
                  b + "attn_v.weight": (kv * hd, d), b + "attn_output.weight": (d, heads * hd),
                  b + "ffn_norm.weight": (d,), b + "ffn_gate.weight": (ff, d), b + "ffn_up.weight": (ff, d),
                  b + "ffn_down.weight": (d, ff)})
        if arch in ("qwen3", "gemma3"):
            t.update({b + "attn_q_norm.weight": (hd,), b + "attn_k_norm.weight": (hd,)})
        if arch == "qwen2":
            t.update({b + "attn_q.bias": (heads * hd,), b + "attn_k.bias": (kv * hd,), b + "attn_v.bias": (kv * hd,)})
    t["output_norm.weight"] = (d,)
    if not tied:
        t["output.weight"] = (vocab, d)
    return Shapes(arch, layers, d, ff, vocab, heads, kv, hd, tied, t)


def shapes_from_source(src) -> Shapes:
    """Shapes of an opened :class:`~tasa_edge.model.ModelSource` (GGUF header or HF directory)."""
    if src.kind == "hf":
        return shapes_from_config(src.path)
    a = src.arch

    def f(key, default=None):
        v = src.raw_gguf_field(f"{a}.{key}")
        return default if v is None else v

    d = int(f("embedding_length"))
    heads = int(f("attention.head_count"))
    emb = src.tensors["token_embd.weight"].shape
    return Shapes(a, int(f("block_count")), d, int(f("feed_forward_length")), int(emb[0]), heads,
                  int(f("attention.head_count_kv", heads)), int(f("attention.key_length", d // heads)),
                  "output.weight" not in src.tensors, {n: t.shape for n, t in src.tensors.items()}, gguf=True)


def fisher_bytes(shapes: Shapes, form: str, fisher_dtype: str = "float32") -> int:
    q = shapes.quantizable()
    if form == "factored":
        per = sum(s[0] + s[-1] for s in q.values()) * 4
    elif form == "block":
        per = sum(s[0] * -(-s[-1] // 32) for s in q.values()) * 4
    else:
        per = sum(n_elements(s) for s in q.values()) * (2 if fisher_dtype == "bfloat16" else 4)
    return 2 * per


@dataclass
class Prediction:
    device: str
    dtype: str
    tokens: int
    samples: int
    parts: dict[str, int]
    peak_bytes: int
    device_memory: int | None
    fits: bool | None
    flops_per_sample: float
    throughput_flops: float
    seconds_per_sample: float
    n_params: int
    checkpoint: bool = False

    @property
    def bytes_per_param(self) -> float:
        return self.peak_bytes / max(1, self.n_params)

    def to_dict(self) -> dict:
        return {**asdict(self), "bytes_per_param": self.bytes_per_param}


def layer_activation_bytes(shapes: Shapes, tokens: int, wb: int) -> int:
    """The activations autograd keeps for one decoder layer and one sample of ``tokens`` tokens."""
    return tokens * (ACT_PER_TOKEN_D * shapes.d_model + ACT_PER_TOKEN_FF * shapes.d_ff + shapes.n_head * tokens) * wb


def checkpoint_layers(shapes: Shapes, tokens: int, wb: int, mode: str = "auto") -> bool:
    """Whether the gradient pass recomputes each decoder layer in the backward pass (``on`` /
    ``off``, or ``auto``: when the whole stack's activations would exceed :data:`CHECKPOINT_ABOVE`)."""
    if mode not in ("auto", "on", "off"):
        raise TasaError(f"--checkpoint must be auto, on or off, got {mode!r}")
    if mode != "auto":
        return mode == "on"
    return shapes.n_layer * layer_activation_bytes(shapes, tokens, wb) > CHECKPOINT_ABOVE


def activation_bytes(shapes: Shapes, tokens: int, wb: int, checkpoint: bool) -> int:
    """Peak activations of one forward+backward: every layer's, or with layer checkpointing each
    layer's input (the hidden state) plus the one layer being recomputed."""
    per_layer = layer_activation_bytes(shapes, tokens, wb)
    if not checkpoint:
        return shapes.n_layer * per_layer
    return shapes.n_layer * tokens * shapes.d_model * wb + per_layer


def predict(shapes: Shapes, *, tokens: int, samples: int, device: str = "cpu", dtype: str = "float32",
            fisher: str = "factored", fisher_dtype: str = "float32", throughput_flops: float,
            device_memory: int | None = None, checkpoint: str = "auto") -> Prediction:
    """Peak memory (on the device that holds the model) and time per sample of an analysis."""
    wb = 2 if dtype == "bfloat16" else 4
    q = shapes.quantizable()
    # on the CPU an untied token embedding is read by rows from the file (RowEmbedding), not held
    held = shapes.n_params - (shapes.vocab * shapes.d_model if device == "cpu" and not shapes.tied else 0)
    parts = {
        "runtime": RUNTIME_BYTES,       # the tokenizer encodes every sample first and is freed
        "weights": held * wb,
        "fisher": fisher_bytes(shapes, fisher, fisher_dtype),
        # float32 random sketches of every tensor's gradient (k x rows and cols x k)
        "sketches": SKETCH_K * 4 * sum(s[0] + s[-1] for s in q.values()),
    }
    # kept per sample on the host: the trace sketch (k x k per tensor) and the importance sums
    # (one float32 per input column of every block matrix)
    records = samples * 4 * (SKETCH_K * SKETCH_K * len(q) + sum(s[-1] for n, s in q.items() if n.startswith("blk.")))
    ck = checkpoint_layers(shapes, tokens, wb, checkpoint)
    act = activation_bytes(shapes, tokens, wb, ck)
    logits = LOGIT_COPIES * tokens * shapes.vocab * 4
    # the largest dense gradient autograd materialises: a block matrix (the LM head's comes in slices)
    largest = max(n_elements(s) for n, s in q.items() if n.startswith("blk."))
    grads = largest * wb + HEAD_SLICES * GRAD_CHUNK * 4
    parts["working_set"] = act + logits + grads
    if device == "cuda":
        host = parts.pop("runtime")
        peak = sum(parts.values())
        parts["host_runtime"] = host
        parts["host_records"] = records
    else:
        parts["records"] = records
        peak = sum(parts.values())
    matmul = sum(n_elements(s) for s in q.values())
    attn = 4.0 * shapes.n_layer * tokens ** 2 * shapes.n_head * shapes.head_dim     # one forward's
    flops = 6.0 * tokens * matmul + 3 * attn
    if ck:                                  # the layers' forward once more
        flops += 2.0 * tokens * sum(n_elements(s) for n, s in q.items() if n.startswith("blk.")) + attn
    sec = flops / max(1.0, throughput_flops * MODEL_EFFICIENCY)
    fits = None if device_memory is None else peak <= device_memory
    return Prediction(device, dtype, tokens, samples, parts, int(peak), device_memory, fits, flops,
                      throughput_flops, sec, shapes.n_params, ck)


def measure_throughput(d_model: int, d_ff: int, tokens: int, dtype: str = "float32", seconds: float = 0.5) -> float:
    """Sustained FLOP/s of this machine's CPU on a [tokens x d_model] x [d_model x d_ff] matmul in
    ``dtype`` (torch, the threads torch uses): the building block of the gradient pass."""
    import torch

    dt = getattr(torch, dtype)
    a, b = torch.randn(tokens, d_model, dtype=dt), torch.randn(d_model, d_ff, dtype=dt)
    a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2.0 * tokens * d_model * d_ff * n / (time.perf_counter() - t0)
