"""Cluster descriptions for the communication simulator (``simulate.py``), and named presets.

Notation
    G: GPUs (ranks) per node.      N: nodes.
    bw: bytes per second, per direction (a link that moves 450 GB/s out and 450 GB/s in at the
        same time has ``bw = 450e9``).
    alpha: seconds of fixed cost per message (one message = one (source, destination) pair of a
        collective that carries at least one byte).

Glossary
    intra-node link   the GPU's scale-up fabric (NVLink through NVSwitch, or PCIe peer-to-peer);
                      ``nvlink_bw_bytes_per_s`` is what one GPU can push out (and pull in) over it.
    inter-node link   the NIC(s) of the scale-out network (InfiniBand, Ethernet). With
                      ``nic_shared_per_node=False`` every GPU has its own NIC of
                      ``nic_bw_bytes_per_s`` (DGX/HGX H100/H200: one ConnectX-7 per GPU). With
                      ``True`` one NIC of ``nic_bw_bytes_per_s`` serves the whole node.

Every constant in ``PRESETS`` names its source. Bandwidths from spec sheets are *nominal* peaks;
an all-to-all reaches less (NCCL's alltoall bus bandwidth on H100 is typically 70-85% of NVLink
peak). The simulator's times are therefore optimistic lower bounds; their ratios (specmoe vs
alltoall vs dedup) are what the README reports. Latencies (alpha) of the GPU presets are
assumptions of the right order, not spec-sheet values: measure yours with nccl-tests
``alltoall_perf`` and build a ``ClusterSpec`` by hand.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, get_args

__all__ = ["ClusterSpec", "PresetName", "InterNodeRouting", "PRESETS", "cluster_preset"]

PresetName = Literal["h100-ib", "h200-ib", "pcie-eth", "gloo-loopback"]

# How a message to another node reaches the network (see ClusterSpec.inter_node_routing).
InterNodeRouting = Literal["direct", "rail"]


@dataclass(frozen=True, kw_only=True)
class ClusterSpec:
    """A homogeneous cluster: N nodes of G GPUs, an intra-node and an inter-node network.

    Attributes:
        name: for messages and tables.
        gpus_per_node: G; EP rank r lives on node r // G.
        nodes: N.
        nvlink_bw_bytes_per_s: intra-node bandwidth per GPU per direction.
        nic_bw_bytes_per_s: inter-node bandwidth per direction, per GPU (or per node when
            ``nic_shared_per_node``).
        intra_alpha_s: fixed cost of one intra-node message, seconds.
        inter_alpha_s: fixed cost of one inter-node message, seconds.
        nic_shared_per_node: whether the node's GPUs share one NIC (see the glossary).
        inter_node_routing: "direct": a GPU sends its inter-node messages through its own NIC.
            "rail": NCCL's PXN on rail-optimised fabrics (DGX/HGX default for all-to-all): a
            message from GPU s to GPU d on another node first moves over NVLink to the GPU of s's
            node with d's local index, and leaves through that GPU's NIC, so NIC load follows the
            destination's local index. Needs per-GPU NICs and full nodes.
        source: where the constants come from (one line; the code comment has the detail).
    """

    name: str
    gpus_per_node: int
    nodes: int
    nvlink_bw_bytes_per_s: float
    nic_bw_bytes_per_s: float
    intra_alpha_s: float
    inter_alpha_s: float
    nic_shared_per_node: bool = False
    inter_node_routing: str = "direct"
    source: str = ""

    def __post_init__(self) -> None:
        for name in ("gpus_per_node", "nodes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ClusterSpec({self.name}).{name} must be a positive int, got {value!r}")
        for name in ("nvlink_bw_bytes_per_s", "nic_bw_bytes_per_s"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(
                    f"ClusterSpec({self.name}).{name} must be > 0 bytes/s, got {value!r}"
                )
        if self.inter_node_routing not in get_args(InterNodeRouting):
            raise ValueError(
                f"ClusterSpec({self.name}).inter_node_routing must be one of "
                f"{list(get_args(InterNodeRouting))}, got {self.inter_node_routing!r}"
            )
        if self.inter_node_routing == "rail" and self.nic_shared_per_node:
            raise ValueError(
                f"ClusterSpec({self.name}): inter_node_routing='rail' needs one NIC per GPU; "
                "it cannot be combined with nic_shared_per_node=True"
            )
        for name in ("intra_alpha_s", "inter_alpha_s"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"ClusterSpec({self.name}).{name} must be >= 0 s, got {value!r}")

    @property
    def num_gpus(self) -> int:
        return self.gpus_per_node * self.nodes

    def node_of_rank(self, rank: int) -> int:
        return rank // self.gpus_per_node

    def with_nodes(self, nodes: int) -> "ClusterSpec":
        """The same cluster with ``nodes`` nodes."""
        return dataclasses.replace(self, nodes=nodes)

    def for_ranks(self, num_ranks: int) -> "ClusterSpec":
        """The same cluster with just enough nodes for ``num_ranks`` ranks (at least one)."""
        return self.with_nodes(max(1, -(-num_ranks // self.gpus_per_node)))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


_GB = 1e9

# NVLink 4 (H100 SXM5 and H200 SXM5): NVIDIA's H100 and H200 datasheets give "NVLink: 900 GB/s"
# per GPU, which is the bidirectional total over 18 links -> 450 GB/s per direction.
_NVLINK4_PER_DIRECTION = 450 * _GB
# ConnectX-7 NDR InfiniBand: 400 Gb/s per port (NVIDIA ConnectX-7 product brief); DGX H100 / DGX H200
# pair each GPU with one ConnectX-7 port for compute traffic -> 400e9 / 8 = 50 GB/s per GPU per
# direction.
_CX7_NDR_PER_GPU = 400e9 / 8
# Latencies: ASSUMED, not from a spec sheet. NVLink peer-to-peer one-way latency is on the order of
# 1-2 us and IB RDMA about 1-2 us on the wire plus NCCL proxy overhead; we charge 2 us per
# intra-node message and 4 us per inter-node message, issued one after another by each rank.
_GPU_INTRA_ALPHA = 2e-6
_GPU_INTER_ALPHA = 4e-6

# PCIe / Ethernet cluster: PCIe 4.0 x16 is 32 GB/s per direction raw (PCI-SIG), ~25 GB/s achievable
# GPU peer-to-peer through a PCIe switch; 100 GbE = 100e9 / 8 = 12.5 GB/s per direction, ONE NIC
# SHARED by the node's 8 GPUs (a typical commodity server). Latencies ASSUMED: 5 us per PCIe peer
# message, 15 us per message over TCP/RoCE Ethernet.
_PCIE4_PEER = 25 * _GB
_ETH_100G = 100e9 / 8

# gloo on loopback, this CPU machine (2 cores shared, 4 gloo processes): measured by
#   /work/venvs/mc016/bin/python tools/calibrate_gloo.py --procs 4
# on 2026-11-28 23:25 UTC (see that tool): all_to_all_single, least-squares fit of
# time = alpha * (P - 1) + bytes_out / bw over messages of 1 KiB .. 2 MiB gave alpha = 1.25e-4 s,
# bw = 7.48e8 B/s (medians 6.9e-4 s at 1 KiB, 9.0e-3 s at 2 MiB per message). The machine is shared,
# so expect +-30%. One "node" of 4 ranks: every message is intra-node; the NIC fields repeat it.
_GLOO_BW = 7.48e8
_GLOO_ALPHA = 1.25e-4


def _presets() -> dict[str, ClusterSpec]:
    h100 = ClusterSpec(
        name="h100-ib",
        gpus_per_node=8,
        nodes=1,
        nvlink_bw_bytes_per_s=_NVLINK4_PER_DIRECTION,
        nic_bw_bytes_per_s=_CX7_NDR_PER_GPU,
        intra_alpha_s=_GPU_INTRA_ALPHA,
        inter_alpha_s=_GPU_INTER_ALPHA,
        source="NVIDIA H100 datasheet (NVLink 900 GB/s bidir), ConnectX-7 400 Gb/s per GPU; alpha assumed",
    )
    return {
        "h100-ib": h100,
        # H200 SXM has the same NVLink 4 and the same ConnectX-7 networking as H100 SXM, so its
        # communication constants are identical; it differs in HBM (141 GB, 4.8 TB/s), which a
        # communication model does not see.
        "h200-ib": dataclasses.replace(
            h100,
            name="h200-ib",
            source="NVIDIA H200 datasheet (NVLink 900 GB/s bidir), ConnectX-7 400 Gb/s per GPU; alpha assumed",
        ),
        "pcie-eth": ClusterSpec(
            name="pcie-eth",
            gpus_per_node=8,
            nodes=1,
            nvlink_bw_bytes_per_s=_PCIE4_PEER,
            nic_bw_bytes_per_s=_ETH_100G,
            intra_alpha_s=5e-6,
            inter_alpha_s=15e-6,
            nic_shared_per_node=True,
            source="PCIe 4.0 x16 peer ~25 GB/s, one 100 GbE NIC (12.5 GB/s) shared per node; alpha assumed",
        ),
        "gloo-loopback": ClusterSpec(
            name="gloo-loopback",
            gpus_per_node=4,
            nodes=1,
            nvlink_bw_bytes_per_s=_GLOO_BW,
            nic_bw_bytes_per_s=_GLOO_BW,
            intra_alpha_s=_GLOO_ALPHA,
            inter_alpha_s=_GLOO_ALPHA,
            source="measured: tools/calibrate_gloo.py --procs 4 on the project's CPU machine",
        ),
    }


PRESETS: dict[str, ClusterSpec] = _presets()  # keys checked against PresetName by the tests


def cluster_preset(name: str, *, nodes: int | None = None) -> ClusterSpec:
    """The preset called ``name`` (one of ``PresetName``), optionally with ``nodes`` nodes."""
    if name not in PRESETS:
        raise ValueError(
            f"unknown cluster preset {name!r}; choose one of {', '.join(get_args(PresetName))} "
            "or build a ClusterSpec"
        )
    spec = PRESETS[name]
    return spec if nodes is None else spec.with_nodes(nodes)
