"""Bit plan format, llama-quantize tensor-type files, imatrix files, and CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tasa_edge.errors import TasaError
from tasa_edge.imatrix import ImatrixStats, load_imatrix, save_legacy_dat
from tasa_edge.plan import BitPlan, read_tensor_type_file, write_tensor_type_file


def run_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "tasa_edge.cli", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, env={**__import__("os").environ, "TASA_NO_PROGRESS": "1"},
    )


def assert_one_line_error(res, *needles):
    assert res.returncode != 0
    assert "Traceback" not in res.stderr, res.stderr
    lines = [l for l in res.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_uniform_plan_respects_llama_fallback(smollm):
    plan = BitPlan.uniform(smollm, "Q4_K")
    # SmolLM2 d=576: 576-column tensors cannot hold 256-blocks -> llama.cpp's Q5_0; ffn_down (1536) keeps Q4_K
    assert plan.tensors["blk.0.attn_q.weight"] == "Q5_0"
    assert plan.tensors["blk.0.ffn_down.weight"] == "Q4_K"
    plan.validate(smollm)
    n = smollm.n_params
    assert plan.predicted["bytes"] > 0 and 4.0 < plan.predicted["bpw"] < 6.5
    assert abs(plan.predicted["bpw"] - 8 * plan.predicted["bytes"] / n) < 1e-9


def test_plan_json_roundtrip(tmp_path, smollm):
    plan = BitPlan.uniform(smollm, "Q8_0")
    plan.budget = {"bpw": 8.5}
    p = tmp_path / "plan.json"
    plan.save(p)
    back = BitPlan.load(p)
    assert back.tensors == plan.tensors and back.budget == plan.budget
    assert back.model["fingerprint"] == smollm.fingerprint
    d = json.loads(p.read_text())
    assert d["format"] == "tasa-edge/bitplan" and d["version"] == 1


def test_plan_schema_validates_real_plan(tmp_path, smollm):
    jsonschema = pytest.importorskip("jsonschema")
    from importlib.resources import files

    schema = json.loads(files("tasa_edge").joinpath("schemas/bitplan.v1.json").read_text())
    jsonschema.validate(BitPlan.uniform(smollm, "Q6_K").to_dict(), schema)


def test_validation_errors(smollm):
    good = BitPlan.uniform(smollm, "Q8_0")
    cases = [
        ({**good.tensors, "blk.99.attn_q.weight": "Q8_0"}, "unknown tensor"),
        ({**good.tensors, "blk.0.attn_q.weight": "Q4_K"}, "needs rows divisible by 256"),
        ({**good.tensors, "blk.0.ffn_down.weight": "IQ2_XXS"}, "requires an importance matrix"),
        ({**good.tensors, "blk.0.attn_q.weight": "Q9_9"}, "unknown GGUF tensor type"),
        ({k: v for k, v in good.tensors.items() if k != "output.weight" and k != "blk.3.ffn_up.weight"}, "does not cover"),
    ]
    for tensors, msg in cases:
        bad = BitPlan("gguf", good.model, tensors)
        with pytest.raises(TasaError, match=msg):
            bad.validate(smollm)
    other = BitPlan("gguf", {**good.model, "fingerprint": "sha256:deadbeef"}, good.tensors)
    with pytest.raises(TasaError, match="plan is for model"):
        other.validate(smollm)


def test_tensor_type_file_roundtrip(tmp_path, smollm):
    plan = BitPlan.uniform(smollm, "Q5_0")
    plan.tensors["blk.7.ffn_down.weight"] = "Q3_K"
    f = tmp_path / "types.txt"
    write_tensor_type_file(plan, f)
    assert r"blk\.7\.ffn_down\.weight=q3_k" in f.read_text().splitlines()
    back = read_tensor_type_file(f, smollm)
    assert back.tensors == plan.tensors
    # llama-quantize style regex rules, first match wins
    g = tmp_path / "rules.txt"
    g.write_text("# comment\nffn_down=q6_k\nattn_.*=q8_0\n")
    rp = read_tensor_type_file(g, smollm, default="Q5_0")
    assert rp.tensors["blk.1.ffn_down.weight"] == "Q6_K"
    assert rp.tensors["blk.1.attn_v.weight"] == "Q8_0"
    assert rp.tensors["blk.1.ffn_up.weight"] == "Q5_0"
    with pytest.raises(TasaError, match="no rule matches"):
        read_tensor_type_file(g, smollm)
    h = tmp_path / "bad.txt"
    h.write_text("ffn_down q6_k\n")
    with pytest.raises(TasaError, match=r"bad.txt:1"):
        read_tensor_type_file(h, smollm)


def test_imatrix_gguf_and_dat_roundtrip(tmp_path):
    rng = np.random.default_rng(1)
    st = ImatrixStats(datasets=["calib.txt"], chunk_count=7, chunk_size=512)
    for i in range(3):
        st.add(f"blk.{i}.ffn_down.weight", rng.random(64) * 5, 10)
        st.add(f"blk.{i}.ffn_down.weight", rng.random(64) * 5, 30)
    st.save(tmp_path / "imatrix.gguf")
    back = load_imatrix(tmp_path / "imatrix.gguf")
    assert back.names() == st.names() and back.chunk_count == 7 and back.datasets == ["calib.txt"]
    for n in st.names():
        np.testing.assert_allclose(back.means()[n], st.means()[n], rtol=1e-6)
        assert back.counts[n] == 40
    save_legacy_dat(st, tmp_path / "imatrix.dat")
    dat = load_imatrix(tmp_path / "imatrix.dat")
    for n in st.names():
        np.testing.assert_allclose(dat.means()[n], st.means()[n], rtol=1e-5)
    (tmp_path / "junk.dat").write_bytes(b"\xff\xff\xff\x7f junk")
    with pytest.raises(TasaError, match="imatrix"):
        load_imatrix(tmp_path / "junk.dat")


# ---------------------------------------------------------------------------- CLI
def test_cli_help():
    res = run_cli("--help")
    assert res.returncode == 0
    for cmd in ("export", "inspect", "baseline"):
        assert cmd in res.stdout
    res = run_cli("export", "--help")
    assert res.returncode == 0 and "--plan" in res.stdout


def _plan_file(tmp_path, smollm, mutate=None, name="plan.json"):
    plan = BitPlan.uniform(smollm, "Q8_0")
    d = plan.to_dict()
    if mutate:
        mutate(d)
    p = tmp_path / name
    p.write_text(json.dumps(d))
    return p


@pytest.mark.parametrize(
    "mutate,needle",
    [
        (lambda d: d["tensors"].__setitem__("blk.42.attn_q.weight", "Q8_0"), "unknown tensor"),
        (lambda d: d["tensors"].__setitem__("blk.0.attn_k.weight", "Q4_K"), "needs rows divisible by 256"),
        (lambda d: d["tensors"].__setitem__("blk.0.ffn_down.weight", "IQ2_XS"), "requires an importance matrix"),
        (lambda d: d["model"].__setitem__("fingerprint", "sha256:0123"), "plan is for model"),
        (lambda d: d.__setitem__("version", 99), "unsupported plan version"),
    ],
)
def test_cli_bad_plan_one_line_error_no_output(tmp_path, smollm, smollm_path, mutate, needle):
    plan = _plan_file(tmp_path, smollm, mutate)
    out = tmp_path / "out.gguf"
    res = run_cli("export", smollm_path, "--plan", plan, "-o", out)
    assert_one_line_error(res, needle)
    assert not out.exists()
    assert not list(tmp_path.glob(".out.gguf*"))


def test_cli_other_bad_inputs(tmp_path, smollm_path):
    out = tmp_path / "o.gguf"
    assert_one_line_error(run_cli("export", tmp_path / "nope.gguf", "-t", "Q8_0", "-o", out), "model not found")
    (tmp_path / "bad.json").write_text("{not json")
    assert_one_line_error(run_cli("export", smollm_path, "--plan", tmp_path / "bad.json", "-o", out), "not valid JSON")
    assert_one_line_error(run_cli("export", smollm_path, "-t", "Q7_X", "-o", out), "unknown GGUF tensor type")
    assert_one_line_error(run_cli("export", smollm_path, "-o", out), "exactly one of")
    (tmp_path / "x.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    assert_one_line_error(run_cli("export", tmp_path / "x.gguf", "-t", "Q8_0", "-o", out), "cannot read GGUF")
    assert_one_line_error(run_cli("baseline", smollm_path, "--ftype", "Q4_Z", "-o", out), "unknown llama.cpp ftype")
    assert not out.exists()
    an = tmp_path / "an"
    assert_one_line_error(run_cli("analyze", smollm_path, "--fisher-dtype", "float16", "-o", an), "--fisher-dtype must be")
    assert not an.exists()


def test_cli_inspect_plan_and_gguf(tmp_path, smollm, smollm_path):
    plan = _plan_file(tmp_path, smollm)
    res = run_cli("inspect", plan, "--model", smollm_path, "--json")
    assert res.returncode == 0, res.stderr
    rep = json.loads(res.stdout)
    assert rep["by_type"]["Q8_0"]["tensors"] == len(smollm.quantizable)
    res = run_cli("inspect", smollm_path, "--summary")
    assert res.returncode == 0 and "bits/weight" in res.stdout and "Q4_1" in res.stdout


@pytest.mark.slow
def test_plan_exports_with_the_imatrix_it_was_scored_with(tmp_path, smollm, smollm_path):
    """A plan that records its imatrix exports the same bytes with or without --imatrix (any copy
    of the file); another imatrix is refused unless forced; a plan scored without one refuses one."""
    import shutil

    from tasa_edge.imatrix import imatrix_ref

    rng = np.random.default_rng(0)
    paths = []
    for k in range(2):
        im = ImatrixStats(datasets=[f"set{k}"])
        for t in smollm.quantizable:
            if t.name.startswith("blk."):
                im.add(t.name, rng.uniform(0.1, 4.0, t.ne0), 64)
        paths.append(tmp_path / f"imatrix{k}.gguf")
        im.save(paths[-1])
    scored, other = paths
    plan = BitPlan.uniform(smollm, "Q4_K")
    plan.imatrix, plan.imatrix_recorded = imatrix_ref(scored), True
    plan.save(tmp_path / "plan.json")
    assert json.loads((tmp_path / "plan.json").read_text())["imatrix"]["sha256"] == plan.imatrix["sha256"]

    def export(name, *extra):
        return run_cli("export", smollm_path, "--plan", tmp_path / "plan.json", "-o", tmp_path / name, *extra)

    assert export("default.gguf").returncode == 0
    copy = tmp_path / "elsewhere" / "copy.gguf"
    copy.parent.mkdir()
    shutil.copy(scored, copy)
    assert export("given.gguf", "--imatrix", scored).returncode == 0
    assert export("copy.gguf", "--imatrix", copy).returncode == 0
    want = (tmp_path / "default.gguf").read_bytes()
    assert (tmp_path / "given.gguf").read_bytes() == want
    assert (tmp_path / "copy.gguf").read_bytes() == want

    assert_one_line_error(export("other.gguf", "--imatrix", other), "not the importance matrix the plan was scored with")
    assert not (tmp_path / "other.gguf").exists()
    assert export("forced.gguf", "--imatrix", other, "--force-imatrix").returncode == 0
    assert (tmp_path / "forced.gguf").read_bytes() != want

    plan.imatrix = None
    plan.save(tmp_path / "plan.json")
    assert_one_line_error(export("none.gguf", "--imatrix", scored), "scored without an importance matrix")
    assert not (tmp_path / "none.gguf").exists()
    assert export("none.gguf").returncode == 0
    assert (tmp_path / "none.gguf").read_bytes() != want

    plan.imatrix = imatrix_ref(copy)
    plan.save(tmp_path / "plan.json")
    copy.unlink()
    assert_one_line_error(export("gone.gguf"), "is missing")


def test_an_analysis_folder_moved_elsewhere_finds_its_imatrix_beside_it(tmp_path, smollm):
    """An analysis copied to another machine or a committed folder (benchmarks/evidence' state)
    records its imatrix by absolute path; loaded from the copy, it takes the imatrix beside it."""
    import shutil

    from synthetic import write_analysis
    from tasa_edge.imatrix import imatrix_ref
    from tasa_edge.results import Analysis

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    names = [t.name for t in smollm.quantizable][:2]
    table = {n: {"Q4_0": 1.0, "Q8_0": 0.1} for n in names}
    write_analysis(smollm, a / "analysis.json", table, table, {n: {"Q4_0": 10, "Q8_0": 20} for n in names})
    st = ImatrixStats(datasets=["calib.txt"], chunk_count=1, chunk_size=8)
    st.add(names[0], np.ones(smollm.tensors[names[0]].shape[0]), 4)
    st.save(a / "imatrix.gguf")
    d = json.loads((a / "analysis.json").read_text())
    d["imatrix"] = imatrix_ref(a / "imatrix.gguf")
    (a / "analysis.json").write_text(json.dumps(d))
    assert Analysis.load(a / "analysis.json").imatrix_path == str((a / "imatrix.gguf").resolve())
    shutil.copytree(a, b)
    shutil.rmtree(a)
    moved = Analysis.load(b / "analysis.json")
    assert moved.imatrix_path == str((b / "imatrix.gguf").resolve())
    assert moved.imatrix["sha256"] == d["imatrix"]["sha256"]
