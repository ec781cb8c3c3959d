"""Device-aware plans: measured kernel profiles (``tasa-edge profile``) and ``plan --profile`` with
time and memory limits as rows of the exact MILP."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from test_pins import synthetic_analysis

from devices.profiles import load_profile
from tasa_edge.allocate import Option, Resource, solve
from tasa_edge.costmodel import KernelProfile, kv_cache_bytes, load_kernel_profile, role
from tasa_edge.errors import TasaError
from tasa_edge.planner import DeviceLimits, make_plan, sweep
from tasa_edge.results import Analysis

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def src():
    from tasa_edge.model import ModelSource
    from tasa_edge.zoo import resolve_model

    return ModelSource.open(resolve_model("smollm2-135m"))


def _here_identity() -> dict:
    from devices.llama_tools import build_info, find_tool
    from devices.machine import local_machine

    m = local_machine(1)
    exe = find_tool("llama-bench")
    return {"cpu": m["cpu"], "features": m["features"], "llama_cpp_commit": build_info(exe).commit if exe else None}


def write_profile(path: Path, src, costs: dict, *, machine: dict | None = None, fingerprint: str | None = None,
                  usable_ram: int = 2 * 2**30) -> Path:
    """A measured-profile TOML with the given (decode, prefill) ns/weight per format, as
    ``tasa-edge profile`` writes it (device-profile part + [machine]/[measured]/[kernels])."""
    from tasa_edge.costmodel import FormatCost

    kp = KernelProfile("test", "gguf", machine or _here_identity(),
                       {"model": src.name, "fingerprint": fingerprint or src.fingerprint, "target": "local",
                        "threads": 2, "pp": 512, "tg": 128, "usable_ram_bytes": usable_ram},
                       {f: FormatCost(*c) for f, c in costs.items()})
    head = ('name = "test"\ntarget = "local"\n\n[formats]\ngguf = [' + ", ".join(f'"{f}"' for f in costs) + "]\n\n")
    path.write_text(head + kp.to_toml())
    return path


# Q4_0 runs fast (repacked), Q5_0 slow, Q8_0 in between: the speed order is not the size order
COSTS = {"Q4_0": (0.010, 0.0010), "Q5_0": (0.030, 0.0030), "Q8_0": (0.018, 0.0012),
         "Q4_K": (0.020, 0.0020), "Q6_K": (0.025, 0.0022)}


# ---------------------------------------------------------------------------- allocation
def _brute(opts, costs, budget, limits):
    names, best = list(opts), None
    for combo in itertools.product(*(opts[n] for n in names)):
        if sum(o.nbytes for o in combo) > budget:
            continue
        if any(sum(c[n][o.fmt] for n, o in zip(names, combo)) > lim for c, lim in zip(costs, limits)):
            continue
        loss = sum(o.loss for o in combo)
        best = loss if best is None or loss < best else best
    return best


@pytest.mark.parametrize("seed", range(8))
def test_resource_rows_keep_the_allocation_exact(seed):
    rng = np.random.default_rng(seed)
    fmts = ["a", "b", "c", "d"]
    opts, dec, pre = {}, {}, {}
    for i in range(6):
        k = int(rng.integers(1, 5))
        opts[f"t{i}"] = [Option(f, int(rng.integers(5, 60)), float(rng.random())) for f in fmts[:k]]
        dec[f"t{i}"] = {f: float(rng.random()) for f in fmts[:k]}
        pre[f"t{i}"] = {f: float(rng.random()) for f in fmts[:k]}
    lo = sum(min(o.nbytes for o in v) for v in opts.values())
    hi = sum(max(o.nbytes for o in v) for v in opts.values())
    solved = 0
    for budget, ld, lp in itertools.product(np.linspace(lo, hi, 3).astype(int), (1.5, 3.0), (2.0, 6.0)):
        ref = _brute(opts, (dec, pre), int(budget), (ld, lp))
        res = [Resource("decode", dec, ld), Resource("prefill", pre, lp)]
        if ref is None:
            with pytest.raises(TasaError):
                solve(opts, int(budget), resources=res)
            continue
        a = solve(opts, int(budget), resources=res)
        assert a.loss == pytest.approx(ref, rel=1e-9, abs=1e-12)
        assert a.used["decode"] <= ld + 1e-12 and a.used["prefill"] <= lp + 1e-12
        assert a.nbytes <= budget
        solved += 1
    assert solved > 0


def test_resource_errors_are_one_line():
    opts = {"t": [Option("a", 10, 1.0), Option("b", 20, 0.5)]}
    with pytest.raises(TasaError, match="no cost for tensor 't' in format 'b'"):
        solve(opts, 30, resources=[Resource("decode", {"t": {"a": 1.0}}, 5.0)])
    with pytest.raises(TasaError, match="least possible is 1"):
        solve(opts, 30, resources=[Resource("decode", {"t": {"a": 1.0, "b": 2.0}}, 0.5)])
    with pytest.raises(TasaError, match="dp solver"):
        solve(opts, 30, method="dp", resources=[Resource("decode", {"t": {"a": 1.0, "b": 2.0}}, 5.0)])


# ---------------------------------------------------------------------------- cost model
def test_roles_and_prediction_are_linear_in_weights(src, tmp_path):
    kp = load_kernel_profile(write_profile(tmp_path / "p.toml", src, COSTS))
    assert role(src, "token_embd.weight") == "output"          # SmolLM2 ties its LM head
    assert role(src, "blk.0.attn_q.weight") == "layer"
    uni = {t.name: "Q8_0" for t in src.quantizable}
    p = kp.predict(src, uni)
    n_all = sum(t.n_elements for t in src.quantizable)
    n_head = src.tensors["token_embd.weight"].n_elements
    assert p.decode_ms == pytest.approx(0.018e-6 * n_all)
    # prefill: layer tensors x 512 tokens x their mat-mat cost, the LM head once (last token's logits)
    assert p.prefill_ms == pytest.approx(0.0012e-6 * 512 * (n_all - n_head) + 0.018e-6 * n_head)
    assert p.tg_ts == pytest.approx(1000 / p.decode_ms)


def test_head_cost_of_its_own_round_trips_and_applies_to_the_head_only(src, tmp_path):
    from tasa_edge.costmodel import FormatCost

    p = write_profile(tmp_path / "p.toml", src, COSTS)
    text = p.read_text().replace("[kernels.gguf.Q4_0]\ndecode_ns_per_weight = 0.01\n",
                                 "[kernels.gguf.Q4_0]\ndecode_ns_per_weight = 0.01\noutput_decode_ns_per_weight = 0.04\n")
    assert text != p.read_text()
    p.write_text(text)
    kp = load_kernel_profile(p)
    assert kp.costs["Q4_0"] == FormatCost(0.01, 0.001, 0.04) and kp.costs["Q8_0"].output_decode_ns_per_weight is None
    assert "output_decode_ns_per_weight = 0.04" in kp.to_toml()
    n_head = src.tensors["token_embd.weight"].n_elements
    assert kp.tensor_costs(src, "token_embd.weight", "Q4_0") == pytest.approx((0.04e-6 * n_head, 0.04e-6 * n_head))
    n = src.tensors["blk.0.ffn_up.weight"].n_elements
    assert kp.tensor_costs(src, "blk.0.ffn_up.weight", "Q4_0") == pytest.approx((0.01e-6 * n, 0.001e-6 * n * 512))
    p.write_text(text.replace("output_decode_ns_per_weight = 0.04", "output_decode_ns_per_weight = 0.04\nspeed = 3"))
    with pytest.raises(TasaError, match=r"\[kernels.gguf.Q4_0\] must have .* nothing else"):
        load_kernel_profile(p)


def test_fit_recovers_the_heads_own_cost_from_the_design_files(src):
    """Timings made from known costs (a tied head slower than the repacked layers in Q4_0 / IQ4_NL):
    the fit over the designed files recovers every coefficient, and one coefficient per format could
    not (the random mix it then mispredicts)."""
    from devices.kernel_profile import DesignRun, design_plans, fit
    from tasa_edge.costmodel import FormatCost

    menu = ["Q8_0", "Q4_0", "IQ4_NL", "Q4_K"]
    layer = {"Q8_0": 0.080, "Q4_0": 0.038, "IQ4_NL": 0.035, "Q4_K": 0.052}
    head = {"Q8_0": 0.080, "Q4_0": 0.078, "IQ4_NL": 0.093, "Q4_K": 0.052}
    pre = {"Q8_0": 0.015, "Q4_0": 0.011, "IQ4_NL": 0.011, "Q4_K": 0.009}
    designs = design_plans(src, menu, n_random=1)
    labels = [d[0] for d in designs]
    assert labels == ["uniform Q8_0", "uniform Q4_0", "uniform IQ4_NL", "uniform Q4_K", "output Q4_0", "output IQ4_NL",
                      "random mix 1"]    # Q4_K does not fit the 576-wide head
    truth = KernelProfile("t", "gguf", {}, {"pp": 512}, {f: FormatCost(layer[f], pre[f], head[f]) for f in menu})

    def run(label, tensors):
        p = truth.predict(src, tensors)
        return DesignRun(label, tensors, p.tg_ts, p.pp_ts, 0.0, 0.0, 0)

    runs = [run(*d) for d in designs]
    got = fit(src, runs[:-1], menu, 512)
    for f in ("Q4_0", "IQ4_NL"):
        assert got[f].decode_ns_per_weight == pytest.approx(layer[f], rel=1e-6)
        assert got[f].output_decode_ns_per_weight == pytest.approx(head[f], rel=1e-6)
        assert got[f].prefill_ns_per_weight == pytest.approx(pre[f], rel=1e-6)
    assert got["Q4_K"].output_decode_ns_per_weight is None and got["Q8_0"].output_decode_ns_per_weight is None
    kp = KernelProfile("f", "gguf", {}, {"pp": 512}, got)
    mix = runs[-1]
    assert kp.predict(src, mix.tensors).tg_ts == pytest.approx(mix.tg_ts, rel=1e-6)
    # the same data through one coefficient per format (the head designs dropped): the mix is mispredicted
    one = KernelProfile("o", "gguf", {}, {"pp": 512}, fit(src, runs[:4], menu, 512))
    assert abs(one.predict(src, mix.tensors).tg_ts / mix.tg_ts - 1) > 0.02


def test_decode_costs_are_floored_at_streaming_their_bytes(src):
    """A noisy machine can fit a format's decode at less than it takes to read its bytes (gemma-3's
    Q6_K at 0.3x, 6 Dec): with the probed bandwidth's floors every decode coefficient, the head's
    own included, is at least bytes per weight / bandwidth; where the timings' own costs are all
    above their floors the floored fit still recovers them."""
    from devices.kernel_profile import DesignRun, decode_floor, design_plans, fit
    from tasa_edge.costmodel import FormatCost

    menu = ["Q8_0", "Q4_0", "Q6_K"]
    bw = 2.0e10                                       # 20 GB/s: Q6_K's floor 0.041 ns/weight
    floors = {f: decode_floor(f, "gguf", bw) for f in menu}
    assert floors["Q6_K"] == pytest.approx(6.5625 / 8 / bw * 1e9) and floors["Q8_0"] == pytest.approx(8.5 / 8 / bw * 1e9)
    assert decode_floor("Q6_K", "gguf", None) == 0.0

    def runs_of(layer):
        truth = KernelProfile("t", "gguf", {}, {"pp": 512},
                              {f: FormatCost(layer[f], 0.01, 0.07 if f == "Q4_0" else None) for f in menu})
        out = []
        for label, tensors in design_plans(src, menu, n_random=0):
            p = truth.predict(src, tensors)
            out.append(DesignRun(label, tensors, p.tg_ts, p.pp_ts, 0.0, 0.0, 0))
        return out

    above = {"Q8_0": 0.080, "Q4_0": 0.038, "Q6_K": 0.050}
    got = fit(src, runs_of(above), menu, 512, floors=floors)
    assert {f: got[f].decode_ns_per_weight for f in menu} == pytest.approx(above, rel=1e-6)
    assert got["Q4_0"].output_decode_ns_per_weight == pytest.approx(0.07, rel=1e-6)
    below = {**above, "Q6_K": 0.010}                  # Q6_K below its floor, as a noisy fit had it
    runs = runs_of(below)
    assert fit(src, runs, menu, 512)["Q6_K"].decode_ns_per_weight == pytest.approx(0.010, rel=1e-6)   # the data alone allow it
    got = fit(src, runs, menu, 512, floors=floors)
    assert got["Q6_K"].decode_ns_per_weight == pytest.approx(floors["Q6_K"], rel=1e-6)
    assert all(got[f].decode_ns_per_weight >= floors[f] * (1 - 1e-9) for f in menu)
    assert got["Q4_0"].output_decode_ns_per_weight >= floors["Q4_0"] * (1 - 1e-9)


def test_kv_cache_size_from_gguf_metadata(src):
    # SmolLM2-135M: 30 layers, 3 KV heads of 64 (F16 K and V): 90 MiB at 4096 tokens, as llama.cpp reports
    assert kv_cache_bytes(src, 4096) == 30 * 4096 * 3 * (64 + 64) * 2 == 90 * 2**20


def test_measured_profile_is_a_device_profile_too(src, tmp_path):
    p = write_profile(tmp_path / "p.toml", src, COSTS)
    dp = load_profile(p)
    assert dp.target == "local" and dp.kernels is not None and set(dp.kernels.costs) == set(COSTS)
    bad = tmp_path / "bad.toml"
    bad.write_text(p.read_text().replace("prefill_ns_per_weight = 0.001\n", "prefill_ns_per_weight = -1\n", 1))
    with pytest.raises(TasaError, match="must be a number >= 0"):
        load_profile(bad)
    plain = tmp_path / "plain.toml"
    plain.write_text('name = "x"\ntarget = "local"\n')
    with pytest.raises(TasaError, match="no measured kernel costs"):
        load_kernel_profile(plain)


# ---------------------------------------------------------------------------- planning
def test_decode_limit_is_met_and_costs_loss(src, tmp_path):
    an = Analysis.load(synthetic_analysis(src, tmp_path / "analysis.json"))
    kp = load_kernel_profile(write_profile(tmp_path / "p.toml", src, COSTS))
    free = make_plan(an, src, bpw=6.0, device=DeviceLimits(kp))
    assert free.predicted["decode_ms"] > 0 and free.provenance["device_profile"]["limits"]["max_decode_ms"] is None
    limit = 0.9 * free.predicted["decode_ms"]
    fast = make_plan(an, src, bpw=6.0, device=DeviceLimits(kp, max_decode_ms=limit))
    assert fast.predicted["decode_ms"] <= limit + 1e-9
    assert fast.predicted["loss"] > free.predicted["loss"]          # speed is paid for in predicted loss
    # the fast plan moves weights to the fast format (Q4_0), away from the slow one (Q5_0)
    tq = fast.types_used()
    tf = free.types_used()
    assert tq.get("Q5_0", 0) < tf.get("Q5_0", 0)
    # prefill limit too
    pl = 0.95 * free.predicted["prefill_ms"]
    both = make_plan(an, src, bpw=6.0, device=DeviceLimits(kp, max_decode_ms=limit, max_prefill_ms=pl))
    assert both.predicted["prefill_ms"] <= pl + 1e-9 and both.predicted["decode_ms"] <= limit + 1e-9


def test_plan_near_a_reference_changes_at_most_max_changes_tensors(src, tmp_path):
    """The win's re-plan (benchmarks/device_plans.py): at most K tensors in another format than a
    reference (llama.cpp's mix there); K = 0 is the reference itself, a larger K buys loss."""
    an = Analysis.load(synthetic_analysis(src, tmp_path / "analysis.json"))
    kp = load_kernel_profile(write_profile(tmp_path / "p.toml", src, COSTS))
    ref = {t.name: "Q4_0" for t in src.quantizable}
    for t in list(src.quantizable)[::3]:
        ref[t.name] = "Q8_0"
    nbytes = sum(an.table.bytes[n][f] for n, f in ref.items()) + 4 * sum(
        t.n_elements for t in src.tensors.values() if not t.quantizable)
    free = make_plan(an, src, nbytes=nbytes, device=DeviceLimits(kp))
    n_free = sum(free.tensors[n] != f for n, f in ref.items())
    assert n_free > 20
    same = make_plan(an, src, nbytes=nbytes, device=DeviceLimits(kp, near=ref, max_changes=0))
    assert same.tensors == ref
    losses = []
    for k in (0, 6, n_free // 2):
        p = make_plan(an, src, nbytes=nbytes, device=DeviceLimits(kp, near=ref, max_changes=k))
        assert sum(p.tensors[n] != f for n, f in ref.items()) <= k
        assert p.provenance["device_profile"]["limits"]["max_changes_from_reference"] == k
        losses.append(p.predicted["loss"])
    assert losses[0] > losses[1] > losses[2] >= free.predicted["loss"]
    timed = make_plan(an, src, nbytes=nbytes, device=DeviceLimits(kp, near=ref, max_changes=6), time_limit=60)
    assert timed.tensors == make_plan(an, src, nbytes=nbytes, device=DeviceLimits(kp, near=ref, max_changes=6)).tensors
    assert timed.provenance["optimal"] is True       # solved well within the limit: the exact plan
    with pytest.raises(TasaError, match="time_limit must be positive"):    # the limit reaches HiGHS' options
        make_plan(an, src, nbytes=nbytes, device=DeviceLimits(kp), time_limit=0)
    with pytest.raises(TasaError, match="needs a reference plan"):
        make_plan(an, src, nbytes=nbytes, device=DeviceLimits(kp, max_changes=3))


def test_fit_ram_budget(src, tmp_path):
    an = Analysis.load(synthetic_analysis(src, tmp_path / "analysis.json"))
    ram = 400 * 2**20
    kp = load_kernel_profile(write_profile(tmp_path / "p.toml", src, COSTS, usable_ram=ram))
    dl = DeviceLimits(kp, fit_ram=True, ctx=8192, ram_overhead=100 * 2**20)
    plan = make_plan(an, src, device=dl)                                  # --fit-ram alone is the budget
    file_budget = ram - kv_cache_bytes(src, 8192) - 100 * 2**20
    assert plan.predicted["bytes"] <= file_budget
    assert plan.provenance["device_profile"]["limits"]["fit_ram"]["kv_cache"] == 180 * 2**20
    big = make_plan(an, src, bpw=8.0, device=dl)                          # the tighter of --bpw and --fit-ram
    assert big.predicted["bytes"] <= file_budget
    with pytest.raises(TasaError, match="no room"):
        make_plan(an, src, device=DeviceLimits(kp, fit_ram=True, ctx=16384, ram_overhead=100 * 2**20))


def test_profile_of_another_model_is_refused(src, tmp_path):
    an = Analysis.load(synthetic_analysis(src, tmp_path / "analysis.json"))
    kp = load_kernel_profile(write_profile(tmp_path / "p.toml", src, COSTS, fingerprint="sha256:" + "0" * 32))
    with pytest.raises(TasaError, match="was measured on"):
        make_plan(an, src, bpw=6.0, device=DeviceLimits(kp))


def test_unmeasured_formats_are_left_out(src, tmp_path):
    an = Analysis.load(synthetic_analysis(src, tmp_path / "analysis.json"))
    kp = load_kernel_profile(write_profile(tmp_path / "p.toml", src, {k: COSTS[k] for k in ("Q4_0", "Q8_0")}))
    plan = make_plan(an, src, bpw=6.0, device=DeviceLimits(kp))
    assert set(plan.types_used()) <= {"Q4_0", "Q8_0"}
    assert plan.provenance["device_profile"]["formats_not_measured"] == ["Q4_K", "Q5_0", "Q6_K"]


def test_sweep_traces_loss_against_predicted_speed(src, tmp_path):
    an = Analysis.load(synthetic_analysis(src, tmp_path / "analysis.json"))
    kp = load_kernel_profile(write_profile(tmp_path / "p.toml", src, COSTS))
    pts = sweep(an, src, points=4, device=DeviceLimits(kp))
    assert len(pts) == 4 and all(p["tg_ts"] > 0 and p["pp_ts"] > 0 for p in pts)
    assert [p["loss"] for p in pts] == sorted((p["loss"] for p in pts), reverse=True)


# ---------------------------------------------------------------------------- CLI
def run_cli(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TASA_NO_PROGRESS": "1"}
    return subprocess.run([sys.executable, "-m", "tasa_edge.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)


def test_cli_plan_with_profile_and_limits(src, tmp_path):
    an = synthetic_analysis(src, tmp_path / "analysis.json")
    prof = write_profile(tmp_path / "p.toml", src, COSTS)
    out = tmp_path / "plan.json"
    res = run_cli("plan", "smollm2-135m", "-a", an, "--bpw", "6", "-o", out, "--profile", prof, "--min-tg", "55")
    assert res.returncode == 0, res.stderr
    plan = json.loads(out.read_text())
    assert plan["predicted"]["tg_ts"] >= 55 - 1e-9
    assert plan["provenance"]["device_profile"]["limits"]["max_decode_ms"] == pytest.approx(1000 / 55)
    assert "predicted on test: decode" in res.stdout


@pytest.mark.parametrize("extra,needle", [
    (["--min-tg", "100000"], "limit 0.01 is infeasible: the least possible is"),
    (["--max-decode-ms", "5", "--min-tg", "10"], "not both"),
    (["--min-tg", "-3"], "--min-tg must be positive"),
])
def test_cli_bad_limits_are_one_line(src, tmp_path, extra, needle):
    an = synthetic_analysis(src, tmp_path / "analysis.json")
    prof = write_profile(tmp_path / "p.toml", src, COSTS)
    out = tmp_path / "plan.json"
    res = run_cli("plan", "smollm2-135m", "-a", an, "--bpw", "6", "-o", out, "--profile", prof, *extra)
    assert res.returncode != 0 and needle in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert not out.exists()


def test_cli_limit_without_profile_is_refused(src, tmp_path):
    an = synthetic_analysis(src, tmp_path / "analysis.json")
    res = run_cli("plan", "smollm2-135m", "-a", an, "--bpw", "6", "-o", tmp_path / "p.json", "--max-decode-ms", "3")
    assert res.returncode != 0 and "--max-decode-ms needs --profile" in res.stderr


def test_cli_profile_from_another_machine_is_refused_unless_forced(src, tmp_path):
    an = synthetic_analysis(src, tmp_path / "analysis.json")
    other = {**_here_identity(), "cpu": "ARM Cortex-A76", "llama_cpp_commit": "deadbeef"}
    prof = write_profile(tmp_path / "p.toml", src, COSTS, machine=other)
    out = tmp_path / "plan.json"
    res = run_cli("plan", "smollm2-135m", "-a", an, "--bpw", "6", "-o", out, "--profile", prof)
    assert res.returncode != 0 and "measured on another machine or llama.cpp build" in res.stderr, res.stderr
    assert "'ARM Cortex-A76' (profile)" in res.stderr and "'deadbeef' (profile)" in res.stderr
    assert not out.exists()
    res = run_cli("plan", "smollm2-135m", "-a", an, "--bpw", "6", "-o", out, "--profile", prof, "--force-profile")
    assert res.returncode == 0, res.stderr


@pytest.mark.slow
def test_cli_profile_measures_through_llama_bench(src, tmp_path):
    """A real (tiny) profile run: design files exported and timed by llama-bench; the TOML is a
    loadable device profile with the machine's identity, and plan --profile accepts it here."""
    from devices.llama_tools import find_tool

    if find_tool("llama-bench") is None:
        pytest.skip("llama-bench not built (make tools)")
    out = tmp_path / "device.toml"
    res = run_cli("profile", "-m", "smollm2-135m", "-o", out, "--formats", "Q8_0,Q4_0,Q4_K", "-p", "16", "-n", "4",
                  "-r", "1", "--random-mixes", "1", "--threads", "1", "--by-width", timeout=600)
    assert res.returncode == 0, res.stderr
    data = tomllib.loads(out.read_text())
    assert data["machine"]["cpu"] == _here_identity()["cpu"]
    assert data["machine"]["llama_cpp_commit"] == _here_identity()["llama_cpp_commit"]
    assert data["measured"]["fingerprint"] == src.fingerprint and data["measured"]["threads"] == 1
    assert set(data["measured"]["design_tg_ts"]) == {"uniform Q8_0", "uniform Q4_0", "uniform Q4_K", "output Q4_0",
                                                     "Q4_0 on width 1536", "random mix 1"}
    # Q4_0 and Q8_0 take both widths (576, 1536) and get a cost each; Q4_K fits the 1536-wide ffn_down only
    assert set(data["kernels"]["gguf"]["Q4_0"]["by_ne0"]) == {"576", "1536"} and data["measured"]["by_width"] is True
    assert set(data["kernels"]["gguf"]["Q4_K"]["by_ne0"]) == {"1536"}
    assert all(v > 0 for v in data["measured"]["design_tg_ts"].values())
    assert load_profile(out).kernels.costs.keys() == {"Q8_0", "Q4_0", "Q4_K"}
    an = synthetic_analysis(src, tmp_path / "analysis.json")
    res = run_cli("plan", "smollm2-135m", "-a", an, "--bpw", "6", "-o", tmp_path / "plan.json", "--profile", out)
    assert res.returncode == 0, res.stderr
    res = run_cli("profile", "-m", "smollm2-135m", "-o", tmp_path / "x.toml", "--formats", "Q4_K")
    assert res.returncode != 0 and "fits every tensor" in res.stderr
    # the benchmark's drift check: the plan's reference design rebuilt and timed again by llama-bench,
    # in passes alternating with the plan (here the reference file itself stands in for the plan)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import device_plans as dp

    files: dict = {}
    kp = load_kernel_profile(out)
    plan = {t.name: "Q4_0" for t in src.quantizable}
    label, f = dp.reference_file(src, kp, plan, tmp_path, files)
    assert label == "uniform Q4_0" and f.is_file()
    stamp = f.stat().st_mtime_ns
    assert dp.reference_file(src, kp, plan, tmp_path, files) == (label, f)
    assert f.stat().st_mtime_ns == stamp          # exported once per run, measured at every plan
    m = dp.measure_rounds({"reference": f, "plan": f}, kp, 2, 2)
    assert len(m["plan"]["round_tg"]) == 2 and m["plan"]["reps_per_round"] == 1 and len(m["reference"]["pp_samples"]) == 2
    now = dp.drift_check(kp, label, m["reference"], m["plan"], 100.0, 1000.0)
    assert now["profile_pp_ts"] == data["measured"]["design_pp_ts"]["uniform Q4_0"]
    assert 0.2 < now["tg_drift"] < 5 and 0.2 < now["pp_drift"] < 5
    assert now["tg_drift"] == pytest.approx(float(np.median(m["reference"]["round_tg"])) / now["profile_tg_ts"])


def test_profile_in_passes_measures_every_file_in_each_pass_and_resumes(src, tmp_path, monkeypatch):
    """``--rounds``: every design file timed once per pass (each pass starting one file later), its
    speed the best of its repetitions over all passes; an interrupted run resumes pass by pass."""
    import devices.bandwidth as bw
    import devices.llama_tools as lt
    from devices.kernel_profile import measure_profile

    calls: list[tuple[str, int]] = []
    boom = {"at": None}

    def fake_bench(path, pp, tg, reps, threads, **kw):
        calls.append((Path(path).name, reps))
        if len(calls) == boom["at"]:
            raise TasaError("llama-bench killed by SIGKILL")
        f = 1.0 + 0.1 * (len(calls) % 3)               # the machine's speed moves from call to call
        mk = lambda base: {"ts_mean": base * f, "ts_std": 0.0, "samples_ts": [base * f * 0.98] * (reps - 1) + [base * f]}  # noqa: E731
        return {"tg": mk(100.0 + 10 * int(Path(path).stem.split("-")[1])), "pp": mk(1000.0), "build_commit": "abc"}

    monkeypatch.setattr(lt, "run_llama_bench", fake_bench)
    monkeypatch.setattr(lt, "require_tool", lambda name: Path("/bin/true"))
    monkeypatch.setattr(lt, "build_info", lambda exe: type("B", (), {"version": "1", "commit": "abc"})())
    monkeypatch.setattr(bw, "probe_local", lambda threads, repeats=3: {"read_bytes_per_s": 1e9})
    kw = dict(menu=["Q8_0", "Q4_0"], threads=1, pp=16, tg=4, reps=5, n_random=0, show_progress=False, workdir=tmp_path)
    kp, runs, text = measure_profile(src, rounds=2, **kw)
    n = len(runs)
    assert n >= 3 and len(calls) == 2 * n and {r for _, r in calls} == {3}          # ceil(5 / 2) repetitions per pass
    names = [c for c, _ in calls]
    assert names[:n] == [f"design-{i}.gguf" for i in range(n)]
    assert names[n:] == [f"design-{i}.gguf" for i in [*range(1, n), 0]]              # the second pass starts one later
    # the fastest repetition over both passes: design i's passes ran at calls k and k' with factors f(k), f(k')
    for i, r in enumerate(runs):
        ks = [k + 1 for k, c in enumerate(names) if c == f"design-{i}.gguf"]
        assert r.tg_ts == pytest.approx((100.0 + 10 * i) * max(1.0 + 0.1 * (k % 3) for k in ks))
    assert kp.measured["rounds"] == 2 and not list(tmp_path.glob("tasa-profile-*"))  # the files are gone
    # interrupted in the second pass, then resumed: only the missing (file, pass) timings are run
    prog = tmp_path / "progress.json"
    calls.clear()
    boom["at"] = n + 2
    with pytest.raises(TasaError, match="SIGKILL"):
        measure_profile(src, rounds=2, resume=prog, **kw)
    assert len(json.loads(prog.read_text())) == n + 1
    calls.clear()
    boom["at"] = None
    kp2, runs2, _ = measure_profile(src, rounds=2, resume=prog, **kw)
    assert len(calls) == n - 1 and [r.label for r in runs2] == [r.label for r in runs]
    assert sorted({e["label"] for e in json.loads(prog.read_text()).values()}) == sorted(r.label for r in runs)
    with pytest.raises(TasaError, match="rounds"):
        measure_profile(src, rounds=0, **kw)
    # --stat median: the middle of all a file's repetitions over both passes (3 + 3 of them)
    calls.clear()
    kp3, runs3, _ = measure_profile(src, rounds=2, stat="median", **kw)
    for i, r in enumerate(runs3):
        ks = [k + 1 for k, c in enumerate(c for c, _ in calls) if c == f"design-{i}.gguf"]
        samples = [(100.0 + 10 * i) * (1.0 + 0.1 * (k % 3)) * x for k in ks for x in (0.98, 0.98, 1.0)]
        assert r.tg_ts == pytest.approx(float(np.median(samples)))
    assert kp3.measured["stat"] == "median"
    with pytest.raises(TasaError, match="unknown speed statistic 'fastest'"):
        measure_profile(src, stat="fastest", **kw)


# ---------------------------------------------------------------------------- ONNX (onnxruntime MatMulNBits)
def test_onnx_fit_costs_the_head_in_prefill_like_a_layer(src):
    """An ONNX profile (``head_prefill = "all"``: onnxruntime graphs return every position's logits):
    timings made from known costs are recovered by the fit, the head's prefill is pp x its weights
    (not one mat-vec as under llama-bench), and the design files' fallback is int8_b32."""
    from devices.kernel_profile import DesignRun, design_plans, fit
    from tasa_edge.costmodel import FormatCost

    menu = ["int8_b32", "int4_b32", "int4_b128"]
    layer = {"int8_b32": 0.090, "int4_b32": 0.060, "int4_b128": 0.050}
    head = {"int8_b32": 0.090, "int4_b32": 0.120, "int4_b128": 0.070}
    pre = {"int8_b32": 0.030, "int4_b32": 0.012, "int4_b128": 0.010}
    designs = design_plans(src, menu, n_random=1, kernels="onnx")
    assert [d[0] for d in designs] == ["uniform int8_b32", "uniform int4_b32", "uniform int4_b128", "output int4_b32",
                                       "output int4_b128", "random mix 1"]
    assert set(designs[3][1].values()) == {"int8_b32", "int4_b32"}
    measured = {"pp": 512, "head_prefill": "all"}
    truth = KernelProfile("t", "onnx", {}, measured, {f: FormatCost(layer[f], pre[f], head[f]) for f in menu})
    n_head = src.tensors["token_embd.weight"].n_elements
    assert truth.tensor_costs(src, "token_embd.weight", "int4_b32") == pytest.approx((0.120e-6 * n_head, 0.012e-6 * n_head * 512))
    runs = []
    for label, tensors in designs:
        p = truth.predict(src, tensors)
        runs.append(DesignRun(label, tensors, p.tg_ts, p.pp_ts, 0.0, 0.0, 0))
    got = fit(src, runs[:-1], menu, 512, head_prefill="all")
    for f in menu:
        assert got[f].decode_ns_per_weight == pytest.approx(layer[f], rel=1e-6)
        assert got[f].prefill_ns_per_weight == pytest.approx(pre[f], rel=1e-6)
    assert got["int4_b32"].output_decode_ns_per_weight == pytest.approx(head["int4_b32"], rel=1e-6)
    kp = KernelProfile("f", "onnx", {}, measured, got)
    assert kp.predict(src, runs[-1].tensors).pp_ts == pytest.approx(runs[-1].pp_ts, rel=1e-6)
    # the llama-bench model of prefill (head once) cannot fit onnxruntime's timings
    last = KernelProfile("l", "onnx", {}, {"pp": 512}, fit(src, runs[:-1], menu, 512))
    assert max(abs(last.predict(src, r.tensors).pp_ts / r.pp_ts - 1) for r in runs) > 0.05


def test_profile_kernels_must_match_the_analysis_target(src, tmp_path):
    from tests.synthetic import write_analysis
    from tasa_edge import formats

    spec = formats.get("onnx")
    fm = ["int4_b32", "int8_b32"]
    vals = {t.name: {f: 1.0 / (i + 1) for i, f in enumerate(fm)} for t in src.quantizable}
    nb = {t.name: {f: spec.nbytes(f, t.shape) for f in fm} for t in src.quantizable}
    an = Analysis.load(write_analysis(src, tmp_path / "an.json", vals, vals, nb, target="onnx"))
    kp = load_kernel_profile(write_profile(tmp_path / "p.toml", src, COSTS))
    with pytest.raises(TasaError, match="measured gguf kernels, the analysis is for onnx .tasa-edge profile --format onnx"):
        make_plan(an, src, bpw=6.0, device=DeviceLimits(kp))
    bad = tmp_path / "bad.toml"
    bad.write_text(write_profile(tmp_path / "q.toml", src, COSTS).read_text().replace('target = "local"\nthreads', 'target = "local"\nhead_prefill = "first"\nthreads'))
    with pytest.raises(TasaError, match='head_prefill must be "last" or "all"'):
        load_kernel_profile(bad)


@pytest.mark.slow
def test_cli_onnx_profile_measures_through_onnxruntime(src, tmp_path):
    """A real (tiny) ONNX profile: the design directories exported and timed by onnxruntime(-genai);
    the TOML carries onnxruntime's version as the identity, and plan --profile for an ONNX analysis
    honours a decode limit with it; a remote ONNX profile is refused in one line."""
    from tests.synthetic import write_analysis
    from tasa_edge import formats

    out = tmp_path / "onnx.toml"
    res = run_cli("profile", "-m", "smollm2-135m", "-f", "onnx", "-o", out, "--formats", "int8_b32,int4_b32", "-p", "16",
                  "-n", "4", "-r", "1", "--random-mixes", "1", "--threads", "1", timeout=900)
    assert res.returncode == 0, res.stderr
    data = tomllib.loads(out.read_text())
    import onnxruntime

    assert data["machine"]["onnxruntime"] == onnxruntime.__version__ and "llama_cpp_commit" not in data["machine"]
    assert data["measured"]["head_prefill"] == "all" and "MatMulNBits" in data["measured"]["backend"]
    assert set(data["measured"]["design_tg_ts"]) == {"uniform int8_b32", "uniform int4_b32", "output int4_b32", "random mix 1"}
    assert all(v > 0 for v in data["measured"]["design_pp_ts"].values())
    kp = load_profile(out).kernels
    assert kp.target == "onnx" and set(kp.costs) == {"int8_b32", "int4_b32"}
    spec = formats.get("onnx")
    fm = ["int4_b32", "int8_b32"]
    vals = {t.name: {"int4_b32": 0.5, "int8_b32": 0.1} for t in src.quantizable}
    nb = {t.name: {f: spec.nbytes(f, t.shape) for f in fm} for t in src.quantizable}
    an = write_analysis(src, tmp_path / "an.json", vals, vals, nb, target="onnx")
    fast = kp.predict(src, {t.name: "int4_b32" for t in src.quantizable})
    plan = tmp_path / "plan.json"
    res = run_cli("plan", "smollm2-135m", "-a", an, "--bpw", "9", "-o", plan, "--profile", out,
                  "--max-decode-ms", str(fast.decode_ms * 1.05))
    assert res.returncode == 0, res.stderr
    pj = json.loads(plan.read_text())
    assert pj["target"] == "onnx" and pj["predicted"]["decode_ms"] <= fast.decode_ms * 1.05 + 1e-9
    res = run_cli("profile", "-m", "smollm2-135m", "-f", "onnx", "--target", "ssh", "--host", "127.0.0.1", "-o", tmp_path / "x.toml")
    assert res.returncode != 0 and "runs onnxruntime on this machine" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.toml").exists()


def test_costs_per_input_width_predict_what_one_cost_per_format_cannot():
    """A format whose kernels run slower per weight on one matrix width (Q4_K on Qwen's 8960-wide
    ffn_down, say): the width design files let the fit predict a structured plan (the wide matrices
    in another format) and random mixes exactly, where one coefficient per format misses them; the
    profile TOML round-trips the per-width costs."""
    from devices.kernel_profile import DesignRun, design_plans, fit, layer_widths
    from tasa_edge.costmodel import FormatCost, kernel_profile_from_dict
    from tasa_edge.model import ModelSource
    from tasa_edge.zoo import resolve_model

    src = ModelSource.open(resolve_model("gemma3-270m"))     # widths 640 / 1024 / 2048 (K-quants: 1024, 2048)
    widths = layer_widths(src)
    assert widths == [640, 1024, 2048]
    menu = ["Q8_0", "Q4_0", "Q4_K", "Q6_K"]
    base = {"Q8_0": (0.080, 0.016), "Q4_0": (0.060, 0.012), "Q4_K": (0.060, 0.013), "Q6_K": (0.068, 0.011)}
    slow = {("Q4_K", 2048): 1.6, ("Q4_0", 640): 1.3, ("Q8_0", 1024): 0.9}
    truth = KernelProfile("t", "gguf", {}, {"pp": 512}, {
        f: FormatCost(d, p, None, by_ne0={w: (d * slow.get((f, w), 1.0), p * slow.get((f, w), 1.0)) for w in widths})
        for f, (d, p) in base.items()})
    designs = design_plans(src, menu, n_random=2, by_width=True)
    labels = [d[0] for d in designs]
    # each format on every width it fits but the one holding most of its weights (the uniform file's)
    assert [lb for lb in labels if " on width " in lb] == ["Q4_0 on width 1024", "Q4_0 on width 2048", "Q4_K on width 1024",
                                                          "Q6_K on width 1024"]
    assert design_plans(src, menu, n_random=2) == [d for d in designs if " on width " not in d[0]]

    def run(label, tensors):
        p = truth.predict(src, tensors)
        return DesignRun(label, tensors, p.tg_ts, p.pp_ts, 0.0, 0.0, 0)

    runs = [run(*d) for d in designs]
    # a structured plan: Q4_K on the wide ffn_down only (where it is slow), Q6_K on the 1024-wide
    plan = {t.name: {2048: "Q4_K", 1024: "Q6_K"}.get(t.shape[-1], "Q8_0") for t in src.quantizable}
    want = truth.predict(src, plan)
    got = KernelProfile("w", "gguf", {}, {"pp": 512}, fit(src, runs[:-2], menu, 512, by_width=True))
    for r in runs[-2:] + [run("plan", plan)]:
        p = got.predict(src, r.tensors)
        assert p.tg_ts == pytest.approx(r.tg_ts, rel=1e-6) and p.pp_ts == pytest.approx(r.pp_ts, rel=1e-6)
    one = KernelProfile("o", "gguf", {}, {"pp": 512}, fit(src, [r for r in runs if " on width " not in r.label], menu, 512))
    assert abs(one.predict(src, plan).pp_ts / want.pp_ts - 1) > 0.03
    back = kernel_profile_from_dict(tomllib.loads(got.to_toml()), "t")
    assert back.costs == got.costs and back.costs["Q4_K"].by_ne0.keys() == {1024, 2048}
    assert back.predict(src, plan).pp_ts == pytest.approx(want.pp_ts, rel=1e-9)
    with pytest.raises(TasaError, match="by_ne0.1024 must be"):
        kernel_profile_from_dict(tomllib.loads(got.to_toml().replace("1024 = [", "1024 = [-1.0, ", 1)), "t")


def test_refit_profile_reproduces_the_recorded_fit_from_its_design_speeds(tmp_path, capsys):
    """benchmarks/refit_profile.py on SmolLM2's committed profile: fitted again from the design
    speeds the profile recorded, the fit the profile was made with (floored when it records
    ``decode_floor``) gives back the recorded coefficients and fit errors; with the floor no decode
    coefficient is below it."""
    import shutil

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import refit_profile

    prof = Path(__file__).resolve().parents[1] / "benchmarks" / "device" / "smollm2-135m.profile.toml"
    shutil.copy(prof, tmp_path)
    assert refit_profile.main(["--model", "smollm2-135m", "--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rec = tomllib.loads(prof.read_text())
    rows = {r[0]: r for r in ([c.strip() for c in line.strip().strip("|").split("|")] for line in out.splitlines()
                              if line.startswith("| ") and not line.startswith("| format"))}
    made = "floored" if rec["measured"].get("decode_floor") else "unfloored"
    for f, c in rec["kernels"]["gguf"].items():
        floor, dec_free, dec_floored = float(rows[f][1]), float(rows[f][2].split()[0]), float(rows[f][3])
        assert (dec_floored if made == "floored" else dec_free) == pytest.approx(c["decode_ns_per_weight"], abs=1e-4)
        assert dec_floored >= floor - 1e-4
    fit_err = rec["measured"]["fit"]["max_abs_tg_err"]
    assert f"{made} fit {fit_err:.3f}, {rec['measured']['fit']['max_abs_pp_err']:.3f}" in out


def test_decode_spread_reads_every_design_files_repetitions_from_the_committed_profile(capsys):
    """benchmarks/decode_spread.py on SmolLM2's committed profile and progress file: one row per
    design file the profile lists, with all its repetitions, the profile's own figure being their
    statistic (the profile's ``stat``) and the median no faster than the best; a model without a
    profile is a one-line error with exit 2."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import decode_spread

    prof = tomllib.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "device" / "smollm2-135m.profile.toml").read_text())
    m = prof["measured"]
    rows, stat = decode_spread.spread("smollm2-135m")
    rows = {r["label"]: r for r in rows}
    assert stat == m["stat"] and rows.keys() == m["design_tg_ts"].keys()
    for label, r in rows.items():
        assert r["profile"] == pytest.approx(m["design_tg_ts"][label], abs=6e-4)
        assert r[stat] == pytest.approx(r["profile"], abs=6e-4)
        assert r["median"] <= r["best"] and r["n"] == m["reps"]
        assert len(r["passes"]) == m["rounds"] and min(r["passes"]) <= r["median"] <= max(r["passes"])
    decode_spread.main(["--model", "smollm2-135m"])
    assert len([ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ") and "MB" not in ln and "---" not in ln]) == len(rows)
    with pytest.raises(SystemExit) as e:
        decode_spread.main(["--model", "no-such-model"])
    assert e.value.code == 2 and "no-such-model.profile.toml not found" in capsys.readouterr().err
    # --dir: a profile kept elsewhere (a separate check's folder)
    other = Path(__file__).resolve().parents[1] / "benchmarks" / "device" / "recheck-6dec-gemma"
    g = tomllib.loads((other / "gemma3-270m.profile.toml").read_text())["measured"]
    rows, stat = decode_spread.spread("gemma3-270m", other)
    assert stat == g["stat"] and {r["label"]: round(r[stat], 3) for r in rows} == {k: round(v, 3) for k, v in g["design_tg_ts"].items()}


def test_decode_spread_reads_a_checks_files_repetitions(tmp_path, capsys):
    """``--checks``: every file of a device_plans result that kept its decode repetitions (the
    plans, the win's mixes), best / median over all of them; not a result: one line, exit 2."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import decode_spread

    res = {"rows": {"TASA 4.6 bpw": {"bytes": 80_000_000, "tg_samples": [150.0, 140.0, 180.0, 145.0]}},
           "win": {"Q3_K_S": {"rows": {"llama.cpp": {"tg_samples": [100.0, 110.0, 90.0]}, "TASA speed-aware": {"tg_ts": 1.0}}},
                   "errors": {"Q3_K_M x": "infeasible"}}}
    (tmp_path / "r.json").write_text(json.dumps(res))
    rows = {r["label"]: r for r in decode_spread.checks(tmp_path / "r.json")}
    assert rows.keys() == {"TASA 4.6 bpw", "Q3_K_S llama.cpp"}
    assert rows["TASA 4.6 bpw"]["ratio"] == pytest.approx(180.0 / 147.5) and rows["TASA 4.6 bpw"]["gbs_median"] == pytest.approx(11.8)
    assert rows["Q3_K_S llama.cpp"]["median"] == 100.0 and rows["Q3_K_S llama.cpp"]["n"] == 3
    decode_spread.main(["--checks", str(tmp_path / "r.json")])
    assert "| TASA 4.6 bpw | 80.0 | 4 | 180.0 | 147.5 | 1.220 |" in capsys.readouterr().out
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(SystemExit) as e:
        decode_spread.main(["--checks", str(tmp_path / "bad.json")])
    assert e.value.code == 2 and "not a device_plans result" in capsys.readouterr().err
