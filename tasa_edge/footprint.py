"""What an analysis will cost before it runs: peak memory and time per sample from shapes only.

``tasa-edge analyze MODEL --dry-run`` reads a GGUF header or an HF ``config.json`` (no weights
needed: LLaMA-3-8B's config alone is enough), and predicts for the chosen device, sizes and dtype:

    peak = runtime + weights + Fisher statistics + one sample's working set

* runtime: the interpreter with torch and transformers (:data:`RUNTIME_BYTES`; a GGUF source's
  header is read without gguf-py's reader, whose parsed vocabulary would cost ~3.3 kB per token);
* weights: every distinct parameter once (tied embeddings once) in the gradient-pass dtype;
* Fisher statistics of both sources in the chosen form (:mod:`tasa_edge.fisher`);
* working set of one forward+backward: the activations autograd keeps, per token and layer
  :data:`ACT_PER_TOKEN_D` x d_model + :data:`ACT_PER_TOKEN_FF` x d_ff values plus the attention
  scores (heads x tokens); the logits chain (:data:`LOGIT_COPIES` float32 copies of tokens x vocab);
  the backward pass of the largest matrix (vocab x d): with untied embeddings the embedding's
  gradient is sparse (the sample's rows) and only the LM head's dense gradient remains,
  :data:`GRAD_BYTES_UNTIED` bytes per element; a tied embedding also adds its rows into that
  gradient, :data:`GRAD_BYTES_TIED`; plus one float32 slice per statistic (``GRAD_CHUNK``).

The coefficients were measured on this CPU with bf16 weights (one sample through ``collect``,
VmHWM over the resident set before it): SmolLM2 (tied, 49152 x 576 embedding) needed 253 MB at
64 tokens and 655 MB at 256 -- ~2.1 MB per token, about 8 float32 copies of a logits row over
the 30 layers' activations; a random untied 2-layer llama with a 64000 x 1024 vocabulary ~2.6
bytes per embedding element beside; a 16-layer one with a small vocabulary 207 MB for 205 M
parameters (per-tensor gradients are freed as they come). The tied-embedding coefficient was then
fitted to whole analyses of the packaged models (peak RSS of ``analyze`` at 4 + 4 + 2 samples of 128
tokens: SmolLM2 1130 MiB, gemma-3 2340 MiB; Qwen2.5-Coder at the CLI defaults 6818 MiB, untied):
the predictions are within -6%, +2% and -11%.
Not measured on CUDA (no GPU here): the device may allocate differently.
``tests/test_footprint.py`` runs a real analysis and compares.
On CUDA the weights, statistics and working set live on the GPU; the host keeps the runtime.

Time per sample = (6 x tokens x matmul parameters + 12 x layers x tokens^2 x heads x head_dim)
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
ACT_PER_TOKEN_D = 16
ACT_PER_TOKEN_FF = 4
LOGIT_COPIES = 8
GRAD_BYTES_TIED = 2
GRAD_BYTES_UNTIED = 3
GRAD_CHUNK = 1 << 22
#: FLOPs a matmul benchmark reaches vs a whole forward+backward of a transformer block
MODEL_EFFICIENCY = 0.5


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

    @property
    def bytes_per_param(self) -> float:
        return self.peak_bytes / max(1, self.n_params)

    def to_dict(self) -> dict:
        return {**asdict(self), "bytes_per_param": self.bytes_per_param}


def predict(shapes: Shapes, *, tokens: int, samples: int, device: str = "cpu", dtype: str = "float32",
            fisher: str = "factored", fisher_dtype: str = "float32", throughput_flops: float,
            device_memory: int | None = None) -> Prediction:
    """Peak memory (on the device that holds the model) and time per sample of an analysis."""
    wb = 2 if dtype == "bfloat16" else 4
    q = shapes.quantizable()
    parts = {
        "runtime": RUNTIME_BYTES,
        "weights": shapes.n_params * wb,
        "fisher": fisher_bytes(shapes, fisher, fisher_dtype),
    }
    act = tokens * shapes.n_layer * (ACT_PER_TOKEN_D * shapes.d_model + ACT_PER_TOKEN_FF * shapes.d_ff
                                     + shapes.n_head * tokens) * wb
    logits = LOGIT_COPIES * tokens * shapes.vocab * 4
    largest = max(n_elements(s) for s in q.values())
    grads = largest * (GRAD_BYTES_TIED if shapes.tied else GRAD_BYTES_UNTIED) + 2 * GRAD_CHUNK * 4
    parts["working_set"] = act + logits + grads
    if device == "cuda":
        host = parts.pop("runtime")
        peak = sum(parts.values())
        parts["host_runtime"] = host
    else:
        peak = sum(parts.values())
    matmul = sum(n_elements(s) for s in q.values())
    flops = 6.0 * tokens * matmul + 12.0 * shapes.n_layer * tokens ** 2 * shapes.n_head * shapes.head_dim
    sec = flops / max(1.0, throughput_flops * MODEL_EFFICIENCY)
    fits = None if device_memory is None else peak <= device_memory
    return Prediction(device, dtype, tokens, samples, parts, int(peak), device_memory, fits, flops,
                      throughput_flops, sec, shapes.n_params)


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
