"""Analysis scaling evidence: fidelity of the compact Fisher statistics, gradient-pass cost against a
plain forward+backward, and the error of the row-sampled sensitivity pass -- on one model per run.

    python benchmarks/scaling.py --model smollm2-135m --budgets 4.5 5.0 5.5 --out benchmarks/scaling

1. One analysis with **exact** Fisher statistics (its own process: wall time and peak RSS).
2. From the same gradient pass, the **factored** and **block** forms (sums of the exact one, so
   the three differ only in the form) give three sensitivity tables and TASA plans at each budget.
3. Every plan is exported (with the analysis' imatrix) and its held-out task KLD measured against
   the F32 reference on ``--n-eval`` GSM8K eval answers (the README's path, :mod:`tasa_edge.evaluate`).
4. Per-sample cost: the analysis' gradient pass vs a plain forward+backward of the same model,
   dtype and tokens (no statistics), timed in the same process.
5. The sensitivity pass on a 25% row sample vs all rows: per (tensor, format) relative error and
   the plan it gives.

Results: ``<out>/<model>.json`` and ``<out>/<model>.md``; printed as they come. Resumable: the
analysis result and every measured plan are saved in ``<out>/work-<model>/progress.json`` as they
come, and a re-run skips what is there.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TASA_NO_PROGRESS", "1")

from exporters.gguf_export import export_gguf  # noqa: E402
from exporters.reference import reference_gguf  # noqa: E402
from tasa_edge.data import load_gsm8k  # noqa: E402
from tasa_edge.evaluate import kld_vs_reference, reference_logprobs  # noqa: E402
from tasa_edge.imatrix import load_imatrix  # noqa: E402
from tasa_edge.model import ModelSource  # noqa: E402
from tasa_edge.planner import make_plan  # noqa: E402
from tasa_edge.results import Analysis, AnalysisConfig  # noqa: E402
from tasa_edge.zoo import resolve_model  # noqa: E402


def _child(fn, *args):
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def _analyse(model: str, work: str, cfg: AnalysisConfig) -> dict:
    """The exact analysis, then the compact forms' tables from the same statistics (one process)."""
    import torch

    from tasa_edge import analysis as A
    from tasa_edge.torch_model import gguf_params, load_torch_model, reference_weights

    src = ModelSource.open(resolve_model(model))
    t0 = time.perf_counter()
    an = A.analyze(src, Path(work), cfg, show_progress=False)
    wall = time.perf_counter() - t0
    cfg = replace(cfg, dtype=an.config["dtype"])
    model_, tok = load_torch_model(src, dtype=cfg.dtype)
    params = gguf_params(model_, src)
    key = f"{src.fingerprint}/{cfg.key()}"
    cache = next(Path(work).glob("gradstats-*.safetensors"))
    st = A.load_cache(cache, list(params), key, cfg)
    weights = reference_weights(model_, src, params)
    imatrix = load_imatrix(an.imatrix_path)
    menu = an.config["formats"]
    out = {"exact": {"wall_s": wall, "peak_rss_mb": an.timings["peak_rss_mb"], "timings": an.timings}}
    exact = dict(st.fisher)
    for form in ("factored", "block"):
        st.fisher = {k: acc.compact(form) for k, acc in exact.items()}
        t1 = time.perf_counter()
        table = A.sensitivities(src, weights, st, menu, replace(cfg, fisher=form), imatrix, show_progress=False)
        replace(an, table=table, config={**an.config, "fisher": form}).save(Path(work) / f"analysis-{form}.json")
        out[form] = {"sensitivity_s": time.perf_counter() - t1,
                     "stat_bytes": sum(a.nbytes() for a in st.fisher.values())}
    out["exact"]["stat_bytes"] = sum(a.nbytes() for a in exact.values())
    # 25% row sample of the factored table
    st.fisher = {k: acc.compact("factored") for k, acc in exact.items()}
    t1 = time.perf_counter()
    table = A.sensitivities(src, weights, st, menu, replace(cfg, fisher="factored", sensitivity_rows=0.25), imatrix,
                            show_progress=False)
    replace(an, table=table).save(Path(work) / "analysis-factored-rows25.json")
    out["rows25"] = {"sensitivity_s": time.perf_counter() - t1}
    # per-sample cost: the gradient pass vs a plain forward+backward of the same samples (3 pool
    # samples, so collect's per-call setup is shared as in a real run); CPU time of the process
    # (both threads) as well as wall time: on a shared machine the CPU time is the steadier one
    pools = A.build_pools(cfg)
    samples = pools["general"][:3]
    prefix = A.special_prefix(tok)
    batch = [A.encode(tok, s, cfg.max_tokens, prefix)[0] for s in samples]
    for p in model_.parameters():
        p.requires_grad_(False)

    def plain():
        for p in params.values():
            p.requires_grad_(True)
        for ids in batch:
            model_.zero_grad(set_to_none=True)
            logits = model_(input_ids=ids).logits[0, :-1].float()
            torch.nn.functional.cross_entropy(logits, ids[0, 1:]).backward()
        model_.zero_grad(set_to_none=True)
        for p in params.values():
            p.requires_grad_(False)

    def ours():
        A.collect(model_, tok, params, {"general": samples}, replace(cfg, fisher="factored"), show_progress=False)

    def timed(fn):
        w, c = time.perf_counter(), time.process_time()
        fn()
        return time.process_time() - c, time.perf_counter() - w

    plain(), ours()                                    # warm-up
    runs = [(timed(plain), timed(ours)) for _ in range(3)]   # alternated: a change of load hits both
    (pc, pw), (oc, ow) = min(r[0] for r in runs), min(r[1] for r in runs)
    k = len(batch)
    out["per_sample"] = {"tokens": [int(ids.shape[1]) for ids in batch], "plain_fwd_bwd_s": pw / k,
                         "gradient_pass_s": ow / k, "plain_cpu_s": pc / k, "gradient_pass_cpu_s": oc / k,
                         "ratio": ow / pw, "ratio_cpu": oc / pc}
    return out


def _row_sample_error(work: Path) -> dict:
    """Relative error of the 25%-row estimate of every (tensor, format) sensitivity (task and
    perplexity) against the all-rows one, over the tensors that were sampled (others are exact)."""
    import numpy as np

    full = Analysis.load(work / "analysis-factored.json").table
    est = Analysis.load(work / "analysis-factored-rows25.json").table
    rel, tot_f, tot_e = [], 0.0, 0.0
    for col_f, col_e in ((full.task, est.task), (full.ppl, est.ppl)):
        for n, row in col_f.items():
            for f, v in row.items():
                tot_f, tot_e = tot_f + v, tot_e + col_e[n][f]
                if v > 0 and col_e[n][f] != v:
                    rel.append(abs(col_e[n][f] / v - 1))
    r = np.array(rel or [0.0])
    return {"n_sampled": len(rel), "median": float(np.median(r)), "p90": float(np.percentile(r, 90)),
            "max": float(r.max()), "total": tot_e / tot_f - 1}


def _redo_rows(model: str, work: Path, cfg: AnalysisConfig) -> dict:
    """Re-make the 25%-row table from the saved gradient statistics (after a change of the row
    sampler) and return its error against the all-rows table."""
    from tasa_edge import analysis as A
    from tasa_edge.torch_model import gguf_params, load_torch_model, reference_weights

    an = Analysis.load(work / "analysis.json")
    cfg = replace(cfg, dtype=an.config["dtype"])
    src = ModelSource.open(resolve_model(model))
    model_, _ = load_torch_model(src, dtype=cfg.dtype)
    params = gguf_params(model_, src)
    st = A.load_cache(next(work.glob("gradstats-*.safetensors")), list(params), f"{src.fingerprint}/{cfg.key()}", cfg)
    if st is None:
        raise SystemExit(f"no gradient statistics of this configuration in {work}")
    st.fisher = {k: acc.compact("factored") for k, acc in st.fisher.items()}
    t = time.perf_counter()
    table = A.sensitivities(src, reference_weights(model_, src, params), st, an.config["formats"],
                            replace(cfg, fisher="factored", sensitivity_rows=0.25), load_imatrix(an.imatrix_path),
                            show_progress=False)
    seconds = time.perf_counter() - t
    replace(an, table=table).save(work / "analysis-factored-rows25.json")
    return {"sensitivity_s": seconds, **_row_sample_error(work)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budgets", type=float, nargs="+", default=[4.5, 5.0, 5.5])
    ap.add_argument("--n-calib", type=int, default=8)
    ap.add_argument("--n-target", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--n-eval", type=int, default=100, help="held-out GSM8K answers for the task KLD")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/scaling"))
    ap.add_argument("--redo-rows", action="store_true",
                    help="only re-make the 25%%-row table from the saved statistics and print its error (the plans made "
                         "from it are dropped, so a later run re-measures them)")
    args = ap.parse_args(argv)
    work = args.out / f"work-{args.model}"
    work.mkdir(parents=True, exist_ok=True)
    cfg = AnalysisConfig(n_general=args.n_calib, n_task=args.n_calib, n_target=args.n_target,
                         max_tokens=args.max_tokens, sizes=(args.n_calib,), fisher="exact")
    res = {"model": args.model, "config": {**vars(args), "out": str(args.out)}}
    progress_path = work / "progress.json"
    progress = json.loads(progress_path.read_text()) if progress_path.is_file() else {"rows": []}

    def save_progress():
        tmp = progress_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(progress, indent=1))
        os.replace(tmp, progress_path)

    if args.redo_rows:
        rows25 = _redo_rows(args.model, work, cfg)
        progress["analysis"]["rows25"] = {"sensitivity_s": rows25["sensitivity_s"]}
        progress["rows"] = [r for r in progress.get("rows", []) if "rows" not in r["form"]]
        save_progress()
        print(json.dumps(rows25, indent=1))
        return 0
    if "analysis" not in progress:
        progress["analysis"] = _child(_analyse, args.model, str(work), cfg)
        save_progress()
    res["analysis"] = progress["analysis"]
    print(json.dumps(res["analysis"], indent=1), flush=True)

    src = ModelSource.open(resolve_model(args.model))
    ref = reference_gguf(src)
    eval_set = load_gsm8k("eval")[: args.n_eval]
    held = reference_logprobs(ref, eval_set)
    rows = progress["rows"]
    done = {(r["form"], r["bpw"]) for r in rows}
    for form, name in (("exact", "analysis.json"), ("factored", "analysis-factored.json"), ("block", "analysis-block.json"),
                       ("factored, 25% rows", "analysis-factored-rows25.json")):
        an = Analysis.load(work / name)
        for bpw in args.budgets:
            if (form, bpw) in done:
                continue
            plan = make_plan(an, src, bpw=bpw)
            out = work / f"{form.split(',')[0]}-{'r25-' if 'rows' in form else ''}{bpw:g}.gguf"
            export_gguf(src, plan, out, imatrix=plan.export_imatrix(None), show_progress=False)
            m = kld_vs_reference(held, out)
            rows.append({"form": form, "bpw": bpw, "file_bpw": plan.predicted["bpw"], "task_kld": m["kld"],
                         "task_kld_se": m["kld_se"], "types": plan.types_used()})
            print(f"{form:>20} {bpw:4.2f} bpw: task KLD {m['kld']:.5f} ± {m['kld_se']:.5f}", flush=True)
            out.unlink()
            save_progress()
    res["plans"] = rows
    exact = {r["bpw"]: r["task_kld"] for r in rows if r["form"] == "exact"}
    for r in rows:
        r["vs_exact"] = r["task_kld"] / exact[r["bpw"]] - 1
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.model}.json").write_text(json.dumps(res, indent=1))
    a = res["analysis"]
    md = [f"# Analysis scaling: {args.model}", "",
          f"`python benchmarks/scaling.py --model {args.model} --budgets {' '.join(f'{b:g}' for b in args.budgets)} "
          f"--n-calib {args.n_calib} --n-target {args.n_target} --max-tokens {args.max_tokens} --n-eval {args.n_eval}`", "",
          "| statistics | bpw | task KLD (± se) | vs exact |", "|---|---|---|---|"]
    md += [f"| {r['form']} | {r['bpw']:g} | {r['task_kld']:.5f} ± {r['task_kld_se']:.5f} | {100 * r['vs_exact']:+.1f}% |"
           for r in rows]
    ps = a["per_sample"]
    err = _row_sample_error(work)
    res["row_sample_error"] = err
    (args.out / f"{args.model}.json").write_text(json.dumps(res, indent=1))
    md += ["", f"Statistics bytes: exact {a['exact']['stat_bytes'] / 2**20:.1f} MiB, factored "
               f"{a['factored']['stat_bytes'] / 2**20:.2f} MiB, block {a['block']['stat_bytes'] / 2**20:.1f} MiB.",
           f"Per sample ({ps['tokens']} tokens): gradient pass {ps['gradient_pass_s']:.2f} s vs plain forward+backward "
           f"{ps['plain_fwd_bwd_s']:.2f} s: ratio {ps['ratio']:.2f} wall, "
           f"{ps.get('ratio_cpu', float('nan')):.2f} in process CPU time.",
           f"Sensitivity pass (factored): all rows {a['factored']['sensitivity_s']:.0f} s, 25% of rows "
           f"{a['rows25']['sensitivity_s']:.0f} s. Row-sample estimate vs all rows, over the "
           f"{err['n_sampled']} (tensor, format) entries of sampled tensors: relative error median "
           f"{100 * err['median']:.2f}%, 90th percentile {100 * err['p90']:.2f}%, max {100 * err['max']:.2f}%; "
           f"on the total predicted loss {100 * err['total']:+.2f}%.",
           f"Exact analysis: {a['exact']['wall_s']:.0f} s wall, peak RSS {a['exact']['peak_rss_mb']:.0f} MiB."]
    (args.out / f"{args.model}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
