"""Hugging Face checkpoint -> GGUF: tensor layout fixes and llama.cpp metadata.

The tensor layout (q/k permutation, gemma3 norm offset) and the hyper-parameters are the core's
(:mod:`tasa_edge.hf_layout`, used by :class:`tasa_edge.model.ModelSource` when it reads a tensor);
this module writes the file side:

- :func:`write_hf_metadata` writes the hyper-parameters llama.cpp reads for the architecture and
  the tokenizer found in the directory (via gguf-py's own vocab helpers).

Every unsupported or missing piece raises :class:`TasaError` with a one-line message.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasa_edge.errors import TasaError
from tasa_edge.hf_layout import ARCH_DEFAULTS, HParams, require, rope_params, text_config

def _write_rope_scaling(src, w, rope: dict | None) -> None:
    import gguf

    if not rope:
        return
    rtype = rope.get("rope_type") or rope.get("type")
    factor = rope.get("factor")
    if rtype in ("linear", "yarn") and not factor:
        raise TasaError(f"{src.path}: rope scaling '{rtype}' without a 'factor' in config.json")
    if rtype == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(factor))
    elif rtype == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(factor))
        if rope.get("original_max_position_embeddings"):
            w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    else:
        # llama3-style scaling needs llama.cpp's rope_freqs tensor, dynamic NTK has no llama.cpp
        # equivalent: refuse rather than export a model that silently computes something else.
        raise TasaError(f"{src.path}: rope scaling type '{rtype}' is not supported for HF export (supported: linear, yarn)")


def write_hf_metadata(src, w) -> None:
    """Architecture hyper-parameters and tokenizer of the HF directory ``src.path`` into ``w``."""
    arch = src.arch
    if arch not in ("llama", "qwen2", "qwen3", "gemma3"):
        raise TasaError(f"{src.path}: no HF metadata writer for architecture '{arch}'")
    cfg = text_config(src)
    hp = src.hparams
    if hp.n_layer != src.n_layers:
        raise TasaError(f"{src.path}: config says {hp.n_layer} layers, the model source {src.n_layers}")

    name = str(cfg.get("_name_or_path") or "").rstrip("/").split("/")[-1]
    w.add_name(name or src.path.name)
    w.add_type("model")
    w.add_context_length(hp.n_ctx)
    w.add_embedding_length(hp.n_embd)
    w.add_block_count(hp.n_layer)
    w.add_feed_forward_length(hp.n_ff)
    w.add_head_count(hp.n_head)
    w.add_head_count_kv(hp.n_head_kv)
    w.add_layer_norm_rms_eps(hp.rms_eps)
    w.add_rope_freq_base(hp.rope_theta)

    if arch == "llama":
        # llama.cpp's llama arch requires n_rot == head size
        w.add_rope_dimension_count(hp.head_dim)
        if hp.head_dim * hp.n_head != hp.n_embd:
            w.add_key_length(hp.head_dim)
            w.add_value_length(hp.head_dim)
        _write_rope_scaling(src, w, hp.rope_scaling)
    elif arch in ("qwen2", "qwen3"):
        if arch == "qwen3" or hp.head_dim * hp.n_head != hp.n_embd:
            w.add_key_length(hp.head_dim)
            w.add_value_length(hp.head_dim)
        _write_rope_scaling(src, w, hp.rope_scaling)
    elif arch == "gemma3":
        _write_gemma3(src, w, cfg, hp)

    n_vocab = _n_vocab(src, cfg)
    w.add_vocab_size(n_vocab)
    write_hf_tokenizer(src, w, n_vocab)


def _write_gemma3(src, w, cfg: dict, hp: HParams) -> None:
    w.add_key_length(hp.head_dim)
    w.add_value_length(hp.head_dim)
    # llama.cpp scales queries by 1/sqrt(head_dim) (1/sqrt(n_embd/n_head) for the 62-layer 27B)
    qpas = cfg.get("query_pre_attn_scalar")
    expected = hp.n_embd // hp.n_head if hp.n_layer == 62 else hp.head_dim
    if qpas is not None and not math.isclose(float(qpas), float(expected)):
        raise TasaError(
            f"{src.path}: query_pre_attn_scalar {qpas} differs from the {expected} llama.cpp uses for this gemma3 size"
        )
    _write_rope_scaling(src, w, hp.rope_scaling)

    window = cfg.get("sliding_window")
    if window:
        w.add_sliding_window(int(window))
        layer_types = cfg.get("layer_types")
        if isinstance(layer_types, list) and len(layer_types) == hp.n_layer:
            w.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])
        else:
            pattern = cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern")
            if pattern:
                w.add_sliding_window_pattern(int(pattern))
        local = rope_params(cfg, "sliding_attention").get("rope_theta")
        if local is None:
            local = cfg.get("rope_local_base_freq", ARCH_DEFAULTS["gemma3"]["rope_local_base_freq"])
        w.add_rope_freq_base_swa(float(local))
    for key, add in (
        ("final_logit_softcapping", w.add_final_logit_softcapping),
        ("attn_logit_softcapping", w.add_attn_logit_softcapping),
    ):
        if cfg.get(key) is not None:
            add(float(cfg[key]))


def _n_vocab(src, cfg: dict) -> int:
    """Rows of the embedding matrix: the vocabulary size llama.cpp checks the token list against."""
    emb = src.tensors.get("token_embd.weight")
    if emb is not None:
        return int(emb.shape[0])
    return int(require(cfg, "vocab_size", src.path))


# --------------------------------------------------------------------------- tokenizer

#: tokenizers pre-tokenizer regexes -> llama.cpp pre-tokenizer names (llama-vocab.cpp accepts these).
_LLAMA3_RE = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
_QWEN2_RE = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)


def _pre_tokenizer_signature(tj: dict) -> list[tuple]:
    pre = tj.get("pre_tokenizer") or {}
    items = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    sig = []
    for p in items:
        t = p.get("type")
        if t == "Split":
            pat = p.get("pattern") or {}
            sig.append(("Split", pat.get("Regex") or pat.get("String")))
        elif t == "Digits":
            sig.append(("Digits", bool(p.get("individual_digits"))))
        elif t == "ByteLevel":
            sig.append(("ByteLevel", bool(p.get("use_regex", True))))
        else:
            sig.append((t,))
    return sig


def detect_bpe_pre(tj: dict, arch: str) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level BPE tokenizer.json."""
    sig = _pre_tokenizer_signature(tj)
    if sig == [("Digits", True), ("ByteLevel", True)]:
        return "smollm"
    if sig == [("ByteLevel", True)]:
        return "gpt-2"
    if sig and sig[0] == ("Split", _LLAMA3_RE):
        return "llama-bpe"
    if sig and sig[0] == ("Split", _QWEN2_RE):
        return "qwen2"
    if arch in ("qwen2", "qwen3"):
        return "qwen2"
    logging.getLogger(__name__).warning(
        "unrecognized BPE pre-tokenizer %s; writing tokenizer.ggml.pre='default'", sig
    )
    return "default"


def _read_json(p: Path) -> dict | None:
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TasaError(f"{p}: unreadable ({exc})") from exc


def _spm_add_space_prefix(vocab) -> bool:
    """SentencePiece's add_dummy_prefix, observed: does 'a' encode with a leading '▁'?"""
    pieces = vocab.sentencepiece_tokenizer.EncodeAsPieces("a")
    return bool(pieces) and pieces[0].startswith("\u2581")


def _hf_add_space_prefix(tj: dict) -> bool:
    """Whether a (SentencePiece-converted) tokenizer.json prepends '▁' to the input."""
    def walk(node):
        if isinstance(node, dict):
            if node.get("type") == "Prepend" and node.get("prepend") == "\u2581":
                return True
            if node.get("type") == "Metaspace":
                scheme = node.get("prepend_scheme")
                if scheme is not None:
                    return scheme != "never"
                return bool(node.get("add_prefix_space", True))
            return any(walk(v) for v in node.values())
        if isinstance(node, list):
            return any(walk(v) for v in node)
        return False

    return walk(tj.get("normalizer")) or walk(tj.get("pre_tokenizer"))


def _merge_rank_scores(tj: dict, vocab: dict[str, int], n: int) -> list[float] | None:
    """Scores for llama.cpp's SPM tokenizer from BPE merge ranks (higher score = earlier merge).

    llama.cpp's SPM tokenizer repeatedly merges the adjacent pair whose concatenation has the
    highest score, which reproduces BPE merging when score = -rank of the merge producing it.
    """
    merges = (tj.get("model") or {}).get("merges") or []
    if not merges:
        return None
    scores = [0.0] * n
    seen: set[int] = set()
    for rank, m in enumerate(merges):
        a, b = (m.split(" ", 1) if isinstance(m, str) else m)
        tid = vocab.get(a + b)
        if tid is not None and tid < n and tid not in seen:
            seen.add(tid)
            scores[tid] = -float(rank + 1)
    return scores


def write_hf_tokenizer(src, w, n_vocab: int) -> None:
    """The tokenizer of ``src.path`` as llama.cpp GGUF keys (``tokenizer.ggml.*``)."""
    import gguf
    from gguf.vocab import BpeVocab, LlamaHfVocab, SentencePieceVocab

    d = Path(src.path)
    tj = _read_json(d / "tokenizer.json")
    has_spm = (d / "tokenizer.model").is_file()
    tmodel = (tj or {}).get("model") or {}
    is_bpe = tmodel.get("type") == "BPE"
    byte_fallback = bool(tmodel.get("byte_fallback", False))

    if tj is None and not has_spm:
        raise TasaError(f"{d}: no tokenizer (tokenizer.json or tokenizer.model) to write into the GGUF")

    add_space_prefix: bool
    scores_override: list[float] | None = None
    try:
        if tj is not None and is_bpe and not byte_fallback:
            vocab = BpeVocab(d)
            model, pre = "gpt2", detect_bpe_pre(tj, src.arch)
            add_space_prefix = False
        elif has_spm:
            vocab = SentencePieceVocab(d)
            model, pre = "llama", "default"
            add_space_prefix = _spm_add_space_prefix(vocab)
        elif tj is not None and is_bpe and byte_fallback:
            vocab = LlamaHfVocab(d)
            model, pre = "llama", "default"
            add_space_prefix = _hf_add_space_prefix(tj)
            scores_override = _merge_rank_scores(tj, vocab.tokenizer.get_vocab(), n_vocab)
        else:
            raise TasaError(
                f"{d}: unsupported tokenizer type '{tmodel.get('type')}' (supported: byte-level BPE, SentencePiece)"
            )
        tokens: list = []
        scores: list[float] = []
        types: list[int] = []
        for text, score, ttype in vocab.all_tokens():
            tokens.append(text)
            scores.append(float(score))
            types.append(int(ttype))
    except TasaError:
        raise
    except Exception as exc:
        raise TasaError(f"{d}: cannot read tokenizer ({type(exc).__name__}: {exc})") from exc

    if len(tokens) > n_vocab:
        raise TasaError(f"{d}: tokenizer has {len(tokens)} tokens but the embedding only {n_vocab} rows")

    # Added tokens (chat markers ...): control when special, user-defined otherwise - the types
    # llama.cpp's tokenizer uses to match them verbatim in text.
    for added in (tj or {}).get("added_tokens") or []:
        tid = added.get("id")
        if isinstance(tid, int) and 0 <= tid < len(tokens) and types[tid] not in (int(gguf.TokenType.BYTE),):
            types[tid] = int(gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED)

    if model == "llama" and not {"<0x0A>", "\n"} & {t.decode("utf-8", "replace") if isinstance(t, bytes) else t for t in tokens}:
        # llama.cpp's SentencePiece loader looks the newline byte up and aborts without it
        raise TasaError(f"{d}: SentencePiece vocabulary has no newline token (<0x0A>); llama.cpp cannot load it")

    # pad to the embedding size (rows without a token: never produced by the tokenizer)
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.UNUSED))
    if scores_override is not None:
        scores = [s if types[i] == int(gguf.TokenType.NORMAL) else scores[i] for i, s in enumerate(scores_override)]

    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    if model != "gpt2":
        w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_add_space_prefix(add_space_prefix)

    try:
        special = gguf.SpecialVocab(d, load_merges=(model == "gpt2"), n_vocab=n_vocab)
    except Exception as exc:
        raise TasaError(f"{d}: cannot read special tokens ({type(exc).__name__}: {exc})") from exc
    if model == "gpt2" and not special.merges:
        raise TasaError(f"{d}: BPE tokenizer has no merges (tokenizer.json model.merges or merges.txt)")
    if "bos" not in special.add_special_token:
        # Not stated by tokenizer_config.json nor the post-processor: transformers' default is to
        # add BOS for SentencePiece (Llama) tokenizers and not for byte-level BPE ones. Write it
        # explicitly, llama.cpp's own default differs per tokenizer type.
        special.add_special_token["bos"] = model == "llama" and "bos" in special.special_token_ids
    special.add_to_gguf(w, quiet=True)
