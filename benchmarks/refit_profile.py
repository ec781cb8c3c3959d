"""A kernel profile fitted again from the design speeds it recorded (nothing measured): the
coefficients with and without the decode floor (bytes per weight / the probed bandwidth,
``devices.kernel_profile.decode_floor``; a profile made without it, ``decode_floor`` not set, is
the unfloored fit, one made with it the floored fit), the fit's and the hold-out's errors, and, for the files of
the recorded win run (``benchmarks/device/<model>.json``; the plans solved again from the limits the
run recorded, with the recorded profile, as the run solved them), each file's predicted speed
relative to its mix under both fits against the measured ratio.

    python benchmarks/refit_profile.py --model gemma3-270m

The mixes are quantized again from the F32 reference under ``--work`` (their formats only matter).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import json  # noqa: E402

from device_plans import predict_file  # noqa: E402
from devices.kernel_profile import DesignRun, _errors, decode_floor, design_plans, fit  # noqa: E402
from tasa_edge.costmodel import load_kernel_profile  # noqa: E402
from tasa_edge.errors import TasaError  # noqa: E402
from tasa_edge.model import ModelSource  # noqa: E402
from tasa_edge.results import Analysis  # noqa: E402
from tasa_edge.zoo import resolve_model  # noqa: E402
from win_loss import mix_types, recorded_run_args, solve  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    recorded_run_args(ap)
    a = ap.parse_args(argv)
    m = a.model
    path = a.results / f"{m}.profile.toml"
    old = load_kernel_profile(path)                 # one-line errors for a missing or bad profile
    meas = tomllib.loads(path.read_text())["measured"]
    if old.target != "gguf" or meas.get("by_width"):
        raise SystemExit("refit_profile: GGUF profiles without --by-width only")
    src = ModelSource.open(resolve_model(m))
    menu = list(old.costs)
    runs = [DesignRun(label, t, meas["design_tg_ts"][label], meas["design_pp_ts"][label], 0.0, 0.0, 0)
            for label, t in design_plans(src, menu, kernels="gguf")]
    floors = {f: decode_floor(f, "gguf", meas.get("bandwidth_bytes_per_s")) for f in menu}
    fits, errs = {}, {}
    for name, fl in (("unfloored fit", None), ("floored fit", floors)):
        kp = copy.deepcopy(old)
        held = [r for r in runs if r.label.startswith("random")]
        kp.costs = fit(src, [r for r in runs if not r.label.startswith("random")], menu, old.pp, old.head_prefill, False, fl)
        eh = _errors(kp, src, held)
        kp.costs = fit(src, runs, menu, old.pp, old.head_prefill, False, fl)
        ef = _errors(kp, src, runs)
        fits[name] = kp
        errs[name] = [max(abs(e[k]) for e in d.values()) for d in (ef, eh) for k in ("tg_err", "pp_err")]
    L = [f"# {m}: its profile fitted again, with the decode floor "
         f"(bandwidth {meas.get('bandwidth_bytes_per_s', 0) / 1e9:.1f} GB/s)", "",
         "| format | floor | decode, unfloored | decode, floored | head decode, unfloored | head decode, floored |",
         "|---|---|---|---|---|---|"]
    for f in menu:
        c0, c1 = fits["unfloored fit"].costs[f], fits["floored fit"].costs[f]
        h0 = f"{c0.output_decode_ns_per_weight:.4f}" if c0.output_decode_ns_per_weight is not None else ""
        h1 = f"{c1.output_decode_ns_per_weight:.4f}" if c1.output_decode_ns_per_weight is not None else ""
        mark = " (below)" if c0.decode_ns_per_weight < floors[f] * (1 - 1e-6) else ""
        hmark = " (below)" if c0.output_decode_ns_per_weight is not None and c0.output_decode_ns_per_weight < floors[f] * (1 - 1e-6) else ""
        L.append(f"| {f} | {floors[f]:.4f} | {c0.decode_ns_per_weight:.4f}{mark} | {c1.decode_ns_per_weight:.4f} | {h0}{hmark} | {h1} |")
    L += ["", "ns per weight per token. Largest |error| (tg, pp) over all design files / over the random mixes "
              "predicted by the designed files: " + "; ".join(f"{k} {e[0]:.3f}, {e[1]:.3f} / {e[2]:.3f}, {e[3]:.3f}"
                                                            for k, e in errs.items())]
    res_path = a.results / f"{m}.json"
    res = json.loads(res_path.read_text()) if res_path.is_file() else {}
    an = None
    win = {k: w for k, w in res.get("win", {}).items() if k != "errors" and "TASA speed-aware" in w["rows"]}
    if win:
        an = Analysis.load(a.analysis or a.results / f"analysis-{m}" / "analysis.json")
        L += ["", "| budget | file | tg x mix: unfloored | floored | measured | pp x mix: unfloored | floored | measured |",
              "|---|---|---|---|---|---|---|---|"]
    for mix, w in win.items():
        types, _ = mix_types(src, m, mix, w, a.work)
        base = {k: predict_file(kp, src, types)[0] for k, kp in fits.items()}
        mrow = w["rows"]["llama.cpp"]
        files = [("TASA speed-blind", solve(an, src, old, w["bytes"], {}, types, None, a.solve_seconds), w["rows"]["TASA speed-blind"])]
        tries = [t for t in w["rows"]["TASA speed-aware"]["tries"] if "measured_ms" in t]
        for i, t in enumerate(tries, 1):
            files.append((f"speed-aware try {i}", solve(an, src, old, w["bytes"], t["limits_ms"], types, t.get("max_changes"),
                                                        a.solve_seconds), t))
        for label, plan, r in files:
            p = {k: kp.predict(src, plan.tensors) for k, kp in fits.items()}
            tg = [p[k].tg_ts / base[k].tg_ts for k in fits] + [r["tg_ts"] / mrow["tg_ts"]]
            pp = [p[k].pp_ts / base[k].pp_ts for k in fits] + [r["pp_ts"] / mrow["pp_ts"]]
            L.append(f"| {mix} | {label} | " + " | ".join(f"{v:.3f}" for v in tg + pp) + " |")
    print("\n".join(L) + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (TasaError, OSError, KeyError) as exc:     # bad input: one line, no traceback
        print(f"refit_profile.py: {exc}", file=sys.stderr)
        sys.exit(2)
