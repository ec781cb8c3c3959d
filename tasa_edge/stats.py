"""Intervals and paired comparisons for every quality figure (KLD, top-1, PPL, accuracy).

The unit of resampling is the **sample** (one evaluation text, one GSM8K question), never the
scored position: positions of one text are correlated, so a position-level standard error is too
narrow.  A figure over positions (mean KLD, top-1 agreement, perplexity) is a *ratio* of per-sample
sums, ``sum_i num_i / sum_i den_i`` (``den_i``: the sample's scored positions), and it is
bootstrapped by resampling samples with replacement:

* :func:`ratio_interval`: percentile bootstrap, ``B`` = :data:`B` replicates drawn with
  ``numpy.random.default_rng(SEED)``, 95% by default (the 2.5% and 97.5% percentiles of the
  replicates, numpy's linear interpolation);
* :func:`paired_difference`: two files scored on the **same** samples: each replicate resamples the
  sample indices once and takes the difference of the two figures on that resample, so the
  between-sample variation both files share cancels;
* :func:`wilson`: Wilson score interval of an accuracy ``k / n`` (closed form);
* :func:`mcnemar_exact`: exact McNemar test of two accuracies on the same questions (a two-sided
  binomial test of the discordant pairs, ``scipy.stats.binomtest``);
* :func:`verdict`: a three-valued reading of a difference at the interval's level;
* :func:`pass_ratio_interval`: the speed of one file over another from passes that timed both in
  the same minutes (a Student-t interval on the per-pass log ratios: a handful of passes is too few
  for a bootstrap), and :func:`at_least_verdict`: whether it is at least a goal ratio.

The percentile bootstrap under-covers on few samples (its intervals are too narrow below ~20):
reports say so where they have fewer.  Results are dataclasses with ``to_dict`` for JSON
reports.  Pure numpy + scipy.stats.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
from scipy.stats import binomtest, norm, t as student_t

from .errors import TasaError

#: bootstrap replicates
B = 2000
#: seed of the resampling generator (the same seed for every figure: reports are reproducible)
SEED = 0
#: the confidence level of every interval
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided interval at ``level``."""

    estimate: float
    lo: float
    hi: float
    level: float
    method: str          # "percentile bootstrap over N samples, B=2000, seed 0" / "wilson"
    n: int               # samples the interval is over

    def to_dict(self) -> dict:
        return asdict(self)

    def fmt(self, spec: str = "{:.4f}") -> str:
        """``0.0985 [0.0810, 0.1170]``."""
        return f"{spec.format(self.estimate)} [{spec.format(self.lo)}, {spec.format(self.hi)}]"


@dataclass(frozen=True)
class PairedDifference:
    """``a - b`` of one figure for two files on the same samples, with its paired interval."""

    a: float
    b: float
    diff: float
    lo: float
    hi: float
    level: float
    method: str
    n: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class McNemar:
    """Exact McNemar test of two accuracies on the same questions."""

    n: int               # questions
    a_correct: int
    b_correct: int
    a_only: int          # a right, b wrong
    b_only: int          # b right, a wrong
    pvalue: float        # two-sided

    def to_dict(self) -> dict:
        return asdict(self)


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise TasaError(f"confidence level must be within (0, 1), got {level}")


def resample_indices(n: int, b: int = B, seed: int = SEED) -> np.ndarray:
    """``[b, n]`` sample indices drawn with replacement (the same for every call with equal
    arguments: paired figures are resampled identically)."""
    if n < 1:
        raise TasaError("a bootstrap needs at least one sample")
    return np.random.default_rng(seed).integers(0, n, size=(b, n))


def _percentiles(reps: np.ndarray, level: float) -> tuple[float, float]:
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(reps, [a, 1.0 - a])
    return float(lo), float(hi)


def _ratio(num: np.ndarray, den: np.ndarray, idx: np.ndarray | None = None) -> np.ndarray | float:
    if idx is None:
        return float(num.sum() / den.sum())
    return num[idx].sum(axis=-1) / den[idx].sum(axis=-1)


def _as_pair(num, den) -> tuple[np.ndarray, np.ndarray]:
    num = np.asarray(num, dtype=np.float64).ravel()
    den = np.ones_like(num) if den is None else np.asarray(den, dtype=np.float64).ravel()
    if num.shape != den.shape:
        raise TasaError(f"per-sample sums ({num.size}) and counts ({den.size}) differ in length")
    if num.size == 0 or not (den > 0).all():
        raise TasaError("every sample needs at least one scored position")
    return num, den


def ratio_interval(num, den=None, *, transform: Callable[[np.ndarray], np.ndarray] | None = None,
                   b: int = B, seed: int = SEED, level: float = LEVEL) -> Interval:
    """Percentile-bootstrap interval of ``transform(sum(num) / sum(den))`` over samples.

    ``num[i]``: the sample's summed figure (e.g. the KL of its positions), ``den[i]``: its scored
    positions (default 1: a plain mean over samples). ``transform`` maps the ratio (e.g.
    perplexity = ``exp(-mean log-prob)``)."""
    _check_level(level)
    num, den = _as_pair(num, den)
    f = transform or (lambda x: x)
    reps = f(_ratio(num, den, resample_indices(num.size, b, seed)))
    lo, hi = _percentiles(np.asarray(reps, dtype=np.float64), level)
    est = float(f(np.float64(_ratio(num, den))))
    return Interval(est, lo, hi, level, f"percentile bootstrap over {num.size} samples, B={b}, seed {seed}", int(num.size))


def paired_difference(num_a, num_b, den=None, *, transform: Callable[[np.ndarray], np.ndarray] | None = None,
                      b: int = B, seed: int = SEED, level: float = LEVEL) -> PairedDifference:
    """Paired percentile-bootstrap interval of ``F(a) - F(b)``, ``F = transform(sum(num) / sum(den))``,
    for two files scored on the same samples (same ``den``): one resample of sample indices per
    replicate, used for both files."""
    _check_level(level)
    num_a, den = _as_pair(num_a, den)
    num_b, _ = _as_pair(num_b, den)
    if num_a.shape != num_b.shape:
        raise TasaError(f"paired figures need the same samples ({num_a.size} vs {num_b.size})")
    f = transform or (lambda x: x)
    idx = resample_indices(num_a.size, b, seed)
    reps = np.asarray(f(_ratio(num_a, den, idx)) - f(_ratio(num_b, den, idx)), dtype=np.float64)
    lo, hi = _percentiles(reps, level)
    fa, fb = float(f(np.float64(_ratio(num_a, den)))), float(f(np.float64(_ratio(num_b, den))))
    return PairedDifference(fa, fb, fa - fb, lo, hi, level,
                            f"paired percentile bootstrap over {num_a.size} samples, B={b}, seed {seed}", int(num_a.size))


def wilson(k: int, n: int, level: float = LEVEL) -> Interval:
    """Wilson score interval of the proportion ``k / n``."""
    _check_level(level)
    if n < 1 or not 0 <= k <= n:
        raise TasaError(f"an accuracy needs 0 <= correct <= n and n >= 1, got {k}/{n}")
    z = float(norm.ppf(0.5 + level / 2.0))
    p = k / n
    den = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    lo = 0.0 if k == 0 else max(0.0, centre - half)      # exact ends where the closed form rounds
    hi = 1.0 if k == n else min(1.0, centre + half)
    return Interval(p, lo, hi, level, "wilson", int(n))


def mcnemar_exact(a_ok, b_ok) -> McNemar:
    """Exact (binomial) McNemar test of two files' right/wrong answers on the same questions."""
    a = np.asarray(a_ok, dtype=bool).ravel()
    bb = np.asarray(b_ok, dtype=bool).ravel()
    if a.shape != bb.shape:
        raise TasaError(f"McNemar needs the same questions ({a.size} vs {bb.size})")
    a_only = int((a & ~bb).sum())
    b_only = int((~a & bb).sum())
    m = a_only + b_only
    p = 1.0 if m == 0 else float(binomtest(a_only, m, 0.5, alternative="two-sided").pvalue)
    return McNemar(int(a.size), int(a.sum()), int(bb.sum()), a_only, b_only, min(1.0, p))


VERDICTS = ("inverted", "not inverted", "inconclusive")


def verdict(lo: float, hi: float, *, lower_is_better: bool) -> str:
    """Three-valued reading of an interval of ``a - b`` (a: the smaller file): ``inverted`` when
    ``a`` is better than ``b`` at the interval's level (the interval excludes 0 on a's side),
    ``not inverted`` when it is worse, ``inconclusive`` when the interval contains 0."""
    better = hi < 0 if lower_is_better else lo > 0
    worse = lo > 0 if lower_is_better else hi < 0
    return "inverted" if better else "not inverted" if worse else "inconclusive"


def mcnemar_verdict(t: McNemar, alpha: float = 1.0 - LEVEL) -> str:
    """:func:`verdict` for accuracies (a: the smaller file): significant at ``alpha`` and a right
    more often -> ``inverted``; significant and b right more often -> ``not inverted``."""
    if t.pvalue >= alpha or t.a_only == t.b_only:
        return "inconclusive"
    return "inverted" if t.a_only > t.b_only else "not inverted"


def pass_ratio_interval(a, b, level: float = LEVEL) -> Interval:
    """Speed of file ``a`` over file ``b`` from ``n >= 2`` passes that measured both in the same
    minutes (``a[i]``, ``b[i]``: their speeds in pass ``i``): the geometric mean of the per-pass
    ratios with a Student-t interval (``n - 1`` degrees of freedom) on their logs. The machine's
    drift between passes cancels in each ratio; what is left is the pass-to-pass scatter."""
    _check_level(level)
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape or a.size < 2:
        raise TasaError(f"a paired speed ratio needs at least 2 passes of both files, got {a.size} and {b.size}")
    if not ((a > 0).all() and (b > 0).all()):
        raise TasaError("speeds must be positive")
    lr = np.log(a / b)
    m, se = float(lr.mean()), float(lr.std(ddof=1) / math.sqrt(lr.size))
    half = float(student_t.ppf(0.5 + level / 2.0, lr.size - 1)) * se
    return Interval(math.exp(m), math.exp(m - half), math.exp(m + half), level,
                    f"t on the log ratios of {lr.size} paired passes", int(lr.size))


AT_LEAST = ("at least", "below", "inconclusive")


def at_least_verdict(iv: Interval, goal: float) -> str:
    """``at least`` when the whole interval is >= ``goal``, ``below`` when it is all < ``goal``,
    ``inconclusive`` when it contains ``goal``."""
    return "at least" if iv.lo >= goal else "below" if iv.hi < goal else "inconclusive"


def per_sample_sums(values, lengths) -> np.ndarray:
    """Sum per-position ``values`` into per-sample sums (``lengths``: positions per sample, in
    order; a sample with no position sums to 0)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    ln = np.asarray(lengths, dtype=np.int64).ravel()
    if ln.size == 0 or (ln < 0).any() or int(ln.sum()) != v.size:
        raise TasaError(f"sample lengths (total {int(ln.sum()) if ln.size else 0}) do not cover {v.size} positions")
    return np.bincount(np.repeat(np.arange(ln.size), ln), weights=v, minlength=ln.size)
