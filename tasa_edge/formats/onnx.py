"""The ``onnx`` target: onnxruntime's ``com.microsoft::MatMulNBits`` blocks.

Formats are ``int{2,4,8}_b<block>`` (symmetric: the block's largest-magnitude value maps to
``-2^(b-1)``, onnxruntime's rule, stored offset by ``2^(b-1)``), ``uint{2,4,8}_b<block>`` (with a
packed uint8 zero point per block) or ``float``. Blocks run along K (the input dimension, numpy's
last axis, ggml's ne0); MatMulNBits pads the last block of a row, so every block size fits any K.
The blockwise kernels here are the ones the ONNX exporter writes with and the analysis scores.
"""

from __future__ import annotations

import re

import numpy as np

from ..errors import TasaError
from .base import Target

_FORMAT = re.compile(r"^(u?int)(2|4|8)_b(\d+)$")
QUANTIZERS = ("rtn", "ort")


def parse_format(fmt: str) -> tuple[int, int, bool] | None:
    """``int4_b32`` -> (bits=4, block=32, symmetric=True); ``float`` -> None."""
    if fmt == "float":
        return None
    m = _FORMAT.match(str(fmt))
    if not m:
        raise TasaError(f"unknown ONNX format '{fmt}' (expected float or int|uint{{2,4,8}}_b<block>)")
    bits, block = int(m.group(2)), int(m.group(3))
    if block < 16 or block & (block - 1):
        raise TasaError(f"ONNX format '{fmt}': block size must be a power of two >= 16")
    return bits, block, m.group(1) == "int"


class OnnxTarget(Target):
    name = "onnx"
    float_format = "float"
    #: 2-bit RTN blocks (4 levels) are far outside the second-order regime the Fisher estimate
    #: assumes (uniform int2 has KLD > 5 on SmolLM2): ask for them with --formats.
    default_menu = ("int4_b32", "int4_b64", "int4_b128", "int8_b32", "int8_b128")
    reference_format = "int4_b32"

    def parse(self, fmt: str) -> str:
        if str(fmt).strip().lower() == "source":
            raise TasaError("'source' (keep the input GGUF's bytes) applies to GGUF plans only: an ONNX export "
                            "re-encodes every weight as MatMulNBits or float")
        parse_format(fmt)
        return str(fmt)

    def nbytes(self, fmt: str, shape: tuple[int, ...]) -> int:
        """Weights + float32 scales (+ packed zero points) of a [N, K] MatMulNBits weight."""
        parsed = parse_format(fmt)
        n, k = (int(shape[0]), int(shape[-1])) if len(shape) > 1 else (1, int(shape[0]))
        if parsed is None:
            return 4 * n * k
        bits, block, sym = parsed
        kb = -(-k // block)
        data = n * kb * (block * bits // 8)
        scales = n * kb * 4
        zp = 0 if sym else n * (-(-kb * bits // 8))
        return data + scales + zp

    def misfit(self, fmt: str, shape: tuple[int, ...]) -> str | None:
        if parse_format(fmt) is not None and len(shape) != 2:
            return f"ONNX MatMulNBits needs a 2-D weight, got shape {tuple(shape)}"
        return None

    def fit(self, fmt: str, shape: tuple[int, ...]) -> str:
        return self.parse(fmt)

    def roundtrip(self, w: np.ndarray, fmt: str, importance: np.ndarray | None = None) -> np.ndarray:
        parsed = parse_format(fmt)
        if parsed is None:
            return np.asarray(w, dtype=np.float32)
        bits, block, sym = parsed
        packed, scales, zp = quantize_blockwise(w, bits, block, sym)
        return dequantize_blockwise(packed, scales, zp, bits, block, np.shape(w)[-1])


def quantize_blockwise(w: np.ndarray, bits: int, block: int, symmetric: bool, quantizer: str = "rtn"):
    """Blockwise quantization of ``w`` [N, K] along K, MatMulNBits layout.

    Returns ``(packed uint8 [N, kb, block*bits/8], scales float32 [N, kb], zero_points)`` where
    ``zero_points`` is None (symmetric: implicit 2^(bits-1)) or uint8 [N, ceil(kb*bits/8)] packed
    low bits first. ``quantizer="rtn"`` reproduces :meth:`OnnxTarget.roundtrip`.
    """
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise TasaError(f"blockwise quantization needs a 2-D weight, got shape {w.shape}")
    if quantizer == "ort":
        return _quantize_ort(w, bits, block, symmetric)
    if quantizer != "rtn":
        raise TasaError(f"unknown quantizer {quantizer!r} (expected one of {QUANTIZERS})")
    n, k = w.shape
    kb = -(-k // block)
    packed = np.empty((n, kb, block * bits // 8), np.uint8)
    scales = np.empty((n, kb), np.float32)
    zps = None if symmetric else np.empty((n, kb), np.uint8)
    step = max(1, (1 << 22) // max(1, kb * block))    # ~16 MiB of float32 per chunk
    for r0 in range(0, n, step):
        x = w[r0:r0 + step]
        x = np.pad(x, ((0, 0), (0, kb * block - k))).reshape(x.shape[0], kb, block)
        if symmetric:
            # onnxruntime's rule: the block's largest-magnitude value maps to -2^(b-1), so all
            # 2^b levels are used (absmax / (2^(b-1)-1) would leave int2 with 3 levels)
            half = 2 ** (bits - 1)
            idx = np.abs(x).argmax(-1)[..., None]
            scale = np.take_along_axis(x, idx, -1) / -half
            scale[scale == 0] = 1.0
            q = np.clip(np.round(x / scale), -half, half - 1) + half
        else:
            qmax = 2 ** bits - 1
            lo = np.minimum(x.min(-1, keepdims=True), 0)
            hi = np.maximum(x.max(-1, keepdims=True), 0)
            scale = (hi - lo) / qmax
            scale[scale == 0] = 1.0
            zp = np.clip(np.round(-lo / scale), 0, qmax)
            q = np.clip(np.round(x / scale) + zp, 0, qmax)
            zps[r0:r0 + step] = zp[..., 0].astype(np.uint8)
        packed[r0:r0 + step] = pack_bits(q.astype(np.uint8), bits)
        scales[r0:r0 + step] = scale[..., 0]
    return packed, scales, (None if zps is None else pack_bits(zps, bits))


def _quantize_ort(w: np.ndarray, bits: int, block: int, symmetric: bool):
    # The C++ blockwise quantizers themselves; onnxruntime.quantization.matmul_nbits_quantizer only
    # re-exports them, and from 1.32 it also imports onnx_ir (not an onnxruntime dependency).
    from onnxruntime.capi import _pybind_state as ort_c

    fn = {2: ort_c.quantize_matmul_2bits, 4: ort_c.quantize_matmul_4bits, 8: ort_c.quantize_matmul_8bits}[bits]
    n, k = w.shape
    kb = -(-k // block)
    wt = np.ascontiguousarray(np.pad(w, ((0, 0), (0, kb * block - k))).T)    # [K_padded, N]
    packed = np.zeros((n, kb, block * bits // 8), np.uint8)
    zp = np.zeros((n, -(-kb * bits // 8)), np.uint8)
    scales = np.zeros((n, kb), np.float32)
    fn(packed, wt, scales, zp, block, n, kb * block, symmetric)
    return packed, scales, (None if symmetric else zp)


def pack_bits(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack uint8 codes (< 2^bits) along the last axis, low bits first; pads to whole bytes."""
    if bits == 8:
        return np.ascontiguousarray(q, dtype=np.uint8)
    per = 8 // bits
    pad = (-q.shape[-1]) % per
    if pad:
        q = np.pad(q, [(0, 0)] * (q.ndim - 1) + [(0, pad)])
    q = q.reshape(*q.shape[:-1], -1, per).astype(np.uint8)
    out = q[..., 0].copy()
    for j in range(1, per):
        out |= q[..., j] << (bits * j)
    return out


def unpack_bits(p: np.ndarray, bits: int, count: int) -> np.ndarray:
    if bits == 8:
        return p[..., :count]
    per = 8 // bits
    parts = [(p >> (bits * j)) & (2 ** bits - 1) for j in range(per)]
    return np.stack(parts, -1).reshape(*p.shape[:-1], -1)[..., :count]


def dequantize_blockwise(packed, scales, zero_points, bits: int, block: int, k: int) -> np.ndarray:
    """Inverse of :func:`quantize_blockwise` (what MatMulNBits computes with): float32 [N, K]."""
    n, kb, _ = packed.shape
    q = unpack_bits(packed, bits, block).astype(np.float32)               # [N, kb, block]
    if zero_points is None:
        zp = np.full((n, kb, 1), 2 ** (bits - 1), np.float32)
    else:
        zp = unpack_bits(zero_points, bits, kb).astype(np.float32)[..., None]
    return ((q - zp) * scales[..., None]).reshape(n, kb * block)[:, :k]
