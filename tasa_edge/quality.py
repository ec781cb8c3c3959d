"""The one quality module: a model's next-token distributions against the float reference.

Everything that reports a KL-divergence, a top-1 agreement or a perplexity -- the README's numbers
(:mod:`tasa_edge.evaluate`, ``benchmarks/run.py``) and ``tasa-edge bench`` (``devices/worker.py``
scores, ``devices/harness.py`` aggregates) -- goes through these functions, with llama-perplexity's
semantics (``--kl-divergence-base`` / ``--kl-divergence``):

1. :func:`reference_rows`: the reference's log-probabilities of every scored position, kept as the
   **reference store** (float16, ``[positions, vocab]``), plus the log-prob of the true next token
   and the reference's top-1 (both from the float32 log-probs, before rounding);
2. :func:`score_rows`: a model's log-probs against a stored reference: per position
   KL(P_ref || P_q), whether the top-1 agrees, and the model's log-prob of the true next token;
3. :func:`summarize`: the statistics over all positions (mean KLD ± standard error, 99th
   percentile, maximum; top-1 ± standard error; perplexities; Δp), and, given the number of
   positions of each sample (text), a 95% interval of every KLD / top-1 / PPL figure by bootstrap
   over samples (:mod:`tasa_edge.stats`);
4. :class:`SampleSums`: the per-sample sums those intervals are made from, kept so that two files
   scored on the same samples are compared *paired* (:meth:`SampleSums.paired`).

Precision.  :func:`log_softmax` works on float32 arrays and accumulates the normaliser
(sum of exp) in float64, as llama-perplexity's ``log_softmax`` does (``double sum_exp``).  Float32
rather than float64 because the worker holds ``[positions, vocab]`` blocks on small devices (512 x
152k positions x vocab is 311 MB in float32, twice that in float64) and because the reference is
stored in float16 anyway: its rounding (~5e-4 relative) dominates float32's.  KL per position is
summed over the vocabulary in float64.

The reference is stored in float16 on *both* paths -- on disk in ``tasa-edge bench`` (needed there:
a medium run's store is gigabytes) and in memory for the README numbers -- so that the two give the
same KLD to the bit, not "the same within the float16 error": the README path is no longer a
second, more precise measurement that ``tasa-edge bench`` cannot reproduce.  With the same logits
(same file, same token ids, same llama.cpp context; see :func:`tasa_edge.llama_run.score`) and the
same grouping of positions into rows, every function below is elementwise or row-wise, so chunking
does not change a single bit; :func:`summarize` then sees the same concatenated arrays.

Pure numpy: no torch, no llama.cpp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import stats
from .errors import TasaError

#: dtype of the stored reference log-probs (as llama-perplexity's KL-divergence base).
STORE_DTYPE = np.float16


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of logits ``[..., vocab]``: float32, the normaliser summed in float64."""
    x = np.asarray(x, dtype=np.float32)
    x = x - x.max(axis=-1, keepdims=True)
    norm = np.log(np.exp(x).sum(axis=-1, keepdims=True, dtype=np.float64))
    return x - norm.astype(np.float32)


def kl_rows(lp: np.ndarray, lq: np.ndarray) -> np.ndarray:
    """KL(P || Q) per row of log-probs ``lp`` (reference) and ``lq`` (model), summed in float64."""
    lp = np.asarray(lp, dtype=np.float32)
    return (np.exp(lp) * (lp - lq)).sum(axis=-1, dtype=np.float64)


def reference_rows(logits: np.ndarray, targets: np.ndarray | None = None):
    """The reference's stored form of one block of positions (logits ``[m, vocab]`` predicting
    ``targets [m]``): (float16 log-probs, float32 log-prob of each target or None, int32 top-1)."""
    lp = log_softmax(logits)
    tgt_lp = None
    if targets is not None:
        t = np.asarray(targets, dtype=np.int64)
        tgt_lp = lp[np.arange(lp.shape[0]), t]
    return lp.astype(STORE_DTYPE), tgt_lp, lp.argmax(-1).astype(np.int32)


def score_rows(ref_lp: np.ndarray, ref_top1: np.ndarray, logits: np.ndarray, targets: np.ndarray | None = None):
    """A model's logits ``[m, vocab]`` against the stored reference rows ``ref_lp`` (float16):
    (KL per position float64, top-1 agreement bool, model log-prob of each target float32 or None)."""
    lq = log_softmax(logits)
    if ref_lp.shape[1] != lq.shape[1]:
        raise ValueError(f"vocabulary size {lq.shape[1]} differs from the reference's {ref_lp.shape[1]}")
    kl = kl_rows(ref_lp, lq)
    same = lq.argmax(-1) == np.asarray(ref_top1)
    lq_t = None
    if targets is not None:
        t = np.asarray(targets, dtype=np.int64)
        lq_t = lq[np.arange(lq.shape[0]), t]
    return kl, same, lq_t


def target_logprobs(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """The model's log-prob of each target token (no reference): float32 ``[m]``."""
    lq = log_softmax(logits)
    return lq[np.arange(lq.shape[0]), np.asarray(targets, dtype=np.int64)]


def std_error(x: np.ndarray) -> float:
    """Standard error of the mean (sample standard deviation / sqrt(n)); 0 for fewer than 2."""
    x = np.asarray(x, dtype=np.float64)
    return float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else 0.0


def perplexity(target_lp: np.ndarray) -> float:
    """exp(-mean log-prob of the true next tokens)."""
    return float(np.exp(-np.asarray(target_lp, dtype=np.float64).mean()))


def summarize(lq_t: np.ndarray | None = None, kl: np.ndarray | None = None, same: np.ndarray | None = None,
              tgt_lp: np.ndarray | None = None, lengths: np.ndarray | None = None) -> dict:
    """llama-perplexity's statistics over every scored position.

    ``lq_t``: the model's log-prob of each true next token (-> ``ppl``); ``kl``/``same``: per
    position KL and top-1 agreement (-> ``kld``, ``kld_se``, ``kld_p99``, ``kld_max``, ``top1``,
    ``top1_se``); ``tgt_lp``: the reference's log-prob of each true next token (-> ``ppl_ref`` and,
    with ``lq_t``, ``delta_p``: the mean change of the true token's probability).

    ``lengths``: scored positions of each sample, in order (they sum to the number of positions);
    with it every figure gets ``<figure>_ci`` (:class:`tasa_edge.stats.Interval` as a dict: the
    percentile-bootstrap interval over samples) and ``n_samples``."""
    out: dict = {}
    if lq_t is not None:
        lq = np.asarray(lq_t).astype(np.float64)
        out.update(n=int(lq.size), ppl=perplexity(lq))
    if kl is not None:
        kl = np.asarray(kl, dtype=np.float64)
        s = np.asarray(same).astype(np.float64)
        out.setdefault("n", int(kl.size))
        out.update(kld=float(kl.mean()), kld_se=std_error(kl), kld_p99=float(np.quantile(kl, 0.99)) if kl.size else 0.0,
                   kld_max=float(kl.max()) if kl.size else 0.0, top1=float(s.mean()), top1_se=std_error(s))
        if tgt_lp is not None:
            lp = np.asarray(tgt_lp).astype(np.float64)
            out["ppl_ref"] = perplexity(lp)
            if lq_t is not None:
                out["delta_p"] = float((np.exp(lq) - np.exp(lp)).mean())
    if lengths is not None and (lq_t is not None or kl is not None):
        sums = SampleSums.from_positions(lengths, lq_t=lq_t, kl=kl, same=same, tgt_lp=tgt_lp)
        out["n_samples"] = sums.n_samples
        out.update({f"{k}_ci": v.to_dict() for k, v in sums.intervals().items()})
    return out


def _ppl(mean_lp):
    return np.exp(-mean_lp)


@dataclass
class SampleSums:
    """Per-sample sums of a file's per-position figures (one entry per evaluation text): the unit
    the intervals resample and the pairing key of comparisons. ``positions[i]``: scored positions
    of sample i; ``kl``/``same``/``lq``/``ref_lp``/``dp``: sums over them of KL, top-1 agreement, the
    model's and the reference's log-prob of the true next token, and the change of its probability
    (None where not measured). The 99th percentile and maximum of KL are not ratios of per-sample
    sums and get no interval."""

    positions: np.ndarray
    lq: np.ndarray | None = None
    kl: np.ndarray | None = None
    same: np.ndarray | None = None
    ref_lp: np.ndarray | None = None
    dp: np.ndarray | None = None

    #: figure -> (field, transform of the ratio sum/positions)
    FIGURES = {"kld": ("kl", None), "top1": ("same", None), "ppl": ("lq", _ppl), "ppl_ref": ("ref_lp", _ppl),
               "delta_p": ("dp", None)}
    FIELDS = ("positions", "lq", "kl", "same", "ref_lp", "dp")

    @classmethod
    def from_positions(cls, lengths, *, lq_t=None, kl=None, same=None, tgt_lp=None) -> "SampleSums":
        ln = np.asarray(lengths, dtype=np.int64).ravel()
        keep = ln > 0      # a sample with no scored position carries no weight in any figure

        def agg(v):
            return None if v is None else stats.per_sample_sums(np.asarray(v).astype(np.float64), ln)[keep]

        dp = None
        if lq_t is not None and tgt_lp is not None and kl is not None:
            dp = np.exp(np.asarray(lq_t, np.float64)) - np.exp(np.asarray(tgt_lp, np.float64))
        return cls(ln[keep], agg(lq_t), agg(kl), agg(same), agg(tgt_lp), agg(dp))

    @property
    def n_samples(self) -> int:
        return int(self.positions.size)

    def intervals(self, **kw) -> dict[str, "stats.Interval"]:
        """figure -> its bootstrap interval over samples, for every figure measured."""
        out = {}
        for fig, (fld, tr) in self.FIGURES.items():
            v = getattr(self, fld)
            if v is not None:
                out[fig] = stats.ratio_interval(v, self.positions, transform=tr, **kw)
        return out

    def paired(self, other: "SampleSums", **kw) -> dict[str, "stats.PairedDifference"]:
        """figure -> ``self - other`` with its paired bootstrap interval; both must be scored on
        the same samples (same positions per sample), else a one-line TasaError."""
        if not np.array_equal(self.positions, other.positions):
            raise TasaError(f"paired comparison needs the same samples: {self.n_samples} samples / "
                                  f"{int(self.positions.sum())} positions vs {other.n_samples} / {int(other.positions.sum())}")
        out = {}
        for fig, (fld, tr) in self.FIGURES.items():
            a, b = getattr(self, fld), getattr(other, fld)
            if a is not None and b is not None and fig != "ppl_ref":
                out[fig] = stats.paired_difference(a, b, self.positions, transform=tr, **kw)
        return out

    def to_arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        return {prefix + k: v for k in self.FIELDS if (v := getattr(self, k)) is not None}

    @classmethod
    def from_arrays(cls, arrays, prefix: str = "") -> "SampleSums":
        return cls(*(arrays.get(prefix + k) for k in cls.FIELDS))


def compare_logits(ref: np.ndarray, q: np.ndarray, targets: np.ndarray | None = None) -> dict:
    """:func:`summarize` of logits ``q`` against reference logits ``ref`` (both ``[positions, vocab]``,
    already aligned with ``targets``), through the same float16 reference store as everything else."""
    lp, tgt_lp, top1 = reference_rows(ref, targets)
    kl, same, lq_t = score_rows(lp, top1, q, targets)
    return summarize(lq_t, kl, same, tgt_lp)
