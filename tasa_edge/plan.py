"""The bit plan: which format each tensor gets, for one model, under one budget.

File format (``tasa-edge/bitplan`` version 1, JSON; schema in ``tasa_edge/schemas/bitplan.v1.json``)::

    {
      "format": "tasa-edge/bitplan", "version": 1,
      "target": "gguf",                         # or "onnx"
      "model": {"fingerprint": "sha256:...", "arch": "llama", "name": "...", "n_params": 134515008},
      "budget": {"bpw": 3.5} | {"bytes": 2000000000} | null,
      "tensors": {"blk.7.ffn_down.weight": "Q3_K", ...},   # every quantizable tensor
      "predicted": {"bytes": ..., "bpw": ..., "loss": ...},
      "provenance": {"tool": "tasa-edge 0.1.0", "created": "...", "calibration": {...}, "scores": {...}},
      "imatrix": {"path": "/abs/imatrix.gguf", "sha256": "...", "entries": 210} | null   # optional
    }

``imatrix`` is the importance matrix the plan was scored with: ``export`` uses it by default and
refuses a different one unless told; ``null`` means scored without one (exported without).
Plans that were never scored (uniform, tensor-type file) omit the key and take ``--imatrix``.

Formats: GGUF targets use ggml type names (``Q4_K``, ``IQ4_XS``, ``Q8_0``, ``F16``...) or
``source``: keep the input GGUF's bytes of that tensor unchanged (its source type is recorded in
``provenance.source_types`` and checked on export; a tensor-type file gets that type's name).
ONNX targets use ``int{2,4,8}_b{block}`` (symmetric) / ``uint{2,4,8}_b{block}`` (with zero points)
or ``float``; :mod:`tasa_edge.formats` owns them. Tensors that are not quantizable (norms, 1-D)
are never listed: they stay F32.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__, formats
from .errors import TasaError
from .fsutil import atomic_write_text
from .jsonio import check_plan, load_json, read_text_file, safe_regex
from .formats.base import SOURCE
from .model import ModelSource, TensorInfo

PLAN_FORMAT = "tasa-edge/bitplan"
PLAN_VERSION = 1


def count_formats(values) -> dict[str, int]:
    """format -> how many tensors take it, sorted by format name."""
    out: dict[str, int] = {}
    for fmt in values:
        out[fmt] = out.get(fmt, 0) + 1
    return dict(sorted(out.items()))


@dataclass
class BitPlan:
    target: str
    model: dict
    tensors: dict[str, str]
    budget: dict | None = None
    predicted: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    #: the importance matrix the plan was scored with ({"path", "sha256", "entries"}) or None
    #: when it was scored without one; only meaningful when ``imatrix_recorded`` (plans that
    #: were not scored -- uniform, tensor-type file -- record nothing and take ``--imatrix``)
    imatrix: dict | None = None
    imatrix_recorded: bool = False

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
            **({"imatrix": self.imatrix} if self.imatrix_recorded else {}),
        }

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "BitPlan":
        p = Path(path)
        if not p.exists():
            raise TasaError(f"plan not found: {p}")
        return cls.from_dict(load_json(p, "plan"), where=str(p))

    @classmethod
    def from_dict(cls, d: dict, where: str = "plan") -> "BitPlan":
        if not isinstance(d, dict) or d.get("format") != PLAN_FORMAT:
            raise TasaError(f"{where}: not a tasa-edge bit plan (missing format '{PLAN_FORMAT}')")
        if d.get("version") != PLAN_VERSION:
            raise TasaError(f"{where}: unsupported plan version {d.get('version')} (this tool reads {PLAN_VERSION})")
        check_plan(d, where)     # schema bitplan.v1: every field below has its type and range
        target, model, tensors, imatrix = d["target"], d["model"], d["tensors"], d.get("imatrix")
        return cls(target, model, dict(tensors), d.get("budget"), d.get("predicted") or {}, d.get("provenance") or {},
                   imatrix=imatrix, imatrix_recorded="imatrix" in d)

    @property
    def spec(self) -> formats.Target:
        """The target (format registry entry) this plan is for."""
        return formats.get(self.target)

    # ------------------------------------------------------------------ construction
    @classmethod
    def uniform(cls, src: ModelSource, fmt: str, target: str = "gguf", *, fallback: bool = True, **extra) -> "BitPlan":
        """Every quantizable tensor in ``fmt`` (with llama.cpp's shape fallback on GGUF)."""
        spec = formats.get(target)
        tensors = {t.name: spec.fit(fmt, t.shape) if fallback else spec.parse(fmt) for t in src.quantizable}
        plan = cls(target, model_block(src), tensors, provenance={"method": f"uniform {fmt}"})
        plan.provenance.update(extra)
        plan.stamp(src)
        return plan

    def stamp(self, src: ModelSource) -> None:
        """Fill in predicted size/bpw (true file bytes) and tool provenance."""
        size = plan_nbytes(self, src)
        kept = {n: src.tensors[n].src_type for n, f in self.tensors.items() if f == SOURCE and n in src.tensors}
        if kept:
            self.provenance["source_types"] = kept
        else:
            self.provenance.pop("source_types", None)
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
        spec = self.spec
        for name, fmt in self.tensors.items():
            info = src.tensors.get(name)
            if info is None:
                raise TasaError(f"plan names unknown tensor '{name}'")
            if not info.quantizable and fmt != spec.float_format:
                raise TasaError(f"tensor {name} is not quantizable (1-D/norm) but the plan gives it {fmt}")
            check_format_fits(spec, fmt, info)
            if fmt == SOURCE:
                check_source(self, spec, info)
            if spec.requires_imatrix(fmt):
                if imatrix_names is None or name not in imatrix_names:
                    raise TasaError(f"tensor {name}: type {fmt} requires an importance matrix (pass --imatrix)")
        missing = [t.name for t in src.quantizable if t.name not in self.tensors]
        if missing:
            raise TasaError(f"plan does not cover {len(missing)} quantizable tensor(s), e.g. {missing[0]}")

    def export_imatrix(self, given: str | Path | None, *, force: bool = False):
        """The importance matrix to export this plan with (an ImatrixStats, or None).

        A plan that records the imatrix it was scored with exports with it by default; a given
        ``--imatrix`` must be that file (same sha256), and a plan scored without one exports
        without -- anything else is refused unless ``force``: the file written would not be the
        one the plan was scored for. Plans that record nothing take ``given`` as it is."""
        from .imatrix import imatrix_ref, load_imatrix

        if not self.imatrix_recorded or (given is not None and force):
            return load_imatrix(given) if given is not None else None
        rec = self.imatrix
        if rec is None:
            if given is not None:
                raise TasaError(f"the plan was scored without an importance matrix but --imatrix {given} was given "
                                "(the file would differ from the one scored; add --force-imatrix to use it anyway)")
            return None
        path = Path(given) if given is not None else Path(rec["path"])
        if not path.is_file():
            raise TasaError(f"the importance matrix the plan was scored with is missing: {path} (pass --imatrix)")
        got = imatrix_ref(path)
        if rec.get("sha256") and got["sha256"] != rec["sha256"]:
            what = f"--imatrix {given}" if given is not None else f"{path} has changed since planning and"
            raise TasaError(f"{what} is not the importance matrix the plan was scored with (sha256 "
                            f"{got['sha256'][:12]}... vs {rec['sha256'][:12]}...); add --force-imatrix to use it anyway")
        im = load_imatrix(path)
        im.source = rec["path"]   # the same provenance bytes whichever copy of the file was given
        return im

    def types_used(self) -> dict[str, int]:
        return count_formats(self.tensors.values())


def check_format_fits(spec: formats.Target, fmt: str, info: TensorInfo) -> None:
    why = spec.misfit(fmt, info.shape)
    if why is not None:
        raise TasaError(f"tensor {info.name}: {why}")


def check_source(plan: BitPlan, spec: formats.Target, info: TensorInfo) -> None:
    """A ``source`` tensor: the target keeps sources, the tensor's type is one it can write, and it
    is the type the plan was made for (the fingerprint is structural: a plan made on a Q4_K_M file
    would otherwise "keep" the F32 tensors of its dequantized reference)."""
    if not spec.keeps_source:
        raise TasaError(f"tensor {info.name}: 'source' applies to GGUF plans only")
    spec.resolve(SOURCE, info.src_type)
    want = (plan.provenance.get("source_types") or {}).get(info.name)
    if want is not None and want != info.src_type:
        raise TasaError(f"tensor {info.name}: the plan keeps its source bytes as {want}, but this model stores it "
                        f"as {info.src_type} (the plan was made for another file of the same model)")


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
    spec = plan.spec
    quantized = 0
    total = 0
    for info in src.tensors.values():
        fmt = plan.tensors.get(info.name)
        if fmt is None or not info.quantizable:
            b = spec.nbytes(spec.float_format, info.shape)
        else:
            b = spec.tensor_nbytes(fmt, info)
            quantized += b
        total += b
    return {"total": total, "quantized": quantized, "bpw": 8.0 * total / max(1, src.n_params)}


# ---------------------------------------------------------------------------- llama-quantize
_TT_LINE = re.compile(r"^\s*([^=#\s][^=]*?)\s*=\s*([A-Za-z0-9_]+)\s*$")


def write_tensor_type_file(plan: BitPlan, path: str | Path) -> None:
    """llama-quantize ``--tensor-type-file`` format: one ``regex=type`` line per tensor.

    llama-quantize does not know ``source``: such a tensor gets its source type's name (recorded
    in ``provenance.source_types``), which llama-quantize re-quantizes from its input -- the same
    bytes only where that input is the source file itself. ``read_tensor_type_file`` also accepts
    ``source``."""
    if plan.target != "gguf":
        raise TasaError("only GGUF plans can be written as a llama-quantize tensor-type file")
    kept = plan.provenance.get("source_types") or {}

    def typ(name, fmt):
        if fmt != SOURCE:
            return fmt
        if name not in kept:
            raise TasaError(f"the plan keeps tensor {name}'s source bytes but records no source type "
                            "(provenance.source_types): cannot name its type for llama-quantize")
        return kept[name]

    lines = [f"{re.escape(name)}={typ(name, fmt).lower()}" for name, fmt in plan.tensors.items()]
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_tensor_type_file(path: str | Path, src: ModelSource, *, default: str | None = None) -> BitPlan:
    """Apply a llama-quantize tensor-type file (``pattern=type`` lines, regex search, first
    match wins) to ``src``'s quantizable tensors. Unmatched tensors get ``default`` or are an error."""
    p = Path(path)
    if not p.exists():
        raise TasaError(f"tensor-type file not found: {p}")
    rules: list[tuple[re.Pattern, str]] = []
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
        rules.append((pat, formats.get("gguf").parse(m.group(2))))
    tensors = {}
    for t in src.quantizable:
        fmt = next((f for pat, f in rules if pat.search(t.name)), default)
        if fmt is None:
            raise TasaError(f"{p}: no rule matches tensor {t.name} (give --default-type)")
        tensors[t.name] = fmt
    plan = BitPlan("gguf", model_block(src), tensors, provenance={"method": f"tensor-type file {p.name}"})
    plan.stamp(src)
    return plan
