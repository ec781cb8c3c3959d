"""Measured quality of exported GGUF files against the float reference (llama.cpp): the README's numbers.

The path is ``tasa-edge bench``'s, in memory: the same token ids (:func:`sample_tokens`), the same
llama.cpp scoring (:func:`tasa_edge.llama_run.score`), the same float16 reference store and
statistics (:mod:`tasa_edge.quality`) -- so on the same files and samples both give the same KLD,
bit for bit.  The reference GGUF itself comes from ``exporters.reference.reference_gguf``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import quality
from .data import TextSample

#: tokens per held-out sample (question + answer, or general text) -- the harness's TASK_CTX too.
MAX_TOKENS = 512


def sample_tokens(tokenize: Callable[[str], list[int]], s: TextSample, max_tokens: int = MAX_TOKENS):
    """(token ids, first scored index) of one sample, or None when nothing is left to score.

    ``tokenize`` adds BOS where the model's vocabulary asks for it.  Task samples are scored on the
    answer tokens conditioned on the question.  General text (empty prompt) is one window of at
    most ``max_tokens`` scored on its second half, as llama-perplexity scores each window (``first
    = n_ctx/2``), so every scored token has at least half a window of context.  The first positions
    are not informative and can dominate: Qwen2.5 adds no BOS, and its prediction from the first
    token alone is ~5.7 nats of KL away between its Q4_K_M file and that file's own F32
    dequantization, 91% of the mean over whole documents (every later position: ~0.002)."""
    ids = list(tokenize(s.prompt + s.target))[:max_tokens]
    if s.prompt:
        start = max(1, len(tokenize(s.prompt)))
    else:
        start = len(ids) // 2 + 1   # llama-perplexity: predictions of tokens first+1 .. n_ctx-1
    return (ids, start) if len(ids) > start else None


@dataclass
class Reference:
    """The reference store of a set of samples, in memory (what the harness keeps on disk)."""

    seqs: list[list[int]]
    starts: list[int]
    lp: list[np.ndarray] = field(default_factory=list)       # float16 [n - start, vocab] per sequence
    tgt_lp: list[np.ndarray] = field(default_factory=list)   # float32 [n - start]
    top1: list[np.ndarray] = field(default_factory=list)     # int32 [n - start]


def tokenize_samples(path: str | Path, samples: list[TextSample], max_tokens: int = MAX_TOKENS):
    """(sequences, starts) of ``samples`` with the tokenizer of the GGUF at ``path``."""
    from llama_cpp import Llama

    tok = Llama(model_path=str(path), vocab_only=True, verbose=False, n_ctx=16)
    try:
        items = [sample_tokens(lambda t: tok.tokenize(t.encode(), add_bos=True), s, max_tokens) for s in samples]
    finally:
        tok.close()
    items = [x for x in items if x is not None]
    return [ids for ids, _ in items], [st for _, st in items]


def reference_logprobs(ref: str | Path, samples: list[TextSample], max_tokens: int = MAX_TOKENS,
                       n_threads: int | None = None) -> Reference:
    """Run the reference GGUF over ``samples`` and keep its store (float16 log-probs, targets' log-probs, top-1)."""
    from .llama_run import score

    seqs, starts = tokenize_samples(ref, samples, max_tokens)
    r = Reference(seqs, starts)
    for ids, st, lg in zip(seqs, starts, score(ref, seqs, starts, n_threads)):
        lp, tgt_lp, top1 = quality.reference_rows(lg, np.asarray(ids[st:]))
        r.lp.append(lp)
        r.tgt_lp.append(tgt_lp)
        r.top1.append(top1)
    return r


def kld_vs_reference(ref: Reference, path: str | Path, n_threads: int | None = None) -> dict:
    """KLD (mean ± se, p99, max), top-1 agreement, perplexities and Δp of the GGUF at ``path`` on the
    reference's token ids (:func:`tasa_edge.quality.summarize`), each with its 95% interval over samples."""
    return score_vs_reference(ref, path, n_threads)[0]


def score_vs_reference(ref: Reference, path: str | Path,
                       n_threads: int | None = None) -> tuple[dict, quality.SampleSums]:
    """:func:`kld_vs_reference`'s figures and the per-sample sums they come from (to pair two
    files scored on the same reference: :meth:`tasa_edge.quality.SampleSums.paired`)."""
    from .llama_run import score

    kl, same, lq_t = [], [], []
    for i, lg in enumerate(score(path, ref.seqs, ref.starts, n_threads)):
        k, s, q = quality.score_rows(ref.lp[i], ref.top1[i], lg, np.asarray(ref.seqs[i][ref.starts[i]:]))
        kl.append(k)
        same.append(s)
        lq_t.append(q)
    args = (np.concatenate(lq_t), np.concatenate(kl), np.concatenate(same), np.concatenate(ref.tgt_lp))
    lengths = [len(k) for k in kl]
    return (quality.summarize(*args, lengths=lengths),
            quality.SampleSums.from_positions(lengths, lq_t=args[0], kl=args[1], same=args[2], tgt_lp=args[3]))
