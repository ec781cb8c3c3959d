"""Evidence that decides (issue 12): the Qwen headline with intervals and paired verdicts, the
cross-task table and seed stability, from one resumable run.

Files (default Qwen2.5-Coder-1.5B; ``--model`` for another packaged model):

* ``packaged``: the packaged GGUF itself (Q4_K_M for Qwen);
* ``tasa-3.0`` / ``tasa-3.5`` / ``tasa-4.0``: TASA plans from the GSM8K analysis at the CLI defaults
  (24 general + 24 GSM8K + 12 target samples of 192 tokens, chat template on; ``--sensitivity-rows
  0.25``), exported with the analysis's imatrix;
* ``ppl-3.5``: the same analysis, perplexity sensitivity only;
* ``llama-Q3_K_M`` / ``llama-Q4_K_S``: llama.cpp's mixes from the F32 reference with the same imatrix;
* ``humaneval-3.5``: TASA from an analysis with HumanEval task data (its 64 calibration problems,
  through ``analyze --task-data``'s path; 384 tokens per sample: HumanEval prompts are long);
* ``seed1-3.5`` / ``seed2-3.5``: the GSM8K analysis with calibration seeds 1 and 2 (seed stability).

Measured: GSM8K accuracy by lm-eval-harness on all 323 held-out questions (``tasa-edge eval``'s code,
continuous batching), HumanEval pass@1 on the 100 held-out problems (cross-task files and the packaged
one), task KLD against the F32 reference on 100 held-out GSM8K answers and 50 HumanEval solutions,
general KLD on 50 held-out documents (the second half of a 256-token window each, as
llama-perplexity scores); Wilson / bootstrap 95% intervals, exact McNemar tests and paired
bootstrap intervals of KLD differences on the same samples.

Everything is saved as it comes and skipped on a re-run, so the hours it takes can be spread over
several runs, on several machines: what is small and costly is kept under ``--out/<model>/state``, which
is committed (analysis.json and imatrix.gguf of each analysis, the plans, per-file KLD sums, sizes,
lm-eval generations question by question); what is large and cheap to make again from it is under
``work`` (the GGUF files, re-exported from the saved plans byte for byte -- an evaluation's journal
records the file's sha256 and refuses another -- the F32 reference's log-probs, the analyses'
gradient caches). ``results.md`` / ``results.json`` are rewritten after every step with what exists and
say what has not run.  ``--stop-after SECONDS`` ends the run cleanly between steps.

    python benchmarks/evidence.py                                   # Qwen, everything (hours; resumes)
    python benchmarks/evidence.py --model smollm2-135m --bpw 4.5 5.0 5.5 --limit 2 --max-gen-tokens 16 \
        --n-kld 2 --n-calib 2 --seeds 1 --out /tmp/ev       # smoke
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from exporters.baseline import quantize_baseline  # noqa: E402
from exporters.gguf_export import export_gguf  # noqa: E402
from exporters.reference import reference_gguf  # noqa: E402
from tasa_edge import humaneval as he  # noqa: E402
from tasa_edge import quality, stats  # noqa: E402
from tasa_edge.analysis import pick  # noqa: E402
from tasa_edge.data import TextSample, load_general, load_gsm8k, load_user_file, split_samples  # noqa: E402
from tasa_edge.evaluate import Reference, reference_logprobs, score_vs_reference  # noqa: E402
from tasa_edge.fsutil import atomic_path  # noqa: E402
from tasa_edge.imatrix import load_imatrix  # noqa: E402
from tasa_edge.inspect import inspect_gguf  # noqa: E402
from tasa_edge.lmeval import eval_gsm8k, eval_humaneval  # noqa: E402
from tasa_edge.model import ModelSource  # noqa: E402
from tasa_edge.plan import BitPlan  # noqa: E402
from tasa_edge.planner import make_plan  # noqa: E402
from tasa_edge.results import Analysis, AnalysisConfig  # noqa: E402
from tasa_edge.zoo import resolve_model  # noqa: E402

KLD_SETS = ("gsm8k", "humaneval", "general")
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


def file_specs(args) -> dict[str, dict]:
    """name -> how the file is made; the order is the evaluation order (the headline first)."""
    lo, mid, hi = args.bpw
    f = {"packaged": {"kind": "source"},
         f"tasa-{mid}": {"kind": "tasa", "analysis": "gsm8k", "bpw": mid, "mode": "tasa"}}
    for mix in args.mixes:
        f[f"llama-{mix}"] = {"kind": "llama", "mix": mix}
    f[f"tasa-{lo}"] = {"kind": "tasa", "analysis": "gsm8k", "bpw": lo, "mode": "tasa"}
    f[f"ppl-{mid}"] = {"kind": "tasa", "analysis": "gsm8k", "bpw": mid, "mode": "ppl"}
    f[f"tasa-{hi}"] = {"kind": "tasa", "analysis": "gsm8k", "bpw": hi, "mode": "tasa"}
    f[f"humaneval-{mid}"] = {"kind": "tasa", "analysis": "humaneval", "bpw": mid, "mode": "tasa"}
    for s in args.seeds:
        f[f"seed{s}-{mid}"] = {"kind": "tasa", "analysis": f"gsm8k-seed{s}", "bpw": mid, "mode": "tasa", "seed": s}
    return f


def evals_of(args, specs: dict) -> dict[str, list[str]]:
    mid = args.bpw[1]
    gsm = [n for n, s in specs.items() if "seed" not in s]
    return {"gsm8k": gsm, "humaneval": [f"tasa-{mid}", f"humaneval-{mid}", f"ppl-{mid}", "packaged"]}


class Run:
    def __init__(self, args):
        self.args = args
        self.src = ModelSource.open(resolve_model(args.model))
        self.out = args.out / args.model
        self.work = self.out / "work"         # large, re-made from ``state``
        self.state = self.out / "state"       # small, costly, committed: the run resumes from it on a new machine
        self.work.mkdir(parents=True, exist_ok=True)
        self.state.mkdir(parents=True, exist_ok=True)
        self.t0 = time.monotonic()
        self.specs = file_specs(args)
        self.evals = evals_of(args, self.specs)
        self.ref = None
        self.analyses: dict[str, Analysis] = {}

    def out_of_time(self) -> bool:
        return self.args.stop_after is not None and time.monotonic() - self.t0 > self.args.stop_after

    # ------------------------------------------------------------------ analyses and files
    def config(self, name: str) -> AnalysisConfig:
        a = self.args
        seed = int(name.split("seed")[1]) if "seed" in name else 0
        return AnalysisConfig(n_general=a.n_calib, n_task=a.n_calib, n_target=max(2, a.n_calib // 2),
                              max_tokens=384 if name == "humaneval" else 192, seed=seed,
                              sizes=tuple(k for k in (8, 16) if k <= a.n_calib) or (a.n_calib,),
                              fisher_dtype="bfloat16" if self.src.n_params > 1e9 else "float32",
                              sensitivity_rows=a.sensitivity_rows, chat_template=True)

    def analysis(self, name: str) -> Analysis:
        if name in self.analyses:
            return self.analyses[name]
        from tasa_edge.analysis import analyze

        d, keep = self.work / f"analysis-{name}", self.state / f"analysis-{name}"
        if (keep / "analysis.json").exists():
            an = Analysis.load(keep / "analysis.json")
        else:
            data = None
            if name == "humaneval":
                f = self.work / "humaneval-calib.jsonl"
                he.write_task_data(f)
                data = split_samples(load_user_file(f), "calib")  # exactly what analyze --task-data does
            log(f"   analysis {name}")
            t = time.perf_counter()
            an = analyze(self.src, d, self.config(name), task=data, show_progress=False)
            log(f"   analysis {name}: {time.perf_counter() - t:.0f} s, task ratio {an.mixture.chosen.task_ratio}")
            keep.mkdir(parents=True, exist_ok=True)       # the imatrix first: analysis.json marks the pair done
            if an.imatrix_path:
                shutil.copyfile(an.imatrix_path, keep / "imatrix.gguf")
            shutil.copyfile(d / "analysis.json", keep / "analysis.json")
            an = Analysis.load(keep / "analysis.json")    # its imatrix found beside it (Analysis.load)
        self.analyses[name] = an
        return an

    def path(self, name: str) -> Path:
        return Path(self.src.path) if self.specs[name]["kind"] == "source" else self.work / f"{name}.gguf"

    def plan_path(self, name: str) -> Path:
        return self.state / "plans" / f"{name}.plan.json"

    def make(self, name: str) -> None:
        """Make the file ``name`` if it is not on disk: a saved plan is exported again (the same bytes:
        the same plan, the same saved imatrix, checked by its sha256), else planned from its analysis."""
        spec, p = self.specs[name], self.path(name)
        if p.exists():
            return
        t = time.perf_counter()
        if spec["kind"] == "llama":
            im = load_imatrix(self.analysis("gsm8k").imatrix_path)
            quantize_baseline(self.reference(), p, spec["mix"], imatrix=im)
        else:
            an = self.analysis(spec["analysis"])
            if self.plan_path(name).exists():
                plan = BitPlan.load(self.plan_path(name))
            else:
                plan = make_plan(an, self.src, mode=spec["mode"], bpw=spec["bpw"])
                self.plan_path(name).parent.mkdir(parents=True, exist_ok=True)
                plan.save(self.plan_path(name))
            export_gguf(self.src, plan, p, imatrix=plan.export_imatrix(an.imatrix_path), show_progress=False)
        log(f"   made {p.name} ({time.perf_counter() - t:.0f} s)")

    def reference(self) -> Path:
        if self.ref is None:
            self.ref = reference_gguf(self.src)
        return self.ref

    def size_of(self, name: str) -> dict:
        """bits/weight and tensor bytes of a made file (gguf-py's reader is slow on big vocabularies: kept)."""
        p, f = self.path(name), self.state / "sizes" / f"{name}.json"
        saved = json.loads(f.read_text()) if f.exists() else None
        if saved is not None and (not p.exists() or saved["key"] == p.stat().st_size):
            return saved["size"]
        if not p.exists():
            return None
        key = p.stat().st_size
        rep = inspect_gguf(p)
        size = {"bpw": rep["bpw"], "tensor_bytes": rep["bytes"]}
        save_json(f, {"key": key, "size": size})
        return size

    # ------------------------------------------------------------------ KLD
    def kld_samples(self, which: str) -> list[TextSample]:
        n = self.args.n_kld
        if which == "gsm8k":
            return pick(load_gsm8k("eval"), n, "bench")
        if which == "humaneval":
            return pick(humaneval_samples("eval"), max(1, n // 2), "bench")
        return pick(load_general("eval"), max(1, n // 2), "bench")

    def kld_file(self, name: str, which: str) -> Path:
        return self.state / "kld" / f"{name}.{which}.json"

    def kld(self, names: list[str], which: str) -> None:
        todo = [n for n in names if not self.kld_file(n, which).exists()]
        if not todo:
            return
        ref = self.reference_store(which)
        for n in todo:
            if self.out_of_time():
                break
            self.make(n)
            t = time.perf_counter()
            summ, sums = score_vs_reference(ref, self.path(n), self.args.threads)
            save_json(self.kld_file(n, which), {"summary": summ, "sums": {k: v.tolist() for k, v in sums.to_arrays().items()}})
            log(f"   KLD {which} {n}: {summ['kld']} ({time.perf_counter() - t:.0f} s)")
        del ref
        gc.collect()

    def reference_store(self, which: str) -> Reference:
        """The F32 reference's log-probs on the ``which`` KLD set, computed once and kept on disk
        (float16 rows, memory-mapped when read back: ~8 GB for 100 Qwen answers), so the steps that
        need the same set and a resumed run skip the ~25-minute F32 pass."""
        # general text is scored on each window's second half since 6 Dec (llama-perplexity's
        # convention); a store of the whole window is not reused
        tag = "-half" if which == "general" else ""
        d = self.work / "kld" / f"ref-{which}-{self.args.n_kld}-{self.args.kld_tokens}{tag}"
        if (d / "index.json").exists():
            ix = json.loads((d / "index.json").read_text())
            r = Reference(ix["seqs"], ix["starts"])
            for i in range(len(r.seqs)):
                r.lp.append(np.load(d / f"lp{i}.npy", mmap_mode="r"))
                r.tgt_lp.append(np.load(d / f"tgt{i}.npy"))
                r.top1.append(np.load(d / f"top{i}.npy"))
            return r
        log(f"   reference log-probs: {which}")
        r = reference_logprobs(self.reference(), self.kld_samples(which), max_tokens=self.args.kld_tokens,
                               n_threads=self.args.threads)
        tmp = d.with_name(d.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)  # a store interrupted while written
        tmp.mkdir(parents=True)
        for i in range(len(r.seqs)):
            np.save(tmp / f"lp{i}.npy", r.lp[i])
            np.save(tmp / f"tgt{i}.npy", r.tgt_lp[i])
            np.save(tmp / f"top{i}.npy", r.top1[i])
        (tmp / "index.json").write_text(json.dumps({"seqs": r.seqs, "starts": r.starts}))
        os.replace(tmp, d)
        return r

    def sums(self, name: str, which: str) -> quality.SampleSums | None:
        f = self.kld_file(name, which)
        if not f.exists():
            return None
        return quality.SampleSums.from_arrays({k: np.asarray(v) for k, v in json.loads(f.read_text())["sums"].items()})

    # ------------------------------------------------------------------ task accuracy
    def eval_dir(self, name: str, task: str) -> Path:
        return self.state / "eval" / f"{name}-{task}"

    def evaluate(self, name: str, task: str) -> None:
        a = self.args
        rd = self.eval_dir(name, task)
        if (rd / "results.json").exists() and json.loads((rd / "results.json").read_text())["settings"].get("limit") == a.limit:
            return
        self.make(name)
        log(f"   eval {name} on {task} (resumes {rd})")
        kw = {"max_gen_toks": a.max_gen_tokens} if a.max_gen_tokens else {}
        fn = eval_gsm8k if task == "gsm8k" else eval_humaneval
        r = fn(self.path(name), rd, limit=a.limit, n_threads=a.threads, n_parallel=a.parallel, **kw)
        log(f"   {name} on {task}: " + ", ".join(f"{k} {v}" for k, v in r.scores.items()) + f" ({r.seconds:.0f} s)")

    def correct(self, name: str, task: str) -> dict[str, bool] | None:
        f = self.eval_dir(name, task) / "samples.jsonl"
        if not (self.eval_dir(name, task) / "results.json").exists():
            return None
        rows = [json.loads(x) for x in f.read_text().splitlines()]
        if task == "gsm8k":
            return {r["id"]: bool(r["flexible-extract"]["exact_match"]) for r in rows}
        return {r["id"]: bool(r["passed"]) for r in rows}

    # ------------------------------------------------------------------ the run
    def steps(self):
        """(description, callable) in order; each is skipped when its output exists."""
        mid = self.args.bpw[1]
        head = [n for n in self.specs if "seed" not in n and n != f"humaneval-{mid}"]
        yield "analysis gsm8k", lambda: self.analysis("gsm8k")   # first: benchmarks/device_run.py uses it too
        yield "KLD gsm8k", lambda: self.kld(head, "gsm8k")       # files are made as a step first needs them
        for n in self.evals["gsm8k"]:
            if n != f"humaneval-{mid}":
                yield f"eval {n} gsm8k", lambda n=n: self.evaluate(n, "gsm8k")
        yield "KLD humaneval", lambda: self.kld([n for n in self.specs if "seed" not in n], "humaneval")   # seeds: GSM8K only
        yield "KLD gsm8k (cross-task)", lambda: self.kld([f"humaneval-{mid}"], "gsm8k")
        yield f"eval humaneval-{mid} gsm8k", lambda: self.evaluate(f"humaneval-{mid}", "gsm8k")
        for n in self.evals["humaneval"]:
            yield f"eval {n} humaneval", lambda n=n: self.evaluate(n, "humaneval")
        yield "KLD general", lambda: self.kld([n for n in self.specs if "seed" not in n], "general")
        seeds = [n for n in self.specs if "seed" in n]
        yield "KLD gsm8k (seeds)", lambda: self.kld(seeds, "gsm8k")

    def run(self) -> int:
        log(f"== {self.src.name}: {len(self.specs)} files -> {self.out}")
        self.report("running")
        for what, fn in self.steps():
            if self.out_of_time():
                log(f"stopping before '{what}' (--stop-after); a re-run resumes")
                self.report("partial (stopped; a re-run resumes)")
                return 0
            fn()
            self.report("running")
        self.report("complete" if self.full() else "partial (limited run)")
        log(f"wrote {self.out / 'results.md'}")
        return 0

    def full(self) -> bool:
        a = self.args
        return a.limit is None and a.max_gen_tokens is None and a.n_kld >= 100 and a.n_calib == 24

    # ------------------------------------------------------------------ report
    def collect(self) -> dict:
        res = {"model": self.args.model, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(self.args).items()},
               "files": {}, "paired": {}, "seeds": {}, "missing": []}
        for n, spec in self.specs.items():
            row = res["files"][n] = {"spec": spec}
            size = self.size_of(n)
            if size is None:
                res["missing"].append(f"file {n}")
                continue
            row.update(size)
            for which in KLD_SETS:
                s = self.sums(n, which)
                if s is not None:
                    row.setdefault("kld", {})[which] = {k: v.to_dict() for k, v in s.intervals().items()}
            for task in TASKS:
                rd = self.eval_dir(n, task)
                if (rd / "results.json").exists():
                    r = json.loads((rd / "results.json").read_text())
                    row.setdefault("eval", {})[task] = {"scores": r["scores"], "seconds": r["seconds"],
                                                        "limit": r["settings"].get("limit")}
                elif n in self.evals[task]:
                    res["missing"].append(f"{n} on {task}")
        mid = self.args.bpw[1]
        pairs = [(f"tasa-{mid}", "packaged")] + [(f"tasa-{b}", f"llama-{m}") for b in self.args.bpw for m in self.args.mixes] \
            + [(f"tasa-{mid}", f"ppl-{mid}"), (f"tasa-{mid}", f"humaneval-{mid}"), (f"humaneval-{mid}", f"ppl-{mid}")]
        for a, b in pairs:
            d = {}
            for task in TASKS:
                ca, cb = self.correct(a, task), self.correct(b, task)
                if ca and cb:
                    ids = sorted(set(ca) & set(cb))
                    t = stats.mcnemar_exact([ca[k] for k in ids], [cb[k] for k in ids])
                    d[task] = {**t.to_dict(), "verdict": stats.mcnemar_verdict(t)}
            for which in KLD_SETS:
                sa, sb = self.sums(a, which), self.sums(b, which)
                if sa is not None and sb is not None:
                    k = sa.paired(sb)["kld"]
                    d[f"kld_{which}"] = {**k.to_dict(), "verdict": stats.verdict(k.lo, k.hi, lower_is_better=True)}
            if d:
                res["paired"][f"{a} vs {b}"] = d
        base = BitPlan.load(self.plan_path(f"tasa-{mid}")) if self.plan_path(f"tasa-{mid}").exists() else None
        for n in self.specs:
            if "seed" in n and base is not None and self.plan_path(n).exists():
                other = BitPlan.load(self.plan_path(n))
                changed = sum(1 for k, v in base.tensors.items() if other.tensors.get(k) != v)
                res["seeds"][n] = {"tensors": len(base.tensors), "changed": changed}
        res["goal"] = goal(res, self.args.bpw[1], self.args.mixes)
        return res

    def report(self, status: str) -> None:
        res = self.collect()
        res["status"] = status
        save_json(self.out / "results.json", res)
        with atomic_path(self.out / "results.md") as tmp:
            tmp.write_text(render(res), encoding="utf-8")


def goal(res: dict, mid: float, mixes: list[str]) -> dict:
    """The issue's goal: TASA at <= mid bpw not significantly below the packaged file on GSM8K, and
    significantly above llama.cpp's mix of the nearest size."""
    t = res["files"].get(f"tasa-{mid}", {})
    if "bpw" not in t:
        return {"verdict": "not run"}
    mixes = [(abs(res["files"][f"llama-{m}"]["bpw"] - t["bpw"]), m) for m in mixes if "bpw" in res["files"].get(f"llama-{m}", {})]
    near = min(mixes)[1] if mixes else None
    vs_pk = res["paired"].get(f"tasa-{mid} vs packaged", {}).get("gsm8k")
    vs_mix = res["paired"].get(f"tasa-{mid} vs llama-{near}", {}).get("gsm8k") if near else None
    out = {"nearest_mix": near, "vs_packaged": vs_pk and vs_pk["verdict"], "vs_mix": vs_mix and vs_mix["verdict"]}
    if vs_pk is None or vs_mix is None:
        out["verdict"] = "not run"
    elif vs_pk["verdict"] != "not inverted" and vs_mix["verdict"] == "inverted":
        out["verdict"] = "met"
    elif vs_pk["verdict"] == "not inverted" or vs_mix["verdict"] == "not inverted":
        out["verdict"] = "not met"
    else:
        out["verdict"] = "inconclusive"
    return out


def _acc(e: dict | None, key: str) -> str:
    if not e:
        return "not run"
    s = e["scores"][key]
    return f"{s['accuracy']:.3f} [{s['lo']:.3f}, {s['hi']:.3f}] (n={s['n']})"


def _kld(row: dict, which: str) -> str:
    k = row.get("kld", {}).get(which, {}).get("kld")
    return "not run" if not k else f"{k['estimate']:.4f} [{k['lo']:.4f}, {k['hi']:.4f}]"


def render(res: dict) -> str:
    a = res["args"]
    mid = a["bpw"][1]
    L = [f"# Evidence: {res['model']}", "",
         f"`python benchmarks/evidence.py {' '.join(res['args'].get('argv') or [])}`; status: **{res['status']}**.", "",
         "GSM8K: lm-eval-harness (5-shot, first_n few-shot sampler), flexible-extract (strict-match in its own"
         " column), held-out split; HumanEval pass@1 on the held-out problems; Wilson 95% intervals. KLD:"
         " mean per token against the F32 reference, percentile-bootstrap 95% interval over samples; task KLD"
         " on the answer tokens, general KLD on the second half of each document's window (llama-perplexity's"
         " scoring).", "",
         "## Headline", "",
         "| file | bits/weight | GSM8K flexible | GSM8K strict | task KLD (GSM8K) | general KLD |", "|---|---|---|---|---|---|"]
    for n, r in res["files"].items():
        if n.startswith("seed") or n.startswith("humaneval"):
            continue
        e = r.get("eval", {}).get("gsm8k")
        bpw = f"{r['bpw']:.3f}" if "bpw" in r else "not made"
        L.append(f"| {n} | {bpw} | {_acc(e, 'flexible-extract')} | {_acc(e, 'strict-match')} | {_kld(r, 'gsm8k')} | {_kld(r, 'general')} |")
    g = res.get("goal", {})
    L += ["", f"Goal (TASA {mid} not significantly below the packaged file on GSM8K and significantly above llama.cpp's"
          f" nearest mix, {g.get('nearest_mix')}): **{g.get('verdict')}** (vs packaged: {g.get('vs_packaged')}; vs mix: {g.get('vs_mix')})."]
    L += ["", "## Paired comparisons (a vs b, same questions / samples)", "",
          "| a vs b | GSM8K: a only / b only, p, verdict | HumanEval: a only / b only, p | Δ task KLD GSM8K [95%] | Δ KLD HumanEval | Δ general KLD |",
          "|---|---|---|---|---|---|"]
    for k, d in res["paired"].items():
        def mc(t):
            m = d.get(t)
            return "not run" if not m else f"{m['a_only']} / {m['b_only']}, p={m['pvalue']:.3g}, {m['verdict']}"

        def dk(w):
            m = d.get(f"kld_{w}")
            return "not run" if not m else f"{m['diff']:+.4f} [{m['lo']:+.4f}, {m['hi']:+.4f}] {m['verdict']}"
        L.append(f"| {k} | {mc('gsm8k')} | {mc('humaneval')} | {dk('gsm8k')} | {dk('humaneval')} | {dk('general')} |")
    L += ["", f"Verdicts: for accuracy, exact McNemar at 5% ('inverted' = a right significantly more often); for KLD,"
          " the paired interval of a - b ('inverted' = a significantly lower). 'inconclusive' otherwise.", "",
          f"## Cross-task ({mid} bits/weight)", "",
          "| plan | bits/weight | GSM8K flexible | HumanEval pass@1 | task KLD GSM8K | task KLD HumanEval |", "|---|---|---|---|---|---|"]
    for n in (f"tasa-{mid}", f"humaneval-{mid}", f"ppl-{mid}", "packaged"):
        r = res["files"].get(n, {})
        ev = r.get("eval", {})
        bpw = f"{r['bpw']:.3f}" if "bpw" in r else "not made"
        L.append(f"| {n} | {bpw} | {_acc(ev.get('gsm8k'), 'flexible-extract')} | {_acc(ev.get('humaneval'), 'pass@1')} | "
                 f"{_kld(r, 'gsm8k')} | {_kld(r, 'humaneval')} |")
    if res.get("seeds") or any(n.startswith("seed") for n in res["files"]):
        L += ["", f"## Seed stability (TASA {mid}, calibration seeds)", "",
              "| plan | tensors with another format than seed 0 | task KLD GSM8K |", "|---|---|---|"]
        r0 = res["files"].get(f"tasa-{mid}", {})
        L.append(f"| seed 0 (tasa-{mid}) | - | {_kld(r0, 'gsm8k')} |")
        for n, r in res["files"].items():
            if n.startswith("seed"):
                s = res["seeds"].get(n)
                ch = f"{s['changed']} of {s['tensors']}" if s else "not made"
                L.append(f"| {n} | {ch} | {_kld(r, 'gsm8k')} |")
    if res["missing"]:
        L += ["", "Not run yet: " + "; ".join(res["missing"]) + "."]
    return "\n".join(L) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--bpw", type=float, nargs=3, default=[3.0, 3.5, 4.0], help="TASA budgets: low, headline, high")
    ap.add_argument("--mixes", nargs="+", default=["Q3_K_M", "Q4_K_S"], help="llama.cpp mixes (with the imatrix)")
    ap.add_argument("--seeds", type=int, nargs="*", default=[1, 2], help="extra calibration seeds at the headline budget")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/evidence"))
    ap.add_argument("--n-calib", type=int, default=24, help="analysis: general and task pool samples (CLI default 24)")
    ap.add_argument("--sensitivity-rows", type=float, default=0.25)
    ap.add_argument("--n-kld", type=int, default=100, help="held-out GSM8K answers for task KLD (half as many HumanEval solutions and documents)")
    ap.add_argument("--kld-tokens", type=int, default=256, help="tokens per KLD sample")
    ap.add_argument("--limit", type=int, default=None, help="score only the first N held-out questions of each task")
    ap.add_argument("--max-gen-tokens", type=int, default=None, help="tokens generated per question (default gsm8k 256 / humaneval 512)")
    ap.add_argument("--parallel", type=int, default=16, help="questions generated together (tasa-edge eval --parallel)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--stop-after", type=float, default=None, help="seconds; stop between steps after this long")
    args = ap.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("TASA_NO_PROGRESS", "1")
    return Run(args).run()


if __name__ == "__main__":
    sys.exit(main())
