"""Hugging Face checkpoints in llama.cpp's terms: hyper-parameters and tensor layout.

:func:`hf_tensor_to_gguf` turns a tensor read from safetensors (float32, numpy order) into the
layout llama.cpp expects under its GGUF name. For ``llama`` (Llama/Mistral) the q and k
projections are permuted from HF's rotate-half rope layout to GGUF's interleaved one; for
``gemma3`` every RMSNorm weight gets +1 (HF computes ``x * (1 + w)``, llama.cpp ``x * w``).
Qwen2/Qwen3 tensors are used as they are. :func:`hparams` reads the hyper-parameters from the
model's ``config.json`` (either transformers config style).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import TasaError
from .names import kind_of

# --------------------------------------------------------------------------- tensors


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half rope layout -> GGUF interleaved layout (rows of a q/k weight or bias).

    Within each head, HF keeps the two rotated halves as ``[x0..x(d/2-1), y0..y(d/2-1)]``;
    llama.cpp's (GPT-J style) rope wants the pairs adjacent: ``[x0, y0, x1, y1, ...]``.
    """
    rows = w.shape[0]
    if n_head <= 0 or rows % (2 * n_head):
        raise TasaError(f"cannot permute q/k rows: {rows} rows is not a multiple of 2 x {n_head} heads")
    half = rows // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of :func:`permute_qk` (GGUF interleaved -> HF rotate-half)."""
    rows = w.shape[0]
    if n_head <= 0 or rows % (2 * n_head):
        raise TasaError(f"cannot permute q/k rows: {rows} rows is not a multiple of 2 x {n_head} heads")
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_tensor_to_gguf(src, gguf_name: str, arr: np.ndarray) -> np.ndarray:
    """A safetensors tensor (float32, numpy order) in the layout llama.cpp expects for ``gguf_name``."""
    arr = np.asarray(arr, dtype=np.float32)
    if src.arch == "llama":
        kind = kind_of(gguf_name)
        if kind in ("attn_q", "attn_k") and gguf_name.endswith((".weight", ".bias")):
            hp = src.hparams
            arr = permute_qk(arr, hp.n_head if kind == "attn_q" else hp.n_head_kv)
    elif src.arch == "gemma3":
        if gguf_name.endswith("norm.weight"):
            arr = arr + np.float32(1.0)
    return np.ascontiguousarray(arr, dtype=np.float32)


# --------------------------------------------------------------------------- hyper-parameters


@dataclass(frozen=True)
class HParams:
    n_ctx: int
    n_embd: int
    n_layer: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    rms_eps: float
    rope_theta: float
    rope_scaling: dict | None


def text_config(src) -> dict:
    cfg = src.hf_config
    if not isinstance(cfg, dict):
        raise TasaError(f"{src.path}: no Hugging Face config loaded")
    return cfg.get("text_config", cfg)


def require(cfg: dict, key: str, where) -> Any:
    v = cfg.get(key)
    if v is None:
        raise TasaError(f"{where}: config.json has no '{key}'")
    return v


#: Per-architecture defaults of the transformers config classes (used when config.json omits a key).
ARCH_DEFAULTS = {
    "llama": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 2048},
    "qwen2": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 32768},
    "qwen3": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 32768, "head_dim": 128},
    "gemma3": {
        "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0, "max_position_embeddings": 131072,
        "head_dim": 256, "rope_local_base_freq": 10000.0,
    },
}


def rope_params(cfg: dict, layer_type: str | None = None) -> dict:
    """The rope parameters of one attention type, from either config style.

    transformers < 5 writes ``rope_theta`` + ``rope_scaling``; transformers >= 5 writes
    ``rope_parameters`` (for Gemma 3 one dict per layer type: full_attention / sliding_attention).
    """
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict) and any(isinstance(v, dict) for v in rp.values()):
        rp = rp.get(layer_type or "full_attention") or {}
    out: dict = dict(rp) if isinstance(rp, dict) else {}
    if "rope_theta" not in out and cfg.get("rope_theta") is not None and layer_type != "sliding_attention":
        out["rope_theta"] = cfg["rope_theta"]
    legacy = cfg.get("rope_scaling")
    if isinstance(legacy, dict) and layer_type != "sliding_attention":
        for k, v in legacy.items():
            out.setdefault(k, v)
        if "type" in legacy and "rope_type" not in legacy:
            out["rope_type"] = legacy["type"]
    return out


def hparams(src) -> HParams:
    """The model's hyper-parameters (``src.hparams`` caches them)."""
    cfg = text_config(src)
    where = src.path
    d = ARCH_DEFAULTS.get(src.arch, {})
    n_embd = int(require(cfg, "hidden_size", where))
    n_head = int(require(cfg, "num_attention_heads", where))
    n_head_kv = int(cfg.get("num_key_value_heads") or n_head)
    head_dim = cfg.get("head_dim") or d.get("head_dim") or n_embd // n_head
    rope = rope_params(cfg)
    theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    rtype = rope.get("rope_type", "default")
    hp = HParams(
        n_ctx=int(cfg.get("max_position_embeddings") or d.get("max_position_embeddings", 2048)),
        n_embd=n_embd,
        n_layer=int(require(cfg, "num_hidden_layers", where)),
        n_ff=int(require(cfg, "intermediate_size", where)),
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=int(head_dim),
        rms_eps=float(cfg.get("rms_norm_eps") or d.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta),
        rope_scaling=None if rtype in (None, "default") else rope,
    )
    if n_head % n_head_kv:
        raise TasaError(f"{where}: num_attention_heads {n_head} is not a multiple of num_key_value_heads {n_head_kv}")
    return hp
