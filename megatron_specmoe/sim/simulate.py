"""Cluster-scale communication simulator: bytes and alpha-beta times of the MoE all-to-all.

Notation
    T: tokens of the trace.   L: MoE layers.   k: top-k.   E: routed experts.
    P: EP ranks (the EP group simulated).   S: steps; a step is ``tokens_per_step`` consecutive
       tokens of the trace, all EP ranks working on them at once.
    H: hidden size.   src: a token's home rank.   dst: the rank of a selected expert.

Glossary
    home rank      the EP rank holding a token when the MoE layer starts (docs/method.md).
    pair           (token, selected expert).   copy: (token, distinct destination rank).
    intra / inter  a (src, dst) pair of ranks on the same node / on different nodes; rank r lives
                   on node r // gpus_per_node (``ClusterSpec``).

What each dispatcher puts on the wire (``DispatcherName``; the registry is ``DISPATCHERS``)
    alltoall   Megatron's ``alltoall``: one row per remote pair. Dispatch sends H*act_bytes plus
               one prob (prob_bytes) per pair, combine returns H*act_bytes per pair.
    dedup      a de-duplicating dispatcher (DeepEP's intranode kernels): one hidden row per remote
               copy plus one prob per remote pair on dispatch; combine returns one row per copy
               (the destination sums its local experts' weighted outputs before sending).
    specmoe    the same wire format as ``alltoall`` (pairs), but the caller passes the plan's
               placement and the shuffled home ranks, so that most pairs are local.
    Pairs whose expert is on the home rank stay local (the diagonal of every matrix, never on the
    wire). Every count comes from ``measures.rank_hits`` and ``measures.traffic_matrix`` in the one
    function ``layer_bytes``, so that the bytes equal the dispatcher's own accounting
    (``accounting.TrafficReport``) on the same batch; ``assert_bytes_match`` checks that.

Time model (alpha-beta with per-link contention; ``phase_times``)
    For one phase (dispatch or combine) with byte matrix B [P, P] (src -> dst on the wire):
        t_r = max( a_intra * m_out_intra(r) + out_intra(r) / bw_nvlink,
                   a_intra * m_in_intra(r)  + in_intra(r)  / bw_nvlink,
                   a_inter * m_out_inter(r) + out_inter(r) / bw_nic,
                   a_inter * m_in_inter(r)  + in_inter(r)  / bw_nic )
        phase time = max over ranks r of t_r   (an all-to-all ends with its slowest rank)
    where m_* counts messages (destinations or sources with at least one byte) and out/in sum the
    bytes. Each rank's NVLink and NIC work in parallel and in both directions at once; messages
    on one link are issued one after another. With ``nic_shared_per_node`` the inter-node terms
    are summed over the node's ranks (one NIC per node). With ``inter_node_routing="rail"`` (NCCL
    PXN) a message to GPU d of another node first hops over NVLink to the local GPU with d's local
    index and leaves through that GPU's NIC: the hop adds NVLink bytes and messages, and NIC load
    follows the destination's local index (``_rail_route``); the reported intra/inter bytes stay
    the dispatcher's (logical) ones. A rank with no remote traffic takes 0 s:
    the model ignores the split-size exchange and kernel launches, so it is a lower bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, Optional, Sequence, get_args

import numpy as np
import torch

from megatron_specmoe.schedule.layout import ParallelLayout
from megatron_specmoe.sim.cluster import ClusterSpec
from megatron_specmoe.measure.measures import WireFormat, rank_hits, traffic_matrix
from megatron_specmoe.schedule.placement import ExpertPlacement
from megatron_specmoe.artifacts.traces import RoutingTrace

__all__ = [
    "DispatcherName",
    "DISPATCHERS",
    "DTYPE_BYTES",
    "ModelShape",
    "ParallelLayout",
    "LayerBytes",
    "PhaseTimes",
    "SimResult",
    "expert_ranks",
    "layer_bytes",
    "phase_times",
    "simulate",
    "assert_bytes_match",
    "assert_matches_report",
]

DispatcherName = Literal["alltoall", "dedup", "specmoe"]

# name -> whether it sends one row per (token, destination rank) instead of one per pair.
DISPATCHERS: dict[str, bool] = {"alltoall": False, "dedup": True, "specmoe": False}

DTYPE_BYTES: dict[str, int] = {"bf16": 2, "fp16": 2, "fp32": 4, "fp8": 1}


def _check_dispatcher(name: str) -> None:
    if name not in DISPATCHERS or name not in get_args(DispatcherName):
        raise ValueError(
            f"unknown dispatcher {name!r}; choose one of {', '.join(get_args(DispatcherName))}"
        )


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """The MoE layers' shape as far as communication sees it.

    Attributes:
        hidden_size: H.
        activation_bytes: bytes per hidden element (``DTYPE_BYTES``: bf16 -> 2).
        top_k: k.
        num_experts: E.
        num_layers: L (MoE layers).
        prob_bytes: bytes per routing probability (4: Megatron keeps probs in fp32).
    """

    hidden_size: int
    activation_bytes: int
    top_k: int
    num_experts: int
    num_layers: int
    prob_bytes: int = 4

    def __post_init__(self) -> None:
        for name in ("hidden_size", "activation_bytes", "top_k", "num_experts", "num_layers"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"ModelShape.{name} must be a positive int, got {value!r}")
        if self.prob_bytes < 0:
            raise ValueError(f"ModelShape.prob_bytes must be >= 0, got {self.prob_bytes!r}")

    @classmethod
    def from_trace(cls, trace: RoutingTrace, *, hidden_size: int, dtype: str) -> "ModelShape":
        """Experts, layers and top-k from ``trace``; ``dtype`` one of ``DTYPE_BYTES``."""
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_BYTES)}")
        return cls(
            hidden_size=hidden_size,
            activation_bytes=DTYPE_BYTES[dtype],
            top_k=trace.topk,
            num_experts=trace.num_experts,
            num_layers=trace.num_layers,
        )

    @property
    def wire(self) -> WireFormat:
        return WireFormat(
            hidden_size=self.hidden_size,
            activation_bytes=self.activation_bytes,
            prob_bytes=self.prob_bytes,
        )


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
        wire: bytes per row and per prob.
        dispatcher: a ``DispatcherName``.
    """
    _check_dispatcher(dispatcher)
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
    if DISPATCHERS[dispatcher]:  # one hidden row per copy, one prob per pair
        dispatch = (copies * row + pairs * wire.prob_bytes) * off
        combine = copies * row * off
    else:
        dispatch = pairs * wire.dispatch_bytes_per_pair * off
        combine = pairs * wire.combine_bytes_per_pair * off
    return LayerBytes(
        pairs=pairs, copies=copies, dispatch=dispatch.astype(np.int64), combine=combine.astype(np.int64)
    )


@dataclass(frozen=True, kw_only=True)
class PhaseTimes:
    """Times of one phase for a stack of byte matrices.

    Attributes:
        time_s: float64 [...], the phase time (max over ranks).
        rank_time_s: float64 [..., P], each rank's t_r.
        intra_bytes: int64 [...], bytes on intra-node links (all ranks).
        inter_bytes: int64 [...], bytes on inter-node links (all ranks).
    """

    time_s: np.ndarray
    rank_time_s: np.ndarray
    intra_bytes: np.ndarray
    inter_bytes: np.ndarray


def phase_times(sent: np.ndarray, cluster: ClusterSpec) -> PhaseTimes:
    """Alpha-beta time of one all-to-all phase (model in the module docstring).

    Args:
        sent: int64 [..., P, P], bytes on the wire from row rank to column rank (diagonal ignored).
        cluster: the cluster; needs ``num_gpus >= P``.
    """
    sent = np.asarray(sent)
    num_ranks = sent.shape[-1]
    if sent.shape[-2] != num_ranks:
        raise ValueError(f"phase_times: sent must be [..., P, P], got shape {sent.shape}")
    if num_ranks > cluster.num_gpus:
        raise ValueError(
            f"phase_times: {num_ranks} EP ranks do not fit cluster {cluster.name!r} with "
            f"{cluster.nodes} nodes x {cluster.gpus_per_node} GPUs; use cluster.for_ranks({num_ranks})"
        )
    gpn = cluster.gpus_per_node
    node = np.arange(num_ranks) // gpn
    same = node[:, None] == node[None, :]
    off = ~np.eye(num_ranks, dtype=bool)
    intra_mask, inter_mask = same & off, ~same
    sent = sent * off
    intra_sent = sent * intra_mask  # [..., P, P] bytes on NVLink, src -> dst
    nic_sent = sent * inter_mask  # [..., P, P] bytes through NICs, sending NIC's rank -> dst
    if cluster.inter_node_routing == "rail" and bool(inter_mask.any()):
        if num_ranks % gpn:
            raise ValueError(
                f"phase_times: inter_node_routing='rail' needs full nodes; {num_ranks} ranks is not "
                f"a multiple of {gpn} GPUs per node"
            )
        intra_sent, nic_sent = _rail_route(nic_sent, intra_sent, gpn)
    recv_intra = np.swapaxes(intra_sent, -1, -2)  # [..., r, s] = bytes r receives from s
    recv_nic = np.swapaxes(nic_sent, -1, -2)

    def load(mat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return mat.sum(-1).astype(np.float64), (mat > 0).sum(-1).astype(np.float64)

    terms = []
    for mat in (intra_sent, recv_intra):
        b_intra, m_intra = load(mat)
        terms.append(cluster.intra_alpha_s * m_intra + b_intra / cluster.nvlink_bw_bytes_per_s)
    for mat in (nic_sent, recv_nic):
        b_inter, m_inter = load(mat)
        if cluster.nic_shared_per_node:
            # One NIC per node: every rank of the node waits for the node's total.
            num_nodes = int(node.max()) + 1
            onehot = (node[:, None] == np.arange(num_nodes)[None, :]).astype(np.float64)  # [P, N]
            b_inter = (b_inter @ onehot) @ onehot.T
            m_inter = (m_inter @ onehot) @ onehot.T
        terms.append(cluster.inter_alpha_s * m_inter + b_inter / cluster.nic_bw_bytes_per_s)
    rank_time = np.maximum.reduce(terms)
    return PhaseTimes(
        time_s=rank_time.max(-1),
        rank_time_s=rank_time,
        intra_bytes=(sent * intra_mask).sum((-1, -2)).astype(np.int64),
        inter_bytes=(sent * inter_mask).sum((-1, -2)).astype(np.int64),
    )


def _rail_route(inter: np.ndarray, intra: np.ndarray, gpn: int) -> tuple[np.ndarray, np.ndarray]:
    """Re-route inter-node bytes as NCCL's PXN does (``ClusterSpec.inter_node_routing='rail'``).

    Args:
        inter: int64 [..., P, P], inter-node bytes src -> dst (zero within nodes).
        intra: int64 [..., P, P], intra-node bytes src -> dst.
        gpn: G, GPUs per node; P must be a multiple of G.

    Returns:
        (NVLink bytes [..., P, P] with the hops to the proxy GPU added, NIC bytes [..., P, P]
        indexed [proxy, dst]).
    """
    num_ranks = inter.shape[-1]
    nodes = num_ranks // gpn
    local = np.arange(num_ranks) % gpn
    node = np.arange(num_ranks) // gpn
    by_local = (local[:, None] == np.arange(gpn)[None, :]).astype(inter.dtype)  # [P(dst), G]
    # Step 1: src s hands the bytes for destinations of local index j to GPU (node(s), j).
    to_rail = inter @ by_local  # [..., P(src), G]
    hop = np.zeros_like(intra)
    proxy = node[:, None] * gpn + np.arange(gpn)[None, :]  # [P(src), G]
    src = np.broadcast_to(np.arange(num_ranks)[:, None], proxy.shape)
    hop[..., src, proxy] = to_rail
    hop[..., np.arange(num_ranks), np.arange(num_ranks)] = 0  # j == local(s): its own NIC, no hop
    # Step 2: GPU (a, local(d)) sends node a's bytes for d through its NIC.
    by_node = (node[:, None] == np.arange(nodes)[None, :]).astype(inter.dtype)  # [P(src), N]
    node_to_dst = np.swapaxes(np.swapaxes(inter, -1, -2) @ by_node, -1, -2)  # [..., N, P(dst)]
    nic = np.zeros_like(inter)
    rows = np.arange(nodes)[:, None] * gpn + local[None, :]  # [N, P(dst)]
    cols = np.broadcast_to(np.arange(num_ranks)[None, :], rows.shape)
    nic[..., rows, cols] = node_to_dst
    return intra + hop, nic


@dataclass(frozen=True, kw_only=True)
class SimResult:
    """One dispatcher simulated over a trace.

    Attributes:
        dispatcher: the ``DispatcherName``.
        cluster: the cluster (with enough nodes for P).
        layout: the parallel layout.
        shape: the model shape.
        tokens_per_step: tokens of one step (all EP ranks together).
        pairs: int64 [S, L, P, P], pairs src -> dst (diagonal = local).
        dispatch_bytes: int64 [S, L, P, P], bytes on the wire, src -> dst.
        combine_bytes: int64 [S, L, P, P], bytes on the wire dst -> src, indexed [src, dst].
        dispatch: ``PhaseTimes`` of dispatch, arrays [S, L].
        combine: ``PhaseTimes`` of combine, arrays [S, L] (computed on the transposed matrix:
            on combine dst sends to src).
    """

    dispatcher: str
    cluster: ClusterSpec
    layout: ParallelLayout
    shape: ModelShape
    tokens_per_step: int
    pairs: np.ndarray
    dispatch_bytes: np.ndarray
    combine_bytes: np.ndarray
    dispatch: PhaseTimes
    combine: PhaseTimes

    @property
    def num_steps(self) -> int:
        return int(self.pairs.shape[0])

    @property
    def layer_time_s(self) -> np.ndarray:
        """float64 [S, L]: dispatch + combine time of each MoE layer in each step."""
        return self.dispatch.time_s + self.combine.time_s

    @property
    def step_time_s(self) -> np.ndarray:
        """float64 [S]: MoE communication time of a whole forward step (all layers)."""
        return self.layer_time_s.sum(-1)

    def summary(self) -> dict:
        """Means per MoE layer per step (JSON-ready)."""
        pairs = self.pairs
        total = int(pairs.sum())
        local = int(np.trace(pairs, axis1=-2, axis2=-1).sum())
        steps_layers = max(1, self.num_steps * self.shape.num_layers)
        return {
            "dispatcher": self.dispatcher,
            "ep": self.layout.ep,
            "tp": self.layout.tp,
            "nodes": -(-self.layout.ep // self.cluster.gpus_per_node),
            "steps": self.num_steps,
            "tokens_per_step": self.tokens_per_step,
            "local_activation_rate": local / total if total else 0.0,
            "layer_time_s": float(self.layer_time_s.mean()),
            "dispatch_time_s": float(self.dispatch.time_s.mean()),
            "combine_time_s": float(self.combine.time_s.mean()),
            "step_time_s": float(self.step_time_s.mean()),
            "intra_node_bytes_per_layer": (
                int(self.dispatch.intra_bytes.sum() + self.combine.intra_bytes.sum()) / steps_layers
            ),
            "inter_node_bytes_per_layer": (
                int(self.dispatch.inter_bytes.sum() + self.combine.inter_bytes.sum()) / steps_layers
            ),
        }


def simulate(
    trace: RoutingTrace,
    placements: Sequence[ExpertPlacement],
    home_ranks: np.ndarray,
    *,
    shape: ModelShape,
    layout: ParallelLayout,
    cluster: ClusterSpec,
    dispatcher: str,
    tokens_per_step: int,
) -> SimResult:
    """Bytes and times of every MoE layer of every step of ``trace`` under one dispatcher.

    Args:
        trace: routes, ``experts`` int32 [T, L, k].
        placements: one ``ExpertPlacement`` per layer (length L), each with ep_size = P.
        home_ranks: int64 [T, L], each token's home rank at each layer (contiguous shards for the
            baselines, the shuffle plan's ranks for specmoe).
        shape: must agree with the trace (E, L, k).
        layout: TP, EP, DP.
        cluster: its ``gpus_per_node`` maps ranks to nodes; enough nodes are added when it has
            fewer GPUs than P (``ClusterSpec.for_ranks``) - more nodes than needed are kept.
        dispatcher: a ``DispatcherName``.
        tokens_per_step: tokens per step; must divide T (trim the trace with ``trace.select``).
    """
    _check_dispatcher(dispatcher)
    layout.require_folding()
    num_tokens, num_layers, topk = trace.experts.shape
    for name, have, want in (
        ("num_experts", trace.num_experts, shape.num_experts),
        ("num_layers", num_layers, shape.num_layers),
        ("top_k", topk, shape.top_k),
    ):
        if have != want:
            raise ValueError(
                f"simulate: trace {trace.source} has {name}={have} but ModelShape.{name}={want}"
            )
    if len(placements) != num_layers:
        raise ValueError(
            f"simulate: need one placement per MoE layer ({num_layers}), got {len(placements)}"
        )
    for layer, placement in enumerate(placements):
        placement.check_matches(
            num_experts=shape.num_experts, ep_size=layout.ep, where=f"simulate: layer {layer}"
        )
    home_ranks = np.asarray(home_ranks)
    if home_ranks.shape != (num_tokens, num_layers):
        raise ValueError(
            f"simulate: home_ranks must be [T, L]=({num_tokens}, {num_layers}), got {home_ranks.shape}"
        )
    if tokens_per_step < 1 or num_tokens % tokens_per_step:
        raise ValueError(
            f"simulate: tokens_per_step={tokens_per_step} must be >= 1 and divide the trace's "
            f"T={num_tokens} tokens; trim the trace to a multiple (trace.select(np.arange(n)))"
        )
    if cluster.num_gpus < layout.ep:
        cluster = cluster.for_ranks(layout.ep)
    steps = num_tokens // tokens_per_step
    num_ranks = layout.ep
    pairs = np.zeros((steps, num_layers, num_ranks, num_ranks), dtype=np.int64)
    dispatch = np.zeros_like(pairs)
    combine = np.zeros_like(pairs)
    wire = shape.wire
    for layer in range(num_layers):
        ranks = expert_ranks(trace.experts[:, layer], placements[layer])
        for step in range(steps):
            sl = slice(step * tokens_per_step, (step + 1) * tokens_per_step)
            lb = layer_bytes(
                ranks[sl], home_ranks[sl, layer], num_ranks=num_ranks, wire=wire, dispatcher=dispatcher
            )
            pairs[step, layer], dispatch[step, layer], combine[step, layer] = lb.pairs, lb.dispatch, lb.combine
    return SimResult(
        dispatcher=dispatcher,
        cluster=cluster,
        layout=layout,
        shape=shape,
        tokens_per_step=tokens_per_step,
        pairs=pairs,
        dispatch_bytes=dispatch,
        combine_bytes=combine,
        dispatch=phase_times(dispatch, cluster),
        combine=phase_times(np.swapaxes(combine, -1, -2), cluster),
    )


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
