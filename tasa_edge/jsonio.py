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
import re
from functools import lru_cache
from pathlib import Path

from . import formats
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
    _check_strings(obj, where)
    return obj


def _check_strings(obj, where: str) -> None:
    """JSON may escape lone surrogates (``"\\ud800"``); they are not text and cannot be written out."""
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, list):
            stack.extend(o)
        elif isinstance(o, str):
            try:
                o.encode("utf-8")
            except UnicodeEncodeError:
                raise TasaError(f"{where}: a JSON string holds an unpaired surrogate (not text)") from None


def load_json(path: str | os.PathLike, what: str = "JSON file", max_depth: int = MAX_DEPTH):
    p = Path(path)
    if not p.exists():
        raise TasaError(f"{what} not found: {p}")
    if not p.is_file():
        raise TasaError(f"{what} {p} is not a file")
    text = read_text_file(p, what, MAX_BYTES)
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


def _check_document(d, schema: str, where: str) -> None:
    """Bounded depth, the JSON schema ``schema``, and finite numbers."""
    if depth(d) > MAX_DEPTH:
        raise TasaError(f"{where}: nested deeper than {MAX_DEPTH} levels")
    check_schema(d, schema, where)
    if not _finite(d):
        raise TasaError(f"{where}: contains a non-finite number")


def check_plan(d, where: str = "plan") -> None:
    """A bit plan dict: schema ``bitplan.v1`` and finite numbers."""
    _check_document(d, "bitplan.v1", where)


def check_analysis(d, where: str = "analysis") -> None:
    """An analysis dict: schema ``analysis.v1`` and a consistent sensitivity table."""
    _check_document(d, "analysis.v1", where)
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
    spec = formats.get(d["config"]["target"])
    for row in ppl.values():
        for f in row:
            spec.parse(f)


def check_analysis_file(path: str | os.PathLike) -> dict:
    """Load and fully validate an analysis.json (what :meth:`Analysis.load` reads)."""
    d = load_json(path, "analysis")
    if not isinstance(d, dict) or d.get("format") != "tasa-edge/analysis":
        raise TasaError(f"{path}: not a tasa-edge analysis file")
    check_analysis(d, str(path))
    return d


def read_text_file(path: str | os.PathLike, what: str, max_bytes: int = 16 << 20) -> str:
    """A small UTF-8 text file, or a one-line TasaError."""
    p = Path(path)
    try:
        if p.stat().st_size > max_bytes:
            raise TasaError(f"{p}: {what} larger than {max_bytes >> 20} MiB")
        raw = p.read_bytes()
    except OSError as exc:
        raise TasaError(f"cannot read {what} {p}: {exc.strerror or exc}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TasaError(f"{p}: {what} is not UTF-8 (byte {exc.start})") from None


_NESTED_QUANTIFIER = re.compile(r"\((?:[^()\\]|\\.)*[*+}|](?:[^()\\]|\\.)*\)\s*[*+{]")


def safe_regex(pattern: str, where: str = "regex") -> "re.Pattern":
    """Compile a user regex (tensor-type files) matched against tensor names; refuse the shapes
    that backtrack exponentially (a quantified group holding a quantifier or an alternation).
    A syntax error is left to ``re.error``."""
    if len(pattern) > 1024:
        raise TasaError(f"{where}: regex longer than 1024 characters")
    if _NESTED_QUANTIFIER.search(pattern):
        raise TasaError(f"{where}: regex {pattern!r} repeats a group that holds a quantifier or alternation "
                        "(exponential backtracking); simplify it")
    try:
        return re.compile(pattern)
    except (RecursionError, OverflowError) as exc:
        raise TasaError(f"{where}: bad regex {pattern[:60]!r}: {type(exc).__name__}") from None


def load_hf_config(path: str | os.PathLike) -> dict:
    """A Hugging Face ``config.json``: a JSON object whose (text_)config has a positive
    ``num_hidden_layers`` and list-of-strings ``architectures``."""
    d = load_json(path, "config.json")
    if not isinstance(d, dict):
        raise TasaError(f"{path}: config.json must be a JSON object")
    archs = d.get("architectures", [])
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise TasaError(f"{path}: 'architectures' must be a list of strings")
    text = d.get("text_config", d)
    n = text.get("num_hidden_layers") if isinstance(text, dict) else None
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise TasaError(f"{path}: num_hidden_layers must be a positive integer, got {n!r}")
    return d
