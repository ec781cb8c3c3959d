"""``source``: a plan value that keeps the input GGUF's bytes of a tensor unchanged.

SmolLM2's packaged GGUF is quantized (Q4_1 matrices, a Q8_0 token embedding), so ``source`` keeps
real quantized bytes; its F32 reference (same fingerprint) is the "other file of the same model"."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import gguf_tensors
from synthetic import write_analysis

from exporters.gguf_export import export_gguf
from tasa_edge import formats
from tasa_edge.analysis import format_menu
from tasa_edge.errors import TasaError
from tasa_edge.formats.base import SOURCE
from tasa_edge.inspect import inspect_path
from tasa_edge.llama_run import generate
from tasa_edge.model import ModelSource
from tasa_edge.plan import BitPlan, read_tensor_type_file, write_tensor_type_file
from tasa_edge.planner import Pins, make_plan, sweep
from tasa_edge.results import AnalysisConfig

GGUF = formats.get("gguf")


def test_target_semantics_without_a_model():
    assert GGUF.parse("Source") == SOURCE and GGUF.fit("source", (8, 576)) == SOURCE
    assert GGUF.misfit(SOURCE, (8, 576)) is None and not GGUF.requires_imatrix(SOURCE)
    assert GGUF.resolve(SOURCE, "Q4_K") == "Q4_K" and GGUF.resolve("Q8_0", "Q4_K") == "Q8_0"
    with pytest.raises(TasaError, match="cannot size or write"):
        GGUF.resolve(SOURCE, "TQ1_0")
    with pytest.raises(TasaError, match="tensor_nbytes"):
        GGUF.nbytes(SOURCE, (8, 576))
    # the normaliser is never the zero-error source option, unless it is the only one
    assert GGUF.reference_of({SOURCE: 10, "Q5_0": 20}) == "Q5_0"
    assert GGUF.reference_of({SOURCE: 10}) == SOURCE
    with pytest.raises(TasaError, match="GGUF plans only"):
        formats.get("onnx").parse("source")


@pytest.mark.slow
def test_all_source_plan_reproduces_input_and_inspect(tmp_path, smollm, smollm_path):
    plan = BitPlan.uniform(smollm, "source")
    assert set(plan.tensors.values()) == {SOURCE} and plan.types_used() == {SOURCE: 211}
    assert plan.provenance["source_types"]["token_embd.weight"] == "Q8_0"
    assert plan.predicted["quantized_bytes"] == sum(
        GGUF.nbytes(t.src_type, t.shape) for t in smollm.quantizable)
    out = tmp_path / "same.gguf"
    res = export_gguf(smollm, plan, out, show_progress=False)
    assert res.types == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    got, want = gguf_tensors(out), gguf_tensors(smollm_path)
    assert got == want                       # every tensor: same type, same bytes
    plan.save(tmp_path / "plan.json")
    rep = inspect_path(tmp_path / "plan.json", str(smollm_path))
    assert set(rep["by_type"]) == {"F32", "Q4_1 (source)", "Q8_0 (source)"}
    assert rep["bytes"] == sum(len(b) for _, b in want.values())


@pytest.mark.slow
def test_mixed_source_plan_byte_identity_loads_and_generates(tmp_path, smollm, smollm_path, smollm_f32):
    tensors = {t.name: (SOURCE if i % 2 == 0 else "Q8_0") for i, t in enumerate(smollm.quantizable)}
    plan = BitPlan("gguf", BitPlan.uniform(smollm, "Q8_0").model, tensors, provenance={"method": "test"})
    plan.stamp(smollm)
    out = tmp_path / "mixed.gguf"
    export_gguf(smollm, plan, out, show_progress=False)
    got, want = gguf_tensors(out), gguf_tensors(smollm_path)
    for name, fmt in tensors.items():
        if fmt == SOURCE:
            assert got[name] == want[name], name
        else:
            assert got[name][0] == "Q8_0"
    text = generate(out, "The capital of France is", max_tokens=8)
    assert isinstance(text, str) and text.strip()
    # the plan round-trips through JSON (schema) and refuses the F32 reference: same fingerprint,
    # but its tensors are not the Q4_1 / Q8_0 bytes the plan keeps
    plan.save(tmp_path / "p.json")
    back = BitPlan.load(tmp_path / "p.json")
    back.validate(smollm)
    ref = ModelSource.open(smollm_f32)
    assert ref.fingerprint == smollm.fingerprint
    with pytest.raises(TasaError, match="stores it as F32"):
        back.validate(ref)
    # a hand-written plan without the record keeps whatever the file stores (here F32)
    bare = BitPlan.from_dict({k: v for k, v in plan.to_dict().items()} | {"provenance": {}})
    bare.validate(ref)


@pytest.mark.slow
def test_tensor_type_file_names_the_source_type_and_reads_source(tmp_path, smollm):
    plan = BitPlan.uniform(smollm, "Q8_0")
    plan.tensors["token_embd.weight"] = SOURCE
    plan.tensors["blk.0.attn_v.weight"] = SOURCE
    plan.stamp(smollm)
    tt = tmp_path / "types.txt"
    write_tensor_type_file(plan, tt)
    lines = dict(ln.split("=") for ln in tt.read_text().splitlines())
    assert lines[r"token_embd\.weight"] == "q8_0" and lines[r"blk\.0\.attn_v\.weight"] == "q4_1"
    assert "source" not in tt.read_text()                 # llama-quantize does not know it
    del plan.provenance["source_types"]
    with pytest.raises(TasaError, match="records no source type"):
        write_tensor_type_file(plan, tmp_path / "t2.txt")
    own = tmp_path / "own.txt"
    own.write_text("attn_v=source\ntoken_embd=SOURCE\n.*=q8_0\n")
    back = read_tensor_type_file(own, smollm)
    assert back.tensors["blk.3.attn_v.weight"] == SOURCE and back.tensors["token_embd.weight"] == SOURCE
    assert back.provenance["source_types"]["blk.3.attn_v.weight"] == "Q4_1"
    assert back.types_used() == {"Q8_0": 211 - 31, SOURCE: 31}


def _analysis_with_source(tmp_path, src):
    """A synthetic sensitivity table whose menu includes ``source`` (zero loss, the source's bytes)."""
    ppl, task, nb = {}, {}, {}
    for t in src.quantizable:
        ppl[t.name], task[t.name], nb[t.name] = {}, {}, {}
        for f, loss in (("Q4_0", 1.0), ("Q8_0", 0.01), (SOURCE, 0.0)):
            ppl[t.name][f] = task[t.name][f] = loss
            nb[t.name][f] = GGUF.tensor_nbytes(f, t)
    return write_analysis(src, tmp_path / "analysis.json", ppl, task, nb)


@pytest.mark.slow
def test_menu_pins_sweep_and_planning_with_source(tmp_path, smollm, smollm_f32):
    from tasa_edge.results import Analysis

    menu = format_menu(smollm, AnalysisConfig())
    assert all(SOURCE in fm for fm in menu.values())                # quantized GGUF input: offered
    assert not any(SOURCE in fm for fm in format_menu(smollm, AnalysisConfig(formats=("Q4_0", "Q8_0"))).values())
    ref = ModelSource.open(smollm_f32)
    assert not any(SOURCE in fm for fm in format_menu(ref, AnalysisConfig()).values())   # F32 input: not offered
    with pytest.raises(TasaError, match="GGUF plans only"):
        format_menu(smollm, AnalysisConfig(target="onnx", formats=("int4_b32", "source")))

    an = Analysis.load(_analysis_with_source(tmp_path, smollm))
    # Q4_1 source (5 bits/weight) is smaller than Q8_0 and loses nothing: a roomy budget keeps every source
    plan = make_plan(an, smollm, bpw=9.0)
    assert set(plan.tensors.values()) == {SOURCE} and plan.predicted["loss"] == 0.0
    pinned = make_plan(an, smollm, bpw=9.0, pins=Pins.from_cli(["attn_v=q8_0"], token_embd="source"))
    assert {plan_t for n, plan_t in pinned.tensors.items() if "attn_v" in n} == {"Q8_0"}
    assert pinned.provenance["pins"]["token_embedding_type"] == SOURCE
    # pinning source on an analysis that did not score it: exact source bytes, loss unscored
    an_no = Analysis.load(write_analysis(smollm, tmp_path / "a2.json",
                                         *({t.name: {"Q8_0": 0.01} for t in smollm.quantizable} for _ in range(2)),
                                         {t.name: {"Q8_0": GGUF.nbytes("Q8_0", t.shape)} for t in smollm.quantizable}))
    p2 = make_plan(an_no, smollm, bpw=9.0, pins=Pins.from_cli(["attn_v=source"]))
    assert p2.provenance["pins"]["unscored"] and all(p2.tensors[n] == SOURCE for n in p2.provenance["pins"]["unscored"])
    curve = sweep(an, smollm, points=3)
    assert curve[-1]["types"] == {SOURCE: 211} and curve[-1]["loss"] == 0.0
    assert json.loads(json.dumps(curve))


@pytest.mark.slow
def test_sensitivity_of_source_is_zero_and_its_bytes_are_the_source_tensor(smollm):
    """The sensitivity pass scores ``source`` at zero error and the source tensor's bytes, next to a
    real re-quantized format (the Fisher weighting here is the plain sum of squared errors)."""
    from types import SimpleNamespace

    from tasa_edge.analysis import sensitivities

    class SumFisher:
        def weighted_error(self, name, r0, d2, n):
            return float(d2.sum())

    names = ["token_embd.weight", "blk.0.attn_v.weight"]
    st = SimpleNamespace(fisher={"general": SumFisher(), "task": SumFisher()}, n={"general": 1, "task": 1})
    menu = {n: ["Q8_0", SOURCE] for n in names}
    cache = {n: smollm.read(n) for n in names}
    table = sensitivities(smollm, lambda n, r0, r1: cache[n][r0:r1], st, menu, AnalysisConfig(), None,
                          show_progress=False)
    for n in names:
        info = smollm.tensors[n]
        assert table.ppl[n][SOURCE] == table.task[n][SOURCE] == table.rel_err[n][SOURCE] == 0.0
        assert table.bytes[n][SOURCE] == GGUF.nbytes(info.src_type, info.shape) == len(
            smollm._gguf_tensor(n).data.tobytes())
        assert table.ppl[n]["Q8_0"] > 0 or info.src_type == "Q8_0"      # re-quantizing Q8_0 data to Q8_0 may be exact
    assert table.ppl["blk.0.attn_v.weight"]["Q8_0"] > 0
    assert table.bytes["token_embd.weight"][SOURCE] == table.bytes["token_embd.weight"]["Q8_0"]   # a Q8_0 source


def test_onnx_uniform_source_is_one_line_error(tmp_path):
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "tasa_edge.cli", "export", "smollm2-135m", "--format", "onnx",
                        "--type", "source", "-o", str(tmp_path / "o")], capture_output=True, text=True, cwd=root,
                       env={**os.environ, "PYTHONPATH": str(root), "TASA_NO_PROGRESS": "1"})
    assert r.returncode == 2 and "GGUF plans only" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_all_source_plan_on_a_q4_k_m_source_is_the_source(tmp_path):
    """The motivating case: gemma-3 ships as Q4_K_M (Q4_K, Q6_K, Q5_0, Q8_0 tensors); an all-source
    plan writes those bytes back exactly, and llama.cpp loads and generates with the file."""
    from tasa_edge.zoo import resolve_model

    path = resolve_model("gemma3-270m")
    src = ModelSource.open(path)
    assert {"Q4_K", "Q6_K"} <= {t.src_type for t in src.quantizable}
    out = tmp_path / "gemma-source.gguf"
    export_gguf(src, BitPlan.uniform(src, "source"), out, show_progress=False)
    assert gguf_tensors(out) == gguf_tensors(path)
    assert generate(out, "The capital of France is", max_tokens=6).strip()


@pytest.mark.slow
def test_cli_export_type_source_and_inspect(tmp_path, smollm_path):
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "TASA_NO_PROGRESS": "1"}
    out = tmp_path / "same.gguf"
    r = subprocess.run([sys.executable, "-m", "tasa_edge.cli", "export", "smollm2-135m", "--type", "source",
                        "-o", str(out)], capture_output=True, text=True, cwd=root, env=env)
    assert r.returncode == 0, r.stderr
    assert gguf_tensors(out) == gguf_tensors(smollm_path)
