"""The benchmark's verdicts and report (benchmarks/run.py) on hand-made rows."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import run as bench  # noqa: E402


#: per-sample variation shared by every file (the samples differ in difficulty, the files in level)
_SHAPE = [0.5, 1.5, 0.8, 1.2, 1.0, 0.7, 1.3, 1.0]


def _row(label, kind, bpw, task_kld, gsm=None, noise=0.0, **extra):
    r = {"label": label, "kind": kind, "bpw": bpw, "file": f"{label}.gguf", "file_bytes": int(bpw * 1e6),
         "tensor_bytes": int(bpw * 1e6), "task_kld": task_kld, "task_top1": 0.9, "task_ppl": 3.0,
         "general_kld": 2 * task_kld, "general_top1": 0.8, "general_ppl": 10.0, **extra}
    kl = [10 * task_kld * (x + noise * (-1) ** i) for i, x in enumerate(_SHAPE)]
    r["samples"] = {"task": {"positions": [10] * 8, "kl": kl, "same": [9] * 8, "lq": [-11.0] * 8}}
    if gsm is not None:
        ok = [i < round(10 * gsm) for i in range(10)]
        r["gsm8k"] = {"n": 10, "strict": gsm, "flexible": gsm, "correct_flexible": sum(ok), "seconds": 1.0,
                      "ids": [f"q{i}" for i in range(10)], "ok_flexible": ok}
    return r


def _rows():
    return [
        _row("llama.cpp Q4_K_M", "llama.cpp", 4.9, 0.050, mix="Q4_K_M"),
        _row("llama.cpp Q4_K_M +imatrix", "llama.cpp", 4.9, 0.030, gsm=0.6, mix="Q4_K_M"),
        _row("llama.cpp Q3_K_M +imatrix", "llama.cpp", 3.9, 0.020, gsm=0.9, mix="Q3_K_M"),  # not a 4-bit mix
        _row("TASA 3.5 bpw", "tasa", 3.5, 0.040, gsm=0.6, target="3.5 bpw"),
        _row("TASA 4.0 bpw", "tasa", 4.0, 0.001, gsm=1.0, target="4.0 bpw"),  # above 3.5: not a candidate
    ]


def test_inversion_compares_low_bit_tasa_with_four_bit_mixes_only():
    inv = bench.inversion(_rows())
    assert [(v["tasa"], v["llama"]) for v in inv] == [("TASA 3.5 bpw", "llama.cpp Q4_K_M"),
                                                       ("TASA 3.5 bpw", "llama.cpp Q4_K_M +imatrix")]
    plain, imat = inv
    # 0.040 < 0.050 on every sample (paired): inverted; no GSM8K on the plain mix
    assert plain["kld_verdict"] == "inverted" and "gsm8k_verdict" not in plain
    assert plain["kld_diff"] < 0 and plain["kld_diff_ci"][1] < 0
    # 0.040 > 0.030 on every sample: not inverted; GSM8K 6/10 vs the same 6/10: inconclusive
    assert imat["kld_verdict"] == "not inverted" and imat["kld_diff_ci"][0] > 0
    assert imat["gsm8k_verdict"] == "inconclusive" and imat["gsm8k_mcnemar"]["pvalue"] == 1.0


def test_inversion_is_inconclusive_when_the_interval_contains_zero():
    rows = [_row("llama.cpp Q4_K_S", "llama.cpp", 4.6, 0.040, gsm=0.5, mix="Q4_K_S"),
            _row("TASA 3.0 bpw", "tasa", 3.0, 0.041, gsm=0.6, noise=0.6, target="3.0 bpw")]
    (v,) = bench.inversion(rows)
    assert v["kld_diff_ci"][0] < 0 < v["kld_diff_ci"][1] and v["kld_verdict"] == "inconclusive"
    assert v["gsm8k_verdict"] == "inconclusive"       # 6/10 vs 5/10: one discordant question
    del rows[0]["samples"]
    (v,) = bench.inversion(rows)
    assert v["kld_verdict"] == "inconclusive" and "kld_diff" not in v          # no per-sample data: no claim


def test_gsm8k_selection():
    picked = [r["label"] for r in _rows() if bench.gsm8k_row(r)]
    assert picked == ["llama.cpp Q4_K_M +imatrix", "llama.cpp Q3_K_M +imatrix", "TASA 3.5 bpw", "TASA 4.0 bpw"]
    assert bench.gsm8k_row({"label": "ppl-only 3.5 bpw", "kind": "ppl"})
    assert not bench.gsm8k_row({"label": "TASA = Q4_K_M", "kind": "tasa", "target": "= Q4_K_M"})


def test_report_lists_every_row_and_writes_a_plot_per_table(tmp_path):
    rows = _rows()
    for r in rows:
        if r["kind"] in ("tasa", "llama.cpp"):
            r.update({"pp": 100.0, "pp_sd": 1.0, "tg": 20.0, "tg_sd": 0.5, "pp_tokens": 128, "tg_tokens": 32,
                      "threads": 2, "decode_bw_frac": 0.5})
    model = {"key": "tiny", "model": {"name": "Tiny", "arch": "llama", "n_params": 1_000_000},
             "analysis": {"wall_s": 10.0, "n_backward": 20, "tokens": 128, "gradients_s": 5.0, "sensitivity_s": 4.0,
                          "fisher_dtype": "float32", "peak_rss_mb": 500.0},
             "scaling": [{"tokens": 64, "seconds": 0.5, "activation_bytes": 2**20},
                         {"tokens": 128, "seconds": 0.9, "activation_bytes": 2**21}],
             "mixture": {"task_ratio": 0.5}, "lambda": 0.5, "rows": rows,
             "skipped": [{"plan": "tasa 3.0 bpw", "reason": "too small"}],
             "export": {"ours_s": 2.0, "llama_model_quantize_s": 1.0, "ratio": 2.0}, "bandwidth_gbs": 10.0,
             "speed_pairs": [{"mix": "Q4_K_M", "llama_bytes": 4 * 2**20, "tasa_bytes": 4 * 2**20, "pp_ratio": 1.0, "tg_ratio": 1.0}],
             "gsm8k": {"n": 10, "shots": 5, "max_tokens": 64}, "inversion": bench.inversion(rows)}
    other = {**model, "key": "tiny2", "model": {**model["model"], "n_params": 2_000_000}}
    res = {"machine": {"cpu": "x", "cores": 2, "threads": 2}, "command": "run.py", "models": [model, other]}
    bench.write_report(res, tmp_path)
    md = (tmp_path / "results.md").read_text()
    for r in rows:
        assert f"| {r['label']} | {r['bpw']:.3f} |" in md
    assert "not feasible: tasa 3.0 bpw" in md and "→ inverted" in md and "→ not inverted" in md
    assert "→ inconclusive" in md and "McNemar 0/0 discordant, p=1" in md
    assert "6/10 = 0.60" in md
    for f in ("tiny-quality.png", "tiny-speed.png", "tiny-cost.png", "tiny2-quality.png", "cost-models.png"):
        assert (tmp_path / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
