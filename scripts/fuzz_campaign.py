#!/usr/bin/env python
"""Reliability campaign (issue 15): hostile inputs, usage errors, interrupts, disk full,
concurrent writers, killed writers. Prints a summary table (and writes JSON with --json).

    python scripts/fuzz_campaign.py                 # ~1,000 mutations per reader, ~10 min on 2 cores
    python scripts/fuzz_campaign.py --cases 200     # quicker

Outcomes per reader come from tests/fuzzlib.py (one child process per batch; an abort or a hang
is attributed to its case). CLI runs use the packaged smollm2-135m model.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import fuzzlib  # noqa: E402

MODEL = "smollm2-135m"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "TASA_NO_PROGRESS": "1"}


def cli(args, cwd, **kw):
    return subprocess.run([sys.executable, "-m", "tasa_edge.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=ENV, **kw)


def tmp_left(d: Path) -> list[str]:
    return [p.name for p in d.rglob("*.tmp")]


# ---------------------------------------------------------------------------- CLI usage
def usage_cases() -> list[list[str]]:
    cmds = ["export", "baseline", "inspect", "analyze", "plan", "illusion", "demo", "bench"]
    cases = [["bogus"], ["exprot"], ["--frobnicate"], ["-x"], ["export", "--help-me"], ["inspect"], ["export"],
             ["baseline"], ["analyze"], ["plan"], ["bench"], ["analyze", "X", "--dry-run"], ["plan", "m", "--bpw"],
             ["export", "m", "-o"], ["export", "m", "-o", "x", "--threads", "abc"], ["export", "m", "-o", "x", "--threads", "1.5"],
             ["plan", "m", "--bpw", "four"], ["plan", "m", "--lambda", "x"], ["analyze", "m", "--n-task", "-"],
             ["analyze", "m", "--beta", "nan%"], ["export", "m", "-o", "x", "--accuracy-level", "z"],
             ["inspect", "a", "b"], ["illusion", "extra"], ["demo", "extra"], ["bench", "f.gguf", "--size"],
             ["baseline", MODEL], ["--version", "extra"], ["export", "m", "--output"], ["plan", "m", "--sweep=maybe"]]
    for c in cmds:
        cases += [[c, "--nope"], [c, "--nope=1"], [c, "-Z"]]
    for c in ("export", "baseline", "inspect", "analyze", "plan"):
        cases += [[c, "m", "--unknown-flag", "v"], [c[:-1]], [c.upper()]]
    return cases


def run_usage(work: Path) -> dict:
    res = {"cases": 0, "exit_2": 0, "tracebacks": 0, "other": []}
    for args in usage_cases():
        r = cli(args, work, timeout=120)
        res["cases"] += 1
        res["exit_2"] += r.returncode == 2
        res["tracebacks"] += "Traceback" in r.stderr + r.stdout
        if r.returncode != 2 or "Traceback" in r.stderr:
            res["other"].append((args, r.returncode))
    return res


# ---------------------------------------------------------------------------- interrupts
JOBS = {
    "export": ["export", MODEL, "--type", "Q6_K", "--threads", "1"],
    "baseline": ["baseline", MODEL, "--ftype", "Q6_K", "--threads", "1"],
}


def interrupt_once(work: Path, job: str, sig: int, delay: float) -> dict:
    d = Path(tempfile.mkdtemp(dir=work))
    p = subprocess.Popen([sys.executable, "-m", "tasa_edge.cli", *JOBS[job], "-o", str(d / "m.gguf")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=d, start_new_session=True)
    t0 = time.monotonic()
    while not list(d.glob(".m.gguf.*.tmp")) and p.poll() is None and time.monotonic() - t0 < 120:
        time.sleep(0.05)
    time.sleep(delay)
    running = p.poll() is None
    if running:
        if sig == signal.SIGINT:
            os.killpg(p.pid, sig)
        else:
            p.send_signal(sig)
    so, err = p.communicate(timeout=120)
    if "wrote " in so:  # the job had finished (output in place) when the signal came: not an interrupt
        running = False
    time.sleep(0.3)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    try:
        os.killpg(p.pid, 0)
        survivors = True
    except ProcessLookupError:
        survivors = False
    want = 128 + sig
    ok = (not running) or (p.returncode == want and lines == ["interrupted"] and not list(d.iterdir()) and not survivors)
    return {"job": job, "signal": signal.Signals(sig).name, "delay": delay, "hit_running": running,
            "rc": p.returncode, "ok": ok, "left": [x.name for x in d.iterdir()], "tracebacks": "Traceback" in err}


def run_interrupts(work: Path, delays) -> list[dict]:
    out = []
    for job in JOBS:
        for sig in (signal.SIGINT, signal.SIGTERM):
            for delay in delays:
                out.append(interrupt_once(work, job, sig, delay))
    return out


def run_sigkill(work: Path) -> dict:
    """A writer killed with SIGKILL leaves its temp file; the next write to that output removes it."""
    d = Path(tempfile.mkdtemp(dir=work))
    p = subprocess.Popen([sys.executable, "-m", "tasa_edge.cli", *JOBS["export"], "-o", str(d / "m.gguf")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, cwd=d)
    while not list(d.glob(".m.gguf.*.tmp")):
        time.sleep(0.05)
    time.sleep(0.5)
    p.kill()
    p.wait()
    left_after_kill = tmp_left(d)
    r = cli(["export", MODEL, "--type", "Q8_0", "-o", d / "m.gguf"], d, timeout=600)
    return {"left_after_kill": len(left_after_kill), "rerun_rc": r.returncode, "left_after_rerun": len(tmp_left(d))}


# ---------------------------------------------------------------------------- disk full, concurrency
def run_disk_full(work: Path) -> list[dict]:
    out = []
    jobs = {"export": ["export", MODEL, "--type", "Q8_0"], "baseline": ["baseline", MODEL, "--ftype", "Q8_0"]}
    for limit_mb in (1, 10, 60):
        for job, args in jobs.items():
            d = Path(tempfile.mkdtemp(dir=work))

            def lim(mb=limit_mb):
                resource.setrlimit(resource.RLIMIT_FSIZE, (mb << 20, mb << 20))

            r = subprocess.run([sys.executable, "-m", "tasa_edge.cli", *args, "-o", str(d / "m.gguf")],
                               capture_output=True, text=True, env=ENV, cwd=d, preexec_fn=lim, timeout=600)
            lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "━" not in ln]
            out.append({"job": job, "limit_mb": limit_mb, "rc": r.returncode, "one_line": len(lines) == 1,
                        "tracebacks": "Traceback" in r.stderr, "left": [x.name for x in d.iterdir()]})
    return out


def run_concurrent(work: Path, n: int = 3) -> dict:
    d = Path(tempfile.mkdtemp(dir=work))
    procs = [subprocess.Popen([sys.executable, "-m", "tasa_edge.cli", "export", MODEL, "--type", t, "--threads", "1",
                               "-o", str(d / "m.gguf")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env=ENV, cwd=d) for t in ("Q8_0", "Q6_K", "Q4_K")[:n]]
    rcs = [p.wait() for p in procs]
    errs = [p.stderr.read() for p in procs]
    r = cli(["inspect", d / "m.gguf", "--summary"], d, timeout=120)
    return {"writers": n, "rcs": rcs, "tracebacks": sum("Traceback" in e for e in errs), "final_valid": r.returncode == 0,
            "left": tmp_left(d)}


# ---------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=1000, help="mutations per reader")
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--json", type=Path, help="also write the full results here")
    ap.add_argument("--skip-cli", action="store_true", help="readers only (no CLI runs on the packaged model)")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tasa-campaign-"))
    results: dict = {"cases_per_reader": a.cases, "seed": a.seed, "readers": {}}
    t0 = time.time()
    for kind in fuzzlib.KINDS:
        recs = fuzzlib.run_batch(kind, a.cases, a.seed, work / kind, timeout=60)
        results["readers"][kind] = {"counts": fuzzlib.summarise(recs),
                                    "findings": [r for r in recs if r["outcome"] not in ("accepted", "rejected")][:20]}
        print(f"{kind:<14} {fuzzlib.summarise(recs)}", flush=True)
    if not a.skip_cli:
        results["usage"] = run_usage(work)
        print("usage", {k: v for k, v in results["usage"].items() if k != "other"}, flush=True)
        results["interrupts"] = run_interrupts(work, delays=(0.2, 1.0, 2.0))
        results["sigkill"] = run_sigkill(work)
        results["disk_full"] = run_disk_full(work)
        results["concurrent"] = run_concurrent(work)
    results["seconds"] = round(time.time() - t0, 1)
    if a.json:
        a.json.write_text(json.dumps(results, indent=1, default=str))
    print_table(results)


def print_table(res: dict) -> None:
    print()
    print(f"| input / event | cases | accepted | rejected (one line) | tracebacks | aborts | hangs | other |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for kind, r in res["readers"].items():
        c = r["counts"]
        other = sum(v for k, v in c.items() if k not in ("accepted", "rejected", "traceback", "abort", "hang"))
        print(f"| {kind} mutations | {sum(c.values())} | {c.get('accepted', 0)} | {c.get('rejected', 0)} | "
              f"{c.get('traceback', 0)} | {c.get('abort', 0)} | {c.get('hang', 0)} | {other} |")
    if "usage" in res:
        u = res["usage"]
        print(f"| CLI usage errors | {u['cases']} | | {u['exit_2']} exit 2 | {u['tracebacks']} | 0 | 0 | {len(u['other'])} |")
        ints = res["interrupts"]
        hit = [i for i in ints if i["hit_running"]]
        print(f"| Ctrl-C / SIGTERM (export, baseline) | {len(ints)} ({len(hit)} mid-run) | | "
              f"{sum(i['ok'] for i in hit)} clean 130/143 | {sum(i['tracebacks'] for i in ints)} | 0 | 0 | "
              f"{sum(1 for i in hit if not i['ok'])} not clean, {sum(len(i['left']) for i in hit)} files left |")
        k = res["sigkill"]
        print(f"| SIGKILL then rerun | 1 | | | 0 | | | {k['left_after_kill']} temp after kill, "
              f"{k['left_after_rerun']} after rerun (rc {k['rerun_rc']}) |")
        df = res["disk_full"]
        print(f"| disk full (RLIMIT_FSIZE 1/10/60 MB) | {len(df)} | | {sum(d['one_line'] for d in df)} one line | "
              f"{sum(d['tracebacks'] for d in df)} | 0 | 0 | {sum(len(d['left']) for d in df)} files left |")
        cc = res["concurrent"]
        print(f"| concurrent writers, same -o | {cc['writers']} | {sum(r == 0 for r in cc['rcs'])} ok | | {cc['tracebacks']} | 0 | 0 | "
              f"final file valid: {cc['final_valid']}, {len(cc['left'])} temps left |")
    print(f"\n{res['seconds']} s")


if __name__ == "__main__":
    main()
