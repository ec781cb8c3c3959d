"""Benchmark reports: ``bench.json`` (schema ``tasa-edge/bench-report`` v1), ``bench.md`` and PNG plots.

JSON layout (stable; new keys may be added, existing ones keep their meaning)::

    {"schema": "tasa-edge/bench-report", "version": 1, "tool", "created",
     "target":   {"kind": "local"|"adb"|"ssh", "profile": {...}|null, "memory_limit_bytes", "transport"?,
                  "emulation"?: {"binary_arch", "device_arch", "note"} | null  (device runs the tools emulated),
                  "speed_backend"?: {"gguf": "llama-bench"|"llama-cpp-python", "reason", "build"?}},
     "machine":  {"cpu", "cores", "usable_cores", "threads", "ram_bytes", "arch", "os", "host", "features", "software"},
     "settings": {"name": "small", "pp", "tg", "reps", "general_docs", "general_tokens", "task_examples",
                  "gsm8k_examples", "shots", "max_gen_tokens", "threads", ...},
     "reference": {"path", "bytes", "ppl_general", "ppl_task", ...} | null,
     "bandwidth": {"method", "read_bytes_per_s", "copy_bytes_per_s", "threads"} | null,
     "models": [{"name", "path", "format", "types", "file_bytes", "tensor_bytes", "params", "bpw",
                 "load_s", "peak_rss_bytes", "rss_before_load_bytes",
                 "speed": {"backend", "threads", "reps", "warmup", "emulated"?, "pp": {"n_tokens", "ts_mean", "ts_std",
                           "samples_ts"}, "tg": {...}},
                 "quality": {"general": {"n", "ppl", "kld", "kld_se", "kld_p99", "top1", "ppl_ref", "delta_p",
                                         "n_samples", "kld_ci", "top1_ci", "ppl_ci", "ppl_ref_ci", "delta_p_ci"},
                             "task": {...}, "measured_on": "target"|"host"},
                 "device_quality": {"general": {llama-perplexity summary}} | null,
                 "gsm8k": {"n", "shots", "strict_match", "flexible_extract", "strict_match_ci",
                           "flexible_extract_ci", ..., "completions"} | null,
                 "decode": {"bytes_per_token", "bytes_per_s", "bandwidth_fraction"} | null,
                 "error": null | "one line"}],
     "comparisons": {"baseline": NAME, "level": 0.95, "method": {...},
                     "rows": [{"model", "baseline", "general"|"task": {"kld"|"top1"|"ppl"|"delta_p": {"a", "b", "diff", "lo",
                               "hi", "level", "method", "n"}}, "gsm8k": {"strict_match"|"flexible_extract":
                               {"n", "a_correct", "b_correct", "a_only", "b_only", "pvalue", "diff"}}}]},
     "plots": {"pareto": "pareto.png", "plans": {...}, "illusion": "illusion.png"},
     "analysis": {"path", "illusion": {...}} | null}
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from tasa_edge.errors import TasaError
from tasa_edge.fsutil import atomic_path, atomic_write_text

MIB = 1024 * 1024


def write_reports(report: dict, out: Path, *, plans=(), analysis=None, reference=None) -> None:
    """Add the plots to ``report`` and write ``bench.json`` / ``bench.md`` / PNGs into ``out``."""
    out = Path(out)
    plots: dict = {}
    if report.get("models"):
        plot_pareto(report, out / "pareto.png")
        plots["pareto"] = "pareto.png"
    if plans:
        src = shape_source(report.get("models", []), reference)
        plots["plans"] = {}
        for p in plans:
            name = f"plan-{Path(p).stem}.png"
            plot_plan_heatmap(Path(p), src, out / name)
            plots["plans"][str(p)] = name
    report["analysis"] = None
    if analysis is not None:
        from tasa_edge.illusion import illusion_report
        from tasa_edge.results import Analysis

        rep = illusion_report(Analysis.load(Path(analysis)), out / "illusion.png")
        plots["illusion"] = "illusion.png"
        report["analysis"] = {"path": str(analysis), "illusion": rep}
    report["plots"] = plots
    atomic_write_text(out / "bench.json", json.dumps(report, indent=1, default=_jsonable) + "\n")
    atomic_write_text(out / "bench.md", markdown(report))


def _jsonable(x):
    try:
        import numpy as np

        if isinstance(x, np.generic):
            return x.item()
    except ImportError:  # pragma: no cover
        pass
    return str(x)


def load_report(path: str | Path) -> dict:
    p = Path(path)
    try:
        d = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TasaError(f"{p}: cannot read the report ({exc})") from None
    if d.get("schema") != "tasa-edge/bench-report":
        raise TasaError(f"{p}: not a tasa-edge bench report")
    if d.get("version") != 1:
        raise TasaError(f"{p}: unsupported bench report version {d.get('version')}")
    return d


# ============================================================================ markdown
def _f(x, fmt="{:.3f}", none="–"):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    return fmt.format(x)


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def markdown(report: dict) -> str:
    m, s, t = report["machine"], report["settings"], report["target"]
    lines = [f"# tasa-edge bench: {t['kind']}" + (f" ({t['profile']['name']})" if t.get("profile") else ""), ""]
    ram = _f(m.get("ram_bytes") and m["ram_bytes"] / 2**30, "{:.1f} GiB")
    lines.append(f"- machine: {m.get('cpu') or '?'}, {m.get('cores')} cores ({m.get('usable_cores')} usable), "
                 f"{m.get('threads')} threads, {ram} RAM, {m.get('arch') or '?'}, {m.get('os') or '?'}")
    b = report.get("bandwidth")
    if b:
        lines.append(f"- memory bandwidth: {b['read_bytes_per_s'] / 1e9:.1f} GB/s read ({b['method']})")
    lines.append(f"- settings: size {s['name']}, pp{s['pp']} / tg{s['tg']}, {s['reps']} reps after 1 warm-up, "
                 f"{s['threads']} threads; general text {s['general_docs'] or 'all'} docs x {s['general_tokens']} tokens, "
                 f"task KLD on {s['task_examples'] or 'all'} GSM8K answers, GSM8K {s['gsm8k_examples'] or 'all'} "
                 f"questions ({s['shots']}-shot, greedy, <= {s['max_gen_tokens']} tokens), held-out split")
    if t.get("emulation"):
        lines.append(f"- **emulated**: {t['emulation']['note']}")
    ct = s.get("chat_template") or {}
    lines.append("- task prompts: " + (f"the model's chat template ({ct.get('source')}; few-shot examples as earlier turns)"
                                       if ct.get("used") else "lm-eval's `Question: ...\\nAnswer:` format (no chat template)"))
    sb = t.get("speed_backend")
    if sb:
        b = sb.get("build") or {}
        lines.append(f"- GGUF speed measured by {sb['gguf']}" + (f" (llama.cpp {b['commit']})" if b.get("commit") else "")
                     + (f" ({sb['reason']})" if sb["gguf"] != "llama-bench" else ""))
    ref = report.get("reference")
    if ref:
        lines.append(f"- reference: `{Path(ref['path']).name}` ({ref['bytes'] / MIB:.1f} MiB), "
                     f"PPL general {_f(ref.get('ppl_general'), '{:.2f}')}, task {_f(ref.get('ppl_task'), '{:.3f}')}")
    else:
        lines.append("- reference: none (no KL-divergence)")
    if t.get("memory_limit_bytes"):
        lines.append(f"- memory limit: {t['memory_limit_bytes'] / 2**30:.2f} GiB")
    lines += ["", f"| model | format | size MiB | bpw | load s | peak RSS MiB | pp{s['pp']} t/s | tg{s['tg']} t/s "
              "| decode GB/s (of BW) | PPL | KLD general | top-1 general | KLD task | top-1 task | GSM8K strict | GSM8K flex |",
              "|" + "---|" * 16]
    for e in report["models"]:
        sp = e.get("speed") or {}

        def ts(k):
            x = sp.get(k)
            return f"{x['ts_mean']:.1f} ± {x['ts_std']:.1f}" if x else "–"

        dec = e.get("decode")
        dec_s = "–"
        if dec:
            dec_s = f"{dec['bytes_per_s'] / 1e9:.2f}" + (f" ({100 * dec['bandwidth_fraction']:.0f}%)"
                                                         if dec.get("bandwidth_fraction") else "")
        q = e.get("quality") or {}
        g = e.get("gsm8k") or {}
        rss = e.get("peak_rss_bytes")
        rss_s = _f(rss and rss / MIB, "{:.0f}") + (" ⚠" if e.get("fits_memory") is False else "")
        lines.append("| " + " | ".join([
            e["name"], _fmt_name(e), f"{e['file_bytes'] / MIB:.1f}", _f(e.get("bpw"), "{:.2f}"),
            _f(e.get("load_s"), "{:.2f}"), rss_s, ts("pp"), ts("tg"), dec_s,
            _f(_get(q, "general", "ppl"), "{:.2f}"), _f(_get(q, "general", "kld"), "{:.4f}"),
            _f(_get(q, "general", "top1"), "{:.3f}"), _f(_get(q, "task", "kld"), "{:.4f}"),
            _f(_get(q, "task", "top1"), "{:.3f}"), _acc(g, "strict_match"), _acc(g, "flexible_extract"),
        ]) + " |")
    lines += interval_lines(report)
    lines += comparison_lines(report)
    dev = [e for e in report["models"] if e.get("device_quality")]
    if dev:
        lines += ["", "On-device llama-perplexity (general text, second half of each chunk scored):", "",
                  "| model | PPL | KLD | KLD 99% | same top p | Δp |", "|---|---|---|---|---|---|"]
        for e in dev:
            d = e["device_quality"]["general"]
            lines.append(f"| {e['name']} | {_f(d.get('ppl'), '{:.3f}')} | {_f(d.get('kld'), '{:.5f}')} ± "
                         f"{_f(d.get('kld_se'), '{:.5f}')} | {_f(d.get('kld_p99'), '{:.4f}')} | "
                         f"{_f(d.get('top1') and 100 * d['top1'], '{:.2f}%')} | "
                         f"{_f(None if d.get('delta_p') is None else 100 * d['delta_p'], '{:+.3f}%')} |")
    td = report.get("task_data")
    if td:
        lines += ["", f"Task data `{Path(td['path']).name}` ({td['rows']} rows: {td['calib_rows']} calib, never scored; "
                      f"{td['eval_rows']} eval, {len(td['scored_ids'])} scored for KLD, {len(td['graded_ids'])} with an "
                      "answer check generated greedily and graded):", "",
                  "| model | KLD | top-1 | tokens | accuracy | correct / graded | by check |", "|---|---|---|---|---|---|---|"]
        for e in report["models"]:
            u = _get(e, "quality", "user") or {}
            a = e.get("task_accuracy") or {}
            by = ", ".join(f"{k} {v['correct']}/{v['n']}" for k, v in (a.get("by_check") or {}).items())
            lines.append(f"| {e['name']} | {_f(u.get('kld'), '{:.4f}')} ± {_f(u.get('kld_se'), '{:.4f}')} | "
                         f"{_f(u.get('top1'), '{:.3f}')} | {u.get('n', '–')} | "
                         f"{_f(a.get('accuracy'), '{:.3f}')} ± {_f(a.get('accuracy_se'), '{:.3f}')} | "
                         f"{a.get('correct', '–')} / {a.get('n', '–')} | {by or '–'} |")
    if report.get("warnings"):
        lines += ["", "Warnings:", ""] + [f"- {w}" for w in report["warnings"]]
    errs = [e for e in report["models"] if e.get("error")]
    if errs:
        lines += ["", "Errors:", ""] + [f"- {e['name']}: {e['error']}" for e in errs]
    plots = report.get("plots") or {}
    if plots:
        lines += ["", "Plots:", ""]
        if plots.get("pareto"):
            lines.append(f"![size vs quality]({plots['pareto']})")
        for name in (plots.get("plans") or {}).values():
            lines.append(f"![bit plan]({name})")
        if plots.get("illusion"):
            lines.append(f"![sensitivity illusion]({plots['illusion']})")
    ill = _get(report, "analysis", "illusion")
    if ill:
        lines += ["", f"Sensitivity illusion: per-layer Spearman(perplexity, task) = "
                      f"{ill['per_layer']['spearman']:+.2f}, per-tensor {ill['per_tensor']['spearman']:+.2f}"]
    q_where = {(e.get("quality") or {}).get("measured_on") for e in report["models"]} - {None}
    lines += ["", "Notes: t/s are mean ± sample stddev over the repetitions (llama-bench). KLD = mean "
              "KL(P_reference || P_model) per scored token; top-1 = share of positions where both pick the same "
              "token; task = GSM8K answer tokens given the question. Decode GB/s = bytes read per token "
              "(weights, KV cache at the mean tg context) x tg t/s."
              + (" Quality and GSM8K were measured on the host (same GGUF, llama.cpp CPU kernels)." if "host" in q_where else ""),
              ""]
    return "\n".join(lines)


def _ci(d: dict | None, key: str, fmt: str = "{:.4f}") -> str:
    """``0.0985 [0.0810, 0.1170]`` from a summary's ``key`` and ``key_ci``; the value alone without one."""
    if not d or d.get(key) is None:
        return "–"
    ci = d.get(f"{key}_ci")
    if not ci:
        return fmt.format(d[key])
    return f"{fmt.format(d[key])} [{fmt.format(ci['lo'])}, {fmt.format(ci['hi'])}]"


def interval_lines(report: dict) -> list[str]:
    """Every quality figure with its 95% interval (bootstrap over samples; GSM8K: Wilson)."""
    models = [e for e in report["models"] if e.get("quality") or e.get("gsm8k")]
    if not models:
        return []
    n_min = min([n for e in models for n in (_get(e, "quality", "general", "n_samples"),
                                              _get(e, "quality", "task", "n_samples")) if n] or [0])
    note = (f" Intervals over fewer than 20 samples (here {n_min}) are optimistic: the percentile bootstrap "
            "under-covers on small samples; use a larger --size for claims." if 0 < n_min < 20 else "")
    out = ["", "Quality with 95% intervals (KLD / top-1 / PPL: percentile bootstrap over samples; GSM8K: Wilson)."
           + note, "",
           "| model | samples g/t | KLD general | top-1 general | PPL general | KLD task | top-1 task | PPL task "
           "| GSM8K strict | GSM8K flex |", "|" + "---|" * 10]
    for e in models:
        q, g = e.get("quality") or {}, e.get("gsm8k") or {}
        gen, task = q.get("general") or {}, q.get("task") or {}
        out.append("| " + " | ".join([
            e["name"], f"{gen.get('n_samples', '–')}/{task.get('n_samples', '–')}",
            _ci(gen, "kld"), _ci(gen, "top1", "{:.3f}"), _ci(gen, "ppl", "{:.2f}"),
            _ci(task, "kld"), _ci(task, "top1", "{:.3f}"), _ci(task, "ppl", "{:.3f}"),
            _ci(g, "strict_match", "{:.3f}"), _ci(g, "flexible_extract", "{:.3f}")]) + " |")
    return out


def _diff(d: dict | None, fmt: str = "{:+.4f}") -> str:
    if not d:
        return "–"
    return f"{fmt.format(d['diff'])} [{fmt.format(d['lo'])}, {fmt.format(d['hi'])}]"


def _mcnemar(d: dict | None) -> str:
    if not d:
        return "–"
    return f"{d['a_correct'] - d['b_correct']:+d} ({d['a_only']}/{d['b_only']}, p={d['pvalue']:.3g})"


def comparison_lines(report: dict) -> list[str]:
    """The paired table: every file minus the baseline on the same samples."""
    cmp = report.get("comparisons") or {}
    rows = cmp.get("rows") or []
    if not rows:
        return []
    out = ["", f"Paired against `{cmp['baseline']}` (model − baseline on the same samples, 95% paired bootstrap "
               "interval; GSM8K: questions gained, (model-only / baseline-only right), exact McNemar p):", "",
           "| model | ΔKLD general | Δtop-1 general | ΔPPL general | ΔKLD task | Δtop-1 task | ΔPPL task "
           "| ΔGSM8K strict | ΔGSM8K flex |", "|" + "---|" * 9]
    for r in rows:
        gen, task, g = r.get("general") or {}, r.get("task") or {}, r.get("gsm8k") or {}
        out.append("| " + " | ".join([
            r["model"], _diff(gen.get("kld")), _diff(gen.get("top1"), "{:+.3f}"), _diff(gen.get("ppl"), "{:+.3f}"),
            _diff(task.get("kld")), _diff(task.get("top1"), "{:+.3f}"), _diff(task.get("ppl"), "{:+.4f}"),
            _mcnemar(g.get("strict_match")), _mcnemar(g.get("flexible_extract"))]) + " |")
    return out


def _acc(g: dict, key: str) -> str:
    if not g or g.get(key) is None:
        return "–"
    return f"{g[key]:.3f} ({round(g[key] * g['n'])}/{g['n']})"


def _fmt_name(e: dict) -> str:
    types = e.get("types") or {}
    main = sorted(((v, k) for k, v in types.items() if k not in ("F32", "float")), reverse=True)
    label = main[0][1] if main else "F32"
    return f"{e['format']} {label}" + ("+" if len(main) > 1 else "")


# ============================================================================ plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _frontier(points: list[tuple[float, float]], better_low: bool) -> list[tuple[float, float]]:
    """Non-dominated points by (size low, metric low/high), sorted by size."""
    front = []
    best = math.inf if better_low else -math.inf
    for x, y in sorted(points):
        if (y < best) if better_low else (y > best):
            front.append((x, y))
            best = y
    return front


def plot_pareto(report: dict, png: Path) -> None:
    """File size vs task KLD (or perplexity without a reference) and vs GSM8K accuracy."""
    plt = _plt()
    models = [e for e in report["models"] if not e.get("error")] or report["models"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    has_kld = any(_get(e, "quality", "task", "kld") is not None for e in models)
    ykey = ("task", "kld") if has_kld else ("general", "ppl")
    panels = [(axes[0], lambda e: _get(e, "quality", *ykey), "task KL-divergence vs reference (nats/token)"
               if has_kld else "perplexity (general text)", True),
              (axes[1], lambda e: _get(e, "gsm8k", "flexible_extract"), "GSM8K accuracy (flexible-extract)", False)]
    for ax, get, label, low in panels:
        pts = []
        for i, e in enumerate(models):
            y = get(e)
            x = e["file_bytes"] / MIB
            if y is None:
                continue
            pts.append((x, y))
            ax.scatter([x], [y], s=40, color="C1" if e["format"] == "onnx" else "C0", zorder=3)
            # alternate label positions so neighbouring points stay readable
            ax.annotate(e["name"], (x, y), textcoords="offset points", xytext=(6, 6 if i % 2 == 0 else -12),
                        fontsize=8)
            if not low and _get(e, "gsm8k", "strict_match") is not None:
                ax.scatter([x], [e["gsm8k"]["strict_match"]], s=40, facecolors="none", edgecolors="C2", zorder=3)
        front = _frontier(pts, low)
        if len(front) > 1:
            ax.plot(*zip(*front), "--", color="gray", lw=1, label="Pareto front")
            ax.legend(fontsize=8, loc="best")
        if low and pts and all(y > 0 for _, y in pts) and has_kld:
            ax.set_yscale("log")
        if not pts:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.set_xlabel("file size (MiB)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].set_title("filled: flexible-extract, hollow: strict-match", fontsize=8)
    t = report["target"]
    fig.suptitle(f"size vs quality — {t['kind']}" + (f" ({t['profile']['name']})" if t.get("profile") else "")
                 + f", {report['machine'].get('cpu') or ''}", fontsize=10)
    fig.tight_layout()
    with atomic_path(png, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def shape_source(models: list[dict], reference):
    """Tensor shapes (a GGUF header) from the reference, else the first GGUF benchmarked."""
    from .gguf_header import read_header

    if reference is not None:
        return read_header(reference)
    for e in models:
        if (e.get("format") or e.get("kind")) == "gguf":
            return read_header(e["path"])
    raise TasaError("a bit-plan heatmap needs the model's tensor shapes: pass --reference")


def plan_bits_table(plan, src) -> tuple[list[int], list[str], dict, dict]:
    """(layers, kinds, {(layer, kind): (bits, fmt)}, {other tensor: (bits, fmt)}) of a bit plan."""
    from tasa_edge.names import kind_of, layer_of
    from tasa_edge import formats

    spec = formats.get(plan.target)
    kept = plan.provenance.get("source_types") or {}     # 'source' tensors: the type the plan keeps
    cells, other = {}, {}
    for name, fmt in plan.tensors.items():
        info = src.tensors.get(name)
        if info is None:
            raise TasaError(f"plan tensor {name} is not in {Path(src.path).name}: is the plan for another model?")
        bits = spec.bits(kept.get(name) or spec.resolve(fmt, info.src_type), info.shape)
        layer = layer_of(name)
        if layer is None:
            other[name] = (bits, fmt)
        else:
            cells[(layer, kind_of(name))] = (bits, fmt)
    layers = sorted({k[0] for k in cells})
    order = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
    kinds = sorted({k[1] for k in cells}, key=lambda k: (order.index(k) if k in order else len(order), k))
    return layers, kinds, cells, other


def plot_plan_heatmap(plan_path: Path, src, png: Path) -> None:
    """Bits/weight per layer (rows) and tensor kind (columns) of a bit plan, format names in the cells."""
    import numpy as np

    from tasa_edge.plan import BitPlan

    plan = BitPlan.load(plan_path)
    layers, kinds, cells, other = plan_bits_table(plan, src)
    plt = _plt()
    grid = np.full((len(layers), len(kinds)), np.nan)
    for (layer, kind), (bits, _) in cells.items():
        grid[layers.index(layer), kinds.index(kind)] = bits
    fig, ax = plt.subplots(figsize=(1.3 * len(kinds) + 2.5, 0.28 * len(layers) + 2))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    for (layer, kind), (bits, fmt) in cells.items():
        i, j = layers.index(layer), kinds.index(kind)
        ax.text(j, i, fmt, ha="center", va="center", fontsize=6,
                color="white" if bits < np.nanmean(grid) else "black")
    ax.set_xticks(range(len(kinds)), kinds, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)), [str(x) for x in layers], fontsize=7)
    ax.set_ylabel("layer")
    fig.colorbar(im, ax=ax, label="bits / weight")
    extra = ", ".join(f"{n.split('.')[0]} {f} ({b:.2f})" for n, (b, f) in sorted(other.items()))
    bpw = plan.predicted.get("bpw")
    ax.set_title(f"{plan_path.name}: {plan.target}" + (f", {bpw:.3f} bpw" if bpw else "")
                 + (f"\n{extra}" if extra else ""), fontsize=9)
    fig.tight_layout()
    with atomic_path(png, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
