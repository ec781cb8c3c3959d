"""How the ``tasa-edge`` command ends: exit statuses and the one line on stderr.

* a :class:`~tasa_edge.errors.TasaError` (bad input, unmet requirement): ``error: ...``, exit 2;
* a usage error (unknown command or option, missing or malformed argument): click's usage
  message, exit 2, whichever click raised it (``click`` itself, or the copy typer >= 0.16 vendors
  as ``typer._click``);
* Ctrl-C / SIGTERM: ``interrupted``, exit 130 / 143 (:mod:`tasa_edge.interrupt`);
* an OS failure (disk full, I/O error): one line, exit 1.

Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys

from .errors import TasaError
from .interrupt import Terminated, install, received

_err = None


def run_app(app, err_console) -> None:
    global _err
    _err = err_console
    install()
    try:
        rv = app(standalone_mode=False)
    except TasaError as exc:
        _exit_error(str(exc), exc.exit_code)
    except Terminated as exc:
        _exit_interrupted(exc.exit_code)
    except KeyboardInterrupt:
        _exit_interrupted(130)
    except Exception as exc:
        _exit_click(exc)  # re-raises what is not a click exception or an OS error
    if received() is not None:  # typer turned a KeyboardInterrupt into Exit(130)
        _exit_interrupted(128 + received())
    sys.exit(rv if isinstance(rv, int) and not isinstance(rv, bool) else 0)


def _exit_error(msg: str, code: int):
    from rich.markup import escape

    _err.print(f"[bold red]error:[/] {escape(msg)}", highlight=False, soft_wrap=True)
    sys.exit(code)


def _exit_interrupted(code: int):
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the line and the exit are not cut short
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _err.print("interrupted", highlight=False)
    sys.exit(code)


def _click_exception_modules():
    """``click.exceptions`` and typer's vendored copy (typer >= 0.16 raises its own classes)."""
    import importlib

    mods = []
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            mods.append(importlib.import_module(name))
        except ImportError:
            pass
    return mods


def _exit_click(exc: Exception):
    mods = _click_exception_modules()
    for m in mods:
        if isinstance(exc, getattr(m, "Exit", ())):
            sys.exit(exc.exit_code)
        if isinstance(exc, getattr(m, "Abort", ())):
            if isinstance(exc.__context__, KeyboardInterrupt) or received() is not None:
                _exit_interrupted(128 + (received() or 2))
            sys.exit(1)
        if isinstance(exc, m.ClickException):
            exc.show()  # usage errors: the usage line, a hint and "Error: ..." (exit 2)
            sys.exit(exc.exit_code)
    import typer.exceptions as te

    if isinstance(exc, getattr(te, "Exit", ())):
        sys.exit(exc.exit_code)
    if isinstance(exc, getattr(te, "Abort", ())):
        if received() is not None:
            _exit_interrupted(128 + received())
        sys.exit(1)
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        _exit_error(str(exc), 2)
    if isinstance(exc, OSError):  # the system failed the tool (disk full, I/O error): one line
        _exit_error(f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""), 1)
    raise exc


