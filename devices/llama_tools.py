"""llama.cpp's own command-line tools on this machine: where they are, which commit built them,
and ``llama-bench`` as the local speed backend.

``make tools`` (``scripts/build_llama_tools.sh``) builds ``llama-bench``, ``llama-perplexity``,
``llama-quantize`` and ``llama-imatrix`` from the llama.cpp source vendored in the sdist of the
*installed* llama-cpp-python (the same commit as the library tasa-edge links) into
``${TASA_EDGE_CACHE:-~/.cache/tasa-edge}/llama.cpp-<llama-cpp-python version>/bin``.

A tool is looked up in, in order: ``$TASA_LLAMA_BIN_DIR`` (which may also hold *device*
binaries for ``--bin-dir``: a file there that does not run on this machine is skipped), that
cache directory, ``PATH``.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from tasa_edge.errors import TasaError

TOOLS = ("llama-bench", "llama-perplexity", "llama-quantize", "llama-imatrix")
ENV_BIN_DIR = "TASA_LLAMA_BIN_DIR"
BUILD_HINT = "run `make tools` (scripts/build_llama_tools.sh) or set $TASA_LLAMA_BIN_DIR"
_VERSION_RE = re.compile(r"version:\s*(\S+)\s*\(build\s*(-?\d+),\s*commit\s*([0-9A-Za-z_.-]+)\)")


def llama_cpp_python_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("llama_cpp_python")
    except Exception:
        return None


def cache_prefix(version: str | None = None) -> Path:
    """``${TASA_EDGE_CACHE:-~/.cache/tasa-edge}/llama.cpp-<version>`` (what ``make tools`` fills)."""
    base = Path(os.environ.get("TASA_EDGE_CACHE", Path.home() / ".cache" / "tasa-edge"))
    return base / f"llama.cpp-{version or llama_cpp_python_version() or 'unknown'}"


def search_dirs() -> list[tuple[str, Path]]:
    out = []
    env = os.environ.get(ENV_BIN_DIR)
    if env:
        out.append((f"${ENV_BIN_DIR}", Path(env).expanduser()))
    out.append(("cache", cache_prefix() / "bin"))
    return out


@lru_cache(maxsize=64)
def _runs_here(path: str, mtime: float) -> bool:
    """Whether the executable starts on this machine (device binaries in $TASA_LLAMA_BIN_DIR don't)."""
    try:
        p = subprocess.run([path, "--version"], capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    text = p.stdout.decode(errors="replace") + p.stderr.decode(errors="replace")
    # llama-quantize has no --version: it prints its build info and usage, and exits 1
    return p.returncode == 0 or bool(_VERSION_RE.search(text)) or "usage:" in text


def find_tool(name: str) -> Path | None:
    """Path of llama.cpp tool ``name`` that runs on this machine, or None."""
    cands = [d / name for _, d in search_dirs()]
    w = shutil.which(name)
    if w:
        cands.append(Path(w))
    for c in cands:
        if c.is_file() and os.access(c, os.X_OK) and _runs_here(str(c), c.stat().st_mtime):
            return c.resolve()
    return None


def require_tool(name: str) -> Path:
    p = find_tool(name)
    if p is None:
        raise TasaError(f"{name} not found ({BUILD_HINT})")
    return p


def missing_tools(names=TOOLS) -> list[str]:
    return [n for n in names if find_tool(n) is None]


@dataclass(frozen=True)
class BuildInfo:
    version: str | None       # llama.cpp's version string ("b<N>-<commit>")
    build_number: int | None
    commit: str | None
    compiler: str | None
    path: str

    def to_dict(self) -> dict:
        return {"version": self.version, "build_number": self.build_number, "commit": self.commit,
                "compiler": self.compiler, "path": self.path}


def build_info(tool: str | Path) -> BuildInfo:
    """``<tool> --version`` (llama.cpp's common build info): version, build number, commit."""
    p = Path(tool) if os.sep in str(tool) else require_tool(str(tool))
    r = subprocess.run([str(p), "--version"], capture_output=True, text=True, errors="replace", timeout=30)
    return parse_build_info(r.stdout + "\n" + r.stderr, str(p))


def parse_build_info(text: str, path: str) -> BuildInfo:
    """The build info in the output of a llama.cpp tool's ``--version`` (here or on a device)."""
    m = _VERSION_RE.search(text)
    comp = re.search(r"built with (.+?) for", text)
    return BuildInfo(m.group(1) if m else None, int(m.group(2)) if m else None, m.group(3) if m else None,
                     comp.group(1) if comp else None, path)


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def parse_llama_bench(text: str) -> dict:
    """``llama-bench -o json`` output (a JSON array; log lines before it are skipped) -> pp/tg stats."""
    i = text.find("[")
    rows = None
    while i >= 0:
        try:
            rows, _ = json.JSONDecoder().raw_decode(text[i:])
            break
        except json.JSONDecodeError:
            i = text.find("[", i + 1)
    if not isinstance(rows, list):
        raise TasaError(f"llama-bench printed no JSON results: {_last_line(text)[:120]!r}")
    out: dict = {"backend": "llama-bench"}
    for row in rows:
        if not isinstance(row, dict):
            continue
        n_p, n_g = int(row.get("n_prompt") or 0), int(row.get("n_gen") or 0)
        key = "pp" if n_p > 0 and n_g == 0 else "tg" if n_g > 0 and n_p == 0 else None
        if key is None or key in out:
            continue
        samples = [float(x) for x in row.get("samples_ts") or []]
        out[key] = {
            "n_tokens": n_p or n_g,
            "ts_mean": float(row["avg_ts"]),
            "ts_std": float(row.get("stddev_ts") or 0.0),
            "samples_ts": samples,
            "samples_ns": [int(x) for x in row.get("samples_ns") or []],
        }
        out["reps"] = len(samples) or None
        out["threads"] = row.get("n_threads")
        for k in ("cpu_info", "build_commit", "build_number", "model_type", "model_size", "model_n_params", "backends"):
            if k in row:
                out[k] = row[k]
    if "pp" not in out and "tg" not in out:
        raise TasaError("llama-bench JSON has no pp or tg test rows")
    out["warmup"] = 1
    return out


def tools_report() -> dict:
    """Where each tool is and which commit built it (``tasa-edge bench`` records this)."""
    out: dict = {"llama_cpp_python": llama_cpp_python_version(), "tools": {}}
    for n in TOOLS:
        p = find_tool(n)
        out["tools"][n] = str(p) if p else None
    some = next((Path(v) for k, v in out["tools"].items() if v and k != "llama-quantize"), None)
    if some is not None:
        out["build"] = build_info(some).to_dict()
        info = some.parent.parent / "BUILD_INFO.json"
        if info.is_file():
            try:
                out["cache_build"] = json.loads(info.read_text())
            except (OSError, json.JSONDecodeError):
                pass
    return out


# ============================================================================ llama-bench locally
def run_llama_bench(model: str | Path, pp: int, tg: int, reps: int, threads: int, *,
                    limit_bytes: int | None = None, timeout: float | None = None,
                    exe: str | Path | None = None) -> dict:
    """``llama-bench -m MODEL -p PP -n TG -r REPS -t THREADS -o json`` on this machine, parsed as
    the device harness parses it (:func:`parse_llama_bench`); ``backend`` is
    ``llama-bench`` and ``build_commit`` the binary's. ``limit_bytes``: RLIMIT_AS of the process."""

    exe = Path(exe) if exe else require_tool("llama-bench")
    args = [str(exe), "-m", str(model), "-p", str(pp), "-n", str(tg), "-r", str(reps), "-t", str(threads),
            "-o", "json"]

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    try:
        p = subprocess.run(args, capture_output=True, text=True, errors="replace", timeout=timeout,
                           preexec_fn=limit if limit_bytes else None)
    except subprocess.TimeoutExpired:
        raise TasaError(f"llama-bench timed out after {timeout:.0f} s") from None
    if p.returncode != 0:
        import signal

        why = (f"killed by {signal.Signals(-p.returncode).name}" if p.returncode < 0 else f"exited with {p.returncode}")
        last = [ln for ln in (p.stderr + "\n" + p.stdout).splitlines() if ln.strip()]
        raise TasaError(f"llama-bench {why}" + (f": {last[-1].strip()[:200]}" if last else ""))
    res = parse_llama_bench(p.stdout)
    res["exe"] = str(exe)
    return res


# ============================================================================ bench() integration
SPEED_BACKENDS = ("auto", "llama-bench", "llama-cpp-python")


def apply_test_sizes(size, n_prompt: int | None, n_gen: int | None):
    """``size`` with llama-bench's ``-p`` (pp tokens) / ``-n`` (tg tokens) overrides applied."""
    from dataclasses import replace

    for flag, v in (("--n-prompt", n_prompt), ("--n-gen", n_gen)):
        if v is not None and v < 0:
            raise TasaError(f"{flag} must be >= 0, got {v}")
    if n_prompt is not None:
        size = replace(size, pp=int(n_prompt))
    if n_gen is not None:
        size = replace(size, tg=int(n_gen))
    if size.pp == 0 and size.tg == 0:
        raise TasaError("--n-prompt and --n-gen are both 0: no speed test left")
    return size


def choose_speed_backend(requested: str, target: str) -> dict:
    """What measures GGUF speed on the local target: ``{"gguf": "llama-bench"|"llama-cpp-python",
    "reason", "llama_bench"?: path}``. Remote targets always run the device's llama-bench."""
    if requested not in SPEED_BACKENDS:
        raise TasaError(f"unknown speed backend '{requested}' (expected one of {', '.join(SPEED_BACKENDS)})")
    if target != "local":
        return {"gguf": "llama-bench", "reason": f"{target} target: llama-bench on the device"}
    if requested == "llama-cpp-python":
        return {"gguf": "llama-cpp-python", "reason": "requested (--speed-backend llama-cpp-python)"}
    exe = find_tool("llama-bench")
    if exe is None:
        if requested == "llama-bench":
            raise TasaError(f"--speed-backend llama-bench: llama-bench not found ({BUILD_HINT})")
        return {"gguf": "llama-cpp-python", "reason": f"llama-bench not found ({BUILD_HINT})"}
    return {"gguf": "llama-bench", "reason": "llama-bench found" if requested == "auto" else "requested",
            "llama_bench": str(exe)}


def local_llama_bench(run) -> tuple[dict, dict]:
    """For a local :class:`devices.harness._LocalRun`: llama-bench speed of every GGUF model when
    that is the chosen backend. Returns ({model name: report ``speed`` entry}, target info)."""
    import time

    from tasa_edge.progress import progress_bar

    choice = dict(getattr(run, "speed_backend", None) or choose_speed_backend("llama-cpp-python", "local"))
    info = {"speed_backend": choice}
    if choice["gguf"] != "llama-bench":
        return {}, info
    exe = Path(choice["llama_bench"])
    choice["build"] = build_info(exe).to_dict()
    sz, out = run.size, {}
    ggufs = [m for m in run.models if m.kind == "gguf"]
    with progress_bar("llama-bench", len(ggufs), enabled=run.show) as advance:
        for m in ggufs:
            t0 = time.perf_counter()
            try:
                b = run_llama_bench(m.path, sz.pp, sz.tg, sz.reps, run.threads, limit_bytes=run.limit, exe=exe)
            except TasaError as exc:
                run.errors[m.name] = str(exc) + (f" (memory limit {run.limit / 2**30:.2f} GiB)" if run.limit else "")
            else:
                b.pop("exe", None)
                out[m.name] = {**b, "backend": "llama-bench", "threads": b.get("threads") or run.threads}
                run.results[m.name].setdefault("timings", {})["llama_bench_s"] = time.perf_counter() - t0
            advance(1)
    return out, info
