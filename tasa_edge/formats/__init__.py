"""The format registry: one :class:`~.base.Target` per file format an exporter writes.

``get("gguf")`` / ``get("onnx")`` return the target that owns its menu, reference format, name
parsing, byte sizes, shape fit and quantize->dequantize roundtrip. A new target is one module
with one ``Target`` subclass and one line in :data:`TARGETS`.
"""

from __future__ import annotations

from ..errors import TasaError
from .base import Target
from .gguf import GgufTarget
from .onnx import OnnxTarget

TARGETS: dict[str, Target] = {t.name: t for t in (GgufTarget(), OnnxTarget())}


def get(name: str) -> Target:
    """The registered target ``name``; a one-line error naming the known ones otherwise."""
    t = TARGETS.get(str(name))
    if t is None:
        raise TasaError(f"unknown target {name!r} (known: {', '.join(TARGETS)})")
    return t


__all__ = ["TARGETS", "Target", "get"]
