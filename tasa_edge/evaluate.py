"""Measured quality of exported GGUF files against the float reference (llama.cpp)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .data import TextSample
from .metrics import compare_logits, log_softmax
from .model import ModelSource
from .zoo import cache_dir


def reference_gguf(src: ModelSource) -> Path:
    """The float32 reference of ``src`` as a GGUF (the dequantized model), exported once and cached."""
    from exporters.gguf_export import export_gguf

    from .plan import BitPlan

    if src.kind == "gguf" and all(t.src_type in ("F32",) for t in src.tensors.values()):
        return src.path
    ref = cache_dir() / f"ref-{src.fingerprint.split(':')[1]}-f32.gguf"
    if not ref.exists():
        export_gguf(src, BitPlan.uniform(src, "F32"), ref, show_progress=False)
    return ref


def sample_logits(path: str | Path, samples: list[TextSample], n_ctx: int = 512, n_threads: int | None = None):
    """For each sample: (next-token ids, logits predicting them) on the target positions only.

    Task samples are scored on the answer tokens conditioned on the question; general text on
    every token after BOS (llama-perplexity's scoring, in one window of ``n_ctx``)."""
    from .llama_run import open_llama

    out = []
    with open_llama(path, n_ctx=n_ctx, n_threads=n_threads) as llm:
        for s in samples:
            p = llm.tokenize(s.prompt.encode(), add_bos=True) if s.prompt else llm.tokenize(b"", add_bos=True)
            full = llm.tokenize((s.prompt + s.target).encode(), add_bos=True)[:n_ctx]
            start = max(1, len(p))
            llm.reset()
            llm.eval(full)
            lg = np.array(llm.scores[: len(full)], dtype=np.float32)
            out.append((np.array(full[start:]), lg[start - 1: len(full) - 1]))
    return out


def kld_vs_reference(ref_logits, path: str | Path, samples: list[TextSample], n_ctx: int = 512) -> dict:
    """Mean KLD / top-1 agreement / perplexity of ``path`` vs precomputed reference logits."""
    q = sample_logits(path, samples, n_ctx=n_ctx)
    tgt = np.concatenate([t for t, _ in ref_logits])
    r = np.concatenate([l for _, l in ref_logits])
    ql = np.concatenate([l for _, l in q])
    return compare_logits(r, ql, tgt)


def perplexity(logits_list) -> float:
    tgt = np.concatenate([t for t, _ in logits_list])
    lg = np.concatenate([l for _, l in logits_list])
    lp = log_softmax(lg)
    return float(np.exp(-lp[np.arange(tgt.size), tgt].mean()))
