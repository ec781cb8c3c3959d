"""The Perplexity-Illusion report: how differently general text and task data rank the layers.

Spearman / Kendall rank correlations of perplexity vs reasoning sensitivity (each tensor at its
normalisation format), per layer, per tensor and per tensor kind, and a three-panel plot.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .fsutil import atomic_path
from .names import kind_of, layer_of
from .results import Analysis


def layer_scores(an: Analysis, source: str) -> dict[int, float]:
    """Per-layer sensitivity at the normalisation format (sum over the layer's tensors)."""
    out: dict[int, float] = {}
    for name, v in an.table.at_reference(an.target, source).items():
        layer = layer_of(name)
        if layer is not None:
            out[layer] = out.get(layer, 0.0) + v
    return dict(sorted(out.items()))


def illusion_report(an: Analysis, png: Path | None = None) -> dict:
    """Rank correlation between perplexity and reasoning sensitivity, per layer and per tensor."""
    from scipy.stats import kendalltau, spearmanr

    lp, lt = layer_scores(an, "ppl"), layer_scores(an, "task")
    layers = sorted(lp)
    a, b = [lp[i] for i in layers], [lt[i] for i in layers]
    names = sorted(an.table.names())
    rp, rt = an.table.at_reference(an.target, "ppl"), an.table.at_reference(an.target, "task")
    tp, tt = [rp[n] for n in names], [rt[n] for n in names]
    rep = {
        "per_layer": {"spearman": float(spearmanr(a, b)[0]), "kendall": float(kendalltau(a, b)[0]), "n": len(layers)},
        "per_tensor": {"spearman": float(spearmanr(tp, tt)[0]), "kendall": float(kendalltau(tp, tt)[0]), "n": len(names)},
        "top_layers_ppl": [int(i) for i in np.argsort(a)[::-1][:5].tolist()],
        "top_layers_task": [int(i) for i in np.argsort(b)[::-1][:5].tolist()],
        "by_kind": {},
    }
    kinds = sorted({kind_of(n) for n in names})
    for k in kinds:
        idx = [i for i, n in enumerate(names) if kind_of(n) == k]
        if len(idx) >= 3:
            rep["by_kind"][k] = float(spearmanr([tp[i] for i in idx], [tt[i] for i in idx])[0])
    if png is not None:
        plot_illusion(layers, a, b, tp, tt, rep, Path(png))
    return rep


def plot_illusion(layers, a, b, tp, tt, rep, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.stats import rankdata

    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    ra, rb = rankdata(a), rankdata(b)
    w = 0.4
    x = np.arange(len(layers))
    ax[0].bar(x - w / 2, np.asarray(a) / max(sum(a), 1e-30), w, label="perplexity (general text)")
    ax[0].bar(x + w / 2, np.asarray(b) / max(sum(b), 1e-30), w, label="reasoning (GSM8K CoT)")
    ax[0].set_xlabel("layer")
    ax[0].set_ylabel("share of predicted loss")
    ax[0].set_title("per-layer sensitivity")
    ax[0].legend(fontsize=8)
    ax[1].scatter(ra, rb)
    for i, l in enumerate(layers):
        ax[1].annotate(str(l), (ra[i], rb[i]), fontsize=7)
    ax[1].set_xlabel("rank by perplexity sensitivity")
    ax[1].set_ylabel("rank by reasoning sensitivity")
    pl = rep["per_layer"]
    ax[1].set_title(f"layers: Spearman {pl['spearman']:.2f}, Kendall {pl['kendall']:.2f}")
    ax[2].loglog(np.maximum(tp, 1e-12), np.maximum(tt, 1e-12), ".", alpha=0.6)
    pt = rep["per_tensor"]
    ax[2].set_xlabel("perplexity sensitivity")
    ax[2].set_ylabel("reasoning sensitivity")
    ax[2].set_title(f"tensors: Spearman {pt['spearman']:.2f}, Kendall {pt['kendall']:.2f}")
    fig.suptitle("Perplexity Illusion: which layers matter depends on the task")
    fig.tight_layout()
    with atomic_path(png, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
