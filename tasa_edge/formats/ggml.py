"""llama.cpp's own quantization kernels, called through ctypes.

The ``libggml-base`` shared library shipped inside llama-cpp-python exports
``ggml_quantize_chunk`` for every ggml type (with an optional importance matrix). We never
re-implement a quant format: quantize goes through ggml, dequantize through gguf-py (which
mirrors ggml's reference dequantizers for every type).
"""

from __future__ import annotations

import ctypes
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as _gguf_dequantize

from ..errors import TasaError
from .quantguard import check_quant_inputs

QT = GGMLQuantizationType

#: Float "formats" a plan may keep a tensor in.
FLOAT_TYPES = ("F32", "F16", "BF16")

#: Quantized ggml types the GGUF target offers (all run on llama.cpp's CPU backend).
QUANT_TYPES = (
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0",
    "Q4_0", "Q4_1", "Q5_0", "Q5_1",
    "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS", "IQ4_NL",
)

GGUF_TYPES = QUANT_TYPES + FLOAT_TYPES

#: Types that ggml itself refuses to quantize without an importance matrix.
IMATRIX_REQUIRED = frozenset({"IQ2_XXS", "IQ2_XS", "IQ1_S"})
#: Types llama-quantize also refuses without an imatrix (quality would collapse).
IMATRIX_STRONGLY_ADVISED = frozenset({"IQ3_XXS", "IQ2_S", "IQ1_M"})

#: llama.cpp's fallback when a tensor's row length (ne0) is not a multiple of the type's block.
SHAPE_FALLBACK = {
    "Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
    "IQ1_S": "IQ4_NL", "IQ1_M": "IQ4_NL", "IQ2_XXS": "IQ4_NL", "IQ2_XS": "IQ4_NL",
    "IQ2_S": "IQ4_NL", "IQ3_XXS": "IQ4_NL", "IQ3_S": "IQ4_NL", "IQ4_XS": "IQ4_NL",
}


def qtype(name: str) -> GGMLQuantizationType:
    """Parse a ggml type name (case-insensitive, e.g. ``q4_k``) into the gguf-py enum."""
    key = str(name).strip().upper()
    if key not in GGUF_TYPES:
        raise TasaError(f"unknown GGUF tensor type '{name}' (known: {', '.join(GGUF_TYPES)})")
    return QT[key]


def block_size(name: str) -> int:
    return GGML_QUANT_SIZES[qtype(name)][0]


def bits_per_weight(name: str) -> float:
    blck, nbytes = GGML_QUANT_SIZES[qtype(name)]
    return 8.0 * nbytes / blck


def fits(name: str, ne0: int) -> bool:
    """Whether rows of length ``ne0`` can be stored in type ``name``."""
    return ne0 % block_size(name) == 0


def fit_type(name: str, ne0: int) -> str:
    """The type llama.cpp would actually write for ``name`` on rows of length ``ne0``."""
    name = qtype(name).name
    if fits(name, ne0):
        return name
    fb = SHAPE_FALLBACK.get(name)
    if fb is not None and fits(fb, ne0):
        return fb
    return "F16"


def nbytes(name: str, shape: tuple[int, ...] | list[int]) -> int:
    """Bytes a tensor of numpy ``shape`` (ne0 last) occupies in type ``name``."""
    blck, tsize = GGML_QUANT_SIZES[qtype(name)]
    ne0 = int(shape[-1])
    if ne0 % blck:
        raise TasaError(f"row length {ne0} is not a multiple of {name}'s block size {blck}")
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    return rows * (ne0 // blck) * tsize


# --------------------------------------------------------------------------- ctypes binding


def _lib_dir() -> Path:
    try:
        import llama_cpp  # noqa: F401  (import side effect: loads libllama and libggml)
    except Exception as exc:  # pragma: no cover - environment problem
        raise TasaError(f"llama-cpp-python is required for quantization: {exc}") from exc
    return Path(llama_cpp.__file__).parent / "lib"


@functools.lru_cache(maxsize=1)
def libggml() -> ctypes.CDLL:
    """Load ``libggml-base`` from llama-cpp-python's package (ctypes releases the GIL in calls)."""
    lib_dir = _lib_dir()
    candidates = sorted(lib_dir.glob("libggml-base.*")) + sorted(lib_dir.glob("ggml-base.*"))
    if not candidates:
        raise TasaError(f"libggml-base not found in {lib_dir}; reinstall llama-cpp-python")
    lib = ctypes.CDLL(str(candidates[0]), mode=getattr(os, "RTLD_GLOBAL", 0))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
    ]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_validate_row_data.restype = ctypes.c_bool
    lib.ggml_validate_row_data.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
    return lib


def requires_imatrix(name: str) -> bool:
    t = qtype(name)
    if t.name in FLOAT_TYPES:
        return False
    return bool(libggml().ggml_quantize_requires_imatrix(int(t)))


def _default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def quantize(
    data: np.ndarray,
    name: str,
    imatrix: np.ndarray | None = None,
    nthreads: int | None = None,
) -> np.ndarray:
    """Quantize a float tensor (numpy shape ``[..., ne0]``) to ggml type ``name``.

    Returns the raw bytes as a uint8 array of shape ``[..., ne0 // blck * type_size]`` (the
    layout gguf-py's writer expects for quantized tensors), or a float array for F32/F16/BF16.
    ``imatrix`` is llama.cpp's importance matrix for this tensor: one non-negative weight per
    input column (length ne0).
    """
    t = qtype(name)
    src = np.ascontiguousarray(data, dtype=np.float32)
    check_quant_inputs(src, t.name, imatrix)
    if t.name == "F32":
        return src
    if t.name == "F16":
        return src.astype(np.float16)
    shape = src.shape
    ne0 = int(shape[-1])
    nrows = int(src.size // ne0)
    blck, tsize = GGML_QUANT_SIZES[t]
    if ne0 % blck:
        raise TasaError(f"row length {ne0} is not a multiple of {t.name}'s block size {blck}")
    imat_ptr = None
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
        if imatrix.size != ne0:
            raise TasaError(f"imatrix has {imatrix.size} values but the tensor has {ne0} columns")
        imat_ptr = imatrix.ctypes.data
    elif requires_imatrix(t.name):
        raise TasaError(f"type {t.name} requires an importance matrix (pass --imatrix)")
    lib = libggml()
    row_bytes = ne0 // blck * tsize
    assert lib.ggml_row_size(int(t), ne0) == row_bytes
    out = np.empty((nrows, row_bytes), dtype=np.uint8)
    lib.ggml_quantize_init(int(t))

    nthreads = nthreads or _default_threads()
    # llama.cpp quantizes in chunks of rows; chunks are independent, so threads give the same
    # bytes as one call.
    chunk = max(1, min(nrows, max(32, nrows // (4 * nthreads) or 1)))
    starts = list(range(0, nrows, chunk))

    def work(r0: int) -> int:
        n = min(chunk, nrows - r0)
        return lib.ggml_quantize_chunk(
            int(t), src.ctypes.data, out.ctypes.data, r0 * ne0, n, ne0, imat_ptr
        )

    if nthreads > 1 and len(starts) > 1:
        with ThreadPoolExecutor(max_workers=nthreads) as pool:
            written = sum(pool.map(work, starts))
    else:
        written = sum(work(s) for s in starts)
    if written != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {out.nbytes}")
    return out.reshape(*shape[:-1], row_bytes)


def _dequant_fn(name: str):
    fn = getattr(libggml(), f"dequantize_row_{name.lower() if not name.endswith('_K') else name[:-2].lower() + '_K'}", None)
    if fn is not None:
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return fn


def dequantize(raw: np.ndarray, name: str, nthreads: int | None = None) -> np.ndarray:
    """Dequantize raw ggml bytes (rows of blocks, as stored in GGUF) to float32 with ggml's own
    ``dequantize_row_*`` (gguf-py's numpy dequantizers where ggml exports none)."""
    t = qtype(name)
    if t.name == "F32":
        return np.asarray(raw, dtype=np.float32)
    if t.name == "F16":
        return np.asarray(raw).astype(np.float32)
    fn = _dequant_fn(t.name) if t.name in QUANT_TYPES else None
    if fn is None:
        return np.asarray(_gguf_dequantize(np.asarray(raw), t), dtype=np.float32)
    src = np.ascontiguousarray(raw, dtype=np.uint8)
    blck, tsize = GGML_QUANT_SIZES[t]
    row_bytes = src.shape[-1]
    ne0 = row_bytes // tsize * blck
    nrows = src.size // row_bytes
    out = np.empty((nrows, ne0), dtype=np.float32)
    nthreads = nthreads or _default_threads()
    chunk = max(1, -(-nrows // nthreads))

    def work(r0: int) -> None:
        n = min(chunk, nrows - r0)
        fn(src.ctypes.data + r0 * row_bytes, out.ctypes.data + r0 * ne0 * 4, n * ne0)

    if nthreads > 1 and nrows > chunk:
        with ThreadPoolExecutor(max_workers=nthreads) as pool:
            list(pool.map(work, range(0, nrows, chunk)))
    else:
        work(0) if nrows <= chunk else [work(r) for r in range(0, nrows, chunk)]
    return out.reshape(*src.shape[:-1], ne0)


def roundtrip(data: np.ndarray, name: str, imatrix: np.ndarray | None = None, nthreads: int | None = None) -> np.ndarray:
    """Quantize with ggml then dequantize: the exact weights llama.cpp will compute with."""
    return dequantize(quantize(data, name, imatrix, nthreads), name).reshape(np.shape(data))
