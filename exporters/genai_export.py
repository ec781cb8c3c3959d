"""ONNX for onnxruntime-genai: genai's own model builder, then the plan's MatMulNBits.

How
---
1. onnxruntime-genai's model builder (``onnxruntime_genai.models.builder``, float32, CPU execution
   provider, ``fuse_qkv=false`` so q/k/v stay separate plan tensors) is run in a child process on
   the reference Hugging Face directory (:func:`tasa_edge.torch_model.hf_dir_for`, the weights the
   analysis scored). It writes genai's graph (``GroupQueryAttention`` with fused rotary,
   ``SkipSimplifiedLayerNormalization``, its input/output names), ``genai_config.json`` and the
   tokenizer files genai reads.
2. Each projection's float ``MatMul`` (weight ``[K, N]``) becomes a ``com.microsoft::MatMulNBits``
   with the plan's bits and block size, quantized by :func:`tasa_edge.formats.onnx.quantize_blockwise`
   (the kernel the analysis scored) on the transposed weight. A quantized ``token_embd`` becomes a
   ``GatherBlockQuantized`` over the same packed initializers as the (tied) LM head's MatMulNBits,
   so the file holds one quantized copy, as the plan's byte count assumes. A ``float`` tensor stays
   a float MatMul / Gather.
3. The other initializers are streamed from the builder's data file into ours; nothing is loaded
   whole (peak memory about one tensor).

The graph is checked against the plan: every plan tensor must land on exactly one builder weight
of the same shape, else a one-line error.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tasa_edge.errors import TasaError
from tasa_edge.formats.onnx import parse_format, quantize_blockwise
from tasa_edge.model import ModelSource
from tasa_edge.plan import BitPlan

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
GENAI_CONFIG = "genai_config.json"

#: HF model_type -> the ``architectures`` entry genai's builder dispatches on.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}
_ALIGN = 64
_PROJ = re.compile(r"^model\.layers\.(\d+)\.(attn|mlp)\.(\w+)\.MatMul\.weight$")
_BUILDER_TIMEOUT_S = 3600


@dataclass
class GenaiBuild:
    nodes_before: int
    nodes_after: int
    tensor_bytes: int
    used: dict[str, str] = field(default_factory=dict)          # plan tensor -> format applied
    ops: dict[str, int] = field(default_factory=dict)
    builder_seconds: float = 0.0


def genai_available() -> str | None:
    """None when onnxruntime-genai and its builder's dependency (onnx_ir) import, else why not."""
    try:
        import onnx_ir  # noqa: F401
        import onnxruntime_genai  # noqa: F401
    except ImportError as exc:
        return f"onnxruntime-genai is not installed ({exc.name}); pip install onnxruntime-genai onnx_ir"
    return None


def stage_hf_dir(hf_dir: Path, stage: Path, model_type: str) -> None:
    """Symlinks to ``hf_dir``'s files, and a config.json naming the architecture (the config that
    :func:`hf_dir_for` writes from a GGUF has none; the builder dispatches on it)."""
    stage.mkdir(parents=True)
    for f in sorted(Path(hf_dir).iterdir()):
        if f.is_file() and f.name != "config.json":
            os.symlink(f.resolve(), stage / f.name)
    cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    if not cfg.get("architectures"):
        cfg["architectures"] = [ARCHITECTURES[model_type]]
    (stage / "config.json").write_text(json.dumps(cfg, indent=1))


def run_builder(hf_dir: Path, out: Path, cache: Path, precision: str = "fp32", extra: dict | None = None,
                show_progress: bool = False) -> None:
    """genai's model builder in a child process (its output captured; the last line is the error)."""
    opts = {"hf_token": "false", **(extra or {})}
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
           "-p", precision, "-e", "cpu", "-c", str(cache), "--extra_options",
           *[f"{k}={v}" for k, v in opts.items()]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    try:
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                           timeout=_BUILDER_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise TasaError(f"onnxruntime-genai's model builder did not finish in {_BUILDER_TIMEOUT_S} s") from exc
    if r.returncode != 0 or not (out / MODEL_FILE).is_file():
        lines = [ln for ln in r.stdout.decode("utf-8", "replace").splitlines() if ln.strip()]
        last = lines[-1].strip() if lines else f"exit code {r.returncode}"
        raise TasaError(f"onnxruntime-genai's model builder failed: {last[:300]}")


# ============================================================================ graph rewrite
class _Data:
    """Initializers of the builder's model: external ones read through a memmap of its data file."""

    def __init__(self, model_dir: Path):
        self.dir = model_dir
        self._maps: dict[str, np.memmap] = {}

    def _map(self, location: str) -> np.memmap:
        if location not in self._maps:
            p = (self.dir / location).resolve()
            if p.parent != self.dir.resolve():
                raise TasaError(f"builder output references data outside its directory: {location}")
            self._maps[location] = np.memmap(p, dtype=np.uint8, mode="r")
        return self._maps[location]

    def raw(self, t) -> memoryview | bytes:
        from onnx import TensorProto

        if t.data_location == TensorProto.EXTERNAL:
            kv = {e.key: e.value for e in t.external_data}
            off, n = int(kv.get("offset", 0)), int(kv["length"])
            return self._map(kv["location"])[off:off + n]
        from onnx import numpy_helper

        return numpy_helper.to_array(t).tobytes()

    def array(self, t) -> np.ndarray:
        from onnx import TensorProto, helper

        if t.data_type != TensorProto.FLOAT:
            raise TasaError(f"builder weight {t.name} is {helper.tensor_dtype_to_np_dtype(t.data_type)}, expected float32")
        return np.frombuffer(self.raw(t), dtype=np.float32).reshape(tuple(t.dims))


class _Writer:
    """Our external data file: tensors appended with alignment."""

    def __init__(self, path: Path):
        self.fh = open(path, "wb")
        self.nbytes = 0

    def add(self, t, raw) -> None:
        from onnx import TensorProto

        off = self.fh.tell()
        pad = (-off) % _ALIGN
        if pad:
            self.fh.write(b"\0" * pad)
            off += pad
        self.fh.write(raw)
        n = len(raw) if isinstance(raw, (bytes, bytearray)) else raw.nbytes
        del t.external_data[:]
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", DATA_FILE), ("offset", str(off)), ("length", str(n))):
            e = t.external_data.add()
            e.key, e.value = k, v

    def close(self) -> None:
        if not self.fh.closed:
            self.fh.close()


def _hf_name(init_name: str) -> str | None:
    """Builder initializer name -> Hugging Face parameter name."""
    m = _PROJ.match(init_name)
    if m:
        i, kind, proj = m.groups()
        return f"model.layers.{i}.{'self_attn' if kind == 'attn' else 'mlp'}.{proj}.weight"
    if init_name == "lm_head.MatMul.weight":
        return "lm_head.weight"
    if init_name in ("model.embed_tokens.weight", "model.embed_tokens.Gather.weight"):
        return "model.embed_tokens.weight"
    return None


def rewrite(build_dir: Path, out_dir: Path, src: ModelSource, plan: BitPlan, accuracy_level: int,
            quantizer: str, show_progress: bool = False) -> GenaiBuild:
    """Read the builder's float model in ``build_dir``; write ``out_dir/model.onnx(.data)`` with the
    plan's MatMulNBits / GatherBlockQuantized."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from tasa_edge.progress import progress_bar

    model = onnx.load(str(build_dir / MODEL_FILE), load_external_data=False)
    g = model.graph
    data = _Data(build_dir)
    inits = {t.name: t for t in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    n_before = len(g.node)

    check_structure(g, producers)
    tied = "output.weight" not in src.tensors

    def gguf_of(hf: str) -> str | None:
        if hf == "lm_head.weight" and tied:
            hf = "model.embed_tokens.weight"
        name = src.gguf_name(hf)
        return name if name in src.tensors else None

    # -- which MatMul / Gather nodes carry which plan tensor
    matmuls: list[tuple[onnx.NodeProto, str, str]] = []        # (node, initializer, gguf name)
    for n in g.node:
        if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in inits:
            hf = _hf_name(n.input[1])
            gname = gguf_of(hf) if hf else None
            if gname is None:
                raise TasaError(f"genai builder weight {n.input[1]} has no tensor in {src.name}")
            matmuls.append((n, n.input[1], gname))
    gathers = [n for n in g.node if n.op_type == "Gather" and "embed_tokens" in n.name]
    if len(gathers) != 1:
        raise TasaError(f"genai builder graph has {len(gathers)} embedding Gather nodes, expected 1")
    gather = gathers[0]
    emb_name = gguf_of("model.embed_tokens.weight")
    emb_fmt = plan.tensors.get(emb_name, "float") if emb_name else "float"

    seen = [gname for _, _, gname in matmuls]
    dup = {x for x in seen if seen.count(x) > 1} - {emb_name}
    if dup:
        raise TasaError(f"plan tensor {sorted(dup)[0]} maps to several genai builder weights")

    res = GenaiBuild(n_before, 0, 0)
    qcache: dict[str, tuple[str, str, str | None, int, int, int, int]] = {}
    new_inits: list[tuple[TensorProto, np.ndarray]] = []
    drop: set[str] = set()

    def quantized(gname: str, w_nk: np.ndarray, fmt: str):
        if gname in qcache:
            return qcache[gname]
        bits, block, sym = parse_format(fmt)
        packed, scales, zp = quantize_blockwise(w_nk, bits, block, sym, quantizer)
        names = [f"{gname}.q{bits}", f"{gname}.scales", None if zp is None else f"{gname}.zero_points"]
        for nm, arr in zip(names, (packed, scales, zp)):
            if nm is not None:
                new_inits.append((numpy_helper.from_array(np.zeros((0,), arr.dtype), nm), arr))
        q = (names[0], names[1], names[2], bits, block, int(w_nk.shape[1]), int(w_nk.shape[0]))
        qcache[gname] = q
        res.used[gname] = fmt
        return q

    def expect_shape(gname: str, w_nk: np.ndarray) -> None:
        want = tuple(int(x) for x in src.tensors[gname].shape)
        if tuple(w_nk.shape) != want:
            raise TasaError(f"genai builder weight for {gname} has shape {tuple(w_nk.shape)}, the model has {want}")

    replace: dict[int, onnx.NodeProto] = {}
    remove: set[int] = set()
    with progress_bar("quantize (genai graph)", total=len(matmuls) + 1, enabled=show_progress) as advance:
        for n, init, gname in matmuls:
            fmt = plan.tensors.get(gname, "float")
            if fmt == "float":
                res.used.setdefault(gname, "float")
                advance(1)
                continue
            w_nk = np.ascontiguousarray(data.array(inits[init]).T)
            expect_shape(gname, w_nk)
            packed, scales, zp, bits, block, k, nn = quantized(gname, w_nk, fmt)
            node = helper.make_node("MatMulNBits", [n.input[0], packed, scales] + ([zp] if zp else []), list(n.output),
                                    name=n.name.replace("/MatMul", "/MatMulNBits") if n.name else None,
                                    domain="com.microsoft", K=k, N=nn, bits=bits, block_size=block,
                                    accuracy_level=accuracy_level)
            replace[id(n)] = node
            drop.add(init)
            advance(1)

        # -- the embedding
        if emb_name is not None and emb_fmt != "float":
            src_in = gather.input[0]
            if src_in in inits:
                w = data.array(inits[src_in])                    # [V, d]
                drop.add(src_in)
            else:
                tr = producers.get(src_in)
                if tr is None or tr.op_type != "Transpose" or tr.input[0] not in inits:
                    raise TasaError("genai builder embedding is neither an initializer nor a transposed LM head")
                w = np.ascontiguousarray(data.array(inits[tr.input[0]]).T)
                remove.add(id(tr))
            expect_shape(emb_name, w)
            packed, scales, zp, bits, block, k, nn = quantized(emb_name, w, emb_fmt)
            shape_name = f"{emb_name}.shape2d"
            new_inits.append((numpy_helper.from_array(np.array([nn, -1], np.int64), shape_name), None))
            reshaped = f"{emb_name}.q{bits}.2d"
            gnodes = [helper.make_node("Reshape", [packed, shape_name], [reshaped], name="/model/embed_tokens/Reshape")]
            out = gather.output[0]
            gq_out = out if k % block == 0 else f"{out}/padded"
            gnodes.append(helper.make_node(
                "GatherBlockQuantized", [reshaped, gather.input[1], scales] + ([zp] if zp else []), [gq_out],
                name="/model/embed_tokens/GatherBlockQuantized", domain="com.microsoft",
                gather_axis=0, quantize_axis=1, block_size=block, bits=bits))
            if k % block:
                for nm, v in ((f"{emb_name}.unpad.starts", [0]), (f"{emb_name}.unpad.ends", [k]),
                              (f"{emb_name}.unpad.axes", [-1])):
                    new_inits.append((numpy_helper.from_array(np.array(v, np.int64), nm), None))
                gnodes.append(helper.make_node("Slice", [gq_out, f"{emb_name}.unpad.starts", f"{emb_name}.unpad.ends",
                                                         f"{emb_name}.unpad.axes"], [out], name="/model/embed_tokens/Unpad"))
            replace[id(gather)] = gnodes
        elif emb_name is not None:
            res.used.setdefault(emb_name, "float")
        advance(1)

    unused = sorted(set(plan.tensors) - set(res.used))
    if unused:
        raise TasaError(f"plan tensor {unused[0]} has no matching weight in genai's graph ({len(unused)} unused)")

    # -- nodes, in order
    nodes = []
    for n in g.node:
        if id(n) in remove:
            continue
        r = replace.get(id(n), n)
        nodes.extend(r if isinstance(r, list) else [r])
    still = {i for n in nodes for i in n.input}
    drop |= {name for name in inits if name not in still}
    del g.node[:]
    g.node.extend(nodes)

    # -- initializers: copy the kept ones, append the new ones
    writer = _Writer(out_dir / DATA_FILE)
    try:
        kept = []
        for t in list(g.initializer):
            if t.name in drop:
                continue
            if t.data_location == TensorProto.EXTERNAL:
                raw = data.raw(t)
                writer.add(t, raw)
            res.tensor_bytes += _nbytes(t, data)
            kept.append(t)
        for t, arr in new_inits:
            if arr is not None:
                t = numpy_helper.from_array(np.ascontiguousarray(arr), t.name)
                raw = t.raw_data
                writer.add(t, raw)
                res.tensor_bytes += len(raw)
            kept.append(t)
    finally:
        writer.close()
    del g.initializer[:]
    g.initializer.extend(kept)
    res.nodes_after = len(g.node)
    for n in g.node:
        res.ops[n.op_type] = res.ops.get(n.op_type, 0) + 1
    res.ops = dict(sorted(res.ops.items()))
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save_model(model, str(out_dir / MODEL_FILE))
    return res


def check_structure(g, producers: dict) -> None:
    """The LM head must read the final norm: genai's builder takes the first Linear with
    ``vocab_size`` outputs for the LM head, so a model whose MLP width equals its vocabulary gets a
    wrong graph (seen on tiny test models); refuse such a graph in one line."""
    head = producers.get("logits")
    if head is None:
        raise TasaError("genai builder graph has no 'logits' output node")
    src = producers.get(head.input[0])
    if src is None or "final_norm" not in src.name:
        raise TasaError("onnxruntime-genai's builder made an LM head that does not read the final norm "
                        f"(it reads {head.input[0]}); use --onnx-graph plain for this model")


def builder_refuses(cfg: dict) -> str | None:
    """Why genai's builder cannot make a correct graph for this config (None when it can)."""
    c = cfg.get("text_config") or cfg
    if c.get("intermediate_size") == c.get("vocab_size"):
        return "its MLP width equals its vocabulary size (genai's builder would take an MLP projection for the LM head)"
    return None


def is_rope_cache(name: str) -> bool:
    """The builder's rotary cos/sin tables (``cos_cache``, gemma-3's per-rope-kind variants)."""
    return name.startswith(("cos_cache", "sin_cache"))


def _nbytes(t, data: _Data) -> int:
    """Stored bytes of an initializer (not counting the rotary cos/sin caches: no weights)."""
    if is_rope_cache(t.name):
        return 0
    from onnx import TensorProto

    if t.data_location == TensorProto.EXTERNAL:
        return int({e.key: e.value for e in t.external_data}["length"])
    return len(data.raw(t))


def copy_genai_files(build_dir: Path, dest: Path) -> list[str]:
    """genai_config.json and the tokenizer / processing files the builder wrote."""
    out = []
    for f in sorted(build_dir.iterdir()):
        if f.is_file() and not f.name.startswith(MODEL_FILE):
            shutil.copy2(f, dest / f.name)
            out.append(f.name)
    return out
