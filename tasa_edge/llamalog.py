"""llama.cpp's log lines: silenced unless ``--verbose``, the last error lines kept for messages.

llama-cpp-python prints every llama.cpp / ggml log line to stderr. :func:`install` replaces its
callback with one that writes to stderr only when verbose; otherwise lines are dropped except
the last few error-level ones, which :func:`last_error` returns so a failure can be reported
as one line.
"""

from __future__ import annotations

import collections
import ctypes
import sys

VERBOSE = False
_errors: collections.deque = collections.deque(maxlen=8)
_callback = None  # keep the ctypes callback alive
_GGML_LOG_LEVEL_ERROR, _GGML_LOG_LEVEL_CONT = 4, 5  # ggml.h: NONE, DEBUG, INFO, WARN, ERROR, CONT
_last_level = 0


def set_verbose(verbose: bool) -> None:
    global VERBOSE
    VERBOSE = bool(verbose)


def install() -> None:
    """Route llama.cpp's (and ggml's) log through this module. Needs llama-cpp-python."""
    global _callback
    import llama_cpp

    @llama_cpp.llama_log_callback
    def cb(level, text, user_data):  # noqa: ARG001
        global _last_level
        if level != _GGML_LOG_LEVEL_CONT:
            _last_level = level
        s = (text or b"").decode("utf-8", "replace")
        if VERBOSE:
            sys.stderr.write(s)
            sys.stderr.flush()
        elif _last_level == _GGML_LOG_LEVEL_ERROR and s.strip():
            _errors.append(" ".join(s.split()))

    _callback = cb
    llama_cpp.llama_log_set(cb, ctypes.c_void_p(0))


def last_error() -> str:
    return _errors[-1] if _errors else ""
