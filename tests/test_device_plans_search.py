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


# ---------------------------------------------------------------------------- the machine's drift
@pytest.fixture(scope="module")
def smollm():
    from tasa_edge.model import ModelSource
    from tasa_edge.zoo import resolve_model

    return ModelSource.open(resolve_model("smollm2-135m"))


def _kp(profiled: list[str]):
    from tasa_edge.costmodel import FormatCost, KernelProfile

    speeds = {label: 100.0 + i for i, label in enumerate(profiled)}
    return KernelProfile("t", "gguf", {}, {"pp": PP, "tg": 16, "threads": 1, "design_tg_ts": speeds,
                                           "design_pp_ts": {k: 10 * v for k, v in speeds.items()}},
                         {f: FormatCost(0.01, 0.001) for f in ("Q8_0", "Q4_0", "Q4_K")})


def test_reference_design_is_the_profiles_own_file_of_the_plans_dominant_layer_format(smollm):
    from devices.kernel_profile import design_plans
    from tasa_edge.costmodel import role
    from tasa_edge.formats.base import SOURCE

    layers = [t for t in smollm.quantizable if role(smollm, t.name) == "layer"]
    wide = {t.name for t in layers if t.shape[-1] == 1536}          # ffn_down: a minority of the weights
    assert 0 < sum(t.n_elements for t in layers if t.name in wide) < sum(t.n_elements for t in layers) / 2
    # the tied LM head (28M weights in Q8_0) does not count: only layer matrices do
    plan = {t.name: ("Q4_K" if t.name in wide else "Q4_0") if role(smollm, t.name) == "layer" else "Q8_0"
            for t in smollm.quantizable}
    assert dp.dominant_format(smollm, plan) == "Q4_0"
    assert dp.dominant_format(smollm, {n: "Q4_K" if n in wide else f for n, f in plan.items()} | {
        n: "Q8_0" for n in list(plan) if n.endswith("attn_q.weight")}) == "Q4_0"
    assert dp.dominant_format(smollm, dict.fromkeys(plan, SOURCE)) == layers[0].src_type   # the input's own type
    kp = _kp(["uniform Q8_0", "uniform Q4_0", "output Q4_0"])
    label, tensors = dp.reference_design(smollm, kp, "Q4_0")
    designs = dict(design_plans(smollm, ["Q8_0", "Q4_0", "Q4_K"], n_random=0))
    assert label == "uniform Q4_0" and tensors == designs["uniform Q4_0"]    # rebuilt exactly as profiled
    # a format whose uniform file the profile did not time: the first uniform file it did
    assert dp.reference_design(smollm, kp, "Q4_K")[0] == "uniform Q8_0"
    with pytest.raises(TasaError, match="no uniform design"):
        dp.reference_design(smollm, _kp(["output Q4_0"]), "Q4_0")


def test_the_drift_of_a_plan_is_the_geometric_mean_of_its_reference_before_and_after():
    before = {"label": "uniform Q4_K", "profile_tg_ts": 10.0, "profile_pp_ts": 100.0, "tg_drift": 0.9, "pp_drift": 1.0}
    after = {**before, "tg_drift": 1.0, "pp_drift": 1.21}
    d = dp.bracket(before, after)
    assert d["tg_drift"] == pytest.approx(0.9 ** 0.5) and d["pp_drift"] == pytest.approx(1.1)
    assert d["before"] is before and d["after"] is after and d["label"] == "uniform Q4_K"
