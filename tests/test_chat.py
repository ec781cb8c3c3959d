"""Chat templates and user task data (issue 13, items 3 and 4).

* the templated sequence (prompt + scored answer) is the text and the tokens that transformers'
  ``apply_chat_template`` and llama-cpp-python render / tokenize for SmolLM2 (it has a template);
* task-data answer checks grade completions; bad task files are one-line errors (exit 2);
* ``bench --task-data`` scores KLD on the file's eval rows and accuracy on its checkable ones, and
  never a calib row (the ids in bench.json are checked against the split of the file);
* ``analyze`` records whether the template was used, and the calibration text differs with
  ``--no-chat-template``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tasa_edge.data import (AnswerCheck, load_gsm8k, load_user_file, split_of, split_samples, user_split)
from tasa_edge.errors import TasaError

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TASA_NO_PROGRESS": "1", "PYTHONPATH": str(ROOT)}


def _key(s):  # the split key of a user row (tasa_edge.data's default: prompt + target, unrendered)
    return s.prompt + "\0" + s.target if s.prompt else s.target


def _write(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _task_file(path: Path) -> Path:
    """16 rows: 4 fall in the eval split (3, 9, 13, 16), all with an answer check."""
    rows = [{"question": f"What is {3 + i} plus {4 + 2 * i}? Answer with the number only.", "answer": str(7 + 3 * i),
             "check": "number"} for i in range(12)]
    rows += [{"question": "What is the capital of France? Answer with one word.", "answer": "Paris", "check": "regex",
              "pattern": "(?i)paris"},
             {"question": "Say the word yes.", "answer": "Yes", "check": "exact"},
             {"question": "Name a primary color.", "answer": "Red is a primary color."},
             {"question": "What colour is the sky on a clear day? One word.", "answer": "Blue", "check": "regex",
              "pattern": "(?i)blue"}]
    return _write(path, rows)


# ---------------------------------------------------------------------------- answer checks
def test_answer_checks_grade_completions():
    assert AnswerCheck("number", "1000").grade("so the total is $1,000.") == (True, "1000")
    assert AnswerCheck("number", "18").grade("16 - 3 - 4 = 9 eggs, 9 * 2 = 18\n#### 18")[0]
    assert AnswerCheck("number", "5").grade("5.0")[0] and not AnswerCheck("number", "5").grade("no idea")[0]
    assert AnswerCheck("number", "5").grade("#### 6 (or 5)") == (False, "6")   # the #### line wins
    assert AnswerCheck("exact", "Yes").grade("  Yes\n") == (True, "Yes")
    assert not AnswerCheck("exact", "Yes").grade("Yes.")[0]
    assert AnswerCheck("regex", "(?i)paris").grade("It is PARIS.") == (True, "PARIS")
    assert AnswerCheck("regex", "(?i)paris").grade("Lyon") == (False, None)


def test_task_file_checks_and_split(tmp_path):
    samples = load_user_file(_task_file(tmp_path / "mine.jsonl"))
    ev = user_split(tmp_path / "mine.jsonl", "eval")
    assert [s.id for s in ev] == ["mine.jsonl:3", "mine.jsonl:9", "mine.jsonl:13", "mine.jsonl:16"]
    assert all(split_of(_key(s)) == "eval" for s in ev) and len(split_samples(samples, "calib")) == 12
    by_id = {s.id: s for s in samples}
    assert by_id["mine.jsonl:3"].check == AnswerCheck("number", "13")
    assert by_id["mine.jsonl:13"].check == AnswerCheck("regex", "(?i)paris")
    assert by_id["mine.jsonl:14"].check == AnswerCheck("exact", "Yes")
    assert by_id["mine.jsonl:15"].check is None
    # the number of a GSM8K-style answer is its #### line; 'expected' overrides it
    (s,) = load_user_file(_write(tmp_path / "g.jsonl", [{"question": "q", "answer": "3 + 4 = 7\n#### 7", "check": "number"}]))
    assert s.check.gold == "7"
    (s,) = load_user_file(_write(tmp_path / "e.jsonl", [{"question": "q", "answer": "seven", "check": "number", "expected": 7}]))
    assert s.check.gold == "7"


BAD = [
    ('{"question": "a", "answer": "b"\n', "invalid JSON"),
    ({"question": "a", "answer": "b", "check": "fuzzy"}, "unknown check 'fuzzy'"),
    ({"question": "a", "answer": "b", "check": "regex"}, "needs a non-empty string field 'pattern'"),
    ({"question": "a", "answer": "b", "check": "regex", "pattern": "(unclosed"}, "bad regex"),
    ({"question": "a", "answer": "b", "check": "regex", "pattern": "(a+)+$"}, "exponential backtracking"),
    ({"question": "a", "answer": "no digits", "check": "number"}, "no number in the answer"),
    ({"question": "a", "answer": "b", "pattern": "x"}, "'pattern' needs"),
    ({"text": "plain", "check": "exact"}, "no answer to check"),
]


@pytest.mark.parametrize("row,msg", BAD, ids=[m for _, m in BAD])
def test_bad_task_rows_are_one_line_errors(tmp_path, row, msg):
    p = _write(tmp_path / "bad.jsonl", [row])
    with pytest.raises(TasaError, match=msg) as ei:
        load_user_file(p)
    assert "\n" not in str(ei.value) and "bad.jsonl:1" in str(ei.value)


def test_bench_rejects_bad_task_files_in_one_line(tmp_path, smollm_path):
    """Through the command line, before any model runs: exit 2, one line, no traceback, no report."""
    only_calib = _write(tmp_path / "calib-only.jsonl", [  # rows 1 and 2 of _task_file: both calib
        {"question": "What is 3 plus 4? Answer with the number only.", "answer": "7", "check": "number"},
        {"question": "What is 4 plus 6? Answer with the number only.", "answer": "10", "check": "number"}])
    assert not split_samples(load_user_file(only_calib), "eval")
    cases = [(only_calib, "none of its 2 rows falls in the eval split"),
             (_write(tmp_path / "regex.jsonl", [BAD[3][0]]), "bad regex"),
             (_write(tmp_path / "broken.jsonl", [BAD[0][0]]), "invalid JSON"),
             (tmp_path / "missing.jsonl", "file not found")]
    for path, msg in cases:
        r = subprocess.run([sys.executable, "-m", "tasa_edge.cli", "bench", str(smollm_path), "--task-data", str(path),
                            "--out-dir", str(tmp_path / "bench")], capture_output=True, text=True, env=ENV, cwd=ROOT)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and msg in lines[0] and "Traceback" not in r.stderr, r.stderr
        assert not (tmp_path / "bench" / "bench.json").exists()


def test_template_warnings(tmp_path):
    from devices.harness import template_warnings

    an = tmp_path / "analysis.json"
    an.write_text(json.dumps({"format": "tasa-edge/analysis", "config": {"chat_template": True}}))
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"provenance": {"calibration": {"task_ratio": 0.5}}}))   # older plan: no field = off
    assert template_warnings(True, an, [plan]) == [
        "plan.json was calibrated without the chat template, but this bench scores with it (--no-chat-template to match)"]
    (w,) = template_warnings(False, an, [plan])
    assert w.startswith("analysis.json was calibrated with the chat template")


# ---------------------------------------------------------------------------- SmolLM2 templates
@pytest.mark.slow
def test_templated_tokens_match_transformers_and_llama_cpp(smollm, smollm_path):
    """prompt + target of a templated sample is transformers' apply_chat_template text; its tokens
    (llama.cpp with special tokens, as bench scores them; the HF tokenizer, as analyze encodes them)
    are apply_chat_template's token ids, and the prompt is a token prefix (the scored part is the answer)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from transformers import AutoTokenizer

    from devices.harness import Tokenizer
    from tasa_edge.analysis import encode, special_prefix
    from tasa_edge.chat import model_template
    from tasa_edge.torch_model import hf_dir_for

    tpl = model_template(smollm_path)
    assert tpl is not None and tpl.eos_token == "<|im_end|>"
    hf = AutoTokenizer.from_pretrained(hf_dir_for(smollm))
    llama_tok = Tokenizer("gguf", smollm_path)
    try:
        for s in load_gsm8k("eval")[:3]:
            t = tpl.apply(s)
            assert t.id == s.id and t.prompt.startswith("<|im_start|>system\n") and "Question:" not in t.prompt
            msgs = [{"role": "user", "content": s.question}, {"role": "assistant", "content": s.answer}]
            full = hf.apply_chat_template(msgs, tokenize=False)
            assert t.prompt + t.target == full
            assert t.prompt == hf.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
            assert t.prompt == Jinja2ChatFormatter(tpl.template, tpl.eos_token, tpl.bos_token)(messages=msgs[:1]).prompt
            ids_hf = hf.apply_chat_template(msgs, tokenize=True)
            ids_hf = list(ids_hf if isinstance(ids_hf, list) else ids_hf["input_ids"])   # a BatchEncoding in transformers 5
            ids_llama = llama_tok(t.prompt + t.target, special=True)
            assert ids_llama == ids_hf
            assert ids_llama.count(llama_tok(tpl.eos_token, special=True)[-1]) == 3   # <|im_end|> one token per turn
            n_prompt = len(llama_tok(t.prompt, special=True))
            assert ids_llama[:n_prompt] == llama_tok(t.prompt, special=True)
            ids, mask = encode(hf, t, 4096, special_prefix(hf))
            assert ids[0].tolist() == ids_hf and int(mask.sum()) == len(ids_hf) - n_prompt
    finally:
        llama_tok.close()


@pytest.mark.slow
def test_bench_task_data_scores_eval_rows_only(tmp_path, smollm, smollm_f32):
    """bench --task-data on a 16-row file: KLD on its eval rows and accuracy on the checkable ones in
    bench.json / bench.md; every scored or graded id is an eval row of the file (none of the 12 calib)."""
    from devices.harness import Size, bench
    from exporters.gguf_export import export_gguf
    from tasa_edge.plan import BitPlan

    task = _task_file(tmp_path / "mine.jsonl")
    split = {s.id: split_of(_key(s)) for s in load_user_file(task)}
    qf = tmp_path / "smollm2-Q5_0.gguf"   # Q5_0: see tests/test_quality.py
    export_gguf(smollm, BitPlan.uniform(smollm, "Q5_0"), qf, show_progress=False)
    size = Size("tiny", pp=8, tg=2, reps=1, general_docs=1, general_tokens=32, task_examples=4, gsm8k_examples=0,
                shots=0, max_gen_tokens=0)
    out = tmp_path / "bench"
    rep = bench([qf], reference=smollm_f32, size=size, threads=2, out_dir=out, show_progress=False,
                task_data=task, chat_template=True)
    saved = json.loads((out / "bench.json").read_text())
    td, e = saved["task_data"], saved["models"][0]
    assert e["error"] is None and rep["task_data"] == td
    assert saved["settings"]["chat_template"]["used"] is True
    assert (td["rows"], td["calib_rows"], td["eval_rows"], td["checkable_eval_rows"]) == (16, 12, 4, 4)
    assert sorted(td["scored_ids"]) == sorted(td["graded_ids"]) == sorted(i for i, sp in split.items() if sp == "eval")
    assert all(split[i] == "eval" for i in td["scored_ids"] + td["graded_ids"])
    u = e["quality"]["user"]
    assert u["n"] >= 4 and 0 < u["kld"] < 5 and 0 <= u["top1"] <= 1 and td["kld_sequences"] == 4
    acc = e["task_accuracy"]
    rows = [json.loads(x) for x in (out / acc["completions"]).read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(td["graded_ids"]) and acc["n"] == 4
    assert acc["correct"] == sum(r["ok"] for r in rows) and acc["accuracy"] == acc["correct"] / 4
    assert {k: v["n"] for k, v in acc["by_check"].items()} == {"number": 2, "regex": 2}
    for r in rows:   # graded by the row's own check, on a real greedy completion
        assert r["completion"].strip() and r["ok"] == AnswerCheck(r["check"], r["gold"]).grade(r["completion"])[0]
    md = (out / "bench.md").read_text()
    assert "Task data `mine.jsonl` (16 rows: 12 calib, never scored; 4 eval" in md and "chat template" in md


@pytest.mark.slow
def test_analyze_records_the_chat_template(tmp_path):
    """analyze with and without --no-chat-template: the flag is recorded (analysis.json and the
    plan made from it) and the calibration text differs (same rows, other rendering)."""
    task = _write(tmp_path / "arith.jsonl", [{"question": f"What is {a} plus {b}?", "answer": f"{a} plus {b} is {a + b}."}
                                            for a in range(6) for b in range(5)])
    res = {}
    for name, flag in (("on", []), ("off", ["--no-chat-template"])):
        out = tmp_path / name
        r = subprocess.run([sys.executable, "-m", "tasa_edge.cli", "analyze", "smollm2-135m", "-o", str(out),
                            "--task-data", str(task), "--n-general", "4", "--n-task", "4", "--n-target", "1",
                            "--max-tokens", "64", "--formats", "Q4_0,Q8_0", *flag],
                           capture_output=True, text=True, env=ENV, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        res[name] = json.loads((out / "analysis.json").read_text())["config"]
        p = subprocess.run([sys.executable, "-m", "tasa_edge.cli", "plan", "smollm2-135m", "-a", str(out / "analysis.json"),
                            "--bpw", "6", "-o", str(out / "plan.json")], capture_output=True, text=True, env=ENV, cwd=ROOT)
        assert p.returncode == 0, p.stderr
        res[name]["plan_flag"] = json.loads((out / "plan.json").read_text())["provenance"]["calibration"]["chat_template"]
    on, off = res["on"], res["off"]
    assert on["chat_template"] is True and on["plan_flag"] is True and on["samples"]["chat_template"]["used"] is True
    assert off["chat_template"] is False and off["plan_flag"] is False and off["samples"]["chat_template"] == {"used": False}
    assert on["samples"]["sha256"] != off["samples"]["sha256"]
    assert on["samples"]["task_prompt_example"].endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert off["samples"]["task_prompt_example"].startswith("Question: What is ")
