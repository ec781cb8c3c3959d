"""Intervals and paired comparisons in ``tasa-edge bench`` (bench.json / bench.md)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from devices.harness import Size, bench, comparisons
from devices.report import comparison_lines, interval_lines
from tasa_edge import quality
from tasa_edge.errors import TasaError

FIGURES = ("kld", "top1", "ppl", "ppl_ref", "delta_p")


def _sums(rng, lengths, scale):
    n = int(lengths.sum())
    kl = rng.exponential(scale, n)
    return quality.SampleSums.from_positions(lengths, lq_t=-rng.exponential(2.0, n) - scale, kl=kl,
                                             same=rng.random(n) < 0.9 - scale, tgt_lp=-rng.exponential(2.0, n))


def test_comparisons_and_markdown_tables():
    rng = np.random.default_rng(0)
    lengths = rng.integers(4, 20, 12)
    sums = {"a": {"general": _sums(rng, lengths, 0.01), "task": _sums(rng, lengths, 0.01)},
            "b": {"general": _sums(rng, lengths, 0.3), "task": _sums(rng, lengths, 0.3)}}
    ok_a = [True] * 9 + [False]
    ok_b = [True] * 2 + [False] * 8
    gsm = {n: [{"id": f"q{i}", "strict_ok": o, "flexible_ok": o} for i, o in enumerate(ok)]
           for n, ok in (("a", ok_a), ("b", ok_b))}
    cmp = comparisons(["a", "b"], sums, gsm, "a")
    assert cmp["baseline"] == "a" and len(cmp["rows"]) == 1
    row = cmp["rows"][0]
    assert row["model"] == "b"
    for s in ("general", "task"):
        assert row[s]["kld"]["diff"] > 0 and row[s]["kld"]["lo"] > 0         # b is worse on every sample
        assert set(row[s]) == {"kld", "top1", "ppl", "delta_p"}
    t = row["gsm8k"]["flexible_extract"]
    assert (t["a_correct"], t["b_correct"], t["a_only"], t["b_only"]) == (2, 9, 0, 7)
    assert t["pvalue"] == pytest.approx(2 / 128) and t["diff"] == pytest.approx(-0.7)

    report = {"models": [{"name": n, "quality": {s: _summary(sums[n][s]) for s in ("general", "task")},
        "gsm8k": {"n": 10, "strict_match": sum(ok) / 10, "flexible_extract": sum(ok) / 10}} for n, ok in
        (("a", ok_a), ("b", ok_b))], "comparisons": cmp}
    md = "\n".join(interval_lines(report) + comparison_lines(report))
    assert "| a | 12/12 |" in md and "Paired against `a`" in md
    kld = report["models"][1]["quality"]["task"]
    assert f"{kld['kld']:.4f} [{kld['kld_ci']['lo']:.4f}, {kld['kld_ci']['hi']:.4f}]" in md
    assert "(0/7, p=0.0156)" in md


def _summary(s: quality.SampleSums) -> dict:
    """A summary with intervals from per-sample sums alone (as the harness gets from summarize)."""
    out = {"n_samples": s.n_samples}
    for k, iv in s.intervals().items():
        out[k], out[f"{k}_ci"] = iv.estimate, iv.to_dict()
    return out


@pytest.mark.slow
def test_bench_reports_intervals_and_paired_section(tmp_path, smollm, smollm_f32):
    from exporters.gguf_export import export_gguf
    from tasa_edge.plan import BitPlan

    files = {}
    for t in ("Q8_0", "Q4_0"):
        files[t] = tmp_path / f"smollm2-{t}.gguf"
        export_gguf(smollm, BitPlan.uniform(smollm, t), files[t], show_progress=False)
    size = Size("tiny-stats", pp=8, tg=2, reps=1, general_docs=3, general_tokens=48, task_examples=4,
                gsm8k_examples=2, shots=0, max_gen_tokens=16)
    with pytest.raises(TasaError, match="--baseline-file"):
        bench([files["Q4_0"], files["Q8_0"]], reference=smollm_f32, size=size, threads=2, baseline="other.gguf",
              out_dir=tmp_path / "bad", show_progress=False)
    out = tmp_path / "bench"
    rep = bench([files["Q4_0"], files["Q8_0"]], reference=smollm_f32, size=size, threads=2,
                baseline=str(files["Q8_0"]), out_dir=out, show_progress=False, speed_backend="llama-cpp-python")
    saved = json.loads((out / "bench.json").read_text())
    assert saved["comparisons"] == json.loads(json.dumps(rep["comparisons"]))
    for s in ("general", "task"):
        ci = saved["reference"][f"ppl_{s}_ci"]
        assert ci["lo"] <= saved["reference"][f"ppl_{s}"] <= ci["hi"]
    for e in saved["models"]:
        assert e["error"] is None
        for s, n in (("general", 3), ("task", 4)):
            q = e["quality"][s]
            assert q["n_samples"] == n
            for k in FIGURES:                                   # every quality figure has its interval
                ci = q[f"{k}_ci"]
                assert ci["lo"] <= q[k] <= ci["hi"] and ci["level"] == 0.95 and ci["n"] == n, (e["name"], s, k)
        g = e["gsm8k"]
        for k in ("strict_match", "flexible_extract"):
            ci = g[f"{k}_ci"]
            assert ci["method"] == "wilson" and ci["lo"] <= g[k] <= ci["hi"] and ci["n"] == 2
    cmp = saved["comparisons"]
    assert cmp["baseline"] == files["Q8_0"].stem and [r["model"] for r in cmp["rows"]] == [files["Q4_0"].stem]
    row = cmp["rows"][0]
    for s in ("general", "task"):
        d = row[s]["kld"]
        assert d["diff"] > 0 and d["lo"] > 0, d      # Q4_0 further from the reference than Q8_0 on every sample
        assert row[s]["top1"]["lo"] <= row[s]["top1"]["diff"] <= row[s]["top1"]["hi"]
    assert row["gsm8k"]["flexible_extract"]["n"] == 2
    md = (out / "bench.md").read_text()
    assert "Quality with 95% intervals" in md and f"Paired against `{files['Q8_0'].stem}`" in md
    q4 = saved["models"][0]["quality"]["task"]
    assert f"{q4['kld']:.4f} [{q4['kld_ci']['lo']:.4f}, {q4['kld_ci']['hi']:.4f}]" in md
