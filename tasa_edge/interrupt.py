"""Ctrl-C and SIGTERM: end any command with one line, status 130 / 143, and no files left.

:func:`install` makes SIGINT raise ``KeyboardInterrupt`` and SIGTERM raise :class:`Terminated`
(a ``BaseException``, so no ``except Exception`` swallows it) in the main thread. The exception
unwinds through :func:`tasa_edge.fsutil.atomic_path`, which removes its temporary file, and the
CLI's ``main`` prints ``interrupted`` and exits with 128 + the signal number. A second signal
while the first one is unwinding is ignored, so clean-up is not cut short.
"""

from __future__ import annotations

import signal

_received: int | None = None


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM."""

    exit_code = 128 + signal.SIGTERM


def received() -> int | None:
    """The signal number that interrupted this process, if any."""
    return _received


def _handler(signum, frame):  # noqa: ARG001
    global _received
    if _received is not None:
        return  # already unwinding
    _received = signum
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated()


def install() -> None:
    signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGTERM, _handler)


def reset_in_child() -> None:
    """In a forked worker: die on the signal itself (the parent cleans up)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
