"""What a quantization target is: the contract every entry of the format registry fulfils.

A *target* is a file format an exporter writes (``gguf`` for llama.cpp, ``onnx`` for onnxruntime's
MatMulNBits). It owns everything the rest of tasa-edge needs to know about its formats: the
names it accepts, the bytes a tensor takes, which shapes fit, the default analysis menu, the
reference format the sensitivities are normalised at, and the exact quantize->dequantize
roundtrip the exporter will apply (so the analysis scores the error the file will have).
Core, planner and exporters ask the target; none of them branches on its name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

from ..errors import TasaError

#: The plan value "keep this tensor's bytes as the source file stores them" (no re-quantization).
#: Its error against the reference (the dequantized source) is zero; its bytes are the source
#: tensor's. Only targets with :attr:`Target.keeps_source` accept it (GGUF); it is resolved to the
#: source tensor's own type by :meth:`Target.resolve` wherever bytes or a real type are needed.
SOURCE = "source"


def n_elements(shape) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


class Target(ABC):
    #: registry key, also the plan's ``target`` field
    name: ClassVar[str]
    #: format of tensors outside the allocation (norms, 1-D): they stay float
    float_format: ClassVar[str]
    #: the analysis menu when the user gives none
    default_menu: ClassVar[tuple[str, ...]]
    #: the format every tensor's sensitivity is normalised at (see :meth:`reference_of`)
    reference_format: ClassVar[str]
    #: whether the roundtrip (and the exporter) use llama.cpp-style importance matrices
    uses_imatrix: ClassVar[bool] = False
    #: whether plans may say :data:`SOURCE` (the exporter copies the source tensor's bytes)
    keeps_source: ClassVar[bool] = False

    @abstractmethod
    def parse(self, fmt: str) -> str:
        """The canonical name of ``fmt`` (``q4_k`` -> ``Q4_K``); a one-line TasaError if unknown."""

    @abstractmethod
    def nbytes(self, fmt: str, shape: tuple[int, ...]) -> int:
        """Bytes a tensor of numpy ``shape`` (input dimension last) takes in ``fmt`` in the file."""

    @abstractmethod
    def misfit(self, fmt: str, shape: tuple[int, ...]) -> str | None:
        """None if ``fmt`` can store a tensor of ``shape``, else the reason (one phrase)."""

    @abstractmethod
    def fit(self, fmt: str, shape: tuple[int, ...]) -> str:
        """The format a uniform ``fmt`` plan gives this shape (the runtime's own fallback rule)."""

    @abstractmethod
    def roundtrip(self, w: np.ndarray, fmt: str, importance: np.ndarray | None = None) -> np.ndarray:
        """Quantize then dequantize ``w`` exactly as the exporter writes it (float32, same shape)."""

    def requires_imatrix(self, fmt: str) -> bool:
        return False

    def resolve(self, fmt: str, src_type: str) -> str:
        """The real format of plan value ``fmt`` for a tensor whose source type is ``src_type``:
        ``fmt`` itself, or for :data:`SOURCE` the source's type."""
        return fmt

    # ------------------------------------------------------------------ derived
    def tensor_nbytes(self, fmt: str, info) -> int:
        """Bytes of tensor ``info`` (a :class:`tasa_edge.model.TensorInfo`) in plan value ``fmt``
        (:data:`SOURCE` included)."""
        return self.nbytes(self.resolve(fmt, info.src_type) if fmt == SOURCE else fmt, info.shape)

    def fits(self, fmt: str, shape: tuple[int, ...]) -> bool:
        return self.misfit(fmt, shape) is None

    def bits(self, fmt: str, shape: tuple[int, ...]) -> float:
        """Bits per weight of ``fmt`` on ``shape`` (scales and zero points included)."""
        return 8.0 * self.nbytes(fmt, shape) / max(1, n_elements(shape))

    def menu(self, shape: tuple[int, ...], formats: tuple[str, ...] | None = None) -> list[str]:
        """The formats of ``formats`` (default: :attr:`default_menu`) that fit ``shape`` and
        need no importance matrix to be written."""
        fm = [self.parse(f) for f in (formats or self.default_menu)]
        return [f for f in fm if self.fits(f, shape) and not self.requires_imatrix(f)]

    def reference_of(self, options: dict[str, int]) -> str:
        """The normalisation format among a tensor's ``options`` (format -> bytes): the
        reference format where the tensor can take it, else its cheapest option. :data:`SOURCE`
        (zero error by construction) is the reference only when it is the tensor's one option: a
        tensor normalised at zero loss would weigh nothing in the aggregate."""
        if self.reference_format in options:
            return self.reference_format
        if not options:
            raise TasaError("a tensor has no format options")
        pool = {f: b for f, b in options.items() if f != SOURCE} or options
        return min(pool, key=lambda f: (pool[f], f))
