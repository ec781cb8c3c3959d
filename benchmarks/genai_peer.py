#!/usr/bin/env python3
"""Peer row: onnxruntime-genai's own int4 model builder vs a TASA ONNX plan of the same file bytes.

For one packaged model:

1. genai's builder (``onnxruntime_genai.models.builder -p int4 -e cpu``, ``shared_embeddings=true``)
   with each ``--algos`` option (``k_quant_mixed``: k-quant int4 with int8 LM head and llama.cpp's
   "mixed" layers; ``k_quant_last``: int8 LM head only; ``rtn``...), and the same builder at fp32 as
   the reference, all on the reference HF directory (the dequantized packaged model);
2. a TASA ONNX analysis (``tasa-edge analyze MODEL --target onnx``) and, per peer, a TASA plan whose
   budget makes our export's files as large as the peer's (``model.onnx`` + data), exported with
   ``export_onnx`` (genai graph);
3. all run by onnxruntime-genai: task KLD against the fp32 genai model on held-out GSM8K answers
   (eval split, the bench's selection order), per-sequence paired difference TASA - peer with a 95%
   interval and a Wilcoxon signed-rank test, and prompt / decode tokens/s (``devices.worker``'s
   genai backend: one warm-up, ``--reps`` timed runs).

Every step is saved under ``--work`` as it finishes and skipped on a re-run (the same command
resumes). Writes ``results.json`` and ``results.md`` to ``--out``.

    python benchmarks/genai_peer.py --model smollm2-135m --algos k_quant_mixed k_quant_last --out benchmarks/genai-peer
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devices.worker import GenaiBackend, measure_speed  # noqa: E402
from exporters.genai_export import is_rope_cache, run_builder, stage_hf_dir  # noqa: E402
from exporters.onnx_export import export_onnx  # noqa: E402
from tasa_edge import quality  # noqa: E402
from tasa_edge.data import load_gsm8k  # noqa: E402
from tasa_edge.evaluate import sample_tokens  # noqa: E402
from tasa_edge.model import ModelSource  # noqa: E402
from tasa_edge.onnx_run import GenaiDecoder  # noqa: E402
from tasa_edge.zoo import cache_dir, resolve_model  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def files_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.iterdir() if f.is_file() and f.name.startswith("model.onnx"))


def overhead_bytes(d: Path) -> int:
    """Bytes of a genai export that are no plan tensor: the graph file and the rotary caches."""
    import onnx

    m = onnx.load(str(d / "model.onnx"), load_external_data=False)
    rope = sum(int(np.prod(t.dims)) * 4 for t in m.graph.initializer if is_rope_cache(t.name))
    return (d / "model.onnx").stat().st_size + rope


def save(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def build(stage: Path, out: Path, work: Path, precision: str, extra: dict) -> None:
    if (out / "genai_config.json").exists():
        return
    tmp = out.with_name(out.name + ".tmp")
    subprocess.run(["rm", "-rf", str(tmp)], check=True)
    run_builder(stage, tmp, work / "builder-cache", precision, extra)
    os.replace(tmp, out)


def task_sequences(dec: GenaiDecoder, n: int, max_tokens: int) -> list[tuple[list[int], int]]:
    import hashlib

    gsm = sorted(load_gsm8k("eval"), key=lambda s: hashlib.sha256(b"tasa-edge/bench\0" + s.id.encode()).digest())
    out = []
    for s in gsm:
        item = sample_tokens(dec.encode, s, max_tokens)
        if item:
            out.append(item)
        if len(out) == n:
            break
    return out


def reference_store(ref_dir: Path, seqs, threads: int) -> list[np.ndarray]:
    dec = GenaiDecoder.open(ref_dir, threads)
    return [quality.log_softmax(dec.logits(ids)[st - 1: len(ids) - 1]) for ids, st in seqs]


def measure(d: Path, seqs, ref_lp, threads: int, pp: int, tg: int, reps: int) -> dict:
    dec = GenaiDecoder.open(d, threads)
    kl_seq, kl_all, same = [], [], []
    for (ids, st), lp in zip(seqs, ref_lp):
        lq = quality.log_softmax(dec.logits(ids)[st - 1: len(ids) - 1])
        k = quality.kl_rows(lp, lq)
        kl_all.append(k)
        kl_seq.append(float(k.mean()))
        same.append(lp.argmax(-1) == lq.argmax(-1))
    be = GenaiBackend(str(d), threads)
    be.dec = dec
    sp = measure_speed(be, pp, tg, reps)
    k = np.concatenate(kl_all)
    return {"dir": str(d), "file_bytes": files_bytes(d), "kld": float(k.mean()), "kld_se": quality.std_error(k),
            "top1": float(np.concatenate(same).mean()), "positions": int(k.size), "kld_per_seq": kl_seq,
            "pp_ts": sp["pp"]["ts_mean"], "pp_sd": sp["pp"]["ts_std"], "tg_ts": sp["tg"]["ts_mean"],
            "tg_sd": sp["tg"]["ts_std"]}


def paired(a: list[float], b: list[float]) -> dict:
    """TASA - peer, per sequence: mean, 95% t interval, Wilcoxon signed-rank p."""
    from scipy import stats

    d = np.asarray(a) - np.asarray(b)
    n = d.size
    se = float(d.std(ddof=1) / np.sqrt(n))
    h = float(stats.t.ppf(0.975, n - 1)) * se
    p = float(stats.wilcoxon(d).pvalue) if np.any(d) else 1.0
    verdict = "TASA lower" if d.mean() + h < 0 else "peer lower" if d.mean() - h > 0 else "inconclusive"
    return {"n": n, "mean": float(d.mean()), "ci95": [float(d.mean() - h), float(d.mean() + h)], "wilcoxon_p": p,
            "verdict": verdict}


def markdown(res: dict) -> str:
    lines = [f"# onnxruntime-genai builder vs TASA at equal file bytes: {res['model']}", "",
             f"Task KLD vs the fp32 genai model on {res['n_task']} held-out GSM8K answers ({res['positions']} "
             f"positions), tokens/s pp{res['pp']}/tg{res['tg']} x{res['reps']}, {res['threads']} threads, all by "
             f"onnxruntime-genai {res['versions']['onnxruntime-genai']} (onnxruntime {res['versions']['onnxruntime']}).", "",
             "| model | MiB | task KLD ± se | top-1 | pp t/s | tg t/s | TASA − peer KLD (95% CI), Wilcoxon p |",
             "|---|---:|---|---:|---:|---:|---|"]
    for row in res["rows"]:
        for key in ("peer", "tasa"):
            m = row[key]
            name = f"genai builder int4 {row['algo']}" if key == "peer" else f"TASA at {row['algo']}'s bytes"
            cmp = ""
            if key == "tasa":
                p = row["paired"]
                cmp = f"{p['mean']:+.4f} [{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}], p={p['wilcoxon_p']:.2g}: {p['verdict']}"
            lines.append(f"| {name} | {m['file_bytes'] / 2**20:.1f} | {m['kld']:.4f} ± {m['kld_se']:.4f} | {m['top1']:.3f} | "
                         f"{m['pp_ts']:.1f} ± {m['pp_sd']:.1f} | {m['tg_ts']:.1f} ± {m['tg_sd']:.1f} | {cmp} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--algos", nargs="+", default=["k_quant_mixed", "k_quant_last"])
    ap.add_argument("--n-task", type=int, default=40)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pp", type=int, default=128)
    ap.add_argument("--tg", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--analysis", type=Path, default=None, help="analysis.json (--target onnx); made if absent")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/genai-peer"))
    a = ap.parse_args()

    from importlib.metadata import version

    from tasa_edge.planner import make_plan
    from tasa_edge.results import Analysis
    from tasa_edge.torch_model import hf_dir_for

    src = ModelSource.open(resolve_model(a.model))
    work = a.work or cache_dir() / "genai-peer" / a.model
    work.mkdir(parents=True, exist_ok=True)
    a.out.mkdir(parents=True, exist_ok=True)
    state_path = work / "state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}

    hf = hf_dir_for(src, show_progress=False)
    cfg = json.loads((hf / "config.json").read_text())
    stage = work / "hf"
    if not stage.exists():
        stage_hf_dir(hf, stage, (cfg.get("text_config") or cfg)["model_type"])
    log("genai builder fp32 (reference)")
    build(stage, work / "fp32", work, "fp32", {})
    for algo in a.algos:
        log(f"genai builder int4 {algo}")
        build(stage, work / f"int4-{algo}", work, "int4", {"algo_config": algo, "shared_embeddings": "true"})

    an_path = a.analysis or work / "tasa-onnx" / "analysis.json"
    if not an_path.exists():
        log("TASA analysis (--target onnx)")
        subprocess.run([sys.executable, "-m", "tasa_edge.cli", "--quiet", "analyze", a.model, "--target", "onnx",
                        "--n-general", "8", "--n-task", "8", "--n-target", "4", "--max-tokens", "128",
                        "-o", str(an_path.parent)], check=True)
    an = Analysis.load(an_path)

    for algo in a.algos:
        d = work / f"tasa-{algo}"
        if (d / "genai_config.json").exists():
            continue
        peer = work / f"int4-{algo}"
        budget = files_bytes(peer) - overhead_bytes(peer)
        plan = make_plan(an, src, nbytes=budget)
        log(f"TASA plan at {budget} tensor bytes ({algo}'s files minus graph and rotary caches): {plan.types_used()}")
        export_onnx(src, plan, d, show_progress=False, graph="genai")

    dec = GenaiDecoder.open(work / "fp32", a.threads)
    seqs = task_sequences(dec, a.n_task, a.max_tokens)
    del dec
    log(f"reference: {len(seqs)} sequences")
    ref_lp = reference_store(work / "fp32", seqs, a.threads)
    measured = state.setdefault("measured", {})
    key = f"{a.n_task}-{a.max_tokens}-{a.pp}-{a.tg}-{a.reps}-{a.threads}"
    for algo in a.algos:
        for name in (f"int4-{algo}", f"tasa-{algo}"):
            if f"{name}@{key}" in measured:
                continue
            log(f"measure {name}")
            measured[f"{name}@{key}"] = measure(work / name, seqs, ref_lp, a.threads, a.pp, a.tg, a.reps)
            save(state_path, state)

    rows = []
    for algo in a.algos:
        peer, tasa = measured[f"int4-{algo}@{key}"], measured[f"tasa-{algo}@{key}"]
        rows.append({"algo": algo, "peer": peer, "tasa": tasa, "paired": paired(tasa["kld_per_seq"], peer["kld_per_seq"])})
    res = {"model": a.model, "n_task": len(seqs), "positions": rows[0]["peer"]["positions"], "pp": a.pp, "tg": a.tg,
           "reps": a.reps, "threads": a.threads, "rows": rows, "command": " ".join(sys.argv),
           "versions": {k: version(k) for k in ("onnxruntime", "onnxruntime-genai")}}
    save(a.out / f"{a.model}.json", res)
    (a.out / f"{a.model}.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
