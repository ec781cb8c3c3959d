"""TASA analysis: gradient traces, calibration-mixture search, dual sensitivity.

One pass of per-sample backward passes over a pool of general-text and task samples collects,
for every quantizable tensor (GGUF name):

* the diagonal empirical Fisher ``F = mean_n g_n^2`` separately for general text and task data
  (loss = mean NLL of the target tokens; task examples are conditioned on the question);
* a **gradient trace**: a small sketch ``A G B`` (A: k x rows, B: cols x k Gaussian) of every
  sample's gradient, so the mean gradient of any mixture of pool samples is a mean of sketches;
* llama.cpp-style importance statistics (sum of squared matmul inputs per column), per sample.

**Level 1 (mixture).** Each candidate mixture (task ratio x size) of pool samples is scored by

    alignment(m) = mean over tensors of cos(mean trace of m, mean trace of the task target set)
    diversity(m) = participation ratio of the members' (unit-normalised) traces / |m|
    score(m)     = (1 - beta) * alignment(m) + beta * diversity(m)       (beta = 0.5 by default)

where the task target set is held-in task data disjoint from the pool. Pure task data aligns best
but is narrow; general text is diverse but unaligned: the Alignment-Diversity tradeoff.

**Level 2 (sensitivity).** For tensor t, format f (the target's menu) and data source s:

    S_s(t, f) = 1/2 * sum_i F_s,i * (Q_f(w)_i - w_i)^2

with ``Q_f`` the real quantize->dequantize of that format (llama.cpp's kernels via ggml, with the
chosen mixture's importance matrix for GGUF). ``S_ppl`` uses general text, ``S_task`` task data.
The aggregated TASA score normalises each by its total at the reference format (Q4_0 for GGUF,
int4_b32 for ONNX) and mixes them with weight lambda (default: the chosen mixture's task ratio):

    S_tasa(t, f) = (1 - lambda) * S_ppl(t, f) / Z_ppl + lambda * S_task(t, f) / Z_task
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import __version__, ggml
from .data import TextSample, load_general, load_gsm8k
from .errors import TasaError
from .fsutil import atomic_path, atomic_write_text
from .imatrix import ImatrixStats
from .model import ModelSource, kind_of, layer_of
from .plan import format_nbytes
from .progress import progress_bar

#: Default GGUF menu for analysis: formats llama.cpp runs fast on CPU, no imatrix required.
GGUF_MENU = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "Q5_0", "IQ4_NL", "IQ4_XS")
#: Default ONNX menu. 2-bit RTN blocks (4 levels) are far outside the second-order regime the
#: Fisher estimate assumes (uniform int2 has KLD > 5 on SmolLM2): ask for them with --formats.
ONNX_MENU = ("int4_b32", "int4_b64", "int4_b128", "int8_b32", "int8_b128")


@dataclass
class AnalysisConfig:
    n_general: int = 24          # general-text pool samples
    n_task: int = 24             # task pool samples
    n_target: int = 12           # held-in task target set for alignment
    max_tokens: int = 192
    sketch_k: int = 16           # trace sketch is k x k per tensor
    ratios: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    sizes: tuple[int, ...] = (8, 16)
    beta: float = 0.5            # diversity weight in the mixture score
    target: str = "gguf"
    formats: tuple[str, ...] | None = None
    seed: int = 0
    fisher_dtype: str = "float32"

    def key(self) -> str:
        """Identity of the gradient statistics (not of the format menu or mixture scoring)."""
        d = asdict(self)
        for k in ("formats", "beta", "ratios", "sizes", "target"):
            d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------- data -> tokens
def encode(tok, s: TextSample, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input ids (the tokenizer's own prefix, e.g. BOS where the model adds one, + prompt + target,
    truncated) and a mask of the target positions to score."""
    bos = _special_prefix(tok)
    p = tok(s.prompt, add_special_tokens=False)["input_ids"] if s.prompt else []
    t = tok(s.target, add_special_tokens=False)["input_ids"]
    ids = (bos + p + t)[:max_tokens]
    mask = ([0] * (len(bos) + len(p)) + [1] * len(t))[:max_tokens]
    if sum(mask[1:]) == 0:
        raise TasaError(f"sample {s.id} has no target tokens within {max_tokens} tokens")
    return torch.tensor([ids]), torch.tensor([mask])


def _special_prefix(tok) -> list[int]:
    """Tokens the tokenizer itself puts before a text (BOS only where the model's config adds it,
    as llama.cpp's ``add_special`` does)."""
    cached = getattr(tok, "_tasa_prefix", None)
    if cached is None:
        with_sp = tok("a", add_special_tokens=True)["input_ids"]
        plain = tok("a", add_special_tokens=False)["input_ids"]
        n = len(with_sp) - len(plain)
        cached = list(with_sp[:n]) if n > 0 and with_sp[n:n + len(plain)] == plain else []
        tok._tasa_prefix = cached
    return cached


def pick(samples: list[TextSample], n: int, salt: str) -> list[TextSample]:
    """Deterministic subset (sha256 ranking, independent of Python's RNG)."""
    ranked = sorted(samples, key=lambda s: hashlib.sha256(f"{salt}\0{s.id}".encode()).digest())
    return ranked[:n]


# ---------------------------------------------------------------------------- gradient pass
@dataclass
class GradStats:
    names: list[str]
    fisher: dict[str, dict[str, torch.Tensor]]          # source -> name -> sum g^2
    n: dict[str, int]                                   # source -> samples
    traces: dict[str, np.ndarray]                       # sample id -> [n_tensors, k*k]
    acts: dict[str, dict[str, np.ndarray]]              # sample id -> name -> sum x^2 per column
    tokens: dict[str, int]                              # sample id -> tokens through the matmuls
    roles: dict[str, str]                               # sample id -> general | task | target
    seconds: float = 0.0


def collect(model, tok, params: dict[str, torch.nn.Parameter], pools: dict[str, list[TextSample]],
            cfg: AnalysisConfig, cache: Path | None = None, show_progress: bool = True) -> GradStats:
    """Per-sample forward+backward over all pools (``params``: GGUF name -> the model's parameter);
    resumable through ``cache``."""
    names = list(params)
    dev = next(model.parameters()).device
    fdt = getattr(torch, cfg.fisher_dtype)
    st = None
    if cache is not None and cache.exists():
        st = torch.load(cache, weights_only=False)
        if st.names != names:
            st = None
    if st is None:
        st = GradStats(names, {"general": {}, "task": {}}, {"general": 0, "task": 0}, {}, {}, {}, {})
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)

    gen = torch.Generator().manual_seed(cfg.seed)
    sk = {}
    for n in names:
        rows, cols = params[n].shape
        sk[n] = (
            (torch.randn(cfg.sketch_k, rows, generator=gen) / math.sqrt(rows)).to(dev),
            (torch.randn(cols, cfg.sketch_k, generator=gen) / math.sqrt(cols)).to(dev),
        )

    # importance statistics on matmul inputs of blk.* weights (llama.cpp imatrix semantics)
    act_sum: dict[str, torch.Tensor] = {}
    hooks = []
    by_param = {id(p): n for n, p in params.items()}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and id(mod.weight) in by_param:
            gname = by_param[id(mod.weight)]
            if not gname.startswith("blk."):
                continue

            def hook(m, inp, _out, gname=gname):
                x = inp[0].detach().float()
                act_sum[gname] = act_sum.get(gname, 0) + (x * x).reshape(-1, x.shape[-1]).sum(0)

            hooks.append(mod.register_forward_hook(hook))

    # Per-tensor statistics are taken as soon as autograd has the tensor's gradient, which is then
    # freed: peak memory is the model + the Fisher sums + one gradient, not a second model copy.
    cur = {"role": "general", "trace": None}
    idx = {n: j for j, n in enumerate(names)}

    def grad_hook(p, name):
        g = p.grad.float()
        role = cur["role"]
        with torch.no_grad():
            if role != "target":
                src_key = "task" if role == "task" else "general"
                f = st.fisher[src_key].get(name)
                if f is None:
                    st.fisher[src_key][name] = (g * g).to(fdt)
                else:
                    f += (g * g).to(fdt)
            a, b = sk[name]
            cur["trace"][idx[name]] = (a @ g @ b).reshape(-1).cpu().numpy()
        p.grad = None

    for n in names:
        hooks.append(params[n].register_post_accumulate_grad_hook(lambda p, n=n: grad_hook(p, n)))

    todo = [(role, s) for role, samples in pools.items() for s in samples if s.id not in st.roles]
    t0 = time.perf_counter()
    try:
        with progress_bar("gradient traces", total=len(todo), enabled=show_progress) as advance:
            for i, (role, s) in enumerate(todo):
                ids, mask = encode(tok, s, cfg.max_tokens)
                ids, mask = ids.to(dev), mask.to(dev)
                act_sum.clear()
                model.zero_grad(set_to_none=True)
                cur["role"] = role
                cur["trace"] = np.zeros((len(names), cfg.sketch_k * cfg.sketch_k), dtype=np.float32)
                logits = model(input_ids=ids).logits[0, :-1].float()
                tgt = ids[0, 1:]
                m = mask[0, 1:].bool()
                loss = torch.nn.functional.cross_entropy(logits[m], tgt[m])
                del logits
                loss.backward()
                if role != "target":
                    st.n["task" if role == "task" else "general"] += 1
                st.traces[s.id] = cur["trace"]
                st.acts[s.id] = {n: v.cpu().numpy().astype(np.float32) for n, v in act_sum.items()}
                st.tokens[s.id] = int(ids.shape[1])
                st.roles[s.id] = role
                advance(1)
                if cache is not None and (i + 1) % 16 == 0:
                    _save(st, cache)
    finally:
        for h in hooks:
            h.remove()
        for p in model.parameters():
            p.requires_grad_(False)
        model.zero_grad(set_to_none=True)
    st.seconds += time.perf_counter() - t0
    if cache is not None:
        _save(st, cache)
    return st


def _save(st: GradStats, cache: Path) -> None:
    with atomic_path(cache, suffix=".pt") as tmp:
        torch.save(st, tmp)


# ---------------------------------------------------------------------------- level 1: mixture
def _unit(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.maximum(n, 1e-30)


def mixture_search(st: GradStats, pools: dict[str, list[TextSample]], cfg: AnalysisConfig) -> dict:
    """Score every candidate mixture; returns {"candidates": [...], "chosen": {...}}."""
    from .data import build_mixture

    target = np.stack([st.traces[s.id] for s in pools["target"]]).mean(0)     # [T, k*k]
    cands = []
    for size in cfg.sizes:
        for r in cfg.ratios:
            try:
                members = build_mixture(pools["general"], pools["task"], size, r, seed=cfg.seed)
            except TasaError:
                continue
            tr = np.stack([st.traces[s.id] for s in members])                     # [n, T, k*k]
            mean = tr.mean(0)
            cos = (_unit(mean) * _unit(target)).sum(-1)                            # per tensor
            align = float(np.mean(cos))
            flat = _unit(tr.reshape(len(members), -1))
            ev = np.clip(np.linalg.eigvalsh(flat @ flat.T), 0, None)
            pr = float(ev.sum() ** 2 / max((ev ** 2).sum(), 1e-30))
            div = pr / len(members)
            score = (1 - cfg.beta) * align + cfg.beta * div
            n_task = sum(1 for s in members if s.source == "gsm8k" or s.prompt)
            cands.append({
                "task_ratio": r, "size": size, "n_task": n_task, "alignment": align,
                "diversity": div, "score": score, "members": [s.id for s in members],
            })
    if not cands:
        raise TasaError("no candidate mixture could be built from the pools")
    chosen = max(cands, key=lambda c: (c["score"], -c["task_ratio"]))
    return {"beta": cfg.beta, "candidates": cands, "chosen": {k: v for k, v in chosen.items()}}


def mixture_imatrix(st: GradStats, members: list[str], name: str = "tasa-mixture") -> ImatrixStats:
    im = ImatrixStats(datasets=[name], chunk_count=len(members), chunk_size=0)
    for sid in members:
        for n, v in st.acts[sid].items():
            im.add(n, v, st.tokens[sid])
    return im


# ---------------------------------------------------------------------------- level 2: sensitivity
def format_menu(src: ModelSource, cfg: AnalysisConfig) -> dict[str, list[str]]:
    """Formats each quantizable tensor can take on the target (shape-compatible)."""
    menu = cfg.formats or (GGUF_MENU if cfg.target == "gguf" else ONNX_MENU)
    out = {}
    for t in src.quantizable:
        if cfg.target == "gguf":
            fm = [f for f in menu if ggml.fits(f, t.ne0) and not ggml.requires_imatrix(f)]
        else:
            from .plan import parse_onnx_format

            for f in menu:
                parse_onnx_format(f)  # rejects unknown formats with a one-line error
            # MatMulNBits pads the last block of a row, so every block size fits any K
            fm = list(menu) if len(t.shape) == 2 else []
        if not fm:
            raise TasaError(f"no format of the menu fits tensor {t.name} (ne0={t.ne0})")
        out[t.name] = fm
    return out


def onnx_roundtrip(w: np.ndarray, fmt: str) -> np.ndarray:
    """Quantize->dequantize exactly as the ONNX exporter writes MatMulNBits blocks (along K = ne0)."""
    from exporters.onnx_export import dequantize_blockwise, quantize_blockwise

    from .plan import parse_onnx_format

    parsed = parse_onnx_format(fmt)
    if parsed is None:
        return w
    bits, block, sym = parsed
    packed, scales, zp = quantize_blockwise(w, bits, block, sym)
    return dequantize_blockwise(packed, scales, zp, bits, block, w.shape[-1])


#: elements per slice of a tensor in :func:`sensitivities`
SENSITIVITY_CHUNK = 1 << 22


def sensitivities(src: ModelSource, params: dict, st: GradStats, menu: dict[str, list[str]],
                  cfg: AnalysisConfig, imatrix: ImatrixStats | None, show_progress: bool = True) -> dict:
    """S_ppl and S_task for every (tensor, format), plus the true bytes of each."""
    imat = imatrix.means() if imatrix is not None else {}
    table = {"ppl": {}, "task": {}, "bytes": {}, "rel_err": {}}
    with progress_bar("quantization error x Fisher", total=len(menu), enabled=show_progress) as advance:
        for name, fmts in menu.items():
            p = params[name]
            rows, cols = p.shape
            # whole rows at a time (every format quantizes rows independently): the temporaries of
            # a 150k-row embedding stay at a few MB instead of several copies of the tensor
            step = max(1, SENSITIVITY_CHUNK // cols)
            sums = {f: [0.0, 0.0, 0.0] for f in fmts}          # ppl, task, squared error
            w2 = 0.0
            for r0 in range(0, rows, step):
                w = p[r0:r0 + step].detach().float().cpu().numpy()
                fg = st.fisher["general"][name][r0:r0 + step].float().cpu().numpy() / max(1, st.n["general"])
                ft = st.fisher["task"][name][r0:r0 + step].float().cpu().numpy() / max(1, st.n["task"])
                w2 += float(np.vdot(w, w))
                for f in fmts:
                    q = ggml.roundtrip(w, f, imat.get(name)) if cfg.target == "gguf" else onnx_roundtrip(w, f)
                    d2 = (q - w) ** 2
                    acc = sums[f]
                    acc[0] += float(np.vdot(fg, d2))
                    acc[1] += float(np.vdot(ft, d2))
                    acc[2] += float(d2.sum(dtype=np.float64))
            wn = math.sqrt(w2) or 1.0
            for k in table:
                table[k][name] = {}
            for f in fmts:
                table["ppl"][name][f] = 0.5 * sums[f][0]
                table["task"][name][f] = 0.5 * sums[f][1]
                table["bytes"][name][f] = format_nbytes(cfg.target, f, src.tensors[name].shape)
                table["rel_err"][name][f] = math.sqrt(sums[f][2]) / wn
            advance(1)
    return table


def reference_format(target: str) -> str:
    return "Q4_0" if target == "gguf" else "int4_b32"


def normalisers(table: dict, target: str) -> dict[str, float]:
    """Z_s: total predicted loss of source s when every tensor takes the reference format
    (or its least-bits format where the reference does not fit)."""
    ref = reference_format(target)
    z = {}
    for s in ("ppl", "task"):
        tot = 0.0
        for name, row in table[s].items():
            f = ref if ref in row else min(row, key=lambda k: table["bytes"][name][k])
            tot += row[f]
        z[s] = tot if tot > 0 else 1.0
    return z


def tasa_scores(table: dict, target: str, lam: float) -> dict[str, dict[str, float]]:
    z = normalisers(table, target)
    return {
        name: {f: (1 - lam) * table["ppl"][name][f] / z["ppl"] + lam * table["task"][name][f] / z["task"] for f in row}
        for name, row in table["ppl"].items()
    }


# ---------------------------------------------------------------------------- driver
@dataclass
class Analysis:
    model: dict
    config: dict
    mixture: dict
    table: dict
    lam: float
    imatrix_path: str | None
    timings: dict = field(default_factory=dict)

    def save(self, path: Path) -> None:
        d = {"format": "tasa-edge/analysis", "version": 1, "tool": f"tasa-edge {__version__}", **asdict(self)}
        atomic_write_text(path, json.dumps(d) + "\n")

    @classmethod
    def load(cls, path: Path) -> "Analysis":
        p = Path(path)
        if not p.exists():
            raise TasaError(f"analysis not found: {p}")
        from .jsonio import check_analysis_file; check_analysis_file(p)  # noqa: E702  bounded load + schema analysis.v1
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise TasaError(f"{p}: not valid JSON ({exc})") from exc
        if d.get("format") != "tasa-edge/analysis":
            raise TasaError(f"{p}: not a tasa-edge analysis file")
        return cls(d["model"], d["config"], d["mixture"], d["table"], d["lam"], d.get("imatrix_path"), d.get("timings", {}))


def build_pools(cfg: AnalysisConfig, task: list[TextSample] | None = None,
                general: list[TextSample] | None = None) -> dict[str, list[TextSample]]:
    """Pools from the calib split only (the eval split is never analysed)."""
    general = general if general is not None else load_general("calib")
    task = task if task is not None else load_gsm8k("calib")
    task_ranked = pick(task, cfg.n_task + cfg.n_target, f"task{cfg.seed}")
    if len(task_ranked) < cfg.n_task + cfg.n_target:
        raise TasaError(f"need {cfg.n_task + cfg.n_target} task samples, have {len(task)}")
    return {
        "general": pick(general, cfg.n_general, f"general{cfg.seed}"),
        "task": task_ranked[: cfg.n_task],
        "target": task_ranked[cfg.n_task:],
    }


def analyze(src: ModelSource, out_dir: Path, cfg: AnalysisConfig, *, device: str | None = None,
            lam: float | None = None, task: list[TextSample] | None = None,
            general: list[TextSample] | None = None, show_progress: bool = True) -> Analysis:
    from .torch_model import gguf_params, load_torch_model

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, tok = load_torch_model(src, device=device)
    t_load = time.perf_counter() - t0
    pools = build_pools(cfg, task, general)
    params = gguf_params(model, src)
    cache = out_dir / f"gradstats-{src.fingerprint.split(':')[1][:12]}-{cfg.key()}.pt"
    st = collect(model, tok, params, pools, cfg, cache=cache, show_progress=show_progress)
    t1 = time.perf_counter()
    mixture = mixture_search(st, pools, cfg)
    chosen = mixture["chosen"]
    imatrix = mixture_imatrix(st, chosen["members"])
    imatrix.chunk_size = cfg.max_tokens
    im_path = out_dir / "imatrix.gguf"
    imatrix.save(im_path)
    menu = format_menu(src, cfg)
    table = sensitivities(src, params, st, menu, cfg, imatrix if cfg.target == "gguf" else None, show_progress)
    t2 = time.perf_counter()
    lam_used = float(chosen["task_ratio"] if lam is None else lam)
    res = Analysis(
        model={"fingerprint": src.fingerprint, "arch": src.arch, "name": src.name, "n_params": src.n_params, "source": str(src.path)},
        config={**asdict(cfg), "formats": {k: v for k, v in menu.items()}},
        mixture=mixture,
        table=table,
        lam=lam_used,
        imatrix_path=str(im_path),
        timings={"load_s": t_load, "gradients_s": st.seconds, "sensitivity_s": t2 - t1, "total_s": t2 - t0,
                 "n_backward": len(st.roles), "peak_rss_mb": _peak_rss_mb()},
    )
    res.save(out_dir / "analysis.json")
    return res


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ---------------------------------------------------------------------------- illusion report
def layer_scores(table: dict, target: str, source: str) -> dict[int, float]:
    """Per-layer sensitivity at the reference format (sum over the layer's tensors)."""
    ref = reference_format(target)
    out: dict[int, float] = {}
    for name, row in table[source].items():
        layer = layer_of(name)
        if layer is None:
            continue
        f = ref if ref in row else min(row, key=lambda k: table["bytes"][name][k])
        out[layer] = out.get(layer, 0.0) + row[f]
    return dict(sorted(out.items()))


def illusion_report(an: Analysis, png: Path | None = None) -> dict:
    """Rank correlation between perplexity and reasoning sensitivity, per layer and per tensor."""
    from scipy.stats import kendalltau, spearmanr

    target = an.config["target"]
    ref = reference_format(target)
    lp, lt = layer_scores(an.table, target, "ppl"), layer_scores(an.table, target, "task")
    layers = sorted(lp)
    a, b = [lp[i] for i in layers], [lt[i] for i in layers]
    names = sorted(an.table["ppl"])

    def at_ref(src, n):
        row = an.table[src][n]
        return row[ref] if ref in row else row[min(row, key=lambda k: an.table["bytes"][n][k])]

    tp, tt = [at_ref("ppl", n) for n in names], [at_ref("task", n) for n in names]
    rep = {
        "per_layer": {"spearman": float(spearmanr(a, b)[0]), "kendall": float(kendalltau(a, b)[0]), "n": len(layers)},
        "per_tensor": {"spearman": float(spearmanr(tp, tt)[0]), "kendall": float(kendalltau(tp, tt)[0]), "n": len(names)},
        "top_layers_ppl": [int(i) for i in np.argsort(a)[::-1][:5].tolist()],
        "top_layers_task": [int(i) for i in np.argsort(b)[::-1][:5].tolist()],
        "by_kind": {},
    }
    kinds = sorted({kind_of(n) for n in names})
    for k in kinds:
        idx = [i for i, n in enumerate(names) if kind_of(n) == k]
        if len(idx) >= 3:
            rep["by_kind"][k] = float(spearmanr([tp[i] for i in idx], [tt[i] for i in idx])[0])
    if png is not None:
        plot_illusion(layers, a, b, tp, tt, rep, Path(png))
    return rep


def plot_illusion(layers, a, b, tp, tt, rep, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.stats import rankdata

    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    ra, rb = rankdata(a), rankdata(b)
    w = 0.4
    x = np.arange(len(layers))
    ax[0].bar(x - w / 2, np.asarray(a) / max(sum(a), 1e-30), w, label="perplexity (general text)")
    ax[0].bar(x + w / 2, np.asarray(b) / max(sum(b), 1e-30), w, label="reasoning (GSM8K CoT)")
    ax[0].set_xlabel("layer")
    ax[0].set_ylabel("share of predicted loss")
    ax[0].set_title("per-layer sensitivity")
    ax[0].legend(fontsize=8)
    ax[1].scatter(ra, rb)
    for i, l in enumerate(layers):
        ax[1].annotate(str(l), (ra[i], rb[i]), fontsize=7)
    ax[1].set_xlabel("rank by perplexity sensitivity")
    ax[1].set_ylabel("rank by reasoning sensitivity")
    pl = rep["per_layer"]
    ax[1].set_title(f"layers: Spearman {pl['spearman']:.2f}, Kendall {pl['kendall']:.2f}")
    ax[2].loglog(np.maximum(tp, 1e-12), np.maximum(tt, 1e-12), ".", alpha=0.6)
    pt = rep["per_tensor"]
    ax[2].set_xlabel("perplexity sensitivity")
    ax[2].set_ylabel("reasoning sensitivity")
    ax[2].set_title(f"tensors: Spearman {pt['spearman']:.2f}, Kendall {pt['kendall']:.2f}")
    fig.suptitle("Perplexity Illusion: which layers matter depends on the task")
    fig.tight_layout()
    with atomic_path(png, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
