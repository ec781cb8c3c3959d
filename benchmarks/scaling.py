"""Analysis scaling evidence: fidelity of the compact Fisher statistics, gradient-pass cost against a
plain forward+backward, and the error of the row-sampled sensitivity pass -- on one model per run.

    python benchmarks/scaling.py --model smollm2-135m --budgets 4.5 5.0 5.5 --out benchmarks/scaling
    python benchmarks/scaling.py --model qwen2.5-coder-1.5b --budgets 3.5 4.0 4.5 --forms factored-rows --defaults-run

0. ``--defaults-run``: ``tasa-edge analyze MODEL --sensitivity-rows ROWS`` at the CLI's default
   sizes in its own process (wall time, peak RSS, bytes per parameter, gradient-cache bytes), and
   the dry-run prediction for LLaMA-3-8B's config on a 24 GB GPU.
1. One analysis with **exact** Fisher statistics (its own process: wall time and peak RSS).
2. From the same gradient pass, the compact tables of ``--forms``: **factored** and **block** on
   all rows, **factored-rows** (factored, on ``--rows`` of each large tensor's rows: the
   stratified sample). They are sums of the exact statistics, so the tables differ only in the
   form (and the row sample), and give TASA plans at each budget.
3. Every plan is exported (with the analysis' imatrix) and its held-out task KLD measured against
   the reference on ``--n-eval`` GSM8K eval answers (the README's path, :mod:`tasa_edge.evaluate`).
4. Per-sample cost: the analysis' gradient pass vs a plain forward+backward of the same model,
   dtype and tokens (no statistics), timed in the same process.
5. With both factored tables: the row-sampled sensitivities' error against all rows.

Results: ``<out>/<model>.json`` and ``<out>/<model>.md``; printed as they come. Resumable: the
analysis result and every measured plan are saved in ``<out>/work-<model>/progress.json`` as they
come, and a re-run skips what is there.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
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


#: the compact tables a run can make from the exact statistics: (Fisher form, rows scored)
TABLES = {"factored": ("factored", 1.0), "block": ("block", 1.0), "factored-rows": ("factored", None)}


def _analyse(model: str, work: str, cfg: AnalysisConfig, forms: list[str], rows: float) -> dict:
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
    out["exact"]["stat_bytes"] = sum(a.nbytes() for a in exact.values())
    for name in forms:
        form, frac = TABLES[name]
        frac = rows if frac is None else frac
        st.fisher = {k: acc.compact(form) for k, acc in exact.items()}
        t1 = time.perf_counter()
        c = replace(cfg, fisher=form, sensitivity_rows=frac)
        table = A.sensitivities(src, weights, st, menu, c, imatrix, show_progress=False)
        replace(an, table=table, config={**an.config, "fisher": form, "sensitivity_rows": frac}).save(
            Path(work) / f"analysis-{name}.json")
        out[name] = {"sensitivity_s": time.perf_counter() - t1, "rows": frac,
                     "stat_bytes": sum(a.nbytes() for a in st.fisher.values())}
    del exact
    st.fisher = {}
    out["per_sample"] = _per_sample(model_, tok, params, A.resolve_checkpoint(src, cfg))
    return out


#: alternated timing rounds of the per-sample measurement
ROUNDS = 5


def _per_sample(model_, tok, params, cfg: AnalysisConfig) -> dict:
    """Per-sample cost: the gradient pass vs a plain forward+backward of the same samples (3 pool
    samples, so collect's per-call setup is shared as in a real run); CPU time of the process
    (both threads) as well as wall time: on a shared machine the CPU time is the steadier one."""
    import torch

    from tasa_edge import analysis as A

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

    encoded = A.encode_pools(tok, {"general": samples}, cfg.max_tokens)

    def ours():
        A.collect(model_, encoded, params, {"general": samples}, replace(cfg, fisher="factored"), show_progress=False)

    def plain_batched():
        """The same samples as one right-padded batch (what batching would buy a plain pass; the
        analysis needs each sample's own gradient, so it could only batch through per-sample
        gradient tricks that cost more memory)."""
        for p in params.values():
            p.requires_grad_(True)
        model_.zero_grad(set_to_none=True)
        x = torch.zeros(len(batch), max(ids.shape[1] for ids in batch), dtype=torch.long)
        am = torch.zeros_like(x)
        for i, ids in enumerate(batch):
            x[i, :ids.shape[1]], am[i, :ids.shape[1]] = ids[0], 1
        logits = model_(input_ids=x, attention_mask=am).logits[:, :-1].float()
        tgt = x[:, 1:].masked_fill(am[:, 1:] == 0, -100)
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1)).backward()
        del logits
        model_.zero_grad(set_to_none=True)
        for p in params.values():
            p.requires_grad_(False)

    def timed(fn):
        w, c = time.perf_counter(), time.process_time()
        fn()
        return time.process_time() - c, time.perf_counter() - w

    plain(), ours(), plain_batched()                   # warm-up
    # alternated rounds (a slow spell of the machine hits all three); the plain pass' time varies
    # by ±20% between rounds (its dense embedding gradient and logits chain are fresh allocations),
    # so the figures are medians over the rounds, with the range of the per-round ratio
    runs = [(timed(plain), timed(ours), timed(plain_batched)) for _ in range(ROUNDS)]
    (pc, pw), (oc, ow), (bc, bw) = ((statistics.median(r[i][0] for r in runs), statistics.median(r[i][1] for r in runs))
                                    for i in range(3))
    per_round = sorted(r[1][1] / r[0][1] for r in runs)
    k = len(batch)
    return {"tokens": [int(ids.shape[1]) for ids in batch], "plain_fwd_bwd_s": pw / k,
                         "gradient_pass_s": ow / k, "plain_cpu_s": pc / k, "gradient_pass_cpu_s": oc / k,
                         "ratio": ow / pw, "ratio_cpu": oc / pc, "plain_batched_s": bw / k,
                         "batched_vs_one_by_one": bw / pw, "rounds": ROUNDS,
                         "ratio_range": [per_round[0], per_round[-1]]}


def _per_sample_alone(model: str, cfg: AnalysisConfig) -> dict:
    """:func:`_per_sample` in a fresh process on the freshly loaded model (``--per-sample-only``)."""
    from tasa_edge import analysis as A
    from tasa_edge.torch_model import gguf_params, load_torch_model, pick_device, pick_dtype

    src = ModelSource.open(resolve_model(model))
    cfg = replace(cfg, dtype=str(pick_dtype(pick_device("auto"), cfg.dtype)).removeprefix("torch."))
    cfg = A.resolve_checkpoint(src, cfg)
    model_, tok = load_torch_model(src, dtype=cfg.dtype)
    return {**_per_sample(model_, tok, gguf_params(model_, src), cfg), "dtype": cfg.dtype, "checkpoint": cfg.checkpoint}


def _row_sample_error(work: Path) -> dict:
    """Relative error of the row-sampled estimate of every (tensor, format) sensitivity (task and
    perplexity) against the all-rows one, over the tensors that were sampled (others are exact)."""
    import numpy as np

    full = Analysis.load(work / "analysis-factored.json").table
    est = Analysis.load(work / "analysis-factored-rows.json").table
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


def _redo_rows(model: str, work: Path, cfg: AnalysisConfig, rows: float) -> dict:
    """Re-make the row-sampled table from the saved gradient statistics (after a change of the row
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
                            replace(cfg, fisher="factored", sensitivity_rows=rows), load_imatrix(an.imatrix_path),
                            show_progress=False)
    seconds = time.perf_counter() - t
    replace(an, table=table, config={**an.config, "fisher": "factored", "sensitivity_rows": rows}).save(
        work / "analysis-factored-rows.json")
    return {"sensitivity_s": seconds, **_row_sample_error(work)}


#: LLaMA-3-8B's published config.json (meta-llama/Meta-Llama-3-8B), the shapes the dry-run needs
LLAMA3_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
             "rope_theta": 500000.0, "rms_norm_eps": 1e-05, "tie_word_embeddings": False,
             "torch_dtype": "bfloat16"}


def _defaults_run(model: str, work: Path, rows: float) -> dict:
    """``tasa-edge analyze MODEL`` at the CLI's default sizes in its own process: wall time (from
    the process start), peak RSS (its own ru_maxrss, recorded in analysis.json), bytes per
    parameter, and the gradient cache's bytes against the model's float32 bytes."""
    import shutil
    import subprocess

    out = work / "defaults"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "tasa_edge.cli", "analyze", model, "-o", str(out), "--sensitivity-rows", f"{rows:g}"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TASA_NO_PROGRESS": "1"})
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"defaults run failed ({r.returncode}): {r.stderr.strip()[-400:]}")
    an = json.loads((out / "analysis.json").read_text())
    n = int(an["model"]["n_params"])
    cache = sum(f.stat().st_size for f in out.glob("gradstats-*.safetensors"))
    t = an["timings"]
    return {"command": "tasa-edge analyze " + " ".join(cmd[4:]).replace(str(out), "OUT"), "wall_s": wall,
            "timings": t, "n_params": n, "peak_rss_mb": t["peak_rss_mb"], "checkpoint": an["config"].get("checkpoint"),
            "bytes_per_param": t["peak_rss_mb"] * 2**20 / n, "cache_bytes": cache, "cache_share_f32": cache / (4 * n),
            "samples": t["n_backward"], "seconds_per_sample": t["gradients_s"] / max(1, t["n_backward"])}


def _dry_run_peak(model: str) -> int:
    """``tasa-edge analyze MODEL --dry-run``'s predicted peak (bytes) at the CLI's defaults on this CPU."""
    from tasa_edge import footprint
    from tasa_edge.results import AnalysisConfig as C
    from tasa_edge.torch_model import pick_device, pick_dtype

    c = C()
    dtype = str(pick_dtype(pick_device("cpu"), c.dtype)).removeprefix("torch.")
    pred = footprint.predict(footprint.shapes_from_source(ModelSource.open(resolve_model(model))), tokens=c.max_tokens,
                             samples=c.n_general + c.n_task + c.n_target, device="cpu", dtype=dtype, fisher=c.fisher,
                             throughput_flops=1e12)
    return pred.peak_bytes


def _llama3_dry_run(work: Path) -> dict:
    """The dry-run prediction for LLaMA-3-8B (config only) on a 24 GB GPU, at the CLI's defaults."""
    from tasa_edge import footprint
    from tasa_edge.results import AnalysisConfig as C

    d = work / "llama-3-8b-config"
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(LLAMA3_8B, indent=1))
    c = C()
    pred = footprint.predict(footprint.shapes_from_config(d), tokens=c.max_tokens, samples=c.n_general + c.n_task + c.n_target,
                             device="cuda", dtype="bfloat16", fisher=c.fisher, throughput_flops=80e12,
                             device_memory=24 * 10**9)
    return {"peak_gib": pred.peak_bytes / 2**30, "bytes_per_param": pred.bytes_per_param, "fits_24gb": pred.fits,
            "parts_gib": {k: v / 2**30 for k, v in pred.parts.items()}, "seconds_per_sample_at_80tflops": pred.seconds_per_sample}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budgets", type=float, nargs="+", default=[4.5, 5.0, 5.5])
    ap.add_argument("--n-calib", type=int, default=8)
    ap.add_argument("--n-target", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--n-eval", type=int, default=100, help="held-out GSM8K answers for the task KLD")
    ap.add_argument("--forms", nargs="+", choices=sorted(TABLES), default=["factored", "block", "factored-rows"],
                    help="compact tables made from the exact statistics (factored-rows: factored on --rows of the rows)")
    ap.add_argument("--rows", type=float, default=0.25, help="row fraction of the row-sampled table and of --defaults-run")
    ap.add_argument("--defaults-run", action="store_true",
                    help="first time `tasa-edge analyze MODEL --sensitivity-rows ROWS` at the CLI's default sizes in its own "
                         "process (wall, peak RSS, bytes/parameter, cache bytes) and the LLaMA-3-8B dry-run")
    ap.add_argument("--only-defaults", action="store_true", help="with --defaults-run: stop after it")
    ap.add_argument("--per-sample-only", action="store_true",
                    help="only (re-)measure the per-sample cost in a fresh process (saved apart; the report uses it)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/scaling"))
    ap.add_argument("--redo-rows", action="store_true",
                    help="only re-make the row-sampled table from the saved statistics and print its error (the plans made "
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
        redo = _redo_rows(args.model, work, cfg, args.rows)
        progress["analysis"]["factored-rows"] = {"sensitivity_s": redo["sensitivity_s"], "rows": args.rows}
        progress["rows"] = [r for r in progress.get("rows", []) if "rows" not in r["form"]]
        save_progress()
        print(json.dumps(redo, indent=1))
        return 0
    defaults_path = work / "defaults.json"       # its own file: it can be re-measured alone
    if args.defaults_run and not defaults_path.is_file():
        d = {"defaults": _defaults_run(args.model, work, args.rows), "llama3_8b_dry_run": _llama3_dry_run(work)}
        tmp = defaults_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(d, indent=1))
        os.replace(tmp, defaults_path)
    if defaults_path.is_file():
        res.update(json.loads(defaults_path.read_text()))
        # shapes-only predictions: cheap, so made from the current memory model at every report
        res["llama3_8b_dry_run"] = _llama3_dry_run(work)
        res["defaults"]["dry_run_peak_mb"] = _dry_run_peak(args.model) / 2**20
        print(json.dumps({k: res[k] for k in ("defaults", "llama3_8b_dry_run")}, indent=1), flush=True)
    if args.only_defaults:
        return 0
    per_sample_path = work / "per_sample.json"
    if args.per_sample_only:
        ps = _child(_per_sample_alone, args.model, replace(cfg, fisher="factored", dtype="auto"))
        per_sample_path.write_text(json.dumps(ps, indent=1))
        print(json.dumps(ps, indent=1))
        return 0
    if "analysis" not in progress:
        progress["analysis"] = _child(_analyse, args.model, str(work), cfg, args.forms, args.rows)
        save_progress()
    res["analysis"] = a = progress["analysis"]
    print(json.dumps(a, indent=1), flush=True)

    src = ModelSource.open(resolve_model(args.model))
    ref = reference_gguf(src)
    eval_set = load_gsm8k("eval")[: args.n_eval]
    held = reference_logprobs(ref, eval_set)
    rows = progress["rows"]
    done = {(r["form"], r["bpw"]) for r in rows}
    labels = {"exact": "exact", "factored": "factored", "block": "block",
              "factored-rows": f"factored, {100 * args.rows:g}% rows"}
    tables = {name: Analysis.load(work / ("analysis.json" if name == "exact" else f"analysis-{name}.json"))
              for name in ["exact"] + [f for f in args.forms if f in a]}
    for bpw in args.budgets:                  # budget by budget: each comparison completes early
        for name, an in tables.items():
            form = labels[name]
            if (form, bpw) in done:
                continue
            plan = make_plan(an, src, bpw=bpw)
            out = work / f"{name}-{bpw:g}.gguf"
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
    cmd = (f"python benchmarks/scaling.py --model {args.model} --budgets {' '.join(f'{b:g}' for b in args.budgets)} "
           f"--n-calib {args.n_calib} --n-target {args.n_target} --max-tokens {args.max_tokens} --n-eval {args.n_eval} "
           f"--forms {' '.join(args.forms)} --rows {args.rows:g}" + (" --defaults-run" if args.defaults_run else ""))
    md = [f"# Analysis scaling: {args.model}", "", f"`{cmd}`", ""]
    if "defaults" in res:
        d, ll = res["defaults"], res["llama3_8b_dry_run"]
        t = d["timings"]
        md += [f"At the CLI's default sizes (`{d['command']}`, its own process): {d['wall_s']:.0f} s wall "
               f"(load {t['load_s']:.0f} s, gradient pass {t['gradients_s']:.0f} s = {d['seconds_per_sample']:.2f} s per "
               f"sample over {d['samples']} samples, sensitivity pass {t['sensitivity_s']:.0f} s); peak RSS "
               f"{d['peak_rss_mb']:.0f} MiB = {d['bytes_per_param']:.2f} bytes per parameter ({d['n_params'] / 1e9:.2f} B); "
               f"gradient cache {d['cache_bytes'] / 1e6:.1f} MB = {100 * d['cache_share_f32']:.1f}% of the float32 weights"
               + (f"; layers checkpointed: {d['checkpoint']}" if d.get("checkpoint") else "")
               + (f"; `--dry-run` predicted {d['dry_run_peak_mb']:.0f} MiB ({100 * (d['dry_run_peak_mb'] / d['peak_rss_mb'] - 1):+.0f}%)"
                  if "dry_run_peak_mb" in d else "") + ".",
               "", f"LLaMA-3-8B dry-run (config only, CUDA bf16, 24 GB): {ll['peak_gib']:.2f} GiB peak, "
               f"{ll['bytes_per_param']:.2f} bytes/parameter, fits: {ll['fits_24gb']}.", ""]
    md += ["| statistics | bpw | task KLD (± se) | vs exact |", "|---|---|---|---|"]
    md += [f"| {r['form']} | {r['bpw']:g} | {r['task_kld']:.5f} ± {r['task_kld_se']:.5f} | {100 * r['vs_exact']:+.1f}% |"
           for r in rows]
    ps = json.loads(per_sample_path.read_text()) if per_sample_path.is_file() else a["per_sample"]
    res["per_sample"] = ps
    md += ["", "Statistics bytes: exact " f"{a['exact']['stat_bytes'] / 2**20:.1f} MiB"
           + "".join(f", {labels[f]} {a[f]['stat_bytes'] / 2**20:.2f} MiB" for f in args.forms if f in a) + ".",
           f"Per sample ({ps['tokens']} tokens): gradient pass {ps['gradient_pass_s']:.2f} s vs plain forward+backward "
           f"{ps['plain_fwd_bwd_s']:.2f} s: ratio {ps['ratio']:.2f} wall, "
           f"{ps.get('ratio_cpu', float('nan')):.2f} in process CPU time"
           + (f" (medians of {ps['rounds']} alternated rounds; per-round ratio {ps['ratio_range'][0]:.2f}-{ps['ratio_range'][1]:.2f})"
              if "rounds" in ps else "") + f"{'; layers checkpointed' if ps.get('checkpoint') == 'on' else ''}. The same samples as one padded batch "
           f"(plain forward+backward): {ps.get('batched_vs_one_by_one', float('nan')):.2f}x the time of one by one.",
           "Sensitivity pass: " + ", ".join(f"{labels[f]} {a[f]['sensitivity_s']:.0f} s" for f in args.forms if f in a) + "."]
    if "factored" in a and "factored-rows" in a:
        err = _row_sample_error(work)
        res["row_sample_error"] = err
        md += [f"Row-sample estimate vs all rows, over the {err['n_sampled']} (tensor, format) entries of sampled tensors: "
               f"relative error median {100 * err['median']:.2f}%, 90th percentile {100 * err['p90']:.2f}%, max "
               f"{100 * err['max']:.2f}%; on the total predicted loss {100 * err['total']:+.2f}%."]
    md += [f"Exact analysis: {a['exact']['wall_s']:.0f} s wall, peak RSS {a['exact']['peak_rss_mb']:.0f} MiB."]
    (args.out / f"{args.model}.json").write_text(json.dumps(res, indent=1))
    (args.out / f"{args.model}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
