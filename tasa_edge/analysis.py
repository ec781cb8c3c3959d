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
The aggregated TASA score (:mod:`tasa_edge.results`) normalises each by its total at the
target's reference format (Q4_0 for GGUF, int4_b32 for ONNX) and mixes them with weight lambda
(default: the chosen mixture's task ratio).

The gradient statistics are cached (resume) as one safetensors file with a JSON header: data only,
checked against the model fingerprint and the configuration key before use; nothing is unpickled.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from . import distributed, formats
from .chat import ChatTemplate, apply_template
from .data import TextSample, build_mixture, load_general, load_gsm8k
from .errors import TasaError
from .fisher import FisherAccumulator
from .formats.base import SOURCE
from .formats.ggml import FLOAT_TYPES
from .fsutil import atomic_path
from .imatrix import ImatrixStats, imatrix_ref
from .memory import peak_rss_bytes, release_freed_memory
from .model import ModelSource
from .progress import progress_bar
from .results import Analysis, AnalysisConfig, Candidate, Mixture, SensitivityTable
from .torch_model import RowEmbedding, layer_checkpointing, row_runs

#: The gradient-statistics cache format (safetensors + JSON metadata).
CACHE_FORMAT = "tasa-edge/gradstats"
CACHE_VERSION = 2


# ---------------------------------------------------------------------------- data -> tokens
def encode(tok, s: TextSample, max_tokens: int, prefix: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """input ids (``prefix`` = :func:`special_prefix` of the tokenizer, + prompt + target,
    truncated) and a mask of the target positions to score."""
    bos = prefix
    p = tok(s.prompt, add_special_tokens=False)["input_ids"] if s.prompt else []
    t = tok(s.target, add_special_tokens=False)["input_ids"]
    ids = (bos + p + t)[:max_tokens]
    mask = ([0] * (len(bos) + len(p)) + [1] * len(t))[:max_tokens]
    if sum(mask[1:]) == 0:
        raise TasaError(f"sample {s.id} has no target tokens within {max_tokens} tokens")
    return torch.tensor([ids]), torch.tensor([mask])


def encode_pools(tok, pools: dict[str, list[TextSample]], max_tokens: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every pool sample's :func:`encode`, by sample id: the gradient pass needs no tokenizer (the
    analysis frees it before the model is loaded)."""
    prefix = special_prefix(tok)
    return {s.id: encode(tok, s, max_tokens, prefix) for samples in pools.values() for s in samples}


#: the gradient pass pads each sample to a multiple of this many tokens (see :func:`pad_to_bucket`)
PAD_MULTIPLE = 16


def pad_to_bucket(ids: torch.Tensor, mask: torch.Tensor, multiple: int = PAD_MULTIPLE) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids`` and ``mask`` right-padded (token 0, mask 0) to a multiple of ``multiple`` tokens.

    Causal attention keeps the sample's positions blind to the padding and the loss masks it, so
    the gradients are the sample's own. What it buys: the matmul shapes come from a dozen lengths
    instead of one per sample. oneDNN (torch's CPU bf16 kernels) JIT-compiles and caches a
    primitive per shape; with every sample a new length the cache kept growing and the resident
    set crept by ~5 MB per sample on SmolLM2 (~10 MB on Qwen2.5-1.5B: 0.6 GB over the 60 default
    samples); with 16-token buckets it stops after the first samples."""
    pad = (-ids.shape[1]) % multiple
    if not pad:
        return ids, mask
    return (torch.nn.functional.pad(ids, (0, pad), value=0), torch.nn.functional.pad(mask, (0, pad), value=0))


def special_prefix(tok) -> list[int]:
    """Tokens the tokenizer itself puts before a text (BOS only where the model's config adds it,
    as llama.cpp's ``add_special`` does)."""
    with_sp = tok("a", add_special_tokens=True)["input_ids"]
    plain = tok("a", add_special_tokens=False)["input_ids"]
    n = len(with_sp) - len(plain)
    return list(with_sp[:n]) if n > 0 and with_sp[n:n + len(plain)] == plain else []


def pick(samples: list[TextSample], n: int, salt: str) -> list[TextSample]:
    """Deterministic subset (sha256 ranking, independent of Python's RNG)."""
    ranked = sorted(samples, key=lambda s: hashlib.sha256(f"{salt}\0{s.id}".encode()).digest())
    return ranked[:n]


# ---------------------------------------------------------------------------- gradient pass
@dataclass
class GradStats:
    names: list[str]
    fisher: dict[str, FisherAccumulator]                # source -> sums of g^2 per tensor
    n: dict[str, int]                                   # source -> samples
    traces: dict[str, np.ndarray]                       # sample id -> [n_tensors, k*k]
    acts: dict[str, dict[str, np.ndarray]]              # sample id -> name -> sum x^2 per column
    tokens: dict[str, int]                              # sample id -> tokens through the matmuls
    roles: dict[str, str]                               # sample id -> general | task | target
    seconds: float = 0.0
    computed: int = 0                                   # backward passes run by this process


#: elements per float32 slice of a gradient while its statistics are taken
GRAD_CHUNK = 1 << 22

def collect(model, encoded: dict[str, tuple[torch.Tensor, torch.Tensor]], params: dict[str, torch.nn.Parameter],
            pools: dict[str, list[TextSample]], cfg: AnalysisConfig, cache: Path | None = None,
            show_progress: bool = True, key: str = "", ranks: distributed.Ranks | None = None) -> GradStats:
    """Per-sample forward+backward over all pools (``encoded``: :func:`encode_pools`; ``params``:
    GGUF name -> the model's parameter); resumable through ``cache`` (valid only for the same
    ``key``: model fingerprint + config). With ``ranks``, only this rank's share of the samples
    (:meth:`~tasa_edge.distributed.Ranks.mine`). ``cfg.checkpoint == "on"``: the decoder layers
    are recomputed in the backward pass (:func:`~tasa_edge.torch_model.layer_checkpointing`);
    ``auto`` is resolved by :func:`analyze`, here it means off."""
    names = list(params)
    dev = _device_of(model)
    st = load_cache(cache, names, key, cfg) if cache is not None else None
    if st is None:
        st = GradStats(names, new_fisher(cfg), {"general": 0, "task": 0}, {}, {}, {}, {})
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
    act_seen: dict[tuple, torch.Tensor] = {}
    hooks = []
    by_param = {id(p): n for n, p in params.items()}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and id(mod.weight) in by_param:
            gname = by_param[id(mod.weight)]
            if not gname.startswith("blk."):
                continue

            def hook(m, inp, _out, gname=gname):
                if recomputing is not None and recomputing[0]:  # a checkpointed layer run again
                    return
                x = inp[0].detach()[..., :cur["n"], :]          # the sample's tokens, not the padding
                # q/k/v (and gate/up) read one input: its sum of squares is taken once per forward
                # (autograd keeps the inputs alive, so a live address names one tensor)
                k = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))
                v = act_seen.get(k)
                if v is None:
                    v = act_seen[k] = torch.linalg.vector_norm(x.reshape(-1, x.shape[-1]), dim=0,
                                                               dtype=torch.float32).square_()
                act_sum[gname] = act_sum[gname] + v if gname in act_sum else v

            hooks.append(mod.register_forward_hook(hook))

    # Per-tensor statistics are taken as soon as autograd has the tensor's gradient, which is then
    # freed: peak memory is the model + the Fisher sums + one gradient, not a second model copy.
    cur = {"role": "general", "trace": None, "n": 0}
    idx = {n: j for j, n in enumerate(names)}

    def accumulator():
        role = cur["role"]
        return None if role == "target" else st.fisher["task" if role == "task" else "general"]

    def dense_stats(name, slices):
        """Trace and Fisher sums of a dense gradient given as ``(r0, float32 rows from r0)`` slices."""
        acc = accumulator()
        a, b = sk[name]
        shape = tuple(params[name].shape)
        ag = None
        for r0, part in slices:
            ag = a[:, r0:r0 + part.shape[0]] @ part if ag is None else ag.addmm_(a[:, r0:r0 + part.shape[0]], part)
            if acc is not None:
                acc.add_rows(name, r0, part.square_(), shape)
            del part
        cur["trace"][idx[name]] = (ag @ b).reshape(-1).cpu().numpy()

    def sparse_stats(name, at, vals):
        """Trace and Fisher sums of a gradient that is zero outside the (distinct) rows ``at``."""
        with torch.no_grad():
            a, b = sk[name]
            cur["trace"][idx[name]] = (a[:, at] @ vals @ b).reshape(-1).cpu().numpy()
            acc = accumulator()
            if acc is not None:
                acc.add_rows_at(name, at, vals.square_(), tuple(params[name].shape))

    def grad_hook(p, name):
        g = p.grad
        with torch.no_grad():
            if head is not None and head.tied and name == head_name:   # the embedding's rows join the head's
                head.embedding_grad = g.coalesce() if g.is_sparse else g
                p.grad = None
                return
            rows, cols = g.shape
            if g.is_sparse:                       # the embedding: only the rows of this sample's tokens
                g = g.coalesce()
                sparse_stats(name, g.indices()[0], g.values().float())
                p.grad = None
                return
            step = max(1, GRAD_CHUNK // cols)     # float32 slices, not a float32 copy of g
            dense_stats(name, ((r0, g[r0:r0 + step].float()) for r0 in range(0, rows, step)))
        p.grad = None

    for n in names:
        hooks.append(params[n].register_post_accumulate_grad_hook(lambda p, n=n: grad_hook(p, n)))
    # The token embedding's backward is made sparse (the rows of the sample's tokens) instead of a
    # dense vocab x d buffer with float32 accumulation: an untied embedding's statistics come from
    # those rows alone; a tied one still gets the LM head's dense gradient, the rows added into it.
    emb = model.get_input_embeddings()
    sparse_emb = isinstance(emb, torch.nn.Embedding) and id(emb.weight) in by_param
    if sparse_emb:
        emb.sparse = True
    rows_emb = isinstance(emb, RowEmbedding) and id(emb.weight) in by_param
    if rows_emb:                                  # read from the file by rows: its gradient comes per row
        emb.on_grad = lambda at, vals, name=by_param[id(emb.weight)]: sparse_stats(name, at, vals)
    # The LM head's loss and gradient by vocabulary slices (:class:`ChunkedHead`), not through
    # autograd: no [tokens x vocab] logits chain and no dense vocab x d gradient buffer.
    head = ChunkedHead.of(model, by_param)
    head_name = by_param[id(head.weight)] if head is not None else None
    if head is not None and not head.tied:
        head.weight.requires_grad_(False)

    work = [(role, s) for role, samples in pools.items() for s in samples]
    todo = [(role, s) for role, s in (ranks.mine(work) if ranks else work) if s.id not in st.roles]
    t0 = time.perf_counter()
    with layer_checkpointing(model, cfg.checkpoint == "on") as recomputing:
        try:
            with progress_bar("gradient traces", total=len(todo), enabled=show_progress) as advance:
                for i, (role, s) in enumerate(todo):
                    ids, mask = encoded[s.id]
                    n_real = cur["n"] = int(ids.shape[1])
                    ids, mask = pad_to_bucket(ids, mask)
                    ids, mask = ids.to(dev), mask.to(dev)
                    act_sum.clear()
                    act_seen.clear()
                    model.zero_grad(set_to_none=True)
                    cur["role"] = role
                    cur["trace"] = np.zeros((len(names), cfg.sketch_k * cfg.sketch_k), dtype=np.float32)
                    if head is None:
                        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
                        tgt = ids[0, 1:]
                        m = mask[0, 1:].bool()
                        loss = torch.nn.functional.cross_entropy(logits[m], tgt[m])
                        del logits
                        loss.backward()
                    else:
                        head.backward(ids, mask, lambda slices: dense_stats(head_name, slices))
                    if role != "target":
                        st.n["task" if role == "task" else "general"] += 1
                    st.traces[s.id] = cur["trace"]
                    st.acts[s.id] = _one_block({n: v.cpu().numpy() for n, v in act_sum.items()})
                    st.tokens[s.id] = n_real
                    st.roles[s.id] = role
                    st.computed += 1
                    release_freed_memory()
                    advance(1)
                    if cache is not None and (i + 1) % 16 == 0:
                        save_cache(st, cache, key)
        finally:
            if sparse_emb:
                emb.sparse = False
            if rows_emb:
                emb.on_grad = None
            for h in hooks:
                h.remove()
            for p in model.parameters():
                p.requires_grad_(False)
            model.zero_grad(set_to_none=True)
    st.seconds += time.perf_counter() - t0
    if cache is not None:
        save_cache(st, cache, key)
    return st


def _device_of(model) -> torch.device:
    """Where the model computes (its first parameter that has storage)."""
    return next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))


def _one_block(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``arrays`` copied into one float32 allocation (views into it): a sample's importance sums
    are kept for the whole pass, as one block instead of a few hundred small ones among the heap's
    transient memory."""
    buf = np.empty(sum(a.size for a in arrays.values()), dtype=np.float32)
    out, i = {}, 0
    for n, a in arrays.items():
        out[n] = buf[i:i + a.size].reshape(a.shape)
        out[n][...] = a
        i += a.size
    return out


def save_cache(st: GradStats, cache: Path, key: str) -> None:
    """Write ``st`` as safetensors (tensors) + JSON metadata (counts, roles, tensor names)."""
    from safetensors.torch import save_file

    act_names = sorted({n for a in st.acts.values() for n in a})
    tensors: dict[str, torch.Tensor] = {}
    for src_key, acc in st.fisher.items():
        for n, parts in acc.parts.items():
            for part, t in parts.items():
                tensors[f"fisher/{src_key}/{part}/{n}"] = t.detach().cpu().contiguous()
    sids = sorted(st.roles)
    if sids:
        tensors["traces"] = torch.from_numpy(np.stack([st.traces[i] for i in sids]))
        for i, sid in enumerate(sids):
            a = st.acts[sid]
            if sorted(a) != act_names:
                raise TasaError(f"internal: sample {sid} has activation statistics for other tensors")
            for n in act_names:
                tensors[f"acts/{i}/{n}"] = torch.from_numpy(np.ascontiguousarray(a[n], dtype=np.float32))
    meta = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "key": key, "names": st.names,
            "n": st.n, "samples": sids, "tokens": [st.tokens[i] for i in sids],
            "roles": [st.roles[i] for i in sids], "act_names": act_names, "seconds": st.seconds}
    with atomic_path(cache, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"tasa_edge": json.dumps(meta)})


def new_fisher(cfg: AnalysisConfig) -> dict[str, FisherAccumulator]:
    return {s: FisherAccumulator(cfg.fisher, getattr(torch, cfg.fisher_dtype)) for s in ("general", "task")}


def load_cache(cache: Path, names: list[str], key: str, cfg: AnalysisConfig) -> GradStats | None:
    """The cached statistics if ``cache`` holds this model's and configuration's (else None: they
    are recomputed). Data only: safetensors tensors and a JSON header, never a pickle."""
    if not cache.is_file():
        return None
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(cache), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {}).get("tasa_edge", "null"))
        if not (isinstance(meta, dict) and meta.get("format") == CACHE_FORMAT
                and meta.get("version") == CACHE_VERSION and meta.get("key") == key and meta.get("names") == names):
            return None
        t = load_file(str(cache))
        sids = meta["samples"]
        st = GradStats(names, new_fisher(cfg), {k: int(v) for k, v in meta["n"].items()}, {}, {}, {}, {},
                       float(meta["seconds"]))
        for k, v in t.items():
            if k.startswith("fisher/"):
                _, src_key, part, n = k.split("/", 3)
                st.fisher[src_key].parts.setdefault(n, {})[part] = v
        traces = t["traces"].numpy() if sids else None
        for i, sid in enumerate(sids):
            st.traces[sid] = traces[i]
            st.acts[sid] = {n: t[f"acts/{i}/{n}"].numpy() for n in meta["act_names"]}
            st.tokens[sid] = int(meta["tokens"][i])
            st.roles[sid] = str(meta["roles"][i])
        return st
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, IndexError, json.JSONDecodeError) as exc:
        raise TasaError(f"{cache}: unreadable gradient cache ({type(exc).__name__}); delete it to recompute") from exc


def reduce_stats(st: GradStats, ranks: distributed.Ranks, shapes: dict[str, tuple[int, int]],
                 device=None) -> GradStats:
    """The statistics of the whole pool from every rank's share: Fisher sums and sample counts
    summed over the ranks, per-sample records gathered (every rank gets the result)."""
    for src_key in sorted(st.fisher):
        acc = st.fisher[src_key]
        for name in st.names:                      # same tensors, same order, on every rank
            parts = acc.ensure(name, shapes[name], device)
            for part in sorted(parts):
                distributed.all_sum_(parts[part], f"{src_key} Fisher statistics")
    counts = torch.tensor([st.n["general"], st.n["task"], st.computed], dtype=torch.float64)
    distributed.all_sum_(counts, "sample counts")
    mine = {sid: (st.traces[sid], st.acts[sid], st.tokens[sid], st.roles[sid]) for sid in st.roles}
    merged: dict = {}
    for part in distributed.all_gather(mine, "per-sample statistics"):
        merged.update(part)
    seconds = max(distributed.all_gather(st.seconds, "timings"))
    out = GradStats(st.names, st.fisher, {"general": int(counts[0]), "task": int(counts[1])}, {}, {}, {}, {},
                    seconds, int(counts[2]))
    for sid in sorted(merged):
        out.traces[sid], out.acts[sid], out.tokens[sid], out.roles[sid] = merged[sid]
    return out


class ChunkedHead:
    """Mean next-token NLL of the target positions and its gradients, with the LM head (logits =
    h W^T) done by hand in slices of the vocabulary: ``backward`` runs the decoder forward, fills one
    [targets x vocab] float32 buffer slice by slice with logits, turns it into dlogits (softmax -
    one-hot, / targets) in place, back-propagates dh = dlogits W through the decoder, and hands the
    head's gradient dW = dlogits^T h to ``on_head`` as float32 row slices, computed in the weights'
    dtype as autograd would. Autograd's way holds the logits 5-6 times over (bf16, float32, the
    target rows, log-softmax, their gradients) plus a dense vocab x d gradient: ~1 GiB for a
    150k vocabulary, versus one buffer of ~0.1 GiB here. With tied embeddings the token
    embedding's (sparse) gradient, which autograd delivers into ``embedding_grad``, is added to the
    head's rows before the statistics are taken, as autograd's accumulation would."""

    #: elements of one [vocab slice x d] or [targets x vocab slice] piece
    CHUNK = 1 << 22

    def __init__(self, decoder, weight: torch.nn.Parameter, tied: bool):
        self.decoder, self.weight, self.tied = decoder, weight, tied
        self.embedding_grad = None

    @classmethod
    def of(cls, model, by_param: dict) -> "ChunkedHead | None":
        """The head of ``model`` when its logits are a plain bias-free linear map of the decoder's
        last hidden state (no soft-capping or scaling: those models keep autograd's path)."""
        head = model.get_output_embeddings()
        cfg = getattr(model, "config", None)
        get_decoder = getattr(model, "get_decoder", None)
        if (not isinstance(head, torch.nn.Linear) or head.bias is not None or id(head.weight) not in by_param
                or get_decoder is None or getattr(cfg, "final_logit_softcapping", None)
                or getattr(cfg, "logit_scale", None) not in (None, 1, 1.0)):
            return None
        emb = model.get_input_embeddings()
        return cls(get_decoder(), head.weight, emb is not None and emb.weight is head.weight)

    def backward(self, ids: torch.Tensor, mask: torch.Tensor, on_head) -> float:
        h = self.decoder(input_ids=ids, use_cache=False).last_hidden_state[0, :-1]
        m = mask[0, 1:].bool().to(h.device)
        w = self.weight.detach()
        tgt = ids[0, 1:].to(h.device)[m].to(w.device)
        v, d = w.shape
        with torch.no_grad():
            hm = h.detach()[m].to(w.device)          # (device_map may put the head elsewhere)
            n = hm.shape[0]
            # the target rows padded with zero rows to a multiple of PAD_MULTIPLE (their dlogits are
            # zeroed): the head's matmul shapes then come from a few sizes, not one per target count
            # (oneDNN compiles and keeps kernels per shape: ~10 MB per new count on Qwen's head)
            hm = torch.nn.functional.pad(hm, (0, 0, 0, (-n) % PAD_MULTIPLE))
            step = max(1, self.CHUNK // max(hm.shape[0], d))     # vocabulary rows per slice
            dl = torch.empty(hm.shape[0], v, dtype=torch.float32, device=w.device)
            for v0 in range(0, v, step):
                dl[:, v0:v0 + step] = hm @ w[v0:v0 + step].T
            mx = dl.amax(1, keepdim=True)
            se = torch.zeros_like(mx)
            for v0 in range(0, v, step):
                se += torch.exp(dl[:, v0:v0 + step] - mx).sum(1, keepdim=True)
            lse = mx + se.log()
            rows = torch.arange(n, device=w.device)
            loss = float((lse[:n, 0] - dl[rows, tgt]).mean())
            for v0 in range(0, v, step):
                c = dl[:, v0:v0 + step]
                c.sub_(lse).exp_()
            dl[n:] = 0.0
            dl[rows, tgt] -= 1.0
            dl /= n
            dh = torch.zeros(hm.shape[0], d, dtype=torch.float32, device=w.device)
            for v0 in range(0, v, step):
                dh += dl[:, v0:v0 + step].to(w.dtype) @ w[v0:v0 + step]
            grad_h = torch.zeros_like(h)
            grad_h[m] = dh[:n].to(device=h.device, dtype=h.dtype)
            del dh
        self.embedding_grad = None
        h.backward(grad_h)
        del h, grad_h
        emb = self.embedding_grad
        self.embedding_grad = None
        if emb is not None and emb.is_sparse:
            at, vals = emb.indices()[0], emb.values().float()
            order = torch.argsort(at)
            at, vals = at[order], vals[order]
        vstep = max(1, self.CHUNK // d)

        def slices():
            with torch.no_grad():
                for v0 in range(0, v, vstep):
                    g = (dl[:, v0:v0 + vstep].T.to(w.dtype) @ hm).float()
                    if emb is not None and not emb.is_sparse:
                        g += emb[v0:v0 + g.shape[0]].float()
                    elif emb is not None:
                        lo, hi = torch.searchsorted(at, torch.tensor([v0, v0 + g.shape[0]], device=at.device)).tolist()
                        if hi > lo:
                            g.index_add_(0, at[lo:hi] - v0, vals[lo:hi])
                    yield v0, g

        on_head(slices())
        return loss


# ---------------------------------------------------------------------------- level 1: mixture
def _unit(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.maximum(n, 1e-30)


def mixture_search(st: GradStats, pools: dict[str, list[TextSample]], cfg: AnalysisConfig) -> Mixture:
    """Score every candidate mixture (task ratio x size) and choose the best."""
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
            cands.append(Candidate(r, size, align, div, score, [s.id for s in members], n_task))
    if not cands:
        raise TasaError("no candidate mixture could be built from the pools")
    chosen = max(cands, key=lambda c: (c.score, -c.task_ratio))
    return Mixture(cfg.beta, cands, chosen)


def mixture_imatrix(st: GradStats, members: list[str], name: str = "tasa-mixture") -> ImatrixStats:
    im = ImatrixStats(datasets=[name], chunk_count=len(members), chunk_size=0)
    for sid in members:
        for n, v in st.acts[sid].items():
            im.add(n, v, st.tokens[sid])
    return im


# ---------------------------------------------------------------------------- level 2: sensitivity
def format_menu(src: ModelSource, cfg: AnalysisConfig) -> dict[str, list[str]]:
    """Formats each quantizable tensor can take on the target (shape-compatible, no imatrix needed).

    The default menu of a target that keeps sources (GGUF) also offers ``source`` for every tensor
    a GGUF input stores quantized: keeping its bytes costs zero error against the (dequantized)
    reference, so the allocator must be able to choose it. A menu given with ``--formats`` offers
    ``source`` only where it lists it."""
    spec = formats.get(cfg.target)
    out = {}
    for t in src.quantizable:
        fm = spec.menu(t.shape, cfg.formats)
        if (cfg.formats is None and spec.keeps_source and src.kind == "gguf"
                and t.src_type not in FLOAT_TYPES and SOURCE not in fm):
            spec.resolve(SOURCE, t.src_type)        # a source type we cannot write is a one-line error
            fm.append(SOURCE)
        if not fm:
            raise TasaError(f"no format of the menu fits tensor {t.name} (shape {t.shape})")
        out[t.name] = fm
    return out


#: elements per slice of a tensor in :func:`sensitivities`
SENSITIVITY_CHUNK = 1 << 22


def sensitivities(src: ModelSource, weights, st: GradStats, menu: dict[str, list[str]],
                  cfg: AnalysisConfig, imatrix: ImatrixStats | None, show_progress: bool = True,
                  ranks: distributed.Ranks | None = None) -> SensitivityTable:
    """S_ppl and S_task for every (tensor, format), plus the true bytes of each.

    ``weights(name, r0, r1)`` returns rows ``r0:r1`` of the exact reference tensor (float32, in the
    layout of the gradient statistics), so the errors are those of the file the exporter writes,
    not of a lower-precision copy used for the gradients. With ``cfg.sensitivity_rows < 1``, each
    tensor larger than :data:`SAMPLED_MIN_ROWS` rows is estimated from a systematic sample of
    row stripes (every ggml / MatMulNBits block lies within one row, so rows quantize
    independently and the scaled sample sum is unbiased). With ``ranks``, each rank scores its
    share of the tensors and every rank returns the whole table."""
    spec = formats.get(cfg.target)
    imat = imatrix.means() if imatrix is not None and spec.uses_imatrix else {}
    table = SensitivityTable()
    mine = ranks.mine(list(menu)) if ranks else list(menu)
    with progress_bar("quantization error x Fisher", total=len(mine), enabled=show_progress) as advance:
        for name in mine:
            fmts = menu[name]
            rows, cols = src.tensors[name].shape
            # row slices: the temporaries (float copies, one roundtrip, squared errors) of e.g.
            # a 150k-row embedding stay at a few MB instead of several copies of the tensor
            step = max(1, SENSITIVITY_CHUNK // cols)
            mass = None
            if cfg.sensitivity_rows < 1:
                masses = [m for m in (st.fisher[k].row_mass(name) for k in ("general", "task")) if m is not None]
                mass = sum(masses) if masses else None
            sums = {f: [0.0, 0.0, 0.0] for f in fmts}          # ppl, task, squared error
            w2 = 0.0
            for rows_at, k in score_plan(rows, step, cfg.sensitivity_rows, f"{cfg.seed}\0{name}", mass):
                w = read_rows(weights, name, rows_at)
                w2 += k * float(np.vdot(w, w))
                for f in fmts:
                    if f == SOURCE:      # the source's bytes dequantize to the reference itself
                        continue
                    d2 = (spec.roundtrip(w, f, imat.get(name)) - w) ** 2
                    acc = sums[f]
                    acc[0] += k * st.fisher["general"].weighted_error(name, rows_at, d2, st.n["general"])
                    acc[1] += k * st.fisher["task"].weighted_error(name, rows_at, d2, st.n["task"])
                    acc[2] += k * float(d2.sum(dtype=np.float64))
            wn = math.sqrt(w2) or 1.0
            for f in fmts:
                table.add(name, f, ppl=0.5 * sums[f][0], task=0.5 * sums[f][1],
                          nbytes=spec.tensor_nbytes(f, src.tensors[name]), rel_err=math.sqrt(sums[f][2]) / wn)
            release_freed_memory()
            advance(1)
    if ranks is None:
        return table
    rows: dict[str, tuple] = {}
    for part in distributed.all_gather({n: (table.ppl[n], table.task[n], table.bytes[n], table.rel_err[n])
                                        for n in table.names()}, "sensitivities"):
        rows.update(part)
    whole = SensitivityTable()
    for name in menu:                                   # the one-process order
        whole.ppl[name], whole.task[name], whole.bytes[name], whole.rel_err[name] = rows[name]
    return whole


#: tensors with fewer rows are always scored whole
SAMPLED_MIN_ROWS = 1024
#: a sampled tensor is scored on about this many stripes of rows, each at least MIN_STRIPE rows
SAMPLED_STRIPES = 32
MIN_STRIPE = 64


def score_plan(rows: int, step: int, fraction: float, salt: str,
               mass: np.ndarray | None = None) -> list[tuple[object, float]]:
    """The rows the sensitivity pass scores, as chunks (arrays of row indices) of at most ``step``
    rows, each with the factor its sums are scaled by: consecutive rows (factor 1) when all rows
    are scored, else a stratified sample of about ``fraction`` of the rows:

    * half the budget: the rows with the largest Fisher mass (``mass``: each row's share of the
      general + task row sums), scored exactly (factor 1) -- the mass of an embedding or LM head is
      concentrated on the calibration text's tokens, which a uniform sample mostly misses;
    * the other half: a systematic sample (:func:`sample_rows`) of the remaining rows, scaled by
      remaining / sampled, so the sum stays unbiased."""
    if fraction >= 1 or rows < SAMPLED_MIN_ROWS:
        return [(np.arange(r0, min(rows, r0 + step)), 1.0) for r0 in range(0, rows, step)]
    budget = max(1, int(round(fraction * rows)))
    k = budget // 2 if mass is not None and np.any(mass > 0) else 0
    certain = np.sort(np.argsort(-np.asarray(mass), kind="stable")[:k]) if k else np.empty(0, dtype=np.int64)
    rest = np.setdiff1d(np.arange(rows), certain, assume_unique=True)
    stripes = sample_rows(len(rest), step, min(1.0, max(budget - k, 1) / len(rest)), salt)
    picked = np.concatenate([rest[a:b] for a, b in stripes])
    out: list[tuple[object, float]] = [(certain[i:i + step], 1.0) for i in range(0, len(certain), step)]
    return out + [(picked[i:i + step], len(rest) / len(picked)) for i in range(0, len(picked), step)]


def read_rows(weights, name: str, rows_at) -> np.ndarray:
    """Rows ``rows_at`` (sorted indices) of the reference tensor, read as runs of consecutive rows."""
    idx = np.asarray(rows_at)
    parts = [weights(name, int(idx[i]), int(idx[j - 1]) + 1) for i, j in row_runs(idx)]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def sample_rows(rows: int, step: int, fraction: float, salt: str) -> list[tuple[int, int]]:
    """Row stripes ``[(r0, r1), ...]`` to score: all rows, or about ``fraction`` of them as every
    k-th stripe of equal rows from a seeded offset (systematic sampling)."""
    if not 0 < fraction <= 1:
        raise TasaError(f"sensitivity row fraction must be in (0, 1], got {fraction}")
    if fraction >= 1 or rows < SAMPLED_MIN_ROWS:
        return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]
    # stripes as wide as keeps SAMPLED_STRIPES of them spread over the tensor (each quantize call
    # costs a fixed overhead: 64-row stripes of a 150k-row embedding were slower than all rows)
    stripe = max(MIN_STRIPE, min(step, int(rows * fraction) // SAMPLED_STRIPES))
    n = -(-rows // stripe)
    every = max(1, round(1 / fraction))
    off = int.from_bytes(hashlib.sha256(salt.encode()).digest()[:4], "little") % every
    out = [(i * stripe, min(rows, (i + 1) * stripe)) for i in range(off, n, every)]
    # merge adjacent stripes into slices of at most ``step`` rows
    merged: list[tuple[int, int]] = []
    for r0, r1 in out:
        if merged and merged[-1][1] == r0 and r1 - merged[-1][0] <= step:
            merged[-1] = (merged[-1][0], r1)
        else:
            merged.append((r0, r1))
    return merged


# ---------------------------------------------------------------------------- driver
def build_pools(cfg: AnalysisConfig, task: list[TextSample] | None = None,
                general: list[TextSample] | None = None, chat: ChatTemplate | None = None) -> dict[str, list[TextSample]]:
    """Pools from the calib split only (the eval split is never analysed); task samples rendered
    with the chat template ``chat`` when given (the same rows are picked either way)."""
    general = general if general is not None else load_general("calib")
    task = task if task is not None else load_gsm8k("calib")
    task_ranked = apply_template(chat, pick(task, cfg.n_task + cfg.n_target, f"task{cfg.seed}"))
    if len(task_ranked) < cfg.n_task + cfg.n_target:
        raise TasaError(f"need {cfg.n_task + cfg.n_target} task samples, have {len(task)}")
    return {
        "general": pick(general, cfg.n_general, f"general{cfg.seed}"),
        "task": task_ranked[: cfg.n_task],
        "target": task_ranked[cfg.n_task:],
    }


def samples_record(pools: dict[str, list[TextSample]], chat: ChatTemplate | None) -> dict:
    """What analysis.json records of the calibration text: the template (or none), a digest of every
    pool sample's prompt and target, and the first task sample's prompt (to read)."""
    h = hashlib.sha256()
    for role in sorted(pools):
        for s in pools[role]:
            h.update(f"{role}\0{s.id}\0{s.prompt}\0{s.target}\0".encode("utf-8"))
    first = pools["task"][0] if pools.get("task") else (pools["target"][0] if pools.get("target") else None)
    return {"chat_template": chat.describe() if chat else {"used": False},
            "sha256": "sha256:" + h.hexdigest(),
            "task_prompt_example": first.prompt[-400:] if first else None}


def resolve_checkpoint(src: ModelSource, cfg: AnalysisConfig) -> AnalysisConfig:
    """``cfg`` with ``checkpoint`` on or off for ``src`` (``auto``: :func:`~tasa_edge.footprint.checkpoint_layers`
    for the gradient pass' dtype, which ``cfg.dtype`` must already name)."""
    from .footprint import checkpoint_layers, shapes_from_source

    wb = 2 if cfg.dtype == "bfloat16" else 4
    on = checkpoint_layers(shapes_from_source(src), cfg.max_tokens, wb, cfg.checkpoint)
    return replace(cfg, checkpoint="on" if on else "off")


def analyze(src: ModelSource, out_dir: Path, cfg: AnalysisConfig, *, device: str | None = None,
            lam: float | None = None, task: list[TextSample] | None = None,
            general: list[TextSample] | None = None, show_progress: bool = True,
            ranks: distributed.Ranks | None = None, chat: ChatTemplate | None = None) -> Analysis:
    """The analysis of ``src`` into ``out_dir``; ``chat``: the model's chat template for task samples
    (:func:`tasa_edge.chat.model_template`; None: lm-eval's ``Question:/Answer:`` format). With
    ``ranks`` (:func:`tasa_edge.distributed.init`) data-parallel over the job's ranks, rank 0 writing
    the outputs (the others return the same result, unwritten)."""
    from .torch_model import gguf_params, load_tokenizer, load_torch_model, pick_device, pick_dtype, reference_weights

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    device = distributed.device_of(ranks, device or "auto")
    # the dtype the gradients are taken in is part of the statistics' identity (cache key, report)
    cfg = replace(cfg, dtype=str(pick_dtype(pick_device(device), cfg.dtype)).removeprefix("torch."),
                  chat_template=chat is not None)
    cfg = resolve_checkpoint(src, cfg)
    pools = build_pools(cfg, task, general, chat)
    key = f"{src.fingerprint}/{cfg.key()}"
    if ranks:
        ids = "\0".join(f"{role}:{s.id}" for role, ss in pools.items() for s in ss)
        distributed.agree(ranks, "model, configuration or sample pools", f"{key}\0{ids}")
    tok = load_tokenizer(src)           # tokenized up front, then freed: the tokenizer (~130 MB for a
    encoded = encode_pools(tok, pools, cfg.max_tokens)      # 150k vocabulary) is not held by the gradient pass
    del tok
    release_freed_memory()
    model, _ = load_torch_model(src, device=device, dtype=cfg.dtype, embedding_rows=True, tokenizer=False)
    t_load = time.perf_counter() - t0
    params = gguf_params(model, src)
    stem = f"gradstats-{src.fingerprint.split(':')[1][:12]}-{cfg.key()}"
    cache = out_dir / f"{stem}.safetensors"
    menu = format_menu(src, cfg)   # bad --formats fail before the gradient pass
    if ranks is None:
        st = collect(model, encoded, params, pools, cfg, cache=cache, show_progress=show_progress, key=key)
    else:
        st = _collect_distributed(model, encoded, params, pools, cfg, ranks, cache,
                                  out_dir / f"{stem}.rank{ranks.rank}of{ranks.world}.safetensors", key, show_progress)
    weights = reference_weights(model, src, params)
    del model, params                   # the sensitivity pass reads the reference weights from the file
    gc.collect()
    release_freed_memory()
    t1 = time.perf_counter()
    mixture = mixture_search(st, pools, cfg)
    imatrix = mixture_imatrix(st, mixture.chosen.members)
    imatrix.chunk_size = cfg.max_tokens
    im_path = (out_dir / "imatrix.gguf").resolve()
    if ranks is None or ranks.main:
        imatrix.save(im_path)
    table = sensitivities(src, weights, st, menu, cfg, imatrix, show_progress, ranks)
    t2 = time.perf_counter()
    lam_used = float(mixture.chosen.task_ratio if lam is None else lam)
    peak = _peak_rss_mb() if ranks is None else max(distributed.all_gather(_peak_rss_mb(), "peak memory"))
    res = Analysis(
        model={"fingerprint": src.fingerprint, "arch": src.arch, "name": src.name, "n_params": src.n_params, "source": str(src.path)},
        config={**asdict(cfg), "formats": {k: v for k, v in menu.items()}, "samples": samples_record(pools, chat)},
        mixture=mixture,
        table=table,
        lam=lam_used,
        imatrix=imatrix_ref(im_path) if ranks is None or ranks.main else None,
        timings={"load_s": t_load, "gradients_s": st.seconds, "sensitivity_s": t2 - t1, "total_s": t2 - t0,
                 "n_backward": st.computed, "n_cached": len(st.roles) - st.computed, "peak_rss_mb": peak,
                 **({"ranks": ranks.world} if ranks else {})},
    )
    if ranks is None or ranks.main:
        res.save(out_dir / "analysis.json")
    return res


def _collect_distributed(model, encoded, params, pools, cfg: AnalysisConfig, ranks: distributed.Ranks,
                         cache: Path, shard_cache: Path, key: str, show_progress: bool) -> GradStats:
    """The whole pool's statistics: from the merged cache of an earlier job when every rank has it,
    else each rank's share (resumable through its own shard cache), reduced over the ranks; rank 0
    then writes the merged cache (which a later job of any size, or one process, reuses)."""
    names = list(params)
    wanted = {s.id for ss in pools.values() for s in ss}
    done = load_cache(cache, names, key, cfg)
    complete = done is not None and wanted <= set(done.roles)
    if all(distributed.all_gather(complete, "cache state")):
        done.computed = 0
        return done
    dev = _device_of(model)
    mine = collect(model, encoded, params, pools, cfg, cache=shard_cache, show_progress=show_progress, key=key,
                   ranks=ranks)
    st = reduce_stats(mine, ranks, {n: tuple(p.shape) for n, p in params.items()}, dev)
    if ranks.main:
        save_cache(st, cache, key)
    distributed.barrier("while the merged gradient cache was written")
    return st


def _peak_rss_mb() -> float:
    return peak_rss_bytes() / 2**20
