"""Safe file handling for every input the tools read and every output they write.

Notation: none (paths and bytes only).

Inputs: ``check_input_file`` refuses what would hang or read without bound (a FIFO, a device such
as ``/dev/zero``, a socket) and names a missing path or a directory given for a file, before
anything is opened. Outputs: ``check_output_file`` / ``check_output_dir`` run *before* the work
(an ``--out`` that is an existing file is refused before minutes of fitting), and the writers put
data in a temporary sibling and rename it into place, so that an interrupted or failed command
leaves nothing half-written where a later command would read it:

    write_bytes_atomic(path, data)      a file
    atomic_file(path)                   a context manager: write to the yielded temporary path
    atomic_folder(path)                 a context manager: fill the yielded temporary folder;
                                        on success it replaces ``path`` (an older folder at
                                        ``path`` is removed only after the new one is in place)

Temporary names start with ``.`` and end with ``.tmp-<pid>``; on failure they are removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from pathlib import Path
from typing import Iterator, Union

from megatron_specmoe.artifacts.errors import SpecMoEDataError, SpecMoEUsageError

__all__ = ["check_input_file", "check_output_file", "check_output_dir", "write_bytes_atomic",
           "atomic_file", "atomic_folder", "is_temporary_name"]

PathLike = Union[str, "os.PathLike[str]"]


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def is_temporary_name(name: str) -> bool:
    """Whether ``name`` is one of the temporary names the writers here use."""
    return name.startswith(".") and ".tmp-" in name


def check_input_file(path: PathLike, *, what: str, fix: str = "check the path") -> Path:
    """``path`` as a Path if it is an existing regular file (symlinks followed), else raise
    ``SpecMoEDataError`` saying what it is instead."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise SpecMoEDataError(f"{what} {p}: no such file", fix) from None
    except OSError as exc:
        raise SpecMoEDataError(f"{what} {p}: cannot be read ({exc.strerror})", fix) from None
    if stat.S_ISDIR(st.st_mode):
        raise SpecMoEDataError(f"{what} {p}: is a directory, expected a file", fix)
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else
                "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else
                "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
        raise SpecMoEDataError(f"{what} {p}: is {kind}, not a regular file; reading it could "
                               "hang or never end", "give a regular file")
    if not os.access(p, os.R_OK):
        raise SpecMoEDataError(f"{what} {p}: permission denied", "make it readable")
    return p


def _check_parent(flag: str, p: Path) -> None:
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.exists():
        raise SpecMoEUsageError(f"{flag} {p}: the folder {parent} does not exist",
                                f"create {parent} first or choose another {flag}")
    if not parent.is_dir():
        raise SpecMoEUsageError(f"{flag} {p}: {parent} is not a folder", f"choose another {flag}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SpecMoEUsageError(f"{flag} {p}: the folder {parent} is not writable",
                                f"choose another {flag}")


def check_output_file(flag: str, path: PathLike) -> Path:
    """Refuse, before any work, an output file path that cannot be written: an existing
    directory or special file, a missing or read-only parent folder. An existing regular file is
    replaced (atomically) when the command succeeds."""
    p = Path(path)
    if p.is_dir():
        raise SpecMoEUsageError(f"{flag} {p}: is a directory, expected a file name",
                                f"give a file path, e.g. {flag} {p / 'out'}")
    if p.exists() and not p.is_file():
        raise SpecMoEUsageError(f"{flag} {p}: exists and is not a regular file",
                                f"choose another {flag}")
    _check_parent(flag, p)
    return p


def check_output_dir(flag: str, path: PathLike, *, marker: str = "") -> Path:
    """Refuse, before any work, an output folder that cannot be made: an existing file, a missing
    or read-only parent. With ``marker`` (e.g. "plan.json"), an existing non-empty folder must
    hold that file (it is then replaced): other folders are never overwritten."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise SpecMoEUsageError(f"{flag} {p}: exists and is not a folder",
                                f"remove it or choose another {flag}")
    if marker and p.is_dir() and any(p.iterdir()) and not (p / marker).is_file():
        raise SpecMoEUsageError(f"{flag} {p}: is a non-empty folder without {marker}; it would be "
                                "replaced", f"choose an empty or new folder for {flag}")
    _check_parent(flag, p)
    return p


def write_bytes_atomic(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary sibling and a rename."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


@contextlib.contextmanager
def atomic_file(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` if the block succeeds,
    remove it if the block raises."""
    final = Path(path)
    tmp = _tmp_sibling(final)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_folder(path: PathLike) -> Iterator[Path]:
    """Yield a new temporary folder next to ``path``; on success it takes ``path``'s place
    (an existing folder there is moved aside, then removed), on failure it is removed."""
    final = Path(path)
    tmp = _tmp_sibling(final)
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
