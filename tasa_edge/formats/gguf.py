"""The ``gguf`` target: ggml tensor types as llama.cpp writes and runs them.

Quantization and dequantization go through llama.cpp's own kernels (:mod:`.ggml`); the byte
sizes are ggml's block sizes; K- and IQ-quants need rows (ne0) divisible by 256, and a uniform
plan falls back to the type llama.cpp's quantizer would pick for such rows.
"""

from __future__ import annotations

import numpy as np

from . import ggml
from .base import Target


class GgufTarget(Target):
    name = "gguf"
    float_format = "F32"
    #: formats llama.cpp runs fast on CPU and that need no importance matrix
    default_menu = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "Q5_0", "IQ4_NL", "IQ4_XS")
    reference_format = "Q4_0"
    uses_imatrix = True

    def parse(self, fmt: str) -> str:
        return ggml.qtype(fmt).name

    def nbytes(self, fmt: str, shape: tuple[int, ...]) -> int:
        return ggml.nbytes(fmt, shape)

    def misfit(self, fmt: str, shape: tuple[int, ...]) -> str | None:
        t = self.parse(fmt)
        blk = ggml.block_size(t)
        ne0 = int(shape[-1])
        if ne0 % blk:
            return (f"type {t} needs rows divisible by {blk}, but ne0 = {ne0} "
                    f"(llama.cpp would use {ggml.fit_type(t, ne0)})")
        return None

    def fit(self, fmt: str, shape: tuple[int, ...]) -> str:
        return ggml.fit_type(fmt, int(shape[-1]))

    def roundtrip(self, w: np.ndarray, fmt: str, importance: np.ndarray | None = None) -> np.ndarray:
        return ggml.roundtrip(w, fmt, importance)

    def requires_imatrix(self, fmt: str) -> bool:
        return ggml.requires_imatrix(fmt)
