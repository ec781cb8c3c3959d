"""Bounded structural validation of a GGUF file before any other reader sees it.

gguf-py's ``GGUFReader`` trusts the header: an array length of 2**62 makes it loop while
allocating, a zero dimension divides by zero, a non-UTF-8 string raises ``UnicodeDecodeError``
later, an offset past the end builds a short memmap. :func:`check_gguf` walks the header, the
metadata and the tensor table with ``struct`` over an ``mmap``, checking every length against the
bytes that are left, so the work is bounded by the file size, and raises a one-line
:class:`~tasa_edge.errors.TasaError` for the first problem. Every place that opens a GGUF with
``GGUFReader`` (or :mod:`devices.gguf_header`) calls it first.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from .errors import TasaError

# value type -> (struct format, size)
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
GGML_MAX_DIMS = 4
MAX_KEY_BYTES = 65536
MAX_ELEMENTS = 1 << 50          # far beyond any model; keeps products of dims finite


@dataclass
class GGUFSummary:
    """What the walk learned (scalars and strings only; arrays by length)."""

    version: int
    n_tensors: int
    n_kv: int
    data_offset: int
    file_size: int
    kv: dict = field(default_factory=dict)      # key -> scalar, str or GGUFArray
    tensors: dict = field(default_factory=dict)  # name -> (dims ne0-first, ggml type name, offset, nbytes)


@dataclass(frozen=True)
class GGUFArray:
    """An array value, by item type and length (its items are not kept)."""

    item_type: int
    n: int


class _Bad(Exception):
    pass


def check_gguf(path: str | os.PathLike, what: str = "GGUF") -> GGUFSummary:
    """Validate ``path`` as a little-endian GGUF v2/v3 file; a TasaError names the first problem."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if size < 24:
            raise _Bad(f"file too short for a GGUF header ({size} bytes)")
        with open(p, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return _walk(mm, size)
    except _Bad as exc:
        raise TasaError(f"cannot read {what} {p}: {exc}") from None
    except IsADirectoryError:
        raise TasaError(f"{p} is a directory, not a {what} file") from None
    except (OSError, ValueError) as exc:  # ValueError: mmap of an empty/special file
        raise TasaError(f"cannot read {what} {p}: {getattr(exc, 'strerror', None) or exc}") from None


def _walk(mm, size: int) -> GGUFSummary:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    if mm[:4] != b"GGUF":
        raise _Bad("bad magic (not a GGUF file)")
    pos = 4

    def need(n: int) -> None:
        if n < 0 or pos + n > size:
            raise _Bad(f"truncated at byte {pos} (needs {n} more bytes, file has {size})")

    def unpack(fmt: str):
        nonlocal pos
        n = struct.calcsize(fmt)
        need(n)
        vals = struct.unpack_from(fmt, mm, pos)
        pos += n
        return vals[0] if len(vals) == 1 else vals

    def string(limit: int | None = None) -> str:
        nonlocal pos
        n = unpack("<Q")
        if limit is not None and n > limit:
            raise _Bad(f"string of {n} bytes at byte {pos - 8} exceeds {limit}")
        need(n)
        raw = bytes(mm[pos: pos + n])
        pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _Bad(f"string at byte {pos - n} is not valid UTF-8") from None

    version = unpack("<I")
    if version not in (2, 3):
        raise _Bad(f"unsupported GGUF version {version} (2 or 3, little-endian)")
    n_tensors, n_kv = unpack("<QQ")
    # every KV takes >= 8 (key length) + 4 (type) + 1 bytes, every tensor info >= 8 + 4 + 8 + 4 + 8
    if n_kv > (size - pos) // 13:
        raise _Bad(f"{n_kv} metadata entries cannot fit in {size} bytes")
    if n_tensors > (size - pos) // 32:
        raise _Bad(f"{n_tensors} tensors cannot fit in {size} bytes")
    s = GGUFSummary(version, n_tensors, n_kv, 0, size)

    def value(vt: int, key: str, depth: int = 0):
        nonlocal pos
        if vt in _SCALAR:
            v = unpack(_SCALAR[vt])
            if vt == 7:
                if v not in (0, 1):
                    raise _Bad(f"{key}: bool value {v}")
                v = bool(v)
            return v
        if vt == _STRING:
            return string()
        if vt == _ARRAY:
            et, n = unpack("<IQ")
            if depth > 0 or et == _ARRAY:
                raise _Bad(f"{key}: nested arrays are not supported")
            if et in _SCALAR:
                width = struct.calcsize(_SCALAR[et])
                if n > (size - pos) // width:
                    raise _Bad(f"{key}: array of {n} items cannot fit in the file")
                if et == 7 and n:
                    body = mm[pos: pos + n]
                    if body.count(b"\x00") + body.count(b"\x01") != n:
                        raise _Bad(f"{key}: bool array has values other than 0/1")
                pos += n * width
                return GGUFArray(et, n)
            if et == _STRING:
                if n > (size - pos) // 8:
                    raise _Bad(f"{key}: array of {n} strings cannot fit in the file")
                for _ in range(n):
                    string()
                return GGUFArray(et, n)
            raise _Bad(f"{key}: unknown array item type {et}")
        raise _Bad(f"{key}: unknown value type {vt}")

    for _ in range(n_kv):
        key = string(MAX_KEY_BYTES)
        if not key:
            raise _Bad("empty metadata key")
        if key in s.kv:
            raise _Bad(f"duplicate metadata key {key!r}")
        vt = unpack("<I")
        s.kv[key] = value(vt, key)

    align = 32
    if "general.alignment" in s.kv:
        a = s.kv["general.alignment"]
        if isinstance(a, bool) or not isinstance(a, int) or a <= 0 or a & (a - 1) or a > 1 << 20:
            raise _Bad(f"general.alignment must be a power of two, got {a!r}")
        align = a

    infos = []
    for _ in range(n_tensors):
        name = string(MAX_KEY_BYTES)
        if not name:
            raise _Bad("empty tensor name")
        if name in s.tensors:
            raise _Bad(f"duplicate tensor {name!r}")
        nd = unpack("<I")
        if not 1 <= nd <= GGML_MAX_DIMS:
            raise _Bad(f"tensor {name}: {nd} dimensions (1..{GGML_MAX_DIMS})")
        dims = [unpack("<Q") for _ in range(nd)]
        tt, off = unpack("<IQ")
        n = 1
        for d in dims:
            if d <= 0:
                raise _Bad(f"tensor {name}: dimension {d} (must be > 0)")
            n *= d
            if n > MAX_ELEMENTS:
                raise _Bad(f"tensor {name}: {dims} elements overflow")
        try:
            qt = GGMLQuantizationType(tt)
            blck, tsize = GGML_QUANT_SIZES[qt]
        except (ValueError, KeyError):
            raise _Bad(f"tensor {name}: unknown ggml type {tt}") from None
        if dims[0] % blck:
            raise _Bad(f"tensor {name}: ne0 = {dims[0]} is not a multiple of {qt.name}'s block size {blck}")
        if off % align:
            raise _Bad(f"tensor {name}: offset {off} is not aligned to {align}")
        nbytes = n // blck * tsize
        s.tensors[name] = (tuple(dims), qt.name, off, nbytes)
        infos.append((name, off, nbytes))

    data_start = pos + (-pos % align)
    s.data_offset = data_start
    if n_tensors and data_start > size:
        raise _Bad("tensor data section starts past the end of the file")
    end_prev = 0
    for name, off, nbytes in sorted(infos, key=lambda t: t[1]):
        if off < end_prev:
            raise _Bad(f"tensor {name} overlaps the previous tensor's data")
        if data_start + off + nbytes > size:
            raise _Bad(f"tensor {name}: data [{off}, {off + nbytes}) runs past the end of the file")
        end_prev = off + nbytes
    return s
