"""Dispatcher models: what each MoE dispatcher puts on which link, and how long its phases take.

Notation
    P: EP ranks.   G: GPUs per node.   N: nodes.   S, L: steps, MoE layers.   k: top-k.
    X: bytes a rank contributes to an all-gather (its tokens x (row + metadata)).
    Counts (pairs, copies, node copies) come from ``simulate.route_counts``; rows from ``wire.py``;
    the phase time from ``links.phase_time`` with the transport's latency (``cluster.CommLatency``).

The models (``DispatcherName``; JSON keys of ``specmoe simulate``)
    alltoall             Megatron's ``alltoall`` dispatcher on NCCL all-to-all: one row (+ fp32
                         prob) per remote pair; NIC routing of the cluster (PXN "rail" on HGX).
                         Dispatch pays two NCCL fixed costs: the per-expert count exchange (and its
                         host sync) and the all-to-all itself.
    deepep_normal        DeepEP's high-throughput kernels (Megatron's ``flex`` dispatcher with
                         DeepEP). One node: one row per remote copy over NVLink (this replaces the
                         former ``dedup`` model). Several nodes: one RDMA row per (token, remote
                         node) from the sender's NIC to its rail peer on that node, which forwards
                         one row per copy over NVLink to the destination GPUs; combine runs the
                         same paths backwards (NVLink reduce in the expert node, one RDMA row back
                         per node). Per-copy metadata: k x (8 B index + 4 B weight).
    deepep_ll            DeepEP's low-latency kernels: one message per pair (not de-duplicated),
                         NVLink within a node, the sender's own NIC across nodes (no PXN);
                         dispatch messages carry a 16 B header.
    allgather_inference  Megatron 0.19's inference dispatcher (``inference_moe_token_dispatcher_type
                         = 'nccl'``): NCCL all-gathers of hidden rows, probs (k x 4 B) and routing
                         map (k x 8 B) over EP (three calls), a reduce-scatter of the outputs.
                         Ring: NCCL's latency model, bus bandwidth min(NVLink, G x NIC).
    allgather_inference_nvls  the 'nvls' variant: one multimem all-gather-v kernel and one
                         reduce-scatter-v kernel through NVSwitch; within one node only (P <= G),
                         skipped with a reason elsewhere.
    specmoe_alltoall     this package's dispatcher: ``alltoall``'s wire with the plan's placement
                         and s-TS home ranks. The only specmoe transport the package runs today.
    specmoe_deepep_normal, specmoe_deepep_ll   the same routes on DeepEP's kernels: MODELLED ONLY
                         (the package has no DeepEP path). specmoe cannot sit on the all-gather
                         dispatchers: they send every token to every rank whatever the placement.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, get_args

import numpy as np

from megatron_specmoe.measure.nodes import TRANSPORTS, NodeMeasures
from megatron_specmoe.sim.cluster import ClusterSpec
from megatron_specmoe.sim.links import LinkLoads, PhaseTime, direct_loads, phase_time
from megatron_specmoe.sim.simulate import RouteCounts
from megatron_specmoe.sim.wire import WireDtypes

__all__ = ["DispatcherName", "Routes", "Transport", "DispatcherModel", "DISPATCHERS", "check_dispatcher",
           "SimResult", "simulate_dispatcher", "not_applicable"]

DispatcherName = Literal[
    "alltoall", "deepep_normal", "deepep_ll", "allgather_inference", "allgather_inference_nvls",
    "specmoe_alltoall", "specmoe_deepep_normal", "specmoe_deepep_ll",
]
Routes = Literal["baseline", "specmoe"]  # DispatcherModel.routes
Transport = Literal[  # DispatcherModel.transport
    "nccl_alltoall", "deepep_normal", "deepep_ll", "nccl_allgather", "nvls_allgather"]


@dataclass(frozen=True, kw_only=True)
class DispatcherModel:
    """One row of the registry.

    Attributes:
        name: the ``DispatcherName``.
        transport: the kernels it runs on.
        routes: "baseline" (Megatron's contiguous placement and shards) or "specmoe" (the plan's).
        runs_in: where it runs today: "megatron" (Megatron-Core's own dispatchers), "specmoe"
            (this package, at run time), or "model only".
    """

    name: str
    transport: str
    routes: str
    runs_in: str


DISPATCHERS: dict[str, DispatcherModel] = {
    m.name: m for m in (
        DispatcherModel(name="alltoall", transport="nccl_alltoall", routes="baseline", runs_in="megatron"),
        DispatcherModel(name="deepep_normal", transport="deepep_normal", routes="baseline", runs_in="megatron"),
        DispatcherModel(name="deepep_ll", transport="deepep_ll", routes="baseline", runs_in="megatron"),
        DispatcherModel(name="allgather_inference", transport="nccl_allgather", routes="baseline",
                        runs_in="megatron"),
        DispatcherModel(name="allgather_inference_nvls", transport="nvls_allgather", routes="baseline",
                        runs_in="megatron"),
        DispatcherModel(name="specmoe_alltoall", transport="nccl_alltoall", routes="specmoe", runs_in="specmoe"),
        DispatcherModel(name="specmoe_deepep_normal", transport="deepep_normal", routes="specmoe",
                        runs_in="model only"),
        DispatcherModel(name="specmoe_deepep_ll", transport="deepep_ll", routes="specmoe", runs_in="model only"),
    )
}


def check_dispatcher(name: str) -> DispatcherModel:
    if name not in DISPATCHERS or name not in get_args(DispatcherName):
        raise ValueError(f"unknown dispatcher {name!r}; choose one of {', '.join(get_args(DispatcherName))}")
    return DISPATCHERS[name]


def not_applicable(name: str, *, num_ranks: int, gpus_per_node: int) -> Optional[str]:
    """Why dispatcher ``name`` cannot run on P ranks, or None."""
    model = check_dispatcher(name)
    if model.transport == "nvls_allgather" and num_ranks > gpus_per_node:
        return f"NVLS multimem needs one NVLink domain; EP {num_ranks} spans nodes of {gpus_per_node} GPUs"
    if model.transport == "deepep_normal" and num_ranks > gpus_per_node and num_ranks % gpus_per_node:
        return f"DeepEP's internode kernels need full nodes; EP {num_ranks} is not a multiple of {gpus_per_node}"
    return None


@dataclass(frozen=True, kw_only=True)
class SimResult:
    """One dispatcher model over every step and layer of a trace.

    Attributes:
        dispatcher: the ``DispatcherName``.
        cluster: the cluster (with enough nodes for P).
        dispatch: ``PhaseTime`` of dispatch, arrays [S, L].
        combine: ``PhaseTime`` of combine, arrays [S, L].
        wire_bytes: float64 [S, L], bytes all ranks put on the wire (NVLink + NIC, both phases).
        local_activation_rate: share of pairs served on the token's home rank.
        remote_pairs_per_token: pairs served off the home rank, per token per MoE layer.
        nodes: ``NodeMeasures`` of the routes this model carries (``RouteCounts.nodes``), or None.
        wire: the row formats (for the node measures' inter-node bytes), or None.
    """

    dispatcher: str
    cluster: ClusterSpec
    dispatch: PhaseTime
    combine: PhaseTime
    local_activation_rate: float
    remote_pairs_per_token: float = 0.0
    nodes: Optional[NodeMeasures] = None
    wire: Optional[WireDtypes] = None

    def node_summary(self) -> dict:
        """``remote_nodes_per_token`` and ``internode_bytes_per_token`` ({per_node, per_pair}) of
        the routes (``measure/nodes.py``'s two transports: what these routes cost across nodes
        whatever kernels carry them; the model's own NIC bytes are ``inter_node_bytes_per_layer``);
        None for both when the EP group has partial nodes."""
        m = self.nodes
        if m is None or self.wire is None:
            return {"remote_nodes_per_token": None, "internode_bytes_per_token": None}
        kw = dict(dispatch_row=self.wire.dispatch_row, combine_row=self.wire.combine_row,
                  prob_bytes=self.wire.prob_bytes)
        return {"remote_nodes_per_token": m.remote_nodes_per_token,
                "internode_bytes_per_token": {
                    t: (m.internode_bytes_rows(transport=t, **kw) / m.tokens if m.tokens else 0.0)
                    for t in TRANSPORTS}}

    @property
    def layer_time_s(self) -> np.ndarray:
        """float64 [S, L]: dispatch + combine time of each MoE layer in each step."""
        return self.dispatch.time_s + self.combine.time_s

    def summary(self) -> dict:
        """Means per MoE layer per step (JSON-ready)."""
        model = DISPATCHERS[self.dispatcher]
        return {
            "dispatcher": self.dispatcher,
            "transport": model.transport,
            "runs_in": model.runs_in,
            "dispatch_time_s": float(self.dispatch.time_s.mean()),
            "combine_time_s": float(self.combine.time_s.mean()),
            "layer_time_s": float(self.layer_time_s.mean()),
            "local_activation_rate": self.local_activation_rate,
            "remote_pairs_per_token": self.remote_pairs_per_token,
            "nvlink_bytes_per_layer": float((self.dispatch.nvlink_bytes + self.combine.nvlink_bytes).mean()),
            "inter_node_bytes_per_layer": float((self.dispatch.nic_bytes + self.combine.nic_bytes).mean()),
            **self.node_summary(),
        }


def _off(p: int) -> np.ndarray:
    return ~np.eye(p, dtype=bool)


def _alltoall(c: RouteCounts, wire: WireDtypes, cluster: ClusterSpec, multi: bool):
    lat = cluster.latency
    off = _off(c.num_ranks)
    sent_d = c.pairs * (wire.dispatch_row + wire.prob_bytes) * off
    sent_c = np.swapaxes(c.pairs, -1, -2) * wire.combine_row * off
    fixed = lat.nccl_a2a_inter_s if multi else lat.nccl_a2a_intra_s
    kw = dict(nvl_issue_s=lat.nccl_issue_s, nic_issue_s=lat.nccl_issue_s)
    return (phase_time(direct_loads(sent_d, cluster), cluster, fixed_s=2 * fixed, **kw),
            phase_time(direct_loads(sent_c, cluster), cluster, fixed_s=fixed, **kw))


def _deepep_ll(c: RouteCounts, wire: WireDtypes, cluster: ClusterSpec, multi: bool):
    lat = cluster.latency
    off = _off(c.num_ranks)
    pairs = c.pairs * off
    pairs_t = np.swapaxes(pairs, -1, -2)
    kw = dict(nvl_issue_s=lat.deepep_ll_issue_s, nic_issue_s=lat.deepep_ll_issue_s)
    out = []
    for sent, msgs, fixed in ((pairs * wire.ll_dispatch_message, pairs, lat.deepep_ll_dispatch_s),
                              (pairs_t * wire.combine_row, pairs_t, lat.deepep_ll_combine_s)):
        loads = direct_loads(sent, cluster, routing="direct", messages=msgs)
        out.append(phase_time(loads, cluster, fixed_s=fixed, **kw))
    return tuple(out)


def _deepep_normal_loads(c: RouteCounts, row: int, meta: int, cluster: ClusterSpec, reverse: bool) -> LinkLoads:
    """Loads of DeepEP's internode kernels (module docstring); ``reverse`` for combine."""
    p, gpn, n = c.num_ranks, cluster.gpus_per_node, c.num_nodes
    lead = c.pairs.shape[:-2]
    node = np.arange(p) // gpn
    per = row + meta
    # RDMA: src s -> its rail peer on node m (same local index), one row per (token, node m != node(s)).
    remote = c.node_copies * (node[:, None] != np.arange(n)[None, :])  # [..., P(src), N]
    rdma_out = (remote * per).sum(-1).astype(np.float64)
    rdma_out_m = (remote > 0).sum(-1).astype(np.float64)
    by = remote.reshape(*lead, n, gpn, n)  # [..., node(s), local j, node m]
    rdma_in = np.swapaxes((by * per).sum(-3), -1, -2).reshape(*lead, p).astype(np.float64)
    rdma_in_m = np.swapaxes((by > 0).sum(-3), -1, -2).reshape(*lead, p).astype(np.float64)
    # NVLink forwarding inside node m: forwarder (m, j) sends to (m, i), i != j, the copies of all
    # sources with local index j; own-node copies start at the source itself (j = local(s)).
    fwd = c.copies.reshape(*lead, n, gpn, n, gpn).sum(-4)  # [..., j, node m, i]
    fwd = np.moveaxis(fwd, -2, -3)  # [..., node m, j, i]
    fwd = fwd * ~np.eye(gpn, dtype=bool)
    nvl_out = (fwd * per).sum(-1).reshape(*lead, p).astype(np.float64)
    nvl_in = (fwd * per).sum(-2).reshape(*lead, p).astype(np.float64)
    nvl_out_m = (fwd > 0).sum(-1).reshape(*lead, p).astype(np.float64)
    nvl_in_m = (fwd > 0).sum(-2).reshape(*lead, p).astype(np.float64)
    if reverse:
        rdma_out, rdma_in, rdma_out_m, rdma_in_m = rdma_in, rdma_out, rdma_in_m, rdma_out_m
        nvl_out, nvl_in, nvl_out_m, nvl_in_m = nvl_in, nvl_out, nvl_in_m, nvl_out_m
    return LinkLoads(nvl_out=nvl_out, nvl_in=nvl_in, nic_out=rdma_out, nic_in=rdma_in,
                     nvl_out_msgs=nvl_out_m, nvl_in_msgs=nvl_in_m, nic_out_msgs=rdma_out_m,
                     nic_in_msgs=rdma_in_m)


def _deepep_normal(c: RouteCounts, wire: WireDtypes, cluster: ClusterSpec, multi: bool, top_k: int):
    lat = cluster.latency
    meta = top_k * 12
    kw = dict(nvl_issue_s=0.0, nic_issue_s=0.0)
    if not multi:  # intranode kernels: one row per remote copy over NVLink
        off = _off(c.num_ranks)
        sent_d = c.copies * (wire.dispatch_row + meta) * off
        sent_c = np.swapaxes(c.copies, -1, -2) * wire.combine_row * off
        return (phase_time(direct_loads(sent_d, cluster), cluster, fixed_s=lat.deepep_normal_intra_s, **kw),
                phase_time(direct_loads(sent_c, cluster), cluster, fixed_s=lat.deepep_normal_intra_s, **kw))
    d = _deepep_normal_loads(c, wire.dispatch_row, meta, cluster, reverse=False)
    cb = _deepep_normal_loads(c, wire.combine_row, 0, cluster, reverse=True)
    return (phase_time(d, cluster, fixed_s=lat.deepep_normal_inter_s, **kw),
            phase_time(cb, cluster, fixed_s=lat.deepep_normal_inter_s, **kw))


def _gather_loads(x: np.ndarray, p: int, gpn: int, nvls: bool) -> tuple[LinkLoads, LinkLoads]:
    """(all-gather loads, reduce-scatter loads) when every rank contributes x bytes (float64 [...]).

    A ring over N nodes: each GPU takes in (P - 1) x over NVLink and its NIC together; its node
    takes the other nodes' (P - G) x through its G NICs, (P - G) x / G each. NVLS (one node): the
    switch multicasts each rank's x: out x, in (P - 1) x; reduce-scatter the reverse."""
    n = -(-p // gpn)
    xs = np.broadcast_to(np.asarray(x, dtype=np.float64)[..., None], np.shape(x) + (p,))
    total_in = (p - 1) * xs
    nic = (p - gpn) * xs / gpn if n > 1 else np.zeros_like(xs)
    nvl = total_in - nic
    ones = np.ones_like(xs)
    zero = np.zeros_like(xs)
    out_nvl = xs if nvls else nvl
    ag = LinkLoads(nvl_out=out_nvl, nvl_in=nvl, nic_out=nic, nic_in=nic, nvl_out_msgs=ones,
                   nvl_in_msgs=ones, nic_out_msgs=ones if n > 1 else zero, nic_in_msgs=ones if n > 1 else zero)
    rs = LinkLoads(nvl_out=ag.nvl_in, nvl_in=ag.nvl_out, nic_out=nic, nic_in=nic, nvl_out_msgs=ones,
                   nvl_in_msgs=ones, nic_out_msgs=ag.nic_out_msgs, nic_in_msgs=ag.nic_in_msgs)
    return ag, rs


def _allgather(c: RouteCounts, wire: WireDtypes, cluster: ClusterSpec, top_k: int, nvls: bool):
    lat = cluster.latency
    p, gpn = c.num_ranks, cluster.gpus_per_node
    n = -(-p // gpn)
    rows = c.tokens.max(-1).astype(np.float64)  # [S, L]: padded to the largest rank's tokens
    x_d = rows * (wire.dispatch_row + top_k * (4 + 8))  # hidden + fp32 probs + int64 routing map
    x_c = rows * wire.combine_row
    ag, _ = _gather_loads(x_d, p, gpn, nvls)
    _, rs = _gather_loads(x_c, p, gpn, nvls)
    if nvls:
        fixed_d = fixed_c = lat.nvls_fixed_s
    else:
        ring = lat.ring_base_s + (p - n) * lat.ring_step_intra_s + (n - 1) * lat.ring_step_inter_s
        fixed_d, fixed_c = 3 * ring, ring  # three all-gather calls, one reduce-scatter
    kw = dict(nvl_issue_s=0.0, nic_issue_s=0.0)
    return (phase_time(ag, cluster, fixed_s=fixed_d, **kw), phase_time(rs, cluster, fixed_s=fixed_c, **kw))


def simulate_dispatcher(
    name: str, counts: RouteCounts, *, wire: WireDtypes, cluster: ClusterSpec, top_k: int
) -> SimResult:
    """Dispatch and combine times of dispatcher ``name`` on ``counts`` (module docstring).

    Args:
        name: a ``DispatcherName``; its routes must be the ones ``counts`` was made from.
        counts: ``simulate.route_counts`` of the trace, arrays [S, L, ...].
        wire: row formats of both phases.
        cluster: needs ``num_gpus >= P`` and ``gpus_per_node == counts.gpus_per_node``.
        top_k: k of the routes counted (metadata bytes).
    """
    model = check_dispatcher(name)
    p = counts.num_ranks
    if cluster.num_gpus < p:
        cluster = cluster.for_ranks(p)
    if cluster.gpus_per_node != counts.gpus_per_node:
        raise ValueError(f"simulate_dispatcher: counts were made with {counts.gpus_per_node} GPUs per "
                         f"node, cluster {cluster.name!r} has {cluster.gpus_per_node}")
    why = not_applicable(name, num_ranks=p, gpus_per_node=cluster.gpus_per_node)
    if why:
        raise ValueError(f"dispatcher {name}: {why}")
    multi = p > cluster.gpus_per_node
    if model.transport == "nccl_alltoall":
        dispatch, combine = _alltoall(counts, wire, cluster, multi)
    elif model.transport == "deepep_ll":
        dispatch, combine = _deepep_ll(counts, wire, cluster, multi)
    elif model.transport == "deepep_normal":
        dispatch, combine = _deepep_normal(counts, wire, cluster, multi, top_k)
    else:
        dispatch, combine = _allgather(counts, wire, cluster, top_k, nvls=model.transport == "nvls_allgather")
    return SimResult(dispatcher=name, cluster=cluster, dispatch=dispatch, combine=combine,
                     local_activation_rate=counts.local_activation_rate(),
                     remote_pairs_per_token=counts.remote_pairs_per_token(), nodes=counts.nodes, wire=wire)

