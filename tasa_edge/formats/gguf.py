"""The ``gguf`` target: ggml tensor types as llama.cpp writes and runs them.

Quantization and dequantization go through llama.cpp's own kernels (:mod:`.ggml`); the byte
sizes are ggml's block sizes; K- and IQ-quants need rows (ne0) divisible by 256, and a uniform
plan falls back to the type llama.cpp's quantizer would pick for such rows.

``source`` (:data:`.base.SOURCE`) keeps a tensor's bytes as the input GGUF stores them: it fits
every shape (the file already holds it), needs no importance matrix, and resolves to the source
tensor's own ggml type (an F32 / F16 / BF16 source tensor: just that type).
"""

from __future__ import annotations

import numpy as np

from ..errors import TasaError
from . import ggml
from .base import SOURCE, Target


class GgufTarget(Target):
    name = "gguf"
    float_format = "F32"
    #: formats llama.cpp runs fast on CPU and that need no importance matrix
    default_menu = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "Q5_0", "IQ4_NL", "IQ4_XS")
    reference_format = "Q4_0"
    uses_imatrix = True
    keeps_source = True

    def parse(self, fmt: str) -> str:
        if str(fmt).strip().lower() == SOURCE:
            return SOURCE
        return ggml.qtype(fmt).name

    def resolve(self, fmt: str, src_type: str) -> str:
        if fmt != SOURCE:
            return fmt
        try:
            return ggml.qtype(src_type).name
        except TasaError:
            raise TasaError(f"'source' keeps a tensor of type {src_type}, which tasa-edge cannot size or "
                            "write; choose a type for it") from None

    def nbytes(self, fmt: str, shape: tuple[int, ...]) -> int:
        if fmt == SOURCE:
            raise TasaError("internal: the bytes of 'source' depend on the source tensor (Target.tensor_nbytes)")
        return ggml.nbytes(fmt, shape)

    def misfit(self, fmt: str, shape: tuple[int, ...]) -> str | None:
        t = self.parse(fmt)
        if t == SOURCE:
            return None         # the source file already stores the tensor in its type
        blk = ggml.block_size(t)
        ne0 = int(shape[-1])
        if ne0 % blk:
            return (f"type {t} needs rows divisible by {blk}, but ne0 = {ne0} "
                    f"(llama.cpp would use {ggml.fit_type(t, ne0)})")
        return None

    def fit(self, fmt: str, shape: tuple[int, ...]) -> str:
        if self.parse(fmt) == SOURCE:
            return SOURCE
        return ggml.fit_type(fmt, int(shape[-1]))

    def roundtrip(self, w: np.ndarray, fmt: str, importance: np.ndarray | None = None) -> np.ndarray:
        if fmt == SOURCE:
            return np.array(w, dtype=np.float32, copy=True)   # w is the dequantized source: kept exactly
        return ggml.roundtrip(w, fmt, importance)

    def requires_imatrix(self, fmt: str) -> bool:
        return fmt != SOURCE and ggml.requires_imatrix(fmt)
