"""Importance matrices with llama.cpp's semantics.

For every matmul weight (GGUF name), the importance of input column ``j`` is the mean over
calibration tokens of ``x_j^2`` (the squared activation entering the matmul). llama.cpp stores
sums (``<name>.in_sum2``) and token counts (``<name>.counts``) in a GGUF with
``general.type = imatrix``; the legacy ``.dat`` format stores ``mean * ncall`` per value.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import TasaError
from .fsutil import atomic_path
from .formats.quantguard import check_importance


@dataclass
class ImatrixStats:
    """Running sums of squared activations per GGUF tensor."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)    # name -> float64 [ne0]
    counts: dict[str, int] = field(default_factory=dict)         # name -> tokens seen
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    source: str = ""                                             # file it was read from

    def add(self, name: str, x2_sum: np.ndarray, n_tokens: int) -> None:
        x2_sum = np.asarray(x2_sum, dtype=np.float64).reshape(-1)
        if name in self.sums:
            if self.sums[name].shape != x2_sum.shape:
                raise TasaError(f"imatrix entry {name}: {x2_sum.size} columns, had {self.sums[name].size}")
            self.sums[name] += x2_sum
            self.counts[name] += int(n_tokens)
        else:
            self.sums[name] = x2_sum.copy()
            self.counts[name] = int(n_tokens)

    def means(self) -> dict[str, np.ndarray]:
        """llama.cpp's importance values: in_sum2 / counts, float32."""
        return {n: (s / max(1, self.counts[n])).astype(np.float32) for n, s in self.sums.items()}

    def names(self) -> set[str]:
        return set(self.sums)

    # ------------------------------------------------------------------ writing
    def save(self, path: str | Path) -> None:
        """Write llama.cpp's GGUF imatrix format (readable by llama-quantize --imatrix)."""
        import gguf

        with atomic_path(path, suffix=".gguf") as tmp:
            w = gguf.GGUFWriter(tmp, arch="imatrix")
            # GGUFWriter always writes general.architecture; llama.cpp keys on general.type.
            w.add_type("imatrix")
            w.add_array("imatrix.datasets", self.datasets or ["tasa-edge"])
            w.add_uint32("imatrix.chunk_count", int(self.chunk_count))
            w.add_uint32("imatrix.chunk_size", int(self.chunk_size))
            for name in sorted(self.sums):
                w.add_tensor(f"{name}.in_sum2", self.sums[name].astype(np.float32).reshape(1, -1))
                w.add_tensor(f"{name}.counts", np.array([[float(self.counts[name])]], dtype=np.float32))
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()


def load_imatrix(path: str | Path) -> ImatrixStats:
    """Read a llama.cpp imatrix (GGUF or legacy .dat), validated: every entry has finite,
    non-negative sums and a positive token count (what llama.cpp's own loader requires)."""
    p = Path(path)
    if not p.exists():
        raise TasaError(f"imatrix not found: {p}")
    if not p.is_file():
        raise TasaError(f"imatrix {p} is not a file")
    with open(p, "rb") as fh:
        magic = fh.read(4)
    st = _load_gguf(p) if magic == b"GGUF" else _load_dat(p)
    if not st.sums:
        raise TasaError(f"{p}: imatrix has no entries")
    for name, sums in st.sums.items():
        if st.counts[name] <= 0:
            raise TasaError(f"{p}: imatrix entry {name} has token count {st.counts[name]} (must be > 0)")
        check_importance(sums / st.counts[name], f"{p}: imatrix entry {name}")
    st.source = str(p)
    return st


def _load_gguf(p: Path) -> ImatrixStats:
    from gguf import GGUFReader

    from .gguf_check import check_gguf

    hdr = check_gguf(p, "imatrix GGUF")
    if hdr.kv.get("general.type") != "imatrix":
        raise TasaError(f"{p}: GGUF is not an imatrix (general.type != imatrix)")
    for key in ("imatrix.chunk_count", "imatrix.chunk_size"):
        v = hdr.kv.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise TasaError(f"{p}: {key} must be a non-negative integer, got {v!r}")
    for tname, (dims, typ, _off, _n) in hdr.tensors.items():
        if tname.endswith((".in_sum2", ".counts")) and typ != "F32":
            raise TasaError(f"{p}: imatrix tensor {tname} is {typ}, expected F32")
    r = GGUFReader(p, "r")
    st = ImatrixStats()
    f = r.fields.get("imatrix.datasets")
    if f is not None:
        ds = f.contents()
        if not isinstance(ds, list) or not all(isinstance(x, str) for x in ds):
            raise TasaError(f"{p}: imatrix.datasets must be an array of strings")
        st.datasets = list(ds)
    for key, attr in (("imatrix.chunk_count", "chunk_count"), ("imatrix.chunk_size", "chunk_size")):
        if hdr.kv.get(key) is not None:
            setattr(st, attr, int(hdr.kv[key]))
    tensors = {t.name: t for t in r.tensors}
    for tname, t in tensors.items():
        if not tname.endswith(".in_sum2"):
            continue
        name = tname[: -len(".in_sum2")]
        c = tensors.get(name + ".counts")
        if c is None:
            raise TasaError(f"{p}: {tname} has no matching .counts tensor")
        sums = np.asarray(t.data, dtype=np.float64)
        counts = np.asarray(c.data, dtype=np.float64).reshape(-1)
        if not np.all(np.isfinite(counts)) or np.any(counts < 0):
            raise TasaError(f"{p}: {name}.counts has negative or non-finite values")
        if counts.size == 0 or sums.size % counts.size:
            raise TasaError(f"{p}: {tname} has {sums.size} values, not a multiple of {counts.size} counts")
        if counts.size > 1:  # MoE: one row per expert; fold to one importance vector
            sums = sums.reshape(counts.size, -1).sum(axis=0)
        st.sums[name] = sums.reshape(-1)
        st.counts[name] = int(round(float(counts.sum())))
    return st


def _load_dat(p: Path) -> ImatrixStats:
    data = p.read_bytes()
    off = 0

    def take(fmt: str):
        nonlocal off
        size = struct.calcsize(fmt)
        if off + size > len(data):
            raise TasaError(f"{p}: truncated legacy imatrix file")
        vals = struct.unpack_from(fmt, data, off)
        off += size
        return vals

    def text(ln: int, what: str) -> str:
        nonlocal off
        if ln < 0 or off + ln > len(data):
            raise TasaError(f"{p}: truncated legacy imatrix file ({what})")
        try:
            s = data[off: off + ln].decode("utf-8")
        except UnicodeDecodeError:
            raise TasaError(f"{p}: legacy imatrix {what} is not UTF-8") from None
        off += ln
        return s

    st = ImatrixStats()
    (n_entries,) = take("<i")
    if n_entries <= 0 or n_entries > 1_000_000 or n_entries * 16 > len(data):
        raise TasaError(f"{p}: not an imatrix file (GGUF or legacy .dat)")
    for _ in range(n_entries):
        (ln,) = take("<i")
        if ln <= 0 or ln > 4096:
            raise TasaError(f"{p}: corrupt legacy imatrix entry")
        name = text(ln, "entry name")
        if name in st.sums:
            raise TasaError(f"{p}: duplicate legacy imatrix entry {name}")
        ncall, nval = take("<ii")
        if nval <= 0 or off + 4 * nval > len(data):
            raise TasaError(f"{p}: legacy imatrix entry {name}: {nval} values do not fit in the file")
        if ncall <= 0:
            raise TasaError(f"{p}: legacy imatrix entry {name} has ncall {ncall} (must be > 0)")
        vals = np.frombuffer(data, dtype="<f4", count=nval, offset=off).astype(np.float64)
        off += 4 * nval
        # legacy stores mean * ncall; keep the same mean with ncall as the count
        st.sums[name] = vals.copy()
        st.counts[name] = ncall
    if off + 4 <= len(data):
        (st.chunk_count,) = take("<i")
        if st.chunk_count < 0:
            raise TasaError(f"{p}: legacy imatrix chunk count {st.chunk_count}")
        if off + 4 <= len(data):
            (ln,) = take("<i")
            st.datasets = [text(ln, "dataset name")]
    return st


def save_legacy_dat(st: ImatrixStats, path: str | Path) -> None:
    """Write the legacy ``.dat`` format (values = mean * ncall, as llama-imatrix did)."""
    out = bytearray(struct.pack("<i", len(st.sums)))
    for name in sorted(st.sums):
        b = name.encode()
        ncall = max(1, st.counts[name])
        vals = (st.sums[name] / ncall * ncall).astype("<f4")  # mean * ncall == sums
        out += struct.pack("<i", len(b)) + b + struct.pack("<ii", ncall, vals.size) + vals.tobytes()
    ds = (st.datasets[0] if st.datasets else "tasa-edge").encode()
    out += struct.pack("<i", st.chunk_count) + struct.pack("<i", len(ds)) + ds
    with atomic_path(path) as tmp:
        tmp.write_bytes(bytes(out))


def imatrix_ref(path: str | Path) -> dict:
    """The identity a plan records of the imatrix it was scored with: absolute path, sha256 of
    the file's bytes, number of entries."""
    p = Path(path).resolve()
    if not p.is_file():
        raise TasaError(f"imatrix not found: {p}")
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return {"path": str(p), "sha256": h.hexdigest(), "entries": len(load_imatrix(p).sums)}
