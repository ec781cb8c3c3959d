"""``tasa-edge bench`` command line in llama-bench's conventions: ``-p/-n/-r`` are the pp size,
tg size and repetitions, ``-o/--output-format`` prints the per-model rows as md/csv/json/jsonl,
the report folder is ``--out-dir`` and the reference model ``--reference``."""

from __future__ import annotations

import csv
import io
import json
import re

import pytest
from typer.testing import CliRunner

from devices import output_formats

REPORT = {
    "settings": {"pp": 64, "tg": 16, "reps": 2, "threads": 2},
    "models": [
        {"name": 'q4 "mix"', "path": "/m/q4.gguf", "format": "gguf", "file_bytes": 100, "params": 10, "bpw": 4.5,
         "load_s": 0.1, "peak_rss_bytes": 2000, "error": None,
         "speed": {"backend": "llama-bench", "build_commit": "0c1e570", "threads": 2, "reps": 2,
                   "pp": {"n_tokens": 64, "ts_mean": 500.25, "ts_std": 3.5}, "tg": {"n_tokens": 16, "ts_mean": 40.5, "ts_std": 0.5}},
         "quality": {"general": {"kld": 0.0123, "ppl": 12.0}, "task": {"kld": 0.02, "top1": 0.9}},
         "gsm8k": {"strict_match": 0.25, "flexible_extract": 0.5}},
        {"name": "broken", "path": "/m/b.gguf", "format": "gguf", "file_bytes": 5, "error": "worker exited with 1"},
    ],
}


def _cli():
    from tasa_edge.cli import app

    return app


def test_csv_rows_quote_every_value_like_llama_bench():
    text = output_formats.render(REPORT, "csv")
    lines = text.splitlines()
    assert lines[0] == ",".join(output_formats.FIELDS)
    assert lines[1].startswith('"q4 ""mix""","/m/q4.gguf","gguf","100"')
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 2
    assert rows[0]["pp_avg_ts"] == "500.25" and rows[0]["backend"] == "llama-bench" and rows[0]["n_prompt"] == "64"
    assert rows[1]["error"] == "worker exited with 1" and rows[1]["pp_avg_ts"] == ""


def test_jsonl_and_json_rows_carry_the_same_values():
    jl = [json.loads(ln) for ln in output_formats.render(REPORT, "jsonl").splitlines()]
    js = json.loads(output_formats.render(REPORT, "json"))
    assert jl == js and len(js) == 2
    assert js[0]["tg_avg_ts"] == 40.5 and js[0]["kld_general"] == 0.0123 and js[0]["gsm8k_flexible"] == 0.5
    assert js[0]["build_commit"] == "0c1e570" and js[1]["tg_avg_ts"] is None


def test_md_rows_name_the_test_sizes():
    md = output_formats.render(REPORT, "md").splitlines()
    assert "pp64 t/s" in md[0] and "tg16 t/s" in md[0]
    assert md[2].startswith('| q4 "mix" | 100 | 4.500 | llama-bench | 2 | 500.25 | 40.50 |')
    assert len(md) == 4
    with pytest.raises(ValueError):
        output_formats.render(REPORT, "sql")


@pytest.mark.parametrize("args, msg", [
    (["-o", "xml"], "unknown output format 'xml'.*--out-dir"),
    (["-p", "0", "-n", "0"], "both 0"),
    (["-n", "-3"], "--n-gen must be >= 0"),
    (["-r", "0"], "must be >= 1"),
])
def test_bad_llama_bench_style_flags_fail_before_any_run(tmp_path, args, msg):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + b"\0" * 60)
    res = CliRunner().invoke(_cli(), ["bench", str(f), *args, "--out-dir", str(tmp_path / "out")])
    assert res.exit_code != 0
    err = res.output + repr(res.exception)
    assert re.search(msg, err), err
    assert not (tmp_path / "out" / "bench.json").exists()


def test_reference_has_no_short_alias_and_plan_is_long_only():
    import typer.main

    cmd = typer.main.get_command(_cli()).commands["bench"]
    opts = {o.name: o.opts for o in cmd.params if o.param_type_name == "option"}
    assert opts["reference"] == ["--reference"]
    assert opts["plan"] == ["--plan"]
    assert set(opts["n_prompt"]) == {"-p", "--n-prompt"} and set(opts["n_gen"]) == {"-n", "--n-gen"}
    assert "-r" in opts["reps"] and "--repetitions" in opts["reps"]
    assert "-o" in opts["output_format"] and "--output-format" in opts["output_format"]
    assert "--out-dir" in opts["out"] and "-o" not in opts["out"]


@pytest.mark.slow
def test_bench_prints_jsonl_rows_to_stdout_and_writes_the_report_dir(tmp_path, smollm, monkeypatch):
    from devices import harness
    from exporters.gguf_export import export_gguf
    from tasa_edge.plan import BitPlan

    # IQ4_NL: no ggml AMX kernel (AMX matmul crashes on VMs that list AMX without its tile state)
    q = export_gguf(smollm, BitPlan.uniform(smollm, "IQ4_NL"), tmp_path / "q.gguf", show_progress=False).path
    tiny = harness.Size("small", pp=16, tg=4, reps=1, general_docs=1, general_tokens=32, task_examples=1,
                        gsm8k_examples=0, shots=0, max_gen_tokens=0)
    monkeypatch.setitem(harness.SIZES, "small", tiny)
    out = tmp_path / "rep"
    res = CliRunner().invoke(
        _cli(), ["bench", str(q), "-p", "8", "-n", "3", "-r", "2", "-t", "1", "-o", "jsonl", "--out-dir", str(out)])
    assert res.exit_code == 0, f"{res.output}\n{res.stderr}\n{res.exception!r}"
    rows = [json.loads(ln) for ln in res.stdout.splitlines()]
    assert len(rows) == 1 and rows[0]["model"] == "q" and rows[0]["error"] is None
    assert (rows[0]["n_prompt"], rows[0]["n_gen"], rows[0]["reps"], rows[0]["threads"]) == (8, 3, 2, 1)
    assert rows[0]["pp_avg_ts"] > 0 and rows[0]["tg_avg_ts"] > 0
    rep = json.loads((out / "bench.json").read_text())
    assert rep["settings"]["pp"] == 8 and rep["models"][0]["speed"]["tg"]["n_tokens"] == 3
    assert "bench.json" in res.stderr
