"""Cluster descriptions for the communication simulator, and named presets with their sources.

Notation
    G: GPUs (ranks) per node.      N: nodes.
    bw: bytes per second, per direction (a link that moves 450 GB/s out and 450 GB/s in at the
        same time has ``bw = 450e9``). GB = 1e9 bytes.
    nominal   the spec sheet's line rate.
    achieved  what bulk copies reach on that link (NCCL's bus bandwidth, DeepEP's tables): the
              simulator's times use these.

Glossary
    intra-node link   the GPU's scale-up fabric (NVLink through NVSwitch, or PCIe peer-to-peer).
    inter-node link   the NIC(s) of the scale-out network (InfiniBand, Ethernet). With
                      ``nic_shared_per_node=False`` every GPU has its own NIC (DGX/HGX: one
                      ConnectX-7 per GPU); with ``True`` one NIC serves the whole node.
    phase             one collective (dispatch or combine) of one MoE layer.

Latency model (``CommLatency``; used by ``links.phase_time``)
    time of a phase = fixed cost of the transport's kernels (once per phase: launch, the
    handshake that tells peers how much is coming, the completion signal)
                    + max over GPUs and over their four link directions (NVLink out / in, NIC out / in) of
                      issue_s x messages on that link + bytes on that link / achieved bw.
    Messages to different peers overlap: only the per-message issue cost is serial, never a full
    latency per message (the previous model charged 4 us per message one after another: 992 us of
    its 1146 us at EP 256, where DeepEP measures 194 us). Which constants were fitted to a
    published measurement and which are assumed is written next to each; the calibration table
    (``calibration.py``, ``specmoe simulate --calibration``) shows how well the fitted ones do.

Every preset is a model of a real cluster, not a lower bound: within the calibration rows the
predictions are within +-25% of the published measurements, elsewhere they are estimates.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, get_args

__all__ = [
    "ClusterSpec",
    "CommLatency",
    "ComputeRates",
    "PresetName",
    "InterNodeRouting",
    "PRESETS",
    "cluster_preset",
]

PresetName = Literal["h800-ib", "h100-ib", "h200-ib", "b200-ib", "pcie-eth", "gloo-loopback"]

# How a message to another node reaches the network (see ClusterSpec.inter_node_routing).
InterNodeRouting = Literal["direct", "rail"]

_US = 1e-6
_GB = 1e9


@dataclass(frozen=True, kw_only=True)
class CommLatency:
    """Fixed and per-message costs of each transport's kernels (seconds).

    Attributes:
        nccl_a2a_intra_s: NCCL all-to-all (grouped send/recv), fixed cost when all peers share a node.
        nccl_a2a_inter_s: the same when the group spans nodes.
        nccl_issue_s: NCCL per-peer issue cost (one send/recv pair per peer, issued in a loop).
        ring_base_s: NCCL ring base latency (all-gather / reduce-scatter), per call.
        ring_step_intra_s: NCCL ring per-step latency over NVLink (P - N steps).
        ring_step_inter_s: NCCL ring per-step latency over the network (N - 1 steps).
        nvls_fixed_s: one multimem (NVLS) all-gather-v or reduce-scatter-v kernel, fixed cost.
        deepep_normal_intra_s: DeepEP high-throughput intranode kernels, fixed cost per phase
            (notify + copy kernel).
        deepep_normal_inter_s: DeepEP high-throughput internode kernels, fixed cost per phase.
        deepep_ll_dispatch_s: DeepEP low-latency dispatch, fixed cost.
        deepep_ll_combine_s: DeepEP low-latency combine, fixed cost.
        deepep_ll_issue_s: DeepEP low-latency per-message (per (token, expert) pair) issue cost.
        source: one line: where the constants come from.
    """

    nccl_a2a_intra_s: float
    nccl_a2a_inter_s: float
    nccl_issue_s: float
    ring_base_s: float
    ring_step_intra_s: float
    ring_step_inter_s: float
    nvls_fixed_s: float
    deepep_normal_intra_s: float
    deepep_normal_inter_s: float
    deepep_ll_dispatch_s: float
    deepep_ll_combine_s: float
    deepep_ll_issue_s: float
    source: str = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.name != "source" and not getattr(self, f.name) >= 0:
                raise ValueError(f"CommLatency.{f.name} must be >= 0 s, got {getattr(self, f.name)!r}")


@dataclass(frozen=True, kw_only=True)
class ComputeRates:
    """What one GPU computes and reads per second, for the attention roofline (``plan_cost.py``).

    Attributes:
        dense_flops_nominal: dense BF16 tensor-core FLOP/s from the datasheet (no sparsity).
        dense_flops: achieved FLOP/s on attention's GEMMs (nominal x an efficiency, stated).
        hbm_bw_nominal: HBM bytes/s from the datasheet.
        hbm_bw: achieved HBM bytes/s.
        launch_eager_s: one kernel launched from eager PyTorch (host submit cost; the GPU idles
            when kernels are shorter).
        launch_graph_s: one small kernel inside a replayed CUDA graph (launch gap + its run).
        source: one line: where the numbers come from.
    """

    dense_flops_nominal: float
    dense_flops: float
    hbm_bw_nominal: float
    hbm_bw: float
    launch_eager_s: float
    launch_graph_s: float
    source: str = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.name != "source" and not getattr(self, f.name) > 0:
                raise ValueError(f"ComputeRates.{f.name} must be > 0, got {getattr(self, f.name)!r}")


@dataclass(frozen=True, kw_only=True)
class ClusterSpec:
    """A homogeneous cluster: N nodes of G GPUs, an intra-node and an inter-node network.

    Attributes:
        name: for messages and tables.
        gpus_per_node: G; EP rank r lives on node r // G.
        nodes: N.
        nvlink_bw_bytes_per_s: achieved intra-node bandwidth per GPU per direction.
        nvlink_nominal_bytes_per_s: the spec sheet's figure (reported, not used for times).
        nic_bw_bytes_per_s: achieved inter-node bandwidth per direction, per GPU (or per node when
            ``nic_shared_per_node``).
        nic_nominal_bytes_per_s: the spec sheet's figure (reported only).
        latency: ``CommLatency`` of the transports.
        compute: ``ComputeRates`` for the plan charge and the attention roofline.
        nic_shared_per_node: whether the node's GPUs share one NIC.
        inter_node_routing: default NIC routing of NCCL all-to-all: "direct" (a GPU sends through
            its own NIC) or "rail" (NCCL's PXN on rail-optimised fabrics, the DGX/HGX default: a
            message from GPU s to GPU d on another node first moves over NVLink to the GPU of s's
            node with d's local index and leaves through that GPU's NIC). DeepEP's kernels route
            themselves (``dispatchers.py``). Needs per-GPU NICs for "rail".
        source: where the bandwidths come from (one line; the code comment has the detail).
    """

    name: str
    gpus_per_node: int
    nodes: int
    nvlink_bw_bytes_per_s: float
    nvlink_nominal_bytes_per_s: float
    nic_bw_bytes_per_s: float
    nic_nominal_bytes_per_s: float
    latency: CommLatency
    compute: ComputeRates
    nic_shared_per_node: bool = False
    inter_node_routing: str = "rail"
    source: str = ""

    def __post_init__(self) -> None:
        for name in ("gpus_per_node", "nodes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ClusterSpec({self.name}).{name} must be a positive int, got {value!r}")
        for name in ("nvlink_bw_bytes_per_s", "nic_bw_bytes_per_s", "nvlink_nominal_bytes_per_s",
                     "nic_nominal_bytes_per_s"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"ClusterSpec({self.name}).{name} must be > 0 bytes/s, got {value!r}")
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


# ---------------------------------------------------------------------------------------------
# Bandwidths. "Published" means a figure printed by the vendor or the kernel's maintainers.
#
# NVLink 4 (H100 / H200 SXM5): datasheets give 900 GB/s per GPU, bidirectional -> 450 per direction.
# Achieved: NCCL's maintainers state that NCCL reaches ~370 GB/s of effective NVLink bandwidth on
# H100 (bus bandwidth of non-allreduce collectives; NVIDIA/nccl-tests issue #212, 2024-05-06).
# H200 has the same NVLink 4 and ConnectX-7: no separate all-to-all figure was found; its NVLS
# all-reduce bus bandwidth (475 GB/s, nccl-tests issue #272) matches H100's (~480, issue #212).
_NVLINK4_NOMINAL = 450 * _GB
_NVLINK4_NCCL = 370 * _GB
# H800 SXM: NVLink 400 GB/s bidirectional -> 200 per direction. DeepEP's legacy docs state ~160 GB/s
# maximum; its own tables imply less for its kernels: intranode 153 / 158 GB/s count the 1/8 of
# copies that stay on the GPU, i.e. 134 / 138 GB/s on the wire. FITTED: 140 GB/s (calibration rows
# deepep-v1-normal-ep8-*, deepep-v1-ll-ep8-*).
_NVLINK_H800_NOMINAL = 200 * _GB
_NVLINK_H800 = 140 * _GB
# NVLink 5 (B200): 1.8 TB/s bidirectional -> 900 per direction. Achieved: ASSUMED at the H100
# ratio 370 / 450 -> 740 GB/s; DeepEP V2's SM100 EP 8 row (726 / 740 GB/s logical, self copies
# included) checks it (calibration rows deepep-v2-sm100-ep8-*).
_NVLINK5_NOMINAL = 900 * _GB
_NVLINK5 = 740 * _GB
# ConnectX-7 NDR 400 Gb/s per GPU: 50 GB/s per direction nominal. Achieved: NCCL's maintainers
# state 46-49 GB/s per NIC (nccl-tests issues #290 and #267); DeepEP's low-latency dispatch at
# EP 128 / 256 (pure RDMA, bandwidth-bound) gives 47.8. We use 48.
_CX7_NOMINAL = 400e9 / 8
_CX7 = 48 * _GB
# PCIe / Ethernet node: PCIe 4.0 x16 is 32 GB/s per direction raw; ASSUMED 25 GB/s achieved through
# a PCIe switch. One 100 GbE NIC (12.5 GB/s) SHARED by the node's 8 GPUs; ASSUMED 11 GB/s achieved.
_PCIE4_NOMINAL, _PCIE4 = 32 * _GB, 25 * _GB
_ETH_NOMINAL, _ETH = 100e9 / 8, 11 * _GB
# gloo on loopback, this CPU machine (2 cores shared, 4 gloo processes): measured by
#   python tools/calibrate_gloo.py --procs 4   (2026-11-28 23:25 UTC)
# least-squares fit time = alpha * (P - 1) + bytes_out / bw: alpha = 1.25e-4 s per message (serial:
# gloo issues one message after another, so it is the per-message issue cost here), bw = 7.48e8 B/s.
_GLOO_BW = 7.48e8
_GLOO_ALPHA = 1.25e-4

# ---------------------------------------------------------------------------------------------
# Latencies of the GPU transports.
#   NCCL ring (all-gather / reduce-scatter): NCCL's own tuning model, src/graph/tuning.cc of
#     NVIDIA/nccl at commit 5067397 (2026-06-11): base latency 6.6 us (ring, LL protocol), per-step
#     hardware latency 0.6 us over NVLink and 2.7 us over the network (LL); a ring of P ranks on N
#     nodes takes P - N NVLink steps and N - 1 network steps.
#   NCCL all-to-all: ASSUMED 10 us within a node (a user's nccl-tests alltoall_perf on 8 H20 in
#     deepseek-ai/DeepEP issue #303 shows ~10.5 us at the smallest sizes), 20 us across nodes, and
#     0.3 us per peer to issue its send/recv.
#   NVLS multimem kernels (Megatron 0.19 inference all-gather-v / reduce-scatter-v): ASSUMED 5 us
#     per kernel (one launch and two barrier rounds over NVLink).
#   DeepEP low-latency kernels: FITTED to deepseek-ai/DeepEP docs/legacy.md (commit b306af0) by
#     python tools/fit_calibration.py: measured time minus the model's bytes / bandwidth term (busiest
#     GPU, DeepEP-like routes) has median 28 us for dispatch (range 19-34 over EP 8 .. 256) and 30 us
#     for combine (16-60); we use the medians and no per-message cost: the residuals do not grow with
#     the messages (1024 per GPU at EP 256 cost no more than 512 at EP 16 beyond their bytes).
#   DeepEP normal kernels: ASSUMED 25 us intranode, 40 us internode (notify + copy kernels); the
#     published tables are large transfers (1-3 ms), so they do not pin these down.
_GPU_LATENCY = CommLatency(
    nccl_a2a_intra_s=10 * _US,
    nccl_a2a_inter_s=20 * _US,
    nccl_issue_s=0.3 * _US,
    ring_base_s=6.6 * _US,
    ring_step_intra_s=0.6 * _US,
    ring_step_inter_s=2.7 * _US,
    nvls_fixed_s=5 * _US,
    deepep_normal_intra_s=25 * _US,
    deepep_normal_inter_s=40 * _US,
    deepep_ll_dispatch_s=28 * _US,
    deepep_ll_combine_s=30 * _US,
    deepep_ll_issue_s=0.0,
    source="NCCL tuning.cc ring latencies; DeepEP legacy.md low-latency fit; NCCL a2a, NVLS, "
           "DeepEP normal fixed costs assumed",
)
# PCIe / Ethernet: ASSUMED 2x the GPU latencies within a node, TCP/RoCE 15 us per network phase.
_PCIE_LATENCY = dataclasses.replace(
    _GPU_LATENCY, nccl_a2a_intra_s=20 * _US, nccl_a2a_inter_s=40 * _US, nccl_issue_s=1 * _US,
    ring_step_intra_s=1.0 * _US, ring_step_inter_s=15 * _US,
    source="assumed (no published measurement used)",
)
_GLOO_LATENCY = CommLatency(
    nccl_a2a_intra_s=0.0, nccl_a2a_inter_s=0.0, nccl_issue_s=_GLOO_ALPHA, ring_base_s=0.0,
    ring_step_intra_s=_GLOO_ALPHA, ring_step_inter_s=_GLOO_ALPHA, nvls_fixed_s=_GLOO_ALPHA,
    deepep_normal_intra_s=0.0, deepep_normal_inter_s=0.0, deepep_ll_dispatch_s=0.0,
    deepep_ll_combine_s=0.0, deepep_ll_issue_s=_GLOO_ALPHA,
    source="measured: tools/calibrate_gloo.py --procs 4 (per-message cost, serial)",
)

# ---------------------------------------------------------------------------------------------
# Compute, for the attention roofline and the plan's launches.
#   Dense BF16 tensor FLOP/s and HBM bandwidth: NVIDIA datasheets (H100 / H800 SXM 989 TFLOP/s and
#   3.35 TB/s; H200 SXM 989 TFLOP/s and 4.8 TB/s; HGX B200 2.25 PFLOP/s dense and 8 TB/s; A100 PCIe
#   312 TFLOP/s and 1.94 TB/s for the PCIe preset). ASSUMED efficiencies: 60% of the tensor peak on
#   attention's GEMMs, 85% of HBM.
#   Launches: ~5 us per eager kernel launch (host submit; "4-6 us", susun-blog.com pegainfer part 3,
#   CUDA 13); 3.4 us per short kernel inside a replayed CUDA graph (NVIDIA's "Getting Started with
#   CUDA Graphs" blog: a ~2.9 us kernel took 3.4 us per kernel with a graph, 3.8 us with plain
#   stream launches; recalled figures, the page could not be re-read in this session).
_MFU, _HBM_EFF = 0.60, 0.85
_EAGER, _GRAPH = 5.0 * _US, 3.4 * _US


def _rates(flops: float, hbm: float, what: str) -> ComputeRates:
    return ComputeRates(
        dense_flops_nominal=flops, dense_flops=flops * _MFU, hbm_bw_nominal=hbm, hbm_bw=hbm * _HBM_EFF,
        launch_eager_s=_EAGER, launch_graph_s=_GRAPH,
        source=f"{what} datasheet; 60% tensor / 85% HBM efficiency assumed; launch costs from blogs",
    )


def _presets() -> dict[str, ClusterSpec]:
    hopper = _rates(989e12, 3.35e12, "H100/H800 SXM")
    h100 = ClusterSpec(
        name="h100-ib", gpus_per_node=8, nodes=1,
        nvlink_bw_bytes_per_s=_NVLINK4_NCCL, nvlink_nominal_bytes_per_s=_NVLINK4_NOMINAL,
        nic_bw_bytes_per_s=_CX7, nic_nominal_bytes_per_s=_CX7_NOMINAL,
        latency=_GPU_LATENCY, compute=hopper,
        source="NVLink 4 450 GB/s nominal, 370 achieved (NCCL maintainers); CX7 NDR 50 nominal, 48 achieved",
    )
    return {
        "h800-ib": dataclasses.replace(
            h100, name="h800-ib",
            nvlink_bw_bytes_per_s=_NVLINK_H800, nvlink_nominal_bytes_per_s=_NVLINK_H800_NOMINAL,
            source="H800 NVLink 200 GB/s nominal, 140 achieved (fitted to DeepEP's tables); CX7 48 achieved",
        ),
        "h100-ib": h100,
        "h200-ib": dataclasses.replace(
            h100, name="h200-ib", compute=_rates(989e12, 4.8e12, "H200 SXM"),
            source="H200: NVLink 4 and CX7 as H100 (450 / 370 GB/s, 50 / 48 GB/s); HBM 4.8 TB/s",
        ),
        "b200-ib": dataclasses.replace(
            h100, name="b200-ib",
            nvlink_bw_bytes_per_s=_NVLINK5, nvlink_nominal_bytes_per_s=_NVLINK5_NOMINAL,
            compute=_rates(2.25e15, 8.0e12, "HGX B200"),
            source="NVLink 5 900 GB/s nominal, 740 achieved (assumed at H100's ratio); CX7 48 achieved",
        ),
        "pcie-eth": ClusterSpec(
            name="pcie-eth", gpus_per_node=8, nodes=1,
            nvlink_bw_bytes_per_s=_PCIE4, nvlink_nominal_bytes_per_s=_PCIE4_NOMINAL,
            nic_bw_bytes_per_s=_ETH, nic_nominal_bytes_per_s=_ETH_NOMINAL,
            latency=_PCIE_LATENCY, compute=_rates(312e12, 1.94e12, "A100 PCIe"),
            nic_shared_per_node=True, inter_node_routing="direct",
            source="PCIe 4.0 peer 32 nominal / 25 assumed GB/s; one 100 GbE (12.5 / 11 GB/s) shared per node",
        ),
        "gloo-loopback": ClusterSpec(
            name="gloo-loopback", gpus_per_node=4, nodes=1,
            nvlink_bw_bytes_per_s=_GLOO_BW, nvlink_nominal_bytes_per_s=_GLOO_BW,
            nic_bw_bytes_per_s=_GLOO_BW, nic_nominal_bytes_per_s=_GLOO_BW,
            latency=_GLOO_LATENCY,
            compute=ComputeRates(dense_flops_nominal=1e11, dense_flops=1e11, hbm_bw_nominal=1e10,
                                 hbm_bw=1e10, launch_eager_s=10 * _US, launch_graph_s=10 * _US,
                                 source="assumed CPU figures (the roofline is not meaningful here)"),
            inter_node_routing="direct",
            source="measured: tools/calibrate_gloo.py --procs 4 on the project's CPU machine",
        ),
    }


def cluster_preset(name: str, *, nodes: int | None = None) -> ClusterSpec:
    """The preset called ``name`` (one of ``PresetName``), optionally with ``nodes`` nodes."""
    presets = _presets()
    if name not in presets:
        raise ValueError(
            f"unknown cluster preset {name!r}; choose one of {', '.join(get_args(PresetName))} "
            "or build a ClusterSpec"
        )
    spec = presets[name]
    return spec if nodes is None else spec.with_nodes(nodes)


PRESETS: dict[str, ClusterSpec] = _presets()  # keys checked against PresetName by the tests
