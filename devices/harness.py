"""The device harness: benchmark exported models (GGUF / ONNX) on a target and write a report.

:func:`bench` measures, per model file,

* size: file bytes, tensor bytes, parameters, bits/weight, tensor types;
* load time and peak resident set (each model in a fresh child process, so RSS is per model;
  ``RLIMIT_AS`` caps the child when a memory limit is given);
* speed with llama-bench's conventions: ``pp N`` (N random tokens in one batch) and ``tg N``
  (N tokens decoded one by one), each from an empty context, one warm-up then ``reps`` timed runs,
  tokens/s mean ± (sample) stddev, threads recorded;
* quality against the float reference (``reference_gguf``: the dequantized F32 GGUF), whose
  next-token log-probs are computed **once per run** and stored (float16, as llama-perplexity's
  ``--kl-divergence-base`` file) for every model to compare with: KL-divergence, top-1 agreement,
  perplexity and Δp on general held-out text (each document's window scored on its second half, as
  llama-perplexity scores) and on the GSM8K held-out split
  (answer tokens only, conditioned on the question);
* GSM8K accuracy (lm-eval ``gsm8k``: few-shot examples from the calib split, greedy,
  strict-match and flexible-extract) on held-out questions;
* decode bytes/s (bytes read per token x tokens/s) as a fraction of the probed memory bandwidth.

Targets: ``local`` (this machine: llama-cpp-python / onnxruntime-genai / onnxruntime), ``adb`` (Android) and ``ssh``
(Raspberry Pi-class boards), where llama.cpp's own ``llama-bench`` and ``llama-perplexity`` run
on the device (:mod:`devices.remote`) and task quality / GSM8K are measured on the host.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from tasa_edge import __version__, quality, stats
from tasa_edge.chat import ChatTemplate, apply_template, model_template
from tasa_edge.errors import TasaError
from tasa_edge.evaluate import MAX_TOKENS
from tasa_edge.fsutil import atomic_write_text
from tasa_edge.onnx_run import is_genai_dir
from tasa_edge.progress import progress_bar

from . import bandwidth as bw
from .machine import REMOTE_PROBE, local_machine, parse_remote, usable_cores
from .profiles import Profile, load_profile
from .worker import GSM8K_STOPS

REPORT_SCHEMA = "tasa-edge/bench-report"
REPORT_VERSION = 1
TARGETS = ("local", "adb", "ssh")
MIB = 1024 * 1024
GIB = 1024 * MIB
#: Largest reference log-prob store kept on disk at once; beyond it chunks are streamed.
DEFAULT_REF_BUDGET = 2 * GIB
CHUNK_BYTES = 512 * MIB
TASK_CTX = MAX_TOKENS   # tokens per GSM8K question+answer (longer ones are truncated)


@dataclass(frozen=True)
class Size:
    """How much work a benchmark run does. ``None`` counts mean the whole held-out split."""

    name: str
    pp: int                       # prompt tokens (pp test)
    tg: int                       # generated tokens (tg test)
    reps: int                     # timed repetitions after one warm-up
    general_docs: int | None      # general-text eval documents (275 in the split)
    general_tokens: int           # window per document, second half scored (llama-perplexity -c on devices)
    task_examples: int | None     # GSM8K eval questions scored on their answers (KLD)
    gsm8k_examples: int | None    # GSM8K eval questions generated (accuracy; 323 in the split)
    shots: int                    # few-shot examples from the calib split
    max_gen_tokens: int           # generation limit per question

    def to_dict(self) -> dict:
        return asdict(self)


SIZES = {
    "small": Size("small", 64, 16, 2, 4, 128, 4, 4, 2, 128),
    "medium": Size("medium", 512, 128, 3, 50, 512, 50, 50, 5, 256),
    "full": Size("full", 512, 128, 5, None, 512, None, None, 5, 256),
}


# ============================================================================ model files
@dataclass
class ModelFile:
    path: Path
    kind: str                          # "gguf" | "onnx"
    name: str
    file_bytes: int
    tensor_bytes: int
    params: int | None
    bpw: float | None
    types: dict
    weight_bytes_per_token: int | None  # weights read per decoded token
    kv_bytes_per_pos: int | None        # KV cache bytes per context position

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def classify(path: str | Path) -> tuple[str, Path]:
    """(``"gguf"`` | ``"onnx"``, path) for a GGUF file, an ONNX model directory or its model.onnx."""
    p = Path(path).expanduser()
    if not p.exists():
        raise TasaError(f"model file not found: {p}")
    if p.is_dir():
        if (p / "model.onnx").is_file():
            return "onnx", p
        raise TasaError(f"{p} is a directory without model.onnx (expected an exported ONNX model directory)")
    if p.suffix.lower() == ".onnx":
        return "onnx", p.parent
    with open(p, "rb") as fh:
        magic = fh.read(4)
    if magic == b"GGUF":
        return "gguf", p
    raise TasaError(f"{p} is neither a GGUF file nor an ONNX model (directory with model.onnx)")


def describe_model(path: str | Path, name: str | None = None) -> ModelFile:
    kind, p = classify(path)
    return _describe_gguf(p, name) if kind == "gguf" else _describe_onnx(p, name)


def _describe_gguf(p: Path, name: str | None) -> ModelFile:
    from .gguf_header import read_header

    h = read_header(p)
    tensors = h.tensors
    params = sum(t.n_elements for t in tensors.values())
    nbytes = sum(t.nbytes for t in tensors.values())
    types: dict[str, int] = {}
    for t in tensors.values():
        types[t.type] = types.get(t.type, 0) + 1
    # the embedding is a row lookup unless it doubles as the output matrix (tied weights)
    per_tok = sum(t.nbytes for t in tensors.values()
                  if not (t.name == "token_embd.weight" and "output.weight" in tensors))
    arch = h.arch
    kv = None

    def num(key):
        v = h.kv.get(f"{arch}.{key}")
        return max(v) if isinstance(v, list) and v else v

    n_layer, n_head, emb = num("block_count"), num("attention.head_count"), num("embedding_length")
    n_kv = num("attention.head_count_kv") or n_head
    k_len = num("attention.key_length") or (emb // n_head if emb and n_head else None)
    v_len = num("attention.value_length") or k_len
    if n_layer and n_kv and k_len:
        kv = int(n_layer) * int(n_kv) * (int(k_len) + int(v_len)) * 2  # f16 K and V per position
    return ModelFile(p, "gguf", name or p.stem, p.stat().st_size, nbytes, params, 8.0 * nbytes / max(1, params),
                     dict(sorted(types.items())), int(per_tok), kv)


def _describe_onnx(d: Path, name: str | None) -> ModelFile:
    files = [f for f in d.iterdir() if f.is_file() and (f.name == "model.onnx" or f.name.startswith("model.onnx"))]
    file_bytes = sum(f.stat().st_size for f in files)
    info_path = d / "tasa_export.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    params = (info.get("model") or {}).get("n_params")
    tensor_bytes = int((info.get("bytes") or {}).get("tensors") or file_bytes)
    types = (info.get("plan") or {}).get("types") or {}
    kv = None
    cfg_path = d / "config.json"
    if cfg_path.exists():
        cfg = json.loads(cfg_path.read_text())
        cfg = cfg.get("text_config", cfg)
        heads = cfg.get("num_attention_heads")
        hd = cfg.get("head_dim") or (cfg["hidden_size"] // heads if heads and cfg.get("hidden_size") else None)
        n_kv = cfg.get("num_key_value_heads") or heads
        if cfg.get("num_hidden_layers") and n_kv and hd:
            kv = int(cfg["num_hidden_layers"]) * int(n_kv) * int(hd) * 2 * 4  # fp32 K and V
    bpw = info.get("bpw") or (8.0 * tensor_bytes / params if params else None)
    return ModelFile(d, "onnx", name or d.name, file_bytes, tensor_bytes, params, bpw, types, tensor_bytes, kv)


# ============================================================================ samples and tokens
def _rank(key: str) -> bytes:
    return hashlib.sha256(b"tasa-edge/bench\0" + key.encode("utf-8")).digest()


def eval_samples(size: Size, chat: ChatTemplate | None = None, user: list | None = None) -> dict:
    """Deterministic held-out selections (order: sha256 of the id, so every source is represented).
    ``chat``: render the task samples with the model's chat template; ``user``: the eval split of a
    ``--task-data`` file (scored as the ``user`` set; its checkable rows are generated)."""
    from tasa_edge.data import load_general, load_gsm8k

    general = sorted(load_general("eval"), key=lambda s: _rank(s.id))
    gsm = apply_template(chat, sorted(load_gsm8k("eval"), key=lambda s: _rank(s.id)))

    def take(xs, n):
        return xs if n is None else xs[:n]

    out = {"general": take(general, size.general_docs), "task": take(gsm, size.task_examples),
           "gsm8k": take(gsm, size.gsm8k_examples), "general_pool": general}
    if user is not None:
        ranked = apply_template(chat, sorted(user, key=lambda s: _rank(s.id)))
        out["user"] = take(ranked, size.task_examples)
        out["user_gen"] = take([s for s in ranked if s.check is not None], size.task_examples)
    return out


class Tokenizer:
    """Token ids exactly as the reference model sees them (llama.cpp's tokenizer of a GGUF, or the
    HF tokenizer of an ONNX directory), so every model is scored on the same sequences."""

    def __init__(self, kind: str, path: Path):
        self.kind = kind
        if kind == "gguf":
            from llama_cpp import Llama

            with _quiet_stderr():  # llama.cpp logs a context warning even for vocab-only loads
                self._llm = Llama(model_path=str(path), vocab_only=True, verbose=False, n_ctx=16)
            self.vocab = int(self._llm.n_vocab())
        else:
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(str(path))
            self.vocab = len(self._tok)

    def __call__(self, text: str, special: bool = False) -> list[int]:
        """Token ids with BOS; ``special``: parse special-token text (``<|im_start|>`` in a chat
        template's output) as those tokens, as llama-cpp-python's completion does (the HF tokenizer
        always does)."""
        if self.kind == "gguf":
            return self._llm.tokenize(text.encode(), add_bos=True, special=special)
        return list(self._tok(text, add_special_tokens=True)["input_ids"])

    def close(self) -> None:
        if self.kind == "gguf":
            self._llm.close()


@contextlib.contextmanager
def _quiet_stderr():
    """Silence C-level writes to fd 2 (llama.cpp logging) for the duration."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, ValueError, OSError):  # pytest capture and the like
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def tokenize_sets(tok: Tokenizer, samples: dict, size: Size, chat: bool = False) -> dict[str, list[tuple[list[int], int]]]:
    """Per set: (token ids, first scored index) by :func:`tasa_edge.evaluate.sample_tokens` (the
    README path's tokenization). General text: one window of ``general_tokens`` (after BOS, where
    the model adds one) per document, its second half scored, as llama-perplexity -c scores; task:
    the answer tokens after ``Question: ...\\nAnswer:`` (or after
    the chat template's generation prompt, ``chat``: special tokens parsed); ``user`` (``--task-data``):
    likewise, plain-text rows as general text."""
    from tasa_edge.evaluate import sample_tokens

    start0 = max(1, len(tok("")))
    sets = [("general", size.general_tokens + start0, False), ("task", TASK_CTX, chat)]
    if "user" in samples:
        sets.append(("user", TASK_CTX, chat))
    out: dict[str, list] = {}
    for name, limit, special in sets:
        out[name] = []
        for s in samples[name]:
            item = sample_tokens(lambda t: tok(t, special=special), s, limit)
            if item is not None:
                out[name].append(item)
    return out


def write_chunks(seqs: dict, vocab: int, work: Path) -> list[tuple[str, Path, int]]:
    """Split the sequences into chunk files of at most ``CHUNK_BYTES`` of float16 log-probs;
    returns (set name, chunk .npz, scored positions)."""
    chunks = []
    for name, items in seqs.items():
        group: list = []
        n_pos = 0

        def flush():
            if not group:
                return
            ids = np.concatenate([np.asarray(i, np.int32) for i, _ in group])
            offs = np.cumsum([0] + [len(i) for i, _ in group])
            p = work / f"{name}-{len([c for c in chunks if c[0] == name]):03d}.npz"
            np.savez(p, ids=ids, offsets=offs, starts=np.asarray([s for _, s in group], np.int64))
            chunks.append((name, p, sum(len(i) - s for i, s in group)))

        for ids, st in items:
            m = len(ids) - st
            if group and (n_pos + m) * vocab * 2 > CHUNK_BYTES:
                flush()
                group, n_pos = [], 0
            group.append((ids, st))
            n_pos += m
        flush()
    return chunks


# ============================================================================ child processes
def _child_env(threads: int) -> dict:
    env = os.environ.copy()
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["TASA_NO_PROGRESS"] = "1"
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = "1"  # numpy in the child stays single-threaded; the model uses `threads`
    return env


def run_child(job: dict, work: Path, tag: str, threads: int, limit_bytes: int | None = None,
              timeout: float | None = None) -> dict:
    """Run one :mod:`devices.worker` job in a fresh Python process (optionally under RLIMIT_AS)."""
    job = dict(job, threads=threads, limit_bytes=limit_bytes)
    jp, rp = work / f"{tag}.job.json", work / f"{tag}.result.json"
    jp.write_text(json.dumps(job))
    if rp.exists():
        rp.unlink()

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    try:
        p = subprocess.run([sys.executable, "-m", "devices.worker", str(jp), str(rp)], env=_child_env(threads),
                           capture_output=True, text=True, errors="replace", timeout=timeout,
                           preexec_fn=limit if limit_bytes else None)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s"}
    if rp.exists():
        res = json.loads(rp.read_text())
    else:
        if p.returncode < 0:
            why = f"killed by {signal.Signals(-p.returncode).name}"
        else:
            why = f"exited with {p.returncode}"
        last = [ln for ln in p.stderr.splitlines() if ln.strip()]
        res = {"ok": False, "error": f"worker {why}" + (f": {last[-1].strip()[:200]}" if last else "")}
    if not res.get("ok") and limit_bytes:
        res["error"] += f" (memory limit {limit_bytes / GIB:.2f} GiB)"
    return res


def aggregate(score_files: list[Path], chunk_files: list[Path] | None = None) -> dict | None:
    """Mean KLD (± standard error, 99th percentile), top-1 agreement, perplexities and Δp over
    every scored position of the given chunk results (:func:`tasa_edge.quality.summarize`); with
    the chunks they score (same order), each figure's 95% interval over samples."""
    return aggregate_samples(score_files, chunk_files)[0]


def chunk_lengths(chunk_files: list[Path]) -> np.ndarray:
    """Scored positions of each sample (sequence) of the chunks, in order."""
    out = []
    for c in chunk_files:
        with np.load(c) as z:
            out.append(np.diff(z["offsets"]) - z["starts"])
    return np.concatenate(out).astype(np.int64)


def aggregate_samples(score_files: list[Path], chunk_files: list[Path] | None = None):
    """(:func:`aggregate`'s summary, the per-sample sums it came from or None): the sums pair two
    models scored on the same chunks (:meth:`tasa_edge.quality.SampleSums.paired`)."""
    arrs = [dict(np.load(f)) for f in score_files if Path(f).exists()]
    if not arrs:
        return None, None
    lengths = chunk_lengths(chunk_files) if chunk_files is not None and len(arrs) == len(score_files) else None
    lq = np.concatenate([a["lq_t"] for a in arrs])
    if lengths is not None and int(lengths.sum()) != lq.size:
        lengths = None
    if not all("kl" in a for a in arrs):
        kl = same = tgt = None
    else:
        kl, same, tgt = (np.concatenate([a[k] for a in arrs]) for k in ("kl", "same_top1", "tgt_lp"))
    summary = quality.summarize(lq, kl, same, tgt, lengths=lengths)
    sums = None if lengths is None else quality.SampleSums.from_positions(lengths, lq_t=lq, kl=kl, same=same, tgt_lp=tgt)
    return summary, sums


def gsm8k_summary(rows: list[dict], size: Size, where: str) -> dict:
    n = len(rows)

    def acc(key):
        p = sum(r[key] for r in rows) / n if n else 0.0
        return p, (math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else 0.0)

    s, s_se = acc("strict_ok")
    f, f_se = acc("flexible_ok")
    out = {"n": n, "shots": size.shots, "max_gen_tokens": size.max_gen_tokens, "split": "eval",
           "strict_match": s, "strict_match_se": s_se, "flexible_extract": f, "flexible_extract_se": f_se,
           "measured_on": where}
    if n:
        for key, col in (("strict_match", "strict_ok"), ("flexible_extract", "flexible_ok")):
            out[f"{key}_ci"] = stats.wilson(sum(bool(r[col]) for r in rows), n).to_dict()
    return out


GSM8K_KEYS = (("strict_match", "strict_ok"), ("flexible_extract", "flexible_ok"))


def comparisons(names: list[str], sums: dict, gsm_rows: dict, baseline: str) -> dict:
    """Every model against ``baseline`` on the same samples: per set (general, task) and figure the
    paired bootstrap interval of the difference (model - baseline), and per GSM8K metric the exact
    McNemar test and the accuracy difference."""
    rows = []
    for name in names:
        if name == baseline:
            continue
        row: dict = {"model": name, "baseline": baseline}
        for set_name in ("general", "task", "user"):
            a, b = (sums.get(name) or {}).get(set_name), (sums.get(baseline) or {}).get(set_name)
            if a is not None and b is not None:
                row[set_name] = {k: v.to_dict() for k, v in a.paired(b).items()}
        ga, gb = gsm_rows.get(name), gsm_rows.get(baseline)
        if ga and gb:
            by_id = {r["id"]: r for r in gb}
            common = [r for r in ga if r["id"] in by_id]
            if common:
                row["gsm8k"] = {}
                for key, col in GSM8K_KEYS:
                    t = stats.mcnemar_exact([bool(r[col]) for r in common], [bool(by_id[r["id"]][col]) for r in common])
                    row["gsm8k"][key] = {**t.to_dict(), "diff": (t.a_correct - t.b_correct) / t.n}
        rows.append(row)
    return {"baseline": baseline, "level": stats.LEVEL,
            "method": {"kld/top1/ppl": f"paired percentile bootstrap over samples (B={stats.B}, seed {stats.SEED}) "
                                       "of model - baseline",
                       "gsm8k": "exact McNemar test (two-sided binomial test of the discordant questions)"},
            "rows": rows}


def task_summary(rows: list[dict], where: str) -> dict:
    """Accuracy (± standard error) of the graded ``--task-data`` rows, overall and per check type."""
    n = len(rows)

    def acc(rs):
        p = sum(r["ok"] for r in rs) / len(rs) if rs else 0.0
        return p, (math.sqrt(p * (1 - p) / (len(rs) - 1)) if len(rs) > 1 else 0.0)

    p, se = acc(rows)
    by = {}
    for kind in sorted({r["check"] for r in rows}):
        rs = [r for r in rows if r["check"] == kind]
        by[kind] = {"n": len(rs), "correct": sum(r["ok"] for r in rs), "accuracy": acc(rs)[0]}
    return {"n": n, "correct": sum(r["ok"] for r in rows), "accuracy": p, "accuracy_se": se, "by_check": by,
            "split": "eval", "measured_on": where}


def task_data_record(path, user: list, samples: dict, seqs: dict) -> dict:
    """What bench.json records of ``--task-data``: the file, its eval rows, which of them were scored
    (KLD: ``scored_ids``) and generated (``graded_ids``)."""
    from tasa_edge.data import load_user_file

    p = Path(path)
    n_all = len(load_user_file(p))
    return {"path": str(p), "sha256": "sha256:" + hashlib.sha256(p.read_bytes()).hexdigest(), "rows": n_all,
            "eval_rows": len(user), "calib_rows": n_all - len(user), "split": "eval",
            "checkable_eval_rows": sum(1 for s in user if s.check is not None),
            "scored_ids": [s.id for s in samples.get("user", [])], "kld_sequences": len(seqs.get("user", [])),
            "graded_ids": [s.id for s in samples.get("user_gen", [])]}


# ============================================================================ bench
def resolve_reference(reference) -> Path | None:
    """A reference model spec (packaged name, GGUF, HF dir, ModelSource) -> its F32 reference GGUF
    (:func:`exporters.reference.reference_gguf`)."""
    if reference is None:
        return None
    from exporters.reference import reference_gguf
    from tasa_edge.model import ModelSource
    from tasa_edge.zoo import resolve_model

    if isinstance(reference, ModelSource):
        return reference_gguf(reference)
    p = resolve_model(reference)
    if p.is_file():
        from .gguf_header import read_header

        kind, _ = classify(p)
        if kind == "gguf" and all(t.type == "F32" for t in read_header(p).tensors.values()):
            return p  # already a float32 reference (what reference_gguf returns, without parsing it twice)
    return reference_gguf(ModelSource.open(p))


def bench(
    files,
    *,
    reference=None,
    target: str | None = None,
    size: str | Size = "small",
    threads: int | None = None,
    reps: int | None = None,
    out_dir: str | Path = "bench",
    profile: str | Path | Profile | None = None,
    plans=(),
    analysis: str | Path | None = None,
    memory_limit: int | None = None,
    host: str | None = None,
    user: str | None = None,
    port: int | None = None,
    serial: str | None = None,
    bin_dir: str | Path | None = None,
    remote_dir: str | None = None,
    host_threads: int | None = None,
    ref_budget_bytes: int = DEFAULT_REF_BUDGET,
    show_progress: bool = True,
    n_prompt: int | None = None,
    n_gen: int | None = None,
    speed_backend: str = "auto",
    baseline: str | Path | None = None,
    task_data: str | Path | None = None,
    chat_template: bool = False,
) -> dict:
    """Benchmark ``files`` (GGUF files / ONNX model directories) on ``target`` and write
    ``bench.json``, ``bench.md`` and PNG plots into ``out_dir``. Returns the report dict.

    ``reference``: model spec or path whose F32 GGUF is the KL-divergence base (None: no KLD).
    ``target``: ``local`` | ``adb`` | ``ssh`` (default: the profile's, else ``local``).
    ``size``: ``small`` | ``medium`` | ``full`` or a :class:`Size`. ``reps`` overrides its repetitions,
    ``n_prompt`` / ``n_gen`` its pp / tg sizes (llama-bench's ``-r``, ``-p``, ``-n``).
    ``speed_backend`` (local GGUF speed): ``auto`` (llama.cpp's ``llama-bench`` when
    :mod:`devices.llama_tools` finds it, else llama-cpp-python), ``llama-bench`` or ``llama-cpp-python``.
    ``baseline``: the file (one of ``files``, by path or report name) every other file is compared
    with, paired on the same samples (report key ``comparisons``); default the first file.
    ``threads``: default the profile's, else every usable core (local) / the device's cores.
    ``memory_limit`` (bytes; default the profile's ``limit_gib``): RLIMIT_AS of each local child;
    on devices it marks models whose peak RSS does not fit.
    ``plans``: bit plan JSONs to draw per-layer bits heatmaps of; ``analysis``: an analysis.json
    for the sensitivity-illusion plot.
    adb/ssh: ``serial`` / ``host``, ``user``, ``port``, ``remote_dir``, ``bin_dir`` (llama-bench and
    llama-perplexity built for the device) default to the profile's ``[transport]``; task quality and
    GSM8K run on this machine with ``host_threads`` (default: ``threads`` if given, else all cores).
    ``task_data``: a ``.jsonl`` / ``.txt`` task file (``analyze --task-data``'s format): its eval split
    (never the calib split the analysis used) is scored as the ``user`` set (KLD) and its rows with an
    answer check are generated and graded (``task_data`` accuracy).
    ``chat_template``: render task prompts (GSM8K and ``task_data``) with the chat template of the
    reference (else of the first model) when it has one; off: lm-eval's ``Question:/Answer:`` format.
    """
    prof = profile if isinstance(profile, Profile) or profile is None else load_profile(profile)
    target = target or (prof.target if prof else "local")
    if target not in TARGETS:
        raise TasaError(f"unknown target '{target}' (expected one of {', '.join(TARGETS)})")
    if isinstance(size, str):
        if size not in SIZES:
            raise TasaError(f"unknown size '{size}' (expected one of {', '.join(SIZES)})")
        size = SIZES[size]
    if reps is not None:
        if reps < 1:
            raise TasaError(f"--reps must be >= 1, got {reps}")
        size = replace(size, reps=reps)
    from .llama_tools import apply_test_sizes, choose_speed_backend

    size = apply_test_sizes(size, n_prompt, n_gen)
    speed = choose_speed_backend(speed_backend, target)
    if threads is not None and threads < 1:
        raise TasaError(f"--threads must be >= 1, got {threads}")
    if memory_limit is not None and memory_limit <= 0:
        raise TasaError("the memory limit must be positive")
    files = list(files)
    if not files:
        raise TasaError("no model files given")
    tr = dict(prof.transport) if prof else {}
    limit = memory_limit or (prof.limit_bytes if prof else None)

    kinds = [classify(f) for f in files]
    models = _unique_names([describe_model(p) for _, p in kinds])
    base_name = pick_baseline(models, baseline)
    if target != "local":
        onnx = [m.name for m in models if m.kind == "onnx"]
        if onnx:
            raise TasaError(f"ONNX model {onnx[0]}: the {target} target runs llama.cpp binaries only; "
                            "benchmark ONNX models with --target local")
    plans = [Path(p) for p in plans or ()]
    for p in plans:
        if not p.is_file():
            raise TasaError(f"plan not found: {p}")
    if analysis is not None:
        _check_analysis(Path(analysis))
    user_rows = None   # (``user`` is the ssh user)
    if task_data is not None:
        from tasa_edge.data import user_split

        user_rows = user_split(task_data, "eval")   # a bad file fails here, before any model runs
    ref_path = resolve_reference(reference)
    chat = model_template(ref_path or models[0].path) if chat_template else None
    warnings = template_warnings(chat is not None, analysis, plans)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    if plans:  # fail before the (long) run, not after it
        from .report import plan_bits_table, shape_source
        from tasa_edge.plan import BitPlan

        src = shape_source([m.to_dict() for m in models], ref_path)
        for p in plans:
            plan_bits_table(BitPlan.load(p), src)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".bench-work-", dir=out))
    try:
        if target == "local":
            th = threads or (prof.threads if prof else None) or usable_cores()
            runner = _LocalRun(models, ref_path, size, th, limit, work, out, ref_budget_bytes, show_progress)
            runner.speed_backend = speed
        else:
            runner = _RemoteRun(models, ref_path, size, threads or (prof.threads if prof else None), limit, work, out,
                                ref_budget_bytes, show_progress, kind=target, host=host or tr.get("host"),
                                user=user or tr.get("user"), port=port or tr.get("port"),
                                serial=serial or tr.get("serial"), bin_dir=bin_dir or tr.get("bin_dir") or
                                os.environ.get("TASA_LLAMA_BIN_DIR"), remote_dir=remote_dir or tr.get("remote_dir"),
                                host_threads=host_threads or (min(threads, usable_cores()) if threads else usable_cores()))
        runner.set_tasks(chat, user_rows)
        body = runner.run()
        body["comparisons"] = comparisons([m.name for m in models], runner.sums, runner.gsm_rows, base_name)
        if user_rows is not None:
            body["task_data"] = task_data_record(task_data, user_rows, runner.samples, getattr(runner, "seqs", {}))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ref_extra, target_extra = body.pop("reference_extra", {}), body.pop("target_extra", {})

    report = {
        "schema": REPORT_SCHEMA,
        "version": REPORT_VERSION,
        "tool": f"tasa-edge {__version__}",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "target": {"kind": target, "profile": prof.to_dict() if prof else None, "memory_limit_bytes": limit,
                   **target_extra},
        "settings": {**size.to_dict(), "threads": body["machine"]["threads"], "task_ctx": TASK_CTX,
                     "gsm8k_stops": list(chat.stops() if chat else GSM8K_STOPS),
                     "chat_template": chat.describe() if chat else {"used": False}},
        **({"task_data": body.pop("task_data")} if "task_data" in body else {}),
        **({"warnings": warnings} if warnings else {}),
        "reference": {"path": str(ref_path), "bytes": ref_path.stat().st_size, **ref_extra} if ref_path else None,
        **body,
    }
    from .report import write_reports

    write_reports(report, out, plans=plans, analysis=analysis, reference=ref_path)
    return report


def pick_baseline(models: list[ModelFile], baseline) -> str:
    """The report name of the baseline file: ``baseline`` given as one of the files' paths or
    report names, else the first file; anything else is a one-line error."""
    if baseline is None:
        return models[0].name
    want = Path(baseline)
    for m in models:
        if str(baseline) == m.name or (want.exists() and want.resolve() == Path(m.path).resolve()):
            return m.name
    raise TasaError(f"--baseline-file {baseline}: not one of the benchmarked files "
                    f"({', '.join(m.name for m in models)})")


def template_warnings(used: bool, analysis, plans) -> list[str]:
    """Where the analysis (``analysis.json``'s ``config.chat_template``) or a plan
    (``provenance.calibration.chat_template``) was calibrated with the chat template on and this
    bench scores with it off, or the other way round (older files, without the field, had it off)."""
    out = []
    recs = []
    if analysis is not None:
        try:
            cfg = json.loads(Path(analysis).read_text()).get("config") or {}
            recs.append((Path(analysis).name, bool(cfg.get("chat_template", False))))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            pass
    for p in plans or ():
        try:
            cal = (json.loads(Path(p).read_text()).get("provenance") or {}).get("calibration") or {}
            recs.append((Path(p).name, bool(cal.get("chat_template", False))))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            pass
    for name, was in recs:
        if was != used:
            out.append(f"{name} was calibrated {'with' if was else 'without'} the chat template, but this bench "
                       f"scores {'with' if used else 'without'} it ({'--no-chat-template' if used else '--chat-template'} "
                       "to match)")
    return out


def _check_analysis(p: Path) -> None:
    if not p.is_file():
        raise TasaError(f"analysis not found: {p}")
    try:
        fmt = json.loads(p.read_text()).get("format")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        fmt = None
    if fmt != "tasa-edge/analysis":
        raise TasaError(f"{p}: not a tasa-edge analysis file (from `tasa-edge analyze`)")


def _unique_names(models: list[ModelFile]) -> list[ModelFile]:
    seen: dict[str, int] = {}
    for m in models:
        n = seen.get(m.name, 0)
        seen[m.name] = n + 1
        if n:
            m.name = f"{m.name}-{n + 1}"
    return models


class _Run:
    """Shared parts of a local and a remote run: samples, tokens, the reference store, quality."""

    def __init__(self, models, ref_path, size, threads, limit, work, out, ref_budget, show_progress):
        self.models, self.ref, self.size, self.threads = models, ref_path, size, threads
        self.limit, self.work, self.out, self.ref_budget, self.show = limit, work, out, ref_budget, show_progress
        self.results: dict[str, dict] = {m.name: {} for m in models}
        self.errors: dict[str, str] = {}
        self.samples = eval_samples(size)
        self.ref_info: dict = {}
        self.sums: dict[str, dict] = {}        # model -> set -> quality.SampleSums (for pairing)
        self.gsm_rows: dict[str, list] = {}    # model -> GSM8K rows (for McNemar)
        self.chat: ChatTemplate | None = None
        self.user: list | None = None

    def set_tasks(self, chat: ChatTemplate | None, user: list | None) -> None:
        """Task prompts through ``chat`` (None: ``Question:/Answer:``); ``user``: the eval rows of ``--task-data``."""
        self.chat, self.user = chat, user
        self.samples = eval_samples(self.size, chat, user)

    # -- quality ------------------------------------------------------------------
    def prepare_chunks(self):
        if self.ref is not None:
            tok = Tokenizer("gguf", self.ref)
        else:
            first = self.models[0]
            tok = Tokenizer(first.kind, first.path)
        try:
            seqs = tokenize_sets(tok, self.samples, self.size, chat=self.chat is not None)
            self.vocab = tok.vocab
            self.tokenizer = tok
        except BaseException:
            tok.close()
            raise
        self.seqs = seqs
        chunks = write_chunks(seqs, tok.vocab, self.work)
        total = sum(n for _, _, n in chunks) * tok.vocab * 2
        self.stream = self.ref is not None and total > self.ref_budget
        return chunks

    def reference_chunks(self, chunks, host_threads) -> None:
        res = run_child({"kind": "reference", "path": str(self.ref), "model_kind": "gguf",
                         "chunks": [str(c) for _, c, _ in chunks]}, self.work, "reference", host_threads)
        if not res.get("ok"):
            raise TasaError(f"reference model {self.ref.name} failed: {res.get('error')}")
        self.ref_info["peak_rss_bytes"] = max(res.get("peak_rss_bytes") or 0, self.ref_info.get("peak_rss_bytes", 0))

    def gsm8k_job(self) -> dict | None:
        if not self.samples["gsm8k"]:
            return None
        from tasa_edge.data import fewshot_examples, fewshot_prefix, gsm8k_final_answer

        if self.chat is None:
            return {"prefix": fewshot_prefix(self.size.shots), "max_tokens": self.size.max_gen_tokens,
                    "examples": [{"id": s.id, "prompt": s.prompt, "gold": gsm8k_final_answer(s.target)}
                                 for s in self.samples["gsm8k"]]}
        # the few-shot examples as earlier user/assistant turns (lm-eval's fewshot_as_multiturn)
        history = [m for x in fewshot_examples(self.size.shots)
                   for m in ({"role": "user", "content": x.question}, {"role": "assistant", "content": x.answer})]
        return {"prefix": "", "max_tokens": self.size.max_gen_tokens, "stops": self.chat.stops(),
                "examples": [{"id": s.id, "prompt": self.chat.prompt(history + [{"role": "user", "content": s.question}]),
                              "gold": gsm8k_final_answer(s.answer)} for s in self.samples["gsm8k"]]}

    def user_job(self) -> dict | None:
        """Generation job of the checkable ``--task-data`` eval rows: greedy, at most twice the reference
        answer's tokens + 16 (16 ... 256), stopping at the end of the turn (chat) or at ``Question:`` / a blank line."""
        rows = (self.samples.get("user_gen") or []) if self.user is not None else []
        if not rows:
            return None
        stops = self.chat.stops() if self.chat else GSM8K_STOPS
        ex = []
        for s in rows:
            n_ans = len(self.tokenizer(s.target, special=self.chat is not None))
            ex.append({"id": s.id, "prompt": s.prompt, "check": s.check.kind, "gold": s.check.gold,
                       "max_tokens": int(min(256, max(16, 2 * n_ans + 16)))})
        return {"stops": stops, "examples": ex}

    def quality(self, speed_of, host_threads, where: str, limit) -> None:
        """Per model: one child (speed if ``speed_of(m)`` gives a spec, scoring, GSM8K)."""
        chunks = self.prepare_chunks()
        try:
            gsm = self.gsm8k_job()
            utask = self.user_job()
            if self.ref is not None and not self.stream:
                self.reference_chunks(chunks, host_threads)
            score_all = not self.stream
            with progress_bar("benchmark", len(self.models), enabled=self.show) as advance:
                for i, m in enumerate(self.models):
                    job = {"kind": "model", "path": str(m.path), "model_kind": m.kind, "speed": speed_of(m),
                           "score": [[str(c), str(self.work / f"m{i}-{c.stem}.scores.npz")] for _, c, _ in chunks]
                           if score_all else [], "gsm8k": gsm, "tasks": utask}
                    res = run_child(job, self.work, f"m{i}", host_threads, limit)
                    self._absorb(m, res, where)
                    advance(1)
            if self.stream:
                self._stream_quality(chunks, host_threads, limit)
            for i, m in enumerate(self.models):
                q = {}
                for set_name in self.seqs:
                    mine = [c for s, c, _ in chunks if s == set_name]
                    files = [self.work / f"m{i}-{c.stem}.scores.npz" for c in mine]
                    q[set_name], sums = aggregate_samples(files, mine)
                    if sums is not None and m.name not in self.errors:
                        self.sums.setdefault(m.name, {})[set_name] = sums
                q["measured_on"] = where
                self.results[m.name]["quality"] = q
            if self.ref is not None:
                self.ref_info.update(self._reference_ppl(chunks))
                self.ref_info["store"] = {"mode": "streamed" if self.stream else "stored", "chunks": len(chunks),
                                          "dtype": "float16", "vocab": self.vocab}
        finally:
            self.tokenizer.close()

    def _reference_ppl(self, chunks) -> dict:
        out = {}
        for set_name in self.seqs:
            mine = [c for s, c, _ in chunks if s == set_name and "tgt_lp" in np.load(c)]
            lps = [np.load(c)["tgt_lp"] for c in mine]
            if lps:
                lp = np.concatenate(lps)
                out[f"ppl_{set_name}"] = quality.perplexity(lp)
                out[f"positions_{set_name}"] = int(lp.size)
                ci = quality.SampleSums.from_positions(chunk_lengths(mine), tgt_lp=lp).intervals().get("ppl_ref")
                if ci is not None:
                    out[f"ppl_{set_name}_ci"] = ci.to_dict()
        return out

    def _stream_quality(self, chunks, host_threads, limit) -> None:
        for j, (_, c, _) in enumerate(chunks):
            self.reference_chunks([(None, c, 0)], host_threads)
            for i, m in enumerate(self.models):
                if m.name in self.errors:
                    continue
                job = {"kind": "model", "path": str(m.path), "model_kind": m.kind,
                       "score": [[str(c), str(self.work / f"m{i}-{c.stem}.scores.npz")]]}
                res = run_child(job, self.work, f"m{i}-c{j}", host_threads, limit)
                if not res.get("ok"):
                    self.errors[m.name] = res.get("error", "failed")
            lp = Path(str(c)[: -len(".npz")] + ".lp.npy")
            lp.unlink(missing_ok=True)  # the next chunk's log-probs take its place on disk

    def _absorb(self, m: ModelFile, res: dict, where: str) -> None:
        r = self.results[m.name]
        if not res.get("ok"):
            self.errors[m.name] = res.get("error", "failed")
            return
        for k in ("load_s", "peak_rss_bytes", "rss_before_load_bytes", "peak_rss_total_bytes"):
            if k in res:
                r[k] = res[k]
        r.setdefault("timings", {}).update({k: res[k] for k in ("speed_s", "score_s", "gsm8k_s", "tasks_s") if k in res})
        if "speed" in res:
            r["speed"] = {"backend": _backend_name(m.kind, m.path), "threads": res["threads"], **res["speed"]}
        if res.get("gsm8k") is not None:
            rows = res["gsm8k"]
            self.gsm_rows[m.name] = rows
            path = self.out / f"gsm8k-{m.name}.jsonl"
            atomic_write_text(path, "".join(json.dumps(x) + "\n" for x in rows))
            r["gsm8k"] = {**gsm8k_summary(rows, self.size, where), "completions": path.name}
        if res.get("tasks") is not None:
            rows = res["tasks"]
            path = self.out / f"task-data-{m.name}.jsonl"
            atomic_write_text(path, "".join(json.dumps(x) + "\n" for x in rows))
            r["task_accuracy"] = {**task_summary(rows, where), "completions": path.name}

    # -- assembly --------------------------------------------------------------------
    def model_entries(self, bandwidth) -> list[dict]:
        out = []
        for m in self.models:
            r = self.results[m.name]
            e = {"name": m.name, "path": str(m.path), "format": m.kind, "types": m.types,
                 "file_bytes": m.file_bytes, "tensor_bytes": m.tensor_bytes, "params": m.params, "bpw": m.bpw,
                 "load_s": r.get("load_s"), "peak_rss_bytes": r.get("peak_rss_bytes"),
                 "rss_before_load_bytes": r.get("rss_before_load_bytes"),
                 "speed": r.get("speed"), "quality": r.get("quality"), "gsm8k": r.get("gsm8k"),
                 **({"task_accuracy": r.get("task_accuracy")} if self.user is not None else {}),
                 "device_quality": r.get("device_quality"), "timings": r.get("timings"),
                 "error": self.errors.get(m.name)}
            tg = ((r.get("speed") or {}).get("tg") or {}).get("ts_mean")
            per_tok = None
            if m.weight_bytes_per_token:
                per_tok = m.weight_bytes_per_token + (m.kv_bytes_per_pos or 0) * self.size.tg // 2
            e["decode"] = bw.decode_efficiency(per_tok, tg, bandwidth)
            if self.limit and e["peak_rss_bytes"]:
                e["fits_memory"] = e["peak_rss_bytes"] <= self.limit
            out.append(e)
        return out


def _backend_name(kind: str, path: Path | None = None) -> str:
    from .machine import _version

    if kind == "gguf":
        return f"llama-cpp-python {_version('llama_cpp')}"
    if path is not None and is_genai_dir(path):
        return f"onnxruntime-genai {_version('onnxruntime-genai')} (onnxruntime {_version('onnxruntime')}) CPU"
    return f"onnxruntime {_version('onnxruntime')} CPU"


class _LocalRun(_Run):
    def run(self) -> dict:
        machine = local_machine(self.threads)
        band = bw.probe_local(self.threads)
        sz = self.size
        from .llama_tools import local_llama_bench

        # llama-bench measures GGUF speed first (alone on the machine); the worker then only loads and
        # runs one pp and one tg pass (reps 0) for load time and peak RSS, as before
        lb, speed_info = local_llama_bench(self)
        self.quality(lambda m: {"pp": sz.pp, "tg": sz.tg, "reps": 0 if m.name in lb else sz.reps},
                     self.threads, "target", self.limit)
        for name, sp in lb.items():
            self.results[name]["speed"] = sp
        return {"machine": machine, "bandwidth": band, "models": self.model_entries(band),
                "reference_extra": self.ref_info, "target_extra": speed_info}


_ARCH_ALIASES = {"arm64": "aarch64", "armv8l": "aarch64", "amd64": "x86_64", "x64": "x86_64"}


def _emulation(binary_arch: str | None, device_arch: str | None) -> dict | None:
    """When the llama.cpp binaries are built for another CPU than the device reports (``uname -m``),
    the device runs them under an emulator (qemu-user, binfmt_misc): the speeds are then the
    emulator's, not the device's figures. Returns that note, or None."""
    norm = lambda a: _ARCH_ALIASES.get((a or "").lower(), (a or "").lower())  # noqa: E731
    if not binary_arch or not device_arch or norm(binary_arch) == norm(device_arch):
        return None
    return {"binary_arch": norm(binary_arch), "device_arch": norm(device_arch),
            "note": f"{norm(binary_arch)} binaries ran under emulation on a {norm(device_arch)} CPU: "
                    "speeds, load times and RSS are the emulator's, not device figures"}


class _RemoteRun(_Run):
    def __init__(self, *a, kind, host, user, port, serial, bin_dir, remote_dir, host_threads):
        super().__init__(*a)
        self.host_threads = host_threads
        from .remote import AdbTransport, SshTransport

        self.kind = kind
        if kind == "adb":
            self.transport = AdbTransport(serial=serial, remote_dir=remote_dir)
        else:
            self.transport = SshTransport(host, user=user, port=port, remote_dir=remote_dir)
        self.bin_dir = bin_dir

    def run(self) -> dict:
        from .remote import DeviceTools, DeviceError

        t = self.transport
        t.check()
        tools = DeviceTools(t, self.bin_dir)
        rc, text, _ = t.shell(REMOTE_PROBE)
        machine = parse_remote(text, self.threads)
        self.threads = self.threads or machine["cores"] or 4
        machine["threads"] = self.threads
        tools.setup()
        emulation = _emulation(tools.binary_arch(), machine.get("arch"))
        sz = self.size
        remote = {}
        with progress_bar(f"push to {t.label}", len(self.models), enabled=self.show) as advance:
            for m in self.models:
                remote[m.name] = tools.push_file(m.path, f"{tools.rd}/models/{m.name}.gguf")
                advance(1)
        band = bw.probe_remote(lambda c: t.shell(c)[:2], remote[self.models[0].name])
        dev_ref = self._device_reference(tools)
        with progress_bar(f"llama-bench on {t.label}", len(self.models), enabled=self.show) as advance:
            for i, m in enumerate(self.models):
                r = self.results[m.name]
                try:
                    b = tools.bench(remote[m.name], sz.pp, sz.tg, sz.reps, self.threads, f"bench-{i}")
                    r["peak_rss_bytes"] = b.pop("peak_rss_bytes")
                    r["speed"] = {**b, "backend": "llama-bench", "threads": b.get("threads") or self.threads}
                    if dev_ref is not None:
                        k = tools.kld(remote[m.name], dev_ref["base"], dev_ref["ctx"], self.threads, f"kld-{i}")
                        r["load_s"] = k.pop("load_s", None)
                        if k.get("peak_rss_bytes"):
                            r["peak_rss_bytes"] = max(r["peak_rss_bytes"] or 0, k["peak_rss_bytes"])
                        k.pop("peak_rss_bytes", None)
                        r["device_quality"] = {"general": k, "ctx": dev_ref["ctx"], "text_tokens": dev_ref["tokens"]}
                    if emulation:
                        r["speed"]["emulated"] = True
                except DeviceError:
                    raise  # unreachable / out of memory / storage full: no report at all
                except TasaError as exc:
                    self.errors[m.name] = str(exc)
                advance(1)
        # task KLD and GSM8K need prompt-conditioned scoring and generation: on the host
        errs = dict(self.errors)
        self.quality(lambda m: None, self.host_threads, "host", None)
        self.errors.update(errs)
        return {"machine": machine, "bandwidth": band, "models": self.model_entries(band),
                "reference_extra": {**self.ref_info, "device": {k: v for k, v in (dev_ref or {}).items() if k != "base"}}
                if self.ref else {},
                "target_extra": {"transport": t.describe(), "bin_dir": str(self.bin_dir) if self.bin_dir else None,
                                 "host_threads": self.host_threads, "emulation": emulation}}

    def _device_reference(self, tools) -> dict | None:
        """Push the reference and a general-text file; write llama-perplexity's KLD base once."""
        if self.ref is None:
            return None
        if self.limit and self.ref.stat().st_size > self.limit:
            self.ref_info["device_note"] = "reference larger than the device memory limit: no on-device KLD"
            return None
        ctx = self.size.general_tokens
        tok = Tokenizer("gguf", self.ref)
        try:
            docs, n = [], 0
            pool = self.samples["general"] + [s for s in self.samples["general_pool"] if s not in self.samples["general"]]
            for s in pool:  # llama-perplexity needs >= 2 chunks of ctx tokens
                docs.append(s.text)
                n += len(tok(s.text))
                if len(docs) >= len(self.samples["general"]) and n >= 3 * ctx:
                    break
        finally:
            tok.close()
        text = self.work / "general-eval.txt"
        text.write_text("\n\n".join(docs), encoding="utf-8")
        rtext = tools.push_file(text, f"{tools.rd}/run/general-eval.txt")
        rref = tools.push_file(self.ref)
        base = f"{tools.rd}/run/reference.kld"
        info = tools.kld_base(rref, rtext, base, ctx, self.threads)
        return {"base": base, "ctx": ctx, "tokens": n, "ppl": info.get("ppl") or info.get("final_ppl")}
