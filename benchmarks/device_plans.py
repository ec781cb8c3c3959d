"""Device-aware plans, checked: predicted vs measured decode (tg) and prefill (pp) speed of
exported TASA plans on the machine a kernel profile was measured on.

    tasa-edge profile -m smollm2-135m -o device.toml -t 1 -r 2          # the profile (llama-bench)
    tasa-edge analyze smollm2-135m -o tasa-out                          # the analysis
    python benchmarks/device_plans.py --model smollm2-135m --profile device.toml \\
        --analysis tasa-out/analysis.json --bpw 4.6 5.5 6.5 --out benchmarks/device

For every budget the speed-blind TASA plan is solved (``plan --profile`` records its predicted
decode ms/token and prefill ms), exported (with the analysis' imatrix) and timed by llama-bench with
the profile's threads, test sizes, repetitions and statistic (``best``: the fastest repetition, or
``mean``); with ``--min-tg-ratio R`` a speed-aware plan limited to ``R x`` the speed-blind plan's
predicted tg is measured too. The table prints predicted and measured tg/pp and their error, and
the machine's load average before and after each measurement (a shared machine's timings are only
as good as its quiet moments).

Results: ``<out>/<model>.json`` and ``<out>/<model>.md``; resumable (every measured file is saved in
the JSON as it comes and skipped on a re-run with the same settings).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TASA_NO_PROGRESS", "1")

import numpy as np  # noqa: E402

from devices.kernel_profile import speed  # noqa: E402
from devices.llama_tools import run_llama_bench  # noqa: E402
from exporters.baseline import quantize_baseline  # noqa: E402
from exporters.gguf_export import export_gguf  # noqa: E402
from exporters.reference import reference_gguf  # noqa: E402
from tasa_edge import quality  # noqa: E402
from tasa_edge.costmodel import load_kernel_profile  # noqa: E402
from tasa_edge.data import load_gsm8k  # noqa: E402
from tasa_edge.errors import TasaError  # noqa: E402
from tasa_edge.evaluate import reference_logprobs  # noqa: E402
from tasa_edge.fsutil import atomic_write_text  # noqa: E402
from tasa_edge.inspect import inspect_gguf  # noqa: E402
from tasa_edge.llama_run import score  # noqa: E402
from tasa_edge.model import ModelSource  # noqa: E402
from tasa_edge.planner import DeviceLimits, make_plan  # noqa: E402
from tasa_edge.results import Analysis  # noqa: E402
from tasa_edge.zoo import resolve_model  # noqa: E402


def measure(path: Path, kp, reps: int | None) -> dict:
    m = kp.measured
    before = [round(x, 2) for x in os.getloadavg()]
    r = run_llama_bench(path, int(m["pp"]), int(m["tg"]), int(reps or m.get("reps") or 3), int(m["threads"]))
    stat = m.get("stat") or "best"
    return {"tg_ts": speed(r["tg"], stat), "pp_ts": speed(r["pp"], stat), "tg_samples": r["tg"]["samples_ts"],
            "pp_samples": r["pp"]["samples_ts"], "load_before": before, "load_after": [round(x, 2) for x in os.getloadavg()]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--profile", required=True, type=Path)
    ap.add_argument("--analysis", required=True, type=Path)
    ap.add_argument("--bpw", type=float, nargs="+", default=[4.6, 5.5, 6.5])
    ap.add_argument("--min-tg-ratio", type=float, default=None,
                    help="also a speed-aware plan per budget: predicted tg >= RATIO x the speed-blind plan's")
    ap.add_argument("--reps", type=int, default=None, help="llama-bench -r (default: the profile's)")
    ap.add_argument("--win", nargs="*", default=[], metavar="MIX",
                    help="llama.cpp mixes (Q3_K_S Q3_K_M) to compare with (+ the analysis' imatrix): measured speed, "
                         "and task KLD of the mix, the speed-blind and the speed-aware TASA plan at its bytes")
    ap.add_argument("--n-eval", type=int, default=6, help="--win: held-out GSM8K eval answers for task KLD")
    ap.add_argument("--speed-margin", type=float, default=0.0,
                    help="--win: the speed-aware plan's predicted decode and prefill times at most (1 - margin) x the mix's")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/device"))
    a = ap.parse_args()

    src = ModelSource.open(resolve_model(a.model))
    kp = load_kernel_profile(a.profile)
    an = Analysis.load(a.analysis)
    a.out.mkdir(parents=True, exist_ok=True)
    work = a.out / f"work-{a.model}"
    work.mkdir(exist_ok=True)
    res_path = a.out / f"{a.model}.json"
    res = json.loads(res_path.read_text()) if res_path.is_file() else {}
    settings = {"profile": str(a.profile), "machine": kp.machine, "measured": {k: kp.measured.get(k) for k in
                ("threads", "pp", "tg", "reps", "stat", "load_before", "load_after", "fit", "holdout")}}
    if res.get("settings") != settings:
        res = {"settings": settings, "rows": {}}

    jobs = []
    for bpw in a.bpw:
        jobs.append((f"TASA {bpw:g} bpw", bpw, None))
        if a.min_tg_ratio:
            jobs.append((f"TASA {bpw:g} bpw, tg >= {a.min_tg_ratio:g}x", bpw, a.min_tg_ratio))
    for label, bpw, ratio in jobs:
        if label in res["rows"]:
            continue
        dev = DeviceLimits(kp)
        if ratio:
            blind = make_plan(an, src, bpw=bpw, device=dev)
            dev = DeviceLimits(kp, max_decode_ms=blind.predicted["decode_ms"] / ratio)
        plan = make_plan(an, src, bpw=bpw, device=dev)
        gguf = work / f"{label.replace(' ', '_').replace(',', '').replace('>=', 'ge')}.gguf"
        t0 = time.perf_counter()
        export_gguf(src, plan, gguf, imatrix=plan.export_imatrix(None), show_progress=False)
        got = measure(gguf, kp, a.reps)
        gguf.unlink()
        p = plan.predicted
        res["rows"][label] = {"bpw": p["bpw"], "bytes": p["bytes"], "loss": p["loss"], "types": plan.types_used(),
                              "pred_tg_ts": p["tg_ts"], "pred_pp_ts": p["pp_ts"], **got,
                              "tg_err": p["tg_ts"] / got["tg_ts"] - 1, "pp_err": p["pp_ts"] / got["pp_ts"] - 1,
                              "seconds": time.perf_counter() - t0}
        atomic_write_text(res_path, json.dumps(res, indent=1) + "\n")
        r = res["rows"][label]
        print(f"{label}: tg predicted {r['pred_tg_ts']:.2f} measured {r['tg_ts']:.2f} ({100 * r['tg_err']:+.1f}%), "
              f"pp predicted {r['pred_pp_ts']:.2f} measured {r['pp_ts']:.2f} ({100 * r['pp_err']:+.1f}%)", flush=True)
    if a.win:
        win(a, src, kp, an, res, res_path, work)
    md = table(a.model, res, kp) + (win_table(res) if res.get("win") else "")
    atomic_write_text(a.out / f"{a.model}.md", md)
    print(md)


def kl_tokens(ref, path: Path) -> np.ndarray:
    """Per-token KL of the GGUF at ``path`` against the reference store (for paired comparisons)."""
    out = []
    for i, lg in enumerate(score(path, ref.seqs, ref.starts, None)):
        k, _, _ = quality.score_rows(ref.lp[i], ref.top1[i], lg, np.asarray(ref.seqs[i][ref.starts[i]:]))
        out.append(k)
    return np.concatenate(out)


def file_types(rep: dict) -> dict[str, str]:
    """tensor -> ggml type name of the matrices of a file (from its :func:`inspect_gguf` report)."""
    return {r["name"]: r["type"] for r in rep["tensors"] if len(r["shape"]) >= 2}


def predict_file(kp, src, types: dict[str, str]):
    """The profile's prediction for an existing file (a llama.cpp mix; ``types``: :func:`file_types`);
    a type the profile did not measure is costed as the measured format nearest in bits per weight
    (returned: type -> stand-in)."""
    from tasa_edge.formats import ggml

    known = list(kp.costs)
    tensors, approx = {}, {}
    for name, t in types.items():
        if name not in src.tensors:
            continue
        if t not in known:
            approx[t] = min(known, key=lambda f: abs(ggml.bits_per_weight(f) - ggml.bits_per_weight(t)))
        tensors[name] = approx.get(t, t)
    return kp.predict(src, tensors), approx


def win(a, src, kp, an, res, res_path, work) -> None:
    """Item 4: at each llama.cpp mix's bytes, a speed-aware TASA plan whose predicted decode and
    prefill times are at most the mix's (predicted by the same profile), against the mix and the
    speed-blind plan: measured speed and task KLD."""
    from tasa_edge.imatrix import load_imatrix

    held = None
    res.setdefault("win", {})
    for mix in a.win:
        if mix in res["win"] or any(k.startswith(mix + " ") for k in res["win"].get("errors", {})):
            continue
        if held is None:
            held = reference_logprobs(reference_gguf(src), load_gsm8k("eval")[: a.n_eval])
        im = load_imatrix(an.imatrix["path"]) if an.imatrix else None
        lf = work / f"llama-{mix}.gguf"
        quantize_baseline(reference_gguf(src), lf, mix, imatrix=im)
        rep = inspect_gguf(lf)
        nbytes = rep["bytes"]
        rows = {}
        m = measure(lf, kp, a.reps)
        types = file_types(rep)
        pred, approx = predict_file(kp, src, types)
        counts: dict[str, int] = {}
        for t in types.values():
            counts[t] = counts.get(t, 0) + 1
        rows["llama.cpp"] = {"bpw": rep["bpw"], **m, "kl": kl_tokens(held, lf), "types": counts,
                             "pred_tg_ts": pred.tg_ts, "pred_pp_ts": pred.pp_ts, "approximated": approx}
        lf.unlink()
        # the speed-aware plan may take no more *predicted* time than the mix's prediction: the cost
        # model's bias on this machine cancels (both sides predicted by the same profile)
        for label, dev in (("TASA speed-blind", DeviceLimits(kp)),
                           ("TASA speed-aware", DeviceLimits(kp, max_decode_ms=pred.decode_ms * (1 - a.speed_margin),
                                                             max_prefill_ms=pred.prefill_ms * (1 - a.speed_margin)))):
            try:
                plan = make_plan(an, src, nbytes=nbytes, device=dev)
            except TasaError as exc:       # the limits may be infeasible at this budget
                print(f"{mix} {label}: {exc}", flush=True)
                res["win"].setdefault("errors", {})[f"{mix} {label}"] = str(exc)
                continue
            f = work / f"{label.replace(' ', '_')}-{mix}.gguf"
            export_gguf(src, plan, f, imatrix=plan.export_imatrix(None), show_progress=False)
            rows[label] = {"bpw": plan.predicted["bpw"], "pred_tg_ts": plan.predicted["tg_ts"],
                           "pred_pp_ts": plan.predicted["pp_ts"], "types": plan.types_used(), **measure(f, kp, a.reps),
                           "kl": kl_tokens(held, f)}
            f.unlink()
        base = rows["llama.cpp"]
        for r in rows.values():
            d = r["kl"] - base["kl"]
            r.update(task_kld=float(r["kl"].mean()), task_kld_se=quality.std_error(r["kl"]),
                     tg_ratio=r["tg_ts"] / base["tg_ts"], pp_ratio=r["pp_ts"] / base["pp_ts"],
                     dkld_vs_llama=float(d.mean()), dkld_vs_llama_ci95=1.96 * quality.std_error(d))
        if "TASA speed-aware" in rows:
            d = rows["TASA speed-aware"]["kl"] - rows["TASA speed-blind"]["kl"]
            rows["TASA speed-aware"].update(dkld_vs_blind=float(d.mean()), dkld_vs_blind_ci95=1.96 * quality.std_error(d))
        for r in rows.values():
            r.pop("kl")
        res["win"][mix] = {"bytes": nbytes, "n_eval": a.n_eval, "speed_margin": a.speed_margin, "rows": rows}
        atomic_write_text(res_path, json.dumps(res, indent=1) + "\n")
        print(win_table({"win": {mix: res["win"][mix]}}), flush=True)


def win_table(res: dict) -> str:
    lines = ["", "| llama.cpp budget | file | bits/weight | tg predicted | tg measured (x llama.cpp) | pp predicted | "
                 "pp measured (x llama.cpp) | task KLD ± se | Δ task KLD vs llama.cpp (95% CI, paired) | Δ vs speed-blind TASA |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    verdicts = []
    for mix, w in res["win"].items():
        if mix == "errors":
            lines += [f"| {k} | infeasible: {v} |  |  |  |  |  |  |  |  |" for k, v in w.items()]
            continue
        for label, r in w["rows"].items():
            vs_blind = f"{r['dkld_vs_blind']:+.4f} ± {r['dkld_vs_blind_ci95']:.4f}" if "dkld_vs_blind" in r else ""
            vs_llama = "" if label == "llama.cpp" else f"{r['dkld_vs_llama']:+.4f} ± {r['dkld_vs_llama_ci95']:.4f}"
            pred = (f"{r['pred_tg_ts']:.2f}", f"{r['pred_pp_ts']:.2f}") if "pred_tg_ts" in r else ("", "")
            lines.append(f"| {mix} | {label} | {r['bpw']:.3f} | {pred[0]} | {r['tg_ts']:.2f} ({r['tg_ratio']:.3f}) | {pred[1]} | "
                         f"{r['pp_ts']:.2f} ({r['pp_ratio']:.3f}) | {r['task_kld']:.4f} ± {r['task_kld_se']:.4f} | "
                         f"{vs_llama} | {vs_blind} |")
        r = w["rows"].get("TASA speed-aware")
        if r:
            fast = r["tg_ratio"] >= 0.98 and r["pp_ratio"] >= 0.98
            better = r["dkld_vs_llama"] + r["dkld_vs_llama_ci95"] < 0
            verdicts.append(f"- {mix} (speed margin {w.get('speed_margin', 0):g}): speed-aware TASA at tg {r['tg_ratio']:.3f}x, "
                            f"pp {r['pp_ratio']:.3f}x llama.cpp's mix ({'both' if fast else 'NOT both'} >= 0.98), task KLD "
                            f"{'significantly lower' if better else 'NOT significantly lower'} than the mix's: "
                            f"{'met' if fast and better else 'not met'}")
    return "\n".join(lines + ([""] + verdicts if verdicts else [])) + "\n"


def table(model: str, res: dict, kp) -> str:
    m = kp.measured
    tg, pp = m["tg"], m["pp"]
    lines = [f"**{model}** ({kp.machine.get('cpu')}, {m['threads']} thread(s), llama.cpp {kp.machine.get('llama_cpp_commit')}, "
             f"speed = {m.get('stat', 'best')} of {m.get('reps')} llama-bench repetitions)", "",
             f"| plan | bits/weight | predicted loss | tg{tg} predicted | tg{tg} measured | error | pp{pp} predicted | "
             f"pp{pp} measured | error | load avg before -> after |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, r in res["rows"].items():
        lines.append(f"| {label} | {r['bpw']:.3f} | {r['loss']:.4f} | {r['pred_tg_ts']:.2f} | {r['tg_ts']:.2f} | "
                     f"{100 * r['tg_err']:+.1f}% | {r['pred_pp_ts']:.2f} | {r['pp_ts']:.2f} | {100 * r['pp_err']:+.1f}% | "
                     f"{r['load_before'][0]} -> {r['load_after'][0]} |")
    errs = [abs(r[k]) for r in res["rows"].values() for k in ("tg_err", "pp_err")]
    if errs:
        lines += ["", f"max |error| {100 * max(errs):.1f}% over {len(res['rows'])} files "
                      f"({'within' if max(errs) <= 0.10 else 'NOT within'} 10%)"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
