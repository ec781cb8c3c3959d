"""Byte sizes on the command line."""

from __future__ import annotations

import re

from .errors import TasaError

_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*(?:([KMGT])(i)?(B)?|B)?\s*", re.I)
_POW = {"K": 1, "M": 2, "G": 3, "T": 4}


def parse_bytes(s: str) -> int:
    """``80000000``, ``75MB`` (SI, 10^6), ``1.5GiB`` (2^30) or ``3.5G`` (bare letter: binary, as
    memory tools use it) -> bytes. Raises a one-line TasaError for anything else or a size <= 0."""
    m = _SIZE.fullmatch(str(s))
    if not m:
        raise TasaError(f"cannot parse byte size {s!r} (e.g. 80000000, 75MB, 2GB, 1.5GiB, 3.5G)")
    value, unit, binary, b = m.groups()
    mult = 1
    if unit:
        base = 1000 if (b and not binary) else 1024
        mult = base ** _POW[unit.upper()]
    n = int(float(value) * mult)
    if n <= 0:
        raise TasaError(f"byte size must be positive, got {s!r}")
    return n
