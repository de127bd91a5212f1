"""Node measures: what a token's routes cost across nodes, for two inter-node transports.

Notation
    T: tokens.   k: top-k.   P: EP ranks.   G: GPUs (EP ranks) per node.   N = P / G: nodes.
    EP rank r lives on node r // G (ranks of one node are consecutive, as Megatron orders them).
    H: hidden size.   a: bytes per activation element.   p: bytes per routing probability.

Definitions
    home node               the node of the token's home rank.
    remote node pairs       (token, expert) pairs whose expert's rank is on another node.
    remote nodes per token  distinct other nodes a token must reach.
    max nodes per token     the most nodes hosting any one token's experts (home node or not): the
                            bound group-limited routing sets (``moe_router_group_topk`` groups, one
                            node each in DeepSeek-V3; ``schedule/router_groups.py``).

Inter-node bytes of one MoE layer (dispatch + combine), for two transports (``Transport``):
    "per_pair"   every remote-node pair carries its own row, as Megatron's alltoall (and NCCL's
                 all-to-all under it) does: dispatch H*a + p per pair, combine H*a per pair.
                     bytes = remote_node_pairs * (2*H*a + p)
    "per_node"   a per-node de-duplicating transport (DeepEP's internode kernels): a token's row
                 crosses to each remote node once and is fanned out inside it over NVLink; the probs
                 of the pairs it serves travel with it; combine reduces inside the remote node and
                 returns one row per (token, remote node).
                     bytes = remote_nodes * 2*H*a + remote_node_pairs * p
Bytes inside a node (NVLink) are not counted here; ``measures.py`` counts rank-level traffic.

Everything is pure torch on the inputs' device; nothing synchronises until a ``NodeMeasures`` is
built (one host copy of three integers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch

from megatron_specmoe.measure.measures import WireFormat

__all__ = ["Transport", "TRANSPORTS", "NodeMeasures", "node_hits", "measure_nodes", "check_gpus_per_node"]

Transport = Literal["per_node", "per_pair"]
TRANSPORTS: tuple[str, ...] = get_args(Transport)


def check_gpus_per_node(gpus_per_node: int, num_ranks: int, *, where: str = "gpus_per_node") -> None:
    """Raise a ValueError naming ``where`` unless G >= 1 divides P."""
    if isinstance(gpus_per_node, bool) or not isinstance(gpus_per_node, int) or gpus_per_node < 1:
        raise ValueError(f"{where} must be a positive integer, got {gpus_per_node!r}")
    if num_ranks % gpus_per_node:
        raise ValueError(
            f"{where}={gpus_per_node} does not divide the EP size {num_ranks}; every node must hold "
            "the same number of EP ranks (pass the GPUs per node of the EP group)"
        )


@dataclass(frozen=True, kw_only=True)
class NodeMeasures:
    """Counts from which the node measures derive; add two to merge batches, layers or ranks.

    Attributes:
        tokens: T.   pairs: (token, expert) pairs counted.
        remote_node_pairs: pairs whose expert lives on another node than the token's home.
        remote_nodes: sum over tokens of the distinct other nodes the token reaches.
        gpus_per_node: G.   num_nodes: N.
        max_nodes: the most nodes hosting any one token's experts (0 when empty).
    """

    tokens: int
    pairs: int
    remote_node_pairs: int
    remote_nodes: int
    gpus_per_node: int
    num_nodes: int
    max_nodes: int = 0

    @property
    def remote_nodes_per_token(self) -> float:
        return self.remote_nodes / self.tokens if self.tokens else 0.0

    @property
    def remote_node_pairs_per_token(self) -> float:
        return self.remote_node_pairs / self.tokens if self.tokens else 0.0

    def internode_bytes(self, wire: WireFormat, transport: Transport) -> int:
        """Dispatch plus combine bytes that cross nodes (module docstring)."""
        row = wire.hidden_size * wire.activation_bytes
        return self.internode_bytes_rows(dispatch_row=row, combine_row=row, prob_bytes=wire.prob_bytes,
                                         transport=transport)

    def internode_bytes_rows(self, *, dispatch_row: int, combine_row: int, prob_bytes: int,
                             transport: Transport) -> int:
        """``internode_bytes`` with the two phases' row sizes given apart (e.g. an fp8 dispatch row
        with its scales and a bf16 combine row): per_pair = pairs * (dispatch_row + prob + combine_row),
        per_node = remote_nodes * (dispatch_row + combine_row) + pairs * prob."""
        if transport == "per_pair":
            return self.remote_node_pairs * (dispatch_row + prob_bytes + combine_row)
        if transport == "per_node":
            return self.remote_nodes * (dispatch_row + combine_row) + self.remote_node_pairs * prob_bytes
        raise ValueError(f"NodeMeasures.internode_bytes: transport={transport!r}; choose one of {list(TRANSPORTS)}")

    def internode_bytes_per_token(self, wire: WireFormat) -> dict[str, float]:
        """{transport: bytes per token} for every ``Transport``."""
        return {t: (self.internode_bytes(wire, t) / self.tokens if self.tokens else 0.0) for t in TRANSPORTS}

    def __add__(self, other: "NodeMeasures") -> "NodeMeasures":
        if (self.gpus_per_node, self.num_nodes) != (other.gpus_per_node, other.num_nodes):
            raise ValueError(
                "NodeMeasures: cannot add measures over different node layouts "
                f"({self.num_nodes}x{self.gpus_per_node} vs {other.num_nodes}x{other.gpus_per_node})"
            )
        return NodeMeasures(
            tokens=self.tokens + other.tokens,
            pairs=self.pairs + other.pairs,
            remote_node_pairs=self.remote_node_pairs + other.remote_node_pairs,
            remote_nodes=self.remote_nodes + other.remote_nodes,
            gpus_per_node=self.gpus_per_node,
            num_nodes=self.num_nodes,
            max_nodes=max(self.max_nodes, other.max_nodes),
        )

    @classmethod
    def empty(cls, *, gpus_per_node: int, num_nodes: int) -> "NodeMeasures":
        return cls(tokens=0, pairs=0, remote_node_pairs=0, remote_nodes=0,
                   gpus_per_node=gpus_per_node, num_nodes=num_nodes)

    def summary(self, wire: WireFormat | None = None) -> dict:
        """JSON-ready: the per-token measures, and the bytes when ``wire`` is given (else None)."""
        return {
            "gpus_per_node": self.gpus_per_node,
            "nodes": self.num_nodes,
            "remote_nodes_per_token": self.remote_nodes_per_token,
            "remote_node_pairs_per_token": self.remote_node_pairs_per_token,
            "max_nodes_per_token": self.max_nodes,
            "internode_bytes_per_token": None if wire is None else self.internode_bytes_per_token(wire),
        }


def node_hits(hits: torch.Tensor, gpus_per_node: int) -> torch.Tensor:
    """Sum rank hits per node.

    Args:
        hits: int [T, P] (``measures.rank_hits``): selected experts of token t on rank r.
        gpus_per_node: G; must divide P.

    Returns:
        int64 [T, N]: selected experts of token t on node n.
    """
    tokens, num_ranks = hits.shape
    check_gpus_per_node(gpus_per_node, num_ranks, where="node_hits: gpus_per_node")
    return hits.long().view(tokens, num_ranks // gpus_per_node, gpus_per_node).sum(dim=2)


def measure_nodes(hits: torch.Tensor, home_rank: torch.Tensor, gpus_per_node: int) -> NodeMeasures:
    """Node measures of one batch.

    Args:
        hits: int [T, P] from ``measures.rank_hits`` (the experts' ranks after any replica choice).
        home_rank: int64 [T], each token's home EP rank.
        gpus_per_node: G; must divide P.
    """
    tokens, num_ranks = hits.shape
    if home_rank.shape != (tokens,):
        raise ValueError(f"measure_nodes: home_rank must be [T]={tokens}, got shape {tuple(home_rank.shape)}")
    per_node = node_hits(hits, gpus_per_node)
    home = (home_rank.long() // gpus_per_node).view(-1, 1)
    at_home = per_node.gather(1, home).view(-1)
    total = per_node.sum(dim=1)
    spanned = (per_node > 0).sum(dim=1)  # nodes hosting the token's experts
    reached = spanned - (at_home > 0).long()
    top = spanned.max() if tokens else spanned.new_zeros(())
    stats = torch.stack([total.sum(), (total - at_home).sum(), reached.sum(), top]).cpu().tolist()
    return NodeMeasures(
        tokens=int(tokens),
        pairs=int(stats[0]),
        remote_node_pairs=int(stats[1]),
        remote_nodes=int(stats[2]),
        gpus_per_node=int(gpus_per_node),
        num_nodes=num_ranks // gpus_per_node,
        max_nodes=int(stats[3]),
    )
