"""Tests for tasa_edge.data: real shipped corpus and real GSM8K rows, no mocks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasa_edge.data import (
    GENERAL_SOURCES,
    GENERAL_SPLIT_SIZES,
    GSM8K_SPLIT_SIZES,
    TextSample,
    build_mixture,
    extract_flexible,
    extract_strict,
    fewshot_prefix,
    gsm8k_final_answer,
    load_general,
    load_gsm8k,
    load_user_file,
    split_of,
    split_samples,
)
from tasa_edge.errors import TasaError

# --------------------------------------------------------------------------- GSM8K


def test_gsm8k_all_rows_and_format():
    rows = load_gsm8k("all")
    assert len(rows) == 1319
    first = rows[0]
    assert first.source == "gsm8k" and first.id == "gsm8k:0"
    assert first.prompt.startswith("Question: Janet") and first.prompt.endswith("\nAnswer:")
    assert first.target.startswith(" ") and first.target.rstrip().endswith("#### 18")
    assert gsm8k_final_answer(first.target) == "18"
    assert len({s.id for s in rows}) == 1319


def test_gsm8k_split_sizes_disjoint_and_stable():
    calib, ev = load_gsm8k("calib"), load_gsm8k("eval")
    assert len(calib) == GSM8K_SPLIT_SIZES["calib"]
    assert len(ev) == GSM8K_SPLIT_SIZES["eval"]
    assert len(calib) + len(ev) == 1319
    assert 0.22 < len(ev) / 1319 < 0.28
    assert not {s.id for s in calib} & {s.id for s in ev}
    assert not {s.prompt for s in calib} & {s.prompt for s in ev}
    assert [s.id for s in load_gsm8k("eval")] == [s.id for s in ev]  # stable across calls


def test_split_rule_is_sha256_of_key():
    import hashlib

    q = load_gsm8k("all")[0].prompt[len("Question: ") : -len("\nAnswer:")]
    d = hashlib.sha256(b"tasa-edge/split/v1\0" + q.encode()).digest()
    expected = "eval" if int.from_bytes(d[:8], "big") % 10000 < 2500 else "calib"
    assert split_of(q) == expected
    assert load_gsm8k("all")[0] in load_gsm8k(expected)


def test_bad_split_name():
    with pytest.raises(TasaError, match="unknown split"):
        load_gsm8k("train")


# --------------------------------------------------------------------------- general text


def test_general_corpus_sources_and_splits():
    every = load_general("all")
    assert {s.source for s in every} == set(GENERAL_SOURCES)
    assert all(s.prompt == "" and 200 <= len(s.target) <= 4000 for s in every)
    calib, ev = load_general("calib"), load_general("eval")
    assert (len(calib), len(ev)) == (GENERAL_SPLIT_SIZES["calib"], GENERAL_SPLIT_SIZES["eval"])
    assert len(calib) + len(ev) == len(every)
    assert not {s.id for s in calib} & {s.id for s in ev}
    assert {s.source for s in calib} == {s.source for s in ev} == set(GENERAL_SOURCES)
    assert load_general("calib") == calib


def test_general_source_filter():
    lee = load_general("calib", sources=["lee_background"])
    assert lee and {s.source for s in lee} == {"lee_background"}
    with pytest.raises(TasaError, match="unknown general-text source"):
        load_general(sources=["reddit"])


# --------------------------------------------------------------------------- mixture


def test_mixture_ratio_and_determinism():
    general, task = load_general("calib"), load_gsm8k("calib")
    mix = build_mixture(general, task, n_total=64, task_ratio=0.25, seed=3)
    assert len(mix) == 64
    assert sum(s.source == "gsm8k" for s in mix) == 16
    assert len({(s.source, s.id) for s in mix}) == 64
    assert mix == build_mixture(general, task, 64, 0.25, seed=3)
    assert mix != build_mixture(general, task, 64, 0.25, seed=4)
    kinds = [s.source == "gsm8k" for s in mix]
    assert kinds != sorted(kinds)  # interleaved, not blocked
    assert all(s.source == "gsm8k" for s in build_mixture(general, task, 10, 1.0))
    assert not any(s.source == "gsm8k" for s in build_mixture(general, task, 10, 0.0))


def test_mixture_errors():
    task = load_gsm8k("eval")
    with pytest.raises(TasaError, match="between 0 and 1"):
        build_mixture([], task, 10, 1.5)
    with pytest.raises(TasaError, match="general-text samples"):
        build_mixture([], task, 10, 0.5)


def test_fewshot_prefix_uses_calib_only():
    prefix = fewshot_prefix(5, seed=0)
    assert prefix.count("Question: ") == 5 and prefix.endswith("\n\n")
    assert prefix.count("\nAnswer: ") == 5 and prefix.count("#### ") == 5
    assert prefix == fewshot_prefix(5, seed=0) != fewshot_prefix(5, seed=1)
    for s in load_gsm8k("eval"):
        assert s.prompt not in prefix
    assert fewshot_prefix(0) == ""


# --------------------------------------------------------------------------- answers


@pytest.mark.parametrize(
    "answer,expected",
    [("She makes 9 * 2 = $<<9*2=18>>18.\n#### 18", "18"), ("x\n#### 1,250", "1250"), ("#### -3", "-3")],
)
def test_gsm8k_final_answer(answer, expected):
    assert gsm8k_final_answer(answer) == expected


def test_final_answer_without_marker():
    with pytest.raises(TasaError):
        gsm8k_final_answer("The answer is 5.")


def test_extract_strict():
    assert extract_strict(" 16 - 3 - 4 = 9 eggs.\n9 * 2 = 18\n#### 18\n\nQuestion: next") == "18"
    assert extract_strict("Total is $1,200.\n#### 1,200.") == "1200"
    assert extract_strict("#### -5 degrees") == "-5"
    assert extract_strict("so the answer is 18.") is None
    assert extract_strict("#### 7\n#### 9") == "7"  # first match, as lm-eval


def test_extract_flexible():
    assert extract_flexible("He pays 3 * $4 = $12. So the answer is $1,012.") == "1012"
    assert extract_flexible("Janet sells 9 eggs and makes 18") == "18"
    assert extract_flexible("3 + 4 = 7\n#### 7") == "7"
    assert extract_flexible("The temperature drops to -4") == "-4"
    assert extract_flexible("no digits here") is None


def test_extract_on_gold_answers_matches_reference():
    for s in load_gsm8k("eval")[:50]:
        gold = gsm8k_final_answer(s.target)
        assert extract_strict(s.target) == gold
        assert extract_flexible(s.target) == gold


# --------------------------------------------------------------------------- user files


def test_user_jsonl_all_schemas(tmp_path: Path):
    f = tmp_path / "mine.jsonl"
    rows = [
        {"question": "What is 2+3?", "answer": "2+3=5\n#### 5"},
        {"prompt": "Translate: chat ->", "completion": " cat"},
        {"text": "A plain paragraph of text."},
    ]
    f.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n")
    out = load_user_file(f)
    assert out == [
        TextSample("user", "mine.jsonl:1", "Question: What is 2+3?\nAnswer:", " 2+3=5\n#### 5"),
        TextSample("user", "mine.jsonl:2", "Translate: chat ->", " cat"),
        TextSample("user", "mine.jsonl:4", "", "A plain paragraph of text."),
    ]
    assert len(split_samples(out, "calib")) + len(split_samples(out, "eval")) == 3


def test_user_txt_paragraphs(tmp_path: Path):
    f = tmp_path / "notes.txt"
    f.write_text("First paragraph\ncontinues here.\n\n\n  \nSecond one.\r\n\r\nThird.")
    out = load_user_file(f)
    assert [s.target for s in out] == ["First paragraph\ncontinues here.", "Second one.", "Third."]
    assert [s.id for s in out] == ["notes.txt:1", "notes.txt:6", "notes.txt:8"]
    assert all(s.prompt == "" and s.source == "user" for s in out)


def test_user_file_missing(tmp_path: Path):
    f = tmp_path / "nope.jsonl"
    with pytest.raises(TasaError, match="nope.jsonl: file not found"):
        load_user_file(f)


def test_user_file_bad_json_names_line(tmp_path: Path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "fine"}\n{"text": "oops"\n')
    with pytest.raises(TasaError) as e:
        load_user_file(f)
    msg = str(e.value)
    assert f"{f}:2: invalid JSON" in msg and "\n" not in msg


def test_user_file_bad_row_names_line(tmp_path: Path):
    f = tmp_path / "rows.jsonl"
    f.write_text('{"text": "ok"}\n\n{"foo": 1}\n')
    with pytest.raises(TasaError, match=r"rows\.jsonl:3: need keys .*found: foo"):
        load_user_file(f)
    f.write_text('["not", "an", "object"]\n')
    with pytest.raises(TasaError, match=r"rows\.jsonl:1: expected a JSON object"):
        load_user_file(f)
    f.write_text('{"question": "q?", "answer": ""}\n')
    with pytest.raises(TasaError, match=r"rows\.jsonl:1: field 'answer'"):
        load_user_file(f)


def test_user_file_empty_and_unsupported(tmp_path: Path):
    for name in ("empty.jsonl", "empty.txt"):
        f = tmp_path / name
        f.write_text("\n  \n")
        with pytest.raises(TasaError, match=f"{name}: no usable samples"):
            load_user_file(f)
    f = tmp_path / "data.csv"
    f.write_text("a,b\n")
    with pytest.raises(TasaError, match="data.csv: unsupported file type"):
        load_user_file(f)
