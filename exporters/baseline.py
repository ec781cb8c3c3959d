"""llama.cpp's own quantization mixes through ``llama_model_quantize`` (llama-cpp-python).

Every comparison in tasa-edge is against the real llama.cpp: the same library, the same kernels,
the same source file, optionally the same importance matrix.
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass
from pathlib import Path

from tasa_edge.errors import TasaError
from tasa_edge.gguf_check import check_gguf
from tasa_edge.fsutil import atomic_path
from tasa_edge.imatrix import ImatrixStats


@dataclass
class BaselineResult:
    path: Path
    nbytes: int
    tensor_bytes: int
    bpw: float
    seconds: float
    ftype: str


def ftypes() -> dict[str, int]:
    """llama.cpp mix names (``Q4_K_M``) -> llama_ftype values, from llama-cpp-python."""
    import llama_cpp

    return {
        k[len("LLAMA_FTYPE_MOSTLY_"):]: int(getattr(llama_cpp, k))
        for k in dir(llama_cpp)
        if k.startswith("LLAMA_FTYPE_MOSTLY_")
    } | {"F32": int(llama_cpp.LLAMA_FTYPE_ALL_F32)}


def quantize_baseline(
    src: str | Path,
    out: str | Path,
    ftype: str,
    *,
    imatrix: ImatrixStats | None = None,
    pure: bool = False,
    nthreads: int | None = None,
    tensor_types: dict[str, str] | None = None,
) -> BaselineResult:
    """Run ``llama_model_quantize(src -> out)`` with llama.cpp's mix ``ftype`` (atomic)."""
    import llama_cpp

    from tasa_edge.formats import ggml

    table = ftypes()
    key = ftype.upper()
    if key not in table and key + "_M" in table:
        # a bare K-quant type (Q4_K) names the mix whose base type it is; with --pure that is the type itself
        key = key + "_M"
    if key not in table:
        raise TasaError(f"unknown llama.cpp ftype '{ftype}' (known: {', '.join(sorted(table))})")
    src = Path(src)
    if not src.exists():
        raise TasaError(f"model not found: {src}")
    check_gguf(src, "model GGUF")
    out = Path(out)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = table[key]
    params.nthread = int(nthreads or 0)
    params.allow_requantize = True
    params.pure = bool(pure)
    keep = []  # keep ctypes buffers alive during the call
    if imatrix is not None:
        means = imatrix.means()
        arr = (llama_cpp.llama_model_imatrix_data * (len(means) + 1))()
        for i, (name, vals) in enumerate(sorted(means.items())):
            buf = (ctypes.c_float * vals.size).from_buffer_copy(vals.tobytes())
            keep.append(buf)
            arr[i].name = name.encode()
            arr[i].data = ctypes.cast(buf, ctypes.POINTER(ctypes.c_float))
            arr[i].size = vals.size
        arr[len(means)].name = None
        keep.append(arr)
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    if tensor_types:
        import re

        tto = (llama_cpp.llama_model_tensor_override * (len(tensor_types) + 1))()
        for i, (name, t) in enumerate(tensor_types.items()):
            pat = ("^" + re.escape(name) + "$").encode()
            keep.append(pat)
            tto[i].pattern = pat
            tto[i].type = int(ggml.qtype(t))
        tto[len(tensor_types)].pattern = None  # a NULL pattern ends the list
        keep.append(tto)
        params.tt_overrides = ctypes.cast(tto, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    t0 = time.perf_counter()
    from tasa_edge.inspect import inspect_gguf
    from .quantize_child import run_quantize

    with atomic_path(out, suffix=".gguf") as tmp:
        run_quantize(llama_cpp.llama_model_quantize, src, tmp, params, what=f"{src.name} -> {ftype}")  # own process: Ctrl-C / abort safe
        rep = inspect_gguf(tmp)  # the output is checked before it is renamed into place
    seconds = time.perf_counter() - t0
    return BaselineResult(out, out.stat().st_size, rep["bytes"], rep["bpw"], seconds, key)
