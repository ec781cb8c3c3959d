"""The torch view of a :class:`~tasa_edge.model.ModelSource` (transformers), for analysis.

GGUF sources are loaded with transformers' ``gguf_file=`` support (gguf-py dequantizes every
type, so the torch weights are exactly the dequantized reference) and cached once as a
safetensors directory keyed by the model fingerprint. Parameters are addressed by GGUF name
through :meth:`ModelSource.gguf_name`, the same mapping the exporters use.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import torch

from .errors import TasaError
from .model import ModelSource
from .zoo import cache_dir


def pick_device(device: str | None = None) -> torch.device:
    if device and device != "auto":
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise TasaError("--device cuda requested but CUDA is not available")
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def hf_dir_for(src: ModelSource, show_progress: bool = True) -> Path:
    """An HF directory (config, tokenizer, safetensors) for ``src``; GGUF is converted once."""
    if src.kind == "hf":
        return src.path
    target = cache_dir() / "hf" / src.fingerprint.split(":")[1]
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not show_progress:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    d, f = str(src.path.parent), src.path.name
    try:
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    except Exception as exc:
        raise TasaError(f"transformers cannot load {src.path.name} ({src.arch}): {exc}") from exc
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # transformers marks GGUF-loaded models as "quantized" and refuses save_pretrained; the
    # weights are plain dequantized float32, so write them and the config directly.
    from safetensors.torch import save_model

    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config
    for attr in ("quantization_config",):
        if hasattr(cfg, attr):
            delattr(cfg, attr)
    cfg.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    del model
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def cpu_computes_bf16() -> bool:
    """Whether this CPU has native bf16 matrix instructions (AVX512-BF16 / AMX), where oneDNN
    runs bf16 matmuls at least as fast as float32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - torch built without oneDNN
        return False


def pick_dtype(dev: torch.device, dtype: str | torch.dtype | None = "auto") -> torch.dtype:
    """Weights' dtype for the gradient pass: bf16 where the device computes in bf16 (CUDA, CPUs
    with AVX512-BF16/AMX), float32 elsewhere; or the one asked for."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if dev.type == "cuda" or cpu_computes_bf16() else torch.float32
    if dtype not in ("float32", "bfloat16"):
        raise TasaError(f"--dtype must be auto, float32 or bfloat16, got {dtype!r}")
    return getattr(torch, dtype)


def load_torch_model(src: ModelSource, device: str | None = None, dtype: str | torch.dtype | None = "float32",
                     embedding_rows: bool = False, tokenizer: bool = True):
    """(model, tokenizer) for analysis: weights in :func:`pick_dtype`'s dtype, on CUDA with
    device_map="auto" (layers spread over the GPUs, then the host). ``embedding_rows`` (CPU): an
    untied token embedding is not loaded but read row by row as the tokens ask (:class:`RowEmbedding`).
    ``tokenizer=False``: (model, None), for callers that tokenized first (:func:`load_tokenizer`)."""
    from transformers import AutoModelForCausalLM

    dev = pick_device(device)
    d = hf_dir_for(src)
    kwargs = {}
    dtype = pick_dtype(dev, dtype)
    if dev.type == "cpu":
        model = _load_streamed(d, dtype, embedding_rows)
    else:
        if dev.type == "cuda":
            kwargs["device_map"] = "auto"
        model = AutoModelForCausalLM.from_pretrained(d, dtype=dtype, **kwargs)
        if dev.type != "cuda":
            model.to(dev)
        model.eval()
    return model, (load_tokenizer(src) if tokenizer else None)


def load_tokenizer(src: ModelSource):
    """The model's tokenizer (transformers, from the HF directory of :func:`hf_dir_for`)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_dir_for(src))


@contextlib.contextmanager
def layer_checkpointing(model, enabled: bool = True):
    """Activation checkpointing of ``model``'s decoder layers (transformers'
    ``GradientCheckpointingLayer``s) for the duration of the block, in eval mode and without
    touching the model's class: each layer's forward runs under torch's non-reentrant
    ``checkpoint``, which keeps only the layer's inputs and runs the layer again when the backward
    pass reaches it. Yields a one-element list whose value is non-zero while a layer is being
    recomputed (forward hooks that accumulate statistics must skip those calls), or None when
    nothing is checkpointed (``enabled`` false, or no such layers)."""
    from torch.utils.checkpoint import checkpoint
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)] if enabled else []
    if not layers:
        yield None
        return
    recomputing = [0]

    def wrap(forward):
        def run_checkpointed(*args, **kwargs):
            calls = [0]

            def run(*a, **k):
                calls[0] += 1
                if calls[0] == 1:                 # the forward pass itself
                    return forward(*a, **k)
                recomputing[0] += 1                # the backward pass recomputing the layer
                try:
                    return forward(*a, **k)
                finally:
                    recomputing[0] -= 1

            return checkpoint(run, *args, use_reentrant=False, **kwargs)

        return run_checkpointed

    for m in layers:
        m.forward = wrap(m.forward)
    try:
        yield recomputing
    finally:
        for m in layers:
            del m.forward                          # the class's forward again


def row_runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """Runs of consecutive values in sorted, distinct row indices, as position ranges ``[i, j)``:
    each run is one contiguous read."""
    rows = np.asarray(rows)
    if not len(rows):
        return []
    cuts = (np.flatnonzero(np.diff(rows) != 1) + 1).tolist()
    return list(zip([0, *cuts], [*cuts, len(rows)]))


class SafetensorsRows:
    """Row slices of the tensors of a safetensors directory, read with plain file reads (no
    mmap: a streamed tensor costs its rows' memory only, and no file pages stay mapped)."""

    _DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}

    def __init__(self, d: Path):
        self.entries: dict[str, tuple[Path, int, str, tuple[int, ...]]] = {}
        for f in sorted(Path(d).glob("*.safetensors")):
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            for k, v in header.items():
                if k != "__metadata__":
                    self.entries[k] = (f, 8 + n + int(v["data_offsets"][0]), v["dtype"], tuple(int(s) for s in v["shape"]))

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key][3]

    def read_index(self, key: str, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (sorted, distinct indices of the first axis) of a 2-D tensor as float32,
        read with one open file as runs of consecutive rows."""
        f, off, dt, shape = self.entries[key]
        if dt not in self._DTYPES or len(shape) != 2:
            raise TasaError(f"{f.name}: tensor {key} is not a 2-D F32, F16 or BF16 matrix")
        item, row = self._DTYPES[dt], shape[1]
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), row), dtype=np.float32)
        with open(f, "rb") as fh:
            for i, j in row_runs(rows):
                fh.seek(off + int(rows[i]) * row * item.itemsize)
                a = np.fromfile(fh, dtype=item, count=(j - i) * row)
                if dt == "BF16":
                    a = (a.astype(np.uint32) << 16).view(np.float32)
                out[i:j] = a.reshape(j - i, row)
        return out

    def read(self, key: str, r0: int = 0, r1: int | None = None) -> np.ndarray:
        """Rows ``r0:r1`` (first axis) of tensor ``key`` as float32."""
        f, off, dt, shape = self.entries[key]
        if dt not in self._DTYPES:
            raise TasaError(f"{f.name}: tensor {key} has dtype {dt}; expected F32, F16 or BF16")
        item = self._DTYPES[dt]
        row = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        r1 = shape[0] if r1 is None else min(r1, shape[0]) if shape else 1
        count = (r1 - r0) * row if shape else 1
        with open(f, "rb") as fh:
            fh.seek(off + r0 * row * item.itemsize)
            a = np.fromfile(fh, dtype=item, count=count)
        if dt == "BF16":
            a = (a.astype(np.uint32) << 16).view(np.float32)
        return a.astype(np.float32, copy=False).reshape((r1 - r0, *shape[1:]) if shape else ())


class RowEmbedding(torch.nn.Module):
    """A token embedding that is not held in memory: each forward reads the rows of its tokens from
    the safetensors file (float32 there, cast to the model's dtype) -- the same values a loaded
    embedding gives. ``weight`` is a shape-only (meta) parameter standing for the tensor; when it
    requires grad, the rows get a gradient and ``on_grad(rows, grad)`` receives it (the distinct
    row indices and their summed float gradient: the sparse gradient of the whole tensor). An
    untied 150k x 1.5k embedding is 0.47 GB in bf16 that the gradient pass never needs whole."""

    def __init__(self, store: SafetensorsRows, key: str, dtype: torch.dtype, padding_idx=None):
        super().__init__()
        shape = store.shape(key)
        self.weight = torch.nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"), requires_grad=False)
        self.store, self.key, self.padding_idx = store, key, padding_idx
        self.num_embeddings, self.embedding_dim = shape
        self.on_grad = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        u, inv = torch.unique(ids, sorted=True, return_inverse=True)
        rows = torch.from_numpy(self.store.read_index(self.key, u.cpu().numpy())).to(self.weight.dtype)
        if self.weight.requires_grad and torch.is_grad_enabled():
            rows.requires_grad_(True)

            def hook(t, u=u):
                if self.on_grad is not None:
                    self.on_grad(u, t.grad.float())
                t.grad = None

            rows.register_post_accumulate_grad_hook(hook)
        return torch.nn.functional.embedding(inv, rows)


def _load_streamed(d: Path, dtype: torch.dtype, embedding_rows: bool = False):
    """The model built empty (accelerate's ``init_empty_weights``) and filled tensor by tensor from
    the safetensors files, cast on the way: peak memory is the model in ``dtype`` plus one float32
    tensor, not a float32 copy of the whole model (what ``from_pretrained`` holds while casting).
    ``embedding_rows``: an untied plain ``nn.Embedding`` becomes a :class:`RowEmbedding`."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(d)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    store = SafetensorsRows(d)
    skip = None
    emb = model.get_input_embeddings()
    if embedding_rows and type(emb) is torch.nn.Embedding and not getattr(cfg, "tie_word_embeddings", False):
        key = next((n for n, p in model.named_parameters(remove_duplicate=False) if p is emb.weight), None)
        if key in store:
            model.set_input_embeddings(RowEmbedding(store, key, dtype, emb.padding_idx))
            skip = key
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    for key in store.entries:
        if key in names and key != skip:
            set_module_tensor_to_device(model, key, "cpu", value=torch.from_numpy(store.read(key)), dtype=dtype)
    inp, outp = model.get_input_embeddings(), model.get_output_embeddings()
    if getattr(cfg, "tie_word_embeddings", False) and outp is not None:
        if inp.weight.device.type == "meta":           # stored once, under the output name
            inp.weight = outp.weight
        model.tie_weights()
    empty = [n for n, p in model.named_parameters() if p.device.type == "meta" and n != skip]
    if empty:
        raise TasaError(f"{d}: no stored weights for {len(empty)} parameter(s), e.g. {empty[0]}")
    model.eval()
    return model


def reference_weights(model, src: ModelSource, params: dict[str, torch.nn.Parameter]):
    """``read(name, r0, r1)``: rows ``r0:r1`` of tensor ``name`` (GGUF name) of the exact reference
    model as float32, in the layout of ``model``'s parameter (HF layout), streamed from the
    safetensors files of :func:`hf_dir_for` -- not from the (possibly bf16) weights in memory."""
    d = hf_dir_for(src, show_progress=False)
    store = SafetensorsRows(d)
    key: dict[str, str] = {}
    by_id = {id(p): g for g, p in params.items()}
    for hf_name, p in model.named_parameters(remove_duplicate=False):
        g = by_id.get(id(p))
        if g is not None and hf_name in store:
            key.setdefault(g, hf_name)
    missing = [g for g in params if g not in key]
    if missing:
        raise TasaError(f"{d}: no stored weights for {len(missing)} tensor(s), e.g. {missing[0]}")

    def read(name: str, r0: int, r1: int) -> np.ndarray:
        return store.read(key[name], r0, r1)

    return read


def gguf_params(model, src: ModelSource) -> dict[str, torch.nn.Parameter]:
    """GGUF name -> torch parameter, for every quantizable tensor of ``src``.

    Tied weights (lm_head == embed_tokens) appear once, under the GGUF name the file has."""
    out: dict[str, torch.nn.Parameter] = {}
    seen: set[int] = set()
    for hf_name, p in model.named_parameters(remove_duplicate=False):
        g = src.gguf_name(hf_name)
        if g is None or g not in src.tensors or not src.tensors[g].quantizable:
            continue
        if id(p) in seen and g not in src.tensors:
            continue
        seen.add(id(p))
        if tuple(p.shape) != src.tensors[g].shape:
            raise TasaError(f"shape mismatch for {g}: torch {tuple(p.shape)} vs GGUF {src.tensors[g].shape}")
        out.setdefault(g, p)
    missing = [t.name for t in src.quantizable if t.name not in out]
    if missing:
        raise TasaError(f"torch model lacks {len(missing)} tensor(s) of the GGUF, e.g. {missing[0]}")
    return out
