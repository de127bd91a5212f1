"""The demo text corpus: the Python standard library's own source files, split by file.

Every machine that runs this package has the standard library of its interpreter on disk, and
nobody here wrote it (it is PSF-licensed; see ``megatron_specmoe/data/README.md``). The corpus is
the ``.py`` files under ``sysconfig.get_paths()["stdlib"]``, without ``site-packages`` /
``dist-packages`` (third-party code) and ``__pycache__``.

Splits (``Split``), decided per file so that no file is in two of them:
    fit          80 %   tokenizer and model training
    calibration  10 %   profiling routes to fit predictors and plans
    evaluation   10 %   validation loss, serving and measuring plans
A file's split is a pure function of its relative path (``/``-separated): the first 8 bytes of
``sha256(path)`` as an integer, modulo 100 (< 80 fit, < 90 calibration, else evaluation). The
same interpreter version therefore always gives the same corpus; another version gives a
similar but not identical one (the stdlib changes between releases).

Files that are not valid UTF-8 (a few test fixtures on purpose) are skipped and counted in
``Corpus.skipped``; nothing else is filtered.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Sequence, get_args

__all__ = [
    "Split",
    "SPLIT_PERCENT",
    "CorpusFile",
    "Corpus",
    "stdlib_root",
    "split_of",
    "read_corpus",
    "load_tokenizer",
    "encode_files",
]

Split = Literal["fit", "calibration", "evaluation"]
# Upper bounds (exclusive) of each split on the 0..99 hash bucket, in order.
SPLIT_PERCENT: dict[str, int] = {"fit": 80, "calibration": 90, "evaluation": 100}
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


@dataclass(frozen=True, kw_only=True)
class CorpusFile:
    """One source file. Attributes: relpath (``/``-separated, relative to the stdlib root),
    split, text (the decoded file)."""

    relpath: str
    split: str
    text: str


@dataclass(frozen=True, kw_only=True)
class Corpus:
    """Files of the requested splits, sorted by relative path.

    Attributes: root (the stdlib directory read), files, skipped (relative paths that were not
    UTF-8 and were left out)."""

    root: str
    files: tuple[CorpusFile, ...]
    skipped: tuple[str, ...]

    def of(self, split: Split) -> tuple[CorpusFile, ...]:
        _check_split(split)
        return tuple(f for f in self.files if f.split == split)

    def num_bytes(self, split: Optional[Split] = None) -> int:
        files = self.files if split is None else self.of(split)
        return sum(len(f.text.encode("utf-8")) for f in files)


def _check_split(split: str) -> None:
    if split not in get_args(Split):
        raise ValueError(f"split {split!r} is not one of {list(get_args(Split))}")


def stdlib_root() -> str:
    """The standard library directory of the running interpreter."""
    return sysconfig.get_paths()["stdlib"]


def split_of(relpath: str) -> str:
    """The split of a file, from its ``/``-separated relative path alone (see module docstring)."""
    bucket = int.from_bytes(hashlib.sha256(relpath.encode("utf-8")).digest()[:8], "big") % 100
    for name, upper in SPLIT_PERCENT.items():
        if bucket < upper:
            return name
    raise AssertionError("SPLIT_PERCENT must end at 100")


def _source_files(root: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
        for name in filenames:
            if name.endswith(".py"):
                out.append((Path(dirpath) / name).relative_to(root).as_posix())
    return sorted(out)


def read_corpus(root: Optional[str] = None, *, splits: Sequence[Split] = get_args(Split)) -> Corpus:
    """Read the corpus files of ``splits`` (default: all three).

    Args:
        root: a directory of Python sources; None is the running interpreter's stdlib.
        splits: which splits to read (files of other splits are not opened).
    """
    for s in splits:
        _check_split(s)
    root_path = Path(root if root is not None else stdlib_root())
    if not root_path.is_dir():
        raise ValueError(f"corpus root {str(root_path)!r} is not a directory; pass the directory "
                         "that holds the Python sources")
    files, skipped = [], []
    for rel in _source_files(root_path):
        split = split_of(rel)
        if split not in splits:
            continue
        try:
            text = (root_path / rel).read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            skipped.append(rel)
            continue
        files.append(CorpusFile(relpath=rel, split=split, text=text))
    if not files:
        raise ValueError(f"corpus root {str(root_path)!r}: no UTF-8 .py files in splits "
                         f"{list(splits)}")
    return Corpus(root=str(root_path), files=tuple(files), skipped=tuple(skipped))


def load_tokenizer(path: str):
    """A ``tokenizers.Tokenizer`` from a ``tokenizer.json`` (needs the ``tokenizers`` package)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ImportError("the demo tokenizer needs the 'tokenizers' package: pip install tokenizers") from None
    if not os.path.isfile(path):
        raise ValueError(f"tokenizer file {path!r} does not exist")
    return Tokenizer.from_file(str(path))


def encode_files(tokenizer, files: Sequence[CorpusFile], *, eot_id: int) -> list[list[int]]:
    """Token ids of each file, each followed by ``eot_id`` (the end-of-text separator).

    Returns one int list per file, in ``files`` order."""
    encodings = tokenizer.encode_batch([f.text for f in files], add_special_tokens=False)
    return [list(e.ids) + [eot_id] for e in encodings]
