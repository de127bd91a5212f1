"""Around every command of ``specmoe`` and ``specmoe-launch``: one-line errors and exit codes.

Also ``--debug``, ``--verbose`` and the known-irrelevant warnings (docs/cli_errors.md).

Notation: none (no tensors here).

``run_entry(prog, body, debug=..., verbose=...)`` runs ``body()`` and turns what it raises into

    SpecMoEUsageError       specmoe <cmd>: error: <what> -- <fix>        exit 2
    SpecMoEDataError        specmoe <cmd>: error: <what> -- <fix>        exit 1
    ValueError              specmoe <cmd>: error: <its message>          exit 1
    OSError                 specmoe <cmd>: error: <file>: <reason> -- check the path...   exit 1
    KeyboardInterrupt       specmoe <cmd>: interrupted                    exit 130
    anything else           specmoe <cmd>: internal error: <type>: <message> -- rerun with --debug
                            and report the traceback                      exit 1

one line on stderr, no traceback; with ``--debug`` the exception propagates with its traceback.

Known warnings. Importing megatron-core without TransformerEngine, apex or absl (as on every CPU
machine) warns five times that it falls back to torch; users read those as errors. While the
command runs, warnings whose text starts with a ``KNOWN_WARNINGS`` prefix are not shown (all others
are); with ``--verbose`` one line at the end says how many of which were hidden. ``--debug`` shows
them all.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections import Counter
from typing import Callable, Iterator, TextIO

from megatron_specmoe.artifacts.errors import SpecMoEError

__all__ = ["KNOWN_WARNINGS", "run_entry", "format_error", "known_warnings_hidden"]

# (start of the warning's text, why it does not concern a specmoe user)
KNOWN_WARNINGS: tuple[tuple[str, str], ...] = (
    ("Transformer Engine and Apex are not installed",
     "megatron-core falls back to torch implementations; specmoe runs without either"),
    ("Apex is not installed", "megatron-core falls back to torch implementations"),
    ("absl.logging is not installed", "megatron-core logs through Python's logging instead"),
)


def format_error(prog: str, exc: BaseException) -> tuple[str, int]:
    """(the one line to print, the exit status) for ``exc`` raised by command ``prog``."""
    if isinstance(exc, SpecMoEError):
        return f"{prog}: error: {exc.what} -- {exc.fix}", exc.exit_code
    if isinstance(exc, ValueError):
        return f"{prog}: error: {' '.join(str(exc).split())}", 1
    if isinstance(exc, OSError):
        where = exc.filename if exc.filename is not None else "a file"
        reason = exc.strerror or str(exc)
        return (f"{prog}: error: {where}: {reason} -- check the path and its permissions", 1)
    if isinstance(exc, KeyboardInterrupt):
        return f"{prog}: interrupted", 130
    text = " ".join(str(exc).split())
    return (f"{prog}: internal error: {type(exc).__name__}: {text} -- this is a bug in "
            "megatron_specmoe: rerun with --debug and report the traceback", 1)


@contextlib.contextmanager
def known_warnings_hidden(prog: str, *, verbose: bool, stream: TextIO | None = None) -> Iterator[Counter]:
    """Hide warnings listed in ``KNOWN_WARNINGS`` while the block runs; yields the counter of
    hidden ones (prefix -> count). With ``verbose``, print what was hidden at the end."""
    hidden: Counter = Counter()
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            text = str(message)
            for prefix, _why in KNOWN_WARNINGS:
                if issubclass(category, UserWarning) and text.startswith(prefix):
                    hidden[prefix] += 1
                    return
            shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        try:
            yield hidden
        finally:
            if verbose and hidden:
                out = stream or sys.stderr
                parts = [f"{n} x '{prefix}' ({why})" for prefix, why in KNOWN_WARNINGS
                         if (n := hidden.get(prefix))]
                print(f"{prog}: --verbose: hid {sum(hidden.values())} known warning(s) from "
                      f"megatron-core: {'; '.join(parts)}; --debug shows them", file=out)


def run_entry(prog: str, body: Callable[[], int], *, debug: bool = False, verbose: bool = False,
              only_ours: bool = False) -> int:
    """Run ``body()`` and return its exit status, or print one line and return the status the
    module docstring gives for what it raised. ``SystemExit`` (argparse, a script's exit) passes
    through. ``only_ours``: report only ``SpecMoEError`` this way and let everything else
    propagate (the launcher: a Megatron-LM script's own errors keep their tracebacks)."""
    if debug:
        return int(body() or 0)
    try:
        with known_warnings_hidden(prog, verbose=verbose):
            return int(body() or 0)
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - the entry point reports everything in one line
        if only_ours and not isinstance(exc, SpecMoEError):
            raise
        line, code = format_error(prog, exc)
        print(line, file=sys.stderr, flush=True)
        return code
