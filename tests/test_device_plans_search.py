"""benchmarks/device_plans.py: the speed-aware plan of the win table, set and corrected by
measurement (``speed_search``), against a simulated device whose speed each plan's prediction
misses by its own factor."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

dp = pytest.importorskip("device_plans")

from tasa_edge.errors import TasaError  # noqa: E402

PP = 512


class Plan:
    def __init__(self, decode_ms: float, prefill_ms: float):
        self.predicted = {"decode_ms": decode_ms, "prefill_ms": prefill_ms, "bpw": 4.0,
                          "tg_ts": 1000 / decode_ms, "pp_ts": 1000 * PP / prefill_ms}

    def types_used(self):
        return {"Q4_0": 1}


def world(slowdown, least=(0.0, 0.0)):
    """plan_fn: the fastest plan meeting the limits is predicted exactly at them (a plan with more
    loss is never faster than needed); measure_fn: the device runs a plan ``slowdown(plan)`` times
    slower than predicted (prefill only, the profile's typical miss)."""
    made = []

    def plan_fn(lim):
        d, p = lim.get("decode_ms", 50.0), lim.get("prefill_ms", 5000.0)
        if d < least[0] or p < least[1]:
            raise TasaError(f"predicted prefill ms limit {p:.1f} is infeasible")
        made.append(Plan(d, p))
        return made[-1]

    def measure_fn(plan):
        d, p = plan.predicted["decode_ms"], plan.predicted["prefill_ms"] * slowdown(plan)
        return {"tg_ts": 1000 / d, "pp_ts": 1000 * PP / p}

    return plan_fn, measure_fn, made


def test_a_plan_that_misses_is_replanned_with_its_own_ratio_until_it_meets_the_target():
    target = {"decode_ms": 10.0, "prefill_ms": 1000.0}
    mix_bias = {"decode_ms": 1.0, "prefill_ms": 0.90}     # the mix ran 10% faster than predicted...
    plan_fn, measure_fn, made = world(lambda p: 1.08)      # ...the plans run 8% slower than predicted
    row, tries, err = dp.speed_search(plan_fn, measure_fn, target, mix_bias, 0.01, 3, PP, log=lambda m: None)
    assert err is None and len(tries) == 2 and len(made) == 2
    assert tries[0]["measured_ms"]["prefill_ms"] > target["prefill_ms"]          # the mix's ratio was wrong for it
    assert tries[1]["limits_ms"]["prefill_ms"] == pytest.approx(1000 / 1.08 * 0.99)  # its own ratio next
    assert tries[1]["measured_ms"]["prefill_ms"] <= target["prefill_ms"]
    assert row["pp_ts"] == tries[-1]["pp_ts"] and row["pp_ts"] >= 1000 * PP / target["prefill_ms"]


def test_the_search_stops_after_its_tries_and_keeps_the_last_plan():
    n = iter(range(100))
    plan_fn, measure_fn, made = world(lambda p: 1.2 + 0.2 * next(n))   # each plan worse than the last
    row, tries, err = dp.speed_search(plan_fn, measure_fn, {"decode_ms": 10.0, "prefill_ms": 1000.0},
                                      {"decode_ms": 1.0, "prefill_ms": 1.0}, 0.0, 3, PP, log=lambda m: None)
    assert err is None and len(tries) == 3 and row["pp_ts"] == tries[-1]["pp_ts"]
    assert all(t["measured_ms"]["prefill_ms"] > 1000.0 for t in tries)


def test_infeasible_limits_first_or_on_a_retry():
    target = {"decode_ms": 10.0, "prefill_ms": 1000.0}
    plan_fn, measure_fn, made = world(lambda p: 1.0, least=(0.0, 990.0))
    row, tries, err = dp.speed_search(plan_fn, measure_fn, target, {"decode_ms": 1.0, "prefill_ms": 1.05}, 0.0, 3, PP,
                                      log=lambda m: None)
    assert row is None and tries == [] and "infeasible" in err and not made
    plan_fn, measure_fn, made = world(lambda p: 1.05, least=(0.0, 960.0))
    row, tries, err = dp.speed_search(plan_fn, measure_fn, target, {"decode_ms": 1.0, "prefill_ms": 1.0}, 0.0, 3, PP,
                                      log=lambda m: None)
    assert err is None and len(made) == 1 and "infeasible" in tries[-1]          # 1000/1.05 < 960 possible
    assert row["pp_ts"] == tries[0]["pp_ts"]


def test_speed_blind_is_one_plan_without_limits():
    plan_fn, measure_fn, made = world(lambda p: 1.5)
    row, tries, err = dp.speed_search(plan_fn, measure_fn, {"decode_ms": 10.0, "prefill_ms": 1000.0},
                                      {"decode_ms": 1.0, "prefill_ms": 1.0}, 0.01, 3, PP, limited=False, log=lambda m: None)
    assert len(tries) == 1 and tries[0]["limits_ms"] == {} and row is not None and err is None
