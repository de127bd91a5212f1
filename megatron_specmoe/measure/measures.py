"""The measures of docs/method.md ("Measures"), computed from routes and home ranks.

Notation
    T: tokens in the batch (one shuffle domain).    k: top-k.
    E: experts.                                      P: EP ranks.

Definitions (exactly docs/method.md's)
    home rank                the EP rank that holds a token when the MoE layer starts.
    local activation rate    share of (token, selected expert) pairs whose expert lives on the
                             token's home rank.
    remote pairs per token   pairs sent off the home rank, per token (what `alltoall` sends).
    remote ranks per token   distinct other ranks a token must reach (what a de-duplicating
                             dispatcher such as DeepEP sends).
    load imbalance           max over ranks / mean over ranks of pairs computed per rank.

Everything here is pure torch on whatever device the inputs live on; nothing synchronises until a
``RouteMeasures`` is built (one host copy of a few integers). The dispatcher's accounting, the
trace evaluator and the cluster simulator all call these functions, so their numbers agree by
construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "RouteMeasures",
    "WireFormat",
    "rank_hits",
    "measure_routes",
    "traffic_matrix",
]


@dataclass(frozen=True, kw_only=True)
class RouteMeasures:
    """Counts from which every measure derives; add two to merge batches or ranks.

    Attributes:
        tokens: T, tokens measured.
        pairs: (token, expert) pairs, T*k without drops.
        local_pairs: pairs whose expert is on the token's home rank.
        remote_ranks: sum over tokens of the distinct non-home ranks the token reaches.
        load_per_rank: pairs computed by each EP rank (length P).
    """

    tokens: int
    pairs: int
    local_pairs: int
    remote_ranks: int
    load_per_rank: tuple[int, ...]

    @property
    def remote_pairs(self) -> int:
        return self.pairs - self.local_pairs

    @property
    def local_activation_rate(self) -> float:
        return self.local_pairs / self.pairs if self.pairs else 0.0

    @property
    def remote_pairs_per_token(self) -> float:
        return self.remote_pairs / self.tokens if self.tokens else 0.0

    @property
    def remote_ranks_per_token(self) -> float:
        return self.remote_ranks / self.tokens if self.tokens else 0.0

    @property
    def load_imbalance(self) -> float:
        loads = self.load_per_rank
        total = sum(loads)
        return max(loads) * len(loads) / total if total else 1.0

    def __add__(self, other: "RouteMeasures") -> "RouteMeasures":
        if len(self.load_per_rank) != len(other.load_per_rank):
            raise ValueError(
                "RouteMeasures: cannot add measures over different EP sizes "
                f"({len(self.load_per_rank)} vs {len(other.load_per_rank)})"
            )
        return RouteMeasures(
            tokens=self.tokens + other.tokens,
            pairs=self.pairs + other.pairs,
            local_pairs=self.local_pairs + other.local_pairs,
            remote_ranks=self.remote_ranks + other.remote_ranks,
            load_per_rank=tuple(a + b for a, b in zip(self.load_per_rank, other.load_per_rank)),
        )

    @classmethod
    def empty(cls, num_ranks: int) -> "RouteMeasures":
        return cls(tokens=0, pairs=0, local_pairs=0, remote_ranks=0, load_per_rank=(0,) * num_ranks)

    def summary(self) -> dict:
        """The named measures as plain floats (JSON-ready)."""
        return {
            "tokens": self.tokens,
            "pairs": self.pairs,
            "remote_pairs": self.remote_pairs,
            "local_activation_rate": self.local_activation_rate,
            "remote_pairs_per_token": self.remote_pairs_per_token,
            "remote_ranks_per_token": self.remote_ranks_per_token,
            "load_imbalance": self.load_imbalance,
        }


@dataclass(frozen=True, kw_only=True)
class WireFormat:
    """Bytes that Megatron's ``alltoall`` dispatcher moves per (token, expert) pair.

    Dispatch sends the token's hidden row and its router probability (one element of the probs
    dtype); combine sends the expert output row back.

    Attributes:
        hidden_size: H.
        activation_bytes: bytes per hidden element (2 for bf16/fp16, 4 for fp32).
        prob_bytes: bytes per routing probability (4: Megatron keeps probs in fp32).
    """

    hidden_size: int
    activation_bytes: int
    prob_bytes: int = 4

    @property
    def dispatch_bytes_per_pair(self) -> int:
        return self.hidden_size * self.activation_bytes + self.prob_bytes

    @property
    def combine_bytes_per_pair(self) -> int:
        return self.hidden_size * self.activation_bytes


def rank_hits(expert_rank: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """Count each token's selected experts per EP rank.

    Args:
        expert_rank: int64 [T, k], the EP rank hosting each selected expert; -1 marks a dropped or
            padded selection and is not counted.
        num_ranks: P.

    Returns:
        int64 [T, P]: ``out[t, r]`` = number of token t's selected experts hosted on rank r.
    """
    if expert_rank.dim() != 2:
        raise ValueError(f"rank_hits: expert_rank must be [T, k], got shape {tuple(expert_rank.shape)}")
    tokens = expert_rank.shape[0]
    out = torch.zeros(tokens, num_ranks + 1, dtype=torch.int64, device=expert_rank.device)
    idx = torch.where(expert_rank < 0, num_ranks, expert_rank).long()
    out.scatter_add_(1, idx, torch.ones_like(idx))
    return out[:, :num_ranks]


def measure_routes(hits: torch.Tensor, home_rank: torch.Tensor) -> RouteMeasures:
    """Measures of one batch.

    Args:
        hits: int [T, P], selected experts of token t hosted on rank r (``rank_hits``), or a bool
            [T, P] "token t reaches rank r" when only reach is known (k = 1 per rank).
        home_rank: int64 [T], the EP rank holding each token when the MoE layer starts.

    Returns:
        RouteMeasures for the batch.
    """
    hits = hits.long()
    tokens, num_ranks = hits.shape
    if home_rank.shape != (tokens,):
        raise ValueError(
            f"measure_routes: home_rank must be [T]={tokens}, got shape {tuple(home_rank.shape)}"
        )
    home = home_rank.long().view(-1, 1)
    local = hits.gather(1, home).sum()
    reached = (hits > 0).sum(dim=1) - (hits.gather(1, home).view(-1) > 0).long()
    stats = torch.stack([hits.sum(), local, reached.sum()]).cpu().tolist()
    load = hits.sum(dim=0).cpu().tolist()
    return RouteMeasures(
        tokens=int(tokens),
        pairs=int(stats[0]),
        local_pairs=int(stats[1]),
        remote_ranks=int(stats[2]),
        load_per_rank=tuple(int(x) for x in load),
    )


def traffic_matrix(hits: torch.Tensor, home_rank: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """Pairs sent from each home rank to each expert rank.

    Args:
        hits: int [T, P] from ``rank_hits``.
        home_rank: int64 [T].
        num_ranks: P.

    Returns:
        int64 [P, P]: ``out[src, dst]`` = pairs whose token's home is ``src`` and whose expert is
        on ``dst``. The diagonal stays on its rank; the rest crosses the wire.
    """
    out = torch.zeros(num_ranks, num_ranks, dtype=torch.int64, device=hits.device)
    out.index_add_(0, home_rank.long(), hits.long())
    return out
