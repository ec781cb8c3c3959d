"""GGUF exporter: a bit plan -> a mixed-precision GGUF that llama.cpp loads.

Tensors are read one at a time from the source (dequantized to float32), quantized with
llama.cpp's ``ggml_quantize_chunk`` (optionally with an importance matrix), and streamed into a
temporary file that is renamed onto the output at the end. A tensor the plan gives ``source`` is
copied: the source GGUF's bytes, unchanged, in its type (an HF source's float tensor is written in
its own float type). Architecture metadata and the
tokenizer come from the source GGUF (or are written from the HF directory).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasa_edge import __version__
from tasa_edge.formats import ggml
from tasa_edge.formats.base import SOURCE
from tasa_edge.errors import TasaError
from tasa_edge.fsutil import atomic_path
from tasa_edge.imatrix import ImatrixStats
from tasa_edge.model import ModelSource
from tasa_edge.plan import BitPlan, count_formats
from tasa_edge.progress import progress_bar

from .hf_convert import write_hf_metadata

#: Keys the writer sets itself or that would be stale after re-quantization.
_SKIP_KEYS = {
    "general.architecture",
    "general.file_type",
    "general.quantization_version",
}
_SKIP_PREFIXES = ("GGUF.", "quantize.", "tasa_edge.", "split.")

# llama_ftype values (llama.h) for general.file_type: the dominant type of the file.
_FTYPE = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10,
    "Q3_K": 12, "Q4_K": 15, "Q5_K": 17, "Q6_K": 18, "IQ2_XXS": 19, "IQ2_XS": 20, "IQ3_XXS": 23,
    "IQ1_S": 24, "IQ4_NL": 25, "IQ3_S": 26, "IQ2_S": 28, "IQ4_XS": 30, "IQ1_M": 31, "BF16": 32,
}
# Q3_K -> Q3_K_M (12), Q4_K -> Q4_K_M (15), Q5_K -> Q5_K_M (17): the "medium" mix codes.


@dataclass
class ExportResult:
    path: Path
    nbytes: int
    tensor_bytes: int
    bpw: float
    seconds: float
    types: dict[str, int]


def export_gguf(
    src: ModelSource,
    plan: BitPlan,
    out: str | Path,
    *,
    imatrix: ImatrixStats | None = None,
    nthreads: int | None = None,
    show_progress: bool = True,
) -> ExportResult:
    """Write ``src`` quantized per ``plan`` to ``out`` (atomic)."""
    if plan.target != "gguf":
        raise TasaError(f"plan target is '{plan.target}', the GGUF exporter needs a 'gguf' plan")
    imat = imatrix.means() if imatrix is not None else {}
    plan.validate(src, imatrix_names=set(imat))
    import gguf

    out = Path(out)
    t0 = time.perf_counter()
    types = {info.name: _tensor_type(info, plan) for info in src.tensors.values()}
    with atomic_path(out, suffix=".gguf") as tmp:
        w = gguf.GGUFWriter(tmp, arch=src.arch)
        if src.kind == "gguf":
            _copy_metadata(src, w)
        else:
            write_hf_metadata(src, w)
        w.add_file_type(_file_type(types))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_provenance(w, plan, imatrix)

        tensor_bytes = 0
        for info in src.tensors.values():
            t = types[info.name]
            nb = ggml.nbytes(t, info.shape)
            tensor_bytes += nb
            w.add_tensor_info(info.name, info.shape, np.dtype(np.float32), nb, raw_dtype=ggml.qtype(t))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        with progress_bar(f"quantize {out.name}", total=len(src.tensors), enabled=show_progress) as advance:
            for info in src.tensors.values():
                t = types[info.name]
                if src.kind == "gguf" and info.quantizable and plan.tensors.get(info.name) == SOURCE:
                    raw = np.ascontiguousarray(src._gguf_tensor(info.name).data)   # the source bytes, as stored
                    if raw.nbytes != ggml.nbytes(t, info.shape):
                        raise TasaError(f"source tensor {info.name}: {raw.nbytes} bytes, expected "
                                        f"{ggml.nbytes(t, info.shape)} for {t}")
                    w.write_tensor_data(raw)
                    advance(1)
                    continue
                data = src.read(info.name)
                im = imat.get(info.name) if info.quantizable else None
                if im is not None and im.size != info.ne0:
                    raise TasaError(f"imatrix for {info.name} has {im.size} columns, tensor has {info.ne0}")
                arr = ggml.quantize(data, t, im, nthreads)
                w.write_tensor_data(arr)
                del data, arr
                advance(1)
        w.close()
        from tasa_edge.gguf_check import check_gguf

        hdr = check_gguf(tmp, "exported GGUF")  # checked before it is renamed into place
        if hdr.n_tensors != len(src.tensors):
            raise TasaError(f"exported GGUF has {hdr.n_tensors} tensors, expected {len(src.tensors)}")
    seconds = time.perf_counter() - t0
    size = out.stat().st_size
    return ExportResult(out, size, tensor_bytes, 8.0 * tensor_bytes / src.n_params, seconds, count_formats(types.values()))


def _tensor_type(info, plan: BitPlan) -> str:
    if info.quantizable:
        return ggml.qtype(plan.spec.resolve(plan.tensors[info.name], info.src_type)).name
    # llama.cpp keeps 1-D tensors and norms in F32
    return "F32"


def _file_type(types: dict[str, str]) -> int:
    """general.file_type: the most common quantized type by tensor count (llama.cpp's convention
    is the ftype the mix was made from; a mixed plan has none, so take the dominant type)."""
    counts: dict[str, int] = {}
    for t in types.values():
        if t != "F32":
            counts[t] = counts.get(t, 0) + 1
    if not counts:
        return 0
    dominant = max(counts, key=lambda k: (counts[k], k))
    return _FTYPE.get(dominant, 0)


def _copy_metadata(src: ModelSource, w) -> None:
    from gguf import GGUFValueType

    reader = src.reader
    for key, f in reader.fields.items():
        if key in _SKIP_KEYS or key.startswith(_SKIP_PREFIXES):
            continue
        vtype = GGUFValueType(int(f.types[0]))
        val = f.contents()
        sub = None
        if vtype == GGUFValueType.ARRAY:
            sub = GGUFValueType(int(f.types[-1]))
            if sub == GGUFValueType.ARRAY:
                raise TasaError(f"{src.path}: nested array metadata key {key} is not supported")
        w.add_key_value(key, val, vtype, sub_type=sub)


def _add_provenance(w, plan: BitPlan, imatrix: ImatrixStats | None) -> None:
    w.add_string("quantize.tool", f"tasa-edge {__version__}")
    w.add_string("tasa_edge.plan.fingerprint", str(plan.model.get("fingerprint", "")))
    if plan.budget:
        w.add_string("tasa_edge.plan.budget", json.dumps(plan.budget, sort_keys=True))
    w.add_string("tasa_edge.plan.method", str(plan.provenance.get("method", "")))
    calib = plan.provenance.get("calibration")
    if calib is not None:
        w.add_string("tasa_edge.plan.calibration", json.dumps(calib, sort_keys=True))
    w.add_string("tasa_edge.plan.tensors", json.dumps(plan.tensors, sort_keys=True))
    if imatrix is not None:
        # the same keys llama-quantize writes
        w.add_string("quantize.imatrix.file", imatrix.source or "tasa-edge")
        w.add_string("quantize.imatrix.dataset", ",".join(imatrix.datasets) or "tasa-edge")
        w.add_int32("quantize.imatrix.entries_count", len(imatrix.sums))
        w.add_int32("quantize.imatrix.chunks_count", int(imatrix.chunk_count))
