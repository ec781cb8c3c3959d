"""Issue 14 item 5, the phone path: `tasa-edge bench --target adb` on an emulated aarch64 "phone".

llama.cpp's real ``llama-bench`` / ``llama-perplexity``, cross-built for aarch64 with Debian's
cross compiler (``make tools-aarch64``: static, cached outside the clone), are pushed through a
stand-in ``adb`` (``tests/fakes/qemu_adb.py``: the device's storage is a local directory, its
aarch64 programs run under ``qemu-aarch64``) and benchmark the packaged SmolLM2-135M end to end.
The report marks the speeds as emulated: they are not device figures.

The slow tests skip with the reason when the cross-built tools or qemu-user are absent.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from devices import harness
from devices.harness import Size, bench
from devices.llama_tools import cache_prefix

ROOT = Path(__file__).resolve().parent.parent
FAKE_ADB = ROOT / "tests" / "fakes" / "qemu_adb.py"
#: emulation is slow: the least work that still runs llama-bench's pp and tg tests on the "phone"
TINY = Size("tiny", pp=8, tg=2, reps=1, general_docs=2, general_tokens=64, task_examples=1,
            gsm8k_examples=0, shots=0, max_gen_tokens=0)


def aarch64_bin() -> Path:
    return Path(f"{cache_prefix()}-aarch64") / "bin"


def qemu() -> str | None:
    return shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")


def _elf(path: Path, machine: int) -> Path:
    path.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(11) + machine.to_bytes(2, "little") + bytes(44))
    path.chmod(0o755)
    return path


def _load_fake(monkeypatch, root: Path):
    monkeypatch.setenv("QEMU_ADB_ROOT", str(root))
    monkeypatch.setenv("QEMU_ADB_QEMU", "/usr/bin/qemu-aarch64")
    spec = importlib.util.spec_from_file_location("qemu_adb", FAKE_ADB)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def adb_env(tmp_path, monkeypatch):
    """$TASA_ADB -> the stand-in adb over a fresh device directory."""
    dev = tmp_path / "phone"
    dev.mkdir()
    exe = tmp_path / "adb"
    exe.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_ADB}" "$@"\n')
    exe.chmod(0o755)
    env = {"TASA_ADB": str(exe), "QEMU_ADB_ROOT": str(dev), "QEMU_ADB_LOG": str(tmp_path / "adb.log")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return {"root": dev, "log": tmp_path / "adb.log", "env": env}


# ============================================================================ the stand-in's command translation
def test_stand_in_runs_only_aarch64_programs_under_qemu(tmp_path, monkeypatch):
    root = tmp_path / "phone"
    b = root / "data/local/tmp/t/bin"
    b.mkdir(parents=True)
    _elf(b / "llama-bench", 183)
    _elf(b / "x86-tool", 62)
    fake = _load_fake(monkeypatch, root)
    q = " ".join(fake.qemu())
    rd = "/data/local/tmp/t"
    # the harness's run line: the wrapper (an argument of sh) starts the program
    got = fake.translate(f"cd {rd} && LD_LIBRARY_PATH={rd}/bin sh {rd}/tasa-run.sh {rd}/run/a.out {rd}/run/a.err "
                         f"{rd}/bin/llama-bench -m {rd}/models/m.gguf; rc=$?; cat {rd}/run/a.out")
    L = str(root) + rd
    assert got == (f"cd {L} && LD_LIBRARY_PATH={L}/bin sh {L}/tasa-run.sh {L}/run/a.out {L}/run/a.err "
                   f"{q} {L}/bin/llama-bench -m {L}/models/m.gguf; rc=$?; cat {L}/run/a.out")
    # a program as the first word; file commands (chmod, od, wc) and x86 programs are left alone
    assert fake.translate(f"{rd}/bin/llama-bench --version") == f"{q} {L}/bin/llama-bench --version"
    assert fake.translate(f"chmod 755 {rd}/bin/llama-bench {rd}/bin/x86-tool") == f"chmod 755 {L}/bin/llama-bench {L}/bin/x86-tool"
    assert fake.translate(f"od -A n -t u1 -N 20 {rd}/bin/llama-bench") == f"od -A n -t u1 -N 20 {L}/bin/llama-bench"
    assert fake.translate(f"{rd}/bin/x86-tool && cat /proc/cpuinfo") == f"{L}/bin/x86-tool && cat /proc/cpuinfo"
    assert fake.translate("ls /database /tmp/data/x") == "ls /database /tmp/data/x"


def test_emulation_is_noted_only_across_architectures():
    e = harness._emulation("aarch64", "x86_64")
    assert e["binary_arch"] == "aarch64" and e["device_arch"] == "x86_64" and "not device figures" in e["note"]
    assert harness._emulation("aarch64", "arm64") is None and harness._emulation("x86_64", "amd64") is None
    assert harness._emulation(None, "aarch64") is None and harness._emulation("aarch64", None) is None


def test_offline_phone_is_one_line(tmp_path, adb_env, monkeypatch, tiny_gguf):
    p = tiny_gguf
    env = {**os.environ, **adb_env["env"], "QEMU_ADB_STATE": "offline", "TASA_NO_PROGRESS": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "tasa_edge.cli", "bench", str(p), "--target", "adb",
                        "--bin-dir", str(tmp_path), "--out-dir", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "qemu-aarch64" in lines[0] and "offline" in lines[0], lines[0]
    assert not (out / "bench.json").exists()


# ============================================================================ end to end under qemu
@pytest.mark.slow
def test_bench_on_emulated_aarch64_phone(tmp_path, adb_env):
    bindir = aarch64_bin()
    if qemu() is None:
        pytest.skip("qemu-user not installed (apt-get install qemu-user)")
    if not all((bindir / t).is_file() for t in ("llama-bench", "llama-perplexity")):
        pytest.skip(f"aarch64 llama.cpp tools not built in {bindir}: run `make tools-aarch64`")
    from tasa_edge.zoo import resolve_model

    gguf = Path(resolve_model("smollm2-135m"))
    rep = bench([gguf], target="adb", profile="pixel-8", size=TINY, threads=2, bin_dir=bindir,
                out_dir=tmp_path / "out", show_progress=False)
    t = rep["target"]
    assert t["kind"] == "adb" and t["transport"]["label"] == "adb:qemu-aarch64"
    em = t["emulation"]
    assert em == {"binary_arch": "aarch64", "device_arch": os.uname().machine, "note": em["note"]}
    e = rep["models"][0]
    assert e["error"] is None
    sp = e["speed"]
    info = json.loads((bindir.parent / "BUILD_INFO.json").read_text())
    assert sp["backend"] == "llama-bench" and sp["emulated"] is True and sp["threads"] == 2
    assert sp["build_commit"] == info["llama_cpp_commit"][: len(sp["build_commit"])]
    assert sp["pp"]["n_tokens"] == 8 and sp["tg"]["n_tokens"] == 2 and sp["pp"]["ts_mean"] > 0 and sp["tg"]["ts_mean"] > 0
    assert "CPU" in str(sp.get("backends", "CPU"))
    assert e["peak_rss_bytes"] > gguf.stat().st_size / 2    # VmHWM of the qemu process running llama-bench
    dev = adb_env["root"] / "data/local/tmp/tasa-edge"
    assert (dev / "models" / f"{e['name']}.gguf").stat().st_size == gguf.stat().st_size
    assert (dev / "bin/llama-bench").read_bytes()[18] == 183   # the aarch64 binary itself was pushed
    log = adb_env["log"].read_text()
    assert f"push {bindir}/llama-bench /data/local/tmp/tasa-edge/bin/llama-bench" in log
    assert "llama-bench -m /data/local/tmp/tasa-edge/models/" in log and "-p 8 -n 2 -r 1 -t 2 -o json" in log
    md = (tmp_path / "out/bench.md").read_text()
    assert "**emulated**" in md and "not device figures" in md
    print("\nemulated aarch64 (qemu-user, not device figures):",
          json.dumps({"pp8": round(sp["pp"]["ts_mean"], 2), "tg2": round(sp["tg"]["ts_mean"], 2),
                      "rss_MiB": round(e["peak_rss_bytes"] / 2**20)}))


def test_profile_on_emulated_aarch64_phone(tmp_path, adb_env):
    """`tasa-edge profile --target adb`: the design files go through the stand-in adb to the
    "phone", the cross-built aarch64 llama-bench times them under qemu; the profile records the
    emulation (its costs are the emulator's) and no design file stays on the device."""
    import tomllib

    bindir = aarch64_bin()
    if qemu() is None:
        pytest.skip("qemu-user not installed (apt-get install qemu-user)")
    if not (bindir / "llama-bench").is_file():
        pytest.skip(f"aarch64 llama-bench not built in {bindir}: run `make tools-aarch64`")
    out = tmp_path / "phone.toml"
    env = {**os.environ, **adb_env["env"], "TASA_NO_PROGRESS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "tasa_edge.cli", "profile", "-m", "smollm2-135m", "-o", str(out),
                        "--target", "adb", "--bin-dir", str(bindir), "--formats", "Q8_0,Q4_0", "-t", "2",
                        "-p", "8", "-n", "2", "-r", "1", "--random-mixes", "0"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    assert "emulated" in r.stdout
    d = tomllib.loads(out.read_text())
    assert d["target"] == "adb" and d["measured"]["target"] == "adb"
    assert "aarch64 binaries ran under emulation" in d["measured"]["emulated"]
    assert set(d["measured"]["design_tg_ts"]) == {"uniform Q8_0", "uniform Q4_0", "output Q4_0"}
    assert all(v > 0 for v in d["measured"]["design_pp_ts"].values())
    info = json.loads((bindir.parent / "BUILD_INFO.json").read_text())
    assert info["llama_cpp_commit"].startswith(d["machine"]["llama_cpp_commit"])
    dev = adb_env["root"] / "data/local/tmp/tasa-edge"
    assert (dev / "bin/llama-bench").read_bytes()[18] == 183
    assert not list((dev / "models").glob("profile-*.gguf"))
    log = adb_env["log"].read_text()
    assert "push " in log and "/models/profile-0.gguf" in log and "-p 8 -n 2 -r 1 -t 2" in log
