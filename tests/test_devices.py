"""Issue D: the device harness (`tasa-edge bench`) -- local, adb and ssh targets, reports.

Fast tests cover profiles, the llama-bench / llama-perplexity / dd parsers, the KLD store against
:func:`tasa_edge.quality.compare_logits`, and clear errors for missing devices. The slow tests bench
real exports of the packaged SmolLM2-135M: two GGUF files and an ONNX directory locally through the
CLI (one command -> JSON, Markdown, PNGs), and the adb / ssh command flow against local stand-in
executables (a fake ``adb`` / ``ssh`` / ``scp`` that run the device side in a directory, and
llama-bench / llama-perplexity stand-ins that print llama.cpp's formats from our own measurement).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from devices import bandwidth, harness, machine, profiles, remote
from devices.harness import Size, bench
from tasa_edge.errors import TasaError

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: the least work that still runs every stage of a device flow
TINY = Size("tiny", pp=16, tg=4, reps=1, general_docs=2, general_tokens=64, task_examples=1,
            gsm8k_examples=0, shots=0, max_gen_tokens=0)


def one_line(exc) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg
    return msg


# ============================================================================ stand-in device tools
ADB = r'''#!@PY@
"""Stand-in adb: one emulated device whose /data/local/tmp is a local directory."""
import os, shutil, subprocess, sys, time
ROOT, LOG, PREFIX = @ROOT@, @LOG@, "/data/local/tmp"
with open(LOG, "a") as fh:
    fh.write(f"{time.time():.2f} adb " + " ".join(sys.argv[1:]) + "\n")
args = sys.argv[1:]
listed = [d.split(":") for d in os.environ.get("STANDIN_ADB_DEVICES", "").split(",") if d]
serial = None
if args[:1] == ["-s"]:
    serial, args = args[1], args[2:]
if args[0] == "devices":
    print("List of devices attached")
    for s, st in listed:
        print(f"{s}\t{st}")
    print()
    sys.exit(0)
ready = [s for s, st in listed if st == "device"]
if not ready or (serial and serial not in ready):
    print("adb: no devices/emulators found", file=sys.stderr)
    sys.exit(1)
local = lambda p: p.replace(PREFIX, ROOT + PREFIX)
if args[0] == "push":
    dst = local(args[2])
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.copyfile(args[1], dst)
    print(f"{args[1]}: 1 file pushed")
    sys.exit(0)
if args[0] == "shell":
    sys.exit(subprocess.run(["sh", "-c", local(" ".join(args[1:]))]).returncode)
print("adb: unknown command " + args[0], file=sys.stderr)
sys.exit(1)
'''

SSH = r'''#!@PY@
"""Stand-in ssh / scp: the remote host is a local directory (REMOTE prefix mapped under ROOT)."""
import os, shutil, subprocess, sys, time
ROOT, LOG, REMOTE = @ROOT@, @LOG@, @REMOTE@
prog = os.path.basename(sys.argv[0])
with open(LOG, "a") as fh:
    fh.write(f"{time.time():.2f} {prog} " + " ".join(sys.argv[1:]) + "\n")
args, rest = sys.argv[1:], []
while args:
    a = args.pop(0)
    if a in ("-o", "-p", "-P", "-i"):
        args.pop(0)
    elif a.startswith("-") and not rest:
        continue
    else:
        rest.append(a)
local = lambda p: p.replace(REMOTE, ROOT + REMOTE)
if prog == "scp":
    src, dest = rest
    host, path = dest.split(":", 1)
else:
    host, path = rest[0], None
if "unreachable" in host:
    print(f"ssh: connect to host {host} port 22: Connection refused", file=sys.stderr)
    sys.exit(255)
if prog == "scp":
    os.makedirs(os.path.dirname(local(path)), exist_ok=True)
    shutil.copyfile(src, local(path))
    sys.exit(0)
sys.exit(subprocess.run(["sh", "-c", local(" ".join(rest[1:]))]).returncode)
'''

#: llama-bench / llama-perplexity on the stand-in device: the test double tests/fakes/pybench.py
TOOL = '#!/bin/sh\nexec "@PY@" "@FAKE@" @TOOL@ "$@"\n'


def _script(path: Path, text: str, **subs) -> Path:
    for k, v in subs.items():
        text = text.replace(f"@{k}@", v)
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def standins(tmp_path, monkeypatch):
    """Fake adb/ssh/scp on $TASA_ADB/$TASA_SSH/$TASA_SCP, a device root and a --bin-dir of llama tools."""
    root, log = tmp_path / "device-root", tmp_path / "standin.log"
    exe, tools = tmp_path / "exe", tmp_path / "llama-bin"
    for d in (root, exe, tools):
        d.mkdir()
    subs = {"PY": sys.executable, "ROOT": repr(str(root)), "LOG": repr(str(log)), "REMOTE": repr("/opt/tasa-edge")}
    _script(exe / "adb", ADB, **subs)
    _script(exe / "ssh", SSH, **subs)
    _script(exe / "scp", SSH, **subs)
    for t in ("llama-bench", "llama-perplexity"):
        _script(tools / t, TOOL, PY=sys.executable, FAKE=str(ROOT / "tests" / "fakes" / "pybench.py"), TOOL=t)
    monkeypatch.setenv("TASA_ADB", str(exe / "adb"))
    monkeypatch.setenv("TASA_SSH", str(exe / "ssh"))
    monkeypatch.setenv("TASA_SCP", str(exe / "scp"))
    monkeypatch.setenv("STANDIN_ADB_DEVICES", "emulator-5554:device")
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return {"root": root, "log": log, "bin": tools}



# ============================================================================ profiles
def test_shipped_profiles_load_and_validate():
    names = profiles.list_profiles()
    assert {"local-cpu", "pixel-8", "raspberry-pi-5"} <= set(names)
    for n in names:
        p = profiles.load_profile(n)
        assert p.target in profiles.TARGETS and p.gguf_formats and p.onnx_formats
    px = profiles.load_profile("pixel-8")
    assert (px.target, px.threads, px.limit_bytes) == ("adb", 4, int(3.5 * 2**30))
    assert {"Q4_0", "IQ4_NL", "Q4_K", "Q8_0"} <= set(px.gguf_formats) and px.onnx_accuracy_level == 4
    assert px.transport["remote_dir"] == "/data/local/tmp/tasa-edge"
    pi = profiles.load_profile("raspberry-pi-5")
    assert pi.target == "ssh" and pi.transport["host"] and pi.ram_bytes == 8 * 2**30
    assert profiles.load_profile("local-cpu").threads is None  # 0 = every usable core


@pytest.mark.parametrize("text, match", [
    ('name = "x"\ntarget = "usb"\n', "target"),
    ('name = "x"\ntarget = "local"\ncolour = "red"\n', "unknown key 'colour'"),
    ('name = "x"\ntarget = "local"\n[cpu]\nthreads = "four"\n', "cpu.threads"),
    ('name = "x"\ntarget = "adb"\n[formats]\ngguf = ["Q4_Z"]\n', "Q4_Z"),
    ('name = "x"\ntarget = "adb"\n[formats]\nonnx = ["int3_b32"]\n', "int3_b32"),
    ('name = "x"\ntarget = "ssh"\n', "transport.host"),
    ('name = "x"\ntarget = "local"\n[memory]\nram_gib = 4\nlimit_gib = 6\n', "exceeds"),
    ('name = "x"\ntarget = "adb"\n[transport]\nhost = "pi"\n', "do not apply"),
    ('name = "x"\ntarget = "adb"\n[transport]\nremote_dir = "tmp"\n', "absolute"),
    ('name = "x"\ntarget = \n', "invalid TOML"),
])
def test_profile_validation_errors(tmp_path, text, match):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(TasaError, match=match) as exc:
        profiles.load_profile(p)
    assert str(p) in one_line(exc)


def test_unknown_profile_name():
    with pytest.raises(TasaError, match="unknown device profile 'iphone-99'.*pixel-8") as exc:
        profiles.load_profile("iphone-99")
    one_line(exc)


# ============================================================================ parsers
LLAMA_BENCH_JSON = """load_backend: loaded CPU backend from /data/local/tmp/tasa-edge/bin/libggml-cpu.so
[
  {"build_commit": "b1c2d3e", "build_number": 6500, "cpu_info": "ARMv8 Processor", "backends": "CPU",
   "model_type": "llama ?B Q4_0", "model_size": 77578336, "model_n_params": 134515008, "n_threads": 4,
   "n_prompt": 512, "n_gen": 0, "n_depth": 0, "avg_ns": 1951000000, "stddev_ns": 12000000,
   "avg_ts": 262.4, "stddev_ts": 1.6, "samples_ns": [1940000000, 1951000000, 1962000000],
   "samples_ts": [263.9, 262.4, 260.9]},
  {"build_commit": "b1c2d3e", "build_number": 6500, "cpu_info": "ARMv8 Processor", "backends": "CPU",
   "model_type": "llama ?B Q4_0", "model_size": 77578336, "model_n_params": 134515008, "n_threads": 4,
   "n_prompt": 0, "n_gen": 128, "n_depth": 0, "avg_ns": 2560000000, "stddev_ns": 30000000,
   "avg_ts": 50.0, "stddev_ts": 0.6, "samples_ns": [2530000000, 2560000000, 2590000000],
   "samples_ts": [50.6, 50.0, 49.4]}
]
"""


def test_parse_llama_bench_json():
    r = remote.parse_llama_bench(LLAMA_BENCH_JSON)
    assert r["pp"]["n_tokens"] == 512 and r["pp"]["ts_mean"] == pytest.approx(262.4)
    assert r["tg"]["n_tokens"] == 128 and r["tg"]["ts_std"] == pytest.approx(0.6)
    assert r["reps"] == 3 and r["threads"] == 4 and r["build_commit"] == "b1c2d3e"
    with pytest.raises(TasaError, match="no JSON"):
        remote.parse_llama_bench("error: failed to load model")
    with pytest.raises(TasaError, match="no pp or tg"):
        remote.parse_llama_bench('[{"n_prompt": 0, "n_gen": 0, "avg_ts": 1}]')


PERPLEXITY_OUT = """perplexity: calculating perplexity over 4 chunks, n_ctx=128, batch_size=128
chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence              Δp RMS            Same top p
   1      15.7006 ±    0.1234     0.004567 ±  0.001234      0.012345 ±  0.000123    1.234 ±  0.045 %    96.123 ±  0.050 %

====== Perplexity statistics ======
Mean PPL(Q)                   :  15.887100 ±   0.246800
Mean PPL(base)                :  15.700000 ±   0.240000
Cor(ln(PPL(Q)), ln(PPL(base))):  99.87%
Mean ln(PPL(Q)/PPL(base))     :   0.011872 ±   0.000456

====== KL divergence statistics ======
Mean    KLD:   0.009876 ±   0.000234
Maximum KLD:   2.345678
99.9%   KLD:   0.456789
99.0%   KLD:   0.123456
Median  KLD:   0.003210
Minimum KLD:   0.000001

====== Token probability statistics ======
Mean    Δp: -0.123 ± 0.045 %
Same top p: 96.543 ± 0.120 %

llama_perf_context_print:        load time =     412.50 ms
"""


def test_parse_perplexity_kld_summary():
    r = remote.parse_perplexity(PERPLEXITY_OUT)
    assert r["kld"] == pytest.approx(0.009876) and r["kld_se"] == pytest.approx(0.000234)
    assert r["kld_p99"] == pytest.approx(0.123456) and r["kld_max"] == pytest.approx(2.345678)
    assert r["top1"] == pytest.approx(0.96543) and r["delta_p"] == pytest.approx(-0.00123)
    assert r["ppl"] == pytest.approx(15.8871) and r["ppl_base"] == pytest.approx(15.7)
    assert r["load_s"] == pytest.approx(0.4125)
    base = remote.parse_perplexity("[1]23.9,[2]22.0,\nFinal estimate: PPL = 22.0189 +/- 4.00226\n", kld=False)
    assert base["ppl"] == pytest.approx(22.0189)
    with pytest.raises(TasaError, match="Mean KLD"):
        remote.parse_perplexity("main: error: unable to load model")


@pytest.mark.parametrize("text, nbytes, sec", [
    ("152+1 records in\n152+1 records out\n160000000 bytes (160 MB, 153 MiB) copied, 0.0321 s, 5.0 GB/s\n",
     160000000, 0.0321),                                                           # GNU coreutils
    ("152+1 records in\n152+1 records out\n160000000 bytes (153 M) copied, 0.041 s, 3.7 G/s\n",
     160000000, 0.041),                                                            # Android toybox
    ("152+1 records in\n152+1 records out\n160000000 bytes (152.5MB) copied, 0.050123 seconds, 3.0GB/s\n",
     160000000, 0.050123),                                                         # busybox
])
def test_parse_dd(text, nbytes, sec):
    assert bandwidth.parse_dd(text) == (nbytes, pytest.approx(sec))


def test_parse_dd_unparseable():
    assert bandwidth.parse_dd("dd: /x: No such file or directory") is None


def test_machine_info_parsers():
    arm = ("processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm asimddp i8mm\n"
           "CPU implementer\t: 0x41\nCPU part\t: 0xd4b\n\nprocessor\t: 1\nFeatures\t: fp asimd\n")
    info = machine.parse_cpuinfo(arm)
    assert info["processors"] == 2 and "i8mm" in info["features"] and "0xd4b" in info["cpu"]
    text = ("@@cpuinfo\n" + arm + "@@meminfo\nMemTotal:        7989456 kB\n@@uname\nLinux 6.1.0 aarch64\n"
            "@@nproc\n8\n@@model\nPixel 8\nTensor G3\n")
    r = machine.parse_remote(text, threads=None)
    assert (r["cores"], r["threads"], r["arch"]) == (8, 8, "aarch64")
    assert r["ram_bytes"] == 7989456 * 1024 and r["host"] == "Pixel 8 / Tensor G3"
    local = machine.local_machine(1)
    assert local["cores"] >= 1 and local["ram_bytes"] > 0 and local["threads"] == 1


def test_bandwidth_probe_and_decode_fraction():
    b = bandwidth.probe_local(threads=1, size_bytes=32 * 2**20, repeats=2)
    assert b["read_bytes_per_s"] > 1e8 and b["copy_bytes_per_s"] > 1e8
    d = bandwidth.decode_efficiency(100e6, 50.0, {"read_bytes_per_s": 10e9})
    assert d["bytes_per_s"] == pytest.approx(5e9) and d["bandwidth_fraction"] == pytest.approx(0.5)
    assert bandwidth.decode_efficiency(None, 50.0, b) is None


# ============================================================================ KLD store
class _FakeBackend:
    """Yields given logits for each sequence (the scoring interface of the worker backends)."""

    def __init__(self, logits):
        self.logits = logits

    def score(self, seqs, starts):
        for i, (ids, st) in enumerate(zip(seqs, starts)):
            yield self.logits[i][st - 1: len(ids) - 1]


def test_reference_store_kld_matches_compare_logits(tmp_path):
    from devices.worker import score_chunk, write_reference
    from tasa_edge.quality import compare_logits

    rng = np.random.default_rng(0)
    vocab, lens, starts = 300, [20, 33, 9], [1, 5, 3]
    seqs = [rng.integers(0, vocab, n).tolist() for n in lens]
    ref = [rng.normal(0, 3, (n, vocab)).astype(np.float32) for n in lens]
    q = [r + rng.normal(0, 0.5, r.shape).astype(np.float32) for r in ref]
    chunks = harness.write_chunks({"task": list(zip(seqs, starts))}, vocab, tmp_path)
    assert [(name, n) for name, _, n in chunks] == [("task", sum(n - s for n, s in zip(lens, starts)))]
    meta = str(chunks[0][1])
    write_reference(_FakeBackend(ref), meta)
    score_chunk(_FakeBackend(q), meta, str(tmp_path / "q.npz"))
    got = harness.aggregate([tmp_path / "q.npz"])
    sl = [slice(s - 1, n - 1) for n, s in zip(lens, starts)]
    want = compare_logits(np.concatenate([r[s] for r, s in zip(ref, sl)]),
                          np.concatenate([x[s] for x, s in zip(q, sl)]),
                          np.concatenate([np.asarray(ids[s.start + 1: s.stop + 1]) for ids, s in zip(seqs, sl)]))
    # the same float16 store and statistics: equal up to the order of row-wise float sums
    assert got.keys() == want.keys() and got["n"] == want["n"]
    for k in got:
        assert got[k] == pytest.approx(want[k], rel=1e-9, abs=1e-12), k
    # the model against itself: zero divergence, full agreement
    score_chunk(_FakeBackend(ref), meta, str(tmp_path / "r.npz"))
    same = harness.aggregate([tmp_path / "r.npz"])
    assert abs(same["kld"]) < 1e-3 and same["top1"] == 1.0


# ============================================================================ input errors
def test_cli_parsers():
    from devices.cli import parse_bytes, parse_host

    assert parse_bytes("3.5G") == int(3.5 * 2**30) and parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes("1000") == 1000
    assert parse_host("pi@raspberrypi.local:2222") == ("raspberrypi.local", "pi", 2222)
    assert parse_host("board") == ("board", None, None)
    for bad, fn in (("lots", parse_bytes), ("0", parse_bytes), ("a@b@c", parse_host)):
        with pytest.raises(TasaError) as exc:
            fn(bad)
        one_line(exc)


def test_bad_inputs_are_one_line_errors(tmp_path, tiny_gguf):
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    empty = tmp_path / "emptydir"
    empty.mkdir()
    onnx = tmp_path / "onnx-model"
    onnx.mkdir()
    (onnx / "model.onnx").write_bytes(b"")
    other_plan = tmp_path / "other-plan.json"
    other_plan.write_text(json.dumps({"format": "tasa-edge/bitplan", "version": 1, "target": "gguf",
                                      "model": {"fingerprint": "sha256:0"}, "tensors": {"blk.99.attn_q.weight": "Q4_0"}}))
    not_analysis = tmp_path / "analysis.json"
    not_analysis.write_text('{"format": "something-else"}')
    cases = [
        (dict(files=[tmp_path / "missing.gguf"]), "not found"),
        (dict(files=[txt]), "neither a GGUF"),
        (dict(files=[empty]), "without model.onnx"),
        (dict(files=[]), "no model files"),
        (dict(files=[tiny_gguf], size="huge"), "unknown size 'huge'"),
        (dict(files=[tiny_gguf], target="usb"), "unknown target 'usb'"),
        (dict(files=[tiny_gguf], reps=0), "--reps"),
        (dict(files=[tiny_gguf], threads=0), "--threads"),
        (dict(files=[tiny_gguf], plans=[tmp_path / "nope.json"]), "plan not found"),
        (dict(files=[tiny_gguf], plans=[other_plan]), "blk.99.attn_q.weight is not in tiny.gguf"),
        (dict(files=[tiny_gguf], analysis=not_analysis), "not a tasa-edge analysis"),
        (dict(files=[tiny_gguf], profile="iphone-99"), "unknown device profile"),
        (dict(files=[onnx], target="adb"), "local"),
    ]
    for kw, match in cases:
        with pytest.raises(TasaError, match=match) as exc:
            bench(out_dir=tmp_path / "out", show_progress=False, **kw)
        one_line(exc)


def test_missing_adb_device(tmp_path, tiny_gguf, standins, monkeypatch):
    kw = dict(target="adb", size=TINY, out_dir=tmp_path / "out", bin_dir=standins["bin"], show_progress=False)
    monkeypatch.setenv("STANDIN_ADB_DEVICES", "")
    with pytest.raises(TasaError, match="no Android device attached") as exc:
        bench([tiny_gguf], **kw)
    one_line(exc)
    monkeypatch.setenv("STANDIN_ADB_DEVICES", "R58M123:unauthorized")
    with pytest.raises(TasaError, match="R58M123 is unauthorized"):
        bench([tiny_gguf], **kw)
    monkeypatch.setenv("STANDIN_ADB_DEVICES", "A1:device,B2:device")
    with pytest.raises(TasaError, match="several Android devices attached .*--serial"):
        bench([tiny_gguf], **kw)
    with pytest.raises(TasaError, match="Android device C3 is not attached"):
        bench([tiny_gguf], serial="C3", **kw)
    monkeypatch.setenv("TASA_ADB", str(tmp_path / "no-such-adb"))
    with pytest.raises(TasaError, match="not found.*TASA_ADB") as exc:
        bench([tiny_gguf], **kw)
    one_line(exc)
    assert "adb devices" in standins["log"].read_text()


def test_unreachable_ssh_host(tmp_path, tiny_gguf, standins):
    with pytest.raises(TasaError, match="cannot reach pi@unreachable.lan over ssh: .*Connection refused") as exc:
        bench([tiny_gguf], target="ssh", host="unreachable.lan", user="pi", size=TINY,
              out_dir=tmp_path / "out", show_progress=False)
    one_line(exc)
    with pytest.raises(TasaError, match="needs a host"):
        bench([tiny_gguf], target="ssh", size=TINY, out_dir=tmp_path / "out", show_progress=False)


def test_device_without_llama_binaries(tmp_path, tiny_gguf, standins, monkeypatch):
    monkeypatch.delenv("TASA_LLAMA_BIN_DIR", raising=False)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # the stand-in device's PATH has no llama-bench
    with pytest.raises(TasaError, match="no llama.cpp binaries.*--bin-dir") as exc:
        bench([tiny_gguf], target="adb", size=TINY, out_dir=tmp_path / "out", show_progress=False)
    one_line(exc)


# ============================================================================ real models (slow)
@pytest.fixture(scope="module")
def quants(tmp_path_factory, smollm):
    from exporters.gguf_export import export_gguf
    from tasa_edge.plan import BitPlan

    d = tmp_path_factory.mktemp("bench-models")
    out = {}
    for t in ("Q8_0", "Q4_0"):
        out[t] = d / f"smollm2-{t}.gguf"
        export_gguf(smollm, BitPlan.uniform(smollm, t), out[t], show_progress=False)
    return out


@pytest.fixture(scope="module")
def onnx_int4(tmp_path_factory, smollm):
    """An int4 MatMulNBits export, or None while the ONNX exporter is not available."""
    try:
        from exporters.onnx_export import export_onnx
        import tasa_edge.onnx_run  # noqa: F401
    except ImportError:
        return None
    from tasa_edge.plan import BitPlan

    out = tmp_path_factory.mktemp("bench-onnx") / "smollm2-int4"
    export_onnx(smollm, BitPlan.uniform(smollm, "int4_b32", target="onnx"), out, show_progress=False)
    return out


def _mixed_plan(src, path):
    from tasa_edge.formats.ggml import fit_type
    from tasa_edge.names import kind_of, layer_of
    from tasa_edge.plan import BitPlan, model_block

    def fmt(name):
        layer = layer_of(name)
        if kind_of(name) in ("attn_v", "ffn_down") and layer is not None and layer < 8:
            return "Q8_0"
        return "Q4_K" if kind_of(name) in ("ffn_up", "ffn_gate") else "Q4_0"

    plan = BitPlan("gguf", model_block(src), {t.name: fit_type(fmt(t.name), t.ne0) for t in src.quantizable},
                   provenance={"method": "test mix"})
    plan.stamp(src)
    plan.save(path)


def _synthetic_analysis(src, path):
    """A small analysis.json with the layout `illusion_report` reads (ppl vs task sensitivities)."""
    from synthetic import write_analysis

    rng = np.random.default_rng(1)
    ppl, task, nbytes = {}, {}, {}
    for t in src.quantizable:
        base = rng.gamma(2.0, 1.0)
        ppl[t.name] = {"Q4_0": base, "Q8_0": base / 16}
        task[t.name] = {"Q4_0": base * rng.lognormal(0, 0.8), "Q8_0": base / 16}
        nbytes[t.name] = {"Q4_0": t.n_elements * 9 // 16, "Q8_0": t.n_elements * 17 // 16}
    write_analysis(src, path, ppl, task, nbytes)


def _cli():
    import typer

    from devices.cli import bench as bench_cmd

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command("bench")(bench_cmd)
    app.command("version")(lambda: None)
    return app


@pytest.mark.slow
def test_onnx_backend_available():
    """The ONNX path of the harness (skipped, clearly, until the ONNX runner exists)."""
    try:
        import tasa_edge.onnx_run as onnx_run
    except ImportError:
        pytest.skip("ONNX runner tasa_edge.onnx_run not available yet: ONNX benchmarking untested")
    from devices.worker import OnnxBackend, backend_for

    assert hasattr(onnx_run, "OnnxDecoder")
    assert isinstance(backend_for("onnx", "x", 1), OnnxBackend)


@pytest.mark.slow
def test_local_bench_cli_gguf_and_onnx(tmp_path, quants, onnx_int4, smollm, smollm_f32):
    from typer.testing import CliRunner

    plan, an, out = tmp_path / "plan.json", tmp_path / "analysis.json", tmp_path / "bench"
    _mixed_plan(smollm, plan)
    _synthetic_analysis(smollm, an)
    files = [str(quants["Q8_0"]), str(quants["Q4_0"])] + ([str(onnx_int4)] if onnx_int4 else [])
    res = CliRunner().invoke(_cli(), ["bench", *files, "--reference", str(smollm_f32), "--size", "small",
                                      "-t", "1", "--out-dir", str(out), "--plan", str(plan),
                                      "--analysis", str(an), "--profile", "local-cpu"])
    assert res.exit_code == 0, f"{res.output}\n{res.exception!r}"
    assert "wrote" in res.output and "bench.json" in res.output

    rep = json.loads((out / "bench.json").read_text())
    assert (rep["schema"], rep["version"]) == ("tasa-edge/bench-report", 1)
    assert rep["target"]["kind"] == "local" and rep["target"]["profile"]["name"] == "local-cpu"
    m = rep["machine"]
    assert m["cpu"] and m["cores"] >= 1 and m["threads"] == 1 and m["ram_bytes"] > 2**28
    s = rep["settings"]
    assert (s["pp"], s["tg"], s["reps"], s["gsm8k_examples"], s["threads"]) == (64, 16, 2, 4, 1)
    assert rep["reference"]["path"] == str(smollm_f32) and rep["reference"]["ppl_general"] > 1
    assert rep["bandwidth"]["read_bytes_per_s"] > 1e8

    by = {e["name"]: e for e in rep["models"]}
    q8, q4 = by[quants["Q8_0"].stem], by[quants["Q4_0"].stem]
    models = [q8, q4] + ([by[onnx_int4.name]] if onnx_int4 else [])
    for e in models:
        assert e["error"] is None
        assert e["file_bytes"] > 0 and 4 < e["bpw"] < 9
        assert e["load_s"] > 0
        assert e["peak_rss_bytes"] > e["file_bytes"] / 2 and e["rss_before_load_bytes"] < e["peak_rss_bytes"]
        sp = e["speed"]
        assert sp["threads"] == 1 and sp["reps"] == 2
        for k, n in (("pp", 64), ("tg", 16)):
            assert sp[k]["n_tokens"] == n and sp[k]["ts_mean"] > 0 and len(sp[k]["samples_ts"]) == 2
        for set_name in ("general", "task"):
            q = e["quality"][set_name]
            assert q["n"] > 100 and q["kld"] >= 0 and 0 < q["top1"] <= 1 and q["ppl"] > 1 and q["ppl_ref"] > 1
        g = e["gsm8k"]
        assert g["n"] == 4 and g["shots"] == 2 and 0 <= g["strict_match"] <= g["flexible_extract"] + 1e-9 <= 1 + 1e-9
        assert len((out / g["completions"]).read_text().splitlines()) == 4
        assert e["decode"]["bytes_per_token"] > e["tensor_bytes"] / 2 and e["decode"]["bandwidth_fraction"] > 0
    # relations: fewer bits -> smaller file, further from the reference
    assert q4["bpw"] < q8["bpw"] and q4["file_bytes"] < q8["file_bytes"]
    for set_name in ("general", "task"):
        assert q4["quality"][set_name]["kld"] > 5 * q8["quality"][set_name]["kld"]
        assert q4["quality"][set_name]["top1"] < q8["quality"][set_name]["top1"]
    assert q8["quality"]["general"]["kld"] < 0.05
    assert q8["quality"]["general"]["ppl"] == pytest.approx(rep["reference"]["ppl_general"], rel=0.1)
    if onnx_int4:
        ox = by[onnx_int4.name]
        assert ox["format"] == "onnx" and ox["speed"]["backend"].startswith("onnxruntime")
        assert ox["quality"]["task"]["kld"] > q8["quality"]["task"]["kld"]

    md = (out / "bench.md").read_text()
    assert "| model | format |" in md and all(f"| {e['name']} |" in md for e in models)
    for name in ("pareto.png", "plan-plan.png", "illusion.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert rep["plots"]["pareto"] == "pareto.png" and rep["plots"]["illusion"] == "illusion.png"
    assert rep["analysis"]["illusion"]["per_layer"]["n"] == smollm.n_layers
    print("\nlocal bench:", json.dumps([{
        "name": e["name"], "MiB": round(e["file_bytes"] / 2**20, 1), "bpw": round(e["bpw"], 3),
        "load_s": round(e["load_s"], 2), "rss_MiB": round(e["peak_rss_bytes"] / 2**20),
        "pp64": round(e["speed"]["pp"]["ts_mean"], 1), "tg16": round(e["speed"]["tg"]["ts_mean"], 1),
        "bw_frac": round(e["decode"]["bandwidth_fraction"], 2),
        "ppl": round(e["quality"]["general"]["ppl"], 2),
        "kld_gen": round(e["quality"]["general"]["kld"], 4), "top1_gen": round(e["quality"]["general"]["top1"], 3),
        "kld_task": round(e["quality"]["task"]["kld"], 4), "top1_task": round(e["quality"]["task"]["top1"], 3),
        "gsm8k_flex": e["gsm8k"]["flexible_extract"]} for e in models]))


@pytest.mark.slow
def test_memory_limit_is_enforced_per_model(tmp_path, quants):
    rep = bench([quants["Q4_0"]], size=TINY, threads=1, memory_limit=48 * 2**20, out_dir=tmp_path,
                show_progress=False)
    e = rep["models"][0]
    assert e["error"] and "memory limit 0.05 GiB" in e["error"] and "\n" not in e["error"]
    assert rep["target"]["memory_limit_bytes"] == 48 * 2**20
    assert "Errors:" in (tmp_path / "bench.md").read_text()


@pytest.mark.slow
def test_adb_flow_with_standin_device(tmp_path, quants, smollm_f32, standins):
    q4 = quants["Q4_0"]
    rep = bench([q4], reference=smollm_f32, profile="pixel-8", threads=1, size=TINY, bin_dir=standins["bin"],
                out_dir=tmp_path / "out", show_progress=False)
    assert rep["target"]["kind"] == "adb" and rep["target"]["transport"]["label"] == "adb:emulator-5554"
    assert rep["machine"]["cpu"] == machine.local_machine(1)["cpu"] and rep["machine"]["threads"] == 1
    assert rep["bandwidth"]["method"].startswith("dd") and rep["bandwidth"]["read_bytes_per_s"] > 1e7
    e = rep["models"][0]
    assert e["error"] is None
    sp = e["speed"]
    assert sp["backend"] == "llama-bench" and sp["threads"] == 1 and sp["build_commit"] == "pybench"
    assert sp["pp"]["n_tokens"] == 16 and sp["tg"]["n_tokens"] == 4 and sp["tg"]["ts_mean"] > 0
    assert e["peak_rss_bytes"] > q4.stat().st_size / 2          # VmHWM sampled on the "device"
    assert e["fits_memory"] is True and e["load_s"] > 0
    dq = e["device_quality"]["general"]
    assert dq["kld"] > 0.01 and 0 < dq["top1"] < 1 and dq["ppl"] > 1 and dq["ppl_base"] > 1
    q = e["quality"]
    assert q["measured_on"] == "host" and q["task"]["kld"] > 0.01 and q["general"]["kld"] > 0.01
    # the real command flow went through adb: pushes into /data/local/tmp, llama-bench json, KLD base
    log = standins["log"].read_text()
    dev = standins["root"] / "data/local/tmp/tasa-edge"
    assert f"push {q4} /data/local/tmp/tasa-edge/models/{q4.name}" in log
    assert "llama-bench -m /data/local/tmp/tasa-edge/models/" in log and "-p 16 -n 4 -r 1 -t 1 -o json" in log
    assert "--kl-divergence-base /data/local/tmp/tasa-edge/run/reference.kld --kl-divergence" in log
    assert (dev / "models" / q4.name).stat().st_size == q4.stat().st_size and (dev / "bin/llama-bench").exists()
    assert "On-device llama-perplexity" in (tmp_path / "out/bench.md").read_text()
    # a second run finds the files on the device and does not push them again
    n_push = log.count(f"push {q4}")
    bench([q4], profile="pixel-8", threads=1, size=TINY, bin_dir=standins["bin"], out_dir=tmp_path / "out2",
          show_progress=False)
    assert standins["log"].read_text().count(f"push {q4}") == n_push
    print("\nadb stand-in:", json.dumps({"pp16": round(sp["pp"]["ts_mean"], 1), "tg4": round(sp["tg"]["ts_mean"], 1),
                                         "rss_MiB": round(e["peak_rss_bytes"] / 2**20), "device_kld": dq["kld"],
                                         "device_top1": dq["top1"], "host_task_kld": round(q["task"]["kld"], 4)}))


@pytest.mark.slow
def test_ssh_flow_with_standin_host(tmp_path, quants, standins):
    from typer.testing import CliRunner

    q8 = quants["Q8_0"]
    prof = tmp_path / "pi.toml"
    prof.write_text((profiles.PROFILE_DIR / "raspberry-pi-5.toml").read_text()
                    .replace('remote_dir = "/tmp/tasa-edge"', 'remote_dir = "/opt/tasa-edge"'))
    out = tmp_path / "out"
    res = CliRunner().invoke(_cli(), ["bench", str(q8), "--profile", str(prof), "--host", "pi@standin-pi:2222",
                                      "--bin-dir", str(standins["bin"]), "--threads", "1", "-r", "1",
                                      "--out-dir", str(out), "--json"], catch_exceptions=True)
    assert res.exit_code == 0, f"{res.output}\n{res.exception!r}"
    rep = json.loads((out / "bench.json").read_text())
    assert rep["target"]["kind"] == "ssh" and rep["target"]["transport"]["label"] == "ssh:pi@standin-pi"
    assert rep["target"]["memory_limit_bytes"] == 6 * 2**30 and rep["reference"] is None
    e = rep["models"][0]
    assert e["error"] is None and e["speed"]["backend"] == "llama-bench" and e["speed"]["pp"]["n_tokens"] == 64
    assert e["speed"]["reps"] == 1 and e["peak_rss_bytes"] > q8.stat().st_size / 2
    assert e["quality"]["general"]["ppl"] > 1 and "kld" not in e["quality"]["general"]  # no reference
    assert e["gsm8k"]["measured_on"] == "host" and e["gsm8k"]["n"] == 4
    log = standins["log"].read_text()
    assert "ssh -o BatchMode=yes -o ConnectTimeout=15 -p 2222 -- pi@standin-pi" in log
    assert f"scp -q -o BatchMode=yes -o ConnectTimeout=15 -P 2222 -- {q8} pi@standin-pi:/opt/tasa-edge/models/{q8.name}" in log
    assert (standins["root"] / "opt/tasa-edge/models" / q8.name).exists()
