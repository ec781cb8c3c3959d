"""Measurements that run inside a fresh child process, one model per process.

``python -m devices.worker JOB.json RESULT.json`` runs one job written by :mod:`devices.harness`:

* ``{"kind": "reference", ...}``: run the float reference over token sequences and store its
  next-token log-probabilities (float16 ``[T, vocab]``, ``.npy``) with the targets' log-probs and
  the reference's top-1 per scored position (``.npz``) -- the "base" of the KL-divergence, as
  ``llama-perplexity --kl-divergence-base`` does;
* ``{"kind": "model", ...}``: load one model (GGUF with llama-cpp-python, an ONNX directory with
  onnxruntime-genai when it has ``genai_config.json``, else onnxruntime), time the load, run llama-bench-style prompt-processing / decode tests, read the peak
  RSS, then score stored reference chunks (KLD, top-1, perplexity) and run GSM8K.

Running each model in its own process makes the peak resident set
(:func:`tasa_edge.memory.peak_rss_bytes`) per model, lets the parent apply ``RLIMIT_AS`` to the
child only, and keeps a crashing or out-of-memory model from taking the benchmark run down.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from tasa_edge import quality
from tasa_edge.memory import peak_rss_bytes
from tasa_edge.onnx_run import is_genai_dir

#: lm-eval gsm8k ``until`` strings, plus the blank line that separates few-shot examples.
GSM8K_STOPS = ["Question:", "</s>", "<|im_end|>", "\n\n"]


# ============================================================================ helpers
def ts_stats(n_tokens: int, seconds: list[float]) -> dict:
    """llama-bench's per-test summary: tokens/s mean and (sample) stddev over the repetitions."""
    ts = [n_tokens / s for s in seconds]
    return {
        "n_tokens": n_tokens,
        "ts_mean": float(statistics.fmean(ts)) if ts else 0.0,
        "ts_std": float(statistics.stdev(ts)) if len(ts) > 1 else 0.0,
        "samples_ts": [float(t) for t in ts],
        "samples_ns": [int(s * 1e9) for s in seconds],
    }


def bench_tokens(vocab: int, n: int, seed: int = 0) -> list[int]:
    """Random token ids, as llama-bench feeds the model (content does not change the speed)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab, size=max(1, n)).tolist()


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


# ============================================================================ backends
class GGUFBackend:
    """llama.cpp through llama-cpp-python; threads are used for both decode and batch."""

    kind = "gguf"

    def __init__(self, path: str, threads: int):
        self.path, self.threads = str(path), threads
        self.llm = None

    @staticmethod
    def preload() -> None:
        import llama_cpp  # noqa: F401  (loads libllama/libggml before the baseline RSS is read)

    def _open(self, n_ctx: int, logits_all: bool, n_batch: int = 512):
        from llama_cpp import Llama

        n_ctx = max(16, int(n_ctx))
        return Llama(
            model_path=self.path, n_ctx=n_ctx, n_batch=max(1, min(n_batch, n_ctx)), logits_all=logits_all,
            n_threads=self.threads, n_threads_batch=self.threads, verbose=False, seed=0,
        )

    def load(self, n_ctx: int, n_batch: int) -> float:
        t0 = time.perf_counter()
        self.llm = self._open(n_ctx, False, n_batch)
        return time.perf_counter() - t0

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
            self.llm = None

    def finish_speed(self) -> None:
        self.close()  # scoring / generation open their own contexts (the weights stay mmapped)

    @property
    def vocab(self) -> int:
        return int(self.llm.n_vocab())

    def run_pp(self, toks: list[int]) -> float:
        llm = self.llm
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(toks)
        return time.perf_counter() - t0

    def run_tg(self, toks: list[int]) -> float:
        llm = self.llm
        llm.reset()
        t0 = time.perf_counter()
        for t in toks:
            llm.eval([t])
        return time.perf_counter() - t0

    def score(self, seqs: list[np.ndarray], starts: list[int]):
        """Yield, per sequence, the logits [n-start, vocab] predicting tokens ``seq[start:]``
        (:func:`tasa_edge.llama_run.score`: the README's numbers score the same way)."""
        from tasa_edge.llama_run import score

        yield from score(self.path, seqs, starts, self.threads)

    def generate(self, prompts: list[str], max_tokens: int | list[int], stops: list[str]) -> list[str]:
        """Greedy completions; ``max_tokens``: one limit, or one per prompt."""
        from llama_cpp import Llama

        limits = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
        tok = Llama(model_path=self.path, vocab_only=True, verbose=False)
        n_prompt = max(len(tok.tokenize(p.encode(), add_bos=True, special=True)) for p in prompts)
        tok.close()
        llm = self._open(n_prompt + max(limits) + 8, False, 512)
        out = []
        try:
            for p, mt in zip(prompts, limits):  # llama-cpp-python reuses the KV cache of the shared few-shot prefix
                res = llm.create_completion(p, max_tokens=mt, temperature=0.0, top_k=1, stop=stops)
                out.append(res["choices"][0]["text"])
        finally:
            llm.close()
        return out


class OnnxBackend:
    """An exported ONNX decoder (``model.onnx`` + tokenizer) through onnxruntime's CPU provider."""

    kind = "onnx"

    def __init__(self, path: str, threads: int):
        self.path, self.threads = str(path), threads
        self.dec = None

    @staticmethod
    def preload() -> None:
        import onnxruntime  # noqa: F401

    def load(self, n_ctx: int, n_batch: int) -> float:
        """The onnxruntime session only (what an app on the device loads). The tokenizer is loaded
        later, for GSM8K: transformers' tokenizer loading imports torch (hundreds of MB of RSS),
        which is no part of the model's footprint; scoring and speed need token ids only."""
        import onnxruntime as ort

        from tasa_edge.errors import TasaError
        from tasa_edge.onnx_run import MODEL_FILE, OnnxDecoder

        d = Path(self.path)
        path = d / MODEL_FILE if d.is_dir() else d
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        t0 = time.perf_counter()
        try:
            sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise TasaError(f"onnxruntime cannot load {path}: {str(exc).splitlines()[0]}") from exc
        seconds = time.perf_counter() - t0
        past = [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
        if not past:
            raise TasaError(f"{path} has no past_key_values inputs (not a tasa-edge decoder export)")
        shape = past[0].shape  # [batch, kv_heads, past, head_dim]
        self.dec = OnnxDecoder(sess, None, len(past) // 2, int(shape[1]), int(shape[3]), [i.name for i in past],
                               [o.name for o in sess.get_outputs()])
        return seconds

    def _tokenizer(self):
        if self.dec.tokenizer is None:
            from transformers import AutoTokenizer

            d = Path(self.path)
            self.dec.tokenizer = AutoTokenizer.from_pretrained(str(d if d.is_dir() else d.parent))
        return self.dec.tokenizer

    def close(self) -> None:
        self.dec = None

    def finish_speed(self) -> None:
        pass  # the session is reused for scoring and generation

    @property
    def vocab(self) -> int:
        n = self.dec.session.get_outputs()[0].shape[-1]  # logits [batch, seq, vocab]
        return int(n) if isinstance(n, int) and n > 0 else len(self._tokenizer())

    def run_pp(self, toks: list[int]) -> float:
        d = self.dec
        t0 = time.perf_counter()
        d.step(np.array([toks]), d.empty_past(), 0)
        return time.perf_counter() - t0

    def run_tg(self, toks: list[int]) -> float:
        d = self.dec
        past = d.empty_past()
        t0 = time.perf_counter()
        for i, t in enumerate(toks):
            _, past = d.step(np.array([[t]]), past, i)
        return time.perf_counter() - t0

    def _ensure(self) -> None:
        if self.dec is None:
            self.load(0, 0)

    def score(self, seqs: list[np.ndarray], starts: list[int]):
        self._ensure()
        d = self.dec
        for ids, st in zip(seqs, starts):
            lg, _ = d.step(np.asarray(ids, dtype=np.int64)[None, :], d.empty_past(), 0)
            yield np.asarray(lg[0, st - 1: len(ids) - 1], dtype=np.float32)

    def generate(self, prompts: list[str], max_tokens: int | list[int], stops: list[str]) -> list[str]:
        """Greedy decoding with the KV cache; the longest common token prefix with the previous
        prompt (the few-shot block) is reused, as llama-cpp-python does. ``max_tokens``: one limit,
        or one per prompt."""
        self._ensure()
        limits = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
        d = self.dec
        tok = self._tokenizer()
        eos = {int(tok.eos_token_id)} if tok.eos_token_id is not None else set()
        cache_ids: list[int] = []
        cache_past = None
        out = []
        for p, max_tokens in zip(prompts, limits):
            ids = d.encode(p)
            n = 0
            if cache_past is not None:
                while n < min(len(ids) - 1, len(cache_ids)) and ids[n] == cache_ids[n]:
                    n += 1
            past = {k: v[:, :, :n] for k, v in cache_past.items()} if n else d.empty_past()
            logits, past = d.step(np.array([ids[n:]]), past, n)
            cache_ids, cache_past = ids, past
            pos, gen, text = len(ids), [], ""
            for _ in range(max_tokens):
                nxt = int(np.argmax(logits[0, -1]))
                if nxt in eos:
                    break
                gen.append(nxt)
                text = d.tokenizer.decode(gen, skip_special_tokens=True)
                cut = min((text.find(s) for s in stops if s in text), default=-1)
                if cut >= 0:
                    text = text[:cut]
                    break
                logits, past = d.step(np.array([[nxt]]), past, pos)
                pos += 1
            out.append(text)
        return out


class GenaiBackend:
    """An onnxruntime-genai export (``genai_config.json``): ``og.Model`` / ``og.Generator`` on the CPU
    provider. Speed: prompt processing is one ``append_tokens`` of the pp tokens; decode appends the
    tg tokens one at a time (each a model run with the KV cache), both from a fresh generator."""

    kind = "onnx"

    def __init__(self, path: str, threads: int):
        self.path, self.threads = str(path), threads
        self.dec = None

    @staticmethod
    def preload() -> None:
        import onnxruntime_genai  # noqa: F401

    def load(self, n_ctx: int, n_batch: int) -> float:
        """The genai model (what an app loads); the HF tokenizer only later, for GSM8K."""
        from tasa_edge.onnx_run import GenaiDecoder

        t0 = time.perf_counter()
        self.dec = GenaiDecoder.open(self.path, self.threads)
        return time.perf_counter() - t0

    def close(self) -> None:
        self.dec = None

    def finish_speed(self) -> None:
        pass

    def _ensure(self) -> None:
        if self.dec is None:
            self.load(0, 0)

    @property
    def vocab(self) -> int:
        d = Path(self.path)
        cfg = json.loads(((d if d.is_dir() else d.parent) / "genai_config.json").read_text())
        return int(cfg["model"]["vocab_size"])

    def run_pp(self, toks: list[int]) -> float:
        g = self.dec.generator(len(toks) + 1)
        t0 = time.perf_counter()
        g.append_tokens(np.asarray(toks, dtype=np.int32))
        return time.perf_counter() - t0

    def run_tg(self, toks: list[int]) -> float:
        g = self.dec.generator(len(toks) + 1)
        t0 = time.perf_counter()
        for t in toks:
            g.append_tokens(np.asarray([t], dtype=np.int32))
        return time.perf_counter() - t0

    def score(self, seqs: list[np.ndarray], starts: list[int]):
        self._ensure()
        for ids, st in zip(seqs, starts):
            lg = self.dec.logits(ids)
            yield lg[st - 1: len(ids) - 1]

    def generate(self, prompts: list[str], max_tokens: int, stops: list[str]) -> list[str]:
        """Greedy decoding with og.Generator (EOS, ``max_tokens`` or a stop string ends a completion)."""
        self._ensure()
        d = self.dec
        tok = d.tokenizer
        out = []
        for p in prompts:
            cut = [None]

            def stop(gen: list[int]) -> bool:
                text = tok.decode(gen, skip_special_tokens=True)
                at = min((text.find(s) for s in stops if s in text), default=-1)
                cut[0] = text if at < 0 else text[:at]
                return at >= 0

            gen = d.generate_ids(d.encode(p), max_tokens, stop)
            out.append(cut[0] if cut[0] is not None and gen else tok.decode(gen, skip_special_tokens=True))
        return out


def backend_class(kind: str, path: str):
    if kind == "onnx":
        return GenaiBackend if is_genai_dir(path) else OnnxBackend
    return {"gguf": GGUFBackend}[kind]


def backend_for(kind: str, path: str, threads: int):
    return backend_class(kind, path)(path, threads)


# ============================================================================ speed
def measure_speed(be, pp: int, tg: int, reps: int, seed: int = 0) -> dict:
    """llama-bench conventions: ``pp`` random tokens in one batch and ``tg`` tokens decoded one at a
    time, each from an empty context, one warm-up run then ``reps`` timed runs; t/s mean ± stddev."""
    toks = bench_tokens(be.vocab, max(pp, tg), seed)
    out: dict = {"reps": reps, "warmup": 1}
    if pp > 0:
        be.run_pp(toks[:pp])
        out["pp"] = ts_stats(pp, [be.run_pp(toks[:pp]) for _ in range(reps)])
    if tg > 0:
        be.run_tg(toks[:tg])
        out["tg"] = ts_stats(tg, [be.run_tg(toks[:tg]) for _ in range(reps)])
    return out


# ============================================================================ reference store / scoring
def load_chunk(meta_path: str | Path) -> dict:
    """A tokenised chunk (``.npz``): ``ids`` (concatenated sequences), ``offsets``, ``starts``, and,
    when a reference was run, ``tgt_lp`` / ``ref_top1`` plus the float16 log-prob matrix beside it."""
    z = dict(np.load(meta_path))
    off = z["offsets"]
    z["seqs"] = [z["ids"][off[i]: off[i + 1]] for i in range(len(off) - 1)]
    lp = Path(str(meta_path)[: -len(".npz")] + ".lp.npy")
    z["lp"] = np.load(lp, mmap_mode="r") if lp.exists() else None
    return z


def write_reference(be, meta_path: str) -> dict:
    """Run the reference over a chunk; store (:func:`tasa_edge.quality.reference_rows`) the float16
    log-probs of every scored position, the targets' log-probs and the reference's top-1."""
    z = load_chunk(meta_path)
    seqs, starts = z["seqs"], [int(s) for s in z["starts"]]
    n_pos = sum(len(s) - st for s, st in zip(seqs, starts))
    lp_path = meta_path[: -len(".npz")] + ".lp.npy"
    store = None
    tgt_lp = np.zeros(n_pos, np.float32)
    top1 = np.zeros(n_pos, np.int32)
    row = 0
    for ids, st, lg in zip(seqs, starts, be.score(seqs, starts)):
        lp, t_lp, t1 = quality.reference_rows(lg, np.asarray(ids[st:]))
        if store is None:
            store = np.lib.format.open_memmap(lp_path + ".tmp.npy", mode="w+", dtype=quality.STORE_DTYPE,
                                              shape=(n_pos, lp.shape[1]))
        m = lp.shape[0]
        store[row: row + m] = lp
        tgt_lp[row: row + m] = t_lp
        top1[row: row + m] = t1
        row += m
    store.flush()
    vocab = int(store.shape[1])
    del store
    os.replace(lp_path + ".tmp.npy", lp_path)
    keep = {k: v for k, v in np.load(meta_path).items()}
    keep.update(tgt_lp=tgt_lp, ref_top1=top1)
    tmp = meta_path + ".tmp.npz"
    np.savez(tmp, **keep)
    os.replace(tmp, meta_path)
    return {"positions": n_pos, "vocab": vocab}


def score_chunk(be, meta_path: str, out_path: str) -> dict:
    """Per scored position (:func:`tasa_edge.quality.score_rows`): KL(P_ref || P_model), top-1
    agreement and the model's log-prob of the next token, written to ``out_path`` (``.npz``) for the
    parent to aggregate over chunks."""
    z = load_chunk(meta_path)
    seqs, starts, ref = z["seqs"], [int(s) for s in z["starts"]], z["lp"]
    lq_t, kl, same = [], [], []
    row = 0
    for ids, st, lg in zip(seqs, starts, be.score(seqs, starts)):
        m = lg.shape[0]
        tgt = np.asarray(ids[st:])
        if ref is None:
            lq_t.append(quality.target_logprobs(lg, tgt))
        else:
            k, s, q = quality.score_rows(ref[row: row + m], z["ref_top1"][row: row + m], lg, tgt)
            kl.append(k)
            same.append(s)
            lq_t.append(q)
        row += m
    arrays = {"lq_t": np.concatenate(lq_t).astype(np.float32)}
    if ref is not None:
        arrays["kl"] = np.concatenate(kl)
        arrays["same_top1"] = np.concatenate(same)
        arrays["tgt_lp"] = z["tgt_lp"]
    np.savez(out_path, **arrays)
    return {"positions": row}


# ============================================================================ GSM8K
def run_gsm8k(be, examples: list[dict], shots_prefix: str, max_tokens: int, stops: list[str] | None = None) -> list[dict]:
    from tasa_edge.data import extract_flexible, extract_strict

    prompts = [shots_prefix + ex["prompt"] for ex in examples]
    texts = be.generate(prompts, max_tokens, stops or GSM8K_STOPS)
    rows = []
    for ex, text in zip(examples, texts):
        s, f = extract_strict(text), extract_flexible(text)
        rows.append({"id": ex["id"], "gold": ex["gold"], "completion": text, "strict": s, "flexible": f,
                     "strict_ok": s == ex["gold"], "flexible_ok": f == ex["gold"]})
    return rows


def run_tasks(be, examples: list[dict], stops: list[str]) -> list[dict]:
    """``--task-data`` rows with an answer check: greedy completion, graded by
    :meth:`tasa_edge.data.AnswerCheck.grade`."""
    from tasa_edge.data import AnswerCheck

    texts = be.generate([ex["prompt"] for ex in examples], [int(ex["max_tokens"]) for ex in examples], stops)
    rows = []
    for ex, text in zip(examples, texts):
        ok, got = AnswerCheck(ex["check"], ex["gold"]).grade(text)
        rows.append({"id": ex["id"], "check": ex["check"], "gold": ex["gold"], "completion": text,
                     "extracted": got, "ok": ok})
    return rows


# ============================================================================ jobs
def run_job(job: dict) -> dict:
    kind = job["kind"]
    threads = int(job.get("threads") or _cores())
    model_kind = job.get("model_kind", "gguf")
    cls = backend_class(model_kind, job["path"])
    cls.preload()
    be = cls(job["path"], threads)
    res: dict = {"threads": threads}
    if kind == "reference":
        res["chunks"] = [write_reference(be, c) for c in job["chunks"]]
        res["peak_rss_bytes"] = peak_rss_bytes()
        return res
    if kind != "model":
        raise ValueError(f"unknown job kind {kind!r}")
    speed = job.get("speed")
    if speed:
        res["rss_before_load_bytes"] = peak_rss_bytes()
        pp, tg = int(speed["pp"]), int(speed["tg"])
        res["load_s"] = be.load(pp + tg, max(1, pp))
        t0 = time.perf_counter()
        res["speed"] = measure_speed(be, pp, tg, int(speed["reps"]))
        res["speed_s"] = time.perf_counter() - t0
        res["peak_rss_bytes"] = peak_rss_bytes()
        be.finish_speed()
    t0 = time.perf_counter()
    res["scored"] = [score_chunk(be, c, o) for c, o in job.get("score", [])]
    if job.get("score"):
        res["score_s"] = time.perf_counter() - t0
    g = job.get("gsm8k")
    if g and g["examples"]:
        t0 = time.perf_counter()
        res["gsm8k"] = run_gsm8k(be, g["examples"], g["prefix"], int(g["max_tokens"]), g.get("stops"))
        res["gsm8k_s"] = time.perf_counter() - t0
    u = job.get("tasks")
    if u and u["examples"]:
        t0 = time.perf_counter()
        res["tasks"] = run_tasks(be, u["examples"], u["stops"])
        res["tasks_s"] = time.perf_counter() - t0
    be.close()
    res["peak_rss_total_bytes"] = peak_rss_bytes()
    return res


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    job_path, out_path = argv
    job = json.loads(Path(job_path).read_text())
    try:
        res = {"ok": True, **run_job(job)}
    except MemoryError:
        res = {"ok": False, "error": "out of memory" + (" (address-space limit)" if job.get("limit_bytes") else "")}
    except Exception as exc:  # reported per model by the parent
        msg = " ".join(str(exc).split()) or type(exc).__name__
        res = {"ok": False, "error": f"{type(exc).__name__}: {msg}"}
    tmp = out_path + ".tmp"
    Path(tmp).write_text(json.dumps(res))
    os.replace(tmp, out_path)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
