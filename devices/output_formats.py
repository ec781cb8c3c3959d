"""``tasa-edge bench --output-format md|csv|json|jsonl``: the per-model rows of a bench report,
printed like ``llama-bench -o FORMAT`` prints its test rows.

One row per model (llama-bench has one row per test; a bench row carries its model's pp and tg
tests as columns next to size, memory and quality). ``csv``: a header line, then every value
double-quoted (``"`` doubled), as llama-bench's csv printer; ``jsonl``: one JSON object per line;
``json``: a JSON array of those objects; ``md``: a markdown table.
"""

from __future__ import annotations

import json

FORMATS = ("md", "csv", "json", "jsonl")

FIELDS = (
    "model", "path", "format", "file_bytes", "params", "bpw", "backend", "build_commit", "threads",
    "n_prompt", "n_gen", "reps", "pp_avg_ts", "pp_stddev_ts", "tg_avg_ts", "tg_stddev_ts",
    "load_s", "peak_rss_bytes", "kld_general", "kld_task", "top1_task", "ppl_general",
    "gsm8k_strict", "gsm8k_flexible", "error",
)


def rows(report: dict) -> list[dict]:
    """The per-model rows (keys :data:`FIELDS`; ``None`` where not measured)."""
    s = report.get("settings") or {}
    out = []
    for e in report["models"]:
        sp = e.get("speed") or {}
        q = e.get("quality") or {}
        g = e.get("gsm8k") or {}
        pp, tg = sp.get("pp") or {}, sp.get("tg") or {}
        gen, task = q.get("general") or {}, q.get("task") or {}
        out.append({
            "model": e["name"], "path": e.get("path"), "format": e.get("format"), "file_bytes": e.get("file_bytes"),
            "params": e.get("params"), "bpw": e.get("bpw"), "backend": sp.get("backend"),
            "build_commit": sp.get("build_commit"), "threads": sp.get("threads") or s.get("threads"),
            "n_prompt": s.get("pp"), "n_gen": s.get("tg"), "reps": sp.get("reps") or s.get("reps"),
            "pp_avg_ts": pp.get("ts_mean"), "pp_stddev_ts": pp.get("ts_std"),
            "tg_avg_ts": tg.get("ts_mean"), "tg_stddev_ts": tg.get("ts_std"),
            "load_s": e.get("load_s"), "peak_rss_bytes": e.get("peak_rss_bytes"),
            "kld_general": gen.get("kld"), "kld_task": task.get("kld"), "top1_task": task.get("top1"),
            "ppl_general": gen.get("ppl"), "gsm8k_strict": g.get("strict_match"),
            "gsm8k_flexible": g.get("flexible_extract"), "error": e.get("error"),
        })
    return out


def _csv_value(v) -> str:
    s = "" if v is None else str(v)
    return '"' + s.replace('"', '""') + '"'


def _md_value(k: str, v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if k.endswith("_ts"):
            return f"{v:.2f}"
        if k.startswith(("kld", "top1", "gsm8k")):
            return f"{v:.4f}"
        return f"{v:.3f}" if k in ("bpw", "load_s") else f"{v:.4g}"
    return str(v).replace("|", "\\|")


MD_COLUMNS = (("model", "model"), ("file_bytes", "size (B)"), ("bpw", "bpw"), ("backend", "backend"),
              ("threads", "threads"), ("pp_avg_ts", "pp t/s"), ("tg_avg_ts", "tg t/s"),
              ("peak_rss_bytes", "peak RSS (B)"), ("kld_general", "KLD gen"), ("kld_task", "KLD task"),
              ("gsm8k_flexible", "GSM8K"), ("error", "error"))


def render(report: dict, fmt: str) -> str:
    """The rows of ``report`` as text in ``fmt`` (md, csv, json, jsonl), ending with a newline."""
    rs = rows(report)
    if fmt == "json":
        return json.dumps(rs, indent=2) + "\n"
    if fmt == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in rs)
    if fmt == "csv":
        return ",".join(FIELDS) + "\n" + "".join(",".join(_csv_value(r[k]) for k in FIELDS) + "\n" for r in rs)
    if fmt == "md":
        s = report.get("settings") or {}
        cols = [(k, t.replace("pp ", f"pp{s.get('pp')} ").replace("tg ", f"tg{s.get('tg')} ")) for k, t in MD_COLUMNS]
        lines = ["| " + " | ".join(t for _, t in cols) + " |",
                 "| " + " | ".join("---:" if k not in ("model", "backend", "error") else "---" for k, _ in cols) + " |"]
        lines += ["| " + " | ".join(_md_value(k, r[k]) for k, _ in cols) + " |" for r in rs]
        return "\n".join(lines) + "\n"
    raise ValueError(f"unknown output format {fmt!r} (expected one of {', '.join(FORMATS)})")
