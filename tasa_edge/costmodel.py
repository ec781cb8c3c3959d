"""Device cost model of a plan: predicted decode and prefill time from a measured kernel profile.

``tasa-edge profile`` (``devices/kernel_profile.py``) measures, through llama.cpp's ``llama-bench``
on the device, files of the model whose tensors take the formats of the menu in a few designed
mixes, and fits one coefficient per format (least squares, non-negative):

* **decode** (``tg``, one token: mat-vec): ``ms/token = sum over matmul tensors of a[fmt] * n_weights``,
  the LM head with its own ``a_out[fmt]`` where the profile measured one (design files that change
  only the head's format): llama.cpp's CPU backend repacks layer matrices of some formats (Q4_0,
  IQ4_NL) into interleaved kernels, but not a tied head (the token embedding, also read by
  ``get_rows``), so one coefficient per format mispredicts mixes that put the head and the layers in
  different formats;
* **prefill** (``pp`` tokens, mat-mat): ``ms = pp * sum over layer tensors of b[fmt] * n_weights``
  ``+ sum over the LM head of a[fmt] * n_weights`` (llama-bench asks for the last token's logits
  only, so the LM head runs once, as a mat-vec); an ONNX profile (onnxruntime's MatMulNBits,
  ``head_prefill = "all"``) costs the head like a layer: its graphs return every position's logits.

Every design file quantizes all matmul tensors, so their weights add up to the same total: the
costs that do not depend on the weights' formats (attention over the KV cache, norms, the graph's
overhead) cannot be separated from the coefficients and are shared among them in proportion to
weights -- exact for predicting another mix of *the same model*, which is what a profile is for
(it records the model's fingerprint). An untied token embedding is read by ``get_rows`` (a few
rows per token): no cost.

The profile is a TOML file; the keys this module reads (the rest is the device profile of
``devices/profiles.py``)::

    [machine]   cpu = "..."  features = [...]  cores = 2  llama_cpp_build = "b1-abc"  llama_cpp_commit = "abc"
    [measured]  model = "..."  fingerprint = "sha256:..."  threads = 2  pp = 512  tg = 128
                usable_ram_bytes = 123  bandwidth_bytes_per_s = 2.5e10  ...
    [kernels.gguf.Q4_0]  decode_ns_per_weight = 0.21  prefill_ns_per_weight = 0.012
                         output_decode_ns_per_weight = 0.35    # optional: the LM head's own
                         by_ne0 = {576 = [0.2, 0.011], 1536 = [0.25, 0.016]}   # optional: per input width

With ``by_ne0`` (``tasa-edge profile --by-width``) a matrix is costed at its input width's (ggml
ne0) coefficients, the nearest measured width for another: the same format's kernels run at other
speeds per weight on other shapes, so one coefficient per format mispredicts plans that put a
format on some widths only (say Q6_K on the wide ffn_down, Q4_K elsewhere).

The resulting per-tensor costs are linear, so the allocation stays an exact MILP with a time row
(:func:`tasa_edge.allocate.solve`'s ``resources``).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import TasaError
from .model import ModelSource

OUTPUT = "output.weight"
TOKEN_EMBD = "token_embd.weight"


@dataclass(frozen=True)
class FormatCost:
    decode_ns_per_weight: float     # per decoded token (mat-vec), weights of the tensor
    prefill_ns_per_weight: float    # per prompt token (mat-mat)
    #: the LM head's own decode cost in this format, when measured (else ``decode_ns_per_weight``):
    #: a tied head is the token embedding, which llama.cpp's CPU backend does not repack
    output_decode_ns_per_weight: float | None = None
    #: (decode, prefill) ns/weight of the layer matrices of one input width (ggml ne0), when the
    #: profile measured them apart: the same format's kernels run at different speeds on
    #: different shapes (Qwen2.5-1.5B's 8960-wide ffn_down against its 1536-wide matrices); else
    #: the two above serve all
    by_ne0: dict[int, tuple[float, float]] = field(default_factory=dict, compare=True, hash=False)

    def _at(self, ne0: int | None) -> tuple[float, float] | None:
        """The (decode, prefill) costs of the measured width nearest ``ne0`` (None without widths)."""
        if not self.by_ne0 or ne0 is None:
            return None
        return self.by_ne0[min(self.by_ne0, key=lambda w: (abs(w - ne0), w))]

    def decode(self, role_: str, ne0: int | None = None) -> float:
        """ns/weight per decoded token of a matrix of ``role_`` (``layer`` | ``output``) and input
        width ``ne0``: the head's own cost where measured, else the (nearest) width's."""
        if role_ == "output" and self.output_decode_ns_per_weight is not None:
            return self.output_decode_ns_per_weight
        at = self._at(ne0)
        return self.decode_ns_per_weight if at is None else at[0]

    def prefill(self, ne0: int | None = None) -> float:
        at = self._at(ne0)
        return self.prefill_ns_per_weight if at is None else at[1]


@dataclass
class Prediction:
    decode_ms: float                # per token
    prefill_ms: float               # for ``pp`` prompt tokens
    pp: int

    @property
    def tg_ts(self) -> float:
        return 1000.0 / self.decode_ms if self.decode_ms > 0 else float("inf")

    @property
    def pp_ts(self) -> float:
        return 1000.0 * self.pp / self.prefill_ms if self.prefill_ms > 0 else float("inf")

    def to_dict(self) -> dict:
        return {"decode_ms": self.decode_ms, "prefill_ms": self.prefill_ms, "pp_tokens": self.pp,
                "tg_ts": self.tg_ts, "pp_ts": self.pp_ts}


@dataclass
class KernelProfile:
    """The measured part of a device profile (see the module docstring)."""

    name: str
    target: str                                   # gguf | onnx: which exporter's kernels
    machine: dict
    measured: dict
    costs: dict[str, FormatCost] = field(default_factory=dict)
    path: str | None = None

    # ------------------------------------------------------------------ identity
    @property
    def fingerprint(self) -> str | None:
        return self.measured.get("fingerprint")

    @property
    def pp(self) -> int:
        return int(self.measured.get("pp") or 512)

    @property
    def head_prefill(self) -> str:
        """``last`` (llama-bench's pp test asks for the last position's logits: the LM head runs
        once, a mat-vec) or ``all`` (onnxruntime graphs return every position's logits: the head
        is a mat-mat over the prompt, costed like a layer)."""
        return str(self.measured.get("head_prefill") or "last")

    @property
    def usable_ram_bytes(self) -> int | None:
        v = self.measured.get("usable_ram_bytes")
        return int(v) if v else None

    def check_model(self, src: ModelSource) -> None:
        if self.fingerprint and self.fingerprint != src.fingerprint:
            raise TasaError(f"profile {self.where} was measured on {self.measured.get('model', '?')} "
                            f"({self.fingerprint}), not {src.name} ({src.fingerprint}): run tasa-edge profile -m {src.name}")

    def identity_mismatch(self, here: dict) -> list[str]:
        """Differences between this profile's machine and ``here`` (cpu, features, the llama.cpp
        build or the onnxruntime versions that ran the kernels)."""
        out = []
        for key, what in (("cpu", "CPU"), ("llama_cpp_commit", "llama.cpp build"), ("onnxruntime", "onnxruntime"),
                          ("onnxruntime_genai", "onnxruntime-genai"), ("features", "ISA flags")):
            a, b = self.machine.get(key), here.get(key)
            if a is not None and b is not None and a != b:
                out.append(f"{what} {a!r} (profile) vs {b!r} (this machine)")
        return out

    @property
    def where(self) -> str:
        return self.path or self.name

    # ------------------------------------------------------------------ costs
    def cost(self, fmt: str) -> FormatCost:
        c = self.costs.get(fmt)
        if c is None:
            raise TasaError(f"profile {self.where} has no measured kernel cost for {fmt} "
                            f"(measured: {', '.join(self.costs) or 'none'})")
        return c

    def tensor_costs(self, src: ModelSource, name: str, fmt: str) -> tuple[float, float]:
        """(decode ms per token, prefill ms for ``pp`` tokens) of tensor ``name`` in ``fmt``."""
        c = self.cost(fmt)
        t = src.tensors[name]
        n, ne0 = t.n_elements, int(t.shape[-1])
        r = role(src, name)
        if r == "embed":
            return 0.0, 0.0
        dec = c.decode(r, ne0) * n * 1e-6
        if r == "output" and self.head_prefill != "all":
            return dec, dec
        return dec, c.prefill(ne0) * n * self.pp * 1e-6

    def predict(self, src: ModelSource, tensors: dict[str, str]) -> Prediction:
        dec = pre = 0.0
        for name, fmt in tensors.items():
            d, p = self.tensor_costs(src, name, fmt)
            dec += d
            pre += p
        return Prediction(dec, pre, self.pp)

    # ------------------------------------------------------------------ io
    def to_toml(self) -> str:
        """The ``[machine]``, ``[measured]`` and ``[kernels.*]`` tables as TOML text."""
        lines = ["[machine]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in self.machine.items() if v is not None]
        lines += ["", "[measured]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in self.measured.items() if v is not None and not isinstance(v, dict)]
        for k, v in self.measured.items():
            if isinstance(v, dict):
                lines += ["", f"[measured.{k}]"] + [f"{_toml_key(a)} = {_toml_value(b)}" for a, b in v.items() if b is not None]
        for fmt, c in self.costs.items():
            lines += ["", f"[kernels.{self.target}.{fmt}]", f"decode_ns_per_weight = {c.decode_ns_per_weight!r}",
                      f"prefill_ns_per_weight = {c.prefill_ns_per_weight!r}"]
            if c.output_decode_ns_per_weight is not None:
                lines.append(f"output_decode_ns_per_weight = {c.output_decode_ns_per_weight!r}")
            if c.by_ne0:
                lines.append("by_ne0 = {" + ", ".join(f"{w} = [{d!r}, {q!r}]" for w, (d, q) in sorted(c.by_ne0.items())) + "}")
        return "\n".join(lines) + "\n"


def role(src: ModelSource, name: str) -> str:
    """``output`` (the LM head: output.weight, or a tied token_embd.weight), ``embed`` (an untied
    token embedding: get_rows, no matmul) or ``layer``."""
    if name == OUTPUT:
        return "output"
    if name == TOKEN_EMBD:
        return "embed" if OUTPUT in src.tensors else "output"
    if name.endswith("token_embd.weight"):
        return "embed"
    return "layer"


def _toml_key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else _toml_value(k)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    s = str(v)
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def kernel_profile_from_dict(data: dict, where: str) -> KernelProfile | None:
    """The measured part of a parsed profile TOML, or None when it has no ``[kernels]`` table."""
    kern = data.get("kernels")
    if kern is None:
        return None
    machine, measured = data.get("machine", {}), data.get("measured", {})
    if not isinstance(kern, dict) or not isinstance(machine, dict) or not isinstance(measured, dict):
        raise TasaError(f"{where}: [kernels], [machine] and [measured] must be tables")
    if len(kern) != 1:
        raise TasaError(f"{where}: [kernels] must hold one target table (gguf or onnx), got {', '.join(kern) or 'none'}")
    (target, table), = kern.items()
    if target not in ("gguf", "onnx") or not isinstance(table, dict):
        raise TasaError(f"{where}: [kernels.{target}]: the target must be gguf or onnx")
    costs = {}
    for fmt, row in table.items():
        keys = {"decode_ns_per_weight", "prefill_ns_per_weight"}
        if not isinstance(row, dict) or not keys <= set(row) <= keys | {"output_decode_ns_per_weight", "by_ne0"}:
            raise TasaError(f"{where}: [kernels.{target}.{fmt}] must have decode_ns_per_weight and prefill_ns_per_weight"
                            " (and optionally output_decode_ns_per_weight, by_ne0), nothing else")
        vals = []
        for k in ("decode_ns_per_weight", "prefill_ns_per_weight", "output_decode_ns_per_weight"):
            v = row.get(k)          # the two required keys are there (checked above)
            if v is None:
                vals.append(None)
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 <= v < 1e6):
                raise TasaError(f"{where}: kernels.{target}.{fmt}.{k} must be a number >= 0, got {v!r}")
            vals.append(float(v))
        costs[fmt] = FormatCost(*vals, by_ne0=_by_ne0(row.get("by_ne0", {}), f"{where}: kernels.{target}.{fmt}.by_ne0"))
    if not costs:
        raise TasaError(f"{where}: [kernels.{target}] lists no format")
    if measured.get("head_prefill", "last") not in ("last", "all"):
        raise TasaError(f"{where}: measured.head_prefill must be \"last\" or \"all\"")
    pp = measured.get("pp", 512)
    if isinstance(pp, bool) or not isinstance(pp, int) or pp <= 0:
        raise TasaError(f"{where}: measured.pp must be a positive integer")
    return KernelProfile(str(data.get("name", "")), target, dict(machine), dict(measured), costs, path=where)


def _by_ne0(table, where: str) -> dict[int, tuple[float, float]]:
    """``{ne0 = [decode, prefill], ...}`` of a profile: positive integer widths, two numbers >= 0 each."""
    if not isinstance(table, dict):
        raise TasaError(f"{where} must be a table of input width = [decode, prefill]")
    out = {}
    for k, v in table.items():
        if not (k.isdigit() and 0 < int(k) < 1 << 31):
            raise TasaError(f"{where}: {k!r} is not an input width (a positive integer)")
        if (not isinstance(v, list) or len(v) != 2
                or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not (0 <= x < 1e6) for x in v)):
            raise TasaError(f"{where}.{k} must be [decode, prefill], two numbers >= 0, got {v!r}")
        out[int(k)] = (float(v[0]), float(v[1]))
    return out


def read_profile_toml(p: Path) -> dict:
    """A device profile's TOML (bounded: at most 1 MiB), as a dict; one-line errors otherwise."""
    try:
        if p.stat().st_size > 1 << 20:
            raise TasaError(f"{p}: a device profile is a small TOML file (over 1 MiB)")
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise TasaError(f"{p}: invalid TOML ({exc})") from None
    except RecursionError:
        raise TasaError(f"{p}: invalid TOML (nested too deeply)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TasaError(f"{p}: cannot read ({exc})") from None


def load_kernel_profile(path: str | Path) -> KernelProfile:
    """A measured profile (``tasa-edge profile -o device.toml``); one-line errors otherwise."""
    p = Path(path)
    if not p.is_file():
        raise TasaError(f"profile not found: {p}")
    data = read_profile_toml(p)
    kp = kernel_profile_from_dict(data, str(p))
    if kp is None:
        raise TasaError(f"{p} has no measured kernel costs ([kernels]): make one with tasa-edge profile -m MODEL -o {p.name}")
    return kp


# ---------------------------------------------------------------------------- memory
def kv_cache_bytes(src: ModelSource, ctx: int) -> int:
    """llama.cpp's default KV cache (F16 K and V) for ``ctx`` tokens."""
    arch = src.arch
    get = src.raw_gguf_field if src.kind == "gguf" else None
    if get is not None:
        n_layer = get(f"{arch}.block_count")
        n_head = get(f"{arch}.attention.head_count")
        n_kv = get(f"{arch}.attention.head_count_kv") or n_head
        n_embd = get(f"{arch}.embedding_length")
        k_len = get(f"{arch}.attention.key_length") or (n_embd // n_head if n_embd and n_head else None)
        v_len = get(f"{arch}.attention.value_length") or k_len
        if None in (n_layer, n_kv, k_len, v_len):
            raise TasaError(f"{src.name}: cannot size the KV cache (missing attention metadata)")
        n_kv = int(n_kv if not isinstance(n_kv, (list, tuple)) else max(n_kv))
        return int(n_layer) * int(ctx) * n_kv * (int(k_len) + int(v_len)) * 2
    hp = src.hparams()
    return hp.n_layer * int(ctx) * hp.n_head_kv * hp.head_dim * 2 * 2
