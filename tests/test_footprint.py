"""The dry-run memory and time model: shapes from a config alone, and predictions that match a
real analysis' measured peak."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tasa_edge import footprint

LLAMA3_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False}


def test_llama3_8b_shapes_from_config_alone(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    sh = footprint.shapes_from_config(tmp_path)
    assert sh.n_params == 8_030_261_248          # LLaMA-3-8B's published parameter count
    assert sh.tensors["blk.0.attn_k.weight"] == (1024, 4096) and "output.weight" in sh.tensors
    assert len(sh.quantizable()) == 32 * 7 + 2


def test_llama3_8b_fits_a_24gb_gpu_with_compact_statistics_only(tmp_path):
    """Compact statistics take tens of MB where the exact ones take 60 GB: with them (and the LM
    head done in vocabulary slices) LLaMA-3-8B fits 24 GB at < 2.5 bytes/param."""
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    sh = footprint.shapes_from_config(tmp_path)
    kw = dict(tokens=192, samples=60, device="cuda", dtype="bfloat16", throughput_flops=100e12, device_memory=24 * 10**9)
    compact = footprint.predict(sh, fisher="factored", **kw)
    assert compact.parts["fisher"] < 50 * 2**20
    assert compact.parts["weights"] == 2 * sh.n_params
    assert compact.fits and compact.peak_bytes / sh.n_params < 2.5
    assert compact.parts["working_set"] > 192 * 128256 * 4        # one float32 logits buffer at least
    # on the CPU the untied token embedding is read by rows, not held
    cpu = footprint.predict(sh, fisher="factored", **{**kw, "device": "cpu"})
    assert cpu.parts["weights"] == 2 * (sh.n_params - 128256 * 4096)
    exact = footprint.predict(sh, fisher="exact", **kw)
    assert not exact.fits and exact.parts["fisher"] == 2 * 4 * sum(r * c for r, c in sh.quantizable().values())
    assert compact.peak_bytes < exact.peak_bytes - 50 * 2**30


def test_layer_checkpointing_trades_one_more_forward_for_the_stacks_activations(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    sh = footprint.shapes_from_config(tmp_path)
    kw = dict(tokens=192, samples=60, device="cuda", dtype="bfloat16", throughput_flops=100e12)
    on, off, auto = (footprint.predict(sh, checkpoint=m, **kw) for m in ("on", "off", "auto"))
    assert on.checkpoint and not off.checkpoint and auto.checkpoint     # 8B at 192 tokens: ~1.6 GB of activations
    layer = footprint.layer_activation_bytes(sh, 192, 2)
    saved = off.parts["working_set"] - on.parts["working_set"]
    assert saved == (sh.n_layer - 1) * layer - sh.n_layer * 192 * sh.d_model * 2
    assert 1.2 < on.flops_per_sample / off.flops_per_sample < 1.4      # one more forward of the layers
    small = footprint.Shapes("llama", 2, 64, 128, 100, 4, 2, 16, True, {})
    assert not footprint.checkpoint_layers(small, 192, 2, "auto") and footprint.checkpoint_layers(small, 192, 2, "on")
    with pytest.raises(footprint.TasaError, match="--checkpoint must be auto, on or off"):
        footprint.checkpoint_layers(small, 192, 2, "sometimes")


def test_gguf_shapes_do_not_parse_the_vocabulary():
    """Absent optional keys (Qwen2's attention.key_length) are answered from the checked header:
    gguf-py's reader, which parses every metadata array (~500 MB for a 152k vocabulary), stays shut."""
    from tasa_edge.model import ModelSource
    from tasa_edge.zoo import resolve_model

    src = ModelSource.open(resolve_model("smollm2-135m"))
    sh = footprint.shapes_from_source(src)
    assert src.raw_gguf_field(f"{src.arch}.attention.key_length") is None and sh.head_dim == 64
    assert src._reader is None


def test_dry_run_cli_needs_no_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    r = subprocess.run([sys.executable, "-m", "tasa_edge.cli", "analyze", str(tmp_path), "--dry-run", "--device", "cuda",
                        "--device-memory", "24GB", "--device-tflops", "80"], capture_output=True, text=True,
                       env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    assert "8.03B params" in r.stdout and "fits in 22.4 GiB" in r.stdout and "80.00 TFLOP/s given" in r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]     # wrote nothing


@pytest.mark.slow
@pytest.mark.parametrize("model", ["smollm2-135m", "gemma3-270m"])
def test_packaged_model_analysis_peak_matches_the_prediction_and_stays_small(tmp_path, model):
    """A real small analysis in its own process: measured peak RSS within 20% of the dry-run
    prediction (SmolLM2's under 1.5 GB), and the gradient cache under 54 MB."""
    from tasa_edge.model import ModelSource
    from tasa_edge.zoo import resolve_model

    from tasa_edge.torch_model import hf_dir_for

    # the one-time GGUF -> HF conversion (cached) is not part of the analysis' footprint
    hf_dir_for(ModelSource.open(resolve_model(model)), show_progress=False)
    out = tmp_path / "an"
    args = ["--n-general", "4", "--n-task", "4", "--n-target", "2", "--max-tokens", "128"]
    r = subprocess.run([sys.executable, "-m", "tasa_edge.cli", "analyze", model, "-o", str(out), *args],
                       capture_output=True, text=True, env={**os.environ, "TASA_NO_PROGRESS": "1"})
    assert r.returncode == 0, r.stderr
    an = json.loads((out / "analysis.json").read_text())
    measured = an["timings"]["peak_rss_mb"] * 2**20
    dtype = an["config"]["dtype"]
    shapes = footprint.shapes_from_source(ModelSource.open(resolve_model(model)))
    pred = footprint.predict(shapes, tokens=128, samples=10, dtype=dtype, throughput_flops=1e11)
    print(f"{model} analysis ({dtype}): measured peak {measured / 2**20:.0f} MiB, predicted {pred.peak_bytes / 2**20:.0f} MiB")
    assert abs(pred.peak_bytes / measured - 1) < 0.20
    if model == "smollm2-135m":
        assert measured < 1.5e9            # the goal for a small SmolLM2 analysis
    cache = sum(f.stat().st_size for f in out.glob("gradstats-*"))
    print(f"gradient cache {cache / 1e6:.1f} MB")
    assert 0 < cache < 54e6
