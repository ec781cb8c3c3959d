"""Cross-task table: is a plan calibrated on a task better *on that task*?

Three plans at the same budget (default Qwen2.5-Coder-1.5B at 3.5 bits/weight):

* ``tasa-gsm8k``: TASA, analysis with GSM8K task data (the default calibration split);
* ``tasa-humaneval``: TASA, analysis with HumanEval task data (its 64 calibration problems, through
  ``analyze --task-data``'s path: ``load_user_file`` + ``split_samples(.., "calib")``);
* ``ppl-only``: perplexity sensitivity only (from the GSM8K analysis; general text either way).

each exported as GGUF and evaluated on both tasks' held-out splits: GSM8K accuracy by
lm-eval-harness (strict-match, flexible-extract), HumanEval pass@1 (execution in a limited child
process), each with a Wilson 95% interval, paired McNemar exact tests between plans on the same
questions, and task KLD against the F32 reference (GSM8K held-out answers, HumanEval held-out
canonical solutions).

Everything is saved as it comes under ``--out`` and skipped on a re-run of the same command
(analyses, plans, files, KLDs; generations resume question by question through ``tasa-edge eval``'s
journal), so the many hours it takes at full size can be spread over several runs.  After every
step ``results.json`` and ``results.md`` are rewritten with what exists so far; the table says
``n`` per cell and marks what has not run.

    python benchmarks/crosstask.py                                   # Qwen, 3.5 bpw, full eval splits
    python benchmarks/crosstask.py --model smollm2-135m --bpw 5 --limit 1 --max-gen-tokens 32 --n-kld 2 --n-calib 2 --out /tmp/ct   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scipy.stats import binomtest  # noqa: E402

from exporters.gguf_export import export_gguf  # noqa: E402
from exporters.reference import reference_gguf  # noqa: E402
from tasa_edge import humaneval as he  # noqa: E402
from tasa_edge.analysis import pick  # noqa: E402
from tasa_edge.data import TextSample, load_gsm8k, load_user_file, split_samples  # noqa: E402
from tasa_edge.evaluate import kld_vs_reference, reference_logprobs  # noqa: E402
from tasa_edge.fsutil import atomic_path  # noqa: E402
from tasa_edge.inspect import inspect_gguf  # noqa: E402
from tasa_edge.lmeval import eval_gsm8k, eval_humaneval  # noqa: E402
from tasa_edge.model import ModelSource  # noqa: E402
from tasa_edge.plan import BitPlan  # noqa: E402
from tasa_edge.planner import make_plan  # noqa: E402
from tasa_edge.results import Analysis, AnalysisConfig  # noqa: E402
from tasa_edge.zoo import resolve_model  # noqa: E402

PLANS = {"tasa-gsm8k": ("gsm8k", "tasa"), "tasa-humaneval": ("humaneval", "tasa"), "ppl-only": ("gsm8k", "ppl")}
TASKS = ("gsm8k", "humaneval")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def save_json(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n", encoding="utf-8")


def humaneval_samples(split: str) -> list[TextSample]:
    """HumanEval problems as scoring samples: prompt, then the canonical solution."""
    return [TextSample("humaneval", p.task_id, p.prompt, p.canonical_solution)
            for p in he.split_problems(he.load_problems(), split)]


def analysis_for(task: str, src: ModelSource, work: Path, cfg: AnalysisConfig) -> Analysis:
    from tasa_edge.analysis import analyze

    d = work / f"analysis-{task}"
    if (d / "analysis.json").exists():
        log(f"   analysis ({task}): cached")
        return Analysis.load(d / "analysis.json")
    data = None
    if task == "humaneval":
        f = work / "humaneval-calib.jsonl"
        he.write_task_data(f)
        data = split_samples(load_user_file(f), "calib")  # exactly what analyze --task-data does
    log(f"   analysis ({task} task data)")
    t0 = time.perf_counter()
    an = analyze(src, d, cfg, task=data, show_progress=False)
    log(f"   analysis ({task}): {time.perf_counter() - t0:.0f} s, task ratio {an.mixture.chosen.task_ratio}, lambda {an.lam:.2f}")
    return an


def mcnemar(a: list[bool], b: list[bool]) -> dict:
    """Paired exact McNemar test on the same questions: discordant counts and the two-sided p."""
    n01 = sum(1 for x, y in zip(a, b) if not x and y)
    n10 = sum(1 for x, y in zip(a, b) if x and not y)
    p = binomtest(n10, n10 + n01, 0.5).pvalue if n01 + n10 else 1.0
    return {"a_only": n10, "b_only": n01, "n": len(a), "p": p}


def correct_by_id(run_dir: Path, task: str) -> dict[str, bool]:
    rows = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    if task == "gsm8k":
        return {r["id"]: bool(r["flexible-extract"]["exact_match"]) for r in rows}
    return {r["id"]: bool(r["passed"]) for r in rows}


def report(res: dict, out: Path) -> None:
    save_json(out / "results.json", res)
    a = res["args"]
    lines = [f"# Cross-task table: {res['model']} at {a['bpw']} bits/weight", "",
             f"`python benchmarks/crosstask.py {' '.join(res['argv'])}`; status: **{res['status']}**.",
             "GSM8K: lm-eval-harness, flexible-extract (strict-match in brackets), held-out split; HumanEval: pass@1,"
             " held-out 100 problems; Wilson 95% intervals; task KLD vs the F32 reference.", "",
             "| plan | bits/weight | GSM8K acc | HumanEval pass@1 | GSM8K task KLD | HumanEval task KLD |",
             "|---|---|---|---|---|---|"]
    for name, p in res["plans"].items():
        cells = []
        for t in TASKS:
            e = p.get("eval", {}).get(t)
            if not e:
                cells.append("not run")
                continue
            s = e["scores"]["flexible-extract" if t == "gsm8k" else "pass@1"]
            c = f"{s['accuracy']:.3f} [{s['lo']:.3f}, {s['hi']:.3f}] (n={s['n']})"
            if t == "gsm8k":
                c += f" ({e['scores']['strict-match']['accuracy']:.3f})"
            cells.append(c)
        kl = [f"{p['kld'][t]['kld']:.4f}" if t in p.get("kld", {}) else "not run" for t in TASKS]
        bpw = f"{p['bpw']:.3f}" if "bpw" in p else "not run"
        lines.append(f"| {name} | {bpw} | {cells[0]} | {cells[1]} | {kl[0]} | {kl[1]} |")
    if res.get("paired"):
        lines += ["", "Paired exact McNemar tests (same questions; a_only / b_only = questions only that plan got right):", ""]
        for t, rows in res["paired"].items():
            for r in rows:
                lines.append(f"- {t}: {r['a']} vs {r['b']}: {r['a_only']} / {r['b_only']} of {r['n']}, p = {r['p']:.3g}")
    if res.get("missing"):
        lines += ["", "Not run yet: " + "; ".join(res["missing"]) + "."]
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--bpw", type=float, default=3.5)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/crosstask"))
    ap.add_argument("--n-calib", type=int, default=8, help="analysis: general and task pool samples")
    ap.add_argument("--max-tokens", type=int, default=384,
                    help="analysis: tokens per sample (HumanEval prompts are long: every sample must keep answer tokens)")
    ap.add_argument("--limit", type=int, default=None, help="score only the first N held-out questions of each task")
    ap.add_argument("--max-gen-tokens", type=int, default=None,
                    help="tokens generated per question (default: tasa-edge eval's, gsm8k 256 / humaneval 512)")
    ap.add_argument("--n-kld", type=int, default=6, help="held-out texts per task for the task KLD")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--plans", nargs="+", default=list(PLANS), choices=list(PLANS))
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--skip-eval", action="store_true", help="analyses, files and KLD only")
    args = ap.parse_args(argv)
    os.environ.setdefault("TASA_NO_PROGRESS", "1")

    src = ModelSource.open(resolve_model(args.model))
    out = args.out / args.model
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    res = {"model": args.model, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "argv": sys.argv[1:] if argv is None else argv, "status": "running", "plans": {}, "paired": {}, "missing": []}
    log(f"== {src.name}: F32 reference")
    ref = reference_gguf(src)
    cfg = AnalysisConfig(n_general=args.n_calib, n_task=args.n_calib, n_target=max(4, args.n_calib // 2),
                         max_tokens=args.max_tokens, sizes=(args.n_calib,),
                         fisher_dtype="bfloat16" if src.n_params > 1e9 else "float32")
    analyses = {t: analysis_for(t, src, work, cfg) for t in sorted({PLANS[p][0] for p in args.plans})}

    kld_sets = {"gsm8k": pick(load_gsm8k("eval"), args.n_kld, "bench"), "humaneval": pick(humaneval_samples("eval"), args.n_kld, "bench")}
    ref_lp = None
    for name in args.plans:
        task, mode = PLANS[name]
        gguf = work / f"{name}.gguf"
        plan_path = work / f"{name}.plan.json"
        if not gguf.exists():
            plan = make_plan(analyses[task], src, mode=mode, bpw=args.bpw)
            plan.save(plan_path)
            export_gguf(src, plan, gguf, imatrix=plan.export_imatrix(None), show_progress=False)
            log(f"   exported {gguf.name}")
        rep = inspect_gguf(gguf)
        p = res["plans"][name] = {"file": str(gguf), "bpw": rep["bpw"], "tensor_bytes": rep["bytes"],
                                  "lambda": BitPlan.load(plan_path).provenance.get("lambda") if plan_path.exists() else None}
        kf = work / f"{name}.kld.json"
        if kf.exists():
            p["kld"] = json.loads(kf.read_text())
        else:
            if ref_lp is None:
                log("   reference log-probs")
                ref_lp = {t: reference_logprobs(ref, s, n_threads=args.threads) for t, s in kld_sets.items()}
            p["kld"] = {t: kld_vs_reference(ref_lp[t], gguf, n_threads=args.threads) for t in TASKS}
            save_json(kf, p["kld"])
        log(f"   {name}: {rep['bpw']:.3f} bpw, task KLD gsm8k {p['kld']['gsm8k']['kld']:.4f}, humaneval {p['kld']['humaneval']['kld']:.4f}")
        report(res, out)

    for t in args.tasks:
        for name in args.plans:
            if args.skip_eval:
                res["missing"].append(f"{name} on {t}")
                continue
            rd = out / "eval" / f"{name}-{t}"
            log(f"   eval {name} on {t} (resumes {rd})")
            fn = eval_gsm8k if t == "gsm8k" else eval_humaneval
            kw = {"max_gen_toks": args.max_gen_tokens} if args.max_gen_tokens else {}
            r = fn(res["plans"][name]["file"], rd, limit=args.limit, n_threads=args.threads, **kw)
            res["plans"][name].setdefault("eval", {})[t] = {"scores": {k: vars(v) for k, v in r.scores.items()},
                                                             "dir": str(rd), "seconds": r.seconds}
            log(f"   {name} on {t}: " + ", ".join(f"{k} {v}" for k, v in r.scores.items()))
            report(res, out)
        done = [n for n in args.plans if t in res["plans"][n].get("eval", {})]
        rows = []
        for i, a in enumerate(done):
            for b in done[i + 1:]:
                ca = correct_by_id(out / "eval" / f"{a}-{t}", t)
                cb = correct_by_id(out / "eval" / f"{b}-{t}", t)
                ids = sorted(set(ca) & set(cb))
                rows.append({"a": a, "b": b, **mcnemar([ca[k] for k in ids], [cb[k] for k in ids])})
        res["paired"][t] = rows
    full = args.limit is None and args.max_gen_tokens is None and not args.skip_eval and set(args.plans) == set(PLANS) and set(args.tasks) == set(TASKS)
    res["status"] = "complete" if full else "partial (limited run)"
    report(res, out)
    log(f"wrote {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
