"""Extra values riding along with the rows of a collective, bit for bit.

Notation
    N: rows (one per (token, expert) pair in the dispatcher's all-to-all).   H: hidden size.
    x: extra values per row (1 for Megatron's permuted probs [N]).
    w: columns the extra values take in the rows' dtype: x * (value bytes) / (row element bytes).

Why. Megatron's alltoall dispatcher sends the permuted tokens and their routing probabilities
in two all-to-alls with the same splits. Every collective is a fixed cost (an NCCL launch and
its latency on a GPU; a rendezvous of the ranks on gloo) whatever it carries, and the probs are
x * 4 bytes against H * 2 bytes of a bf16 row. ``append_value_columns`` stores the values' bits
in w extra columns of the rows' dtype (float32 probs: two bf16 / fp16 columns, one float32 column),
so that one all-to-all carries both; ``split_value_columns`` takes them apart on the other side.
Collectives and row copies move bits, never arithmetic, so every value arrives exact (NaN payloads
and negative zeros included).

Cost: one copy of the N x H rows into the packed [N, H + w] buffer, and w columns more on the
wire. ``value_columns`` says when the packing exists (None: the value bytes are not a whole
number of row elements, e.g. bf16 probs with float32 rows; then nothing is packed).

Forward only; pure tensor code (no process group), used by the megatron dispatcher.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["value_columns", "append_value_columns", "split_value_columns"]


def value_columns(rows_dtype: torch.dtype, values_dtype: torch.dtype, per_row: int) -> Optional[int]:
    """w: the columns of ``rows_dtype`` that ``per_row`` values of ``values_dtype`` fill exactly,
    or None where they do not (then the values cannot ride along)."""
    row_bytes = rows_dtype.itemsize  # host arithmetic: no tensor is made
    total = values_dtype.itemsize * per_row
    if per_row < 1 or total % row_bytes:
        return None
    return total // row_bytes


def append_value_columns(rows: torch.Tensor, values: torch.Tensor,
                         out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[N, H + w] in ``rows.dtype``: ``rows`` [N, H] with ``values`` ([N] or [N, ...], any dtype
    whose bits fill whole columns, see ``value_columns``) stored bit for bit in w columns; written
    into ``out`` (contiguous [N, H + w], e.g. a reused ``comm.workspace`` buffer) when given.

    Raises:
        ValueError: the row counts differ, or the values do not fill whole columns.
    """
    if rows.dim() != 2 or values.dim() < 1 or values.shape[0] != rows.shape[0]:
        raise ValueError(
            f"append_value_columns: rows must be [N, H] and values [N, ...] with the same N, got "
            f"{tuple(rows.shape)} and {tuple(values.shape)}"
        )
    per_row = math.prod(values.shape[1:])
    w = value_columns(rows.dtype, values.dtype, per_row)
    if w is None:
        raise ValueError(
            f"append_value_columns: {per_row} {values.dtype} value(s) per row do not fill whole "
            f"{rows.dtype} columns; send them apart"
        )
    # A dtype view of contiguous values rescales their last dimension; the row-major bits of each
    # row's values are then its w columns (two view ops, no copy, whatever the value shape).
    bits = values.contiguous().view(rows.dtype).view(rows.shape[0], w)
    return torch.cat([rows, bits], dim=1, out=out)


def split_value_columns(packed: torch.Tensor, width: int, dtype: torch.dtype,
                        value_shape: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of ``append_value_columns``: (rows [N, H] in ``packed.dtype``, a view of the first
    H columns; values [N, *value_shape] in ``dtype``, contiguous).

    Args:
        packed: [N, H + width], rows then the value columns.
        width: w, the value columns (``value_columns`` on the sending side).
        dtype: the values' dtype.
        value_shape: the values' shape per row ((): one value per row, as Megatron's probs [N]).
    """
    h = packed.shape[1] - width
    if width == 1 and value_shape == () and dtype.itemsize == packed.dtype.itemsize:  # fewer ops
        values = packed[:, h].contiguous().view(dtype)
    else:
        values = packed[:, h:].contiguous().view(dtype).reshape(packed.shape[0], *value_shape)
    return packed[:, :h], values
