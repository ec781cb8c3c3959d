"""Run ``llama_model_quantize`` in a forked child process.

``llama_model_quantize`` is one long C call with no cancel hook (llama.cpp's
``llama_model_quantize_params`` has no progress callback), and llama.cpp ``GGML_ABORT``s on
some inputs. In a child process:

* Ctrl-C / SIGTERM reach the parent at once (it only waits); it kills the child and the
  exception unwinds through :func:`tasa_edge.fsutil.atomic_path`, which removes the partial file;
* an abort or crash of llama.cpp ends the child, not the CLI: it becomes a one-line error;
* llama.cpp's log is silenced unless ``--verbose`` (:mod:`tasa_edge.llamalog`), and its last
  error line is passed back for the message.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
from pathlib import Path

from tasa_edge.errors import TasaError


def _child(fn, src: bytes, dst: bytes, params, conn) -> None:
    from tasa_edge import llamalog
    from tasa_edge.interrupt import reset_in_child

    reset_in_child()
    rc = 1
    try:
        llamalog.install()
        rc = int(fn(src, dst, ctypes.byref(params)))
        conn.send((rc, llamalog.last_error()))
    finally:
        conn.close()
        os._exit(0 if rc == 0 else 1)


def run_quantize(fn, src: Path, dst: Path, params, what: str) -> None:
    """``fn(src, dst, &params)`` (llama_model_quantize) in a child; TasaError on failure."""
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(fn, str(src).encode(), str(dst).encode(), params, send), daemon=True)
    proc.start()
    send.close()
    try:
        proc.join()
    except BaseException:
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        raise
    msg = recv.recv() if recv.poll() else None
    recv.close()
    if msg is None:
        code = proc.exitcode
        how = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit {code}"
        raise TasaError(f"llama_model_quantize crashed for {what} ({how})")
    rc, last = msg
    if rc != 0:
        raise TasaError(f"llama_model_quantize failed for {what} (code {rc})" + (f": {last}" if last else ""))
