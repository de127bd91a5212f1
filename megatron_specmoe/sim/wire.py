"""Bytes per row on the wire, per dtype and per direction (dispatch, combine).

Notation
    H: hidden size.   k: top-k.   pair: (token, selected expert).   copy: (token, destination).

Rows (``row_bytes``)
    bf16 / fp16   2H bytes.    fp32   4H bytes.
    fp8           H bytes plus one fp32 scale per 128 elements (DeepEP's and Transformer Engine's
                  per-block scaling): H x (1 + 4/128); H = 7168 -> 7392 B. H must be a multiple
                  of 128 for fp8.
    DeepEP's low-latency kernels add 16 B of per-message metadata on dispatch (source token index
    and layout): the fp8 message for H = 7168 is 7408 B per pair; combine carries the bare row.

``WireDtypes`` is the pair of choices (``--dispatch-dtype``, ``--combine-dtype``). Every dispatcher
model takes its rows from here, so one flag changes every model alike. Megatron's ``alltoall``
dispatcher sends BF16 at run time; with ``fp8`` the model reports what an FP8-quantised
all-to-all would carry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

__all__ = ["WireDtype", "DTYPE_ELEMENT_BYTES", "FP8_BLOCK", "LL_MESSAGE_HEADER_BYTES", "row_bytes",
           "check_dtype", "WireDtypes"]

WireDtype = Literal["bf16", "fp16", "fp32", "fp8"]

DTYPE_ELEMENT_BYTES: dict[str, int] = {"bf16": 2, "fp16": 2, "fp32": 4, "fp8": 1}
FP8_BLOCK = 128  # elements per fp32 scale
LL_MESSAGE_HEADER_BYTES = 16


def check_dtype(dtype: str, *, flag: str = "dtype") -> None:
    """ValueError naming ``flag`` unless ``dtype`` is a ``WireDtype``."""
    if dtype not in get_args(WireDtype) or dtype not in DTYPE_ELEMENT_BYTES:
        raise ValueError(f"{flag} must be one of {', '.join(get_args(WireDtype))}, got {dtype!r}")


def row_bytes(dtype: str, hidden_size: int) -> int:
    """Bytes of one hidden row of ``hidden_size`` elements in ``dtype`` (module docstring)."""
    check_dtype(dtype)
    if not isinstance(hidden_size, int) or hidden_size < 1:
        raise ValueError(f"hidden size must be a positive int, got {hidden_size!r}")
    if dtype == "fp8":
        if hidden_size % FP8_BLOCK:
            raise ValueError(
                f"fp8 rows need the hidden size to be a multiple of {FP8_BLOCK} (one scale per "
                f"{FP8_BLOCK} elements), got {hidden_size}; use bf16 or another hidden size"
            )
        return hidden_size + hidden_size // FP8_BLOCK * 4
    return hidden_size * DTYPE_ELEMENT_BYTES[dtype]


@dataclass(frozen=True, kw_only=True)
class WireDtypes:
    """Row formats of one MoE layer's two phases.

    Attributes:
        hidden_size: H.
        dispatch: dtype of the dispatched hidden rows.
        combine: dtype of the combined expert-output rows.
        prob_bytes: bytes per routing probability sent with a pair (4: Megatron keeps fp32 probs).
    """

    hidden_size: int
    dispatch: str = "bf16"
    combine: str = "bf16"
    prob_bytes: int = 4

    def __post_init__(self) -> None:
        check_dtype(self.dispatch, flag="--dispatch-dtype")
        check_dtype(self.combine, flag="--combine-dtype")
        row_bytes(self.dispatch, self.hidden_size)
        row_bytes(self.combine, self.hidden_size)
        if not isinstance(self.prob_bytes, int) or self.prob_bytes < 0:
            raise ValueError(f"WireDtypes.prob_bytes must be an int >= 0, got {self.prob_bytes!r}")

    @property
    def dispatch_row(self) -> int:
        return row_bytes(self.dispatch, self.hidden_size)

    @property
    def combine_row(self) -> int:
        return row_bytes(self.combine, self.hidden_size)

    @property
    def ll_dispatch_message(self) -> int:
        """DeepEP low-latency dispatch message per pair (row + 16 B header)."""
        return self.dispatch_row + LL_MESSAGE_HEADER_BYTES
