"""The torch view of a :class:`~tasa_edge.model.ModelSource` (transformers), for analysis.

GGUF sources are loaded with transformers' ``gguf_file=`` support (gguf-py dequantizes every
type, so the torch weights are exactly the dequantized reference) and cached once as a
safetensors directory keyed by the model fingerprint. Parameters are addressed by GGUF name
through :meth:`ModelSource.gguf_name`, the same mapping the exporters use.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

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


def load_torch_model(src: ModelSource, device: str | None = None, dtype: str | torch.dtype | None = "auto"):
    """(model, tokenizer) for analysis: weights in :func:`pick_dtype`'s dtype, on CUDA with
    device_map="auto" (layers spread over the GPUs, then the host)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = pick_device(device)
    d = hf_dir_for(src)
    kwargs = {}
    dtype = pick_dtype(dev, dtype)
    if dev.type == "cuda":
        kwargs["device_map"] = "auto"
    model = AutoModelForCausalLM.from_pretrained(d, dtype=dtype, **kwargs)
    if dev.type != "cuda":
        model.to(dev)
    model.eval()
    tok = AutoTokenizer.from_pretrained(d)
    return model, tok


def reference_weights(model, src: ModelSource, params: dict[str, torch.nn.Parameter]):
    """``read(name, r0, r1)``: rows ``r0:r1`` of tensor ``name`` (GGUF name) of the exact reference
    model as float32, in the layout of ``model``'s parameter (HF layout), streamed from the
    safetensors files of :func:`hf_dir_for` -- not from the (possibly bf16) weights in memory."""
    from safetensors import safe_open

    d = hf_dir_for(src, show_progress=False)
    where: dict[str, Path] = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(f, framework="pt") as fh:
            where.update({k: f for k in fh.keys()})
    key: dict[str, str] = {}
    by_id = {id(p): g for g, p in params.items()}
    for hf_name, p in model.named_parameters(remove_duplicate=False):
        g = by_id.get(id(p))
        if g is not None and hf_name in where:
            key.setdefault(g, hf_name)
    missing = [g for g in params if g not in key]
    if missing:
        raise TasaError(f"{d}: no stored weights for {len(missing)} tensor(s), e.g. {missing[0]}")
    handles: dict[Path, object] = {}

    def read(name: str, r0: int, r1: int):
        f = where[key[name]]
        if f not in handles:
            handles[f] = safe_open(f, framework="pt")
        return handles[f].get_slice(key[name])[r0:r1].float().numpy()

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
