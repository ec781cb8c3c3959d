"""``tasa-edge bench``: the typer command of the device harness.

Registered in :mod:`tasa_edge.cli` with ``app.command("bench")(devices.cli.bench)``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from tasa_edge.errors import TasaError
from tasa_edge.units import parse_bytes

console = Console()

SIZE_HELP = ("small: pp64/tg16 x2 reps, 4 general docs, 4 GSM8K questions (2-shot) -- a smoke test; "
             "medium: pp512/tg128 x3, 50 docs, 50 questions (5-shot); "
             "full: pp512/tg128 x5, all 275 docs and all 323 held-out GSM8K questions (5-shot).")


def parse_host(s: str) -> tuple[str, str | None, int | None]:
    """``[user@]host[:port]`` -> (host, user, port)."""
    m = re.fullmatch(r"(?:([^@\s]+)@)?([^@:\s]+)(?::(\d+))?", s.strip())
    if not m:
        raise TasaError(f"cannot parse ssh host {s!r} (expected [user@]host[:port])")
    from .remote import validate_host

    host, user, port = m.group(2), m.group(1), int(m.group(3)) if m.group(3) else None
    validate_host(host, user, port)
    return host, user, port


def bench(
    files: List[str] = typer.Argument(..., help="Models to benchmark: GGUF files and/or exported ONNX model directories (with model.onnx)."),
    reference: Optional[str] = typer.Option(
        None, "--reference",
        help="The float model the files were made from (GGUF, HF directory or packaged name such as smollm2-135m). "
             "Its F32 GGUF is the base of the KL-divergence / top-1 comparison, computed once per run. "
             "Without it only perplexity and GSM8K are reported."),
    target: Optional[str] = typer.Option(
        None, "--target",
        help="Where to run: local (this machine), adb (Android phone: llama-bench/llama-perplexity pushed to "
             "/data/local/tmp) or ssh (Raspberry Pi-class board). Default: the profile's target, else local."),
    size: str = typer.Option("small", "--size", "-s", help=SIZE_HELP),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", help="Threads for the model (default: the profile's, else all usable cores / the device's cores)."),
    n_prompt: Optional[int] = typer.Option(None, "--n-prompt", "-p", help="pp test size: prompt tokens processed in one batch, as llama-bench -p (default: the size's: 64 / 512 / 512; 0 skips the test)."),
    n_gen: Optional[int] = typer.Option(None, "--n-gen", "-n", help="tg test size: tokens generated one at a time, as llama-bench -n (default: the size's: 16 / 128 / 128; 0 skips the test)."),
    reps: Optional[int] = typer.Option(None, "--repetitions", "-r", "--reps", help="Timed repetitions per speed test after one warm-up, as llama-bench -r (default: the size's: 2 / 3 / 5)."),
    output_format: Optional[str] = typer.Option(None, "--output-format", "-o", "--output", help="Print the per-model rows to stdout as md, csv, json or jsonl (llama-bench's -o formats) instead of the table."),
    out: Path = typer.Option(Path("bench"), "--out-dir", "--out", help="Directory for bench.json, bench.md, PNG plots and GSM8K completions."),
    speed_backend: str = typer.Option("auto", "--speed-backend", help="Local GGUF speed: auto (llama.cpp's llama-bench when found, see `make tools`; else llama-cpp-python), llama-bench or llama-cpp-python."),
    baseline_file: Optional[str] = typer.Option(None, "--baseline-file", help="The file (one of FILES, by path or report name) every other file is compared with, paired on the same samples: differences with 95% intervals, McNemar for GSM8K (default: the first file)."),
    plan: Optional[List[Path]] = typer.Option(None, "--plan", help="Bit plan JSON to draw a per-layer bits heatmap of (repeatable)."),
    analysis: Optional[Path] = typer.Option(None, "--analysis", help="analysis.json of `tasa-edge analyze`: adds the sensitivity-illusion plot and correlations."),
    profile: Optional[str] = typer.Option(None, "--profile", help="Device profile: local-cpu, pixel-8, raspberry-pi-5 or a .toml file (threads, memory limit, transport)."),
    memory_limit: Optional[str] = typer.Option(None, "--memory-limit", help="Memory cap such as 3.5G: RLIMIT_AS of each local benchmark process; on devices, flags models whose peak RSS exceeds it."),
    host: Optional[str] = typer.Option(None, "--host", help="ssh target: HOST, USER@HOST or USER@HOST:PORT (default: the profile's transport.host)."),
    serial: Optional[str] = typer.Option(None, "--serial", help="adb target: device serial (adb -s), needed when several are attached."),
    bin_dir: Optional[Path] = typer.Option(None, "--bin-dir", help="adb/ssh: local directory with llama-bench and llama-perplexity built for the device (see devices/README.md); default: $TASA_LLAMA_BIN_DIR, else the device's PATH."),
    remote_dir: Optional[str] = typer.Option(None, "--remote-dir", help="adb/ssh: absolute scratch directory on the device for the tools, models and outputs (default: the profile's, else /data/local/tmp/tasa-edge on adb, /tmp/tasa-edge over ssh)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report JSON instead of the table."),
    task_data: Optional[Path] = typer.Option(None, "--task-data", help="Your task file (analyze --task-data's .jsonl question/answer [+ check], or .txt): KLD on its held-out (eval) rows, accuracy on those with a check; the calib rows the analysis used are never scored."),
    chat_template: bool = typer.Option(True, "--chat-template/--no-chat-template", help="Render task prompts (GSM8K, --task-data) with the reference's (else the first model's) chat template when it has one; off: lm-eval's 'Question: ...\\nAnswer:' few-shot format."),
):
    """Benchmark GGUF / ONNX models on this machine or an edge device: size, load time, peak RSS,
    llama-bench speed, KL-divergence vs the reference on general and GSM8K text, GSM8K accuracy."""
    from .harness import bench as run_bench
    from .output_formats import FORMATS, render

    if output_format is not None and output_format not in FORMATS:
        raise TasaError(f"unknown output format '{output_format}' (expected one of {', '.join(FORMATS)}; "
                        "the report directory is --out-dir)")
    h = u = p = None
    if host is not None:
        h, u, p = parse_host(host)
    report = run_bench(
        files, reference=reference, target=target, size=size, threads=threads, reps=reps, out_dir=out,
        profile=profile, plans=plan or [], analysis=analysis,
        memory_limit=parse_bytes(memory_limit) if memory_limit else None,
        host=h, user=u, port=p, serial=serial, bin_dir=bin_dir, remote_dir=remote_dir,
        n_prompt=n_prompt, n_gen=n_gen, speed_backend=speed_backend, baseline=baseline_file,
        task_data=task_data, chat_template=chat_template,
    )
    if output_format is not None:  # stdout holds the rows only, as with llama-bench -o
        import sys

        sys.stdout.write(render(report, output_format))
        Console(stderr=True).print(f"wrote {out / 'bench.json'}, {out / 'bench.md'}")
        _raise_if_all_failed(report)
        return
    if as_json:
        console.print_json(json.dumps(report, default=str))
        return
    print_summary(report)
    console.print(f"wrote {out / 'bench.json'}, {out / 'bench.md'}"
              + "".join(f", {out / n}" for n in _plot_files(report)))
    _raise_if_all_failed(report)


def _raise_if_all_failed(report: dict) -> None:
    errs = [m for m in report["models"] if m.get("error")]
    if errs and len(errs) == len(report["models"]):
        raise TasaError(f"every model failed, e.g. {errs[0]['name']}: {errs[0]['error']}")


def _plot_files(report: dict) -> list[str]:
    p = report.get("plots") or {}
    names = [p["pareto"]] if p.get("pareto") else []
    names += list((p.get("plans") or {}).values())
    if p.get("illusion"):
        names.append(p["illusion"])
    return names


def print_summary(report: dict) -> None:
    m, s = report["machine"], report["settings"]
    console.print(f"[bold]{report['target']['kind']}[/]: {m.get('cpu') or '?'}, {m.get('threads')} threads"
              + (f", bandwidth {report['bandwidth']['read_bytes_per_s'] / 1e9:.1f} GB/s" if report.get("bandwidth") else ""))
    if report["target"].get("emulation"):
        console.print(f"[yellow]emulated[/]: {report['target']['emulation']['note']}", highlight=False)
    sb = report["target"].get("speed_backend")
    if sb:
        b = sb.get("build") or {}
        console.print(f"GGUF speed: {sb['gguf']}" + (f" (llama.cpp {b['commit']})" if b.get("commit") else "")
                      + (f" -- {sb['reason']}" if sb["gguf"] != "llama-bench" else ""), highlight=False)
    names = [e["name"] for e in report["models"]]
    t = _summary_table(report, names)
    if Measurement.get(console, console.options.update_width(10**5), t).maximum > console.width:
        # too narrow for the whole names: number the rows and list the names, whole, below the table
        t = _summary_table(report, [f"#{i}" for i in range(1, len(names) + 1)])
        console.print(t)
        for i, n in enumerate(names, 1):
            console.print(f"#{i} {n}", highlight=False, soft_wrap=True)
    else:
        console.print(t)
    td = report.get("task_data")
    if td:
        console.print(f"task data {Path(td['path']).name}: {td['eval_rows']} eval rows of {td['rows']} "
                      f"({len(td['scored_ids'])} scored for KLD, {len(td['graded_ids'])} graded)", highlight=False, soft_wrap=True)
        for e in report["models"]:
            u = (e.get("quality") or {}).get("user") or {}
            a = e.get("task_accuracy") or {}
            if u or a:
                console.print(f"  {e['name']}: KLD {u.get('kld', float('nan')):.4f} over {u.get('n', 0)} tokens"
                              + (f", accuracy {a['correct']}/{a['n']} ({a['accuracy']:.3f})" if a.get("n") else ""),
                              highlight=False, soft_wrap=True)
    for e in report["models"]:
        if e.get("error"):
            console.print(f"[red]{e['name']}[/]: {e['error']}", highlight=False, soft_wrap=True)


def _summary_table(report: dict, labels: list[str]) -> Table:
    """The per-model table, ``labels`` in the model column; cells fold rather than being cut to "…"."""
    s = report["settings"]
    t = Table(show_edge=False)
    for col in ("model", "MiB", "bpw", "load s", "RSS MiB", f"pp{s['pp']} t/s", f"tg{s['tg']} t/s",
                "KLD gen", "KLD task", "top-1 task", "GSM8K"):
        t.add_column(col, justify="left" if col == "model" else "right", overflow="fold")
    for label, e in zip(labels, report["models"]):
        if e.get("error"):
            t.add_row(label, f"{e['file_bytes'] / 2**20:.1f}", "", "", "", "", "", "", "", "", "[red]error[/]")
            continue
        sp = e.get("speed") or {}
        q = e.get("quality") or {}
        g = e.get("gsm8k") or {}

        def f(x, fmt):
            return fmt.format(x) if x is not None else "–"

        t.add_row(
            label, f"{e['file_bytes'] / 2**20:.1f}", f(e.get("bpw"), "{:.2f}"), f(e.get("load_s"), "{:.2f}"),
            f(e.get("peak_rss_bytes") and e["peak_rss_bytes"] / 2**20, "{:.0f}"),
            f((sp.get("pp") or {}).get("ts_mean"), "{:.1f}"), f((sp.get("tg") or {}).get("ts_mean"), "{:.1f}"),
            f((q.get("general") or {}).get("kld"), "{:.4f}"), f((q.get("task") or {}).get("kld"), "{:.4f}"),
            f((q.get("task") or {}).get("top1"), "{:.3f}"), f(g.get("flexible_extract"), "{:.3f}"),
        )
    return t


def profile(
    model: str = typer.Option(..., "--model", "-m", help="The model whose tensor shapes are measured (GGUF, HF directory or packaged name)."),
    output: Path = typer.Option(..., "--output", "-o", help="Profile TOML to write (a device profile with measured kernel costs)."),
    target: str = typer.Option("local", "--target", help="local (this machine), adb (Android phone) or ssh (board)."),
    kernels: str = typer.Option("gguf", "--format", "-f", help="gguf (llama.cpp's kernels, timed by llama-bench) or onnx (onnxruntime's MatMulNBits on this machine, the ONNX exporter's default graph)."),
    formats_: Optional[str] = typer.Option(None, "--formats", help="Comma-separated formats to measure (default: the analysis' default menu for --format)."),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", help="Threads (default: all usable cores / the device's cores)."),
    n_prompt: int = typer.Option(512, "--n-prompt", "-p", help="pp test size (prefill tokens), as llama-bench -p."),
    n_gen: int = typer.Option(128, "--n-gen", "-n", help="tg test size (decoded tokens), as llama-bench -n."),
    reps: int = typer.Option(3, "--repetitions", "-r", help="Timed repetitions per test, as llama-bench -r."),
    rounds: int = typer.Option(1, "--rounds", help="Passes over all design files, each taking ceil(-r / ROUNDS) repetitions per file (every file kept on disk): each file measured in several minutes, for a machine whose speed moves between minutes."),
    stat: str = typer.Option("best", "--stat", help="Speed of a file over its repetitions: best (the fastest), median (robust when a shared machine's speed jumps between levels) or mean."),
    n_random: int = typer.Option(2, "--random-mixes", help="Random per-tensor mixes measured besides one file per format (held out to check the fit, then fitted too)."),
    by_width: bool = typer.Option(False, "--by-width", help="Also measure each format on the layer matrices of each input width apart (more design files): one cost per format and width."),
    name: Optional[str] = typer.Option(None, "--name", help="Profile name (default: TARGET-MODEL)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Progress file: each measured design file is saved there, and a re-run with the same settings skips those already measured."),
    host: Optional[str] = typer.Option(None, "--host", help="ssh target: HOST, USER@HOST or USER@HOST:PORT."),
    serial: Optional[str] = typer.Option(None, "--serial", help="adb target: device serial (adb -s)."),
    bin_dir: Optional[Path] = typer.Option(None, "--bin-dir", help="adb/ssh: local directory with llama-bench built for the device (devices/README.md)."),
    remote_dir: Optional[str] = typer.Option(None, "--remote-dir", help="adb/ssh: working directory on the device."),
    memory_limit: Optional[str] = typer.Option(None, "--memory-limit", help="Memory the model may use, e.g. 3.5G: caps the usable RAM the profile records (and the local llama-bench's RLIMIT_AS)."),
):
    """Measure a target's decode (tg) and prefill (pp) cost of every format on MODEL's own tensor
    shapes through llama.cpp's llama-bench, plus usable RAM, cores, bandwidth and the machine's
    identity; write them as a device profile TOML for `plan --profile`."""
    from tasa_edge import guards
    from tasa_edge.model import ModelSource
    from tasa_edge.zoo import resolve_model

    from .kernel_profile import measure_profile, write_profile
    from .profiles import TARGETS

    if target not in TARGETS:
        raise TasaError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
    guards.output_file(output, "--output")
    guards.output_file(resume, "--resume")
    if n_random < 0:
        raise TasaError(f"--random-mixes must be >= 0, got {n_random}")
    if threads is not None and threads <= 0:
        raise TasaError(f"--threads must be positive, got {threads}")
    menu = [f.strip() for f in formats_.split(",") if f.strip()] if formats_ is not None else None
    if menu is not None and not menu:
        raise TasaError("--formats lists no format")
    transport = None
    if target == "adb":
        from .remote import AdbTransport

        transport = AdbTransport(serial=serial, remote_dir=remote_dir)
    elif target == "ssh":
        from .remote import SshTransport

        if host is None:
            raise TasaError("--target ssh needs --host")
        h, u, p = parse_host(host)
        transport = SshTransport(h, user=u, port=p, remote_dir=remote_dir)
    src = ModelSource.open(resolve_model(model))
    err = Console(stderr=True)
    show = not os.environ.get("TASA_NO_PROGRESS")
    kp, runs, text = measure_profile(
        src, target=target, kernels=kernels, by_width=by_width, menu=menu, threads=threads, pp=n_prompt, tg=n_gen, reps=reps, n_random=n_random, name=name, stat=stat, resume=resume, rounds=rounds,
        transport=transport, bin_dir=bin_dir, limit_bytes=parse_bytes(memory_limit) if memory_limit else None,
        show_progress=show, log=(lambda s: err.print(s, highlight=False)) if show else None)
    write_profile(output, text)
    runtime = (f"llama.cpp {kp.machine.get('llama_cpp_commit') or '?'}" if kp.target == "gguf" else kp.measured["backend"])
    t = Table(title=f"kernel costs on {kp.machine.get('cpu') or target}, {kp.measured['threads']} threads ({runtime})")
    for c in ("format", "decode ns/weight", "LM head decode ns/weight", "prefill ns/weight/token"):
        t.add_column(c, justify="left" if c == "format" else "right")
    for f, c in kp.costs.items():
        head = "(same)" if c.output_decode_ns_per_weight is None else f"{c.output_decode_ns_per_weight:.4f}"
        t.add_row(f, f"{c.decode_ns_per_weight:.4f}", head, f"{c.prefill_ns_per_weight:.5f}")
    console.print(t)
    m = kp.measured
    fitq = m["fit"]
    console.print(f"fit over {fitq['files']} files: max |error| tg {100 * fitq['max_abs_tg_err']:.1f}%, "
                  f"pp {100 * fitq['max_abs_pp_err']:.1f}%" + (
                      f"; held-out random mixes (fit on the designed files): tg {100 * m['holdout']['max_abs_tg_err']:.1f}%, "
                      f"pp {100 * m['holdout']['max_abs_pp_err']:.1f}%" if m.get("holdout") else ""), highlight=False)
    if m.get("emulated"):
        console.print(f"[yellow]emulated[/]: {m['emulated']}", highlight=False)
    console.print(f"usable RAM {((m.get('usable_ram_bytes') or 0) / 2**30):.2f} GiB, read bandwidth "
                  f"{((m.get('bandwidth_bytes_per_s') or 0) / 1e9):.1f} GB/s, load average {m.get('load_before')} -> "
                  f"{m.get('load_after')}; wrote {output}", highlight=False)
