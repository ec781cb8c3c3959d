"""Ctrl-C and SIGTERM during export and baseline on the real packaged model: exit 130 / 143,
one line "interrupted", no temporary or output file left, no worker left running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

COMMANDS = {
    "export": ["export", "smollm2-135m", "--type", "Q6_K", "--threads", "1"],
    "baseline": ["baseline", "smollm2-135m", "--ftype", "Q6_K", "--threads", "1"],
}


def _interrupt_midway(tmp_path: Path, cmd: list[str], sig: int, group: bool):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    env = {**os.environ, "TASA_NO_PROGRESS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "tasa_edge.cli", *cmd, "-o", str(out_dir / "m.gguf")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while not list(out_dir.glob(".m.gguf.*.tmp")):  # the output is being written
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the command never started writing"
        time.sleep(0.05)
    time.sleep(1.0)
    assert proc.poll() is None, "finished before the signal: make the job bigger"
    if group:
        os.killpg(proc.pid, sig)  # what Ctrl-C in a terminal does: the whole foreground group
    else:
        proc.send_signal(sig)  # `kill PID`
    stdout, stderr = proc.communicate(timeout=60)
    return proc.returncode, stderr, out_dir, proc.pid


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("sig,code,group", [(signal.SIGINT, 130, True), (signal.SIGTERM, 143, False)],
                         ids=["ctrl-c", "sigterm"])
def test_interrupt_exits_cleanly_and_leaves_nothing(tmp_path, command, sig, code, group):
    rc, stderr, out_dir, pid = _interrupt_midway(tmp_path, COMMANDS[command], sig, group)
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert rc == code, stderr
    assert lines == ["interrupted"], stderr
    time.sleep(0.5)
    assert list(out_dir.iterdir()) == []
    # no process of the session (a quantize worker) outlives the command
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
