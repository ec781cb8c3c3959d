"""Distribution metrics of a quantized model against the reference (llama-perplexity semantics)."""

from __future__ import annotations

import numpy as np


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare_logits(ref: np.ndarray, q: np.ndarray, targets: np.ndarray | None = None) -> dict:
    """KL(P_ref || P_q) per position, averaged; top-1 agreement; and, given the next tokens,
    perplexities and the mean change of the correct token's probability (Δp)."""
    lp, lq = log_softmax(ref), log_softmax(q)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    out = {
        "kld": float(kl.mean()),
        "kld_p99": float(np.quantile(kl, 0.99)) if kl.size else 0.0,
        "top1": float((lp.argmax(-1) == lq.argmax(-1)).mean()),
        "n": int(kl.size),
    }
    if targets is not None:
        t = np.asarray(targets)
        idx = np.arange(t.size)
        out["ppl_ref"] = float(np.exp(-lp[idx, t].mean()))
        out["ppl"] = float(np.exp(-lq[idx, t].mean()))
        out["delta_p"] = float((np.exp(lq[idx, t]) - np.exp(lp[idx, t])).mean())
    return out
