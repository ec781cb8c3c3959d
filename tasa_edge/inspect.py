"""Size accounting of a GGUF file or a bit plan: per-tensor type, bytes, bits/weight."""

from __future__ import annotations

from pathlib import Path

from .errors import TasaError
from .formats.base import SOURCE
from .gguf_check import check_gguf
from .jsonio import load_json
from .plan import BitPlan


def _row(name: str, shape, typ: str, nbytes: int) -> dict:
    n = 1
    for s in shape:
        n *= int(s)
    return {"name": name, "shape": [int(s) for s in shape], "type": typ, "params": n, "bytes": int(nbytes), "bpw": 8.0 * nbytes / max(1, n)}


def _summarise(path: str, rows: list[dict], extra: dict | None = None) -> dict:
    by_type: dict[str, dict] = {}
    for r in rows:
        d = by_type.setdefault(r["type"], {"tensors": 0, "params": 0, "bytes": 0})
        d["tensors"] += 1
        d["params"] += r["params"]
        d["bytes"] += r["bytes"]
    params = sum(r["params"] for r in rows)
    nbytes = sum(r["bytes"] for r in rows)
    rep = {"path": path, "tensors": rows, "by_type": dict(sorted(by_type.items())), "params": params, "bytes": nbytes, "bpw": 8.0 * nbytes / max(1, params)}
    rep.update(extra or {})
    return rep


def inspect_gguf(path: Path) -> dict:
    from gguf import GGUFReader

    check_gguf(path)
    try:
        r = GGUFReader(path, "r")
    except Exception as exc:
        raise TasaError(f"cannot read GGUF {path}: {exc}") from exc
    rows = []
    for t in r.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        rows.append(_row(t.name, shape, t.tensor_type.name, int(t.n_bytes)))
    extra = {"file_bytes": path.stat().st_size}
    f = r.fields.get("general.architecture")
    if f is not None:
        extra["arch"] = f.contents()
    return _summarise(str(path), rows, extra)


def inspect_plan(path: Path, model: str | None) -> dict:
    plan = BitPlan.load(path)
    if model is None:
        raise TasaError("sizing a plan needs the model it is for: pass --model")
    from .model import ModelSource
    from .zoo import resolve_model

    src = ModelSource.open(resolve_model(model))
    plan.validate(src, imatrix_names=set(src.tensors))
    rows = []
    for info in src.tensors.values():
        fmt = plan.tensors.get(info.name, "F32") if info.quantizable else "F32"
        nbytes = plan.spec.tensor_nbytes(plan.spec.float_format if fmt == "F32" else fmt, info)
        if fmt == SOURCE:        # kept as the input stores it: shown with its real type
            fmt = f"{plan.spec.resolve(fmt, info.src_type)} (source)"
        rows.append(_row(info.name, info.shape, fmt, nbytes))
    return _summarise(str(path), rows, {"target": plan.target, "budget": plan.budget, "predicted": plan.predicted})


def inspect_onnx_dir(path: Path, model: str | None = None) -> dict:
    """An ONNX export directory of ``tasa-edge export --format onnx``: per-tensor formats from its
    ``tasa_export.json`` and bytes from the format registry (tensors outside the plan stay float).
    Shapes come from the file (``tensor_shapes``) or, for exports written before it was recorded,
    from ``--model``."""
    from .formats import get as get_target

    info_path = path / "tasa_export.json"
    if not info_path.is_file():
        raise TasaError(f"{path} is a directory but not a tasa-edge ONNX export (no tasa_export.json)")
    info = load_json(info_path, "ONNX export info")
    plan = info.get("plan") if isinstance(info, dict) else None
    if not (isinstance(info, dict) and info.get("format") == "tasa-edge/onnx-export" and isinstance(plan, dict)
            and isinstance(plan.get("tensors"), dict)):
        raise TasaError(f"{info_path}: not a tasa-edge ONNX export description")
    spec = get_target(plan.get("target") or "onnx")
    shapes = info.get("tensor_shapes")
    if not isinstance(shapes, dict):
        if model is None:
            raise TasaError(f"{info_path} records no tensor shapes (an older export): pass --model to size it")
        from .model import ModelSource
        from .zoo import resolve_model

        src = ModelSource.open(resolve_model(model))
        if src.fingerprint != (info.get("model") or {}).get("fingerprint"):
            raise TasaError(f"{path} was exported from another model than {src.name}")
        shapes = {t.name: list(t.shape) for t in src.tensors.values()}
    rows = []
    for name, shape in shapes.items():
        if not (isinstance(shape, list) and shape and all(isinstance(x, int) and x > 0 for x in shape)):
            raise TasaError(f"{info_path}: bad shape for tensor {name!r}")
        fmt = plan["tensors"].get(name, spec.float_format)
        if not isinstance(fmt, str):
            raise TasaError(f"{info_path}: bad format for tensor {name!r}")
        fmt = spec.parse(fmt)
        rows.append(_row(name, shape, fmt, spec.nbytes(fmt, tuple(shape))))
    files = [f for f in path.iterdir() if f.is_file() and f.name.startswith("model.onnx")]
    extra = {"target": "onnx", "file_bytes": sum(f.stat().st_size for f in files),
             "exported_tensor_bytes": (info.get("bytes") or {}).get("tensors"), "budget": plan.get("budget")}
    return _summarise(str(path), rows, extra)


def inspect_path(path: Path, model: str | None = None) -> dict:
    if not path.exists():
        raise TasaError(f"not found: {path}")
    if path.is_dir():
        return inspect_onnx_dir(path, model)
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic == b"GGUF":
        return inspect_gguf(path)

    load_json(path, "bit plan JSON")  # one-line TasaError for anything that is not JSON
    return inspect_plan(path, model)
