"""``tasa-edge profile``: measure a target's kernel costs on a model's own tensor shapes.

For every format of the menu, a GGUF of the model is exported (tasa-edge's exporter, llama.cpp's
quantization kernels) with every tensor that fits the format in that format and the rest in a
fallback format (Q8_0 when the menu has it); for every other format the LM head takes, one file with
only the head in it (the layers in the fallback: the head's own decode cost); two more files mix the
menu's formats at random per tensor. ``llama-bench`` times each file on the device (``tg`` decode,
``pp`` prefill, the device's own kernels: repacked / interleaved CPU kernels show up as what they
cost), and one non-negative least-squares coefficient per format is fitted for decode (and one for
the LM head in that format, where the head files measured it) and one for prefill
(:mod:`tasa_edge.costmodel`). The random mixes are also predicted by a fit on the designed files
alone (``[measured.holdout]``): how well the model predicts a mix it has not seen. ``by_width``
(``--by-width``) adds, per format that fits layer matrices of several input widths (ggml ne0), one
file per width but the one holding most of its weights (that format on those matrices only, the
rest in the fallback), and fits one coefficient per (format, width) (``by_ne0`` in the TOML).

``--format onnx`` does the same for the ONNX exporter's files on this machine: each design is
exported (the default graph: onnxruntime-genai's where it runs the family) and timed by the bench
harness's onnxruntime backend with llama-bench's conventions (``pp`` random tokens in one batch,
``tg`` tokens one at a time); the coefficients are onnxruntime's MatMulNBits kernels (its own
prepacking included), and the LM head counts in prefill like a layer (``head_prefill = "all"``:
the graphs return every position's logits). The identity is then the onnxruntime(-genai) versions.

The profile TOML is a device profile (``devices/profiles.py``: name, target, cpu, memory, formats
= the measured menu, transport) plus ``[machine]`` (the identity: CPU model, ISA flags, cores,
llama.cpp build of the llama-bench that measured), ``[measured]`` (model fingerprint, threads, test
sizes, usable RAM, read bandwidth, the machine's load while measuring, the fit's errors) and
``[kernels.gguf.<FMT>]`` / ``[kernels.onnx.<FMT>]`` (the coefficients).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasa_edge import formats
from tasa_edge.costmodel import FormatCost, KernelProfile, role
from tasa_edge.errors import TasaError
from tasa_edge.fsutil import atomic_write_text
from tasa_edge.model import ModelSource
from tasa_edge.plan import BitPlan, model_block
from tasa_edge.progress import progress_bar

from . import bandwidth as bw
from .machine import REMOTE_PROBE, local_machine, parse_remote


@dataclass
class DesignRun:
    """One measured design file."""

    label: str
    tensors: dict[str, str]
    tg_ts: float
    pp_ts: float
    tg_sd: float
    pp_sd: float
    file_bytes: int


#: the design files' fallback (for tensors the measured format does not fit), by kernel target
FALLBACK = {"gguf": "Q8_0", "onnx": "int8_b32"}


def layer_widths(src: ModelSource) -> list[int]:
    """The distinct input widths (ggml ne0) of the model's layer matrices, ascending."""
    return sorted({int(t.shape[-1]) for t in src.quantizable if role(src, t.name) == "layer"})


def design_plans(src: ModelSource, menu: list[str], seed: int = 0, n_random: int = 2,
                 kernels: str = "gguf", by_width: bool = False) -> list[tuple[str, dict[str, str]]]:
    """(label, tensor -> format) of the design files: one per menu format (fallback where it does
    not fit), one per other format the LM head takes, with ``by_width`` one per format and layer
    input width but the widest-held one (the format on the layer matrices of that width only, the
    rest in the fallback) where the format fits more than one width, and ``n_random`` random mixes."""
    spec = formats.get(kernels)
    qt = src.quantizable
    fits_all = [f for f in menu if all(spec.fits(f, t.shape) for t in qt)]
    if not fits_all:
        raise TasaError(f"no format of the menu ({', '.join(menu)}) fits every tensor of {src.name}: add {FALLBACK[kernels]}")
    fallback = FALLBACK[kernels] if FALLBACK[kernels] in fits_all else fits_all[0]
    out = []
    for f in menu:
        tensors = {t.name: f if spec.fits(f, t.shape) else fallback for t in qt}
        if not any(v == f for v in tensors.values()):
            raise TasaError(f"format {f} fits no tensor of {src.name}: leave it out of --formats")
        out.append((f"uniform {f}", tensors))
    # the LM head alone in each other format it takes (layers in the fallback): its own decode cost
    heads = [t for t in qt if role(src, t.name) == "output"]
    for f in menu:
        if heads and f != fallback and all(spec.fits(f, t.shape) for t in heads):
            out.append((f"output {f}", {t.name: f if role(src, t.name) == "output" else fallback for t in qt}))
    if by_width:
        # the same format runs at another speed per weight on another shape: one file per width it
        # fits (all but the width holding most of its weights: the uniform file gives that one)
        for f in menu:
            if f == fallback:
                continue
            held: dict[int, int] = {}
            for t in qt:
                if role(src, t.name) == "layer" and spec.fits(f, t.shape):
                    held[int(t.shape[-1])] = held.get(int(t.shape[-1]), 0) + t.n_elements
            if len(held) < 2:
                continue
            for w in [w for w in sorted(held) if w != max(held, key=held.get)]:
                out.append((f"{f} on width {w}", {t.name: f if (role(src, t.name) == "layer" and int(t.shape[-1]) == w
                                                                and spec.fits(f, t.shape)) else fallback for t in qt}))
    rng = random.Random(seed)
    for i in range(n_random):
        out.append((f"random mix {i + 1}", {t.name: rng.choice([f for f in menu if spec.fits(f, t.shape)]) for t in qt}))
    return out


def export_design(src: ModelSource, kernels: str, label: str, tensors: dict[str, str], path: Path) -> tuple[int, str]:
    """Write design file ``label`` (``tensors``: tensor -> format) to ``path`` (a GGUF file, or an
    ONNX folder) as the profile does; returns its bytes and the graph it was written with (the
    ONNX exporter's; ``gguf`` for GGUF)."""
    plan = BitPlan(kernels, model_block(src), tensors, provenance={"method": f"kernel profile design: {label}"})
    plan.stamp(src)
    if kernels == "onnx":
        from exporters.onnx_export import export_onnx

        graph = export_onnx(src, plan, path, show_progress=False).graph
        return sum(f.stat().st_size for f in path.iterdir() if f.is_file()), graph
    from exporters.gguf_export import export_gguf

    export_gguf(src, plan, path, show_progress=False)
    return path.stat().st_size, "gguf"


def _group(widths: list[int], ne0: int) -> int:
    """Index of ``ne0`` among ``widths`` (the nearest width for one not among them)."""
    return min(range(len(widths)), key=lambda i: abs(widths[i] - ne0)) if len(widths) > 1 else 0


def features(src: ModelSource, tensors: dict[str, str], menu: list[str], pp: int,
             head_prefill: str = "last", widths: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Regressors of one file: decode weights per (format, layer input width) of the layer
    tensors then per format of the LM head (``k * G + k`` columns, ``G = len(widths)``, 1 without
    widths), and prefill weights (x pp) per (format, width) of the layer tensors -- and of the head
    when ``head_prefill`` is ``all`` (onnxruntime: logits of every prompt position); with ``last``
    (llama-bench: the last position's logits) the head is decode-costed in the pp test."""
    widths = widths or [0]
    g = len(widths)
    idx = {f: i for i, f in enumerate(menu)}
    k = len(menu)
    dec, pre = np.zeros(k * g + k), np.zeros(k * g)
    for name, fmt in tensors.items():
        t = src.tensors[name]
        r, n, col = role(src, name), t.n_elements, idx[fmt] * g + _group(widths, int(t.shape[-1]))
        if r == "embed":
            continue
        dec[k * g + idx[fmt] if r == "output" else col] += n
        if r == "layer" or head_prefill == "all":
            pre[col] += n * pp
    return dec, pre


def _nnls(x: np.ndarray, y: np.ndarray, smooth: list[tuple[int, int]] = (), lower: np.ndarray | None = None) -> np.ndarray:
    """Non-negative least squares (bounded-variable LS: exact also when the system has more
    columns than files, where scipy's ``nnls`` may stop short of the optimum). ``smooth``: column
    pairs whose coefficients are pulled together by a penalty far below the data's scale -- it only
    picks, among equally good fits, the one whose widths differ least (see :func:`fit`). ``lower``:
    a floor per coefficient (default 0)."""
    from scipy.optimize import lsq_linear

    rows = np.zeros((len(smooth), x.shape[1]))
    w = 1e-6 * float(np.abs(x).max())
    for r, (i, j) in enumerate(smooth):
        rows[r, i], rows[r, j] = w, -w
    a = np.vstack([x, rows])
    b = np.concatenate([y, np.zeros(len(smooth))])
    sd = np.abs(a).max(axis=0)        # scale columns so that the solver is well conditioned
    sd[sd == 0] = 1
    ys = max(float(np.abs(b).max()), 1e-30)
    lo = np.zeros(x.shape[1]) if lower is None else np.asarray(lower, dtype=float) * sd / ys
    sol = lsq_linear(a / sd, b / ys, bounds=(lo, np.inf), method="bvls", tol=1e-12).x
    return sol / sd * ys


def decode_floor(fmt: str, kernels: str, bandwidth: float | None) -> float:
    """The least decode cost of a format, ns per weight: a mat-vec streams every byte of its matrix
    once, and the matrices of a token are multiplied one after another, so no format decodes faster
    than its bytes per weight over the probed read bandwidth (0 when none was probed)."""
    if not bandwidth:
        return 0.0
    return formats.get(kernels).bits(fmt, (256, 256)) / 8.0 / float(bandwidth) * 1e9


def fit(src: ModelSource, runs: list[DesignRun], menu: list[str], pp: int, head_prefill: str = "last",
        by_width: bool = False, floors: dict[str, float] | None = None) -> dict[str, FormatCost]:
    """Least squares, decode then prefill (ns per weight), every coefficient non-negative and each
    decode coefficient (the layers' and the head's) at least its format's ``floors`` entry
    (:func:`decode_floor`: without it a fit on a noisy machine can make a format's decode nearly
    free -- gemma-3's Q6_K at 0.3x, Qwen's Q2_K head at 0.65x what streaming its bytes takes, 6 Dec
    -- and the allocator then buys speed that is not there); with ``by_width`` one
    coefficient per (format, layer input width) (:attr:`FormatCost.by_ne0`), the format's own
    ``decode_ns_per_weight`` / ``prefill_ns_per_weight`` then being their average over the model's
    weights of that format's widths.

    Every file quantizes every matrix, so adding ``d`` to all formats' coefficients of one width
    and taking ``d x`` (its weights / another width's weights) from the other width's leaves every
    prediction unchanged: the split between widths is not identifiable, the predictions are."""
    k = len(menu)
    widths = layer_widths(src) if by_width else [0]
    g = len(widths)
    head_t = [src.tensors[t.name] for t in src.quantizable if role(src, t.name) == "output"]
    hg = _group(widths, int(head_t[0].shape[-1])) if head_t else 0
    xd = np.array([features(src, r.tensors, menu, pp, widths=widths)[0] for r in runs])
    yd = np.array([1e9 / r.tg_ts for r in runs])              # ns per token
    # the head's own column only where some file puts the head in that format without putting any
    # layer there too (else it cannot be told from the layers': it joins the layers' column)
    own = [j for j in range(k) if any(x[k * g + j] > 0 and not x[j * g:(j + 1) * g].any() for x in xd)]
    x = xd[:, :k * g].copy()
    for j in range(k):
        if j not in own:
            x[:, j * g + hg] += xd[:, k * g + j]
    smooth = [(j * g + i, j * g + i + 1) for j in range(k) for i in range(g - 1)]
    fl = np.array([(floors or {}).get(f, 0.0) for f in menu])
    lower = np.concatenate([np.repeat(fl, g), fl[own]])
    sol = _nnls(np.hstack([x, xd[:, [k * g + j for j in own]]]), yd, smooth, lower)
    a = sol[:k * g].reshape(k, g)
    a_out = {j: float(sol[k * g + i]) for i, j in enumerate(own)}
    xp = np.array([features(src, r.tensors, menu, pp, head_prefill, widths)[1] for r in runs])
    head = np.array([0.0 if head_prefill == "all" else
                     sum(a_out.get(menu.index(f), a[menu.index(f), hg]) * src.tensors[n].n_elements
                         for n, f in r.tensors.items() if role(src, n) == "output") for r in runs])
    yp = np.array([1e9 * pp / r.pp_ts for r in runs]) - head     # ns for pp tokens, less the LM head
    b = _nnls(xp, yp, smooth).reshape(k, g)
    out = {}
    for j, f in enumerate(menu):
        held = np.zeros(g)          # the most weights of each width this format had in one file
        for r in runs:
            h = np.zeros(g)
            for n, ff in r.tensors.items():
                if ff == f and role(src, n) == "layer":
                    h[_group(widths, int(src.tensors[n].shape[-1]))] += src.tensors[n].n_elements
            held = np.maximum(held, h)
        w = held / held.sum() if held.sum() > 0 else np.full(g, 1.0 / g)
        by = {widths[i]: (float(a[j, i]), float(b[j, i])) for i in range(g) if held[i] > 0} if g > 1 else {}
        out[f] = FormatCost(float(w @ a[j]), float(w @ b[j]), a_out.get(j), by_ne0=by)
    return out


def _errors(kp: KernelProfile, src: ModelSource, runs: list[DesignRun]) -> dict:
    rows = {}
    for r in runs:
        p = kp.predict(src, r.tensors)
        rows[r.label] = {"tg_err": p.tg_ts / r.tg_ts - 1.0, "pp_err": p.pp_ts / r.pp_ts - 1.0}
    return rows


STATS = ("best", "median", "mean")


def speed(test: dict, stat: str) -> float:
    """Tokens/s of one llama-bench test: ``best`` (the fastest repetition: what the kernels do when
    nothing else runs), ``median`` (the middle repetition: on a machine whose speed jumps between
    two levels one lucky repetition sets the best, half of them the median) or ``mean``
    (llama-bench's average)."""
    if stat not in STATS:
        raise TasaError(f"unknown speed statistic {stat!r} (use {', '.join(STATS)})")
    if stat == "best" and test.get("samples_ts"):
        return float(max(test["samples_ts"]))
    if stat == "median" and test.get("samples_ts"):
        return float(np.median(test["samples_ts"]))
    return float(test["ts_mean"])


def speed_of_samples(samples: list[float], stat: str) -> float:
    """:func:`speed` of repetitions gathered from several measurements (passes) of one file."""
    return speed({"samples_ts": samples, "ts_mean": float(np.mean(samples))}, stat)


def reps_per_pass(reps: int, rounds: int) -> int:
    """Repetitions of each file in each of ``rounds`` passes, ``reps`` in all (at least 1)."""
    return max(1, -(-int(reps) // rounds))


def pass_order(n: int, r: int) -> list[int]:
    """The order of ``n`` files in pass ``r`` of a measurement in passes: each pass starts one file
    later than the one before, so no file is always measured first or right after the same one."""
    return [*range(r % n, n), *range(r % n)]


def _resume_key(label, tensors, ident, threads, pp, tg, reps, stat, target) -> str:
    h = hashlib.sha256(json.dumps([label, sorted(tensors.items()), ident.get("cpu"), ident.get("llama_cpp_commit"),
                                   threads, pp, tg, reps, stat, target]).encode())
    return h.hexdigest()[:24]


def _load_resume(path: Path | None) -> dict:
    """Design files measured by an interrupted run with the same settings (``--resume FILE``)."""
    if path is None or not Path(path).is_file():
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        raise TasaError(f"--resume {path}: not a profile progress file") from None
    if not isinstance(data, dict):
        raise TasaError(f"--resume {path}: not a profile progress file")
    return data


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _meminfo_available(text: str) -> int | None:
    import re

    m = re.search(r"^MemAvailable:\s*(\d+)\s*kB", text, re.M)
    return int(m.group(1)) * 1024 if m else None


def measure_profile(src: ModelSource, *, target: str = "local", menu: list[str] | None = None, threads: int | None = None,
                    pp: int = 512, tg: int = 128, reps: int = 3, n_random: int = 2, name: str | None = None,
                    transport=None, bin_dir=None, limit_bytes: int | None = None, show_progress: bool = True, stat: str = "best",
                    workdir: Path | None = None, log=None, resume: Path | None = None,
                    kernels: str = "gguf", by_width: bool = False, rounds: int = 1) -> tuple[KernelProfile, list[DesignRun], str]:
    """Export the design files, time them on ``target`` (``kernels="gguf"``: llama.cpp's llama-bench;
    ``"onnx"``: this machine's onnxruntime(-genai), MatMulNBits), fit the costs.

    ``rounds`` > 1: every design file is kept on disk and timed in that many passes over all files
    (each pass starting one file later, ``ceil(reps / rounds)`` repetitions per file and pass; a
    file's speed is ``stat`` over all its repetitions), so that each file is measured in several
    minutes of a machine whose speed moves between minutes, not in one.
    Returns the kernel profile, the measured runs and the profile TOML text."""
    from .llama_tools import build_info, require_tool, run_llama_bench
    from .machine import usable_cores

    if kernels not in FALLBACK:
        raise TasaError(f"--format must be gguf or onnx, got {kernels!r}")
    if kernels == "onnx" and target != "local":
        raise TasaError(f"an ONNX kernel profile runs onnxruntime on this machine (--target local), not {target}")
    spec = formats.get(kernels)
    menu = [spec.parse(f) for f in (menu or spec.default_menu)]
    need_im = [f for f in menu if spec.requires_imatrix(f)]
    if need_im:
        raise TasaError(f"{', '.join(need_im)} need an importance matrix; profile formats that do not")
    if len(set(menu)) != len(menu):
        raise TasaError("--formats lists a format twice")
    speed({"ts_mean": 1.0}, stat)     # validates stat
    if pp <= 0 or tg <= 0 or reps <= 0:
        raise TasaError("-p, -n and -r must be positive")
    if rounds < 1:
        raise TasaError(f"--rounds must be at least 1, got {rounds}")
    designs = design_plans(src, menu, n_random=n_random, kernels=kernels, by_width=by_width)
    load_before = _loadavg() if target == "local" else None
    tools = None
    emulation = None
    head_prefill = "last"
    if kernels == "onnx":
        runtime = onnx_versions()       # the runtime first: a missing one fails before any probing
    elif target == "local":
        exe = require_tool("llama-bench")
        b = build_info(exe)
        runtime = {"llama_cpp_build": b.version, "llama_cpp_commit": b.commit}
    if target == "local":
        threads = threads or usable_cores()
        mach = local_machine(threads)
        ident = {"cpu": mach["cpu"], "features": mach["features"], "arch": mach["arch"], "cores": mach["usable_cores"],
                 "ram_bytes": mach["ram_bytes"], **runtime}
        try:
            avail = _meminfo_available(Path("/proc/meminfo").read_text())
        except OSError:
            avail = None
        band = bw.probe_local(threads, repeats=3)
    if kernels == "onnx":
        head_prefill = "all"

        def bench(path: Path, tag: str, n: int) -> dict:
            return onnx_bench(path, pp, tg, n, threads)
    elif target == "local":
        def bench(path: Path, tag: str, n: int) -> dict:
            return run_llama_bench(path, pp, tg, n, threads, limit_bytes=limit_bytes, exe=exe)
    else:
        from .remote import DeviceTools

        transport.check()
        tools = DeviceTools(transport, bin_dir)
        rc, text, _ = transport.shell(REMOTE_PROBE)
        mach = parse_remote(text, threads)
        threads = threads or mach["cores"] or 4
        avail = _meminfo_available(text.split("@@meminfo", 1)[-1])
        tools.setup()
        ident = {"cpu": mach["cpu"], "features": mach["features"], "arch": mach["arch"], "cores": mach["cores"],
                 "ram_bytes": mach["ram_bytes"]}
        if kernels == "gguf":
            # the build is part of every --resume key: known before the first file, so that a resumed
            # remote profile finds the files its interrupted run measured
            b = tools.build_info()
            if b.commit:
                ident.update(llama_cpp_build=b.version, llama_cpp_commit=b.commit)
        from .harness import _emulation

        emulation = _emulation(tools.binary_arch(), mach.get("arch"))
        band = None

        def bench(path: Path, tag: str, n: int) -> dict:
            nonlocal band
            remote = tools.push_file(path, f"{tools.rd}/models/profile-{tag}.gguf")
            try:
                if band is None:
                    band = bw.probe_remote(lambda c: transport.shell(c)[:2], remote)
                return tools.bench(remote, pp, tg, n, threads, f"profile-{tag}")
            finally:
                transport.shell(f"rm -f '{remote}'")
    if limit_bytes and avail:
        avail = min(avail, limit_bytes)

    graphs: set[str] = set()    # the ONNX exporter's graph (genai where onnxruntime-genai runs the family)
    t0 = time.perf_counter()
    done = _load_resume(resume)
    n_files, per_pass = len(designs), reps_per_pass(reps, rounds)
    by_index: dict[int, DesignRun] = {}
    acc: dict[int, dict] = {}       # rounds > 1: design index -> its samples so far and its file's size
    paths: dict[int, Path] = {}
    with tempfile.TemporaryDirectory(prefix="tasa-profile-", dir=workdir) as tmp, \
            progress_bar(f"profile (export + {'llama-bench' if kernels == 'gguf' else 'onnxruntime'})", n_files * rounds,
                         enabled=show_progress) as advance:
        for r in range(rounds):
            for i in pass_order(n_files, r):
                label, tensors = designs[i]
                key = _resume_key(label, tensors, ident, threads, pp, tg, reps, stat, target)
                if rounds > 1:
                    key += f"-pass{r + 1}of{rounds}"
                last = r == rounds - 1
                if key in done:
                    if rounds == 1:
                        by_index[i] = DesignRun(**done[key])
                    else:
                        a = acc.setdefault(i, {"tg": [], "pp": []})
                        a["tg"] += done[key]["tg"]
                        a["pp"] += done[key]["pp"]
                        a["size"] = done[key]["size"]
                    advance(1)
                    continue
                if i not in paths:
                    paths[i] = Path(tmp) / (f"design-{i}" + ("" if kernels == "onnx" else ".gguf"))
                    size, graph = export_design(src, kernels, label, tensors, paths[i])
                    acc.setdefault(i, {"tg": [], "pp": []})["size"] = size
                    if kernels == "onnx":
                        graphs.add(graph)
                    if rounds > 1 and not last and shutil.disk_usage(tmp).free < 2**30:
                        raise TasaError(f"--rounds {rounds} keeps every design file on disk and less than 1 GiB is left "
                                        f"in {tmp}: profile with fewer rounds or more space")
                res = bench(paths[i], str(i), per_pass)
                if "tg" not in res or "pp" not in res:
                    raise TasaError(f"the benchmark gave no pp/tg result for design {label}")
                if kernels == "gguf" and ident.get("llama_cpp_commit") is None:
                    ident["llama_cpp_commit"] = res.get("build_commit")
                    ident["llama_cpp_build"] = res.get("build_number")
                size = acc[i]["size"]
                if rounds == 1:
                    by_index[i] = DesignRun(label, tensors, speed(res["tg"], stat), speed(res["pp"], stat), res["tg"]["ts_std"],
                                            res["pp"]["ts_std"], size)
                    done[key] = by_index[i].__dict__
                    got = by_index[i].tg_ts, by_index[i].pp_ts
                else:
                    tg_s = res["tg"].get("samples_ts") or [res["tg"]["ts_mean"]]
                    pp_s = res["pp"].get("samples_ts") or [res["pp"]["ts_mean"]]
                    acc[i]["tg"] += tg_s
                    acc[i]["pp"] += pp_s
                    done[key] = {"tg": tg_s, "pp": pp_s, "size": size, "label": label}
                    got = speed(res["tg"], stat), speed(res["pp"], stat)
                if log is not None:
                    log(f"{label}{f' (pass {r + 1} of {rounds})' if rounds > 1 else ''}: tg{tg} {got[0]:.1f} t/s, pp{pp} {got[1]:.1f} t/s")
                if last:
                    shutil.rmtree(paths[i]) if paths[i].is_dir() else paths[i].unlink()
                if resume is not None:
                    atomic_write_text(resume, json.dumps(done))
                advance(1)
    if rounds > 1:
        for i, a in acc.items():
            label, tensors = designs[i]
            by_index[i] = DesignRun(label, tensors, speed_of_samples(a["tg"], stat), speed_of_samples(a["pp"], stat),
                                    float(np.std(a["tg"])), float(np.std(a["pp"])), a["size"])
    runs = [by_index[i] for i in range(n_files)]
    seconds = time.perf_counter() - t0
    backend = "llama.cpp llama-bench"
    if kernels == "onnx":
        backend = (f"onnxruntime-genai {ident['onnxruntime_genai']} (onnxruntime {ident['onnxruntime']}) MatMulNBits"
                   if "genai" in graphs else f"onnxruntime {ident['onnxruntime']} MatMulNBits")
    measured = {
        "model": src.name, "fingerprint": src.fingerprint, "backend": backend, "target": target, "head_prefill": head_prefill,
        "threads": int(threads), "pp": pp, "tg": tg, "reps": reps, "stat": stat, "rounds": rounds,
        "usable_ram_bytes": avail, "bandwidth_bytes_per_s": (band or {}).get("read_bytes_per_s"),
        "load_before": load_before, "load_after": _loadavg() if target == "local" else None,
        "seconds": round(seconds, 1), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "emulated": emulation["note"] if emulation else None,
        "onnx_graph": ", ".join(sorted(graphs)) or None, "by_width": by_width,
    }
    uniform = [r for r in runs if not r.label.startswith("random")]   # the designed files
    held = [r for r in runs if r.label.startswith("random")]
    floors = {f: decode_floor(f, kernels, measured["bandwidth_bytes_per_s"]) for f in menu}
    measured["decode_floor"] = bool(measured["bandwidth_bytes_per_s"])
    kp = KernelProfile(name or f"{target}-{src.name}", kernels, ident, measured,
                       fit(src, uniform, menu, pp, head_prefill, by_width, floors))
    if held:
        errs = _errors(kp, src, held)
        measured["holdout"] = {"max_abs_tg_err": max(abs(e["tg_err"]) for e in errs.values()),
                               "max_abs_pp_err": max(abs(e["pp_err"]) for e in errs.values()), "files": len(held)}
    kp.costs = fit(src, runs, menu, pp, head_prefill, by_width, floors)
    errs = _errors(kp, src, runs)
    measured["fit"] = {"max_abs_tg_err": max(abs(e["tg_err"]) for e in errs.values()),
                       "max_abs_pp_err": max(abs(e["pp_err"]) for e in errs.values()), "files": len(runs)}
    measured["design_tg_ts"] = {r.label: round(r.tg_ts, 3) for r in runs}
    measured["design_pp_ts"] = {r.label: round(r.pp_ts, 3) for r in runs}
    return kp, runs, profile_toml(kp, target, menu, threads, transport)


def profile_toml(kp: KernelProfile, target: str, menu: list[str], threads: int, transport=None) -> str:
    """The whole profile file: device-profile part (loadable by ``devices.profiles.load_profile``)
    then the measured tables."""
    from tasa_edge.costmodel import _toml_value as v

    head = [f"# made by tasa-edge profile on {kp.measured.get('created')}: kernel costs of {kp.measured.get('model')}",
            f"name = {v(kp.name)}", f"description = {v('measured by tasa-edge profile (' + str(kp.measured.get('backend')) + ', ' + str(kp.measured.get('model')) + ')')}",
            f"target = {v(target)}", "", "[cpu]", f"arch = {v(kp.machine.get('arch') or '')}", f"threads = {int(threads)}",
            f"features = {v(list(kp.machine.get('features') or []))}", "", "[memory]",
            f"ram_gib = {round((kp.machine.get('ram_bytes') or 0) / 2**30, 3)!r}", "limit_gib = 0", "",
            "[formats]", f"{kp.target} = {v(menu)}"]
    if transport is not None and target != "local":
        keys = ("serial", "remote_dir") if target == "adb" else ("host", "user", "port", "remote_dir")
        d = {k: getattr(transport, k, None) for k in keys}
        head += ["", "[transport]"] + [f"{k} = {v(val)}" for k, val in d.items() if val not in (None, "")]
    return "\n".join(head) + "\n\n" + kp.to_toml()


def onnx_bench(path: Path, pp: int, tg: int, reps: int, threads: int) -> dict:
    """llama-bench-style pp / tg results of an exported ONNX directory on this machine (the bench
    harness's onnxruntime(-genai) backend: ``devices.worker.measure_speed``)."""
    from .worker import backend_for, measure_speed

    be = backend_for("onnx", str(path), threads)
    try:
        be.load(0, 0)
        return measure_speed(be, pp, tg, reps)
    finally:
        be.close()


def onnx_versions() -> dict:
    """The onnxruntime (and onnxruntime-genai, when installed) versions that run ONNX kernels here:
    an ONNX profile's identity, as the llama.cpp build is a GGUF profile's."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for key, dist in (("onnxruntime", "onnxruntime"), ("onnxruntime_genai", "onnxruntime-genai")):
        try:
            out[key] = version(dist)
        except PackageNotFoundError:
            out[key] = None
    if out["onnxruntime"] is None:
        raise TasaError("an ONNX kernel profile needs onnxruntime (pip install onnxruntime)")
    return out


def write_profile(path: Path, text: str) -> None:
    atomic_write_text(path, text)
