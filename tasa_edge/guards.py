"""Checks the CLI makes before any work: output paths that can be written, sane budgets."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import TasaError


def _nearest_existing(p: Path) -> Path:
    q = p
    while not q.exists():
        if q.parent == q:
            break
        q = q.parent
    return q


def output_file(path: str | os.PathLike | None, what: str = "output") -> None:
    """Refuse ``path`` as a file to write: a directory, a parent that is a file, no write permission."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise TasaError(f"{what} {p} is a directory; give a file path")
    if p.exists() and not p.is_file():
        raise TasaError(f"{what} {p} exists and is not a regular file")
    base = _nearest_existing(p.parent if str(p.parent) else Path("."))
    if not base.is_dir():
        raise TasaError(f"cannot write {what} {p}: {base} is not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise TasaError(f"cannot write {what} {p}: {base} is not writable")


def output_dir(path: str | os.PathLike | None, what: str = "output directory") -> None:
    """Refuse ``path`` as a directory to write into: an existing file, a parent that is a file, no permission."""
    if path is None:
        return
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise TasaError(f"{what} {p} exists and is not a directory")
    base = _nearest_existing(p)
    if not base.is_dir():
        raise TasaError(f"cannot write {what} {p}: {base} is not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise TasaError(f"cannot write {what} {p}: {base} is not writable")


def budget(src, bpw: float | None, nbytes: int | None) -> None:
    """A --bpw within (0, 32] (F32 is 32 bits/weight) or a --bytes above what stays F32 anyway."""
    import math

    if bpw is not None and not (math.isfinite(bpw) and 0 < bpw <= 32):
        raise TasaError(f"--bpw must be within (0, 32] bits per weight, got {bpw:g}")
    if nbytes is not None:
        from .planner import fixed_bytes

        fixed = fixed_bytes(src)
        if nbytes <= fixed:
            raise TasaError(
                f"--bytes {nbytes:,} is not above the {fixed:,} bytes of tensors that are never quantized"
            )
