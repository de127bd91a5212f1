"""The errors that ``specmoe`` and ``specmoe-launch`` report as one line (docs/cli_errors.md).

Notation: none (no tensors here).

Every check of a user's input raises one of these, with two parts: ``what`` is wrong (naming the
file, field or flag and where) and ``fix``, what to do about it. ``str(error)`` is
``"<what> -- <fix>"``; the entry points (``megatron_specmoe/entry.py``) print
``specmoe <cmd>: error: <what> -- <fix>`` on stderr and exit with ``exit_code``:

    SpecMoEUsageError   2   a flag, its value or a combination of flags (as argparse's own errors)
    SpecMoEDataError    1   an input file or folder: a trace, a plan, a checkpoint, a text file
    SpecMoEEnvironmentError 1   the Python / packages cannot run the command (e.g. the launcher on
                                Python 3.11, where megatron.training does not import)

Both are ``ValueError`` subclasses, so library callers that catch ``ValueError`` keep working.
"""

from __future__ import annotations

__all__ = ["SpecMoEError", "SpecMoEUsageError", "SpecMoEDataError", "SpecMoEEnvironmentError",
           "SpecMoEArgumentError"]


class SpecMoEError(ValueError):
    """A bad input, reported as ``"<what> -- <fix>"``.

    Attributes:
        what: what is wrong, naming the file / field / flag.
        fix: what to do about it.
        exit_code: the process exit status the entry points use.
    """

    exit_code = 1

    def __init__(self, what: str, fix: str) -> None:
        if not what or not fix:
            raise TypeError("SpecMoEError needs both what is wrong and what to do")
        self.what = " ".join(str(what).split())  # one line, whatever the caller built
        self.fix = " ".join(str(fix).split())
        super().__init__(f"{self.what} -- {self.fix}")

    def __reduce__(self):  # picklable across spawned ranks
        return (type(self), (self.what, self.fix))


class SpecMoEUsageError(SpecMoEError):
    """A flag, a flag's value or a combination of flags cannot work (exit status 2)."""

    exit_code = 2


class SpecMoEDataError(SpecMoEError):
    """An input file or folder is unusable: missing, corrupt, or inconsistent (exit status 1)."""

    exit_code = 1


class SpecMoEEnvironmentError(SpecMoEError):
    """The interpreter or installed packages cannot run the command (exit status 1)."""

    exit_code = 1


class SpecMoEArgumentError(SpecMoEUsageError):
    """A Megatron-LM command line that cannot run with the specmoe dispatcher (raised by
    ``megatron_lm/args.py``'s checks inside ``validate_args``); the message says why and how to fix
    it, ``specmoe-launch`` prints it as one line and exits 2."""

    def __init__(self, message: str, fix: str = "change the flags as said; `specmoe-launch --help` "
                 "and docs/cli_errors.md list the --specmoe-* flags") -> None:
        super().__init__(message, fix)
