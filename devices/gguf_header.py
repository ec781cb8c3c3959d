"""A fast GGUF header reader: scalar metadata and the tensor table, without the tensor data.

gguf-py's ``GGUFReader`` builds numpy views for every item of every array field (the tokenizer's
tens of thousands of tokens and merges), which takes seconds per file; the harness only needs the
tensor names/shapes/types and a few numbers, so this reads the header with ``struct`` over an
``mmap`` and skips arrays.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from tasa_edge.errors import TasaError
from tasa_edge.gguf_check import check_gguf

_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass
class TensorEntry:
    name: str
    shape: tuple[int, ...]   # numpy order (ne0 last), as ModelSource uses
    type: str                # ggml type name
    nbytes: int

    @property
    def src_type(self) -> str:
        """The ggml type, under the name :class:`tasa_edge.model.TensorInfo` gives it."""
        return self.type

    @property
    def n_elements(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class GGUFHeader:
    path: Path
    version: int
    kv: dict = field(default_factory=dict)   # scalars, strings, small numeric arrays (other arrays: their length)
    tensors: dict[str, TensorEntry] = field(default_factory=dict)

    @property
    def arch(self) -> str | None:
        return self.kv.get("general.architecture")


def read_header(path: str | Path) -> GGUFHeader:
    p = Path(path)
    check_gguf(p)
    try:
        with open(p, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return _parse(p, mm)
    except (struct.error, ValueError, IndexError, UnicodeDecodeError) as exc:
        raise TasaError(f"cannot read GGUF {p}: malformed header ({exc})") from None
    except OSError as exc:
        raise TasaError(f"cannot read GGUF {p}: {exc.strerror or exc}") from None


def _parse(p: Path, mm) -> GGUFHeader:
    if mm[:4] != b"GGUF":
        raise TasaError(f"{p} is not a GGUF file")
    version = struct.unpack_from("<I", mm, 4)[0]
    if version < 2:
        raise TasaError(f"{p}: GGUF version {version} is not supported")
    n_tensors, n_kv = struct.unpack_from("<QQ", mm, 8)
    pos = 24

    def string(pos):
        n = struct.unpack_from("<Q", mm, pos)[0]
        return mm[pos + 8: pos + 8 + n].decode("utf-8"), pos + 8 + n

    def value(vt, pos, keep=True):
        if vt in _SCALAR:
            fmt = _SCALAR[vt]
            return struct.unpack_from(fmt, mm, pos)[0], pos + struct.calcsize(fmt)
        if vt == _STRING:
            return string(pos)
        if vt == _ARRAY:
            et, n = struct.unpack_from("<IQ", mm, pos)
            pos += 12
            if et in _SCALAR:
                size = struct.calcsize(_SCALAR[et])
                if keep and n <= 4096:  # small numeric arrays (per-layer head counts ...) are read
                    return list(struct.unpack_from(f"<{n}{_SCALAR[et][1]}", mm, pos)), pos + n * size
                return n, pos + n * size
            for _ in range(n):
                _, pos = value(et, pos, False)
            return n, pos
        raise ValueError(f"unknown GGUF value type {vt}")

    h = GGUFHeader(p, version)
    for _ in range(n_kv):
        key, pos = string(pos)
        vt = struct.unpack_from("<I", mm, pos)[0]
        h.kv[key], pos = value(vt, pos + 4)
    for _ in range(n_tensors):
        name, pos = string(pos)
        nd = struct.unpack_from("<I", mm, pos)[0]
        dims = struct.unpack_from(f"<{nd}Q", mm, pos + 4)
        pos += 4 + 8 * nd
        tt, _off = struct.unpack_from("<IQ", mm, pos)
        pos += 12
        qt = GGMLQuantizationType(tt)
        blck, tsize = GGML_QUANT_SIZES[qt]
        n = 1
        for d in dims:
            n *= int(d)
        h.tensors[name] = TensorEntry(name, tuple(int(d) for d in reversed(dims)), qt.name, n // blck * tsize)
    return h
