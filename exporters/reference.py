"""The float reference: the one builder of the F32 GGUF every quality number is measured against.

The CLI (``tasa-edge baseline``), the evaluation behind the README's numbers
(:mod:`tasa_edge.evaluate`, ``benchmarks/run.py``), the device harness (``tasa-edge bench``) and the
tests all take their reference from :func:`reference_gguf`: the model dequantized to F32 by our GGUF
exporter, written once into :func:`tasa_edge.zoo.cache_dir` under one cache key and reused.
A GGUF whose tensors are all F32 already is its own reference (nothing is written).

Cache key: ``ref-<structural fingerprint>-<source id>-f32.gguf``.  The fingerprint alone (architecture,
tensor names and shapes) is the same for every fine-tune or quantization of one architecture, so the
key also hashes the source's resolved path and its files' sizes and modification times: a different
file never reuses another file's reference, and a rewritten file gets a fresh one.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from tasa_edge.model import ModelSource
from tasa_edge.zoo import cache_dir, resolve_model


def is_f32(src: ModelSource) -> bool:
    """A GGUF whose every tensor is F32: already a float reference."""
    return src.kind == "gguf" and all(t.src_type == "F32" for t in src.tensors.values())


def source_id(src: ModelSource) -> str:
    """Identity of the weights behind ``src``: resolved path, then name, size and mtime of its files."""
    p = Path(src.path).resolve()
    files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.is_file())
    h = hashlib.sha256(str(p).encode())
    for f in files:
        st = f.stat()
        h.update(f"|{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def reference_path(src: ModelSource) -> Path:
    """Where the reference of ``src`` is cached (whether or not it exists yet)."""
    return cache_dir() / f"ref-{src.fingerprint.split(':')[1]}-{source_id(src)}-f32.gguf"


def reference_gguf(src: ModelSource | str | os.PathLike, show_progress: bool = False) -> Path:
    """The F32 reference GGUF of ``src`` (a ModelSource, a packaged model name, a GGUF or an HF
    directory): ``src`` itself when it is all-F32, else exported once into the cache (atomic)."""
    if not isinstance(src, ModelSource):
        src = ModelSource.open(resolve_model(src))
    if is_f32(src):
        return Path(src.path)
    ref = reference_path(src)
    if not ref.exists():
        from tasa_edge.plan import BitPlan

        from .gguf_export import export_gguf

        export_gguf(src, BitPlan.uniform(src, "F32"), ref, show_progress=show_progress)  # atomic_path inside
    return ref
