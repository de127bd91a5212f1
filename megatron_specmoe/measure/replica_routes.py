"""Routes and measures when experts have replicas (``schedule/replicas.py``).

Notation
    T: tokens.   k: top-k.   E: logical experts.   P: EP ranks.   s: physical slots per rank.
    mask: bool [E, P], expert e has a copy on rank q.   table: int64 [E, P], the slot a pair of
    expert e from home rank q goes to (``ReplicatedPlacement.route_table``).

With replicas a pair is local when *any* copy of its expert is on the token's home rank, so the
balanced assignment scores ranks by ``replica_hits`` (true routes) or ``replica_rank_scores``
(predicted), and the measures count the rank each pair is actually routed to
(``routed_rank_hits``), which ``measures.measure_routes`` and ``nodes.measure_nodes`` take as usual.
"""

from __future__ import annotations

import numpy as np
import torch

from megatron_specmoe.measure.measures import rank_hits

__all__ = ["replica_hits", "replica_rank_scores", "routed_ranks", "routed_rank_hits"]


def replica_hits(experts: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """int64 [T, P]: experts of token t with a copy on rank q.

    Args:
        experts: int64 [T, k] logical experts.   mask: bool [E, P].
    """
    return mask.long()[experts.long()].sum(dim=1)


def replica_rank_scores(scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """float32 [T, P]: predicted share of a token's selections with a copy on each rank.

    Args:
        scores: float32 [T, E] (a predictor's expert scores).   mask: bool [E, P].
    """
    return (np.asarray(scores, dtype=np.float32) @ np.asarray(mask, dtype=np.float32)).astype(np.float32)


def routed_ranks(experts: torch.Tensor, home_rank: torch.Tensor, table: torch.Tensor,
                 slots_per_rank: int) -> torch.Tensor:
    """int64 [T, k]: the rank each pair is routed to under the route table (the simulator's and
    the measures' one routing rule; ``ReplicatedPlacement.route_table`` decides).

    Args:
        experts: int64 [T, k] logical experts.   home_rank: int64 [T].
        table: int64 [E, P] (``route_table``).   slots_per_rank: s.
    """
    slot = table[experts.long(), home_rank.long().view(-1, 1)]  # [T, k]
    return slot // slots_per_rank


def routed_rank_hits(experts: torch.Tensor, home_rank: torch.Tensor, table: torch.Tensor, slots_per_rank: int,
                     num_ranks: int) -> torch.Tensor:
    """int64 [T, P]: pairs of token t routed to rank q under the route table.

    Args:
        experts: int64 [T, k] logical experts.   home_rank: int64 [T].
        table: int64 [E, P] (``route_table``).   slots_per_rank: s.   num_ranks: P.
    """
    return rank_hits(routed_ranks(experts, home_rank, table, slots_per_rank), num_ranks)
