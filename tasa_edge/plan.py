"""The bit plan: which format each tensor gets, for one model, under one budget.

File format (``tasa-edge/bitplan`` version 1, JSON; schema in ``tasa_edge/schemas/bitplan.v1.json``)::

    {
      "format": "tasa-edge/bitplan", "version": 1,
      "target": "gguf",                         # or "onnx"
      "model": {"fingerprint": "sha256:...", "arch": "llama", "name": "...", "n_params": 134515008},
      "budget": {"bpw": 3.5} | {"bytes": 2000000000} | null,
      "tensors": {"blk.7.ffn_down.weight": "Q3_K", ...},   # every quantizable tensor
      "predicted": {"bytes": ..., "bpw": ..., "loss": ...},
      "provenance": {"tool": "tasa-edge 0.1.0", "created": "...", "calibration": {...}, "scores": {...}}
    }

Formats: GGUF targets use ggml type names (``Q4_K``, ``IQ4_XS``, ``Q8_0``, ``F16``...).
ONNX targets use ``int{2,4,8}_b{block}`` (symmetric) / ``uint{2,4,8}_b{block}`` (with zero points)
or ``float``. Tensors that are not quantizable (norms, 1-D) are never listed: they stay F32.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__, ggml
from .errors import TasaError
from .fsutil import atomic_write_text
from .model import ModelSource, TensorInfo

PLAN_FORMAT = "tasa-edge/bitplan"
PLAN_VERSION = 1
TARGETS = ("gguf", "onnx")

_ONNX_RE = re.compile(r"^(u?int)(2|4|8)_b(\d+)$")


def parse_onnx_format(fmt: str) -> tuple[int, int, bool] | None:
    """``int4_b32`` -> (bits=4, block=32, symmetric=True); ``float`` -> None."""
    if fmt == "float":
        return None
    m = _ONNX_RE.match(fmt)
    if not m:
        raise TasaError(f"unknown ONNX format '{fmt}' (expected float or int|uint{{2,4,8}}_b<block>)")
    bits, block = int(m.group(2)), int(m.group(3))
    if block < 16 or block & (block - 1):
        raise TasaError(f"ONNX format '{fmt}': block size must be a power of two >= 16")
    return bits, block, m.group(1) == "int"


def format_nbytes(target: str, fmt: str, shape: tuple[int, ...]) -> int:
    """Bytes the tensor takes in the exported file (weights + scales [+ zero points])."""
    if target == "gguf":
        return ggml.nbytes(fmt, shape)
    parsed = parse_onnx_format(fmt)
    n, k = (int(shape[0]), int(shape[-1])) if len(shape) > 1 else (1, int(shape[0]))
    if parsed is None:
        return 4 * n * k
    bits, block, sym = parsed
    kb = -(-k // block)
    data = n * kb * (block * bits // 8)
    scales = n * kb * 4
    zp = 0 if sym else n * (-(-kb * bits // 8))
    return data + scales + zp


def fmt_bits(target: str, fmt: str, shape: tuple[int, ...]) -> float:
    return 8.0 * format_nbytes(target, fmt, shape) / max(1, int(_prod(shape)))


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


@dataclass
class BitPlan:
    target: str
    model: dict
    tensors: dict[str, str]
    budget: dict | None = None
    predicted: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ io
    def to_dict(self) -> dict:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "target": self.target,
            "model": self.model,
            "budget": self.budget,
            "tensors": dict(self.tensors),
            "predicted": self.predicted,
            "provenance": self.provenance,
        }

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "BitPlan":
        p = Path(path)
        if not p.exists():
            raise TasaError(f"plan not found: {p}")
        from .jsonio import load_json

        return cls.from_dict(load_json(p, "plan"), where=str(p))

    @classmethod
    def from_dict(cls, d: dict, where: str = "plan") -> "BitPlan":
        if not isinstance(d, dict) or d.get("format") != PLAN_FORMAT:
            raise TasaError(f"{where}: not a tasa-edge bit plan (missing format '{PLAN_FORMAT}')")
        if d.get("version") != PLAN_VERSION:
            raise TasaError(f"{where}: unsupported plan version {d.get('version')} (this tool reads {PLAN_VERSION})")
        target = d.get("target")
        if target not in TARGETS:
            raise TasaError(f"{where}: target must be one of {TARGETS}, got {target!r}")
        tensors = d.get("tensors")
        if not isinstance(tensors, dict) or not all(isinstance(v, str) for v in tensors.values()):
            raise TasaError(f"{where}: 'tensors' must map tensor names to format strings")
        model = d.get("model") or {}
        if not isinstance(model, dict) or "fingerprint" not in model:
            raise TasaError(f"{where}: 'model.fingerprint' is required")
        from .jsonio import check_plan; check_plan(d, where)  # noqa: E702  schema bitplan.v1
        return cls(target, model, dict(tensors), d.get("budget"), d.get("predicted") or {}, d.get("provenance") or {})

    # ------------------------------------------------------------------ construction
    @classmethod
    def uniform(cls, src: ModelSource, fmt: str, target: str = "gguf", *, fallback: bool = True, **extra) -> "BitPlan":
        """Every quantizable tensor in ``fmt`` (with llama.cpp's shape fallback on GGUF)."""
        tensors = {}
        for t in src.quantizable:
            if target == "gguf":
                tensors[t.name] = ggml.fit_type(fmt, t.ne0) if fallback else ggml.qtype(fmt).name
            else:
                parse_onnx_format(fmt)
                tensors[t.name] = fmt
        plan = cls(target, model_block(src), tensors, provenance={"method": f"uniform {fmt}"})
        plan.provenance.update(extra)
        plan.stamp(src)
        return plan

    def stamp(self, src: ModelSource) -> None:
        """Fill in predicted size/bpw (true file bytes) and tool provenance."""
        size = plan_nbytes(self, src)
        self.predicted.update(
            {"bytes": size["total"], "bpw": size["bpw"], "quantized_bytes": size["quantized"]}
        )
        self.provenance.setdefault("tool", f"tasa-edge {__version__}")
        self.provenance.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    # ------------------------------------------------------------------ validation
    def validate(self, src: ModelSource, *, imatrix_names: set[str] | None = None) -> None:
        """Raise TasaError (one line) if this plan cannot be applied to ``src``."""
        if self.model.get("fingerprint") != src.fingerprint:
            raise TasaError(
                f"plan is for model {self.model.get('name', '?')} ({self.model.get('fingerprint')}), "
                f"not {src.name} ({src.fingerprint})"
            )
        for name, fmt in self.tensors.items():
            info = src.tensors.get(name)
            if info is None:
                raise TasaError(f"plan names unknown tensor '{name}'")
            if not info.quantizable and fmt not in ("F32", "float"):
                raise TasaError(f"tensor {name} is not quantizable (1-D/norm) but the plan gives it {fmt}")
            check_format_fits(self.target, fmt, info)
            if self.target == "gguf" and ggml.requires_imatrix(fmt):
                if imatrix_names is None or name not in imatrix_names:
                    raise TasaError(f"tensor {name}: type {fmt} requires an importance matrix (pass --imatrix)")
        missing = [t.name for t in src.quantizable if t.name not in self.tensors]
        if missing:
            raise TasaError(f"plan does not cover {len(missing)} quantizable tensor(s), e.g. {missing[0]}")

    def types_used(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for fmt in self.tensors.values():
            out[fmt] = out.get(fmt, 0) + 1
        return dict(sorted(out.items()))


def check_format_fits(target: str, fmt: str, info: TensorInfo) -> None:
    if target == "gguf":
        t = ggml.qtype(fmt).name
        blk = ggml.block_size(t)
        if info.ne0 % blk:
            raise TasaError(
                f"tensor {info.name}: type {t} needs rows divisible by {blk}, but ne0 = {info.ne0} "
                f"(llama.cpp would use {ggml.fit_type(t, info.ne0)})"
            )
    else:
        parsed = parse_onnx_format(fmt)
        if parsed is not None and len(info.shape) != 2:
            raise TasaError(f"tensor {info.name}: ONNX MatMulNBits needs a 2-D weight, got shape {info.shape}")


def model_block(src: ModelSource) -> dict:
    return {
        "fingerprint": src.fingerprint,
        "arch": src.arch,
        "name": src.name,
        "n_params": src.n_params,
        "source": src.path.name,
    }


def plan_nbytes(plan: BitPlan, src: ModelSource) -> dict:
    """True tensor-data bytes of the file this plan produces (non-quantizable tensors stay F32)."""
    quantized = 0
    total = 0
    for info in src.tensors.values():
        fmt = plan.tensors.get(info.name)
        if fmt is None or not info.quantizable:
            b = format_nbytes("gguf", "F32", info.shape) if plan.target == "gguf" else 4 * info.n_elements
        else:
            b = format_nbytes(plan.target, fmt, info.shape)
            quantized += b
        total += b
    return {"total": total, "quantized": quantized, "bpw": 8.0 * total / max(1, src.n_params)}


# ---------------------------------------------------------------------------- llama-quantize
_TT_LINE = re.compile(r"^\s*([^=#\s][^=]*?)\s*=\s*([A-Za-z0-9_]+)\s*$")


def write_tensor_type_file(plan: BitPlan, path: str | Path) -> None:
    """llama-quantize ``--tensor-type-file`` format: one ``regex=type`` line per tensor."""
    if plan.target != "gguf":
        raise TasaError("only GGUF plans can be written as a llama-quantize tensor-type file")
    lines = [f"{re.escape(name)}={fmt.lower()}" for name, fmt in plan.tensors.items()]
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_tensor_type_file(path: str | Path, src: ModelSource, *, default: str | None = None) -> BitPlan:
    """Apply a llama-quantize tensor-type file (``pattern=type`` lines, regex search, first
    match wins) to ``src``'s quantizable tensors. Unmatched tensors get ``default`` or are an error."""
    p = Path(path)
    if not p.exists():
        raise TasaError(f"tensor-type file not found: {p}")
    rules: list[tuple[re.Pattern, str]] = []
    from .jsonio import read_text_file, safe_regex

    for i, line in enumerate(read_text_file(p, "tensor-type file").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _TT_LINE.match(line)
        if not m:
            raise TasaError(f"{p}:{i}: expected 'pattern=type', got {line.strip()!r}")
        try:
            pat = safe_regex(m.group(1), f"{p}:{i}")
        except re.error as exc:
            raise TasaError(f"{p}:{i}: bad regex {m.group(1)!r}: {exc}") from exc
        rules.append((pat, ggml.qtype(m.group(2)).name))
    tensors = {}
    for t in src.quantizable:
        fmt = next((f for pat, f in rules if pat.search(t.name)), default)
        if fmt is None:
            raise TasaError(f"{p}: no rule matches tensor {t.name} (give --default-type)")
        tensors[t.name] = fmt
    plan = BitPlan("gguf", model_block(src), tensors, provenance={"method": f"tensor-type file {p.name}"})
    plan.stamp(src)
    return plan
