"""Issue 14's benchmark in one run: for each packaged model, the kernel profile (made when missing,
resumable), the analysis (CLI defaults, made when missing) and ``benchmarks/device_plans.py``
(predicted vs measured speed at three budgets, with the drift check, and the win at llama.cpp's
Q3_K_S / Q3_K_M bytes), then ``<out>/summary.md``: every model's tables under the run that made
them (its command, commit and start, and when each model was measured) and the profiles' dates.

    python benchmarks/device_run.py                            # all three models (hours on 2 cores)
    python benchmarks/device_run.py --models smollm2-135m --analysis smollm2-135m=tasa-out/analysis.json

A shared machine's timings are only as good as its quiet moments: run it with nothing else running.
Every step saves as it goes (profile ``--resume`` file, device_plans' JSON), so a re-run resumes;
``--fresh`` measures every plan again, ``--reprofile MODEL`` makes a model's profile again first
(minutes for the small models, ~1 hour for Qwen): a machine whose speed drifts between hours is
best profiled just before its plans are checked (device_plans' drift check measures how far).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from device_plans import kld_cell, kld_interval, ratio_cell, records_loss, win_verdict  # noqa: E402  (benchmarks/, this script's folder, is on sys.path)
from tasa_edge.fsutil import atomic_write_text  # noqa: E402

# model -> the three budgets of the prediction table (bits/weight), llama-bench repetitions (-r) of its
# profile and of each file in the checks, the checks' passes over the files compared (device_plans
# --rounds) and the profile's passes over its design files (profile --rounds). The small models'
# decode is fast and noisy on a shared machine (one SmolLM2 file's 5 tg128 repetitions: 151-181 t/s
# within seconds, and >10% apart between minutes), so they take 20 repetitions (a second each): the
# profile in 4 passes of 5, the checks in 8 passes of 3; Qwen's 5 repetitions take a minute per file:
# 6 passes of 1 in the checks, one pass in the profile (its 30 design files, ~1.3 GB each, do not fit
# on this disk at once). The checks' passes are many because the win's verdict reads the 95% interval
# of a speed ratio over them (t over 4 passes spans ~±3-10% on this VM).
# The last field is the speed statistic of a new profile (profile --stat), which its checks use too:
# the small models' decode jumps between levels on this VM, the fastest of the 24 repetitions of
# SmolLM2's 77 MB plan 1.165x their median in the checks of 6 Dec 02:09 (benchmarks/decode_spread.py
# --checks on commit 439dac5's smollm2-135m.json), so every model is profiled with the median.
# A profile records its statistic and its checks use that one: Qwen's committed profile (6 Dec
# 05:24) was made with the best, and its checks keep the best until Qwen is profiled again.
MODELS = {
    "smollm2-135m": ((4.6, 5.5, 6.5), 20, 8, 4, "median"),
    "gemma3-270m": ((4.6, 5.5, 6.5), 20, 8, 4, "median"),
    "qwen2.5-coder-1.5b": ((3.5, 4.5, 5.5), 5, 6, 1, "median"),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd: list[str], progress: bool = False) -> None:
    """Run a step; ``progress``: let it print its progress lines (importing device_plans turned
    them off in this process, TASA_NO_PROGRESS, which its children inherit)."""
    log("$ " + " ".join(cmd))
    env = {k: v for k, v in os.environ.items() if k != "TASA_NO_PROGRESS"} if progress else None
    r = subprocess.run(cmd, cwd=ROOT, env=env)
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}")


def pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def combined(out: Path, models: list[str]) -> str:
    """The README's two tables over all models: predicted vs measured (raw and with the drift out),
    and the win at llama.cpp's mixes' bytes, with the verdicts."""
    pred = ["| model | plan | tg128 predicted | measured | error | drift out | pp512 predicted | measured | error | drift out |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    results = {m: json.loads((out / f"{m}.json").read_text()) for m in models}
    with_loss = records_loss(list(results.values()))
    lc = ("predicted loss | ", "---|") if with_loss else ("", "")
    win = [f"| model | budget | file | bits/weight | {lc[0]}tg128 (× mix) | pp512 (× mix) | task KLD (95%) | Δ vs mix (95%) | Δ vs speed-blind |",
           f"|---|---|---|---|{lc[1]}---|---|---|---|---|"]
    raw, adj, verdicts, tokens, answers = [], [], [], False, {}
    for m in models:
        res = results[m]
        for label, r in res.get("rows", {}).items():
            used = f" ({r['bpw']:.3f} used)" if abs(r["bpw"] - float(label.split()[1])) > 0.01 else ""
            d = (pct(r["tg_err_drift"]), pct(r["pp_err_drift"])) if "reference" in r else ("", "")
            pred.append(f"| {m} | {label}{used} | {r['pred_tg_ts']:.2f} | {r['tg_ts']:.2f} | {pct(r['tg_err'])} | {d[0]} | "
                        f"{r['pred_pp_ts']:.2f} | {r['pp_ts']:.2f} | {pct(r['pp_err'])} | {d[1]} |")
            raw += [abs(r["tg_err"]), abs(r["pp_err"])]
            if "reference" in r:
                adj += [abs(r["tg_err_drift"]), abs(r["pp_err_drift"])]
        for mix, w in res.get("win", {}).items():
            if mix == "errors":
                win += [f"| {m} | {k.split()[0]} | {' '.join(k.split()[1:])} | infeasible: {v} | | | | | |{' |' if with_loss else ''}" for k, v in w.items()]
                continue
            for label, r in w["rows"].items():
                vs_mix = "" if label == "llama.cpp" else kld_cell(r, "dkld_vs_llama")
                vs_blind = kld_cell(r, "dkld_vs_blind")
                ivs = [kld_interval(r, k) for k in ("task_kld", "dkld_vs_llama")]
                tokens |= any(iv is not None and not iv[3] for iv in ivs)     # an old row, over tokens
                loss = (f"{r['pred_loss']:.4f} | " if "pred_loss" in r else " | ") if with_loss else ""
                win.append(f"| {m} | {mix} | {label} | {r['bpw']:.3f} | {loss}{r['tg_ts']:.2f} ({ratio_cell(r, 'tg')}) | "
                           f"{r['pp_ts']:.2f} ({ratio_cell(r, 'pp')}) | {kld_cell(r, 'task_kld', False)} | {vs_mix} | {vs_blind} |")
            if "TASA speed-aware" in w["rows"]:
                verdicts.append((m, mix, win_verdict(w)[2]))
            if "n_eval" in w:
                answers.setdefault(w["n_eval"], []).append(f"{m} {mix}")
    n_in = sum(1 for e in raw if e <= 0.10)
    within = (f"Raw: {n_in} of {len(raw)} numbers within 10% (max |error| {100 * max(raw):.1f}%)"
              + (f"; with the machine's drift since the profile taken out: max |error| {100 * max(adj):.1f}%."
                 if adj else ".")) if raw else "No prediction checks saved."
    lines = pred + ["", within] + [""] + win
    by = {v: [f"{m} {mix}" for m, mix, got in verdicts if got == v] for v in ("met", "inconclusive", "not met")}
    lines += ["", "Win (speed-aware TASA's tg and pp >= the goal x the mix's, judged by the 95% interval of the ratio over "
                  "the paired passes; task KLD significantly lower): "
              + "; ".join(f"{v} at {len(ms)} of {len(verdicts)} budgets" + (f" ({', '.join(ms)})" if ms else "")
                          for v, ms in by.items()) + "."]
    if answers:
        lines += ["", "Task KLD over the first held-out GSM8K answers of the eval split: "
                  + "; ".join(f"{n} at {', '.join(ms)}" for n, ms in sorted(answers.items())) + "."]
    if tokens:
        lines += ["", "Task-KLD intervals marked `tok` were recorded before the bootstrap over answers: they take the "
                      "tokens as independent, which the tokens of one answer are not, so they are too narrow and the "
                      "task-KLD part of those verdicts is provisional."]
    return "\n".join(lines) + "\n"


def run_headers(out: Path) -> dict[str, str]:
    """model -> the device_run command whose results ``<model>.json`` holds (commit, start and end):
    ``run.json`` keeps one per model, so a run of some models does not relabel the others'."""
    f = out / "run.json"
    if not f.is_file():
        return {}
    d = json.loads(f.read_text())
    if "runs" in d:
        return dict(d["runs"])
    return {m: d["header"] for m in d.get("models", [])}      # written before per-model headers


def run_times(out: Path) -> dict[str, str]:
    """model -> when its results were measured (``2026-12-06 02:09 to 02:41 UTC``), for runs that
    record it per model."""
    f = out / "run.json"
    return dict(json.loads(f.read_text()).get("times", {})) if f.is_file() else {}


def set_header(out: Path, model: str, header: str | None, when: str | None = None) -> None:
    """Record (or, with None, drop) the header of the run that made ``model``'s results, and when
    they were measured, in ``run.json``, keeping the other models'."""
    headers, times = run_headers(out), run_times(out)
    headers.pop(model, None)
    times.pop(model, None)
    if header is not None:
        headers[model] = header
        if when:
            times[model] = when
    atomic_write_text(out / "run.json", json.dumps({"runs": headers, "times": times}, indent=1) + "\n")


def write_summary(out: Path, models: list[str], headers: dict[str, str], times: dict[str, str] | None = None) -> None:
    runs: dict[str, list[str]] = {}
    for m in models:
        runs.setdefault(headers.get(m, "A run that did not reach its end (no header written): profile dates below."), []).append(m)
    times = times or {}

    def named(m: str) -> str:
        return f"{m} ({times[m]})" if m in times else m

    head = "\n".join(f"- {', '.join(map(named, ms))}: {h}" for h, ms in runs.items())
    title = "one run" if len(runs) == 1 else f"{len(runs)} runs"
    parts = [f"# Device-aware plans: {title}\n\n{head}\n", "## All models\n", combined(out, models)]
    for m in models:
        created = tomllib.loads((out / f"{m}.profile.toml").read_text())["measured"].get("created")
        parts.append(f"## {m}\n\nProfile measured {created}.\n")
        parts.append((out / f"{m}.md").read_text())
    atomic_write_text(out / "summary.md", "\n".join(parts))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--analysis", nargs="*", default=[], metavar="MODEL=PATH",
                    help="an existing analysis.json per model (default <out>/analysis-MODEL, made by tasa-edge analyze)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=None, help="llama-bench -r of new profiles (default: per model, above)")
    ap.add_argument("--n-eval", type=int, default=20)
    ap.add_argument("--check-answers", type=int, default=0, metavar="K",
                    help="device_plans --check-answers: re-plan a speed-aware plan whose task KLD on K other held-out "
                         "answers is significantly above the mix's (0: off, as in the recorded runs)")
    ap.add_argument("--calibrate", type=int, default=0, metavar="G",
                    help="device_plans --calibrate (with --check-answers): correct the loss proxy by up to G groups of a "
                         "speed-aware plan's moves measured alone on the check answers, when the plan shows no gain there")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/device"))
    ap.add_argument("--fresh", action="store_true",
                    help="measure every plan again (drop the models' device_plans JSON; profiles and analyses are kept)")
    ap.add_argument("--reprofile", nargs="*", default=[], choices=list(MODELS), metavar="MODEL",
                    help="profile these models again in this run, just before their plans (the old profile is replaced)")
    ap.add_argument("--summary-only", action="store_true", help="measure nothing: write summary.md from the saved results")
    ap.add_argument("--note", default="", help="added to the run's header in run.json / summary.md (e.g. what an "
                                               "interrupted run this one resumes had measured, and when)")
    a = ap.parse_args(argv)
    if any("=" not in s for s in a.analysis):
        ap.error("--analysis takes MODEL=PATH")
    if a.n_eval < 2:
        ap.error("--n-eval must be at least 2 (the task KLD's interval is a bootstrap over answers)")
    if a.check_answers < 0:
        ap.error("--check-answers must be at least 0")
    if a.calibrate < 0 or (a.calibrate and not a.check_answers):
        ap.error("--calibrate takes G >= 0 and needs --check-answers")
    given = {m: Path(p).resolve() for m, p in (s.split("=", 1) for s in a.analysis)}
    out = a.out if a.out.is_absolute() else ROOT / a.out
    if a.summary_only:
        missing = [str(out / f"{m}.{x}") for m in a.models for x in ("json", "md", "profile.toml") if not (out / f"{m}.{x}").is_file()]
        if missing:
            ap.error(f"no saved results to summarise: {missing[0]} is missing (run without --summary-only first)")
        write_summary(out, a.models, run_headers(out), run_times(out))
        log(f"wrote {out / 'summary.md'}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    code = ["tasa_edge", "exporters", "devices", "benchmarks/device_run.py", "benchmarks/device_plans.py"]
    if subprocess.run(["git", "diff", "--quiet", "HEAD", "--", *code], cwd=ROOT).returncode == 1:
        commit += " with uncommitted changes to the code"     # the header must not claim a commit that did not run
    py = sys.executable
    args = list(sys.argv[1:] if argv is None else argv)
    shown = [x for i, x in enumerate(args) if x != "--note" and not x.startswith("--note=") and (i == 0 or args[i - 1] != "--note")]
    header = (f"`python benchmarks/device_run.py {' '.join(shown)}` at commit {commit}, started "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(t0))}." + (f" {a.note}" if a.note else ""))
    if a.fresh:
        for m in a.models:
            (out / f"{m}.json").unlink(missing_ok=True)
            set_header(out, m, None)        # its results are gone: so is the header that named their run
    for m in a.models:
        t_m = time.time()
        res = out / f"{m}.json"
        before = res.read_bytes() if res.is_file() else None
        prof = out / f"{m}.profile.toml"
        if m in a.reprofile:        # the old profile goes too: a run stopped in the new one resumes it, not the old
            (out / f"{m}.profile-progress.json").unlink(missing_ok=True)
            prof.unlink(missing_ok=True)
        if m in a.reprofile or not prof.is_file():
            run(["tasa-edge", "profile", "-m", m, "-o", str(prof), "-t", str(a.threads), "-r", str(a.reps or MODELS[m][1]),
                 "--rounds", str(MODELS[m][3]), "--stat", MODELS[m][4], "--resume", str(out / f"{m}.profile-progress.json")], progress=True)
        an = given[m] if m in given else out / f"analysis-{m}" / "analysis.json"
        if not an.is_file():
            run(["tasa-edge", "analyze", m, "-o", str(an.parent)])
        run([py, "benchmarks/device_plans.py", "--model", m, "--profile", str(prof), "--analysis", str(an),
             "--bpw", *map(str, MODELS[m][0]), "--rounds", str(MODELS[m][2]), "--win", "Q3_K_S", "Q3_K_M", "--n-eval", str(a.n_eval),
             *(["--check-answers", str(a.check_answers)] if a.check_answers else []),
             *(["--calibrate", str(a.calibrate)] if a.calibrate else []), "--out", str(out)])
        # each model's header as soon as it is done, so a run stopped later still names what made
        # the models it finished; a model this run found complete (nothing measured) keeps its own
        if before is None or res.read_bytes() != before or m not in run_headers(out):
            set_header(out, m, header, f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(t_m))} to {time.strftime('%H:%M UTC', time.gmtime())}")
    headers = run_headers(out)
    # every model with saved results, each under the run that made them
    write_summary(out, [m for m in MODELS if m in headers and all((out / f"{m}.{x}").is_file() for x in ("json", "md", "profile.toml"))],
                  headers, run_times(out))
    log(f"wrote {out / 'summary.md'} ({(time.time() - t0) / 60:.0f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
