"""Reading the JSON files tasa-edge consumes (bit plans, analyses) with bounded work.

* :func:`load_json`: size cap, strict UTF-8, no ``NaN``/``Infinity``, nesting depth cap (checked
  on the parsed value without recursion; the parser's own RecursionError becomes a TasaError);
* :func:`check_schema`: validation against ``tasa_edge/schemas/<name>.json`` (jsonschema, draft
  2020-12) with a one-line message naming the first failing location;
* :func:`check_plan` / :func:`check_analysis`: the schema plus the cross-field rules the code
  relies on (every sensitivity row has byte sizes for the same formats ...).
"""

from __future__ import annotations

import json
import math
import os
from functools import lru_cache
from pathlib import Path

from .errors import TasaError

MAX_DEPTH = 64
MAX_BYTES = 1 << 30
SCHEMA_DIR = Path(__file__).with_name("schemas")


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def loads(text: str, where: str, max_depth: int = MAX_DEPTH):
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise TasaError(f"{where}: JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError is a ValueError
        raise TasaError(f"{where}: not valid JSON ({exc})") from None
    if depth(obj) > max_depth:
        raise TasaError(f"{where}: JSON nested deeper than {max_depth} levels")
    return obj


def load_json(path: str | os.PathLike, what: str = "JSON file", max_depth: int = MAX_DEPTH):
    p = Path(path)
    if not p.exists():
        raise TasaError(f"{what} not found: {p}")
    if not p.is_file():
        raise TasaError(f"{what} {p} is not a file")
    try:
        if p.stat().st_size > MAX_BYTES:
            raise TasaError(f"{p}: {what} larger than {MAX_BYTES >> 20} MiB")
        raw = p.read_bytes()
    except OSError as exc:
        raise TasaError(f"cannot read {what} {p}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TasaError(f"{p}: {what} is not UTF-8 (byte {exc.start})") from None
    return loads(text, str(p), max_depth)


def depth(obj) -> int:
    """Nesting depth of a parsed JSON value (iterative: safe on any input)."""
    best = 0
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, dict):
            best = max(best, d)
            stack.extend((v, d + 1) for v in o.values())
        elif isinstance(o, list):
            best = max(best, d)
            stack.extend((v, d + 1) for v in o)
    return best


@lru_cache(maxsize=None)
def _validator(name: str):
    import jsonschema

    schema = json.loads((SCHEMA_DIR / f"{name}.json").read_text(encoding="utf-8"))
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def check_schema(obj, name: str, where: str) -> None:
    """Raise a one-line TasaError if ``obj`` does not follow schema ``name`` (e.g. ``bitplan.v1``)."""
    v = _validator(name)
    err = next(iter(sorted(v.iter_errors(obj), key=lambda e: (len(e.absolute_path), str(e.absolute_path)))), None)
    if err is None:
        return
    loc = "/".join(str(x) for x in err.absolute_path) or "(top level)"
    msg = err.message
    if len(msg) > 160:
        msg = msg[:157] + "..."
    raise TasaError(f"{where}: {loc}: {msg} (schema {name})")


def _finite(obj) -> bool:
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, float) and not math.isfinite(o):
            return False
        if isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, list):
            stack.extend(o)
    return True


def check_plan(d, where: str = "plan") -> None:
    """A bit plan dict: schema ``bitplan.v1`` and finite numbers."""
    if depth(d) > MAX_DEPTH:
        raise TasaError(f"{where}: nested deeper than {MAX_DEPTH} levels")
    check_schema(d, "bitplan.v1", where)
    if not _finite(d):
        raise TasaError(f"{where}: contains a non-finite number")


def check_analysis(d, where: str = "analysis") -> None:
    """An analysis dict: schema ``analysis.v1`` and a consistent sensitivity table."""
    if depth(d) > MAX_DEPTH:
        raise TasaError(f"{where}: nested deeper than {MAX_DEPTH} levels")
    check_schema(d, "analysis.v1", where)
    if not _finite(d):
        raise TasaError(f"{where}: contains a non-finite number")
    table = d["table"]
    ppl = table["ppl"]
    for src in ("task", "bytes"):
        if set(table[src]) != set(ppl):
            extra = sorted(set(table[src]) ^ set(ppl))[0]
            raise TasaError(f"{where}: table.{src} and table.ppl list different tensors (e.g. {extra})")
    for name, row in ppl.items():
        for src in ("task", "bytes"):
            if set(table[src][name]) != set(row):
                raise TasaError(f"{where}: table.{src}.{name} and table.ppl.{name} list different formats")
    target = d["config"]["target"]
    if target == "gguf":
        from . import ggml

        for name, row in ppl.items():
            for f in row:
                ggml.qtype(f)
    else:
        from .plan import parse_onnx_format

        for name, row in ppl.items():
            for f in row:
                parse_onnx_format(f)


def check_analysis_file(path: str | os.PathLike) -> dict:
    """Load and fully validate an analysis.json (what :meth:`Analysis.load` reads)."""
    d = load_json(path, "analysis")
    if not isinstance(d, dict) or d.get("format") != "tasa-edge/analysis":
        raise TasaError(f"{path}: not a tasa-edge analysis file")
    check_analysis(d, str(path))
    return d
