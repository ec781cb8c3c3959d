"""Issue 14 item 5: `tasa-edge bench --target ssh` against a real OpenSSH server.

A real ``sshd`` (Debian's openssh-server) started by the test on 127.0.0.1 at a free non-default
port, with its own config and throwaway ed25519 keys (``tests/real_sshd.py``), is the "board";
llama.cpp's real ``llama-bench`` / ``llama-perplexity`` built by ``make tools`` for this machine are
pushed to it with ``--bin-dir``. The bench runs end to end on the packaged SmolLM2-135M GGUF.
Bad remote states -- a closed port, the tools missing on the device, out of memory (``ulimit -v``
on the server, inherited by every remote command), storage full (a tiny tmpfs as the remote work
dir, mounted in the server's own mount namespace) -- end the CLI with one line on stderr, a non-zero
exit, and no bench.json.

Skipped with the reason when sshd / the ssh client is not installed (``.ci/run`` installs them) or
``make tools`` has not built the host tools.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from devices.harness import Size, bench
from devices.llama_tools import build_info, find_tool

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_sshd  # noqa: E402  (tests/real_sshd.py)

ROOT = Path(__file__).resolve().parent.parent
TINY = Size("tiny", pp=16, tg=4, reps=1, general_docs=2, general_tokens=64, task_examples=1,
            gsm8k_examples=0, shots=0, max_gen_tokens=0)


def _need_sshd():
    why = real_sshd.missing()
    if why:
        pytest.skip(why)


@pytest.fixture(scope="module")
def host_bin(tmp_path_factory):
    """A --bin-dir with this machine's llama-bench and llama-perplexity (`make tools`)."""
    d = tmp_path_factory.mktemp("host-llama-bin")
    for t in ("llama-bench", "llama-perplexity"):
        p = find_tool(t)
        if p is None:
            pytest.skip(f"{t} not built: run `make tools`")
        (d / t).symlink_to(p)
    return d


@pytest.fixture(scope="module")
def smollm_gguf():
    from tasa_edge.zoo import resolve_model

    return Path(resolve_model("smollm2-135m"))


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    _need_sshd()
    with real_sshd.SshServer(tmp_path_factory.mktemp("sshd")) as srv:
        yield srv


def cli(args: list[str], env_extra: dict) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TASA_LLAMA_BIN_DIR"}
    env.update(env_extra, TASA_NO_PROGRESS="1", PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "tasa_edge.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)


def assert_one_line_failure(r: subprocess.CompletedProcess, out: Path, pattern: str) -> str:
    import re

    assert r.returncode != 0, r.stdout + r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert re.search(pattern, lines[0]), lines[0]
    assert not (out / "bench.json").exists() and not (out / "bench.md").exists()
    assert not out.exists() or not list(out.glob(".bench-work-*"))
    print("\n" + lines[0])
    return lines[0]


# ============================================================================ end to end
@pytest.mark.slow
def test_bench_over_real_ssh(tmp_path, monkeypatch, sshd, host_bin, smollm_gguf, smollm_f32):
    for k, v in sshd.env.items():
        monkeypatch.setenv(k, v)
    rdir = tmp_path / "board"   # same machine: the remote dir is visible here too
    kw = dict(target="ssh", host="127.0.0.1", user=sshd.user, port=sshd.port, size=TINY, threads=1,
              bin_dir=host_bin, remote_dir=str(rdir), show_progress=False)
    rep = bench([smollm_gguf], reference=smollm_f32, out_dir=tmp_path / "out", **kw)

    t = rep["target"]
    assert t["kind"] == "ssh" and t["transport"]["label"] == f"ssh:{sshd.user}@127.0.0.1"
    assert t["emulation"] is None and t["bin_dir"] == str(host_bin)
    assert rep["machine"]["arch"] == os.uname().machine and rep["bandwidth"]["read_bytes_per_s"] > 1e7
    e = rep["models"][0]
    assert e["error"] is None
    sp = e["speed"]
    # llama.cpp's real llama-bench ran on the "board": its build commit is the host tool's
    assert sp["backend"] == "llama-bench" and sp["build_commit"] == build_info(host_bin / "llama-bench").commit
    assert sp["pp"]["n_tokens"] == 16 and sp["tg"]["n_tokens"] == 4 and sp["pp"]["ts_mean"] > 0 and sp["tg"]["ts_mean"] > 0
    assert "emulated" not in sp and sp["threads"] == 1
    assert smollm_gguf.stat().st_size / 2 < e["peak_rss_bytes"] < 4 * smollm_gguf.stat().st_size
    assert 0 < e["load_s"] < 60
    dq = e["device_quality"]["general"]   # llama-perplexity --kl-divergence on the board
    assert 0 < dq["kld"] < 0.5 and 0.5 < dq["top1"] <= 1 and dq["ppl"] > 1 and dq["ppl_base"] > 1
    assert rep["reference"]["device"]["ppl"] > 1
    q = e["quality"]
    assert q["measured_on"] == "host" and q["task"]["kld"] > 0 and q["general"]["kld"] > 0
    # the files really went through sshd (scp/SFTP) into the remote dir, keys were used
    assert (rdir / "models" / f"{e['name']}.gguf").stat().st_size == smollm_gguf.stat().st_size
    assert (rdir / "bin/llama-bench").stat().st_size == (host_bin / "llama-bench").stat().st_size
    log = sshd.log.read_text()
    assert "Accepted publickey for" in log and "Starting session: subsystem 'sftp'" in log
    md = (tmp_path / "out/bench.md").read_text()
    assert "On-device llama-perplexity" in md and "emulated" not in md
    # a second run finds the files there (same size) and pushes only the small wrapper again
    n_sftp = log.count("Starting session: subsystem 'sftp'")
    mtime = (rdir / "models" / f"{e['name']}.gguf").stat().st_mtime_ns
    bench([smollm_gguf], out_dir=tmp_path / "out2", **kw)
    assert (rdir / "models" / f"{e['name']}.gguf").stat().st_mtime_ns == mtime
    assert sshd.log.read_text().count("Starting session: subsystem 'sftp'") == n_sftp + 1   # tasa-run.sh
    print("\nreal ssh:", json.dumps({"pp16": round(sp["pp"]["ts_mean"], 1), "tg4": round(sp["tg"]["ts_mean"], 1),
                                     "rss_MiB": round(e["peak_rss_bytes"] / 2**20), "device_kld": dq["kld"],
                                     "device_top1": dq["top1"], "host_task_kld": round(q["task"]["kld"], 4)}))


@pytest.mark.slow
def test_profile_over_real_ssh_then_plan_with_it(tmp_path, sshd, host_bin, smollm_gguf):
    """`tasa-edge profile --target ssh`: design files exported here, pushed through sshd, timed by
    the real llama-bench on the "board", removed there; the profile carries the board's identity
    and transport, and `plan --profile` solves with its decode-time limit."""
    rdir = tmp_path / "board"
    prof = tmp_path / "board.profile.toml"
    r = cli(["profile", "-m", str(smollm_gguf), "-o", str(prof), "--target", "ssh", "--host", sshd.host,
             "--bin-dir", str(host_bin), "--remote-dir", str(rdir), "--formats", "Q8_0,Q4_0", "-t", "1",
             "-p", "16", "-n", "4", "-r", "1", "--random-mixes", "1", "--resume", str(tmp_path / "progress.json")], sshd.env)
    assert r.returncode == 0, r.stderr
    import tomllib

    from tasa_edge.costmodel import load_kernel_profile

    d = tomllib.loads(prof.read_text())
    assert d["target"] == "ssh" and d["transport"]["port"] == sshd.port and d["transport"]["remote_dir"] == str(rdir)
    assert d["machine"]["arch"] == os.uname().machine and d["machine"]["cores"] >= 1
    assert d["machine"]["llama_cpp_commit"] == build_info(host_bin / "llama-bench").commit
    m = d["measured"]
    assert m["target"] == "ssh" and m["threads"] == 1 and (m["pp"], m["tg"], m["reps"]) == (16, 4, 1)
    assert set(m["design_tg_ts"]) == {"uniform Q8_0", "uniform Q4_0", "output Q4_0", "random mix 1"}
    assert all(v > 0 for v in m["design_tg_ts"].values()) and all(v > 0 for v in m["design_pp_ts"].values())
    kp = load_kernel_profile(prof)
    assert set(kp.costs) == {"Q8_0", "Q4_0"}
    assert all(c.decode_ns_per_weight >= 0 and c.prefill_ns_per_weight >= 0 for c in kp.costs.values())
    assert any(c.decode_ns_per_weight > 0 for c in kp.costs.values())
    assert not list((rdir / "models").glob("profile-*.gguf"))   # design files removed from the board
    log = sshd.log.read_text()
    assert "Accepted publickey for" in log and log.count("Starting session: subsystem 'sftp'") >= 3
    # resumed with the same settings: every design file was measured and is not measured again (the
    # resume key holds the board's llama.cpp commit, asked of the board before the first file)
    outs = {p.name: p.stat().st_mtime_ns for p in (rdir / "run").glob("profile-*.out")}
    assert len(outs) == 4
    again = tmp_path / "again.profile.toml"
    r = cli(["profile", "-m", str(smollm_gguf), "-o", str(again), "--target", "ssh", "--host", sshd.host,
             "--bin-dir", str(host_bin), "--remote-dir", str(rdir), "--formats", "Q8_0,Q4_0", "-t", "1",
             "-p", "16", "-n", "4", "-r", "1", "--random-mixes", "1", "--resume", str(tmp_path / "progress.json")], sshd.env)
    assert r.returncode == 0, r.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (rdir / "run").glob("profile-*.out")} == outs
    d2 = tomllib.loads(again.read_text())
    assert d2["measured"]["design_tg_ts"] == m["design_tg_ts"] and d2["machine"]["llama_cpp_commit"] == d["machine"]["llama_cpp_commit"]
    # the profile plans (a remote profile: no check against this machine), with a decode-time limit
    from test_pins import synthetic_analysis

    from tasa_edge.model import ModelSource

    src = ModelSource.open(smollm_gguf)
    an = synthetic_analysis(src, tmp_path / "analysis.json")
    fast = kp.predict(src, {t.name: "Q4_0" for t in src.quantizable}).decode_ms
    r = cli(["plan", "smollm2-135m", "-a", str(an), "--bpw", "8.5", "--profile", str(prof),
             "--max-decode-ms", f"{fast * 1.05:.4f}", "-o", str(tmp_path / "plan.json")], {})
    assert r.returncode == 0, r.stderr
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["predicted"]["decode_ms"] <= fast * 1.05 + 1e-6


# ============================================================================ bad remote states (CLI)


def test_unreachable_host_closed_port(tmp_path, tiny_gguf):
    _need_sshd()
    port = real_sshd.free_port()   # nothing listens there
    out = tmp_path / "out"
    r = cli(["bench", str(tiny_gguf), "--target", "ssh", "--host", f"root@127.0.0.1:{port}",
             "--bin-dir", str(tmp_path), "--out-dir", str(out), "-t", "1"], {})
    assert_one_line_failure(r, out, rf"cannot reach root@127\.0\.0\.1 over ssh: .*port {port}: Connection refused")


@pytest.mark.slow
def test_tools_missing_on_the_device(tmp_path, sshd, smollm_gguf):
    out = tmp_path / "out"
    r = cli(["bench", str(smollm_gguf), "--target", "ssh", "--host", sshd.host, "--remote-dir", str(tmp_path / "board"),
             "--out-dir", str(out), "-t", "1"], sshd.env)
    assert_one_line_failure(r, out, r"no llama\.cpp binaries \(llama-bench, llama-perplexity not on the device's PATH\)")


@pytest.mark.slow
def test_out_of_memory_on_the_device(tmp_path, host_bin, smollm_gguf):
    _need_sshd()
    # every remote command inherits the server's RLIMIT_AS: the shell and sftp fit, the model does not
    with real_sshd.SshServer(tmp_path / "sshd", limit_as_bytes=64 * 2**20) as srv:
        out = tmp_path / "out"
        r = cli(["bench", str(smollm_gguf), "--target", "ssh", "--host", srv.host, "--bin-dir", str(host_bin),
                 "--remote-dir", str(tmp_path / "board"), "--out-dir", str(out), "-t", "1", "-p", "8", "-n", "2",
                 "-r", "1"], srv.env)
    assert_one_line_failure(r, out, r"out of memory on the device: llama-bench on .*\.gguf failed \(exit 1\) -- address-space limit \(ulimit -v\) 64 MiB, model file 93\.8 MiB: ")
    assert (tmp_path / "board/models").is_dir()   # it got as far as running llama-bench


@pytest.mark.slow
def test_storage_full_on_the_device(tmp_path, host_bin, smollm_gguf):
    _need_sshd()
    if os.geteuid() != 0:
        pytest.skip("a tmpfs in the server's own mount namespace needs root")
    board = tmp_path / "board"
    tools = sum((host_bin / t).stat().st_size for t in ("llama-bench", "llama-perplexity"))
    # room for the tools and the wrapper, not for the 94 MiB model
    with real_sshd.SshServer(tmp_path / "sshd", tmpfs=(board, tools + 16 * 2**20)) as srv:
        out = tmp_path / "out"
        r = cli(["bench", str(smollm_gguf), "--target", "ssh", "--host", srv.host, "--bin-dir", str(host_bin),
                 "--remote-dir", str(board), "--out-dir", str(out), "-t", "1"], srv.env)
    msg = assert_one_line_failure(r, out, r"device storage full: \d+\.\d MiB free in .*/board/models, "
                                          r"\S+\.gguf needs 93\.8 MiB")
    assert "tasa-tiny-disk" not in msg
    assert not (board / "bin").exists()   # the tmpfs was the server's alone: nothing landed on this disk


def test_device_failures_are_classified():
    """The classification behind the one-line errors, on llama.cpp's own failure outputs."""
    from devices import remote

    class Shell(remote.Transport):  # answers the two follow-up queries of a failed run
        kind, label = "ssh", "ssh:board"

        def __init__(self, ulimit: str):
            super().__init__("/tmp/tasa-edge")
            self.ulimit = ulimit

        def shell(self, cmd, timeout=None):
            if cmd.startswith("wc -c"):
                return 0, "98362432\n", ""
            return 0, f"{self.ulimit}\n8000000\n", ""   # ulimit -v (KiB); MemAvailable 7.6 GiB

    tools = remote.DeviceTools(Shell("unlimited"))
    run = lambda rc, err: remote.ToolRun(rc, "", err, None, 1.0)  # noqa: E731
    cases = [
        (run(137, ""), "out of memory on the device: llama-bench on m.gguf failed (exit 137): killed (SIGKILL"),
        (run(134, "ggml.c:1644: GGML_ASSERT(ctx->mem_buffer != NULL) failed\nerror creating backtrace: mmap: 12"),
         "out of memory on the device"),
        (run(1, "terminate called after throwing an instance of 'std::bad_alloc'"), "out of memory on the device"),
        (run(1, "llama-perplexity: failed to write base: No space left on device"), "device storage full while running"),
        (run(127, "sh: 1: /tmp/tasa-edge/bin/llama-bench: not found"), "llama-bench is missing on the device"),
    ]
    for r, msg in cases:
        with pytest.raises(remote.DeviceError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            tools._check(r, "llama-bench", "/tmp/tasa-edge/models/m.gguf")
    # a plain failure with memory to spare is the model's own error, not the device's
    with pytest.raises(remote.TasaError) as exc:
        tools._check(run(1, "llama_bench: error: failed to load model 'm.gguf'"), "llama-bench", "/tmp/tasa-edge/models/m.gguf")
    assert not isinstance(exc.value, remote.DeviceError)
    # the same failure under a 64 MiB address-space limit is out of memory, and says why
    with pytest.raises(remote.DeviceError, match=r"address-space limit \(ulimit -v\) 64 MiB, model file 93\.8 MiB"):
        remote.DeviceTools(Shell("65536"))._check(run(1, "llama_bench: error: failed to load model 'm.gguf'"),
                                                  "llama-bench", "/tmp/tasa-edge/models/m.gguf")
