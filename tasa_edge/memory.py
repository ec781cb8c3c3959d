"""Peak memory of this process, measured one way for every report (analysis, benchmark, device harness)."""

from __future__ import annotations

import resource
import sys


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far.

    Linux: ``VmHWM`` of ``/proc/self/status`` -- the high-water mark of *this* address space.
    (``getrusage``'s ``ru_maxrss`` survives ``exec`` and would report the forking parent's size.)
    Elsewhere ``ru_maxrss`` (kB on Linux/BSD, bytes on macOS)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def release_freed_memory() -> None:
    """Hand memory the allocator keeps after frees back to the OS (glibc ``malloc_trim``).

    Per-sample gradients are allocated and freed tensor by tensor; glibc keeps the freed
    medium-size blocks in its heap, so without a trim the resident set creeps up by several
    hundred MB over a few samples although nothing is alive. A no-op where glibc is absent."""
    global _trim
    if _trim is None:
        try:
            import ctypes

            _trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _trim = False
    if _trim:
        _trim(0)


_trim = None
