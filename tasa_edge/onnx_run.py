"""Running exported ONNX decoders: logits and greedy generation (KV cache).

The model directory is what :func:`exporters.onnx_export.export_onnx` writes: ``model.onnx``
(+ external data), the tokenizer files and ``config.json``. A directory with ``genai_config.json``
(the default export: onnxruntime-genai's graph) runs through onnxruntime-genai
(:class:`GenaiDecoder`: ``og.Model`` / ``og.Generator``); a plain-graph export through onnxruntime
alone (:class:`OnnxDecoder`). Tokens follow the HF tokenizer (``add_special_tokens=True``: BOS is
prepended exactly when the tokenizer adds it, which is what llama.cpp does for the same model in
:mod:`tasa_edge.llama_run`); token ids are fed to genai directly, so both runners score the same
sequences.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import TasaError

MODEL_FILE = "model.onnx"
GENAI_CONFIG = "genai_config.json"


def is_genai_dir(model_dir: str | Path) -> bool:
    """Whether ``model_dir`` (or the directory of a model.onnx) is an onnxruntime-genai model."""
    d = Path(model_dir)
    return ((d if d.is_dir() else d.parent) / GENAI_CONFIG).is_file()


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class OnnxDecoder:
    """An onnxruntime session over an exported decoder plus its tokenizer."""

    session: object
    tokenizer: object
    n_layers: int
    n_kv: int
    head_dim: int
    past_names: list[str]
    output_names: list[str]

    # ------------------------------------------------------------------ construction
    @classmethod
    def open(cls, model_dir: str | Path, n_threads: int | None = None) -> "OnnxDecoder":
        import onnxruntime as ort
        from transformers import AutoTokenizer

        d = Path(model_dir)
        path = d / MODEL_FILE if d.is_dir() else d
        if not path.exists():
            raise TasaError(f"no ONNX model at {path}")
        so = ort.SessionOptions()
        so.intra_op_num_threads = n_threads or _cores()
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        try:
            sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise TasaError(f"onnxruntime cannot load {path}: {str(exc).splitlines()[0]}") from exc
        try:
            tok = AutoTokenizer.from_pretrained(str(path.parent))
        except Exception as exc:
            raise TasaError(f"no usable tokenizer next to {path}: {exc}") from exc
        past = [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
        if not past:
            raise TasaError(f"{path} has no past_key_values inputs (not a tasa-edge decoder export)")
        shape = past[0].shape  # [batch, kv_heads, past, head_dim]
        return cls(sess, tok, len(past) // 2, int(shape[1]), int(shape[3]), [i.name for i in past],
                   [o.name for o in sess.get_outputs()])

    # ------------------------------------------------------------------ running
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def empty_past(self, batch: int = 1) -> dict[str, np.ndarray]:
        z = np.zeros((batch, self.n_kv, 0, self.head_dim), np.float32)
        return {n: z for n in self.past_names}

    def step(self, ids: np.ndarray, past: dict[str, np.ndarray], past_len: int):
        """Run ``ids`` [b, s] after ``past_len`` cached tokens -> (logits [b, s, V], new past)."""
        ids = np.asarray(ids, dtype=np.int64)
        b, s = ids.shape
        feed = {
            "input_ids": ids,
            "attention_mask": np.ones((b, past_len + s), np.int64),
            "position_ids": np.broadcast_to(np.arange(past_len, past_len + s, dtype=np.int64), (b, s)).copy(),
            **past,
        }
        outs = self.session.run(None, feed)
        new_past = {}
        logits = None
        for name, val in zip(self.output_names, outs):
            if name == "logits":
                logits = val
            elif name.startswith("present."):
                new_past["past_key_values." + name[len("present."):]] = val
        return logits, new_past

    def generate_ids(self, ids: list[int], max_new_tokens: int) -> list[int]:
        eos = _eos_ids(self.tokenizer)
        logits, past = self.step(np.array([ids]), self.empty_past(), 0)
        n = len(ids)
        out: list[int] = []
        for _ in range(max_new_tokens):
            nxt = int(np.argmax(logits[0, -1]))
            if nxt in eos:
                break
            out.append(nxt)
            logits, past = self.step(np.array([[nxt]]), past, n)
            n += 1
        return out


def _eos_ids(tok) -> set[int]:
    ids = set()
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    return ids


@dataclass
class GenaiDecoder:
    """An onnxruntime-genai model (``og.Model`` over the export directory) and its tokenizers.

    ``tokenizer`` is the HF tokenizer (loaded on first use: it imports torch), the same one the plain
    runner and the bench's scoring use; ``og_tokenizer`` is genai's own."""

    model: object
    model_dir: Path
    eos: frozenset
    _hf_tokenizer: object = None
    _og_tokenizer: object = None

    @classmethod
    def open(cls, model_dir: str | Path, n_threads: int | None = None) -> "GenaiDecoder":
        try:
            import onnxruntime_genai as og
        except ImportError as exc:
            raise TasaError("this ONNX export needs onnxruntime-genai (pip install onnxruntime-genai)") from exc
        d = Path(model_dir)
        d = d if d.is_dir() else d.parent
        if not (d / GENAI_CONFIG).is_file():
            raise TasaError(f"{d} has no {GENAI_CONFIG} (not an onnxruntime-genai model)")
        try:
            cfg = og.Config(str(d))
            opts = {"intra_op_num_threads": int(n_threads or _cores()), "inter_op_num_threads": 1}
            cfg.overlay(json.dumps({"model": {"decoder": {"session_options": opts}}}))
            model = og.Model(cfg)
        except Exception as exc:
            raise TasaError(f"onnxruntime-genai cannot load {d}: {str(exc).splitlines()[0] if str(exc) else exc}") from exc
        eos = json.loads((d / GENAI_CONFIG).read_text()).get("model", {}).get("eos_token_id")
        eos = eos if isinstance(eos, list) else [] if eos is None else [eos]
        return cls(model, d, frozenset(int(e) for e in eos))

    @property
    def og_tokenizer(self):
        """genai's own tokenizer (``og.Tokenizer``), loaded on first use."""
        if self._og_tokenizer is None:
            import onnxruntime_genai as og

            self._og_tokenizer = og.Tokenizer(self.model)
        return self._og_tokenizer

    @property
    def tokenizer(self):
        if self._hf_tokenizer is None:
            from transformers import AutoTokenizer

            try:
                self._hf_tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
            except Exception as exc:
                raise TasaError(f"no usable tokenizer in {self.model_dir}: {exc}") from exc
        return self._hf_tokenizer

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def eos_ids(self) -> set[int]:
        return set(self.eos)

    def generator(self, max_length: int):
        import onnxruntime_genai as og

        p = og.GeneratorParams(self.model)
        p.set_search_options(max_length=int(max_length), do_sample=False)
        return og.Generator(self.model, p)

    def logits(self, ids) -> np.ndarray:
        """Full-sequence forward of ``ids``: logits [n, vocab] float32 (position i predicts i+1)."""
        ids = [int(i) for i in ids]
        g = self.generator(len(ids) + 1)
        g.append_tokens(np.asarray(ids, dtype=np.int32))
        return np.asarray(g.get_output("logits")[0], dtype=np.float32)

    def generate_ids(self, ids: list[int], max_new_tokens: int, stop=None) -> list[int]:
        """Greedy decoding (og.Generator, KV cache) until EOS, ``max_new_tokens`` or ``stop(new_ids)``."""
        g = self.generator(len(ids) + max_new_tokens + 1)
        g.append_tokens(np.asarray(ids, dtype=np.int32))
        out: list[int] = []
        while len(out) < max_new_tokens and not g.is_done():
            g.generate_next_token()
            t = int(g.get_next_tokens()[0])
            if t in self.eos:
                break
            out.append(t)
            if stop is not None and stop(out):
                break
        return out


def open_decoder(model_dir: str | Path, n_threads: int | None = None):
    """:class:`GenaiDecoder` for an onnxruntime-genai export, else :class:`OnnxDecoder`."""
    if is_genai_dir(model_dir):
        return GenaiDecoder.open(model_dir, n_threads)
    return OnnxDecoder.open(model_dir, n_threads)


@contextlib.contextmanager
def open_onnx(model_dir: str | Path, n_threads: int | None = None):
    dec = open_decoder(model_dir, n_threads)
    try:
        yield dec
    finally:
        del dec


def logits(model_dir: str | Path, texts: list[str], max_tokens: int = 256, n_threads: int | None = None):
    """For each text: (tokens [n], logits [n, vocab] float32), full-sequence forward, BOS per the tokenizer."""
    out = []
    with open_onnx(model_dir, n_threads) as dec:
        for text in texts:
            toks = dec.encode(text)[:max_tokens]
            if not toks:
                raise TasaError(f"text {text[:30]!r} produces no tokens")
            if isinstance(dec, GenaiDecoder):
                out.append((np.array(toks), dec.logits(toks)))
                continue
            lg, _ = dec.step(np.array([toks]), dec.empty_past(), 0)
            out.append((np.array(toks), np.asarray(lg[0], dtype=np.float32)))
    return out


def generate(model_dir: str | Path, prompt: str, max_new_tokens: int = 16, n_threads: int | None = None) -> str:
    """Greedy completion of ``prompt`` (the new text only), with the KV cache."""
    with open_onnx(model_dir, n_threads) as dec:
        new = dec.generate_ids(dec.encode(prompt), max_new_tokens)
        return dec.tokenizer.decode(new, skip_special_tokens=True)
