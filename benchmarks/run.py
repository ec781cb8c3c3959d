#!/usr/bin/env python3
"""Precision inversion and cost, side by side with llama.cpp, in one run.

For each packaged model: the float32 reference (the dequantized packaged file), llama.cpp's own
mixes (``llama_model_quantize``: Q3_K_S, Q3_K_M, Q4_K_S, Q4_K_M, with and without the TASA
mixture's imatrix), TASA plans at 3.0 / 3.5 / 4.0 bits/weight (where the model's shapes allow
them) and at the exact tensor bytes of every llama.cpp mix, and perplexity-only plans at the same
sizes. Measured for every file: size, task KLD (held-out GSM8K answers), general KLD, top-1;
GSM8K accuracy (few-shot, greedy, lm-eval extraction) on the models listed in ``--gsm8k-models``;
decode/prompt tokens/s of TASA files vs llama.cpp mixes of equal size and decode bytes/s as a
fraction of the measured read bandwidth; export time vs ``llama_model_quantize``; analysis wall
time and peak memory (own process) and how the per-sample cost grows with tokens.
Every KLD / top-1 / PPL figure carries a 95% interval (percentile bootstrap over the evaluation
samples, :mod:`tasa_edge.stats`), every GSM8K accuracy a Wilson interval; the precision-inversion
verdicts are paired (same samples / questions: paired bootstrap of the task-KLD difference, exact
McNemar for GSM8K) and three-valued: inverted, not inverted, inconclusive (at 95%).
Writes results.json, results.md and one PNG per table to ``--out``.

    python benchmarks/run.py --models smollm2-135m gemma3-270m qwen2.5-coder-1.5b --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exporters.baseline import quantize_baseline  # noqa: E402
from exporters.gguf_export import export_gguf  # noqa: E402
from exporters.reference import reference_gguf  # noqa: E402
from tasa_edge.analysis import pick  # noqa: E402
from tasa_edge.results import AnalysisConfig  # noqa: E402
from tasa_edge.data import load_general, load_gsm8k  # noqa: E402
from tasa_edge.errors import TasaError  # noqa: E402
from tasa_edge import quality, stats  # noqa: E402
from tasa_edge.evaluate import reference_logprobs, score_vs_reference  # noqa: E402
from tasa_edge.imatrix import load_imatrix  # noqa: E402
from tasa_edge.inspect import inspect_gguf  # noqa: E402
from tasa_edge.model import ModelSource  # noqa: E402
from tasa_edge.plan import BitPlan  # noqa: E402
from tasa_edge.planner import make_plan  # noqa: E402
from tasa_edge.zoo import resolve_model  # noqa: E402

MIXES = ("Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M")
FOUR_BIT = ("Q4_K_S", "Q4_K_M")
BPWS = (3.0, 3.5, 4.0)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------- child processes
def in_child(fn, *args):
    """Run ``fn(*args)`` in a fresh process: its peak RSS is its own, and its memory is returned."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
        return ex.submit(fn, *args).result()


def _quiet() -> None:
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    from transformers.utils import logging

    logging.disable_progress_bar()


def _convert(name: str) -> str:
    _quiet()
    from tasa_edge.torch_model import hf_dir_for

    return str(hf_dir_for(ModelSource.open(resolve_model(name)), show_progress=False))


def _analyze(name: str, work: str, cfg: AnalysisConfig):
    from tasa_edge.analysis import analyze

    _quiet()
    return analyze(ModelSource.open(resolve_model(name)), Path(work), cfg, show_progress=False)


def _token_scaling(name: str, lengths: tuple[int, ...], fisher_dtype: str) -> list[dict]:
    """Analysis cost of one sample (forward + backward + Fisher + trace) at several lengths, and
    the activation bytes autograd saves for the backward pass."""
    import torch

    from tasa_edge.analysis import collect, encode_pools
    from tasa_edge.data import TextSample
    from tasa_edge.torch_model import gguf_params, load_torch_model

    _quiet()
    src = ModelSource.open(resolve_model(name))
    model, tok = load_torch_model(src)
    params = gguf_params(model, src)
    pointers = {p.data_ptr() for p in model.parameters()}
    text = " ".join(s.text for s in load_general("calib")[:40])
    out = []
    for n in lengths:
        cfg = AnalysisConfig(max_tokens=n, fisher_dtype=fisher_dtype)
        saved = [0]

        def pack(t):
            if t.data_ptr() not in pointers:
                saved[0] += t.numel() * t.element_size()
            return t

        times = []
        for rep in range(3):  # first one is a warm-up
            saved[0] = 0
            sample = TextSample("general", f"scaling:{n}:{rep}", "", text)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                pools = {"general": [sample]}
                st = collect(model, encode_pools(tok, pools, cfg.max_tokens), params, pools, cfg, cache=None,
                             show_progress=False)
            if rep:
                times.append(st.seconds)
        out.append({"tokens": n, "seconds": sum(times) / len(times), "activation_bytes": saved[0]})
    return out


# ---------------------------------------------------------------------------- measurements
def speed(path: Path, threads: int, reps: int, pp: int = 128, tg: int = 32) -> dict:
    """llama-bench conventions through the device harness' backend: pp tokens in one batch, tg
    tokens one at a time, a warm-up then ``reps`` runs; tokens/s mean ± sd."""
    from devices.worker import GGUFBackend, measure_speed

    be = GGUFBackend(str(path), threads)
    be.load(n_ctx=pp + tg + 8, n_batch=512)
    try:
        s = measure_speed(be, pp, tg, reps)
    finally:
        be.close()
    return {"pp": s["pp"]["ts_mean"], "pp_sd": s["pp"]["ts_std"], "tg": s["tg"]["ts_mean"], "tg_sd": s["tg"]["ts_std"],
            "pp_tokens": pp, "tg_tokens": tg, "reps": reps, "threads": threads}


def gsm8k(path: Path, threads: int, examples: list[dict], prefix: str, max_tokens: int) -> dict:
    from devices.worker import GGUFBackend, run_gsm8k

    t0 = time.perf_counter()
    rows = run_gsm8k(GGUFBackend(str(path), threads), examples, prefix, max_tokens)
    n = len(rows)
    k_flex, k_strict = sum(r["flexible_ok"] for r in rows), sum(r["strict_ok"] for r in rows)
    return {"n": n, "strict": k_strict / n, "flexible": k_flex / n,
            "correct_flexible": k_flex, "seconds": time.perf_counter() - t0,
            "flexible_ci": stats.wilson(k_flex, n).to_dict(), "strict_ci": stats.wilson(k_strict, n).to_dict(),
            "ids": [r["id"] for r in rows], "ok_flexible": [bool(r["flexible_ok"]) for r in rows],
            "ids_correct": [r["id"] for r in rows if r["flexible_ok"]]}


def gsm8k_row(row: dict) -> bool:
    """Files that get GSM8K accuracy (generation is the slow part): the packaged file, llama.cpp's
    mixes with the imatrix (the stronger baseline; the packaged file is itself a plain mix), TASA
    at fixed bit rates, and the perplexity-only plan at 3.5 bits/weight."""
    return (row["kind"] == "source" or (row["kind"] == "llama.cpp" and "+imatrix" in row["label"])
            or (row["kind"] == "tasa" and "bpw" in row.get("target", "")) or row["label"] == "ppl-only 3.5 bpw")


def run_model(name: str, out: Path, args) -> dict:
    from devices.bandwidth import probe_local
    from tasa_edge.data import fewshot_prefix, gsm8k_final_answer

    src = ModelSource.open(resolve_model(name))
    work = out / name
    work.mkdir(parents=True, exist_ok=True)
    threads = args.threads or os.cpu_count() or 1
    big = src.n_params > 1e9
    fisher_dtype = "bfloat16" if big else "float32"
    log(f"== {name}: {src.arch}, {src.n_params / 1e6:.0f}M params; F32 reference")
    ref = reference_gguf(src)

    log("   converting for transformers (own process)")
    in_child(_convert, name)
    cfg = AnalysisConfig(n_general=args.n_calib, n_task=args.n_calib, n_target=max(4, args.n_calib // 2),
                         max_tokens=args.max_tokens, sizes=(args.n_calib,), fisher_dtype=fisher_dtype)
    log("   analysis (own process)")
    t0 = time.perf_counter()
    an = in_child(_analyze, name, str(work), cfg)
    analysis = {"wall_s": time.perf_counter() - t0, **an.timings, "n_params": src.n_params,
                "tokens": args.max_tokens, "fisher_dtype": fisher_dtype,
                "samples": len(an.mixture.candidates[0].members)}
    log(f"   analysis {analysis['wall_s']:.0f} s, peak RSS {analysis['peak_rss_mb']:.0f} MB")
    log("   per-sample cost vs tokens (own process)")
    scaling = in_child(_token_scaling, name, tuple(args.scaling_tokens), fisher_dtype)
    for s in scaling:
        log(f"   {s['tokens']:4d} tokens: {s['seconds']:.2f} s/sample, activations {s['activation_bytes'] / 2**20:.0f} MiB")
    im = load_imatrix(an.imatrix_path)

    task = pick(load_gsm8k("eval"), args.n_eval, "bench")
    gen = pick(load_general("eval"), args.n_eval, "bench")
    log("   reference log-probs (float16 store, as tasa-edge bench)")
    ref_lp = {"task": reference_logprobs(ref, task), "general": reference_logprobs(ref, gen)}
    rows = []

    def measure(label: str, kind: str, path: Path, extra: dict | None = None) -> dict:
        rep = inspect_gguf(path)
        row = {"label": label, "kind": kind, "file": str(path.relative_to(work) if path.is_relative_to(work) else path),
               "file_bytes": path.stat().st_size, "tensor_bytes": rep["bytes"], "bpw": rep["bpw"], **(extra or {})}
        row["samples"] = {}
        for k in ("task", "general"):
            m, sums = score_vs_reference(ref_lp[k], path)
            for fig in ("kld", "top1", "ppl"):
                row[f"{k}_{fig}"], row[f"{k}_{fig}_ci"] = m[fig], m[f"{fig}_ci"]
            row["samples"][k] = {key: v.tolist() for key, v in sums.to_arrays().items()}
        rows.append(row)
        log(f"   {label:28s} {row['bpw']:6.3f} bpw  task KLD {row['task_kld']:.4f}  general KLD {row['general_kld']:.4f}")
        return row

    def path_of(row: dict) -> Path:
        p = Path(row["file"])
        return p if p.is_absolute() else work / p

    if src.kind == "gguf" and src.path != ref:
        measure("packaged file", "source", src.path, {"source_name": src.path.name})

    for mix in MIXES:
        for use_im in (False, True):
            p = work / f"llama-{mix}{'-imat' if use_im else ''}.gguf"
            r = quantize_baseline(ref, p, mix, imatrix=im if use_im else None)
            measure(f"llama.cpp {mix}{' +imatrix' if use_im else ''}", "llama.cpp", p, {"export_s": r.seconds, "mix": mix})

    targets = [(f"= {m}", {"nbytes": next(r["tensor_bytes"] for r in rows if r["label"] == f"llama.cpp {m} +imatrix")}) for m in MIXES]
    targets += [(f"{b} bpw", {"bpw": b}) for b in BPWS]
    skipped = []
    for tag, budget in targets:
        for mode in ("tasa", "ppl"):
            try:
                plan = make_plan(an, src, mode=mode, **budget)
            except TasaError as exc:
                skipped.append({"plan": f"{mode} {tag}", "reason": str(exc)})
                log(f"   {mode} {tag}: infeasible ({exc})")
                continue
            p = work / f"{mode}-{tag.replace('= ', 'eq-').replace(' ', '')}.gguf"
            r = export_gguf(src, plan, p, imatrix=im, show_progress=False)
            measure(f"{'TASA' if mode == 'tasa' else 'ppl-only'} {tag}", mode, p, {"export_s": r.seconds, "target": tag})

    log("   export time: uniform Q4_K, tasa-edge vs llama_model_quantize")
    ref_src = ModelSource.open(ref)
    t_ours = export_gguf(ref_src, BitPlan.uniform(ref_src, "Q4_K"), work / "ours-q4k.gguf", show_progress=False).seconds
    t_llama = quantize_baseline(ref, work / "llama-q4k-pure.gguf", "Q4_K", pure=True).seconds
    export = {"ours_s": t_ours, "llama_model_quantize_s": t_llama, "ratio": t_ours / t_llama}
    for f in ("ours-q4k.gguf", "llama-q4k-pure.gguf"):
        (work / f).unlink()

    log("   speed")
    bw = probe_local(threads)["read_bytes_per_s"]
    for row in rows:
        timed = (row["kind"] == "llama.cpp" and "+imatrix" not in row["label"]) or row["kind"] in ("tasa", "source")
        if timed:
            row.update(speed(path_of(row), threads, args.reps))
            row["decode_bw_frac"] = row["tensor_bytes"] * row["tg"] / bw
            log(f"   {row['label']:28s} pp {row['pp']:.1f} ± {row['pp_sd']:.1f}  tg {row['tg']:.2f} ± {row['tg_sd']:.2f} t/s")
    pairs = []
    for mix in MIXES:
        a = next(r for r in rows if r["label"] == f"llama.cpp {mix}")
        b = next((r for r in rows if r["label"] == f"TASA = {mix}"), None)
        if b is not None:
            pairs.append({"mix": mix, "llama_bytes": a["tensor_bytes"], "tasa_bytes": b["tensor_bytes"],
                          "pp_ratio": b["pp"] / a["pp"], "tg_ratio": b["tg"] / a["tg"]})

    gsm = None
    if name in args.gsm8k_models and args.gsm8k > 0:
        exs = [{"id": s.id, "prompt": s.prompt, "gold": gsm8k_final_answer(s.target)}
               for s in pick(load_gsm8k("eval"), args.gsm8k, "bench-gsm8k")]
        prefix = fewshot_prefix(args.shots)
        gsm = {"n": len(exs), "shots": args.shots, "max_tokens": args.gen_tokens}
        for row in rows:
            if gsm8k_row(row):
                row["gsm8k"] = gsm8k(path_of(row), threads, exs, prefix, args.gen_tokens)
                log(f"   GSM8K {row['label']:28s} {row['gsm8k']['correct_flexible']}/{len(exs)} "
                    f"(strict {row['gsm8k']['strict']:.3f}) in {row['gsm8k']['seconds']:.0f} s")

    return {"model": src.describe(), "analysis": analysis, "scaling": scaling,
            "mixture": an.mixture.chosen.summary() | {"members": len(an.mixture.chosen.members)},
            "lambda": an.lam, "rows": rows, "skipped": skipped, "export": export, "bandwidth_gbs": bw / 1e9,
            "speed_pairs": pairs, "gsm8k": gsm, "inversion": inversion(rows)}


def _task_sums(row: dict) -> quality.SampleSums | None:
    d = (row.get("samples") or {}).get("task")
    return None if d is None else quality.SampleSums.from_arrays({k: np.asarray(v) for k, v in d.items()})


def inversion(rows: list[dict]) -> list[dict]:
    """Every TASA plan at ≤ 3.5 bits/weight against every llama.cpp 4-bit mix: task KLD (and GSM8K),
    paired on the same samples / questions, each verdict three-valued at 95%: ``inverted`` (TASA
    better), ``not inverted`` (TASA worse), ``inconclusive`` (the interval of the difference contains
    0; also where the per-sample data is missing)."""
    out = []
    for t in rows:
        if t["kind"] != "tasa" or t["bpw"] > 3.5 + 1e-9:
            continue
        for b in rows:
            if b["kind"] == "llama.cpp" and b.get("mix") in FOUR_BIT:
                e = {"tasa": t["label"], "tasa_bpw": t["bpw"], "llama": b["label"], "llama_bpw": b["bpw"],
                     "tasa_task_kld": t["task_kld"], "llama_task_kld": b["task_kld"], "kld_verdict": "inconclusive"}
                st, sb = _task_sums(t), _task_sums(b)
                if st is not None and sb is not None:
                    d = st.paired(sb)["kld"]
                    e |= {"kld_diff": d.diff, "kld_diff_ci": [d.lo, d.hi],
                          "kld_verdict": stats.verdict(d.lo, d.hi, lower_is_better=True)}
                if "gsm8k" in t and "gsm8k" in b:
                    e |= {"tasa_gsm8k": t["gsm8k"]["flexible"], "llama_gsm8k": b["gsm8k"]["flexible"],
                          "gsm8k_verdict": "inconclusive"}
                    ot, ob = t["gsm8k"].get("ok_flexible"), b["gsm8k"].get("ok_flexible")
                    if ot is not None and ob is not None and t["gsm8k"].get("ids") == b["gsm8k"].get("ids"):
                        mc = stats.mcnemar_exact(ot, ob)
                        e |= {"gsm8k_mcnemar": mc.to_dict(), "gsm8k_verdict": stats.mcnemar_verdict(mc)}
                out.append(e)
    return out


# ---------------------------------------------------------------------------- report
def _plot_name(m: dict, what: str) -> str:
    return f"{m['key']}-{what}.png"


def _ci(ci: dict | None, fmt: str = "{:.4f}") -> str:
    """`` [lo, hi]`` of an interval dict, empty without one."""
    return f" [{fmt.format(ci['lo'])}, {fmt.format(ci['hi'])}]" if ci else ""


def write_report(res: dict, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    mc = res["machine"]
    lines = [f"Machine: {mc['cpu']}, {mc['cores']} cores, {mc['threads']} threads; `{res.get('command', '')}`", ""]
    for m in res["models"]:
        a, e = m["analysis"], m["export"]
        gsm = m.get("gsm8k")
        lines += [f"### {m['key']} ({m['model']['arch']}, {m['model']['n_params'] / 1e6:.0f}M params)", "",
                  f"Quality vs size ({_plot_name(m, 'quality')}); KLD vs the F32 reference on held-out samples"
                  + (f"; GSM8K: {gsm['n']} eval questions, {gsm['shots']}-shot, greedy, ≤{gsm['max_tokens']} tokens, flexible-extract (strict)"
                     if gsm else "") + ":", "",
                  "| file | bits/weight | MiB | task KLD [95%] | task top-1 | general KLD [95%] | general PPL |" + (" GSM8K [95% Wilson] |" if gsm else ""),
                  "|---|---|---|---|---|---|---|" + ("---|" if gsm else "")]
        for r in sorted(m["rows"], key=lambda r: (r["bpw"], r["label"])):
            g = ""
            if gsm:
                g = (f" {r['gsm8k']['correct_flexible']}/{r['gsm8k']['n']} = {r['gsm8k']['flexible']:.2f}"
                     f"{_ci(r['gsm8k'].get('flexible_ci'), '{:.2f}')} ({r['gsm8k']['strict']:.2f}) |"
                     if "gsm8k" in r else " |")
            lines.append(f"| {r['label']} | {r['bpw']:.3f} | {r['file_bytes'] / 2**20:.1f} | {r['task_kld']:.4f}"
                         f"{_ci(r.get('task_kld_ci'))} | {r['task_top1']:.3f}{_ci(r.get('task_top1_ci'), '{:.3f}')} | "
                         f"{r['general_kld']:.4f}{_ci(r.get('general_kld_ci'))} | {r['general_ppl']:.2f}"
                         f"{_ci(r.get('general_ppl_ci'), '{:.2f}')} |{g}")
        if m["skipped"]:
            lines.append("")
        for s in m["skipped"]:
            lines.append(f"- not feasible: {s['plan']} — {s['reason']}")
        lines += ["", "Precision inversion (TASA ≤ 3.5 bits/weight vs llama.cpp 4-bit mixes, task KLD"
                  + (", GSM8K" if gsm else "") + "):", ""]
        if not m["inversion"]:
            lines.append("- no TASA plan ≤ 3.5 bits/weight is feasible on this model")
        for v in m["inversion"]:
            ci = v.get("kld_diff_ci")
            s = (f"- {v['tasa']} ({v['tasa_bpw']:.3f}) vs {v['llama']} ({v['llama_bpw']:.3f}): task KLD "
                 f"{v['tasa_task_kld']:.4f} vs {v['llama_task_kld']:.4f}"
                 + (f" (difference {v['kld_diff']:+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}])" if ci else " (no per-sample data)")
                 + f" → {v['kld_verdict']}")
            if "tasa_gsm8k" in v:
                mc = v.get("gsm8k_mcnemar")
                s += (f"; GSM8K {v['tasa_gsm8k']:.2f} vs {v['llama_gsm8k']:.2f}"
                      + (f" (McNemar {mc['a_only']}/{mc['b_only']} discordant, p={mc['pvalue']:.3g})" if mc else "")
                      + f" → {v['gsm8k_verdict']}")
            lines.append(s)
        lines += ["", f"Speed ({_plot_name(m, 'speed')}): pp{m['rows'][0].get('pp_tokens', 128)} / tg"
                  f"{next((r['tg_tokens'] for r in m['rows'] if 'tg_tokens' in r), 32)} tokens/s, mean ± sd; decode bytes/s ÷ "
                  f"measured read bandwidth ({m['bandwidth_gbs']:.1f} GB/s):", "",
                  "| file | bits/weight | pp t/s | tg t/s | decode B/s ÷ bandwidth |", "|---|---|---|---|---|"]
        for r in sorted((r for r in m["rows"] if "pp" in r), key=lambda r: (r["bpw"], r["label"])):
            lines.append(f"| {r['label']} | {r['bpw']:.3f} | {r['pp']:.1f} ± {r['pp_sd']:.1f} | {r['tg']:.2f} ± {r['tg_sd']:.2f} | "
                         f"{r['decode_bw_frac']:.2f} |")
        lines += ["", "| llama.cpp mix (MiB of tensors) | TASA plan within that budget (MiB) | TASA ÷ llama.cpp pp | TASA ÷ llama.cpp tg |",
                  "|---|---|---|---|"]
        for p in m["speed_pairs"]:
            lines.append(f"| {p['mix']} ({p['llama_bytes'] / 2**20:.1f}) | {p['tasa_bytes'] / 2**20:.1f} | "
                         f"{p['pp_ratio']:.2f} | {p['tg_ratio']:.2f} |")
        lines += ["", f"Cost ({_plot_name(m, 'cost')}): analysis {a['wall_s']:.0f} s wall in its own process "
                  f"({a['n_backward']} backward passes of ≤{a['tokens']} tokens: gradients {a['gradients_s']:.0f} s, "
                  f"sensitivities {a['sensitivity_s']:.0f} s; Fisher sums in {a['fisher_dtype']}), peak RSS {a['peak_rss_mb']:.0f} MB. "
                  f"Chosen mixture: task ratio {m['mixture']['task_ratio']}, lambda {m['lambda']}. "
                  f"Export of uniform Q4_K: tasa-edge {e['ours_s']:.1f} s vs llama_model_quantize {e['llama_model_quantize_s']:.1f} s "
                  f"(ratio {e['ratio']:.2f}).", "", "| tokens per sample | seconds per sample (fwd+bwd+stats) | saved activations MiB |",
                  "|---|---|---|"]
        for s in m["scaling"]:
            lines.append(f"| {s['tokens']} | {s['seconds']:.2f} | {s['activation_bytes'] / 2**20:.0f} |")
        lines.append("")
    if len(res["models"]) > 1:
        lines += ["### Cost across models (cost-models.png)", "",
                  "| model | params (M) | analysis s | peak RSS MB | s per sample at 128 tokens | µs per token per M params |",
                  "|---|---|---|---|---|---|"]
        for m in res["models"]:
            s = next((x for x in m["scaling"] if x["tokens"] == 128), m["scaling"][-1])
            per = s["seconds"] / s["tokens"] / (m["model"]["n_params"] / 1e6) * 1e6
            lines.append(f"| {m['key']} | {m['model']['n_params'] / 1e6:.0f} | {m['analysis']['wall_s']:.0f} | "
                         f"{m['analysis']['peak_rss_mb']:.0f} | {s['seconds']:.2f} | {per:.2f} |")
        lines.append("")
    (out / "results.md").write_text("\n".join(lines))
    plot(res, out)


def plot(res: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {"tasa": "TASA", "ppl": "perplexity-only", "llama.cpp": "llama.cpp mixes", "source": "packaged file"}
    for m in res["models"]:
        gsm = m.get("gsm8k")
        keys = [("task_kld", "task (GSM8K answers) KLD"), ("general_kld", "general-text KLD")]
        fig, ax = plt.subplots(1, 3 if gsm else 2, figsize=(17 if gsm else 12, 4.5))
        for kind, marker in (("llama.cpp", "s"), ("tasa", "o"), ("ppl", "^"), ("source", "*")):
            rs = [r for r in m["rows"] if r["kind"] == kind]
            for i, (key, _) in enumerate(keys):
                ax[i].scatter([r["bpw"] for r in rs], [max(r[key], 1e-6) for r in rs], marker=marker, label=names[kind])
            if gsm:
                g = [r for r in rs if "gsm8k" in r]
                ax[2].scatter([r["bpw"] for r in g], [r["gsm8k"]["flexible"] for r in g], marker=marker, label=names[kind])
        for i, (_, t) in enumerate(keys):
            ax[i].set_ylabel(t)
            ax[i].set_yscale("log")
        if gsm:
            ax[2].set_ylabel(f"GSM8K accuracy ({gsm['n']} questions)")
        for x in ax:
            x.set_xlabel("bits/weight (tensors)")
            x.legend(fontsize=8)
        fig.suptitle(f"{m['key']}: quality vs size")
        fig.tight_layout()
        fig.savefig(out / _plot_name(m, "quality"), dpi=90)
        plt.close(fig)

        timed = sorted((r for r in m["rows"] if "pp" in r), key=lambda r: r["bpw"])
        fig, ax = plt.subplots(1, 2, figsize=(13, 4.5))
        for i, k in enumerate(("pp", "tg")):
            ax[i].barh([f"{r['label']} ({r['bpw']:.2f})" for r in timed], [r[k] for r in timed],
                       xerr=[r[k + "_sd"] for r in timed],
                       color=["C1" if r["kind"] == "tasa" else "C0" if r["kind"] == "llama.cpp" else "C2" for r in timed])
            ax[i].set_xlabel(f"{k} tokens/s ({timed[0]['threads']} threads)" if timed else k)
            ax[i].tick_params(axis="y", labelsize=7)
        fig.suptitle(f"{m['key']}: speed (orange TASA, blue llama.cpp, green packaged file)")
        fig.tight_layout()
        fig.savefig(out / _plot_name(m, "speed"), dpi=90)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([s["tokens"] for s in m["scaling"]], [s["seconds"] for s in m["scaling"]], "o-", label="seconds per sample")
        ax.set_xlabel("tokens per sample")
        ax.set_ylabel("seconds (forward + backward + statistics)")
        ax2 = ax.twinx()
        ax2.plot([s["tokens"] for s in m["scaling"]], [s["activation_bytes"] / 2**20 for s in m["scaling"]], "s--", color="C1")
        ax2.set_ylabel("saved activations (MiB, dashed)")
        ax.set_title(f"{m['key']}: analysis cost vs tokens")
        fig.tight_layout()
        fig.savefig(out / _plot_name(m, "cost"), dpi=90)
        plt.close(fig)

    if len(res["models"]) > 1:
        fig, ax = plt.subplots(1, 2, figsize=(11, 4))
        p = [m["model"]["n_params"] / 1e6 for m in res["models"]]
        ax[0].loglog(p, [m["analysis"]["wall_s"] for m in res["models"]], "o-")
        ax[0].set_ylabel("analysis wall s")
        ax[1].loglog(p, [m["analysis"]["peak_rss_mb"] for m in res["models"]], "o-")
        ax[1].set_ylabel("analysis peak RSS MB")
        for x, m in zip(p, res["models"]):
            ax[0].annotate(m["key"], (x, m["analysis"]["wall_s"]), fontsize=8)
        for x in ax:
            x.set_xlabel("parameters (M)")
        fig.suptitle("analysis cost vs model size")
        fig.tight_layout()
        fig.savefig(out / "cost-models.png", dpi=90)
        plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m", "qwen2.5-coder-1.5b"])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--n-calib", type=int, default=8, help="general and task calibration samples each")
    ap.add_argument("--n-eval", type=int, default=6, help="held-out task answers and general documents for KLD")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--scaling-tokens", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--gsm8k", type=int, default=20, help="GSM8K eval questions per file (0: none)")
    ap.add_argument("--gsm8k-models", nargs="*", default=["qwen2.5-coder-1.5b"])
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--gen-tokens", type=int, default=192)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--report-only", action="store_true", help="Re-render results.md and the plots from --out/results.json.")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        write_report(json.loads((args.out / "results.json").read_text()), args.out)
        print((args.out / "results.md").read_text())
        return
    os.environ.setdefault("TASA_NO_PROGRESS", "1")
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    res = {"machine": {"cpu": cpu, "cores": os.cpu_count(), "threads": args.threads or os.cpu_count()},
           "command": "python benchmarks/run.py " + " ".join(sys.argv[1:]),
           "args": {k: str(v) for k, v in vars(args).items()}, "models": []}
    t0 = time.perf_counter()
    for name in args.models:
        try:
            m = run_model(name, args.out, args)
        except TasaError as exc:
            sys.exit(f"error: {name}: {exc}")
        m["key"] = name
        res["models"].append(m)
        res["wall_s"] = time.perf_counter() - t0
        write_report(res, args.out)
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
