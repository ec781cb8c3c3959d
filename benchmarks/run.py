#!/usr/bin/env python3
"""Precision inversion and cost, side by side with llama.cpp, in one run.

For each packaged model: the float32 reference, llama.cpp's own mixes (llama_model_quantize:
Q3_K_S, Q3_K_M, Q4_K_S, Q4_K_M, with and without the TASA mixture's imatrix), TASA plans at
3.0/3.5/4.0 bits/weight (where the model's shapes allow them) and at the exact size of every
llama.cpp mix, and perplexity-only plans at the same sizes. Quality on held-out text (task KLD on
GSM8K answers, general KLD, top-1 agreement), file size, export time vs llama_model_quantize,
and decode/prompt speed. Writes results.json, results.md and PNG plots to --out.

    python benchmarks/run.py --models smollm2-135m --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exporters.baseline import quantize_baseline  # noqa: E402
from exporters.gguf_export import export_gguf  # noqa: E402
from tasa_edge.analysis import AnalysisConfig, analyze, pick  # noqa: E402
from tasa_edge.data import load_general, load_gsm8k  # noqa: E402
from tasa_edge.errors import TasaError  # noqa: E402
from tasa_edge.evaluate import kld_vs_reference, reference_gguf, sample_logits  # noqa: E402
from tasa_edge.imatrix import load_imatrix  # noqa: E402
from tasa_edge.inspect import inspect_gguf  # noqa: E402
from tasa_edge.model import ModelSource  # noqa: E402
from tasa_edge.plan import BitPlan  # noqa: E402
from tasa_edge.planner import make_plan  # noqa: E402
from tasa_edge.zoo import resolve_model  # noqa: E402

MIXES = ("Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M")


def speed(path: Path, n_threads: int, pp: int = 128, tg: int = 32, reps: int = 3) -> dict:
    """llama-bench style: prompt processing of pp tokens and generation of tg tokens, mean ± sd."""
    import statistics

    from tasa_edge.llama_run import open_llama

    pps, tgs = [], []
    with open_llama(path, n_ctx=pp + tg + 8, n_threads=n_threads, logits_all=False) as llm:
        toks = [llm.token_bos() if llm.token_bos() >= 0 else 1] + [100 + (i * 7) % 1000 for i in range(pp - 1)]
        for r in range(reps + 1):
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(toks)
            t1 = time.perf_counter()
            for i in range(tg):
                llm.eval([200 + i])
            t2 = time.perf_counter()
            if r:  # first repetition is the warm-up
                pps.append(pp / (t1 - t0))
                tgs.append(tg / (t2 - t1))
    return {"pp": statistics.mean(pps), "pp_sd": statistics.stdev(pps) if len(pps) > 1 else 0.0,
            "tg": statistics.mean(tgs), "tg_sd": statistics.stdev(tgs) if len(tgs) > 1 else 0.0,
            "pp_tokens": pp, "tg_tokens": tg, "reps": reps, "threads": n_threads}


def bandwidth_gbs() -> float:
    """Best-of-5 read bandwidth of a 512 MiB array (numpy sum), GB/s."""
    import numpy as np

    a = np.ones(64 * 2**20, dtype=np.float64)
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        a.sum()
        best = max(best, a.nbytes / (time.perf_counter() - t0))
    return best / 1e9


def run_model(name: str, out: Path, args) -> dict:
    src = ModelSource.open(resolve_model(name))
    work = out / name
    work.mkdir(parents=True, exist_ok=True)
    print(f"== {name}: {src.arch}, {src.n_params / 1e6:.0f}M params", flush=True)
    ref = reference_gguf(src)

    import resource

    t0 = time.perf_counter()
    cfg = AnalysisConfig(n_general=args.n_calib, n_task=args.n_calib, n_target=max(4, args.n_calib // 2),
                         max_tokens=args.max_tokens, sizes=(args.n_calib,))
    an = analyze(src, work, cfg, show_progress=False)
    analysis = {"wall_s": time.perf_counter() - t0, **an.timings, "n_params": src.n_params,
                "tokens": args.max_tokens, "samples": len(an.mixture["candidates"][0]["members"])}
    print(f"   analysis {analysis['wall_s']:.0f} s, peak RSS {analysis['peak_rss_mb']:.0f} MB", flush=True)
    im = load_imatrix(an.imatrix_path)

    task = pick(load_gsm8k("eval"), args.n_eval, "bench")
    gen = pick(load_general("eval"), args.n_eval, "bench")
    ref_logits = {"task": sample_logits(ref, task), "general": sample_logits(ref, gen)}
    rows = []

    def measure(label: str, kind: str, path: Path, extra: dict | None = None) -> None:
        rep = inspect_gguf(path)
        row = {"label": label, "kind": kind, "file": path.name, "file_bytes": path.stat().st_size,
               "tensor_bytes": rep["bytes"], "bpw": rep["bpw"], **(extra or {})}
        for k, samples in (("task", task), ("general", gen)):
            m = kld_vs_reference(ref_logits[k], path, samples)
            row[f"{k}_kld"], row[f"{k}_top1"], row[f"{k}_ppl"] = m["kld"], m["top1"], m["ppl"]
        rows.append(row)
        print(f"   {label:28s} {row['bpw']:6.3f} bpw  task KLD {row['task_kld']:.4f}  general KLD {row['general_kld']:.4f}", flush=True)

    # llama.cpp's mixes, with and without the imatrix
    for mix in MIXES:
        for use_im in (False, True):
            p = work / f"llama-{mix}{'-imat' if use_im else ''}.gguf"
            r = quantize_baseline(ref, p, mix, imatrix=im if use_im else None)
            measure(f"llama.cpp {mix}{' +imatrix' if use_im else ''}", "llama.cpp", p, {"export_s": r.seconds})

    # TASA and perplexity-only plans at llama.cpp's sizes and at fixed bit rates
    targets = [(f"= {m}", {"nbytes": next(r["tensor_bytes"] for r in rows if r["label"] == f"llama.cpp {m} +imatrix")}) for m in MIXES]
    targets += [(f"{b} bpw", {"bpw": b}) for b in (3.0, 3.5, 4.0)]
    skipped = []
    for tag, budget in targets:
        for mode in ("tasa", "ppl"):
            try:
                plan = make_plan(an, src, mode=mode, **budget)
            except TasaError as exc:
                skipped.append({"plan": f"{mode} {tag}", "reason": str(exc)})
                print(f"   {mode} {tag}: infeasible ({exc})", flush=True)
                continue
            p = work / f"{mode}-{tag.replace('= ', 'eq-').replace(' ', '')}.gguf"
            r = export_gguf(src, plan, p, imatrix=im, show_progress=False)
            measure(f"{'TASA' if mode == 'tasa' else 'ppl-only'} {tag}", mode, p, {"export_s": r.seconds})

    # export speed: the same uniform type through our exporter and through llama_model_quantize
    ref_src = ModelSource.open(ref)
    t_ours = export_gguf(ref_src, BitPlan.uniform(ref_src, "Q4_K"), work / "ours-q4k.gguf", show_progress=False).seconds
    t_llama = quantize_baseline(ref, work / "llama-q4k-pure.gguf", "Q4_K", pure=True).seconds
    export = {"ours_s": t_ours, "llama_model_quantize_s": t_llama, "ratio": t_ours / t_llama}

    # speed of TASA files vs llama.cpp mixes of equal size, and bandwidth use
    bw = bandwidth_gbs()
    threads = args.threads or os.cpu_count() or 1
    for row in rows:
        timed = row["label"].startswith("TASA = ") or (row["kind"] == "llama.cpp" and "+imatrix" not in row["label"])
        if timed:
            s = speed(work / row["file"], threads, reps=args.reps)
            row.update({k: v for k, v in s.items()})
            row["decode_bw_frac"] = row["tensor_bytes"] * s["tg"] / (bw * 1e9)
    return {"model": src.describe(), "analysis": analysis, "mixture": an.mixture["chosen"] | {"members": len(an.mixture["chosen"]["members"])},
            "lambda": an.lam, "rows": rows, "skipped": skipped, "export": export, "bandwidth_gbs": bw}


def write_report(res: dict, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    lines = [f"Machine: {res['machine']['cpu']}, {res['machine']['cores']} cores, threads {res['machine']['threads']}", ""]
    for m in res["models"]:
        lines += [f"### {m['model']['name']} ({m['model']['n_params'] / 1e6:.0f}M params)", "",
                  "| file | bits/weight | MiB | task KLD | task top-1 | general KLD | general PPL | pp t/s | tg t/s | decode B/s ÷ bandwidth |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(m["rows"], key=lambda r: r["bpw"]):
            sp = (f"{r['pp']:.0f} ± {r['pp_sd']:.0f} | {r['tg']:.1f} ± {r['tg_sd']:.1f} | {r['decode_bw_frac']:.2f}"
                  if "pp" in r else " | | ")
            lines.append(f"| {r['label']} | {r['bpw']:.3f} | {r['file_bytes'] / 2**20:.1f} | {r['task_kld']:.4f} | "
                         f"{r['task_top1']:.3f} | {r['general_kld']:.4f} | {r['general_ppl']:.2f} | {sp} |")
        a, e = m["analysis"], m["export"]
        lines += ["", f"Analysis: {a['wall_s']:.0f} s wall ({a['n_backward']} backward passes of ≤{a['tokens']} tokens, "
                  f"sensitivity {a['sensitivity_s']:.0f} s), peak RSS {a['peak_rss_mb']:.0f} MB. "
                  f"Chosen mixture: task ratio {m['mixture']['task_ratio']}, lambda {m['lambda']}.",
                  f"Export of uniform Q4_K: tasa-edge {e['ours_s']:.1f} s vs llama_model_quantize {e['llama_model_quantize_s']:.1f} s "
                  f"(ratio {e['ratio']:.2f}). Measured read bandwidth {m['bandwidth_gbs']:.1f} GB/s.", ""]
        for s in m["skipped"]:
            lines.append(f"- not feasible: {s['plan']} — {s['reason']}")
        lines.append("")
    (out / "results.md").write_text("\n".join(lines))
    plot(res, out)


def plot(res: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for m in res["models"]:
        fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
        for kind, marker in (("llama.cpp", "s"), ("tasa", "o"), ("ppl", "^")):
            rs = [r for r in m["rows"] if r["kind"] == kind]
            for i, key in enumerate(("task_kld", "general_kld")):
                ax[i].scatter([r["bpw"] for r in rs], [r[key] for r in rs], marker=marker,
                              label={"tasa": "TASA", "ppl": "perplexity-only", "llama.cpp": "llama.cpp mixes"}[kind])
        for i, t in enumerate(("task (GSM8K answers) KLD", "general-text KLD")):
            ax[i].set_xlabel("bits/weight (file)")
            ax[i].set_ylabel(t)
            ax[i].set_yscale("log")
            ax[i].legend()
        fig.suptitle(f"{m['model']['name']}: quality vs size")
        fig.tight_layout()
        fig.savefig(out / f"{m['model']['name'].replace(' ', '_')}-pareto.png", dpi=100)
        plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m"])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--n-calib", type=int, default=8)
    ap.add_argument("--n-eval", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
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
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    res = {"machine": {"cpu": cpu, "cores": os.cpu_count(), "threads": args.threads or os.cpu_count()},
           "args": {k: str(v) for k, v in vars(args).items()}, "models": []}
    for name in args.models:
        res["models"].append(run_model(name, args.out, args))
        write_report(res, args.out)
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
