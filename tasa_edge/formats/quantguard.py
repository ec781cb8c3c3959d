"""Inputs ggml's quantizers accept without aborting the process.

ggml's grid-based IQ quantizers (IQ1/IQ2/IQ3) ``GGML_ABORT`` ("point not on grid",
``grid_index >= 0``) when an importance value is negative or not finite, or when weights and
importances are so large that their products overflow float32. :func:`check_quant_inputs` is
called at the top of :func:`tasa_edge.ggml.quantize` so no caller can reach those aborts.
Limits (measured on llama.cpp's kernels, with a wide margin): importance <= 1e20; weights
|x| <= 1e6 for IQ types (real checkpoints stay far below both).
"""

from __future__ import annotations

import numpy as np

from ..errors import TasaError

MAX_IMPORTANCE = 1e20
MAX_ABS_WEIGHT_IQ = 1e6


def check_importance(values, where: str = "imatrix") -> None:
    """Importance values: present, finite, >= 0 and <= MAX_IMPORTANCE."""
    v = np.asarray(values)
    if v.size == 0:
        raise TasaError(f"{where}: no importance values")
    if not np.all(np.isfinite(v)):
        raise TasaError(f"{where}: non-finite importance value(s)")
    if np.any(v < 0):
        raise TasaError(f"{where}: negative importance value(s), e.g. {float(v[v < 0].flat[0]):g}")
    if np.any(v > MAX_IMPORTANCE):
        raise TasaError(f"{where}: importance value(s) above {MAX_IMPORTANCE:g}")


def check_quant_inputs(data: np.ndarray, type_name: str, imatrix=None) -> None:
    """Data finite (and bounded for IQ types); importance per :func:`check_importance`."""
    if type_name in ("F32", "F16", "BF16"):
        return
    if imatrix is not None:
        check_importance(imatrix)
    if data.size and not np.all(np.isfinite(data)):
        raise TasaError(f"cannot quantize to {type_name}: the tensor has non-finite values")
    if type_name.startswith("IQ") and data.size and float(np.max(np.abs(data))) > MAX_ABS_WEIGHT_IQ:
        raise TasaError(f"cannot quantize to {type_name}: weights above {MAX_ABS_WEIGHT_IQ:g} in magnitude")
