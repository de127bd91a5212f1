"""Checks every trace reader applies to what it reads (``trace_io.py``): located errors, no guesses.

Notation
    T: tokens.   L: MoE layers.   k: top-k.   E: routed experts per layer.

Rules (each violation raises ``SpecMoEDataError`` naming the file and where, or
``SpecMoEUsageError`` for a bad ``num_experts`` argument):
    - E is never guessed from the largest id: a format that does not record it (layer-major JSON,
      Megatron JSONL) needs ``num_experts`` (``--num-experts``); E is an int in 1..MAX_EXPERTS,
      checked before anything of size E is allocated;
    - an expert id is a JSON integer (not a float, bool or string) or, in a ``.npz``, an entry of
      an integer array, in 0..E-1 (so it cannot wrap in int32);
    - the k experts of one token at one layer are distinct;
    - record fields that are counts or indices (step, layer, rank, num_tokens, topk) are integers.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Optional, Union

import numpy as np

from megatron_specmoe.artifacts.errors import SpecMoEDataError, SpecMoEUsageError

__all__ = ["MAX_EXPERTS", "check_num_experts", "need_num_experts", "json_error", "int_matrix",
           "check_routes", "int_field"]

PathLike = Union[str, "os.PathLike[str]"]

# The most routed experts per layer any reader accepts (ids must fit uint16; today's largest
# MoE models have 256). Checked before allocating anything of size E.
MAX_EXPERTS = 1 << 16
_NUM_EXPERTS_FIX = "pass --num-experts E, the model's routed experts per MoE layer"


def _show(value: object) -> str:
    """``repr(value)``, cut to 40 characters (a message names the value, it does not dump it)."""
    r = repr(value)
    return r if len(r) <= 40 else r[:37] + "..."


def check_num_experts(num_experts: object, *, flag: str = "--num-experts") -> Optional[int]:
    """``num_experts`` as an int (None stays None); refuse bools, floats, < 1 and > MAX_EXPERTS."""
    if num_experts is None:
        return None
    if isinstance(num_experts, bool) or not isinstance(num_experts, (int, np.integer)):
        raise SpecMoEUsageError(f"{flag} {num_experts!r}: not an integer",
                                f"{flag} takes a whole number of experts, e.g. {flag} 8")
    if not 1 <= int(num_experts) <= MAX_EXPERTS:
        raise SpecMoEUsageError(f"{flag} {num_experts}: out of range 1..{MAX_EXPERTS}",
                                f"{flag} is the model's routed experts per MoE layer, e.g. 8 or 64")
    return int(num_experts)


def need_num_experts(num_experts: Optional[int], path: PathLike, fmt: str) -> int:
    """E for a format that does not record it: ``num_experts`` or a refusal."""
    e = check_num_experts(num_experts)
    if e is None:
        raise SpecMoEUsageError(f"{path}: a {fmt} trace does not record the number of experts "
                               "(guessing it from the largest id would be wrong whenever the "
                               "top experts were never chosen)", _NUM_EXPERTS_FIX)
    return e


def json_error(path: PathLike, exc: json.JSONDecodeError, line: Optional[int] = None) -> SpecMoEDataError:
    where = f"line {line}, column {exc.colno}" if line is not None else (
        f"line {exc.lineno}, column {exc.colno} (char {exc.pos})")
    return SpecMoEDataError(f"{path}: not valid JSON at {where}: {exc.msg}",
                            "the file is truncated or corrupt; re-export it")


def int_matrix(rows: object, *, path: PathLike, what: str, topk: Optional[int],
               num_experts: int) -> np.ndarray:
    """int64 [n, k] from a JSON list of per-token expert lists: ints in 0..E-1, k per token,
    distinct within a token. ``topk`` is the expected k (None: take it from the first row)."""
    if not isinstance(rows, list):
        raise SpecMoEDataError(f"{path}: {what} should be a list of per-token expert lists, got "
                               f"{type(rows).__name__}", "re-export the trace")
    for t, row in enumerate(rows):
        if not isinstance(row, list):
            raise SpecMoEDataError(f"{path}: {what}, token {t}: expected a list of expert ids, got "
                                   f"{_show(row)}", "re-export the trace")
        if topk is None:
            topk = len(row)
        if len(row) != topk:
            raise SpecMoEDataError(
                f"{path}: {what}, token {t}: has {len(row)} experts but top-k is {topk} (from the "
                "first token / layer)", "every token must list the same number of experts; "
                "re-export the trace")
        for e in row:
            if isinstance(e, bool) or not isinstance(e, int):
                raise SpecMoEDataError(f"{path}: {what}, token {t}: expert id {_show(e)} is "
                                       "not an integer", "expert ids are whole numbers 0..E-1")
            if not 0 <= e < num_experts:
                raise SpecMoEDataError(
                    f"{path}: {what}, token {t}: expert id {e} is out of range 0..{num_experts - 1} "
                    f"(num_experts={num_experts})",
                    "pass the model's --num-experts, or drop the stray record")
        if len(set(row)) != len(row):
            raise SpecMoEDataError(f"{path}: {what}, token {t}: expert ids {row} repeat an expert",
                                   "a route lists k distinct experts; the trace is corrupt")
    if topk == 0:
        raise SpecMoEDataError(f"{path}: {what}: top-k is 0 (tokens list no experts)",
                               "re-export the trace with the routes")
    return np.asarray(rows, dtype=np.int64).reshape(len(rows), topk if topk is not None else 0)


def check_routes(experts: np.ndarray, num_experts: int, *, path: PathLike,
                 locate: Callable[[tuple], str]) -> None:
    """Raise unless every entry of int [..., k] ``experts`` is in 0..E-1 and the k entries of
    each route are distinct; ``locate(index)`` words an index tuple for the message."""
    if not np.issubdtype(experts.dtype, np.integer):
        raise SpecMoEDataError(f"{path}: expert ids are stored as {experts.dtype}, not integers "
                               "(3.7 would be read as 3)", "store expert ids as an integer array")
    if not experts.size:
        return
    bad = (experts < 0) | (experts >= num_experts)
    if bad.any():
        at = tuple(int(i) for i in np.argwhere(bad)[0])
        raise SpecMoEDataError(f"{path}: expert id {int(experts[at])} at {locate(at)} is out of "
                               f"range 0..{num_experts - 1} (num_experts={num_experts})",
                               "pass the model's --num-experts, or fix the trace")
    if experts.shape[-1] > 1:
        s = np.sort(experts, axis=-1)
        dup = (s[..., 1:] == s[..., :-1]).any(axis=-1)
        if dup.any():
            at = tuple(int(i) for i in np.argwhere(dup)[0])
            raise SpecMoEDataError(f"{path}: route {experts[at].tolist()} at {locate(at)} repeats "
                                   "an expert", "a route lists k distinct experts; the trace is corrupt")


def int_field(rec: dict, name: str, where: str) -> int:
    """``rec[name]`` if it is a JSON integer (not a bool, float or string), else refuse."""
    value = rec[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecMoEDataError(f"{where}: field {name!r} is {_show(value)}, not an integer",
                               "the record is corrupt; re-export the trace")
    return value
