"""Pins in planning (``plan --tensor-type PATTERN=TYPE``, ``--output-tensor-type``,
``--token-embedding-type``): constraints of the exact allocation, with llama-quantize's matching."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from synthetic import write_analysis

from tasa_edge import formats
from tasa_edge.allocate import Option, solve
from tasa_edge.errors import TasaError
from tasa_edge.planner import Pins, apply_pins, make_plan, resolve_pins, sweep
from tasa_edge.results import Analysis

ROOT = Path(__file__).resolve().parents[1]
GGUF = formats.get("gguf")
MENU = ("Q4_0", "Q5_0", "Q8_0")
K_MENU = ("Q4_K", "Q6_K")


@pytest.fixture(scope="module")
def src():
    from tasa_edge.model import ModelSource
    from tasa_edge.zoo import resolve_model

    return ModelSource.open(resolve_model("smollm2-135m"))


def synthetic_analysis(src, path: Path, seed: int = 0) -> Path:
    """A schema-valid analysis.json for smollm2: Q4_0/Q5_0/Q8_0 for every tensor (plus Q4_K/Q6_K
    where they fit), exact registry bytes, losses falling with bits."""
    rng = np.random.default_rng(seed)
    table = {"ppl": {}, "task": {}, "bytes": {}}
    for t in src.quantizable:
        fm = [f for f in MENU + K_MENU if GGUF.fits(f, t.shape)]
        base = rng.gamma(2.0, 1.0)
        for k in ("ppl", "task"):
            table[k][t.name] = {f: float(base * rng.lognormal(0, 0.3) * 2.0 ** (-GGUF.bits(f, t.shape))) for f in fm}
        table["bytes"][t.name] = {f: GGUF.nbytes(f, t.shape) for f in fm}
    return write_analysis(src, path, table["ppl"], table["task"], table["bytes"])


# ---------------------------------------------------------------------------- exactness (synthetic)
def _brute(opts: dict, budget: int):
    names = list(opts)
    best = None
    for combo in itertools.product(*(opts[n] for n in names)):
        nb = sum(o.nbytes for o in combo)
        if nb <= budget:
            loss = sum(o.loss for o in combo)
            if best is None or loss < best[0] - 1e-12:
                best = (loss, {n: o.fmt for n, o in zip(names, combo)})
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("method", ["highs-milp", "dp"])
def test_pinned_allocation_is_exact_against_brute_force(seed, method):
    rng = np.random.default_rng(seed)
    fmts = ["Q4_0", "Q5_0", "Q6_K", "Q8_0"]
    opts = {}
    for i in range(6):
        nb = sorted(int(x) for x in rng.integers(10, 200, size=len(fmts)))
        loss = sorted((float(x) for x in rng.random(len(fmts))), reverse=True)
        opts[f"t{i}"] = [Option(f, b, l) for f, b, l in zip(fmts, nb, loss)]
    pinned = {"t1": "Q8_0", "t4": "Q4_0"}
    fake = SimpleNamespace(tensors={})
    assert apply_pins(opts, pinned, fake, GGUF) == []
    lo = sum(min(o.nbytes for o in v) for v in opts.values())
    hi = sum(max(o.nbytes for o in v) for v in opts.values())
    for budget in np.linspace(lo, hi, 5).astype(int):
        alloc = solve(opts, int(budget), method=method)
        assert alloc.choice["t1"] == "Q8_0" and alloc.choice["t4"] == "Q4_0"
        ref_loss, _ = _brute(opts, int(budget))
        assert alloc.loss == pytest.approx(ref_loss, rel=1e-9, abs=1e-12)
    with pytest.raises(TasaError):
        solve(opts, lo - 1, method=method)


def test_unscored_pin_gets_registry_bytes_and_zero_loss():
    shape = (64, 512)
    opts = {"a": [Option("Q4_0", GGUF.nbytes("Q4_0", shape), 1.0), Option("Q8_0", GGUF.nbytes("Q8_0", shape), 0.1)]}
    fake = SimpleNamespace(tensors={"a": SimpleNamespace(shape=shape)})
    assert apply_pins(opts, {"a": "F16"}, fake, GGUF) == ["a"]
    assert opts["a"] == [Option("F16", 2 * 64 * 512, 0.0)]


# ---------------------------------------------------------------------------- matching (smollm2)
def test_pattern_is_searched_and_first_match_wins(src):
    pins = Pins.from_cli(["ATTN_V=q8_0", "attn=Q5_0", r"blk\.0\.ffn_down=Q6_K"])
    got = resolve_pins(pins, src, GGUF)
    assert pins.tensor_types[0] == ("attn_v", "q8_0")          # lower-cased, as quantize.cpp
    assert got["blk.3.attn_v.weight"] == "Q8_0"               # first match, not the later "attn"
    assert got["blk.3.attn_q.weight"] == "Q5_0"
    assert got["blk.0.ffn_down.weight"] == "Q6_K"
    assert "blk.1.ffn_down.weight" not in got and "token_embd.weight" not in got


def test_tied_output_type_goes_to_token_embd_as_llama_quantize(src):
    assert "output.weight" not in src.tensors             # SmolLM2 ties its LM head to token_embd
    assert resolve_pins(Pins(output="Q8_0"), src, GGUF) == {"token_embd.weight": "Q8_0"}
    # --token-embedding-type wins over --output-tensor-type on the shared tensor; then the latter pins nothing
    with pytest.raises(TasaError, match="ties its output layer to token_embd.weight"):
        resolve_pins(Pins(output="Q8_0", token_embd="Q5_0"), src, GGUF)
    assert resolve_pins(Pins(token_embd="Q5_0"), src, GGUF) == {"token_embd.weight": "Q5_0"}
    # --token-embedding-type wins over a --tensor-type pattern
    got = resolve_pins(Pins.from_cli(["embd=Q4_0"], token_embd="Q8_0"), src, GGUF)
    assert got == {"token_embd.weight": "Q8_0"}


@pytest.mark.parametrize("pins,needle", [
    (Pins.from_cli(["attn_q=Q4_K"]), "tensor blk.0.attn_q.weight"),           # 576-wide rows
    (Pins.from_cli(["no_such_tensor=Q8_0"]), "matches no quantizable tensor"),
    (Pins.from_cli(["attn=Q8_0", "attn_v=Q4_0"]), "taken by an earlier --tensor-type"),
    (Pins.from_cli(["attn_q=Q9_9"]), "unknown GGUF tensor type"),
    (Pins(token_embd="Q4_K"), "--token-embedding-type Q4_K: tensor token_embd.weight"),
])
def test_bad_pins_are_one_line_errors(src, pins, needle):
    with pytest.raises(TasaError, match=None) as ei:
        resolve_pins(pins, src, GGUF)
    msg = str(ei.value)
    assert needle in msg and "\n" not in msg


@pytest.mark.parametrize("arg,needle", [("attn_q", "expected PATTERN=TYPE"), ("=Q8_0", "missing tensor name"),
                                        ("attn_q=", "missing quantization type")])
def test_malformed_tensor_type_argument(arg, needle):
    with pytest.raises(TasaError, match=needle):
        Pins.from_cli([arg])


# ---------------------------------------------------------------------------- plans (smollm2, synthetic analysis)
def test_plan_honours_pins_records_them_and_stays_optimal(src, tmp_path):
    an = Analysis.load(synthetic_analysis(src, tmp_path / "analysis.json"))
    pins = Pins.from_cli([r"blk\.(0|1)\.ffn_down=Q6_K", "attn_v=q8_0"], token_embd="Q5_1")
    plan = make_plan(an, src, bpw=6.0, pins=pins)
    assert plan.tensors["blk.0.ffn_down.weight"] == "Q6_K" and plan.tensors["blk.1.ffn_down.weight"] == "Q6_K"
    assert all(f == "Q8_0" for n, f in plan.tensors.items() if "attn_v" in n)
    assert plan.tensors["token_embd.weight"] == "Q5_1"     # not in the analysed menu: unscored
    pv = plan.provenance["pins"]
    assert pv["token_embedding_type"] == "Q5_1" and pv["tensor_type"][1] == ["attn_v", "Q8_0"]
    assert pv["unscored"] == ["token_embd.weight"] and "token_embd.weight" in pv["tensors"]
    assert plan.predicted["bpw"] <= 6.0
    plan.validate(src)
    # the pinned plan is the unpinned optimum of the problem without the pinned tensors' freedom:
    # never better than the unpinned plan, and equal when the pins agree with the optimum
    free = make_plan(an, src, bpw=6.0)
    agree = Pins.from_cli([r"blk\.0\.attn_q\.=" + free.tensors["blk.0.attn_q.weight"]])
    same = make_plan(an, src, bpw=6.0, pins=agree)
    assert same.predicted["loss"] == pytest.approx(free.predicted["loss"], rel=1e-9)
    assert make_plan(an, src, bpw=6.0, pins=Pins.from_cli(["ffn_down=Q4_K"])).predicted["loss"] >= free.predicted["loss"] - 1e-12


def test_infeasible_budget_after_pins_says_so(src, tmp_path):
    an = Analysis.load(synthetic_analysis(src, tmp_path / "analysis.json"))
    make_plan(an, src, bpw=4.6)                      # feasible without the pins
    with pytest.raises(TasaError, match="budget infeasible with the pins"):
        make_plan(an, src, bpw=4.6, pins=Pins.from_cli(["blk=Q8_0"], token_embd="F16"))


def test_sweep_with_pins(src, tmp_path):
    an = Analysis.load(synthetic_analysis(src, tmp_path / "analysis.json"))
    pts = sweep(an, src, points=3, pins=Pins(token_embd="Q8_0"))
    assert len(pts) >= 2 and all(p["types"].get("Q8_0", 0) >= 1 for p in pts)


# ---------------------------------------------------------------------------- CLI
def run_cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TASA_NO_PROGRESS", None)
    return subprocess.run([sys.executable, "-m", "tasa_edge.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def test_cli_plan_output_tensor_type_on_tied_smollm2(src, tmp_path):
    an = synthetic_analysis(src, tmp_path / "analysis.json")
    out = tmp_path / "plan.json"
    res = run_cli("--quiet", "plan", "smollm2-135m", "-a", an, "--bpw", "5.5", "-o", out,
                  "--output-tensor-type", "Q8_0", "--tensor-type", "attn_k=Q5_0")
    assert res.returncode == 0, res.stderr
    plan = json.loads(out.read_text())
    assert plan["tensors"]["token_embd.weight"] == "Q8_0"     # tied: the output layer is token_embd
    assert all(f == "Q5_0" for n, f in plan["tensors"].items() if "attn_k" in n)
    assert plan["provenance"]["pins"]["output_tensor_type"] == "Q8_0"
    assert plan["provenance"]["pins"]["tensors"]["token_embd.weight"] == "Q8_0"


@pytest.mark.parametrize("extra,needle", [
    (["--tensor-type", "attn_q=Q4_K"], "needs rows divisible by 256"),
    (["--tensor-type", "nothing_here=Q8_0"], "matches no quantizable tensor"),
    (["--output-tensor-type", "Q8_0", "--token-embedding-type", "Q5_0"], "ties its output layer"),
    (["--tensor-type", "blk=Q8_0"], "budget infeasible with the pins"),
])
def test_cli_bad_pins_one_line(src, tmp_path, extra, needle):
    an = synthetic_analysis(src, tmp_path / "analysis.json")
    res = run_cli("plan", "smollm2-135m", "-a", an, "--bpw", "4.6", "-o", tmp_path / "p.json", *extra)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], res.stderr
    assert not (tmp_path / "p.json").exists()


def test_cli_sweep_prints_no_solver_lines_and_writes_json_only_when_asked(src, tmp_path):
    an = synthetic_analysis(src, tmp_path / "analysis.json")
    out = tmp_path / "sub" / "plan.json"
    res = run_cli("plan", "smollm2-135m", "-a", an, "-o", out, "--sweep")
    assert res.returncode == 0, res.stderr
    assert "Pareto sweep" in res.stdout
    for noise in ("HiGHS", "Running", "Presolv", "Solving", "MIP", "Coefficient"):
        assert noise not in res.stdout + res.stderr
    assert not (tmp_path / "sub").exists()                    # no sweep.json, no plan without a budget
    sj = tmp_path / "curve.json"
    res = run_cli("plan", "smollm2-135m", "-a", an, "-o", out, "--sweep", "--sweep-json", sj, "--bpw", "5")
    assert res.returncode == 0, res.stderr
    assert json.loads(sj.read_text())[0]["bytes"] > 0 and out.exists()
    assert not (out.parent / "sweep.json").exists()
