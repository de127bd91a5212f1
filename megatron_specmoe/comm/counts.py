"""The dispatcher's count exchange: how many rows each rank will receive, by all-to-all.

Notation (as Megatron's token_dispatcher.py)
    E: experts (physical slots).   n = E / EP: experts per EP rank.
    EP, TP: the expert-parallel size and the expert tensor-parallel size; the tp_ep group has
    EP * TP ranks, group rank g = e * TP + t (Megatron's order: its gathered counts are reshaped
    to [EP, TP, E]).

Before its dispatch all-to-all, Megatron's alltoall dispatcher all-gathers every rank's [E]
token counts over the tp_ep group, so that each rank learns how many rows every other rank will
send it. Each rank then keeps only the n columns of its own experts: of the EP * TP * E counts
it receives, EP * TP * n are read. ``exchange_expert_counts`` sends each rank only those: an
all-to-all of n counts per peer. Same result, bit for bit; EP times fewer bytes; and one round
of point-to-point messages where a ring all-gather (gloo) takes EP * TP - 1 rounds. On a GPU both
are latency-bound messages of a few hundred bytes; the all-to-all has equal splits (static
shapes, no host read) and is capturable.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["exchange_expert_counts"]


def exchange_expert_counts(counts: torch.Tensor, *, ep_size: int, tp_size: int, group) -> torch.Tensor:
    """Every rank's counts for this rank's experts.

    Args:
        counts: int64 [E], this rank's rows per expert (physical order; EP rank e hosts experts
            e*n .. e*n + n - 1).
        ep_size, tp_size: EP and expert-TP sizes; ``group`` (the tp_ep group) has ep_size *
            tp_size ranks in Megatron's order (module docstring).
        group: the tp_ep process group.

    Returns:
        int64 [TP, EP, n]: entry [t, e, i] = the rows group rank e * TP + t sends local expert i
        (Megatron's ``num_global_tokens_per_local_expert`` before its final view), contiguous.
    """
    if counts.dim() != 1 or counts.numel() % ep_size:
        raise ValueError(f"exchange_expert_counts: counts must be int64 [E] with E divisible by EP={ep_size}, "
                         f"got shape {tuple(counts.shape)}")
    size = group.size() if group is not None else dist.get_world_size()
    if size != ep_size * tp_size:
        raise ValueError(f"exchange_expert_counts: the group has {size} ranks, EP * TP = {ep_size * tp_size}; "
                         "pass the dispatcher's tp_ep group")
    n = counts.numel() // ep_size
    received = torch.empty(ep_size * tp_size * n, dtype=counts.dtype, device=counts.device)
    if tp_size == 1:  # [E] is already [EP, n] in peer order: rank e gets entries e*n .. e*n + n - 1
        dist.all_to_all_single(received, counts.contiguous(), group=group)
        return received.view(1, ep_size, n)
    # [EP * TP, n]: group rank e * TP + t gets the counts of EP rank e's experts.
    send = counts.view(ep_size, n).repeat_interleave(tp_size, dim=0)
    dist.all_to_all_single(received, send.view(-1), group=group)
    return received.view(ep_size, tp_size, n).transpose(0, 1).contiguous()
