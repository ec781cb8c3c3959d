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
    """Read a llama.cpp imatrix (GGUF or legacy .dat)."""
    p = Path(path)
    if not p.exists():
        raise TasaError(f"imatrix not found: {p}")
    with open(p, "rb") as fh:
        magic = fh.read(4)
    st = _load_gguf(p) if magic == b"GGUF" else _load_dat(p)
    st.source = str(p)
    return st


def _load_gguf(p: Path) -> ImatrixStats:
    from gguf import GGUFReader

    r = GGUFReader(p, "r")
    typ = r.fields.get("general.type")
    if typ is None or typ.contents() != "imatrix":
        raise TasaError(f"{p}: GGUF is not an imatrix (general.type != imatrix)")
    st = ImatrixStats()
    f = r.fields.get("imatrix.datasets")
    if f is not None:
        st.datasets = list(f.contents())
    for key, attr in (("imatrix.chunk_count", "chunk_count"), ("imatrix.chunk_size", "chunk_size")):
        f = r.fields.get(key)
        if f is not None:
            setattr(st, attr, int(f.contents()))
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

    st = ImatrixStats()
    (n_entries,) = take("<i")
    if n_entries <= 0 or n_entries > 1_000_000:
        raise TasaError(f"{p}: not an imatrix file (GGUF or legacy .dat)")
    for _ in range(n_entries):
        (ln,) = take("<i")
        if ln <= 0 or ln > 4096:
            raise TasaError(f"{p}: corrupt legacy imatrix entry")
        name = data[off: off + ln].decode("utf-8", "replace")
        off += ln
        ncall, nval = take("<ii")
        vals = np.frombuffer(data, dtype="<f4", count=nval, offset=off).astype(np.float64)
        off += 4 * nval
        # legacy stores mean * ncall; keep the same mean with ncall as the count
        ncall = max(1, ncall)
        st.sums[name] = vals.copy()
        st.counts[name] = ncall
    if off + 4 <= len(data):
        (st.chunk_count,) = take("<i")
        if off + 4 <= len(data):
            (ln,) = take("<i")
            st.datasets = [data[off: off + ln].decode("utf-8", "replace")]
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
