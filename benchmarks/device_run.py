"""Issue 14's benchmark in one run: for each packaged model, the kernel profile (made when missing,
resumable), the analysis (CLI defaults, made when missing) and ``benchmarks/device_plans.py``
(predicted vs measured speed at three budgets, with the drift check, and the win at llama.cpp's
Q3_K_S / Q3_K_M bytes), then ``<out>/summary.md``: every model's tables, the run's start and end,
the commit and the profiles' dates.

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
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasa_edge.fsutil import atomic_write_text  # noqa: E402

# model -> the three budgets of the prediction table (bits/weight), llama-bench repetitions (-r) of its
# profile and checks. The small models' decode is fast and noisy on a shared machine (one SmolLM2
# file's 5 tg128 repetitions: 151-181 t/s within seconds), so they take the fastest of 20 (a second
# per repetition); Qwen's 5 repetitions take a minute per file.
MODELS = {
    "smollm2-135m": ((4.6, 5.5, 6.5), 20),
    "gemma3-270m": ((4.6, 5.5, 6.5), 20),
    "qwen2.5-coder-1.5b": ((3.5, 4.5, 5.5), 5),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd: list[str]) -> None:
    log("$ " + " ".join(cmd))
    r = subprocess.run(cmd, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--analysis", nargs="*", default=[], metavar="MODEL=PATH",
                    help="an existing analysis.json per model (default <out>/analysis-MODEL, made by tasa-edge analyze)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=None, help="llama-bench -r of new profiles (default: per model, above)")
    ap.add_argument("--n-eval", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/device"))
    ap.add_argument("--fresh", action="store_true",
                    help="measure every plan again (drop the models' device_plans JSON; profiles and analyses are kept)")
    ap.add_argument("--reprofile", nargs="*", default=[], choices=list(MODELS), metavar="MODEL",
                    help="profile these models again in this run, just before their plans (the old profile is replaced)")
    a = ap.parse_args(argv)
    given = dict(s.split("=", 1) for s in a.analysis)
    out = a.out if a.out.is_absolute() else ROOT / a.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    py = sys.executable
    if a.fresh:
        for m in a.models:
            (out / f"{m}.json").unlink(missing_ok=True)
    for m in a.models:
        prof = out / f"{m}.profile.toml"
        if m in a.reprofile:
            (out / f"{m}.profile-progress.json").unlink(missing_ok=True)
        if m in a.reprofile or not prof.is_file():
            run(["tasa-edge", "profile", "-m", m, "-o", str(prof), "-t", str(a.threads), "-r", str(a.reps or MODELS[m][1]),
                 "--resume", str(out / f"{m}.profile-progress.json")])
        an = Path(given[m]) if m in given else out / f"analysis-{m}" / "analysis.json"
        if not an.is_file():
            run(["tasa-edge", "analyze", m, "-o", str(an.parent)])
        run([py, "benchmarks/device_plans.py", "--model", m, "--profile", str(prof), "--analysis", str(an),
             "--bpw", *map(str, MODELS[m][0]), "--win", "Q3_K_S", "Q3_K_M", "--n-eval", str(a.n_eval), "--out", str(out)])
    parts = [f"# Device-aware plans: one run\n\n`python benchmarks/device_run.py {' '.join(sys.argv[1:] if argv is None else argv)}`"
             f" at commit {commit}, {time.strftime('%Y-%m-%d %H:%M', time.gmtime(t0))} to "
             f"{time.strftime('%H:%M UTC', time.gmtime())}.\n"]
    for m in a.models:
        created = tomllib.loads((out / f"{m}.profile.toml").read_text())["measured"].get("created")
        res = json.loads((out / f"{m}.json").read_text())
        parts.append(f"## {m}\n\nProfile measured {created}; plans measured in this run "
                     f"({len(res.get('rows', {}))} budgets, win at {', '.join(k for k in res.get('win', {}) if k != 'errors')}).\n")
        parts.append((out / f"{m}.md").read_text())
    atomic_write_text(out / "summary.md", "\n".join(parts))
    log(f"wrote {out / 'summary.md'} ({(time.time() - t0) / 60:.0f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
