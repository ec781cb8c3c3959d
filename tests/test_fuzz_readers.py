"""Hostile inputs: seeded mutations of every file kind tasa-edge reads, and the specific cases
from issue 15. Each fuzz batch runs in one child process (tests/fuzzlib.py) so an abort or a hang
is a failure, not a lost test run."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import fuzzlib  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
N_CASES = int(os.environ.get("TASA_FUZZ_CASES", "250"))


@pytest.mark.parametrize("kind", fuzzlib.KINDS)
def test_mutated_inputs_never_traceback_abort_or_hang(kind, tmp_path):
    recs = fuzzlib.run_batch(kind, N_CASES, seed=15, workdir=tmp_path, timeout=30)
    counts = fuzzlib.summarise(recs)
    bad = [r for r in recs if r["outcome"] not in ("accepted", "rejected")]
    assert not bad, (counts, bad[:5])
    # the mutations must exercise both paths, or the batch proves nothing
    assert counts.get("rejected", 0) > N_CASES // 4, counts
    assert counts.get("accepted", 0) > 0, counts


# ---------------------------------------------------------------------------- specific cases
def run_cli(*args, cwd):
    env = {**os.environ, "TASA_NO_PROGRESS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "tasa_edge.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def one_line_exit_2(res, needle=""):
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    return fuzzlib.make_bases(tmp_path_factory.mktemp("bases"))


def _patch_field(data: bytes, pick, value: int) -> bytes:
    fields, _ = fuzzlib._gguf_fields(data)
    off, fmt = pick(fields)
    b = bytearray(data)
    struct.pack_into(fmt, b, off, value)
    return bytes(b)


def test_huge_metadata_array_length_is_refused_at_once(bases, tmp_path):
    data = bases["gguf"].read_bytes()
    i = data.index(b"tokenizer.ggml.tokens") + len(b"tokenizer.ggml.tokens") + 4 + 4  # type, item type
    b = bytearray(data)
    struct.pack_into("<Q", b, i, 1 << 62)
    p = tmp_path / "huge.gguf"
    p.write_bytes(bytes(b))
    one_line_exit_2(run_cli("inspect", p, cwd=tmp_path), "cannot fit")


def test_zero_tensor_dimension_is_refused(bases, tmp_path):
    data = bases["gguf"].read_bytes()
    i = data.index(b"token_embd.weight") + len(b"token_embd.weight") + 4  # n_dims, then ne0
    b = bytearray(data)
    struct.pack_into("<Q", b, i, 0)
    p = tmp_path / "zero.gguf"
    p.write_bytes(bytes(b))
    one_line_exit_2(run_cli("inspect", p, cwd=tmp_path), "dimension 0")


def test_non_utf8_metadata_string_is_refused(bases, tmp_path):
    data = bases["gguf"].read_bytes()
    i = data.index(b"tiny")
    p = tmp_path / "latin1.gguf"
    p.write_bytes(data[:i] + b"\xff\xfe" + data[i + 2:])
    one_line_exit_2(run_cli("inspect", p, cwd=tmp_path), "UTF-8")
    one_line_exit_2(run_cli("export", p, "--type", "Q8_0", "-o", tmp_path / "o.gguf", cwd=tmp_path), "UTF-8")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["latin1.gguf"]


@pytest.mark.parametrize("value,needle", [(-1e-30, "negative importance"), (float("nan"), "non-finite"),
                                          (float("inf"), "non-finite"), (1e38, "above")])
def test_bad_importance_value_is_refused_before_ggml_sees_it(bases, tmp_path, value, needle):
    """-1e-30 made ggml SIGABRT (GGML_ASSERT(grid_index >= 0)) in an IQ export and in baseline."""
    from tasa_edge.imatrix import load_imatrix, save_legacy_dat

    st = load_imatrix(bases["imatrix_gguf"])
    name = sorted(st.sums)[0]
    st.sums[name][3] = value
    p = tmp_path / "bad.dat"
    save_legacy_dat(st, p)
    out = tmp_path / "o.gguf"
    one_line_exit_2(run_cli("export", bases["gguf"], "--type", "IQ2_XXS", "--imatrix", p, "-o", out, cwd=tmp_path), needle)
    one_line_exit_2(run_cli("baseline", bases["gguf"], "--ftype", "IQ2_XXS", "--imatrix", p, "-o", out, cwd=tmp_path), needle)
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))


def test_truncated_legacy_imatrix_is_refused(bases, tmp_path):
    p = tmp_path / "short.dat"
    p.write_bytes(bases["imatrix_dat"].read_bytes()[:40])
    one_line_exit_2(run_cli("export", bases["gguf"], "--type", "Q4_0", "--imatrix", p, "-o", tmp_path / "o.gguf", cwd=tmp_path),
                    "truncated")


def _plan(bases) -> dict:
    return json.loads(bases["plan"].read_text())


PLAN_BREAKS = {
    "provenance is a string": lambda d: d.update(provenance="hand-made"),
    "version true": lambda d: d.update(version=True),
    "lower-case type": lambda d: d["tensors"].update({k: v.lower() for k, v in d["tensors"].items()}),
    "negative budget": lambda d: d.update(budget={"bpw": -3}),
    "budget with both keys": lambda d: d.update(budget={"bpw": 3, "bytes": 10}),
    "predicted bytes a string": lambda d: d["predicted"].update(bytes="many"),
    "n_params a float": lambda d: d["model"].update(n_params=1.5),
    "unknown top-level key": lambda d: d.update(extra=1),
    "imatrix sha256 not hex": lambda d: d.update(imatrix={"path": "i.gguf", "sha256": "x" * 64, "entries": 3}),
}


@pytest.mark.parametrize("name", PLAN_BREAKS)
def test_schema_invalid_plan_is_refused_with_nothing_written(bases, tmp_path, name):
    d = _plan(bases)
    PLAN_BREAKS[name](d)
    p = tmp_path / "plan.json"
    p.write_text(json.dumps(d))
    out = tmp_path / "o.gguf"
    one_line_exit_2(run_cli("export", bases["gguf"], "--plan", p, "-o", out, cwd=tmp_path), "plan.json")
    assert not out.exists()


def test_plan_with_imatrix_block_and_null_is_accepted(bases, tmp_path):
    from tasa_edge.plan import BitPlan

    d = _plan(bases)
    for block in (None, {"path": "imatrix.gguf", "sha256": "ab" * 32, "entries": 3}):
        d["imatrix"] = block
        BitPlan.from_dict(d)


@pytest.mark.parametrize("text,needle", [
    ("[" * 5000 + "]" * 5000, "nested"),
    ("[]", "not a tasa-edge analysis"),
    ('{"format": "tasa-edge/analysis", "version": 1}', "required"),
    (b"\xff\xfe{}", "UTF-8"),
    ('{"format": "tasa-edge/analysis", "lam": NaN}', "not valid JSON"),
])
def test_malformed_analysis_is_refused(bases, tmp_path, text, needle):
    p = tmp_path / "analysis.json"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    one_line_exit_2(run_cli("plan", bases["gguf"], "-a", p, "--bpw", "6", "-o", tmp_path / "p.json", cwd=tmp_path), needle)
    assert not (tmp_path / "p.json").exists()


def test_analysis_without_table_rows_for_bytes_is_refused(bases, tmp_path):
    d = json.loads(bases["analysis"].read_text())
    name = next(iter(d["table"]["bytes"]))
    del d["table"]["bytes"][name]
    p = tmp_path / "analysis.json"
    p.write_text(json.dumps(d))
    one_line_exit_2(run_cli("plan", bases["gguf"], "-a", p, "--bpw", "6", "-o", tmp_path / "p.json", cwd=tmp_path),
                    "list different tensors")


def test_deeply_nested_plan_is_refused_by_inspect(tmp_path):
    p = tmp_path / "deep.json"
    p.write_text('{"a":' * 5000 + "1" + "}" * 5000)
    one_line_exit_2(run_cli("inspect", p, cwd=tmp_path), "nested")


def test_tensor_type_file_not_utf8_or_catastrophic_regex_is_refused(bases, tmp_path):
    p = tmp_path / "tt.txt"
    for body, needle in ((b"\xff=q8_0\n", "UTF-8"), (b"(a+)+$=q8_0\n", "exponential")):
        p.write_bytes(body)
        one_line_exit_2(run_cli("export", bases["gguf"], "--tensor-type-file", p, "--default-type", "Q8_0",
                                "-o", tmp_path / "o.gguf", cwd=tmp_path), needle)


@pytest.mark.parametrize("host", ["-oProxyCommand=touch /tmp/pwned", "a b", "host;id", "pi@-x"])
def test_hostile_ssh_host_is_refused_from_flag_and_profile(tmp_path, host):
    from devices.profiles import profile_from_dict
    from tasa_edge.errors import TasaError

    res = run_cli("bench", "x.gguf", "--target", "ssh", "--host", host, cwd=tmp_path)
    one_line_exit_2(res)
    h = host.split("@")[-1]
    with pytest.raises(TasaError, match="invalid ssh host"):
        profile_from_dict({"name": "p", "target": "ssh", "transport": {"host": h}})


def test_ssh_and_scp_put_double_dash_before_the_host(tmp_path, monkeypatch):
    from devices import remote

    exe = tmp_path / "ssh"
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    monkeypatch.setenv("TASA_SSH", str(exe))
    monkeypatch.setenv("TASA_SCP", str(exe))
    seen = []
    t = remote.SshTransport("pi.local", user="pi", port=2222)
    monkeypatch.setattr(t, "_run", lambda argv, timeout=None: seen.append(argv) or
                        subprocess.CompletedProcess(argv, 0, "tasa-edge-ok", ""))
    t.shell("echo hi")
    t.push(tmp_path / "f.gguf", "/tmp/tasa-edge/models/f.gguf")
    for argv in seen:
        i = argv.index("--")
        assert all(not a.startswith("pi@") for a in argv[:i])
        assert argv[i + 1].startswith("pi@") or argv[i + 2].startswith("pi@")
