"""Running GGUF files with llama.cpp (llama-cpp-python): logits and greedy generation."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np


@contextlib.contextmanager
def open_llama(path: str | Path, n_ctx: int = 512, n_threads: int | None = None, logits_all: bool = True):
    from llama_cpp import Llama

    threads = n_threads or max(1, os.cpu_count() or 1)
    llm = Llama(
        model_path=str(path), n_ctx=n_ctx, logits_all=logits_all, verbose=False,
        n_threads=threads, n_threads_batch=threads, seed=0, n_batch=min(512, n_ctx),
    )
    try:
        yield llm
    finally:
        llm.close()


def scoring_ctx(lengths) -> int:
    """The context size for scoring sequences of these lengths: the longest, rounded up to a
    multiple of 256 (llama.cpp pads its KV cache to 256 cells anyway).  A function of the length
    bucket, not of which sequences share a call, so scoring a set whole (the README's numbers) or
    in chunks (``tasa-edge bench``) runs the same graph and gives the same logits, bit for bit."""
    n = max(16, max(lengths, default=16))
    return -(-n // 256) * 256


def score(path: str | Path, seqs, starts, n_threads: int | None = None):
    """Per sequence of token ids (BOS first), the float32 logits ``[len - start, vocab]`` that predict
    ``seq[start:]``: the one llama.cpp scoring path of the README's numbers and ``tasa-edge bench``."""
    with open_llama(path, n_ctx=scoring_ctx(len(s) for s in seqs), n_threads=n_threads) as llm:
        for ids, st in zip(seqs, starts):
            llm.reset()
            llm.eval([int(t) for t in ids])
            yield np.asarray(llm.scores[st - 1: len(ids) - 1], dtype=np.float32)


def logits(path: str | Path, texts: list[str], n_ctx: int = 256, n_threads: int | None = None):
    """For each text: (tokens [n], logits [n, vocab]) under llama.cpp, BOS prepended."""
    out = []
    with open_llama(path, n_ctx=n_ctx, n_threads=n_threads) as llm:
        for text in texts:
            toks = llm.tokenize(text.encode(), add_bos=True)[:n_ctx]
            llm.reset()
            llm.eval(toks)
            out.append((np.array(toks), np.array(llm.scores[: len(toks)], dtype=np.float32)))
    return out


def generate(path: str | Path, prompt: str, max_tokens: int = 16, n_ctx: int = 512, n_threads: int | None = None) -> str:
    """Greedy completion of ``prompt``."""
    with open_llama(path, n_ctx=n_ctx, n_threads=n_threads, logits_all=False) as llm:
        res = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, top_k=1)
    return res["choices"][0]["text"]
