"""Interoperability with llama.cpp's own tools (``make tools``): llama-quantize reads our
tensor-type files and imatrix files and writes the same bytes as our exporter, llama-imatrix
files are read by ``tasa-edge export --imatrix``, llama-perplexity's KL-divergence agrees with the
bench's, and the local bench measures speed with llama-bench.

Skipped (with the reason) when the tools are absent; CI builds them (``.ci/run`` runs ``make tools``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import gguf_tensors

from devices import llama_tools
from tasa_edge.errors import TasaError

#: Models that llama-cpp-python runs in batches here use a type without ggml AMX kernels: ggml's AMX
#: matmul (Q4_0/Q4_1/Q8_0/Q4_K/Q5_K/Q6_K/IQ4_XS) crashes on VMs that list AMX without granting its
#: tile state (SIGSEGV in ggml_backend_amx_mul_mat of llama-cpp-python's -march=native library).
NO_AMX_TYPE = "IQ4_NL"
MISSING = llama_tools.missing_tools()
needs_tools = pytest.mark.skipif(
    bool(MISSING), reason=f"llama.cpp tools not built ({', '.join(MISSING)} missing): run `make tools`")


def _run(args, **kw):
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True, errors="replace", timeout=900, **kw)
    assert p.returncode == 0, f"{args[0]} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.fixture(scope="module")
def f32_src(smollm_f32):
    """The F32 reference GGUF as our exporter's source: both quantizers start from the same floats."""
    from tasa_edge.model import ModelSource

    return ModelSource.open(smollm_f32)


def _mixed_plan(src):
    """Several types per shape class (K/IQ4_XS types need ne0 % 256 == 0; SmolLM2's 576-wide rows
    take the 32-blocks)."""
    from tasa_edge.plan import BitPlan, model_block

    wide, narrow = ["Q4_K", "Q6_K", "IQ4_XS", "Q5_K", "Q3_K"], ["Q4_0", "Q5_0", "Q8_0", "Q4_1", "IQ4_NL", "Q5_1"]
    tensors, i = {}, 0
    for t in src.quantizable:
        menu = wide if t.ne0 % 256 == 0 else narrow
        tensors[t.name] = menu[i % len(menu)]
        i += 1
    plan = BitPlan("gguf", model_block(src), tensors, provenance={"method": "test mix"})
    plan.stamp(src)
    return plan


def _llama_quantize(src_gguf, tt_file, out, imatrix=None):
    args = [llama_tools.require_tool("llama-quantize")]
    if imatrix is not None:
        args += ["--imatrix", imatrix]
    # base type Q8_0: a quantized default makes llama-quantize apply the tensor-type overrides
    _run(args + ["--tensor-type-file", tt_file, src_gguf, out, "Q8_0", "2"])
    return out


def _assert_same_tensors(ours, theirs):
    a, b = gguf_tensors(ours), gguf_tensors(theirs)
    assert set(a) == set(b)
    wrong_type = {n: (a[n][0], b[n][0]) for n in a if a[n][0] != b[n][0]}
    assert not wrong_type, f"types differ: {dict(list(wrong_type.items())[:5])}"
    differ = [n for n in a if a[n][1] != b[n][1]]
    assert not differ, f"{len(differ)} tensors differ in bytes, e.g. {differ[:3]}"
    return a


# ---------------------------------------------------------------------------------- locating
def test_tools_are_found_through_env_dir_before_cache_and_skipped_when_they_do_not_run(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "llama-bench"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'version: b9999-deadbee (build 9999, commit deadbee)'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("TASA_LLAMA_BIN_DIR", str(fake.parent))
    assert llama_tools.find_tool("llama-bench") == fake.resolve()
    assert llama_tools.build_info(fake).commit == "deadbee"
    # a device binary (here: a file that cannot execute) in the same directory is passed over
    fake.write_text("\x7fELF not for this machine")
    llama_tools._runs_here.cache_clear()
    monkeypatch.setenv("TASA_EDGE_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert llama_tools.find_tool("llama-bench") is None
    assert "llama-bench" in llama_tools.missing_tools()


def test_forced_llama_bench_backend_without_the_tool_is_refused(tmp_path, monkeypatch):
    from devices.harness import bench

    monkeypatch.setenv("TASA_LLAMA_BIN_DIR", str(tmp_path))
    monkeypatch.setenv("TASA_EDGE_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + b"\0" * 60)
    with pytest.raises(TasaError, match="llama-bench not found.*make tools"):
        bench([f], speed_backend="llama-bench", out_dir=tmp_path / "out", show_progress=False)
    with pytest.raises(TasaError, match="unknown speed backend"):
        bench([f], speed_backend="fast", out_dir=tmp_path / "out", show_progress=False)


@needs_tools
def test_tools_report_the_commit_llama_cpp_python_vendors():
    rep = llama_tools.tools_report()
    assert all(rep["tools"][n] for n in llama_tools.TOOLS)
    commit = rep["build"]["commit"]
    assert commit and commit != "unknown"
    cache = rep.get("cache_build")
    if cache:  # built by `make tools`: same llama-cpp-python version as installed, same commit
        assert cache["llama_cpp_python"] == rep["llama_cpp_python"] and cache["llama_cpp_commit"] == commit


@pytest.mark.skipif(not (llama_tools.cache_prefix() / "BUILD_INFO.json").is_file(), reason="`make tools` has not run")
def test_make_tools_again_is_a_cache_hit():
    root = Path(__file__).resolve().parent.parent
    t0 = time.perf_counter()
    p = _run(["bash", root / "scripts" / "build_llama_tools.sh"], env={**os.environ, "PY": sys.executable})
    assert "(cached)" in p.stdout and time.perf_counter() - t0 < 30
    assert str(llama_tools.cache_prefix() / "bin") in p.stdout


# ---------------------------------------------------------------------------------- llama-quantize
@pytest.mark.slow
@needs_tools
def test_llama_quantize_with_our_tensor_type_file_writes_our_bytes(tmp_path, f32_src, smollm_f32):
    from exporters.gguf_export import export_gguf
    from tasa_edge.plan import write_tensor_type_file

    plan = _mixed_plan(f32_src)
    assert len(set(plan.tensors.values())) >= 8
    tt = tmp_path / "types.txt"
    write_tensor_type_file(plan, tt)
    ours = export_gguf(f32_src, plan, tmp_path / "ours.gguf", show_progress=False).path
    theirs = _llama_quantize(smollm_f32, tt, tmp_path / "theirs.gguf")
    a = _assert_same_tensors(ours, theirs)
    assert {a[n][0] for n in plan.tensors} == set(plan.tensors.values())


@pytest.mark.slow
@needs_tools
def test_llama_quantize_reads_our_imatrix_and_writes_our_bytes(tmp_path, f32_src, smollm_f32):
    from exporters.gguf_export import export_gguf
    from tasa_edge.imatrix import ImatrixStats, load_imatrix
    from tasa_edge.plan import write_tensor_type_file

    plan = _mixed_plan(f32_src)
    tt = tmp_path / "types.txt"
    write_tensor_type_file(plan, tt)
    rng = np.random.default_rng(0)
    st = ImatrixStats(datasets=["test"], chunk_count=3, chunk_size=64)
    for t in f32_src.quantizable:
        if t.name != "token_embd.weight":  # llama.cpp has no activations entering the embedding lookup
            st.add(t.name, rng.gamma(0.5, 2.0, t.ne0) * 192, 192)
    im_path = tmp_path / "imatrix.gguf"
    st.save(im_path)
    im = load_imatrix(im_path)
    ours = export_gguf(f32_src, plan, tmp_path / "ours.gguf", imatrix=im, show_progress=False).path
    theirs = _llama_quantize(smollm_f32, tt, tmp_path / "theirs.gguf", imatrix=im_path)
    a = _assert_same_tensors(ours, theirs)
    # and the imatrix mattered: without it the weighted types come out differently
    plain = gguf_tensors(export_gguf(f32_src, plan, tmp_path / "plain.gguf", show_progress=False).path)
    changed = [n for n in st.sums if plain[n][1] != a[n][1]]
    assert len(changed) > len(st.sums) // 2


@pytest.mark.slow
@needs_tools
def test_llama_imatrix_output_is_read_and_exported_with(tmp_path, f32_src, smollm_f32, smollm_path):
    from typer.testing import CliRunner

    from tasa_edge.cli import app
    from tasa_edge.data import load_general
    from tasa_edge.imatrix import load_imatrix
    from tasa_edge.plan import BitPlan, write_tensor_type_file

    text = tmp_path / "calib.txt"
    text.write_text("\n\n".join(s.text for s in load_general("calib")[:8]), encoding="utf-8")
    im_path = tmp_path / "llama-imatrix.gguf"
    _run([llama_tools.require_tool("llama-imatrix"), "-m", smollm_f32, "-f", text, "-o", im_path,
          "-c", "128", "--chunks", "3", "-t", "2", "--no-ppl"])
    st = load_imatrix(im_path)
    assert st.chunk_count == 3 and st.chunk_size == 128
    quant = {t.name for t in f32_src.quantizable}
    assert len(st.names() & quant) >= len(quant) - 1  # every matmul weight (not the embedding lookup)
    assert all(st.counts[n] > 0 and np.all(st.sums[n] >= 0) for n in st.names())

    plan = BitPlan.uniform(f32_src, "IQ4_XS")
    plan_path, tt = tmp_path / "plan.json", tmp_path / "types.txt"
    plan.save(plan_path)
    write_tensor_type_file(plan, tt)
    out = tmp_path / "ours.gguf"
    res = CliRunner().invoke(app, ["export", str(smollm_f32), "--plan", str(plan_path), "--imatrix", str(im_path),
                                   "-o", str(out)])
    assert res.exit_code == 0, f"{res.output}\n{res.exception!r}"
    theirs = _llama_quantize(smollm_f32, tt, tmp_path / "theirs.gguf", imatrix=im_path)
    _assert_same_tensors(out, theirs)


# ---------------------------------------------------------------------------------- llama-perplexity
@pytest.mark.slow
@needs_tools
def test_llama_perplexity_kld_agrees_with_the_bench_kld_on_the_same_positions(tmp_path, f32_src, smollm_f32):
    """Same file, same text, same scored positions: llama-perplexity chunks the tokenised text into
    ``-c`` windows, puts BOS first in each and scores the second half; the bench's pipeline
    (reference log-prob store, per-model scoring child, aggregate) is fed exactly those windows.

    What still differs, hence tolerances rather than equality: llama-perplexity stores the base
    log-probs as uint16 steps of (max-min)/65535 over at most 16 nats and drops every base
    probability below e^-16 from the KLD sum; the bench stores float16 log-probs and sums the whole
    vocabulary; the models run in two builds of the same llama.cpp commit (the tools, without AMX,
    vs llama-cpp-python's library), so logits differ in the last bits. Measured on this test:
    KLD 0.29640 vs 0.29602 (0.13 %), top-1 0.695 vs 0.687 (its argmax of the uint16 base breaks
    near-ties differently). Tolerances: KLD 2 % relative, PPL 1 %, top-1 0.02 absolute."""
    from devices import harness
    from devices.remote import parse_perplexity
    from exporters.gguf_export import export_gguf
    from tasa_edge.data import load_general
    from tasa_edge.plan import BitPlan

    q = export_gguf(f32_src, BitPlan.uniform(f32_src, NO_AMX_TYPE), tmp_path / "iq4_nl.gguf", show_progress=False).path
    n_ctx = 128
    text = tmp_path / "eval.txt"
    text.write_text("\n\n".join(s.text for s in load_general("eval")[:6]), encoding="utf-8")
    ppl = llama_tools.require_tool("llama-perplexity")
    base = tmp_path / "base.kld"
    common = ["-c", n_ctx, "-b", n_ctx, "-t", "2"]
    _run([ppl, "-m", smollm_f32, "-f", text, "--kl-divergence-base", base, *common])
    p = _run([ppl, "-m", q, "--kl-divergence-base", base, "--kl-divergence", *common])
    theirs = parse_perplexity(p.stdout + "\n" + p.stderr, kld=True)

    tok = harness.Tokenizer("gguf", smollm_f32)
    try:  # llama-perplexity: common_tokenize(text, add_special=true, parse_special=false)
        ids = tok(text.read_text(encoding="utf-8"))
        add_bos = len(tok("")) > 0
        bos, vocab = tok._llm.token_bos(), tok.vocab
    finally:
        tok.close()
    n_chunk = len(ids) // n_ctx
    assert n_chunk >= 3
    windows = []
    for c in range(n_chunk):
        w = list(ids[c * n_ctx:(c + 1) * n_ctx])
        if add_bos:
            w[0] = bos  # as llama-perplexity does for the first token of every chunk
        windows.append((w, n_ctx // 2 + 1))  # logits n_ctx/2 .. n_ctx-2 predict tokens n_ctx/2+1 ..
    work = tmp_path / "work"
    work.mkdir()
    chunks = harness.write_chunks({"general": windows}, vocab, work)
    ref = harness.run_child({"kind": "reference", "path": str(smollm_f32), "model_kind": "gguf",
                             "chunks": [str(c) for _, c, _ in chunks]}, work, "ref", 2)
    assert ref["ok"], ref
    scores = [work / f"q-{c.stem}.scores.npz" for _, c, _ in chunks]
    res = harness.run_child({"kind": "model", "path": str(q), "model_kind": "gguf",
                             "score": [[str(c), str(s)] for (_, c, _), s in zip(chunks, scores)]}, work, "q", 2)
    assert res["ok"], res
    ours = harness.aggregate(scores)
    assert ours["n"] == n_chunk * (n_ctx - 1 - n_ctx // 2)
    msg = (f"{ours['n']} positions: bench KLD {ours['kld']:.6f} vs llama-perplexity {theirs['kld']:.6f} "
           f"± {theirs.get('kld_se', 0):.6f}")
    print("\n" + msg, f"top-1 {ours['top1']:.4f} vs {theirs.get('top1', float('nan')):.4f}")
    assert theirs["kld"] > 0.005  # a real difference to compare, not two zeros
    assert ours["kld"] == pytest.approx(theirs["kld"], rel=0.02), msg
    assert ours["top1"] == pytest.approx(theirs["top1"], abs=0.02), msg
    assert ours["ppl"] == pytest.approx(theirs["ppl"], rel=0.01), msg


# ---------------------------------------------------------------------------------- llama-bench
@pytest.mark.slow
@needs_tools
def test_local_bench_measures_gguf_speed_with_llama_bench(tmp_path, f32_src, monkeypatch):
    from devices import harness
    from exporters.gguf_export import export_gguf
    from tasa_edge.plan import BitPlan

    q = export_gguf(f32_src, BitPlan.uniform(f32_src, NO_AMX_TYPE), tmp_path / "iq4_nl.gguf", show_progress=False).path
    tiny = harness.Size("tiny", pp=16, tg=4, reps=1, general_docs=1, general_tokens=32, task_examples=1,
                        gsm8k_examples=0, shots=0, max_gen_tokens=0)
    rep = harness.bench([q], size=tiny, threads=1, n_prompt=24, n_gen=6, reps=2, out_dir=tmp_path / "out",
                        show_progress=False)
    sb = rep["target"]["speed_backend"]
    assert sb["gguf"] == "llama-bench" and sb["build"]["commit"]
    e = rep["models"][0]
    assert e["error"] is None
    sp = e["speed"]
    assert sp["backend"] == "llama-bench" and sp["build_commit"] == sb["build"]["commit"]
    assert sp["threads"] == 1 and sp["reps"] == 2
    assert (sp["pp"]["n_tokens"], sp["tg"]["n_tokens"]) == (24, 6) and sp["pp"]["ts_mean"] > 0
    assert len(sp["tg"]["samples_ns"]) == 2
    assert e["peak_rss_bytes"] > q.stat().st_size / 2 and e["load_s"] > 0  # still the worker's
    assert "GGUF speed measured by llama-bench" in (tmp_path / "out" / "bench.md").read_text()

    rep2 = harness.bench([q], size=tiny, threads=1, speed_backend="llama-cpp-python", out_dir=tmp_path / "out2",
                         show_progress=False)
    assert rep2["target"]["speed_backend"]["gguf"] == "llama-cpp-python"
    assert rep2["models"][0]["speed"]["backend"].startswith("llama-cpp-python")
    assert rep2["models"][0]["speed"]["pp"]["n_tokens"] == 16
    json.dumps(rep)
