"""The allocator's side of a recorded win run: the predicted loss (TASA's objective, the sum the
allocator minimises) of each llama.cpp mix, of the speed-blind plan and of every speed-aware plan
the run measured, the plans solved again from the limits the run recorded (the solver is
deterministic: the number of tensors changed from the mix is checked against the record); then the
plans the current search (``speed_search``: a plan predicted no better than the mix is not measured,
the margin halves) would solve from the first try's limits. The tries after one that corrected the
loss proxy (``--calibrate``: its recorded ``calibration``) are solved with that correction, and
their predicted loss is the corrected one. Nothing is measured on the device.

    python benchmarks/win_loss.py --model qwen2.5-coder-1.5b \\
        --analysis benchmarks/evidence/qwen2.5-coder-1.5b/state/analysis-gsm8k/analysis.json

Reads ``benchmarks/device/<model>.json`` and ``<model>.profile.toml``; the mixes are quantized
again from the F32 reference (their formats only matter) under ``--work``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from device_plans import CalibratedAnalysis, file_types, margin_text, predict_file, predicted_loss  # noqa: E402
from exporters.baseline import quantize_baseline  # noqa: E402
from exporters.reference import reference_gguf  # noqa: E402
from tasa_edge.costmodel import load_kernel_profile  # noqa: E402
from tasa_edge.errors import TasaError  # noqa: E402
from tasa_edge.inspect import inspect_gguf  # noqa: E402
from tasa_edge.model import ModelSource  # noqa: E402
from tasa_edge.planner import DeviceLimits, make_plan  # noqa: E402
from tasa_edge.results import Analysis  # noqa: E402
from tasa_edge.zoo import resolve_model  # noqa: E402


def heads(plan_types: dict[str, str], mix: dict[str, str]) -> str:
    """The output head / token embedding's format, where the plan moved it from the mix's."""
    out = [f"{n.split('.')[0]} {mix[n]}->{f}" for n, f in plan_types.items()
           if n in ("output.weight", "token_embd.weight") and mix.get(n) != f]
    return ", ".join(out)


def recorded_run_args(ap: argparse.ArgumentParser) -> None:
    """The options of the scripts that read a recorded win run (this one, refit_profile.py)."""
    ap.add_argument("--model", required=True)
    ap.add_argument("--analysis", type=Path, help="default: benchmarks/device/analysis-<model>/analysis.json")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks/device")
    ap.add_argument("--work", type=Path, default=Path("/tmp/tasa-win-loss"))
    ap.add_argument("--solve-seconds", type=float, default=120.0)


def mix_types(src: ModelSource, model: str, mix: str, w: dict, work: Path) -> tuple[dict[str, str], dict]:
    """The formats of llama.cpp's ``mix`` (quantized again from the F32 reference into ``work``
    when missing) and its inspect report; refused when its bytes are not the recorded run's."""
    lf = work / f"{model}-{mix}.gguf"
    if not lf.exists():
        work.mkdir(parents=True, exist_ok=True)
        quantize_baseline(reference_gguf(src), lf, mix)
    rep = inspect_gguf(lf)
    if rep["bytes"] != w["bytes"]:
        raise SystemExit(f"{mix}: the mix made now has {rep['bytes']} bytes, the run's {w['bytes']}")
    return file_types(rep), rep


def solve(an, src, kp, nbytes: int, lim: dict, mix: dict[str, str], max_changes: int | None = None,
          seconds: float = 120.0):
    """A plan as device_plans' win solves it: ``lim`` the predicted-time limits ({} for the
    speed-blind plan), at most ``max_changes`` tensors in another format than ``mix``."""
    return make_plan(an, src, nbytes=nbytes, time_limit=seconds, device=DeviceLimits(
        kp, max_decode_ms=lim.get("decode_ms"), max_prefill_ms=lim.get("prefill_ms"),
        near=mix if max_changes is not None else None, max_changes=max_changes))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    recorded_run_args(ap)
    a = ap.parse_args(argv)
    m = a.model
    src = ModelSource.open(resolve_model(m))
    kp = load_kernel_profile(a.results / f"{m}.profile.toml")
    an = Analysis.load(a.analysis or a.results / f"analysis-{m}" / "analysis.json")
    res = json.loads((a.results / f"{m}.json").read_text())
    a.work.mkdir(parents=True, exist_ok=True)
    lines = [f"# {m}: predicted loss of the recorded win run's files", "",
             "| budget | file | margin | predicted loss | tensors changed from the mix | output / embedding | "
             "predicted tg, pp (x the mix's prediction) |", "|---|---|---|---|---|---|---|"]
    for mix, w in res.get("win", {}).items():
        if mix == "errors" or "TASA speed-aware" not in w["rows"]:
            continue
        types, _ = mix_types(src, m, mix, w, a.work)
        pred, _ = predict_file(kp, src, types)
        mix_loss, unscored = predicted_loss(an, types)
        ml = f"{mix_loss:.4f}" if mix_loss is not None else "unscored " + ", ".join(unscored)
        lines.append(f"| {mix} | llama.cpp | | {ml} | 0 | | 1.000, 1.000 |")

        def row(label, margin, plan, recorded=None):
            ch = sum(1 for n, f in plan.tensors.items() if types.get(n) != f)
            if recorded is not None and ch != recorded:
                raise SystemExit(f"{mix} {label}: solved again it changes {ch} tensors, the run's {recorded}")
            p = plan.predicted
            sp = f"{p['tg_ts'] / pred.tg_ts:.4f}, {p['pp_ts'] / pred.pp_ts:.4f}" if "tg_ts" in p else ""
            lines.append(f"| {mix} | {label} | {margin} | {p['loss']:.4f} | {ch} | {heads(plan.tensors, types)} | {sp} |")
            return p["loss"]

        cur = {"an": an}

        def solved(lim, max_changes=None):
            return solve(cur["an"], src, kp, w["bytes"], lim, types, max_changes, a.solve_seconds)

        def infeasible(label, margin):
            lines.append(f"| {mix} | {label} | {margin} | infeasible | | | |")

        def attempt(label, margin, lim, max_changes=None, recorded=None):
            """row() of the plan solved at ``lim``, or an 'infeasible' row (None) when the solver finds
            none, as speed_search reads any TasaError of its plan_fn: the search goes on at the next margin."""
            try:
                plan = solved(lim, max_changes)
            except TasaError:
                return infeasible(label, margin)
            return row(label, margin, plan, recorded)

        row("TASA speed-blind", "", solved({}))
        tries = [t for t in w["rows"]["TASA speed-aware"]["tries"] if "limits_ms" in t]
        m0 = w["speed_margin"]
        for i, t in enumerate(tries, 1):
            margin = t.get("margin", m0)
            label = f"speed-aware, try {i} of the run" + (" (skipped)" if "skipped" in t else "")
            if "infeasible" in t:
                infeasible(label, margin_text(margin))
            else:
                attempt(label, margin_text(margin), t["limits_ms"], t.get("max_changes"), t.get("changes"))
            if t.get("calibration", {}).get("scales"):
                cur["an"] = CalibratedAnalysis.of(an, types, t["calibration"]["scales"])
        cur["an"] = an
        # speed_search's margins from the first try's limits (which may have been planned at another margin)
        first, at = tries[0]["limits_ms"], tries[0].get("margin", m0)
        for margin in (m0, m0 / 2, m0 / 4, 0.0):
            loss = attempt("speed-aware, current search", f"{margin:g}",
                           {k: v / (1 - at) * (1 - margin) for k, v in first.items()})
            if loss is not None and (mix_loss is None or loss < mix_loss):
                break
    out = "\n".join(lines) + "\n"
    print(out)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (TasaError, OSError, KeyError) as exc:     # bad input: one line, no traceback
        print(f"win_loss.py: {exc}", file=sys.stderr)
        sys.exit(2)
