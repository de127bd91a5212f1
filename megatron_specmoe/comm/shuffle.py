"""The two collectives of speculative token shuffling (s-TS), over the attention TP group.

Notation
    T: real tokens of the shuffle domain (a TP group's batch, S x B flattened in (s, b) order).
    P: TP size (ranks of the group).   C: rows per rank, ceil(T / P).   T_pad = P * C.
    H: hidden size.

Glossary
    true order       row t is token t (the order attention, rotary embeddings, masks and the KV
                     cache need).
    shuffled order   row i is token ``plan.order[i]``; rank r holds rows r*C .. (r+1)*C - 1.
    partial sum      a row-parallel linear's output before its TP reduction: every rank holds
                     [T, H] and the true value is the sum over ranks.
    fold             rows this rank adds into its partial sum before reducing (the residual rows it
                     holds, plus the projection bias): the reduction then delivers
                     attention + residual + bias with no extra communication.

The two collectives move exactly what Megatron's own do: ``shuffled_reduce_scatter`` is one
reduce-scatter of [T_pad, H] (sequence parallelism reduce-scatters [T, H] there anyway), and
``deferred_all_gather`` one all-gather of [C, H] per rank. Without sequence parallelism the pair
replaces the output projection's all-reduce of [T, H]; a ring all-reduce moves the bytes of a
reduce-scatter plus an all-gather. ``CollectiveCounter`` counts what each call moved so that tests
and benchmarks compare bytes measured, not estimated.

Route columns. The "history" predictor needs every earlier MoE layer's real routes on every TP
rank in true order. Each layer's routes ride along with the all-gather that follows it
(``append_route_columns`` before, ``split_route_columns`` after): the k expert ids of a row are
stored bit for bit in k extra columns of the hidden dtype (int32 viewed as float32 for 4-byte
dtypes, int16 for 2-byte ones; collectives and row gathers copy bits, so ids arrive exact). Cost:
k * element size bytes per token, counted by ``CollectiveCounter`` with the rest.

Forward only (inference): these calls do not build an autograd graph; ``shuffled_reduce_scatter``
refuses inputs that require grad rather than silently dropping their gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torch.distributed as dist

from megatron_specmoe.comm.workspace import Workspace, WorkspaceRole
from megatron_specmoe.schedule.assignment import ShufflePlan

__all__ = [
    "CollectiveKind",
    "CollectiveCounter",
    "shuffled_reduce_scatter",
    "deferred_all_gather",
    "gather_shards",
    "true_order_rows",
    "ring_bytes",
    "append_route_columns",
    "split_route_columns",
]

CollectiveKind = Literal["all_reduce", "reduce_scatter", "all_gather"]


def ring_bytes(kind: CollectiveKind, payload_bytes: int, group_size: int) -> int:
    """Bytes one rank sends in a ring implementation of ``kind`` over ``payload_bytes`` (the full
    tensor: the reduce-scatter input, the all-gather output, the all-reduce buffer).

    reduce-scatter and all-gather send (P-1)/P of the payload, an all-reduce twice that.
    """
    if group_size <= 1:
        return 0
    share = payload_bytes * (group_size - 1) // group_size
    return 2 * share if kind == "all_reduce" else share


@dataclass(kw_only=True)
class CollectiveCounter:
    """Counts collectives on one rank (mutable; one per measurement).

    Attributes:
        calls: number of calls per kind.
        payload_bytes: full-tensor bytes per kind (see ``ring_bytes``).
        sent_bytes: bytes this rank sends in a ring implementation, per kind.
    """

    calls: dict[str, int] = field(default_factory=dict)
    payload_bytes: dict[str, int] = field(default_factory=dict)
    sent_bytes: dict[str, int] = field(default_factory=dict)

    def add(self, kind: CollectiveKind, payload_bytes: int, group_size: int) -> None:
        self.calls[kind] = self.calls.get(kind, 0) + 1
        self.payload_bytes[kind] = self.payload_bytes.get(kind, 0) + int(payload_bytes)
        self.sent_bytes[kind] = self.sent_bytes.get(kind, 0) + ring_bytes(kind, payload_bytes, group_size)

    @property
    def total_sent(self) -> int:
        return sum(self.sent_bytes.values())

    def clear(self) -> None:
        self.calls.clear()
        self.payload_bytes.clear()
        self.sent_bytes.clear()


def _check_plan(plan: ShufflePlan, group) -> int:
    # The group's own size and rank (C++ reads) rather than dist's Python-side lookups: these run
    # twice per layer per forward.
    size = group.size() if group is not None else dist.get_world_size()
    if plan.num_ranks != size:
        raise ValueError(
            f"ShufflePlan.num_ranks={plan.num_ranks} but the TP group has {size} ranks; plan over "
            "the TP size"
        )
    return group.rank() if group is not None else dist.get_rank()


def _buffer(workspace: Optional[Workspace], role: WorkspaceRole, shape: tuple[int, ...],
            rows: torch.Tensor) -> Optional[torch.Tensor]:
    """The ``out=`` tensor for the successor of ``rows`` (same dtype and device): a view of the
    workspace's ``role`` buffer, or None (a fresh tensor) without a workspace or where autograd
    would need the result (``out=`` tensors take no part in autograd)."""
    if workspace is None or (rows.requires_grad and torch.is_grad_enabled()):
        return None
    return workspace.take(role, shape, rows.dtype, rows.device)


def shuffled_reduce_scatter(
    partial: torch.Tensor,
    plan: ShufflePlan,
    group,
    *,
    fold_rows: Optional[torch.Tensor] = None,
    fold: Optional[torch.Tensor] = None,
    counter: Optional[CollectiveCounter] = None,
    workspace: Optional[Workspace] = None,
) -> torch.Tensor:
    """Sum ``partial`` over the group and give rank r the rows of its shard under ``plan``.

    Args:
        partial: float [T, H], this rank's partial sums in true order (identical row meaning on
            every rank).
        plan: the ShufflePlan (identical on every rank of ``group``; P = group size).
        group: the TP process group.
        fold_rows: int64 [F], token indices (true order, < T) whose ``fold`` rows this rank adds
            before reducing; every token must be folded by exactly one rank of the group.
        fold: float [F, H], the rows to add (residual + bias).
        counter: optional CollectiveCounter.
        workspace: optional ``Workspace``: the rows in shuffled order go to its "shuffled"
            buffer instead of a fresh tensor (the result is fresh either way).

    Returns:
        float [C, H]: this rank's shard, row j = token ``plan.order[r*C + j]`` (pad rows, if any,
        are zero plus nothing: pads are never folded).
    """
    if partial.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "shuffled_reduce_scatter is forward-only (inference); run the model under "
            "torch.no_grad() or torch.inference_mode()"
        )
    t, h = partial.shape
    if t != plan.num_tokens:
        raise ValueError(f"shuffled_reduce_scatter: partial has {t} rows, plan has {plan.num_tokens} tokens")
    _check_plan(plan, group)
    c = plan.capacity
    # Step 1: rows in shuffled order, pad rows zero: buffer[i] = padded[order[i]] (shapes come
    # from the plan, not from data: no host synchronisation on a GPU).
    if plan.padded_tokens > t:
        partial = torch.cat([partial, partial.new_zeros(plan.padded_tokens - t, h)])
    buffer = torch.index_select(partial, 0, plan.order,
                                out=_buffer(workspace, "shuffled", (plan.padded_tokens, h), partial))
    # Step 2: fold this rank's residual (+ bias) rows at their shuffled positions.
    if fold is not None:
        buffer.index_add_(0, plan.inverse.index_select(0, fold_rows), fold.to(buffer.dtype))
    # Step 3: one reduce-scatter of [T_pad, H].
    out = partial.new_empty(c, h)
    dist.reduce_scatter_tensor(out, buffer, group=group)
    if counter is not None:
        counter.add("reduce_scatter", buffer.numel() * buffer.element_size(), plan.num_ranks)
    return out


def deferred_all_gather(
    shard: torch.Tensor,
    plan: ShufflePlan,
    group,
    *,
    counter: Optional[CollectiveCounter] = None,
    workspace: Optional[Workspace] = None,
) -> torch.Tensor:
    """All-gather the shards of ``plan`` and return every token in true order.

    Args:
        shard: float [C, H], this rank's rows in shuffled order (its pad row, if any, last).
        plan: the ShufflePlan the shards follow (identical on every rank).
        group: the TP process group.
        counter: optional CollectiveCounter.
        workspace: optional ``Workspace``: the gathered shards and the result live in its
            "gathered" and "true_order" buffers (valid until their next use: for a tensor that
            dies inside the caller's layer, never for one it hands on).

    Returns:
        float [T, H], row t = token t (pad rows dropped).
    """
    return true_order_rows(gather_shards(shard, plan, group, counter=counter, workspace=workspace), plan,
                           workspace=workspace)


def true_order_rows(gathered: torch.Tensor, plan: ShufflePlan, *,
                    workspace: Optional[Workspace] = None) -> torch.Tensor:
    """float [T, H]: ``gathered`` [T_pad, H] (shuffled order, as ``gather_shards`` returns, or a
    column slice of it) put back in true order, pad rows dropped; in the workspace's "true_order"
    buffer when one is given (``deferred_all_gather``)."""
    rows = plan.inverse if plan.padded_tokens == plan.num_tokens else plan.inverse[: plan.num_tokens]
    return torch.index_select(gathered, 0, rows,
                              out=_buffer(workspace, "true_order", (plan.num_tokens, gathered.shape[1]), gathered))


def gather_shards(
    shard: torch.Tensor,
    plan: ShufflePlan,
    group,
    *,
    counter: Optional[CollectiveCounter] = None,
    workspace: Optional[Workspace] = None,
) -> torch.Tensor:
    """The all-gather of ``deferred_all_gather`` without its reordering: float [T_pad, H], rank
    r's C rows at rows r*C .. (r+1)*C - 1 (shuffled order, pad rows kept). For callers that read
    per-rank columns riding along (``megatron/shared_plans.py``) before they reorder.

    Args:
        shard: float [C, H], this rank's rows in shuffled order.
        plan: the ShufflePlan the shards follow (identical on every rank).
        group: the TP process group.
        counter: optional CollectiveCounter.
        workspace: optional ``Workspace``: the result lives in its "gathered" buffer.
    """
    _check_plan(plan, group)
    c, h = shard.shape
    if c != plan.capacity:
        raise ValueError(f"deferred_all_gather: shard has {c} rows, plan capacity is {plan.capacity}")
    gathered = _buffer(workspace, "gathered", (plan.padded_tokens, h), shard)
    if gathered is None:
        gathered = shard.new_empty(plan.padded_tokens, h)
    dist.all_gather_into_tensor(gathered, shard.contiguous(), group=group)
    if counter is not None:
        counter.add("all_gather", gathered.numel() * gathered.element_size(), plan.num_ranks)
    return gathered


_ID_DTYPES = {4: torch.int32, 2: torch.int16}


def append_route_columns(rows: torch.Tensor, routes: torch.Tensor) -> torch.Tensor:
    """[N, H + k]: ``rows`` float [N, H] with ``routes`` int [N, k] (expert ids) appended bit for
    bit as k columns of ``rows.dtype`` (see "Route columns"). Ids must fit the integer twin of the
    dtype (E <= 32768 for 2-byte dtypes; the shuffle layer checks E once, not per call)."""
    id_dtype = _ID_DTYPES.get(rows.element_size()) if rows.is_floating_point() else None
    if id_dtype is None:
        raise ValueError(f"append_route_columns: hidden dtype {rows.dtype} has no integer twin; use fp32/bf16/fp16")
    if routes.dim() != 2 or routes.shape[0] != rows.shape[0]:
        raise ValueError(
            f"append_route_columns: routes must be [N={rows.shape[0]}, k], got {tuple(routes.shape)}"
        )
    return torch.cat([rows, routes.to(id_dtype).view(rows.dtype)], dim=1)


def split_route_columns(packed: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of ``append_route_columns``: (rows float [N, H], routes int64 [N, k])."""
    id_dtype = _ID_DTYPES[packed.element_size()]
    h = packed.shape[1] - topk
    return packed[:, :h], packed[:, h:].contiguous().view(id_dtype).long()
