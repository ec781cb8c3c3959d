"""Chat templates: task prompts in the model's own conversation format.

An instruct model is trained on conversations rendered by its chat template (a Jinja2 text in the
GGUF metadata ``tokenizer.chat_template``, or ``chat_template`` in an HF directory's
``tokenizer_config.json`` / ``chat_template.jinja``).  Calibration (``analyze``) and evaluation
(``bench``: task KLD, accuracy) render every question/answer sample through it by default:

* the **prompt** is the template applied to ``[user: question]`` with the generation prompt
  (``<|im_start|>user ... <|im_start|>assistant\\n`` for SmolLM2);
* the **target** (the scored tokens) is what the template adds for ``[user: question,
  assistant: answer]`` beyond that prompt: the answer and the end-of-turn marker.

Rendering is llama-cpp-python's :class:`~llama_cpp.llama_chat_format.Jinja2ChatFormatter` (a
sandboxed Jinja2 environment kept aligned with transformers' ``apply_chat_template``:
``tests/test_chat.py`` checks both give the same text and tokens).  A BOS token the template writes
itself (``{{ bos_token }}``, gemma-3) is left out of the rendered text, because the tokenizer adds
it (llama.cpp's ``add_bos`` / the HF tokenizer's special tokens), so the sequence has one BOS.

Plain text (general documents, ``.txt`` task files) is never templated.  With the template off
(``--no-chat-template``), task prompts keep lm-eval's ``"Question: ...\\nAnswer:"`` format.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

from .data import TextSample
from .errors import TasaError

#: End-of-turn strings of common templates; generation stops at them (and at the EOS token).
END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "</s>", "<|endoftext|>")


@dataclass(frozen=True)
class ChatTemplate:
    """A model's chat template and the special-token strings it refers to."""

    template: str
    bos_token: str
    eos_token: str
    source: str                 # where it was read: "<file> (tokenizer.chat_template)" ...

    @property
    def sha256(self) -> str:
        return "sha256:" + hashlib.sha256(self.template.encode("utf-8")).hexdigest()

    def describe(self) -> dict:
        return {"used": True, "source": self.source, "sha256": self.sha256}

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The template applied to ``messages`` (``[{"role", "content"}]``), as llama-cpp-python /
        transformers render it (BOS text included, if the template writes it)."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        try:
            fmt = Jinja2ChatFormatter(self.template, eos_token=self.eos_token, bos_token=self.bos_token,
                                      add_generation_prompt=add_generation_prompt)
            return fmt(messages=messages).prompt
        except Exception as exc:  # jinja2 syntax / sandbox / raise_exception() errors
            msg = " ".join(str(exc).split())[:160]
            raise TasaError(f"the chat template of {self.source} cannot be rendered ({type(exc).__name__}: {msg}); "
                            "use --no-chat-template") from None

    def _strip_bos(self, text: str) -> str:
        if self.bos_token and "bos_token" in self.template and text.startswith(self.bos_token):
            return text[len(self.bos_token):]
        return text

    def prompt(self, messages: list[dict]) -> str:
        """The text a model continues: ``messages`` and the assistant's generation prompt (no BOS)."""
        return self._strip_bos(self.render(messages, True))

    def split(self, question: str, answer: str, history: list[dict] | None = None) -> tuple[str, str]:
        """(prompt, target) of one question/answer turn after ``history`` (earlier turns)."""
        msgs = list(history or []) + [{"role": "user", "content": question}]
        prompt = self.render(msgs, True)
        full = self.render(msgs + [{"role": "assistant", "content": answer}], False)
        if not full.startswith(prompt) or len(full) == len(prompt):
            raise TasaError(f"the chat template of {self.source} does not render an answer as a continuation of "
                            "its generation prompt; use --no-chat-template")
        return self._strip_bos(prompt), full[len(prompt):]

    def apply(self, s: TextSample) -> TextSample:
        """``s`` rendered as one user/assistant turn (question/answer samples only; plain text as is).
        The id, the split key and the answer check are kept."""
        if s.question is None or s.answer is None:
            return s
        prompt, target = self.split(s.question, s.answer)
        return replace(s, prompt=prompt, target=target)

    def stops(self) -> list[str]:
        """Strings that end a generated answer: the EOS token's text and the usual end-of-turn markers."""
        out = [self.eos_token] if self.eos_token else []
        return out + [t for t in END_OF_TURN if t in self.template and t not in out]


def apply_template(tpl: ChatTemplate | None, samples: list[TextSample]) -> list[TextSample]:
    """``samples`` through ``tpl`` (unchanged when ``tpl`` is None)."""
    return list(samples) if tpl is None else [tpl.apply(s) for s in samples]


# ---------------------------------------------------------------------------- reading templates
def model_template(path: str | Path) -> ChatTemplate | None:
    """The chat template of a GGUF file, an HF directory or an exported ONNX directory; None if the
    model has none (a base model)."""
    p = Path(path)
    if p.is_dir():
        return _hf_template(p)
    return _gguf_template(p)


def _gguf_template(p: Path) -> ChatTemplate | None:
    from gguf import GGUFReader

    from .gguf_check import check_gguf

    check_gguf(p)
    try:
        r = GGUFReader(p, "r")
    except Exception as exc:
        raise TasaError(f"cannot read GGUF {p}: {exc}") from exc

    def field(key, index=None):
        f = r.fields.get(key)
        if f is None:
            return None
        try:
            return f.contents() if index is None else f.contents(index)
        except Exception:
            return None

    tpl = field("tokenizer.chat_template")
    if not isinstance(tpl, str) or not tpl.strip():
        return None

    def token(key):
        i = field(key)
        if not isinstance(i, int):
            return ""
        t = field("tokenizer.ggml.tokens", i)
        return t if isinstance(t, str) else ""

    return ChatTemplate(tpl, token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id"),
                        f"{p.name} (tokenizer.chat_template)")


def _token_text(v) -> str:
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else ""


def _hf_template(d: Path) -> ChatTemplate | None:
    cfg: dict = {}
    cfg_path = d / "tokenizer_config.json"
    if cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TasaError(f"{cfg_path}: unreadable tokenizer config ({type(exc).__name__})") from None
        if not isinstance(cfg, dict):
            raise TasaError(f"{cfg_path}: not a JSON object")
    tpl, where = cfg.get("chat_template"), cfg_path.name
    if isinstance(tpl, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default")
    jinja = d / "chat_template.jinja"
    if (not isinstance(tpl, str) or not tpl.strip()) and jinja.is_file():
        tpl, where = jinja.read_text(encoding="utf-8"), jinja.name
    if not isinstance(tpl, str) or not tpl.strip():
        return None
    return ChatTemplate(tpl, _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token")), f"{d.name}/{where}")
