"""Memory-bandwidth probe: how fast the target can stream bytes from RAM.

Token generation on a CPU is bound by memory bandwidth: every decoded token reads (nearly) all the
weights once plus the KV cache. :func:`decode_efficiency` turns a decode speed into bytes/s read and
the fraction of the probed bandwidth it reaches -- a model at 0.8 is bandwidth-bound (only fewer
bytes make it faster), one at 0.2 is compute- or overhead-bound (better kernels would help).

* local: numpy sums of a large array (larger than any cache), split over ``threads`` worker threads
  (numpy releases the GIL in reductions), best of ``repeats``; plus a single-thread copy.
* adb / ssh: ``dd`` of a file that is already in the page cache (the pushed model) to ``/dev/null``,
  i.e. the kernel's copy out of RAM; best of ``repeats`` after a warm-up read. ``dd`` exists in
  Android's toybox, busybox and GNU coreutils.
"""

from __future__ import annotations

import re
import shlex
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

MIB = 1024 * 1024
_DD_RE = re.compile(r"(\d+) bytes\b.*?copied,\s*([0-9.]+)\s*s", re.S)


def probe_local(threads: int = 1, size_bytes: int = 256 * MIB, repeats: int = 5) -> dict:
    """Read bandwidth (bytes/s) of this machine with ``threads`` readers, and 1-thread copy bandwidth."""
    threads = max(1, int(threads))
    n = max(1, size_bytes // 4)
    a = np.ones(n, dtype=np.float32)  # touched: every page is resident
    parts = np.array_split(a, threads)
    best_read = float("inf")
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in range(repeats):
            t0 = time.perf_counter()
            sum(pool.map(np.sum, parts))
            best_read = min(best_read, time.perf_counter() - t0)
    b = np.empty_like(a)
    best_copy = float("inf")
    for _ in range(max(1, repeats // 2)):
        t0 = time.perf_counter()
        np.copyto(b, a)
        best_copy = min(best_copy, time.perf_counter() - t0)
    nbytes = a.nbytes
    del a, b, parts
    return {
        "method": f"numpy sum of {nbytes // MIB} MiB in {threads} thread(s), best of {repeats}",
        "read_bytes_per_s": nbytes / best_read,
        "copy_bytes_per_s": 2 * nbytes / best_copy,
        "threads": threads,
        "array_bytes": nbytes,
        "repeats": repeats,
    }


def dd_command(path: str) -> str:
    return f"dd if={shlex.quote(path)} of=/dev/null bs=1048576 2>&1"


def parse_dd(text: str) -> tuple[int, float] | None:
    """(bytes, seconds) from the summary line of GNU / toybox / busybox dd, or None."""
    m = _DD_RE.search(text)
    if not m:
        return None
    nbytes, sec = int(m.group(1)), float(m.group(2))
    return (nbytes, sec) if sec > 0 else None


def probe_remote(shell, path: str, repeats: int = 3) -> dict | None:
    """Page-cache read bandwidth of a remote target. ``shell(cmd) -> (rc, output)``; ``path`` is a
    file on the target (bigger than its caches). None when dd's output cannot be parsed."""
    cmd = dd_command(path)
    shell(cmd)  # warm-up: bring the file into the page cache
    best = None
    for _ in range(repeats):
        rc, out = shell(cmd)
        got = parse_dd(out) if rc == 0 else None
        if got and (best is None or got[0] / got[1] > best[0] / best[1]):
            best = got
    if best is None:
        return None
    return {
        "method": f"dd of a cached {best[0] // MIB} MiB file to /dev/null, best of {repeats}",
        "read_bytes_per_s": best[0] / best[1],
        "copy_bytes_per_s": None,
        "threads": 1,
        "array_bytes": best[0],
        "repeats": repeats,
    }


def decode_efficiency(bytes_per_token: float | None, tg_ts: float | None, bandwidth: dict | None) -> dict | None:
    """Bytes read per second while decoding and its fraction of the probed read bandwidth."""
    if not bytes_per_token or not tg_ts:
        return None
    bps = float(bytes_per_token) * float(tg_ts)
    bw = (bandwidth or {}).get("read_bytes_per_s")
    return {"bytes_per_token": int(bytes_per_token), "bytes_per_s": bps,
            "bandwidth_fraction": (bps / bw) if bw else None}
