"""The ``tasa-edge`` command line."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from . import __version__, guards
from .errors import TasaError

app = typer.Typer(
    help="TASA: task-aware mixed-precision quantization of LLMs for edge devices (GGUF / ONNX).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)

MODEL_HELP = "GGUF file, Hugging Face directory, or a packaged model: smollm2-135m, gemma3-270m, qwen2.5-coder-1.5b"


def _open_model(spec: str):
    from .model import ModelSource
    from .zoo import resolve_model

    return ModelSource.open(resolve_model(spec))


@app.callback(invoke_without_command=True)
def _root(ctx: typer.Context, version: bool = typer.Option(False, "--version", help="Print the version and exit."),
          verbose: bool = typer.Option(False, "--verbose", help="Show llama.cpp's own log lines."),
          quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars (same as TASA_NO_PROGRESS=1).")):
    from . import llamalog

    llamalog.set_verbose(verbose)
    if quiet:
        os.environ["TASA_NO_PROGRESS"] = "1"  # read by tasa_edge.progress and by child processes
    if ctx.invoked_subcommand == "demo":  # runs llama.cpp in this process (baseline does in its worker)
        llamalog.install()
    if version:
        out.print(f"tasa-edge {__version__}")
        raise typer.Exit()


# ---------------------------------------------------------------------------- export
@app.command()
def export(
    model: str = typer.Argument(..., help=MODEL_HELP),
    output: Path = typer.Option(..., "--output", "-o", help="Output file (.gguf) or directory (ONNX)."),
    plan: Optional[Path] = typer.Option(None, "--plan", "-p", help="Bit plan JSON (tasa-edge plan) for this model."),
    tensor_type_file: Optional[Path] = typer.Option(
        None, "--tensor-type-file", help="llama-quantize --tensor-type-file (pattern=type lines) instead of a plan."
    ),
    type_: Optional[str] = typer.Option(None, "--type", "-t", help="Uniform plan: every quantizable tensor in this type (llama.cpp shape fallback applies)."),
    default_type: Optional[str] = typer.Option(None, "--default-type", help="Type for tensors no tensor-type-file rule matches."),
    fmt: str = typer.Option("gguf", "--format", "-f", help="gguf or onnx."),
    imatrix: Optional[Path] = typer.Option(None, "--imatrix", help="llama.cpp importance matrix (GGUF or legacy .dat). Default: the one the plan was scored with."),
    force_imatrix: bool = typer.Option(False, "--force-imatrix", help="Use --imatrix even if the plan was scored with another one (or none)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Quantization threads (default: all cores)."),
    accuracy_level: int = typer.Option(4, "--accuracy-level", help="ONNX MatMulNBits accuracy_level (4 = int8 compute)."),
    onnx_graph: str = typer.Option("auto", "--onnx-graph", help="ONNX graph: genai (onnxruntime-genai's builder graph + genai_config.json), plain (onnxruntime only) or auto (genai where supported)."),
):
    """Write MODEL quantized per a bit plan (GGUF for llama.cpp, or ONNX MatMulNBits)."""
    from . import formats
    from .plan import BitPlan, read_tensor_type_file

    if sum(x is not None for x in (plan, tensor_type_file, type_)) != 1:
        raise TasaError("give exactly one of --plan, --tensor-type-file or --type")
    spec = formats.get(fmt)
    if imatrix is not None and not spec.uses_imatrix:
        raise TasaError(f"--imatrix applies to GGUF export only, not --format {fmt}")
    if onnx_graph not in ("auto", "genai", "plain"):
        raise TasaError(f"--onnx-graph must be auto, genai or plain, got {onnx_graph!r}")
    if fmt != "onnx" and onnx_graph != "auto":
        raise TasaError("--onnx-graph applies to --format onnx only")
    (guards.output_file if fmt == "gguf" else guards.output_dir)(output, "--output")
    src = _open_model(model)
    if plan is not None:
        bp = BitPlan.load(plan)
    elif tensor_type_file is not None:
        bp = read_tensor_type_file(tensor_type_file, src, default=default_type)
    else:
        bp = BitPlan.uniform(src, type_, target=fmt)
    if bp.target != fmt:
        raise TasaError(f"plan target is '{bp.target}' but --format is '{fmt}'")
    if fmt == "gguf":
        from exporters.gguf_export import export_gguf

        res = export_gguf(src, bp, output, imatrix=bp.export_imatrix(imatrix, force=force_imatrix), nthreads=threads)
        out.print(
            f"wrote {res.path} ({res.nbytes / 2**20:.1f} MiB, {res.bpw:.3f} bits/weight, "
            f"{res.seconds:.1f} s) types: " + ", ".join(f"{k}×{v}" for k, v in res.types.items())
        )
    else:
        from exporters.onnx_export import export_onnx

        res = export_onnx(src, bp, output, accuracy_level=accuracy_level, graph=onnx_graph)
        out.print(f"wrote {res.path} ({res.nbytes / 2**20:.1f} MiB, {res.bpw:.3f} bits/weight, {res.seconds:.1f} s; "
                  f"{'onnxruntime-genai' if res.graph == 'genai' else 'plain onnxruntime'} graph)")


# ---------------------------------------------------------------------------- baseline
@app.command()
def baseline(
    model: str = typer.Argument(..., help=MODEL_HELP + " (GGUF; a quantized GGUF or an HF directory is first exported to its F32 reference GGUF, which is what llama.cpp quantizes)."),
    output: Path = typer.Option(..., "--output", "-o", help="Output .gguf."),
    ftype: str = typer.Option("Q4_K_M", "--ftype", help="llama.cpp mix: Q4_K_M, Q4_K_S, Q3_K_M, Q3_K_S, Q5_K_M, Q6_K, Q8_0, IQ4_XS ..."),
    imatrix: Optional[Path] = typer.Option(None, "--imatrix", help="Importance matrix passed to llama_model_quantize."),
    pure: bool = typer.Option(False, "--pure", help="No k-quant mixture: every tensor in the ftype's base type."),
    threads: Optional[int] = typer.Option(None, "--threads"),
):
    """llama.cpp's own quantization mix via llama_model_quantize (the baseline to beat).

    The input is always the model's F32 reference: a quantized GGUF (or an HF directory) is first dequantized to F32 (cached), so a quantized input is re-quantized from its dequantized weights, the same reference the KL-divergence numbers use."""
    from exporters.baseline import quantize_baseline

    guards.output_file(output, "--output")
    src_path = _reference_gguf(model)
    from .imatrix import load_imatrix

    res = quantize_baseline(src_path, output, ftype, imatrix=load_imatrix(imatrix) if imatrix else None,
                            pure=pure, nthreads=threads)
    from .zoo import resolve_model

    if Path(resolve_model(model)).resolve() != Path(src_path).resolve():
        out.print(f"quantized from the F32 reference {src_path} (the input dequantized)", highlight=False, soft_wrap=True)
    out.print(f"wrote {res.path} ({res.nbytes / 2**20:.1f} MiB, {res.bpw:.3f} bits/weight, {res.seconds:.1f} s) ftype {ftype}")


def _reference_gguf(model: str) -> Path:
    from exporters.reference import reference_gguf

    return reference_gguf(model, show_progress=True)


# ---------------------------------------------------------------------------- inspect
@app.command()
def inspect(
    path: str = typer.Argument(..., help="A GGUF file, a bit plan JSON (with --model for plan sizes), or an ONNX export directory."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model the plan is for (needed to size a plan, or an ONNX export older than its tensor_shapes)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    per_tensor: bool = typer.Option(True, "--tensors/--summary", help="Show the per-tensor table."),
):
    """Per-tensor type table, total bytes and bits/weight of a GGUF, a plan or an ONNX export directory."""
    from .inspect import inspect_path

    report = inspect_path(Path(path), model=model)
    if as_json:
        out.print_json(json.dumps(report))
        return
    if per_tensor:
        t = Table(title=report["path"])
        for c in ("tensor", "shape", "type", "bytes", "bpw"):
            t.add_column(c, justify="right" if c in ("bytes", "bpw") else "left")
        for r in report["tensors"]:
            t.add_row(r["name"], "x".join(map(str, r["shape"])), r["type"], f"{r['bytes']:,}", f"{r['bpw']:.3f}")
        out.print(t)
    s = Table(title="summary")
    s.add_column("type")
    s.add_column("tensors", justify="right")
    s.add_column("params", justify="right")
    s.add_column("bytes", justify="right")
    for typ, row in report["by_type"].items():
        s.add_row(typ, str(row["tensors"]), f"{row['params']:,}", f"{row['bytes']:,}")
    out.print(s)
    out.print(
        f"total {report['bytes']:,} bytes ({report['bytes'] / 2**20:.2f} MiB) over {report['params']:,} params "
        f"= {report['bpw']:.4f} bits/weight"
    )


# ---------------------------------------------------------------------------- analyze / plan
@app.command()
def analyze(
    model: str = typer.Argument(..., help=MODEL_HELP),
    out_dir: Path = typer.Option(Path("tasa-out"), "--out", "-o", help="Directory for analysis.json, imatrix.gguf and the gradient cache."),
    target: str = typer.Option("gguf", "--target", help="Format menu to analyse: gguf (ggml types) or onnx (bits x block)."),
    formats: Optional[str] = typer.Option(None, "--formats", help="Comma-separated menu override, e.g. Q3_K,Q4_K,Q6_K,Q8_0,Q4_0,Q5_0."),
    profile: Optional[str] = typer.Option(None, "--profile", help="Device profile (shipped name or .toml): its fast formats for --target are the menu."),
    task_file: Optional[Path] = typer.Option(None, "--task-data", help="Your task data (.jsonl question/answer, or .txt) instead of GSM8K."),
    general_file: Optional[Path] = typer.Option(None, "--general-data", help="Your general text (.txt/.jsonl) instead of the shipped corpus."),
    n_general: int = typer.Option(24, help="General-text pool samples."),
    n_task: int = typer.Option(24, help="Task pool samples."),
    n_target: int = typer.Option(12, help="Held-in task target samples for gradient alignment."),
    max_tokens: int = typer.Option(192, help="Tokens per sample."),
    beta: float = typer.Option(0.5, help="Diversity weight of the mixture criterion (0 = alignment only)."),
    lam: Optional[float] = typer.Option(None, "--lambda", help="Weight of reasoning sensitivity in the TASA score (default: the chosen mixture's task ratio)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    fisher: str = typer.Option("factored", "--fisher", help="Form of the Fisher statistics: factored (row x column sums, r+c values per tensor), block (32-column means) or exact (full size, for checking)."),
    fisher_dtype: str = typer.Option("float32", "--fisher-dtype", help="Storage of exact Fisher sums: float32, or bfloat16 to halve them."),
    dtype: str = typer.Option("auto", "--dtype", help="Weights during the gradient pass: auto (bf16 on CUDA and on CPUs with AVX512-BF16/AMX, else float32), float32 or bfloat16. Quantization errors are always taken on the exact weights."),
    sensitivity_rows: float = typer.Option(1.0, "--sensitivity-rows", help="Fraction of each large tensor's rows the sensitivity pass scores (a systematic sample; 1 = all)."),
    checkpoint: str = typer.Option("auto", "--checkpoint", help="Recompute each decoder layer's forward during the backward pass (activation checkpointing: about one more forward per sample, the activations of one layer instead of all): auto (when all layers' would exceed 256 MiB), on or off."),
    seed: int = typer.Option(0),
    dry_run: bool = typer.Option(False, "--dry-run", help="Read only shapes (GGUF header or config.json) and print the predicted peak memory and time per sample; run nothing."),
    device_memory: Optional[str] = typer.Option(None, "--device-memory", help="--dry-run: memory of the device, e.g. 24GB (default: this machine's RAM on cpu)."),
    device_tflops: Optional[float] = typer.Option(None, "--device-tflops", help="--dry-run: sustained TFLOP/s of the device in the chosen dtype (default: measured on this CPU; cuda: assumed 100)."),
    dist_timeout: float = typer.Option(600, "--dist-timeout", help="Under torchrun / accelerate launch: seconds a rank waits for the others (to join, or in a collective) before the job fails."),
    chat_template: bool = typer.Option(True, "--chat-template/--no-chat-template", help="Render task question/answer samples with the model's own chat template (GGUF tokenizer.chat_template / HF tokenizer_config.json) when it has one; off: lm-eval's 'Question: ...\\nAnswer:' format."),
):
    """Gradient traces -> calibration mixture -> perplexity & reasoning sensitivity per tensor and format.

    Started by torchrun (or accelerate launch) with several processes, the samples and tensors are
    dealt over the ranks (gloo on CPU, NCCL on GPUs) and rank 0 writes the outputs."""
    from . import distributed
    from . import formats as registry
    from .analysis import analyze as run
    from .chat import model_template
    from .data import user_split
    from .results import AnalysisConfig

    spec = registry.get(target)
    if dry_run:
        _dry_run(model, device, dtype, fisher, fisher_dtype, max_tokens, n_general + n_task + n_target,
                 device_memory, device_tflops, checkpoint)
        return
    if formats and profile:
        raise TasaError("give --formats or --profile, not both")
    if not 0 <= beta <= 1:
        raise TasaError(f"--beta must be within [0, 1], got {beta}")
    if fisher_dtype not in ("float32", "bfloat16"):
        raise TasaError(f"--fisher-dtype must be float32 or bfloat16, got {fisher_dtype!r}")
    if fisher not in ("factored", "block", "exact"):
        raise TasaError(f"--fisher must be factored, block or exact, got {fisher!r}")
    if dtype not in ("auto", "float32", "bfloat16"):
        raise TasaError(f"--dtype must be auto, float32 or bfloat16, got {dtype!r}")
    if not 0 < sensitivity_rows <= 1:
        raise TasaError(f"--sensitivity-rows must be in (0, 1], got {sensitivity_rows}")
    if checkpoint not in ("auto", "on", "off"):
        raise TasaError(f"--checkpoint must be auto, on or off, got {checkpoint!r}")
    guards.output_dir(out_dir, "--out")
    src = _open_model(model)
    fm = tuple(spec.parse(f.strip()) for f in formats.split(",")) if formats else None
    if profile:
        from devices.profiles import load_profile

        fm = load_profile(profile).menu(target)
    task = user_split(task_file, "calib") if task_file else None
    general = user_split(general_file, "calib") if general_file else None
    chat = model_template(src.path) if chat_template else None
    cfg = AnalysisConfig(n_general=n_general, n_task=n_task, n_target=n_target, max_tokens=max_tokens,
                         beta=beta, target=target, formats=fm, seed=seed, fisher=fisher, fisher_dtype=fisher_dtype,
                         dtype=dtype, sensitivity_rows=sensitivity_rows, checkpoint=checkpoint)
    if dist_timeout <= 0:
        raise TasaError(f"--dist-timeout must be positive, got {dist_timeout:g}")
    ranks = distributed.init(device, dist_timeout)
    try:
        an = run(src, out_dir, cfg, device=device, lam=lam, task=task, general=general, ranks=ranks, chat=chat)
    finally:
        distributed.finish(ranks)
    if ranks is not None and not ranks.main:
        return
    t = Table(title="calibration mixtures (gradient-trace alignment vs diversity)")
    for c in ("task ratio", "size", "alignment", "diversity", "score"):
        t.add_column(c, justify="right")
    ch = an.mixture.chosen
    for c in an.mixture.candidates:
        mark = " *" if c is ch else ""
        t.add_row(f"{c.task_ratio:.2f}{mark}", str(c.size), f"{c.alignment:.4f}", f"{c.diversity:.4f}", f"{c.score:.4f}")
    out.print(t)
    out.print(f"chosen mixture: task ratio {ch.task_ratio:.2f}, {ch.size} samples; lambda = {an.lam:.2f}")
    out.print(f"task samples: {'chat template of ' + chat.source if chat else 'Question:/Answer: format (no chat template)'}",
              highlight=False, soft_wrap=True)
    tm = an.timings
    cached = f", {tm['n_cached']} from the cache" if tm.get("n_cached") else ""
    out.print(f"wrote {out_dir / 'analysis.json'} and {an.imatrix_path} ({tm['total_s']:.1f} s, "
              f"{tm['n_backward']} backward passes{cached})")


def _dry_run(model: str, device: str, dtype: str, fisher: str, fisher_dtype: str, tokens: int, samples: int,
             device_memory: Optional[str], device_tflops: Optional[float], checkpoint: str = "auto") -> None:
    from . import footprint
    from .units import parse_bytes
    from .zoo import resolve_model

    p = resolve_model(model)
    if p.is_dir() and not list(p.glob("*.safetensors")):
        shapes = footprint.shapes_from_config(p)       # a config.json alone is enough
    else:
        from .model import ModelSource

        shapes = footprint.shapes_from_source(ModelSource.open(p))
    dev = "cuda" if device == "cuda" else "cpu"
    if device == "auto":
        import torch

        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        from .torch_model import cpu_computes_bf16

        dtype = "bfloat16" if dev == "cuda" or cpu_computes_bf16() else "float32"
    if device_tflops is not None:
        thr, how = device_tflops * 1e12, "given"
    elif dev == "cuda":
        thr, how = 100e12, "assumed (pass --device-tflops)"
    else:
        thr, how = footprint.measure_throughput(shapes.d_model, shapes.d_ff, tokens, dtype), "measured on this CPU"
    mem = parse_bytes(device_memory) if device_memory else None
    if mem is None and dev == "cpu":
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    pr = footprint.predict(shapes, tokens=tokens, samples=samples, device=dev, dtype=dtype, fisher=fisher,
                           fisher_dtype=fisher_dtype, throughput_flops=thr, device_memory=mem, checkpoint=checkpoint)
    out.print(f"dry run: {p.name} ({shapes.arch}, {shapes.n_params / 1e9:.2f}B params) on {dev}, {dtype}, "
              f"{samples} samples x {tokens} tokens, Fisher {fisher}, layer checkpointing {'on' if pr.checkpoint else 'off'}")
    t = Table()
    t.add_column("part")
    t.add_column("GiB", justify="right")
    for k, v in pr.parts.items():
        t.add_row(k, f"{v / 2**30:.2f}")
    t.add_row("[bold]peak[/]", f"[bold]{pr.peak_bytes / 2**30:.2f}[/]")
    out.print(t)
    fit = "" if pr.fits is None else (f"; fits in {mem / 2**30:.1f} GiB" if pr.fits else f"; does NOT fit in {mem / 2**30:.1f} GiB")
    out.print(f"{pr.bytes_per_param:.2f} bytes/parameter{fit}")
    out.print(f"time per sample {pr.seconds_per_sample:.1f} s ({pr.flops_per_sample / 1e12:.2f} TFLOP at "
              f"{thr / 1e12:.2f} TFLOP/s {how}); gradient pass ~{pr.seconds_per_sample * samples / 60:.1f} min")


@app.command("plan")
def plan_cmd(
    model: str = typer.Argument(..., help=MODEL_HELP),
    analysis: Path = typer.Option(Path("tasa-out/analysis.json"), "--analysis", "-a", help="analysis.json from tasa-edge analyze."),
    output: Path = typer.Option(Path("tasa-out/plan.json"), "--output", "-o", help="Bit plan JSON to write."),
    bpw: Optional[float] = typer.Option(None, "--bpw", help="Budget: average bits per weight over all parameters (true file bytes)."),
    nbytes: Optional[str] = typer.Option(None, "--bytes", help="Budget: file tensor bytes, e.g. 80000000, 75MB (SI), 1.5GiB (binary)."),
    mode: str = typer.Option("tasa", "--mode", help="tasa (aggregate), ppl (perplexity only) or task (reasoning only)."),
    lam: Optional[float] = typer.Option(None, "--lambda", help="Override the TASA weight of reasoning sensitivity."),
    tensor_type_file: Optional[Path] = typer.Option(None, "--tensor-type-file", help="Also write llama-quantize's --tensor-type-file."),
    do_sweep: bool = typer.Option(False, "--sweep", help="Print the Pareto curve size -> predicted loss (with --bpw/--bytes, also write the plan)."),
    sweep_json: Optional[Path] = typer.Option(None, "--sweep-json", help="With --sweep: also write the curve as JSON to this file (default: not written)."),
    tensor_type: Optional[List[str]] = typer.Option(None, "--tensor-type", help="Pin: PATTERN=TYPE, llama-quantize's semantics (regex searched in the tensor name, first match wins); repeatable."),
    output_tensor_type: Optional[str] = typer.Option(None, "--output-tensor-type", help="Pin output.weight to this type (tied embeddings: token_embd.weight, as llama-quantize)."),
    token_embedding_type: Optional[str] = typer.Option(None, "--token-embedding-type", help="Pin token_embd.weight to this type."),
    profile: Optional[Path] = typer.Option(None, "--profile", help="Measured device profile (tasa-edge profile -o device.toml): the plan records its predicted decode/prefill times and may be limited by them."),
    max_decode_ms: Optional[float] = typer.Option(None, "--max-decode-ms", help="With --profile: predicted decode time per token at most this (ms)."),
    min_tg: Optional[float] = typer.Option(None, "--min-tg", help="With --profile: predicted decode speed at least this (tokens/s; = --max-decode-ms 1000/TG)."),
    max_prefill_ms: Optional[float] = typer.Option(None, "--max-prefill-ms", help="With --profile: predicted prefill time of the profile's pp tokens (512 by default) at most this (ms)."),
    fit_ram: bool = typer.Option(False, "--fit-ram", help="With --profile: the file must fit the device's usable RAM less the KV cache for --ctx and --ram-overhead (alone: the budget)."),
    ctx: int = typer.Option(4096, "--ctx", help="--fit-ram: context length whose KV cache (F16) must fit too."),
    ram_overhead: str = typer.Option("256MiB", "--ram-overhead", help="--fit-ram: runtime memory besides weights and KV cache (compute buffers, the program)."),
    force_profile: bool = typer.Option(False, "--force-profile", help="Use a local profile measured on another CPU or llama.cpp build anyway."),
):
    """Solve the exact allocation of formats under a budget and write the bit plan.

    Pins (--tensor-type, --output-tensor-type, --token-embedding-type) fix those tensors' formats and the rest is allocated exactly around them; a pinned format the analysis did not score counts as loss 0 and is listed as unscored in the plan's provenance."""
    from .plan import write_tensor_type_file
    from .planner import Pins, make_plan, sweep
    from .results import Analysis
    from .units import parse_bytes

    guards.output_file(output, "--output")
    guards.output_file(tensor_type_file, "--tensor-type-file")
    if sweep_json is not None and not do_sweep:
        raise TasaError("--sweep-json needs --sweep")
    guards.output_file(sweep_json, "--sweep-json")
    pins = Pins.from_cli(tensor_type or (), output_tensor_type, token_embedding_type)
    device = _device_limits(profile, max_decode_ms, min_tg, max_prefill_ms, fit_ram, ctx, ram_overhead, force_profile)
    an = Analysis.load(analysis)
    src = _open_model(model)
    guards.budget(src, bpw, parse_bytes(nbytes) if nbytes else None)
    if do_sweep:
        pts = sweep(an, src, mode=mode, lam=lam, pins=pins, device=device)
        t = Table(title=f"Pareto sweep ({mode})")
        cols = ("bytes", "bits/weight", "predicted loss") + (("tg t/s", f"pp{device.profile.pp} t/s") if device else ()) + ("types",)
        for c in cols:
            t.add_column(c)
        for p in pts:
            speed = (f"{p['tg_ts']:.1f}", f"{p['pp_ts']:.1f}") if device else ()
            t.add_row(f"{p['bytes']:,}", f"{p['bpw']:.3f}", f"{p['loss']:.5f}", *speed,
                      ", ".join(f"{k}×{v}" for k, v in p["types"].items()))
        out.print(t)
        if sweep_json is not None:
            from .fsutil import atomic_write_text

            atomic_write_text(sweep_json, json.dumps(pts, indent=1) + "\n")
            out.print(f"wrote {sweep_json}")
        if bpw is None and nbytes is None and not fit_ram:
            return
    plan = make_plan(an, src, bpw=bpw, nbytes=parse_bytes(nbytes) if nbytes else None, mode=mode, lam=lam, pins=pins,
                     device=device)
    plan.save(output)
    if tensor_type_file:
        write_tensor_type_file(plan, tensor_type_file)
    out.print(
        f"wrote {output}: {plan.predicted['bytes']:,} bytes, {plan.predicted['bpw']:.3f} bits/weight, "
        f"predicted loss {plan.predicted['loss']:.5f}; types " + ", ".join(f"{k}×{v}" for k, v in plan.types_used().items())
    )
    if device is not None:
        pr = plan.predicted
        out.print(f"predicted on {device.profile.name}: decode {pr['decode_ms']:.2f} ms/token ({pr['tg_ts']:.1f} t/s), "
                  f"prefill {pr['prefill_ms']:.0f} ms for {pr['prefill_tokens']} tokens ({pr['pp_ts']:.1f} t/s)", highlight=False)


def _device_limits(profile, max_decode_ms, min_tg, max_prefill_ms, fit_ram, ctx, ram_overhead, force):
    """The plan's device limits from --profile and its flags (None without --profile); a local
    profile measured on another CPU or llama.cpp build is refused unless --force-profile."""
    from .costmodel import load_kernel_profile
    from .planner import DeviceLimits
    from .units import parse_bytes

    if profile is None:
        used = [f for f, v in (("--max-decode-ms", max_decode_ms), ("--min-tg", min_tg), ("--max-prefill-ms", max_prefill_ms),
                               ("--fit-ram", fit_ram or None)) if v is not None]
        if used:
            raise TasaError(f"{used[0]} needs --profile (a measured device profile: tasa-edge profile -m MODEL -o device.toml)")
        return None
    if max_decode_ms is not None and min_tg is not None:
        raise TasaError("give --max-decode-ms or --min-tg, not both")
    if min_tg is not None:
        if not min_tg > 0:
            raise TasaError(f"--min-tg must be positive, got {min_tg}")
        max_decode_ms = 1000.0 / min_tg
    kp = load_kernel_profile(profile)
    if kp.measured.get("target", "local") == "local":
        from devices.machine import local_machine

        m = local_machine(1)
        here = {"cpu": m["cpu"], "features": m["features"]}
        if kp.target == "onnx":
            from devices.kernel_profile import onnx_versions

            here.update(onnx_versions())
            what = "onnxruntime"
        else:
            from devices.llama_tools import build_info, find_tool

            exe = find_tool("llama-bench")
            here["llama_cpp_commit"] = build_info(exe).commit if exe else None
            what = "llama.cpp build"
        diff = kp.identity_mismatch(here)
        if diff and not force:
            raise TasaError(f"profile {profile} was measured on another machine or {what}: {'; '.join(diff)} "
                            f"(re-run tasa-edge profile{' --format onnx' if kp.target == 'onnx' else ''} here, or --force-profile)")
    return DeviceLimits(kp, max_decode_ms=max_decode_ms, max_prefill_ms=max_prefill_ms, fit_ram=fit_ram, ctx=ctx,
                        ram_overhead=parse_bytes(ram_overhead))


@app.command()
def illusion(
    analysis: Path = typer.Option(Path("tasa-out/analysis.json"), "--analysis", "-a"),
    png: Path = typer.Option(Path("tasa-out/illusion.png"), "--png", help="Plot to write."),
):
    """Perplexity-Illusion report: rank correlation of perplexity vs reasoning sensitivity."""
    from .illusion import illusion_report
    from .results import Analysis

    guards.output_file(png, "--png")
    rep = illusion_report(Analysis.load(analysis), png)
    pl, pt = rep["per_layer"], rep["per_tensor"]
    out.print(f"per layer  ({pl['n']:>3}): Spearman {pl['spearman']:+.3f}  Kendall {pl['kendall']:+.3f}")
    out.print(f"per tensor ({pt['n']:>3}): Spearman {pt['spearman']:+.3f}  Kendall {pt['kendall']:+.3f}")
    out.print(f"most sensitive layers, perplexity: {rep['top_layers_ppl']}  reasoning: {rep['top_layers_task']}")
    for k, v in rep["by_kind"].items():
        out.print(f"  {k:<14} Spearman {v:+.3f}")
    out.print(f"wrote {png}")


@app.command()
def demo(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help=MODEL_HELP),
    out_dir: Path = typer.Option(Path("out"), "--out", "-o"),
    bpw: float = typer.Option(5.0, "--bpw", help="Budget for the TASA plan."),
    prompt: str = typer.Option("The capital of France is", "--prompt", help="Text to complete with the exported GGUF."),
):
    """The embedded default: analyse a packaged model, plan, export GGUF, generate with llama.cpp."""
    from exporters.gguf_export import export_gguf

    from .analysis import analyze as run
    from .illusion import illusion_report
    from .llama_run import generate
    from .planner import make_plan
    from .results import AnalysisConfig

    guards.output_dir(out_dir, "--out")
    src = _open_model(model)
    out.print(f"[bold]1/4 analyse[/] {src.name} ({src.arch}, {src.n_params / 1e6:.0f}M params)")
    an = run(src, out_dir, AnalysisConfig(n_general=12, n_task=12, n_target=8, max_tokens=160, sizes=(8,)))
    ch = an.mixture.chosen
    out.print(f"    mixture: task ratio {ch.task_ratio:.2f} (alignment {ch.alignment:.3f}, diversity {ch.diversity:.3f})")
    rep = illusion_report(an, out_dir / "illusion.png")
    out.print(f"    perplexity vs reasoning sensitivity, per layer: Spearman {rep['per_layer']['spearman']:+.2f}")
    out.print(f"[bold]2/4 plan[/] {bpw} bits/weight")
    plan = make_plan(an, src, bpw=bpw)
    plan.save(out_dir / "plan.json")
    out.print("    " + ", ".join(f"{k}×{v}" for k, v in plan.types_used().items()))
    out.print("[bold]3/4 export[/] GGUF with llama.cpp's kernels")
    gguf_out = out_dir / f"{src.path.stem.split('.')[0]}-tasa-{bpw:g}bpw.gguf"
    res = export_gguf(src, plan, gguf_out, imatrix=plan.export_imatrix(None))
    out.print(f"    wrote {res.path} ({res.nbytes / 2**20:.1f} MiB, {res.bpw:.3f} bits/weight)")
    out.print("[bold]4/4 generate[/] with llama-cpp-python")
    text = generate(res.path, prompt, max_tokens=48)
    out.print(f"[dim]{prompt}[/]{text}")


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="GGUF file (or a packaged model name: its packaged GGUF)."),
    task: str = typer.Option(..., "--task", help="gsm8k (lm-eval-harness: strict-match, flexible-extract) or humaneval (pass@1)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Score only the first N held-out questions."),
    out_dir: Optional[Path] = typer.Option(None, "--out-dir", help="Run directory (default tasa-eval/<model>-<task>); a re-run resumes it."),
    num_fewshot: int = typer.Option(5, "--num-fewshot", help="gsm8k: few-shot examples (from the calibration split)."),
    max_gen_tokens: Optional[int] = typer.Option(None, "--max-gen-tokens", help="Tokens generated per question (gsm8k 256, humaneval 512)."),
    ctx: int = typer.Option(2048, "--ctx", help="llama.cpp context size."),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", help="llama.cpp threads (default: all cores)."),
    parallel: int = typer.Option(8, "--parallel", help="Questions generated together in one llama.cpp batch (continuous batching; 1: one at a time)."),
):
    """Task accuracy of a GGUF on held-out questions, with a Wilson 95% interval; writes per-question results."""
    from . import lmeval
    from .zoo import resolve_model

    if task not in lmeval.TASKS:
        raise TasaError(f"--task must be one of {', '.join(lmeval.TASKS)}, got {task!r}")
    if limit is not None and limit < 1:
        raise TasaError(f"--limit must be >= 1, got {limit}")
    if not 0 <= num_fewshot <= 32:
        raise TasaError(f"--num-fewshot must be within [0, 32], got {num_fewshot}")
    if max_gen_tokens is not None and not 1 <= max_gen_tokens < ctx:
        raise TasaError(f"--max-gen-tokens must be within [1, --ctx), got {max_gen_tokens}")
    if not 64 <= ctx <= 131072:
        raise TasaError(f"--ctx must be within [64, 131072], got {ctx}")
    if threads is not None and threads < 1:
        raise TasaError(f"--threads must be >= 1, got {threads}")
    if not 1 <= parallel <= 64:
        raise TasaError(f"--parallel must be within [1, 64], got {parallel}")
    path = resolve_model(model)
    if path.suffix.lower() != ".gguf":
        raise TasaError(f"{path}: eval runs GGUF files (export one first)")
    out_dir = out_dir or Path("tasa-eval") / f"{path.stem}-{task}"
    guards.output_dir(out_dir, "--out-dir")
    if task == "gsm8k":
        res = lmeval.eval_gsm8k(path, out_dir, limit=limit, num_fewshot=num_fewshot, n_ctx=ctx, n_threads=threads,
                                max_gen_toks=max_gen_tokens or lmeval.GSM8K_MAX_GEN_TOKENS, n_parallel=parallel)
    else:
        res = lmeval.eval_humaneval(path, out_dir, limit=limit, n_ctx=ctx, n_threads=threads, max_gen_toks=max_gen_tokens,
                                    n_parallel=parallel)
    for name, s in res.scores.items():
        out.print(f"{task} {name}: {s}  (Wilson 95%)")
    out.print(f"{len(res.ids)} held-out questions, {res.n_generated} generated, {res.n_resumed} resumed; "
              f"{res.harness}; wrote {Path(res.out_dir) / 'results.json'} and samples.jsonl ({res.seconds:.0f} s)")


@app.command("humaneval-data")
def humaneval_data(
    output: Path = typer.Option(..., "--output", "-o", help="The .jsonl to write (prompt / completion rows)."),
):
    """Write HumanEval's 64 calibration problems (prompt, canonical solution) for analyze --task-data."""
    from . import humaneval

    if output.suffix.lower() not in (".jsonl", ".ndjson"):
        raise TasaError(f"{output}: the task data file must end in .jsonl")
    guards.output_file(output, "--output")
    n = humaneval.write_task_data(output)
    out.print(f"wrote {output}: {n} HumanEval calibration problems (the {humaneval.N_EVAL} held-out ones are not in it)")


def _register_bench() -> None:
    from devices.cli import bench, profile

    app.command("bench", help="Benchmark GGUF/ONNX files on a target: size, speed, memory, KLD, GSM8K accuracy.")(bench)
    app.command("profile", help="Measure a target's kernel costs (decode / prefill per format) on a model's shapes: a device profile TOML for plan --profile.")(profile)


_register_bench()


def main() -> None:
    """Console-script entry: user errors print one line and exit 2, usage errors print the usage
    and exit 2, Ctrl-C / SIGTERM print "interrupted" and exit 130 / 143; never a traceback."""
    from .cli_errors import run_app

    run_app(app, err)


if __name__ == "__main__":
    main()
