"""Link loads and the time of one communication phase (the latency model of ``cluster.py``).

Notation
    P: ranks (GPUs) in the group.   G: GPUs per node.   N: nodes.   ...: any leading axes
    (steps, layers).   src / dst: sending / receiving rank.

Glossary
    link direction   each GPU has four: NVLink out, NVLink in, NIC out, NIC in. They work at the
                     same time; a phase ends when the busiest direction of the slowest GPU is done.
    message          one (sender, receiver) transfer on one link direction; its count is charged
                     ``issue_s`` each (serial issue), its bytes share the link's bandwidth.

Time of one phase (``phase_time``)
    t_r = max over r's four directions of  issue_s(link) x messages + bytes / bw(link)
    time = fixed_s + max_r t_r           (0 when no byte moves: the fixed cost is still paid)
With ``nic_shared_per_node`` the NIC directions are summed over the node's GPUs (one NIC per node).

``direct_loads`` turns a byte matrix [..., P, P] into loads: intra-node bytes on NVLink, inter-node
bytes on the sender's NIC ("direct"), or on the NIC of the sender's node that sits on the
destination's rail after an NVLink hop ("rail", NCCL's PXN: ``_rail_route``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_specmoe.sim.cluster import ClusterSpec

__all__ = ["LinkLoads", "PhaseTime", "direct_loads", "phase_time"]


@dataclass(frozen=True, kw_only=True)
class LinkLoads:
    """Per-GPU load of each link direction in one phase.

    Attributes (all float64 [..., P]):
        nvl_out, nvl_in, nic_out, nic_in: bytes.
        nvl_out_msgs, nvl_in_msgs, nic_out_msgs, nic_in_msgs: messages.
    """

    nvl_out: np.ndarray
    nvl_in: np.ndarray
    nic_out: np.ndarray
    nic_in: np.ndarray
    nvl_out_msgs: np.ndarray
    nvl_in_msgs: np.ndarray
    nic_out_msgs: np.ndarray
    nic_in_msgs: np.ndarray

    @property
    def nvlink_bytes(self) -> np.ndarray:
        """float64 [...]: bytes over NVLink (all GPUs)."""
        return self.nvl_out.sum(-1)

    @property
    def nic_bytes(self) -> np.ndarray:
        """float64 [...]: bytes through NICs (all GPUs)."""
        return self.nic_out.sum(-1)


@dataclass(frozen=True, kw_only=True)
class PhaseTime:
    """Time of one phase for a stack of loads.

    Attributes:
        time_s: float64 [...], the phase time (fixed cost + slowest GPU).
        rank_time_s: float64 [..., P], each GPU's t_r (without the fixed cost).
        nvlink_bytes: float64 [...], bytes over NVLink, all GPUs.
        nic_bytes: float64 [...], bytes through NICs, all GPUs.
        busiest_nic_bytes: float64 [...], max over GPUs of max(NIC bytes out, in) (a shared NIC
            counts its node's total).
    """

    time_s: np.ndarray
    rank_time_s: np.ndarray
    nvlink_bytes: np.ndarray
    nic_bytes: np.ndarray
    busiest_nic_bytes: np.ndarray


def _load(mat: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    return mat.sum(axis).astype(np.float64), (mat > 0).sum(axis).astype(np.float64)


def direct_loads(
    sent: np.ndarray, cluster: ClusterSpec, *, routing: str | None = None, messages: np.ndarray | None = None
) -> LinkLoads:
    """Loads of point-to-point bytes ``sent`` [..., P, P] (src -> dst, diagonal ignored).

    Args:
        sent: bytes from row rank to column rank.
        cluster: G and the NIC layout; needs ``num_gpus >= P``.
        routing: "direct" or "rail" (None: ``cluster.inter_node_routing``).
        messages: optional [..., P, P] messages per (src, dst), routed like the bytes; default: one
            message per (src, dst) with bytes (after the rail hop).
    """
    if messages is not None:
        counted = direct_loads(messages, cluster, routing=routing)
        loads = direct_loads(sent, cluster, routing=routing)
        return LinkLoads(nvl_out=loads.nvl_out, nvl_in=loads.nvl_in, nic_out=loads.nic_out,
                         nic_in=loads.nic_in, nvl_out_msgs=counted.nvl_out, nvl_in_msgs=counted.nvl_in,
                         nic_out_msgs=counted.nic_out, nic_in_msgs=counted.nic_in)
    sent = np.asarray(sent, dtype=np.float64)
    num_ranks = sent.shape[-1]
    if sent.shape[-2] != num_ranks:
        raise ValueError(f"direct_loads: sent must be [..., P, P], got shape {sent.shape}")
    if num_ranks > cluster.num_gpus:
        raise ValueError(
            f"direct_loads: {num_ranks} ranks do not fit cluster {cluster.name!r} with "
            f"{cluster.nodes} nodes x {cluster.gpus_per_node} GPUs; use cluster.for_ranks({num_ranks})"
        )
    routing = cluster.inter_node_routing if routing is None else routing
    gpn = cluster.gpus_per_node
    node = np.arange(num_ranks) // gpn
    same = node[:, None] == node[None, :]
    off = ~np.eye(num_ranks, dtype=bool)
    sent = sent * off
    intra, nic = sent * (same & off), sent * ~same
    if routing == "rail" and bool((~same).any()):
        if num_ranks % gpn:
            raise ValueError(
                f"direct_loads: rail routing needs full nodes; {num_ranks} ranks is not a multiple "
                f"of {gpn} GPUs per node"
            )
        intra, nic = _rail_route(nic, intra, gpn)
    nvl_out, nvl_out_m = _load(intra, -1)
    nvl_in, nvl_in_m = _load(intra, -2)
    nic_out, nic_out_m = _load(nic, -1)
    nic_in, nic_in_m = _load(nic, -2)
    return LinkLoads(nvl_out=nvl_out, nvl_in=nvl_in, nic_out=nic_out, nic_in=nic_in,
                     nvl_out_msgs=nvl_out_m, nvl_in_msgs=nvl_in_m, nic_out_msgs=nic_out_m,
                     nic_in_msgs=nic_in_m)


def _rail_route(inter: np.ndarray, intra: np.ndarray, gpn: int) -> tuple[np.ndarray, np.ndarray]:
    """Re-route inter-node bytes as NCCL's PXN does.

    Args:
        inter: float64 [..., P, P], inter-node bytes src -> dst (zero within nodes).
        intra: float64 [..., P, P], intra-node bytes src -> dst.
        gpn: G; P must be a multiple of G.

    Returns:
        (NVLink bytes [..., P, P] with the hops to the proxy GPU added, NIC bytes [..., P, P]
        indexed [proxy, dst]).
    """
    num_ranks = inter.shape[-1]
    nodes = num_ranks // gpn
    local = np.arange(num_ranks) % gpn
    node = np.arange(num_ranks) // gpn
    by_local = (local[:, None] == np.arange(gpn)[None, :]).astype(inter.dtype)  # [P(dst), G]
    to_rail = inter @ by_local  # [..., P(src), G]: bytes src hands to GPU (node(src), j)
    hop = np.zeros_like(intra)
    proxy = node[:, None] * gpn + np.arange(gpn)[None, :]  # [P(src), G]
    src = np.broadcast_to(np.arange(num_ranks)[:, None], proxy.shape)
    hop[..., src, proxy] = to_rail
    hop[..., np.arange(num_ranks), np.arange(num_ranks)] = 0  # j == local(src): its own NIC
    by_node = (node[:, None] == np.arange(nodes)[None, :]).astype(inter.dtype)  # [P(src), N]
    node_to_dst = np.swapaxes(np.swapaxes(inter, -1, -2) @ by_node, -1, -2)  # [..., N, P(dst)]
    nic = np.zeros_like(inter)
    rows = np.arange(nodes)[:, None] * gpn + local[None, :]  # [N, P(dst)]
    cols = np.broadcast_to(np.arange(num_ranks)[None, :], rows.shape)
    nic[..., rows, cols] = node_to_dst
    return intra + hop, nic


def _per_node(x: np.ndarray, gpn: int) -> np.ndarray:
    """float64 [..., P]: each GPU gets its node's total (one shared NIC per node)."""
    num_ranks = x.shape[-1]
    node = np.arange(num_ranks) // gpn
    onehot = (node[:, None] == np.arange(int(node.max()) + 1)[None, :]).astype(np.float64)
    return (x @ onehot) @ onehot.T


def phase_time(
    loads: LinkLoads,
    cluster: ClusterSpec,
    *,
    fixed_s: float | np.ndarray,
    nvl_issue_s: float,
    nic_issue_s: float,
    nvl_bw: float | None = None,
    nic_bw: float | None = None,
) -> PhaseTime:
    """Time of one phase (module docstring).

    Args:
        loads: per-GPU loads, arrays [..., P].
        cluster: achieved bandwidths (overridable by ``nvl_bw`` / ``nic_bw`` for transports with
            their own rates, e.g. a ring collective's bus bandwidth).
        fixed_s: fixed cost of the transport (scalar or float64 [...]).
        nvl_issue_s, nic_issue_s: per-message issue cost on NVLink / on the NIC.
    """
    nvl_bw = cluster.nvlink_bw_bytes_per_s if nvl_bw is None else nvl_bw
    nic_bw = cluster.nic_bw_bytes_per_s if nic_bw is None else nic_bw
    nic_out, nic_in = loads.nic_out, loads.nic_in
    nic_out_m, nic_in_m = loads.nic_out_msgs, loads.nic_in_msgs
    if cluster.nic_shared_per_node:
        gpn = cluster.gpus_per_node
        nic_out, nic_in = _per_node(nic_out, gpn), _per_node(nic_in, gpn)
        nic_out_m, nic_in_m = _per_node(nic_out_m, gpn), _per_node(nic_in_m, gpn)
    terms = [
        nvl_issue_s * loads.nvl_out_msgs + loads.nvl_out / nvl_bw,
        nvl_issue_s * loads.nvl_in_msgs + loads.nvl_in / nvl_bw,
        nic_issue_s * nic_out_m + nic_out / nic_bw,
        nic_issue_s * nic_in_m + nic_in / nic_bw,
    ]
    rank_time = np.maximum.reduce(terms)
    return PhaseTime(
        time_s=np.asarray(fixed_s, dtype=np.float64) + rank_time.max(-1),
        rank_time_s=rank_time,
        nvlink_bytes=loads.nvlink_bytes,
        nic_bytes=loads.nic_bytes,
        busiest_nic_bytes=np.maximum(nic_out, nic_in).max(-1),
    )
