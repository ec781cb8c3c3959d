"""tasa_edge.stats: intervals and paired tests against known values (scipy, hand-computed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from tasa_edge import quality, stats
from tasa_edge.errors import TasaError


# ---------------------------------------------------------------------------- Wilson
def test_wilson_hand_computed():
    # 7 / 20, z = 1.959964: centre (0.35 + z^2/40) / (1 + z^2/20), half z sqrt(p q / 20 + z^2/1600) / (1 + z^2/20)
    z = 1.959963984540054
    den = 1 + z * z / 20
    centre = (0.35 + z * z / 40) / den
    half = z * math.sqrt(0.35 * 0.65 / 20 + z * z / 1600) / den
    iv = stats.wilson(7, 20)
    assert iv.estimate == 0.35
    assert iv.lo == pytest.approx(centre - half, abs=1e-12) and iv.hi == pytest.approx(centre + half, abs=1e-12)
    assert (round(iv.lo, 4), round(iv.hi, 4)) == (0.1812, 0.5671)


@pytest.mark.parametrize("k,n", [(0, 10), (10, 10), (3, 17), (160, 323), (1, 1)])
def test_wilson_matches_scipy(k, n):
    ref = sps.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    iv = stats.wilson(k, n)
    assert iv.lo == pytest.approx(ref.low, abs=1e-12) and iv.hi == pytest.approx(ref.high, abs=1e-12)


def test_wilson_ends_are_exact():
    assert stats.wilson(0, 3).lo == 0.0 and stats.wilson(3, 3).hi == 1.0


def test_wilson_bad_input():
    for k, n in [(3, 0), (-1, 5), (6, 5)]:
        with pytest.raises(TasaError):
            stats.wilson(k, n)


# ---------------------------------------------------------------------------- McNemar
def test_mcnemar_exact_hand_computed():
    # discordant pairs: a right / b wrong 1, b right / a wrong 7: p = 2 * P(X <= 1 | 8, 1/2) = 2 * 9 / 256
    a = [True] * 5 + [True] + [False] * 7 + [False] * 3
    b = [True] * 5 + [False] + [True] * 7 + [False] * 3
    t = stats.mcnemar_exact(a, b)
    assert (t.n, t.a_correct, t.b_correct, t.a_only, t.b_only) == (16, 6, 12, 1, 7)
    assert t.pvalue == pytest.approx(18 / 256, abs=1e-12)
    assert stats.mcnemar_verdict(t) == "inconclusive"       # p = 0.0703 >= 0.05


def test_mcnemar_verdicts():
    a = [True] * 10 + [False] * 10
    b = [False] * 10 + [False] * 10
    t = stats.mcnemar_exact(a, b)        # 10 vs 0 discordant: p = 2 / 1024
    assert t.pvalue == pytest.approx(2 / 1024)
    assert stats.mcnemar_verdict(t) == "inverted"
    assert stats.mcnemar_verdict(stats.mcnemar_exact(b, a)) == "not inverted"
    same = stats.mcnemar_exact(a, a)
    assert same.pvalue == 1.0 and stats.mcnemar_verdict(same) == "inconclusive"
    with pytest.raises(TasaError):
        stats.mcnemar_exact([True], [True, False])


# ---------------------------------------------------------------------------- bootstrap
def test_bootstrap_mean_agrees_with_scipy_and_normal_theory():
    x = np.random.default_rng(7).normal(1.0, 2.0, 400)
    iv = stats.ratio_interval(x)
    ref = sps.bootstrap((x,), np.mean, confidence_level=0.95, n_resamples=stats.B, method="percentile",
                        random_state=np.random.default_rng(1)).confidence_interval
    se = x.std(ddof=1) / math.sqrt(x.size)
    assert iv.estimate == pytest.approx(x.mean())
    width = iv.hi - iv.lo
    assert width == pytest.approx(2 * 1.96 * se, rel=0.08)
    assert iv.lo == pytest.approx(ref.low, abs=0.1 * width) and iv.hi == pytest.approx(ref.high, abs=0.1 * width)
    assert iv.n == 400 and "B=2000" in iv.method


def test_bootstrap_is_reproducible_and_degenerate_on_constants():
    x = np.random.default_rng(3).exponential(size=50)
    assert stats.ratio_interval(x) == stats.ratio_interval(x)            # fixed seed
    c = stats.ratio_interval(np.full(9, 0.25))
    assert (c.estimate, c.lo, c.hi) == (0.25, 0.25, 0.25)


def test_ratio_interval_weights_samples_by_positions():
    num, den = np.array([1.0, 9.0]), np.array([1, 9])        # both samples: ratio 1
    iv = stats.ratio_interval(num, den)
    assert (iv.estimate, iv.lo, iv.hi) == (1.0, 1.0, 1.0)
    num = np.array([0.0, 9.0])                                # pooled 9/10, not the mean of ratios (0.5)
    assert stats.ratio_interval(num, den).estimate == pytest.approx(0.9)
    with pytest.raises(TasaError):
        stats.ratio_interval([1.0, 2.0], [1, 0])
    with pytest.raises(TasaError):
        stats.ratio_interval([1.0], level=1.5)


def test_paired_difference_cancels_shared_variation():
    rng = np.random.default_rng(11)
    base = rng.exponential(1.0, 60)            # large between-sample variation
    a, b = base + 0.05, base
    d = stats.paired_difference(a, b)
    assert d.diff == pytest.approx(0.05) and d.lo == pytest.approx(0.05) and d.hi == pytest.approx(0.05)
    ia, ib = stats.ratio_interval(a), stats.ratio_interval(b)
    assert ia.lo < ib.hi                       # unpaired intervals overlap: they could not tell
    assert stats.verdict(d.lo, d.hi, lower_is_better=True) == "not inverted"
    assert stats.verdict(-d.hi, -d.lo, lower_is_better=True) == "inverted"
    noisy = stats.paired_difference(base + rng.normal(0, 0.5, 60), base)
    assert noisy.lo < 0 < noisy.hi and stats.verdict(noisy.lo, noisy.hi, lower_is_better=True) == "inconclusive"
    with pytest.raises(TasaError):
        stats.paired_difference(a, b[:-1])


def test_paired_perplexity_transform():
    rng = np.random.default_rng(5)
    n = rng.integers(5, 40, 30)
    lp = -rng.uniform(1, 3, 30) * n
    d = stats.paired_difference(lp - 0.1 * n, lp, n, transform=lambda m: np.exp(-m))
    assert d.a == pytest.approx(math.exp(-(lp.sum() - 0.1 * n.sum()) / n.sum()))
    assert d.diff > 0 and d.lo > 0                 # each sample is worse by 0.1 nats per position


def test_per_sample_sums():
    assert stats.per_sample_sums([1, 2, 3, 4, 5], [2, 0, 3]).tolist() == [3.0, 0.0, 12.0]
    with pytest.raises(TasaError):
        stats.per_sample_sums([1, 2, 3], [2, 2])


# ---------------------------------------------------------------------------- quality wiring
def test_summarize_intervals_and_sample_sums_pairing():
    rng = np.random.default_rng(2)
    lengths = rng.integers(3, 30, 25)
    n = int(lengths.sum())
    kl = rng.exponential(0.1, n)
    same = rng.random(n) < 0.8
    lq = -rng.exponential(2.0, n)
    ref = lq + 0.05
    s = quality.summarize(lq, kl, same, ref, lengths=lengths)
    assert s["n_samples"] == 25
    assert s["delta_p_ci"]["estimate"] == pytest.approx(s["delta_p"])
    for k in ("kld", "top1", "ppl", "ppl_ref", "delta_p"):
        ci = s[f"{k}_ci"]
        assert ci["estimate"] == pytest.approx(s[k]) and ci["lo"] < s[k] < ci["hi"], k
    a = quality.SampleSums.from_positions(lengths, lq_t=lq, kl=kl, same=same, tgt_lp=ref)
    b = quality.SampleSums.from_positions(lengths, lq_t=lq - 0.2, kl=kl * 2, same=same, tgt_lp=ref)
    p = a.paired(b)
    assert set(p) == {"kld", "top1", "ppl", "delta_p"}
    assert p["kld"].hi < 0 and p["ppl"].hi < 0 and p["top1"].diff == 0.0
    back = quality.SampleSums.from_arrays(a.to_arrays("x_"), "x_")
    assert np.array_equal(back.kl, a.kl) and np.array_equal(back.positions, a.positions)
    other = quality.SampleSums.from_positions(lengths[:-1], kl=kl[: int(lengths[:-1].sum())],
                                              same=same[: int(lengths[:-1].sum())])
    with pytest.raises(TasaError, match="same samples"):
        a.paired(other)


def test_pass_ratio_interval_hand_computed_and_drift_cancels():
    # a runs at 1.0x, 0.9x, 1.1x, 1.0x of b in four passes while the machine's speed moves by 2x
    b = np.array([100.0, 200.0, 150.0, 50.0])
    r = np.array([1.0, 0.9, 1.1, 1.0])
    iv = stats.pass_ratio_interval(r * b, b)
    lr = np.log(r)
    half = 3.182446305284263 * lr.std(ddof=1) / 2.0          # t(0.975, 3) x se over 4 passes
    assert iv.estimate == pytest.approx(np.exp(lr.mean()))
    assert (iv.lo, iv.hi) == pytest.approx((np.exp(lr.mean() - half), np.exp(lr.mean() + half)))
    assert iv.n == 4 and iv.lo < iv.estimate < iv.hi
    # the same ratio in every pass: no scatter, whatever the machine did
    same = stats.pass_ratio_interval(0.97 * b, b)
    assert same.lo == pytest.approx(0.97) and same.hi == pytest.approx(0.97)


def test_at_least_verdict_is_three_valued():
    iv = lambda lo, hi: stats.Interval(1.0, lo, hi, 0.95, "t", 4)  # noqa: E731
    assert stats.at_least_verdict(iv(0.99, 1.05), 0.98) == "at least"
    assert stats.at_least_verdict(iv(0.90, 0.97), 0.98) == "below"
    assert stats.at_least_verdict(iv(0.95, 1.02), 0.98) == "inconclusive"


@pytest.mark.parametrize("a, b", [([1.0], [1.0]), ([1.0, 2.0], [1.0]), ([1.0, -1.0], [1.0, 1.0])])
def test_pass_ratio_interval_bad_input(a, b):
    with pytest.raises(TasaError):
        stats.pass_ratio_interval(a, b)
