"""One model abstraction shared by the analysis (torch) and the exporters (GGUF, ONNX).

A :class:`ModelSource` is either a GGUF file (any tensor types; dequantized to float32 it is the
reference model) or a Hugging Face directory with safetensors (llama-family architectures).
Tensors are always addressed by their **GGUF name** (``blk.7.ffn_down.weight``); the single
HF <-> GGUF name mapping is :meth:`ModelSource.gguf_name` (gguf-py's ``TensorNameMap``).
Shapes are numpy order: ``(rows, ne0)`` where ``ne0`` (the last axis, the input dimension of a
matmul) is the axis ggml quantizes along in blocks.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Iterator

import numpy as np

from . import hf_layout
from .errors import TasaError
from .gguf_check import GGUFSummary, check_gguf
from .jsonio import load_hf_config
from .names import is_quantizable, sort_key

#: Architectures (GGUF ``general.architecture`` names) whose HF checkpoints we map.
HF_ARCHS = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3",
}


@dataclass(frozen=True)
class TensorInfo:
    name: str                 # GGUF name
    shape: tuple[int, ...]    # numpy order; shape[-1] == ne0
    src_type: str             # ggml type in the source ("F32", "Q4_K", "BF16" ...)
    hf_name: str | None = None

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))

    @property
    def ne0(self) -> int:
        return int(self.shape[-1])

    @property
    def quantizable(self) -> bool:
        return is_quantizable(self.name, self.shape)


@dataclass
class ModelSource:
    """A model on disk, read tensor by tensor."""

    path: Path
    kind: str                              # "gguf" | "hf"
    arch: str
    n_layers: int
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    hf_config: dict | None = None              # config.json of an HF source
    hf_files: dict[str, Path] | None = None    # HF tensor name -> safetensors file
    header: GGUFSummary | None = None          # the checked GGUF header (scalars, tensor table)
    _reader: object | None = field(default=None, repr=False)

    @property
    def reader(self):
        """gguf-py's ``GGUFReader`` of a GGUF source, opened on first use: it parses every metadata
        array (a 49k-token vocabulary costs ~160 MB), which the analysis never needs."""
        if self._reader is None and self.kind == "gguf":
            from gguf import GGUFReader

            try:
                self._reader = GGUFReader(self.path, "r")
            except Exception as exc:
                raise TasaError(f"cannot read GGUF {self.path}: {exc}") from exc
        return self._reader

    # ------------------------------------------------------------------ construction
    @classmethod
    def open(cls, path: str | os.PathLike) -> "ModelSource":
        p = Path(path)
        if not p.exists():
            raise TasaError(f"model not found: {p}")
        if p.is_dir():
            return cls._open_hf(p)
        if p.suffix.lower() != ".gguf":
            with open(p, "rb") as fh:
                magic = fh.read(4)
            if magic != b"GGUF":
                raise TasaError(f"{p} is neither a GGUF file nor a Hugging Face model directory")
        return cls._open_gguf(p)

    @classmethod
    def _open_gguf(cls, p: Path) -> "ModelSource":
        head = check_gguf(p)
        arch = _scalar(head, "general.architecture")
        if not isinstance(arch, str):
            raise TasaError(f"{p}: GGUF has no general.architecture")
        if _scalar(head, "general.type") == "imatrix":
            raise TasaError(f"{p} is an importance-matrix file, not a model")
        try:
            n_layers = int(_scalar(head, f"{arch}.block_count") or 0)
        except (TypeError, ValueError):
            raise TasaError(f"{p}: {arch}.block_count is not a number") from None
        tensors = {}
        for name, (dims, type_name, _off, _nbytes) in head.tensors.items():
            shape = tuple(int(x) for x in reversed(dims))
            tensors[name] = TensorInfo(name, shape, type_name)
        return cls(p, "gguf", arch, n_layers, tensors, header=head)

    @classmethod
    def _open_hf(cls, p: Path) -> "ModelSource":
        cfg_path = p / "config.json"
        if not cfg_path.exists():
            raise TasaError(f"{p}: no config.json (not a Hugging Face model directory)")
        cfg = load_hf_config(cfg_path)
        archs = cfg.get("architectures") or []
        arch = next((HF_ARCHS[a] for a in archs if a in HF_ARCHS), None)
        if arch is None:
            raise TasaError(
                f"{p}: unsupported architecture {archs or cfg.get('model_type')}; "
                f"supported: {', '.join(sorted(HF_ARCHS))}"
            )
        files = sorted(p.glob("*.safetensors"))
        if not files:
            raise TasaError(f"{p}: no *.safetensors weights")
        from safetensors import safe_open

        text_cfg = cfg.get("text_config", cfg)
        n_layers = int(text_cfg["num_hidden_layers"])
        src = cls(p, "hf", arch, n_layers, hf_config=cfg, hf_files={})
        for f in files:
            with safe_open(f, framework="numpy") as fh:
                for key in fh.keys():
                    sl = fh.get_slice(key)
                    shape = tuple(int(x) for x in sl.get_shape())
                    gname = src.gguf_name(key)
                    if gname is None:
                        raise TasaError(f"{p}: no GGUF name for tensor {key} ({arch})")
                    src.hf_files[key] = f
                    dtype = str(sl.get_dtype()).upper().replace("FLOAT", "F")
                    src.tensors[gname] = TensorInfo(gname, shape, {"F32": "F32", "F16": "F16", "BF16": "BF16"}.get(dtype, dtype), key)
        # sort like llama.cpp: token_embd, blocks by index, then output
        src.tensors = dict(sorted(src.tensors.items(), key=lambda kv: sort_key(kv[0])))
        return src

    # ------------------------------------------------------------------ names
    @cached_property
    def _name_map(self):
        import gguf

        arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == self.arch)
        return gguf.get_tensor_name_map(arch_enum, self.n_layers)

    def gguf_name(self, hf_name: str) -> str | None:
        """The GGUF tensor name of a Hugging Face parameter name (the one mapping we use)."""
        key = hf_name
        for prefix in ("model.language_model.", "language_model.model.", "language_model."):
            if key.startswith(prefix):
                key = "model." + key[len(prefix):]
        return self._name_map.get_name(key, try_suffixes=(".weight", ".bias"))

    # ------------------------------------------------------------------ data
    def read(self, name: str) -> np.ndarray:
        """The tensor as float32 in numpy order (dequantized from the GGUF source if needed)."""
        info = self.tensors.get(name)
        if info is None:
            raise TasaError(f"tensor {name} not in model {self.path.name}")
        if self.kind == "gguf":
            from .formats import ggml

            t = self._gguf_tensor(name)
            return ggml.dequantize(t.data, t.tensor_type.name).reshape(info.shape)
        from safetensors import safe_open

        with safe_open(self.hf_files[info.hf_name], framework="pt") as fh:  # numpy has no bf16
            arr = fh.get_tensor(info.hf_name).float().numpy()
        return hf_layout.hf_tensor_to_gguf(self, name, arr)

    def iter_tensors(self) -> Iterator[tuple[TensorInfo, np.ndarray]]:
        for name, info in self.tensors.items():
            yield info, self.read(name)

    def _gguf_tensor(self, name: str):
        idx = self._gguf_index[name]
        return self.reader.tensors[idx]

    @cached_property
    def _gguf_index(self) -> dict[str, int]:
        return {t.name: i for i, t in enumerate(self.reader.tensors)}

    def raw_gguf_field(self, key: str):
        if self.kind != "gguf":
            return None
        if self.header is not None and key not in self.header.kv:
            return None        # absent: not worth gguf-py's reader (it parses the whole vocabulary)
        v = _scalar(self.header, key) if self.header is not None else None
        return v if v is not None else _field(self.reader, key)

    @cached_property
    def hparams(self) -> "hf_layout.HParams":
        """Hyper-parameters of an HF source (from its config.json)."""
        return hf_layout.hparams(self)

    # ------------------------------------------------------------------ facts
    @property
    def quantizable(self) -> list[TensorInfo]:
        return [t for t in self.tensors.values() if t.quantizable]

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors.values())

    @cached_property
    def fingerprint(self) -> str:
        """Structural identity: architecture, tensor names and shapes (not the weights' encoding)."""
        h = hashlib.sha256(self.arch.encode())
        for name in sorted(self.tensors):
            h.update(f"|{name}:{'x'.join(map(str, self.tensors[name].shape))}".encode())
        return "sha256:" + h.hexdigest()[:32]

    @property
    def name(self) -> str:
        if self.kind == "gguf":
            return str(self.raw_gguf_field("general.name") or self.path.stem)
        return self.path.name

    def describe(self) -> dict:
        return {
            "path": str(self.path),
            "kind": self.kind,
            "arch": self.arch,
            "name": self.name,
            "n_layers": self.n_layers,
            "n_params": self.n_params,
            "fingerprint": self.fingerprint,
        }


def _scalar(head: GGUFSummary, key: str):
    """A scalar or string metadata value from the checked header (None for arrays and absent keys)."""
    v = head.kv.get(key)
    return v if isinstance(v, (str, int, float, bool)) else None


def _field(reader, key: str):
    f = reader.fields.get(key)
    if f is None:
        return None
    try:
        return f.contents()
    except Exception:
        return None
