"""Routes -> counts and bytes: THE byte function of the simulator, and the shapes it works on.

Notation
    T: tokens of the trace.   L: MoE layers.   k: top-k.   E: routed experts.
    P: EP ranks (the EP group simulated).   G: GPUs per node.   N: nodes = ceil(P / G).
    S: steps; a step is ``tokens_per_step`` consecutive tokens of the trace, all EP ranks working
       on them at once.   H: hidden size.   src: a token's home rank.   dst: an expert's rank.

Glossary
    home rank      the EP rank holding a token when the MoE layer starts (docs/glossary.md).
    pair           (token, selected expert).   copy: (token, distinct destination rank).
    node copy      (token, distinct destination node): what DeepEP's internode kernels send over
                   RDMA, once per node, before forwarding inside the node.

What this module computes
    ``layer_bytes``: for one batch at one layer, the byte matrices of Megatron's ``alltoall``
    dispatcher (one row per remote pair; ``specmoe`` is the same wire format with the plan's
    placement and home ranks) and of a copy-de-duplicating dispatcher (``deepep_normal`` within a
    node: one row per remote copy, one prob per pair; it replaces the former ``dedup``). The bytes
    equal the dispatchers' own accounting (``measure.accounting.TrafficReport``) on the same batch;
    ``assert_matches_report`` / ``assert_bytes_match`` check that.
    ``route_counts``: pairs, copies and node copies of every step and layer of a trace, the input
    of every dispatcher model in ``dispatchers.py`` (times: ``links.py``; latency model:
    ``cluster.py``).

Replicas (``schedule/replicas.py``). Given one ``ReplicatedPlacement`` per layer, ``route_counts``
sends each pair where the dispatcher does: to the copy on the token's home rank if there is one,
else to the copy on the least planned-load rank (the plan's route table, applied by
``measure.replica_routes.routed_ranks``; no second copy of the rule here). Every count, byte and
time downstream then follows the replica routes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, Optional, Sequence, get_args

import numpy as np
import torch

from megatron_specmoe.artifacts.traces import RoutingTrace
from megatron_specmoe.measure.measures import WireFormat, rank_hits, traffic_matrix
from megatron_specmoe.measure.nodes import NodeMeasures, measure_nodes
from megatron_specmoe.measure.replica_routes import routed_ranks
from megatron_specmoe.schedule.layout import ParallelLayout
from megatron_specmoe.schedule.placement import ExpertPlacement
from megatron_specmoe.schedule.replicas import ReplicatedPlacement
from megatron_specmoe.sim.wire import WireDtypes

__all__ = [
    "LayerWire",
    "ModelShape",
    "ParallelLayout",
    "LayerBytes",
    "RouteCounts",
    "expert_ranks",
    "layer_bytes",
    "route_counts",
    "assert_bytes_match",
    "assert_matches_report",
]

# Wire formats of ``layer_bytes``: pairs ("alltoall", "specmoe") or copies ("deepep_normal").
LayerWire = Literal["alltoall", "specmoe", "deepep_normal"]
_COPIES = {"alltoall": False, "specmoe": False, "deepep_normal": True}


def _check_wire(name: str) -> None:
    if name not in _COPIES or name not in get_args(LayerWire):
        raise ValueError(f"unknown dispatcher {name!r} for layer_bytes; choose one of "
                         f"{', '.join(get_args(LayerWire))}")


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """The MoE layers' shape as far as communication sees it.

    Attributes:
        hidden_size: H.
        top_k: k.
        num_experts: E.
        num_layers: L (MoE layers).
        dispatch_dtype, combine_dtype: ``wire.WireDtype`` names of the two phases' rows.
        prob_bytes: bytes per routing probability (4: Megatron keeps probs in fp32).
    """

    hidden_size: int
    top_k: int
    num_experts: int
    num_layers: int
    dispatch_dtype: str = "bf16"
    combine_dtype: str = "bf16"
    prob_bytes: int = 4

    def __post_init__(self) -> None:
        for name in ("hidden_size", "top_k", "num_experts", "num_layers"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"ModelShape.{name} must be a positive int, got {value!r}")
        self.wire  # validates the dtypes against the hidden size

    @property
    def wire(self) -> WireDtypes:
        return WireDtypes(hidden_size=int(self.hidden_size), dispatch=self.dispatch_dtype,
                          combine=self.combine_dtype, prob_bytes=self.prob_bytes)

    @classmethod
    def from_trace(cls, trace: RoutingTrace, *, hidden_size: int, dispatch_dtype: str = "bf16",
                   combine_dtype: str = "bf16") -> "ModelShape":
        """Experts, layers and top-k from ``trace``."""
        return cls(hidden_size=hidden_size, top_k=trace.topk, num_experts=trace.num_experts,
                   num_layers=trace.num_layers, dispatch_dtype=dispatch_dtype, combine_dtype=combine_dtype)


@dataclass(frozen=True, kw_only=True)
class LayerBytes:
    """Bytes on the wire of one layer and one batch.

    Attributes:
        pairs: int64 [P, P], (token, expert) pairs from home rank src to expert rank dst
            (diagonal = local pairs).
        copies: int64 [P, P], distinct (token, dst) from src to dst.
        dispatch: int64 [P, P], bytes src -> dst on dispatch; diagonal 0.
        combine: int64 [P, P], bytes dst -> src on combine, indexed [src, dst] like ``pairs``
            (the convention of ``accounting.TrafficReport``); diagonal 0.
    """

    pairs: np.ndarray
    copies: np.ndarray
    dispatch: np.ndarray
    combine: np.ndarray


def expert_ranks(experts: np.ndarray, placement: ExpertPlacement) -> np.ndarray:
    """int64 [T, k]: the EP rank hosting each selected expert.

    Args:
        experts: int [T, k], logical experts of one layer (``RoutingTrace.experts[:, l]``).
        placement: the layer's placement.
    """
    experts = np.asarray(experts)
    if experts.size and (experts.min() < 0 or experts.max() >= placement.num_experts):
        raise ValueError(
            f"expert_ranks: expert ids must be in 0..{placement.num_experts - 1} for this "
            f"placement, got range {experts.min()}..{experts.max()}"
        )
    return placement.rank_of_logical()[experts]


def layer_bytes(
    expert_rank: np.ndarray,
    home_rank: np.ndarray,
    *,
    num_ranks: int,
    wire: WireFormat,
    dispatcher: str,
) -> LayerBytes:
    """The byte matrices of one batch at one layer: THE byte function (one call, one place).

    Args:
        expert_rank: int64 [T, k], rank of each selected expert (-1: dropped, not counted).
        home_rank: int64 [T], each token's home rank, in 0 .. num_ranks-1.
        num_ranks: P.
        wire: bytes per row and per prob (Megatron's accounting format).
        dispatcher: a ``LayerWire``: "alltoall" / "specmoe" (pairs) or "deepep_normal" (copies).
    """
    _check_wire(dispatcher)
    home = np.asarray(home_rank)
    if home.shape != (expert_rank.shape[0],):
        raise ValueError(
            f"layer_bytes: home_rank must have shape [T]=({expert_rank.shape[0]},), got {home.shape}"
        )
    if home.size and (home.min() < 0 or home.max() >= num_ranks):
        raise ValueError(
            f"layer_bytes: home ranks must be in 0..{num_ranks - 1}, got range {home.min()}..{home.max()}"
        )
    hits = rank_hits(torch.as_tensor(np.asarray(expert_rank), dtype=torch.int64), num_ranks)
    home_t = torch.as_tensor(home, dtype=torch.int64)
    pairs = traffic_matrix(hits, home_t, num_ranks).numpy()
    copies = traffic_matrix((hits > 0).long(), home_t, num_ranks).numpy()
    off = ~np.eye(num_ranks, dtype=bool)
    row = wire.hidden_size * wire.activation_bytes
    if _COPIES[dispatcher]:  # one hidden row per copy, one prob per pair
        dispatch = (copies * row + pairs * wire.prob_bytes) * off
        combine = copies * row * off
    else:
        dispatch = pairs * wire.dispatch_bytes_per_pair * off
        combine = pairs * wire.combine_bytes_per_pair * off
    return LayerBytes(
        pairs=pairs, copies=copies, dispatch=dispatch.astype(np.int64), combine=combine.astype(np.int64)
    )



@dataclass(frozen=True, kw_only=True)
class RouteCounts:
    """Counts of every step and layer of a trace under one placement and one set of home ranks.

    Attributes:
        pairs: int64 [S, L, P, P], pairs from home rank src to expert rank dst (diagonal: local).
        copies: int64 [S, L, P, P], distinct (token, dst) from src.
        node_copies: int64 [S, L, P, N], distinct (token, destination node) from src (own node
            included).
        tokens: int64 [S, L, P], tokens at home on each rank.
        gpus_per_node: G used for ``node_copies``.
        nodes: ``measure.nodes.NodeMeasures`` of every step and layer together (remote nodes per
            token, remote-node pairs; ``measure_nodes`` on each batch), or None when the EP group
            spans nodes but G does not divide P (partial nodes have no node measure). P <= G is
            one node of P ranks.
    """

    pairs: np.ndarray
    copies: np.ndarray
    node_copies: np.ndarray
    tokens: np.ndarray
    gpus_per_node: int
    nodes: Optional[NodeMeasures] = None

    @property
    def num_ranks(self) -> int:
        return int(self.pairs.shape[-1])

    @property
    def num_nodes(self) -> int:
        return int(self.node_copies.shape[-1])

    def local_activation_rate(self) -> float:
        """Share of pairs whose expert is on the token's home rank."""
        total = int(self.pairs.sum())
        return int(np.trace(self.pairs, axis1=-2, axis2=-1).sum()) / total if total else 0.0

    def remote_pairs_per_token(self) -> float:
        """Pairs served off the token's home rank, per token per MoE layer."""
        tokens = int(self.tokens.sum())
        remote = int(self.pairs.sum()) - int(np.trace(self.pairs, axis1=-2, axis2=-1).sum())
        return remote / tokens if tokens else 0.0


def _batch_counts(ranks: np.ndarray, home: np.ndarray, num_ranks: int, gpn: int):
    """(pairs [P, P], copies [P, P], node copies [P, N], tokens [P], NodeMeasures or None) of one batch."""
    hits = rank_hits(torch.as_tensor(ranks, dtype=torch.int64), num_ranks)  # [B, P]
    home_t = torch.as_tensor(home, dtype=torch.int64)
    nodes = -(-num_ranks // gpn)
    node_of = torch.arange(num_ranks) // gpn
    node_hits = torch.zeros(hits.shape[0], nodes, dtype=torch.int64).index_add_(1, node_of, hits)
    pairs = traffic_matrix(hits, home_t, num_ranks)
    copies = traffic_matrix((hits > 0).long(), home_t, num_ranks)
    node_copies = torch.zeros(num_ranks, nodes, dtype=torch.int64).index_add_(0, home_t, (node_hits > 0).long())
    tokens = torch.bincount(home_t, minlength=num_ranks)
    measured = _node_gpus(num_ranks, gpn)
    node_measures = None if measured is None else measure_nodes(hits, home_t, measured)
    return pairs.numpy(), copies.numpy(), node_copies.numpy(), tokens.numpy(), node_measures


def _node_gpus(num_ranks: int, gpn: int) -> Optional[int]:
    """G for ``measure_nodes``: P when the group fits one node, G when G divides P, else None."""
    if num_ranks <= gpn:
        return num_ranks
    return gpn if num_ranks % gpn == 0 else None


def route_counts(
    trace: RoutingTrace,
    placements: Sequence[ExpertPlacement],
    home_ranks: np.ndarray,
    *,
    num_ranks: int,
    gpus_per_node: int,
    tokens_per_step: int,
    replicas: Optional[Sequence[ReplicatedPlacement]] = None,
) -> RouteCounts:
    """Counts of every step and layer of ``trace``.

    Args:
        trace: routes, ``experts`` int32 [T, L, k].
        placements: one ``ExpertPlacement`` per layer (length L), each with ep_size = P.
        home_ranks: int64 [T, L], each token's home rank at each layer.
        num_ranks: P.
        gpus_per_node: G.
        tokens_per_step: tokens per step; must divide T (trim the trace with ``trace.select``).
        replicas: None, or one ``ReplicatedPlacement`` per layer whose base is that layer's
            placement: pairs then go where the route table sends them (module docstring).
    """
    num_tokens, num_layers, _ = trace.experts.shape
    if len(placements) != num_layers:
        raise ValueError(f"route_counts: need one placement per MoE layer ({num_layers}), got {len(placements)}")
    for layer, placement in enumerate(placements):
        placement.check_matches(num_experts=trace.num_experts, ep_size=num_ranks,
                                where=f"route_counts: layer {layer}")
    home_ranks = np.asarray(home_ranks)
    if home_ranks.shape != (num_tokens, num_layers):
        raise ValueError(
            f"route_counts: home_ranks must be [T, L]=({num_tokens}, {num_layers}), got {home_ranks.shape}"
        )
    if home_ranks.size and (home_ranks.min() < 0 or home_ranks.max() >= num_ranks):
        raise ValueError(f"route_counts: home ranks must be in 0..{num_ranks - 1}")
    if replicas is not None:
        if len(replicas) != num_layers:
            raise ValueError(f"route_counts: need one replicated placement per MoE layer ({num_layers}), "
                             f"got {len(replicas)}")
        for layer, (rp, pl) in enumerate(zip(replicas, placements)):
            if rp.base != pl:
                raise ValueError(f"route_counts: replicas[{layer}] is built on another base placement than "
                                 f"placements[{layer}]")
    if tokens_per_step < 1 or num_tokens % tokens_per_step:
        raise ValueError(
            f"tokens_per_step={tokens_per_step} must be >= 1 and divide the trace's T={num_tokens} "
            "tokens; trim the trace to a multiple (trace.select(np.arange(n)))"
        )
    steps = num_tokens // tokens_per_step
    nodes = -(-num_ranks // gpus_per_node)
    pairs = np.zeros((steps, num_layers, num_ranks, num_ranks), dtype=np.int64)
    copies = np.zeros_like(pairs)
    node_copies = np.zeros((steps, num_layers, num_ranks, nodes), dtype=np.int64)
    tokens = np.zeros((steps, num_layers, num_ranks), dtype=np.int64)
    measured = _node_gpus(num_ranks, gpus_per_node)
    nodes = (None if measured is None
             else NodeMeasures.empty(gpus_per_node=measured, num_nodes=num_ranks // measured))
    for layer in range(num_layers):
        if replicas is None:
            ranks = expert_ranks(trace.experts[:, layer], placements[layer])
        else:
            ranks = routed_ranks(torch.as_tensor(trace.experts[:, layer].astype(np.int64)),
                                 torch.as_tensor(home_ranks[:, layer].astype(np.int64)),
                                 torch.as_tensor(replicas[layer].route_table()),
                                 replicas[layer].slots_per_rank).numpy()
        for step in range(steps):
            sl = slice(step * tokens_per_step, (step + 1) * tokens_per_step)
            out = _batch_counts(ranks[sl], home_ranks[sl, layer], num_ranks, gpus_per_node)
            pairs[step, layer], copies[step, layer], node_copies[step, layer], tokens[step, layer] = out[:4]
            if nodes is not None:
                nodes = nodes + out[4]
    return RouteCounts(pairs=pairs, copies=copies, node_copies=node_copies, tokens=tokens,
                       gpus_per_node=gpus_per_node, nodes=nodes)

def assert_bytes_match(
    simulated: np.ndarray,
    measured_sent: Mapping[int, int],
    *,
    measured_received: Optional[Mapping[int, int]] = None,
    what: str = "dispatch",
) -> None:
    """Raise ``AssertionError`` unless measured per-rank bytes equal the simulated matrix exactly.

    Args:
        simulated: int64 [P, P], bytes on the wire src -> dst (``LayerBytes.dispatch``, or
            ``LayerBytes.combine.T`` for combine as the sender sees it).
        measured_sent: rank -> bytes that rank put on the wire (e.g. the sum of
            ``DispatchRecord.dispatch_bytes_to_rank``); must name every rank 0..P-1.
        measured_received: optional rank -> bytes that rank took off the wire.
        what: label for the message.
    """
    simulated = np.asarray(simulated)
    num_ranks = simulated.shape[0]
    off = ~np.eye(num_ranks, dtype=bool)
    checks = [("sent", measured_sent, (simulated * off).sum(1))]
    if measured_received is not None:
        checks.append(("received", measured_received, (simulated * off).sum(0)))
    for label, measured, sim in checks:
        if sorted(measured) != list(range(num_ranks)):
            raise AssertionError(
                f"{what}: measured {label} bytes must name ranks 0..{num_ranks - 1}, got {sorted(measured)}"
            )
        bad = {r: (int(measured[r]), int(sim[r])) for r in range(num_ranks) if int(measured[r]) != int(sim[r])}
        if bad:
            raise AssertionError(
                f"{what}: {label} bytes differ (rank: (measured, simulated)) {bad}"
            )


def assert_matches_report(layer: LayerBytes, report: object) -> None:
    """Raise ``AssertionError`` unless a dispatcher's report of one layer and one batch has exactly
    the simulated matrices.

    Args:
        layer: ``layer_bytes`` of the same batch (same routes, home ranks, placement, wire).
        report: anything with ``pairs``, ``dispatch_bytes`` and ``combine_bytes`` as P x P nested
            sequences indexed [src][dst] (``accounting.TrafficReport``).
    """
    for name, mine in (("pairs", layer.pairs), ("dispatch_bytes", layer.dispatch), ("combine_bytes", layer.combine)):
        theirs = np.asarray(getattr(report, name), dtype=np.int64)
        if theirs.shape != mine.shape:
            raise AssertionError(f"report.{name} has shape {theirs.shape}, simulated {mine.shape}")
        if not np.array_equal(theirs, mine):
            src, dst = np.argwhere(theirs != mine)[0]
            raise AssertionError(
                f"report.{name} differs from the simulation, first at [src={src}, dst={dst}]: "
                f"reported {theirs[src, dst]}, simulated {mine[src, dst]}"
            )
