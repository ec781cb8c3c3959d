"""How far apart one file's decode repetitions lie, per design file of a committed kernel profile:
its bytes, the fastest tg128 and the median over all its repetitions (the profile fits one of them,
its ``stat``), their ratio, and the read rate (bytes x tokens/s) at each. Nothing is measured: the
repetitions come from the profile's progress file (``--resume`` of ``tasa-edge profile``).

    python benchmarks/decode_spread.py --model smollm2-135m           # gemma3-270m, qwen2.5-coder-1.5b
    python benchmarks/decode_spread.py --model gemma3-270m --dir benchmarks/device/recheck-6dec-gemma
    python benchmarks/decode_spread.py --checks benchmarks/device/smollm2-135m.json   # a device_plans run's files
    python benchmarks/decode_spread.py --sweep                        # measures: read rate by buffer size

``--sweep`` measures this machine's read rate (numpy sums in 2 threads, as
:func:`devices.bandwidth.probe_local`) over buffer sizes from 16 MiB to 2 GiB, best and median of
``--repeats`` reads each: whether buffers of a small model's size read faster than large ones (a
file held in the last-level cache), one possible cause of a small file's two decode levels.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devices.bandwidth import MIB, probe_local  # noqa: E402
from devices.kernel_profile import speed_of_samples  # noqa: E402

DEVICE = ROOT / "benchmarks" / "device"


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def spread(model: str, where: Path = DEVICE) -> tuple[list[dict], str]:
    """One row per design file of ``<where>/<model>.profile.toml`` (``benchmarks/device`` by
    default), from its progress file (each pass of each file: its repetitions, its size and, since
    6 Dec, its design's label)."""
    prof_path = where / f"{model}.profile.toml"
    prog_path = where / f"{model}.profile-progress.json"
    for p in (prof_path, prog_path):
        if not p.is_file():
            shown = p.relative_to(ROOT) if p.is_relative_to(ROOT) else p
            fail(f"{shown} not found (profile {model} first)")
    try:
        prof = tomllib.loads(prof_path.read_text())
        prog = json.loads(prog_path.read_text())
        recorded = prof["measured"]["design_tg_ts"]
        stat = prof["measured"].get("stat") or "best"
    except (ValueError, KeyError, tomllib.TOMLDecodeError) as e:
        fail(f"{model}: not a profile with its progress file ({e})")
    if any("tg" not in e for e in prog.values()):
        return [], stat     # a one-pass profile's progress file keeps each file's speed, not its repetitions
    reps: dict[str, list[float]] = {}
    size: dict[str, int] = {}
    passes: dict[str, dict[int, float]] = {}        # design -> pass number -> median of that pass
    for key, entry in prog.items():
        h = entry.get("label") or key.split("-pass")[0]
        reps.setdefault(h, []).extend(float(x) for x in entry["tg"])
        size[h] = int(entry["size"])
        n = int(key.split("-pass")[1].split("of")[0]) if "-pass" in key else 1
        passes.setdefault(h, {})[n] = statistics.median(float(x) for x in entry["tg"])
    rows = []
    for label, figure in recorded.items():
        if label in reps:
            match = [label]
        else:   # an older progress file, keyed by a hash of the design: the file whose statistic is the profile's figure
            match = [h for h, r in reps.items() if abs(speed_of_samples(r, stat) - float(figure)) < 6e-4]
        if len(match) != 1:
            fail(f"{model}: design file {label!r} not found once in {prog_path.name}")
        rows.append({**_row(label, reps[match[0]], size[match[0]]), "profile": float(figure),
                     "passes": [passes[match[0]][k] for k in sorted(passes[match[0]])]})
    return rows, stat


def _row(label: str, reps: list[float], size: int | None) -> dict:
    """A file's repetitions summed up: how many, the best, the median, their ratio and the read rate
    (bytes x tokens/s) at each (None without the file's size)."""
    best, med = max(reps), statistics.median(reps)
    return {"label": label, "bytes": size, "n": len(reps), "best": best, "median": med, "ratio": best / med,
            "gbs_best": size * best / 1e9 if size else None, "gbs_median": size * med / 1e9 if size else None}


def checks(path: Path) -> list[dict]:
    """One row per file a ``benchmarks/device_plans.py`` JSON measured with its repetitions kept
    (the prediction checks' plans and the win's files)."""
    try:
        d = json.loads(Path(path).read_text())
        found = [(lb, r) for lb, r in d.get("rows", {}).items()]
        found += [(f"{mix} {lb}", r) for mix, w in d.get("win", {}).items() if mix != "errors" for lb, r in w["rows"].items()]
    except (OSError, ValueError, AttributeError, KeyError, TypeError) as e:
        fail(f"{path}: not a device_plans result ({e})")
    return [_row(label, [float(x) for x in r["tg_samples"]], r.get("bytes")) for label, r in found if r.get("tg_samples")]


def sweep(sizes_mib: list[int], repeats: int, threads: int) -> list[dict]:
    out = []
    for s in sizes_mib:
        runs = [probe_local(threads=threads, size_bytes=s * MIB, repeats=1)["read_bytes_per_s"] for _ in range(repeats)]
        out.append({"mib": s, "best": max(runs) / 1e9, "median": statistics.median(runs) / 1e9})
        print(f"{s:6d} MiB: best {out[-1]['best']:.1f} GB/s, median {out[-1]['median']:.1f} GB/s", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", nargs="*", default=[], help="models whose committed profile to read")
    ap.add_argument("--dir", type=Path, default=DEVICE, help="folder of the --model profiles (default benchmarks/device)")
    ap.add_argument("--checks", type=Path, nargs="*", default=[], help="device_plans JSON results whose files to read")
    ap.add_argument("--sweep", action="store_true", help="measure the read rate by buffer size")
    ap.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 64, 96, 128, 192, 256, 384, 512, 1024, 2048],
                    help="buffer sizes of --sweep, MiB")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    if not a.model and not a.sweep and not a.checks:
        ap.error("name --model, --checks and/or --sweep")
    if a.repeats < 1 or a.threads < 1 or min(a.sizes) < 1:
        ap.error("--repeats, --threads and --sizes must be positive")
    for m in a.model:
        rows, stat = spread(m, a.dir.resolve())
        if not rows:
            print(f"\n**{m}**: its profile's progress file keeps no repetitions (a one-pass profile)")
            continue
        print(f"\n**{m}** (decode repetitions of each design file of its committed profile, which fits the {stat})\n")
        print("| design file | MB | reps | tg128 best | median | best / median | GB/s at best | at median | median of each pass |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in sorted(rows, key=lambda r: r["bytes"]):
            print(f"| {r['label']} | {r['bytes'] / 1e6:.1f} | {r['n']} | {r['best']:.1f} | {r['median']:.1f} | "
                  f"{r['ratio']:.3f} | {r['gbs_best']:.1f} | {r['gbs_median']:.1f} | {' '.join(f'{x:.1f}' for x in r['passes'])} |")
    for f in a.checks:
        rows = checks(f)
        if not rows:
            print(f"\n**{f}**: no file with its decode repetitions")
            continue
        print(f"\n**{f}** (decode repetitions of each file the checks measured, all passes)\n")
        print("| file | MB | reps | tg128 best | median | best / median |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            mb = f"{r['bytes'] / 1e6:.1f}" if r["bytes"] else ""
            print(f"| {r['label']} | {mb} | {r['n']} | {r['best']:.1f} | {r['median']:.1f} | {r['ratio']:.3f} |")
    if a.sweep:
        rows = sweep(a.sizes, a.repeats, a.threads)
        print(f"\n**read rate by buffer size** (numpy sums, {a.threads} threads, {a.repeats} reads each)\n")
        print("| buffer MiB | best GB/s | median GB/s |")
        print("|---|---|---|")
        for r in rows:
            print(f"| {r['mib']} | {r['best']:.1f} | {r['median']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
