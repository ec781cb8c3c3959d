"""Machine description for reports: CPU model, cores, threads, RAM -- local or over adb/ssh."""

from __future__ import annotations

import os
import platform
import re

_MODEL_KEYS = ("model name", "Model", "Hardware", "cpu model", "Processor")
_FLAG_KEYS = ("flags", "Features")
_INTERESTING = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "fma", "f16c", "neon", "asimd", "asimddp",
                "i8mm", "sve", "sve2", "fphp", "asimdhp", "bf16")


def parse_cpuinfo(text: str) -> dict:
    """CPU model, processor count and SIMD features from ``/proc/cpuinfo`` text (x86 or ARM)."""
    model, flags, n = None, set(), 0
    parts: dict[str, str] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        k, v = (s.strip() for s in line.split(":", 1))
        if k == "processor":
            n += 1
        elif k in _MODEL_KEYS and v and model is None:
            if not (k == "Processor" and v.isdigit()):
                model = v
        elif k in _FLAG_KEYS:
            flags.update(v.split())
        elif k in ("CPU implementer", "CPU part") and k not in parts:
            parts[k] = v
    if model is None and parts:
        model = "ARM implementer {} part {}".format(parts.get("CPU implementer", "?"), parts.get("CPU part", "?"))
    return {"cpu": model, "processors": n or None, "features": sorted(f for f in flags if f in _INTERESTING)}


def parse_meminfo(text: str) -> int | None:
    m = re.search(r"^MemTotal:\s*(\d+)\s*kB", text, re.M)
    return int(m.group(1)) * 1024 if m else None


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:
        return ""


def usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def local_machine(threads: int) -> dict:
    info = parse_cpuinfo(_read("/proc/cpuinfo"))
    ram = parse_meminfo(_read("/proc/meminfo"))
    if ram is None:
        try:
            import psutil

            ram = int(psutil.virtual_memory().total)
        except Exception:  # pragma: no cover
            ram = None
    versions = {"python": platform.python_version(), "numpy": _version("numpy")}
    for mod in ("llama_cpp", "onnxruntime"):
        versions[mod] = _version(mod)
    return {
        "host": platform.node(),
        "os": platform.platform(),
        "arch": platform.machine(),
        "cpu": info["cpu"] or platform.processor() or None,
        "cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "threads": threads,
        "ram_bytes": ram,
        "features": info["features"],
        "software": versions,
    }


def _version(mod: str) -> str | None:
    try:
        from importlib.metadata import version

        return version({"llama_cpp": "llama-cpp-python"}.get(mod, mod))
    except Exception:
        return None


#: One shell command whose output :func:`parse_remote` reads (POSIX sh, toybox and busybox).
REMOTE_PROBE = (
    "echo '@@cpuinfo'; cat /proc/cpuinfo; echo '@@meminfo'; cat /proc/meminfo; "
    "echo '@@uname'; uname -srm; echo '@@nproc'; (nproc 2>/dev/null || getconf _NPROCESSORS_ONLN); "
    "echo '@@model'; (getprop ro.product.model 2>/dev/null; getprop ro.soc.model 2>/dev/null; "
    "cat /proc/device-tree/model 2>/dev/null; echo)"
)


def parse_remote(text: str, threads: int | None) -> dict:
    sec: dict[str, str] = {}
    cur = None
    for line in text.splitlines():
        if line.startswith("@@"):
            cur = line[2:].strip()
            sec[cur] = ""
        elif cur:
            sec[cur] += line + "\n"
    info = parse_cpuinfo(sec.get("cpuinfo", ""))
    uname = sec.get("uname", "").split()
    nproc = sec.get("nproc", "").strip().split("\n")[0]
    model = " / ".join(s.strip().strip("\x00") for s in sec.get("model", "").splitlines() if s.strip().strip("\x00"))
    cores = int(nproc) if nproc.isdigit() else info["processors"]
    return {
        "host": model or None,
        "os": " ".join(uname[:2]) or None,
        "arch": uname[-1] if uname else None,
        "cpu": info["cpu"],
        "cores": cores,
        "usable_cores": cores,
        "threads": threads or cores,
        "ram_bytes": parse_meminfo(sec.get("meminfo", "")),
        "features": info["features"],
        "software": {},
    }
