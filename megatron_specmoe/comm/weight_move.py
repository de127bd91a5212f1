"""Move expert weights between EP ranks so that each physical slot holds a new logical expert.

Notation
    P: EP ranks.   n: experts per rank.   slot p = rank * n + local index.
    ``current[p]`` / ``target[p]``: logical expert in slot p before / after the move.

A move of one layer is a permutation of slots: slot p receives the weights currently in slot
``q = current^-1[target[p]]``. Transfers between ranks are point-to-point over the EP group handed
in (``batch_isend_irecv``); transfers within a rank are copies.

Atomic per layer: every incoming expert is received into a fresh buffer, and the layer's
parameters are overwritten only after all of its transfers have completed, so a failure part-way
leaves the layer as it was. Peak extra memory per rank: the experts that change slot on this
rank, at most n experts (one layer's experts) at a time.

Replicas (``schedule/replicas.py``): with redundant experts a logical expert may sit in several
slots, and slots may start empty. ``plan_copies`` generalises ``plan_moves``: every target slot
takes its expert from a slot holding it now, on its own rank when there is one (a local copy),
else the lowest such slot; ``current`` may repeat experts and mark unknown slots -1. A permutation
gives exactly ``plan_moves``'s moves. ``move_layer_experts`` runs either with the same atomic,
verified protocol.

Verification: each expert's fingerprint (the float64 sum of each of its tensors, and of the tensor
weighted by position) is taken at its source before the move and compared at its destination
after; a mismatch raises and names the layer, slot and expert.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist

__all__ = ["SlotMove", "plan_moves", "plan_copies", "move_layer_experts", "fingerprint"]


@dataclass(frozen=True, kw_only=True)
class SlotMove:
    """Weights of slot ``src_slot`` go to slot ``dst_slot`` (logical expert ``logical``)."""

    logical: int
    src_slot: int
    dst_slot: int


def plan_moves(current: Sequence[int], target: Sequence[int]) -> list[SlotMove]:
    """The slot moves that turn ``current`` into ``target`` (both length-E permutations).
    Slots whose expert stays put are left out."""
    if sorted(current) != sorted(target) or sorted(current) != list(range(len(current))):
        raise ValueError(
            "plan_moves: current and target must be permutations of the same 0..E-1 "
            f"(got {list(current)} and {list(target)})"
        )
    where = {logical: slot for slot, logical in enumerate(current)}
    return [
        SlotMove(logical=logical, src_slot=where[logical], dst_slot=slot)
        for slot, logical in enumerate(target)
        if where[logical] != slot
    ]


def plan_copies(current: Sequence[int], target: Sequence[int], *, slots_per_rank: int) -> list[SlotMove]:
    """The slot copies that turn ``current`` into ``target`` (module docstring, Replicas).

    Args:
        current: length N (slots), the logical expert in each slot now, -1 where unknown/empty;
            experts may repeat.   target: length N, the logical expert each slot must hold.
        slots_per_rank: s; slot p is on rank p // s.

    Raises:
        ValueError: lengths differ, or a target expert is in no current slot.
    """
    if len(current) != len(target) or slots_per_rank < 1 or len(current) % slots_per_rank:
        raise ValueError(f"plan_copies: current ({len(current)} slots) and target ({len(target)}) must have "
                         f"the same length, a multiple of slots_per_rank={slots_per_rank}")
    holders: dict[int, list[int]] = {}
    for slot, logical in enumerate(current):
        if logical >= 0:
            holders.setdefault(int(logical), []).append(slot)
    missing = sorted({int(x) for x in target} - set(holders))
    if missing:
        raise ValueError(f"plan_copies: target experts {missing} are in no current slot; load them first")
    moves = []
    for slot, logical in enumerate(target):
        if current[slot] == logical:
            continue
        src = holders[int(logical)]
        same = [q for q in src if q // slots_per_rank == slot // slots_per_rank]
        moves.append(SlotMove(logical=int(logical), src_slot=(same or src)[0], dst_slot=slot))
    return moves


def fingerprint(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """float64 [2 * len(tensors)]: sum and position-weighted sum of each tensor."""
    parts = []
    for t in tensors:
        flat = t.detach().reshape(-1).to(torch.float64)
        weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)
        parts.append(flat.sum())
        parts.append((flat * weights).sum() / max(flat.numel(), 1))
    return torch.stack(parts)


@torch.no_grad()
def move_layer_experts(
    local_experts: Callable[[int], Sequence[torch.Tensor]],
    *,
    current: Sequence[int],
    target: Sequence[int],
    group,
    layer_name: str = "layer",
) -> int:
    """Move one layer's experts in place. Runs on every rank of ``group`` (the EP group).

    Args:
        local_experts: ``local_experts(i)`` returns the parameter tensors of local expert i of
            this rank, in the same order on every rank.
        current, target: physical_to_logical before and after (length N slots, N divisible by P):
            permutations of 0..E-1, or with replicas (module docstring) ``current`` may repeat
            experts and hold -1 in slots whose weights do not matter.
        group: the EP process group; its rank r owns slots r*n .. r*n + n - 1.
        layer_name: for error messages.

    Returns:
        The number of expert transfers this rank took part in (sends + receives + local copies).
    """
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    num = len(current)
    if num % size:
        raise ValueError(f"{layer_name}: {num} experts do not divide over EP size {size}")
    n = num // size
    permutation = sorted(current) == sorted(target) == list(range(num))
    moves = plan_moves(current, target) if permutation else plan_copies(current, target, slots_per_rank=n)
    mine_in = [m for m in moves if m.dst_slot // n == rank]
    mine_out = [m for m in moves if m.src_slot // n == rank and m.dst_slot // n != rank]

    # Fingerprints at the source, exchanged with the destination's rank (tiny all_gather).
    prints = torch.zeros(num, 2 * len(local_experts(0)), dtype=torch.float64)
    for i in range(n):
        prints[rank * n + i] = fingerprint(local_experts(i)).cpu()
    gathered = [torch.zeros_like(prints) for _ in range(size)]
    dist.all_gather(gathered, prints, group=group)
    before = sum(gathered)  # each slot filled by exactly one rank

    # 1. Buffers for every incoming expert (local copies included), then all transfers.
    buffers = {m.dst_slot: [torch.empty_like(t) for t in local_experts(m.dst_slot % n)] for m in mine_in}
    ops = []
    for m in mine_in:
        src_rank = m.src_slot // n
        if src_rank == rank:
            for buf, t in zip(buffers[m.dst_slot], local_experts(m.src_slot % n)):
                buf.copy_(t)
        else:
            peer = dist.get_global_rank(group, src_rank)
            ops += [dist.P2POp(dist.irecv, buf, peer, group) for buf in buffers[m.dst_slot]]
    for m in mine_out:
        peer = dist.get_global_rank(group, m.dst_slot // n)
        ops += [dist.P2POp(dist.isend, t.contiguous(), peer, group) for t in local_experts(m.src_slot % n)]
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    dist.barrier(group=group)

    # 2. Verify every received expert against its source fingerprint, and agree across the group
    #    before touching the layer, so that no rank commits while another one failed.
    problems = []
    for m in mine_in:
        got = fingerprint(buffers[m.dst_slot]).cpu()
        want = before[m.src_slot]
        if not torch.allclose(got, want, rtol=1e-9, atol=1e-9):
            problems.append(
                f"expert {m.logical} arrived in slot {m.dst_slot} with fingerprint {got.tolist()} but "
                f"left slot {m.src_slot} with {want.tolist()}"
            )
    failed = torch.tensor([1 if problems else 0], dtype=torch.int64)
    dist.all_reduce(failed, op=dist.ReduceOp.SUM, group=group)
    if int(failed):
        raise RuntimeError(
            f"{layer_name}: expert move failed verification on {int(failed)} rank(s); no rank modified "
            f"the layer. This rank: {'; '.join(problems) or 'ok'}"
        )
    # 3. Commit: overwrite this rank's parameters.
    for m in mine_in:
        for t, buf in zip(local_experts(m.dst_slot % n), buffers[m.dst_slot]):
            t.copy_(buf)
    return len(mine_in) + len(mine_out)
