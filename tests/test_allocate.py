"""Tests for the exact bit-allocation solver (real HiGHS / DP, checked against brute force)."""

from __future__ import annotations

import itertools
import math
import random
import time

import pytest

from tasa_edge.allocate import (
    Allocation,
    Option,
    bytes_range,
    budget_from_bpw,
    pareto,
    solve,
)
from tasa_edge.errors import TasaError

# Bytes per weight of some GGUF-like formats, as (numerator, denominator) over 256 weights.
FORMATS = [("F16", 512), ("Q8_0", 272), ("Q6_K", 210), ("Q5_K", 176), ("Q4_K", 144), ("Q3_K", 110), ("Q2_K", 84)]


def random_instance(seed: int, n_tensors: int, k_range=(2, 4), *, granule: int = 1, blocks=(4, 64)):
    """Tensors made of 256-weight blocks; format sizes are blocks * bytes-per-block.

    Losses grow as the format shrinks (roughly), spanning several orders of magnitude.
    """
    rng = random.Random(seed)
    options = {}
    for t in range(n_tensors):
        n_blocks = rng.randint(*blocks) * granule
        k = rng.randint(*k_range)
        fmts = sorted(rng.sample(FORMATS, k), key=lambda f: -f[1])
        sens = 10 ** rng.uniform(-6, 1)
        opts = []
        for fmt, per_block in fmts:
            err = (512 / per_block - 1) ** 2 * rng.uniform(0.5, 1.5)
            opts.append(Option(fmt, n_blocks * per_block, sens * err))
        rng.shuffle(opts)
        options[f"blk.{t}.w"] = opts
    return options


class BruteForce:
    """Every combination (itertools.product) enumerated once; best loss per budget on demand."""

    def __init__(self, options, groups=()):
        names = list(options)
        self.combos = []
        for combo in itertools.product(*(options[n] for n in names)):
            choice = {n: o.fmt for n, o in zip(names, combo)}
            if any(len({choice[t] for t in g}) != 1 for g in groups):
                continue
            self.combos.append((sum(o.nbytes for o in combo), math.fsum(o.loss for o in combo)))

    def best(self, budget):
        """Least total loss within ``budget`` bytes, or None when nothing fits."""
        return min((loss for nb, loss in self.combos if nb <= budget), default=None)


def check(alloc: Allocation, options, budget, groups=()):
    assert set(alloc.choice) == set(options)
    by = {t: {o.fmt: o for o in opts} for t, opts in options.items()}
    chosen = [by[t][f] for t, f in alloc.choice.items()]
    assert alloc.nbytes == sum(o.nbytes for o in chosen) <= budget
    assert alloc.loss == pytest.approx(math.fsum(o.loss for o in chosen), rel=1e-12, abs=0)
    assert alloc.budget_bytes == budget
    assert alloc.optimal
    for g in groups:
        assert len({alloc.choice[t] for t in g}) == 1


def budgets_for(options, rng, n=3):
    lo, hi = bytes_range(options)
    return [lo, hi - 1, hi] + [rng.randint(lo, hi) for _ in range(n)]


def assert_same(a: float, b: float):
    assert a == pytest.approx(b, rel=1e-9, abs=1e-300)


@pytest.mark.parametrize("seed", range(40))
def test_matches_brute_force(seed):
    rng = random.Random(1000 + seed)
    options = random_instance(seed, rng.randint(5, 7))
    brute = BruteForce(options)
    for budget in budgets_for(options, rng):
        expected = brute.best(budget)
        for method in ("highs-milp", "dp"):
            alloc = solve(options, budget, method=method)
            check(alloc, options, budget)
            assert alloc.solver == method
            assert_same(alloc.loss, expected)


def test_auto_is_milp_and_losses_spanning_many_orders():
    options = {
        "tiny": [Option("a", 100, 1e-12), Option("b", 50, 3e-12), Option("c", 10, 9e-12)],
        "small": [Option("a", 120, 2e-9), Option("b", 60, 5e-9)],
        "huge": [Option("a", 300, 0.0), Option("b", 200, 40.0), Option("c", 100, 1000.0)],
        "mid": [Option("a", 80, 1e-4), Option("b", 70, 1.5e-4), Option("c", 30, 7e-4)],
    }
    lo, hi = bytes_range(options)
    brute = BruteForce(options)
    for budget in range(lo, hi + 1, 7):
        expected = brute.best(budget)
        alloc = solve(options, budget)
        assert alloc.solver == "highs-milp"
        check(alloc, options, budget)
        assert_same(alloc.loss, expected)
        assert_same(solve(options, budget, method="dp").loss, expected)


@pytest.mark.parametrize("seed", [193, 248, 265, 332, 341] + list(range(10)))
def test_extreme_loss_range_matches_brute_force(seed):
    """Losses from 1e-15 to 1e3 (and exact zeros), arbitrary byte sizes (gcd 1).

    Seeds 193/248/265 once broke the DP (float cancellation), 332/341 a single-pass MILP
    (HiGHS' absolute tolerances on the scaled objective).
    """
    rng = random.Random(seed)
    options = {}
    for t in range(rng.randint(3, 6)):
        options[f"t{t}"] = [
            Option(f"f{j}", rng.randint(1, 5000), 10 ** rng.uniform(-15, 3) if rng.random() > 0.1 else 0.0)
            for j in range(rng.randint(1, 5))
        ]
    brute = BruteForce(options)
    lo, hi = bytes_range(options)
    for budget in [rng.randint(lo, hi) for _ in range(4)]:
        expected = brute.best(budget)
        for method in ("highs-milp", "dp"):
            alloc = solve(options, budget, method=method)
            check(alloc, options, budget)
            assert_same(alloc.loss, expected)


@pytest.mark.parametrize("seed", range(12))
def test_groups_match_brute_force(seed):
    rng = random.Random(seed)
    options = random_instance(500 + seed, 6, k_range=(5, 6))  # members always share a format
    names = list(options)
    a, b, c, d = rng.sample(names, 4)
    groups = [[a, b], [b, c]] if seed % 2 else [[a, b], [c, d]]
    lo = sum(min(o.nbytes for o in opts) for opts in options.values())
    hi = sum(max(o.nbytes for o in opts) for opts in options.values())
    brute = BruteForce(options, groups)
    hits = 0
    for budget in [rng.randint(lo, hi) for _ in range(6)] + [hi]:
        expected = brute.best(budget)
        if expected is None:
            with pytest.raises(TasaError):
                solve(options, budget, groups=groups)
            continue
        hits += 1
        for method in ("highs-milp", "dp"):
            alloc = solve(options, budget, groups=groups, method=method)
            check(alloc, options, budget, groups)
            assert_same(alloc.loss, expected)
    assert hits


def test_group_changes_the_answer():
    options = {
        "tok_embd": [Option("F16", 1000, 0.0), Option("Q4_K", 300, 5.0)],
        "output": [Option("F16", 1000, 0.0), Option("Q4_K", 300, 0.1)],
    }
    free = solve(options, 1300)
    assert free.choice == {"tok_embd": "F16", "output": "Q4_K"}
    tied = solve(options, 1300, groups=[["tok_embd", "output"]])
    assert tied.choice == {"tok_embd": "Q4_K", "output": "Q4_K"}
    assert tied.loss == pytest.approx(5.1)
    with pytest.raises(TasaError, match="600"):
        solve(options, 599, groups=[["tok_embd", "output"]], method="dp")


def test_group_errors():
    options = {"x": [Option("A", 1, 0.0)], "y": [Option("B", 1, 0.0)]}
    with pytest.raises(TasaError, match="in common"):
        solve(options, 10, groups=[["x", "y"]])
    with pytest.raises(TasaError, match="'z'"):
        solve(options, 10, groups=[["x", "z"]])


@pytest.mark.parametrize("method", ["highs-milp", "dp"])
def test_pareto_monotone(method):
    options = random_instance(7, 7, k_range=(3, 4))
    lo, hi = bytes_range(options)
    budgets = sorted({lo + (hi - lo) * i // 24 for i in range(25)})
    sweep = pareto(options, budgets, method=method)
    assert [a.budget_bytes for a in sweep] == budgets
    for a in sweep:
        check(a, options, a.budget_bytes)
    losses = [a.loss for a in sweep]
    assert all(x >= y for x, y in zip(losses, losses[1:]))
    assert losses[0] > losses[-1]
    assert_same(losses[-1], sum(min(o.loss for o in opts) for opts in options.values()))


def test_infeasible_budget_message():
    options = {"a": [Option("Q8_0", 500, 0.0), Option("Q4_K", 300, 1.0)], "b": [Option("Q4_K", 200, 0.5)]}
    for method in ("auto", "dp"):
        with pytest.raises(TasaError) as exc:
            solve(options, 499, method=method)
        msg = str(exc.value)
        assert "\n" not in msg
        assert "499" in msg and "smallest achievable size is 500 bytes" in msg
    assert solve(options, 500).choice == {"a": "Q4_K", "b": "Q4_K"}


@pytest.mark.parametrize(
    "options, match",
    [
        ({"a": []}, "no format options"),
        ({"a": [Option("F16", -1, 0.0)]}, "negative nbytes"),
        ({"a": [Option("F16", 10, float("nan"))]}, "finite"),
        ({"a": [Option("F16", 10, float("inf"))]}, "finite"),
        ({"a": [Option("F16", 10, -0.5)]}, "negative predicted loss"),
        ({"a": [Option("F16", 10.5, 0.0)]}, "integer"),
        ({"a": [Option("F16", 10, 0.0), Option("F16", 5, 1.0)]}, "more than once"),
    ],
)
def test_bad_input(options, match):
    with pytest.raises(TasaError, match=match):
        solve(options, 100)


def test_bad_method_and_budget():
    options = {"a": [Option("F16", 10, 0.0)]}
    with pytest.raises(TasaError, match="method"):
        solve(options, 100, method="greedy")
    with pytest.raises(TasaError, match="integer"):
        solve(options, 10.0)


def test_trivial_cases():
    assert solve({}, 0).choice == {}
    options = {"a": [Option("F16", 10, 0.0)], "b": [Option("Q4_K", 3, 0.2), Option("Q8_0", 6, 0.2)]}
    for method in ("auto", "dp"):
        alloc = solve(options, 13, method=method)
        assert alloc.choice == {"a": "F16", "b": "Q4_K"}  # dominated Q8_0 never chosen
        assert (alloc.nbytes, alloc.loss) == (13, pytest.approx(0.2))


def test_dp_refuses_huge_table():
    # Coprime large sizes: the gcd is 1 and the capacity is enormous.
    options = {f"t{i}": [Option("A", 10**9 + 7 * i, 0.0), Option("B", 3 + i, 1.0)] for i in range(50)}
    budget = 25 * 10**9
    with pytest.raises(TasaError, match="dp solver refused"):
        solve(options, budget, method="dp")
    assert solve(options, budget).optimal


def test_budget_from_bpw():
    assert budget_from_bpw(4.5, 1024) == 576
    assert budget_from_bpw(4.5, 1024, fixed_bytes=76) == 500
    assert budget_from_bpw(8, 3) == 3  # floor(24 / 8)
    assert budget_from_bpw(4.1, 10) == 5  # floor(41 / 8) = 5, read as exactly 4.1
    assert budget_from_bpw(4.1, 80) == 41  # not 40 from 4.0999999...
    assert budget_from_bpw(3.3, 270_000_000, 100_000_000) == 11_375_000
    with pytest.raises(TasaError, match="less than"):
        budget_from_bpw(4.0, 100, fixed_bytes=51)
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(TasaError):
            budget_from_bpw(bad, 100)
    with pytest.raises(TasaError):
        budget_from_bpw(4.0, 0)


def test_large_instance_fast_and_agrees_with_dp():
    options = random_instance(2024, 300, k_range=(6, 6), granule=16, blocks=(1, 8))
    lo, hi = bytes_range(options)
    budget = lo + (hi - lo) * 2 // 5
    t0 = time.perf_counter()
    milp = solve(options, budget)
    t_milp = time.perf_counter() - t0
    t0 = time.perf_counter()
    dp = solve(options, budget, method="dp")
    t_dp = time.perf_counter() - t0
    check(milp, options, budget)
    check(dp, options, budget)
    assert_same(milp.loss, dp.loss)
    assert t_milp < 10 and t_dp < 10, (t_milp, t_dp)
    print(f"300x6: milp {t_milp:.3f}s dp {t_dp:.3f}s")


def test_milp_writes_nothing_to_stdout(capfd):
    """HiGHS runs with its console log off and anything native code writes to descriptor 1
    meanwhile goes to descriptor 2: stdout is for the command's results (plan --sweep)."""
    rng = random.Random(3)
    opts = {f"t{i}": [Option(f, b, l) for f, b, l in
                      zip("abc", sorted(rng.randint(10, 100) for _ in range(3)),
                          sorted((rng.random() for _ in range(3)), reverse=True))]
            for i in range(8)}
    lo = sum(o[0].nbytes for o in opts.values())
    hi = sum(o[-1].nbytes for o in opts.values())
    alloc = solve(opts, (lo + hi) // 2, method="highs-milp")
    assert alloc.solver == "highs-milp"
    assert capfd.readouterr().out == ""
    print("after")                                  # descriptor 1 is restored
    assert capfd.readouterr().out == "after\n"
