"""Dispatcher models on hand-worked cases: DeepEP's per-node RDMA + NVLink forwarding, per-pair
low-latency messages, the inference all-gather, wire bytes, the plan charge and the roofline."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from megatron_specmoe.artifacts.traces import RoutingTrace
from megatron_specmoe.schedule.placement import ExpertPlacement
from megatron_specmoe.sim.cluster import PRESETS, ClusterSpec, CommLatency, cluster_preset
from megatron_specmoe.sim.dispatchers import not_applicable, simulate_dispatcher
from megatron_specmoe.sim.plan_cost import PlanCharge, attention_roofline, plan_time
from megatron_specmoe.sim.simulate import route_counts
from megatron_specmoe.sim.synthetic import synthetic_routes
from megatron_specmoe.sim.wire import WireDtypes, row_bytes

_ZERO = CommLatency(**{f: 0.0 for f in CommLatency.__dataclass_fields__ if f != "source"})
# 2 nodes x 2 GPUs; NVLink 4 B/s, NIC 2 B/s per direction.
TINY = ClusterSpec(name="tiny", gpus_per_node=2, nodes=2, nvlink_bw_bytes_per_s=4.0,
                   nvlink_nominal_bytes_per_s=4.0, nic_bw_bytes_per_s=2.0, nic_nominal_bytes_per_s=2.0,
                   latency=_ZERO, compute=PRESETS["h100-ib"].compute, inter_node_routing="direct")
# One token at home on rank 0, top-3 experts 1, 2, 3 (expert e on rank e): rank 1 is on its node,
# ranks 2 and 3 on node 1. H = 128 bf16: a row is 256 B; DeepEP's metadata 3 x 12 = 36 B per copy.
WIRE = WireDtypes(hidden_size=128, dispatch="bf16", combine="bf16")


def _counts(experts=((1, 2, 3),), home=(0,)):
    trace = RoutingTrace(experts=np.array(experts, dtype=np.int32)[:, None, :], num_experts=4)
    return route_counts(trace, [ExpertPlacement.contiguous(4, 4)], np.array(home)[:, None], num_ranks=4,
                        gpus_per_node=2, tokens_per_step=len(home))


def test_wire_rows_match_deepeps_byte_counts():
    assert row_bytes("fp8", 7168) == 7392 and row_bytes("bf16", 7168) == 14336
    assert WireDtypes(hidden_size=7168, dispatch="fp8").ll_dispatch_message == 7408
    with pytest.raises(ValueError, match="--combine-dtype must be one of"):
        WireDtypes(hidden_size=128, combine="fp4")


def test_deepep_normal_sends_one_rdma_row_per_node_and_forwards_over_nvlink():
    counts = _counts()
    assert counts.node_copies[0, 0].tolist() == [[1, 1], [0, 0], [0, 0], [0, 0]]
    res = simulate_dispatcher("deepep_normal", counts, wire=WIRE, cluster=TINY, top_k=3)
    per = 256 + 36
    # RDMA: rank 0 -> its rail peer on node 1 (rank 2) once for experts 2 and 3.
    assert res.dispatch.nic_bytes[0, 0] == per
    # NVLink: 0 -> 1 on its own node; rank 2 forwards to 3 (the copy for 2 is already there).
    assert res.dispatch.nvlink_bytes[0, 0] == 2 * per
    assert res.dispatch.rank_time_s[0, 0].tolist() == [per / 2, per / 4, per / 2, per / 4]
    # Combine runs backwards with the bare bf16 row: 3 -> 2 and 1 -> 0 over NVLink, 2 -> 0 by RDMA.
    assert res.combine.nic_bytes[0, 0] == 256 and res.combine.nvlink_bytes[0, 0] == 512
    assert res.combine.rank_time_s[0, 0].tolist() == [128.0, 64.0, 128.0, 64.0]
    # The same routes on Megatron's alltoall: one row + prob per pair, two rows cross the NIC.
    a2a = simulate_dispatcher("alltoall", counts, wire=WIRE, cluster=TINY, top_k=3)
    assert a2a.dispatch.nic_bytes[0, 0] == 2 * (256 + 4)


def test_deepep_ll_sends_every_pair_as_a_message_through_the_senders_nic():
    latency = dataclasses.replace(_ZERO, deepep_ll_issue_s=1.0, deepep_ll_dispatch_s=7.0)
    res = simulate_dispatcher("deepep_ll", _counts(), wire=WIRE, cluster=dataclasses.replace(TINY, latency=latency),
                              top_k=3)
    msg = 256 + 16
    assert res.dispatch.nic_bytes[0, 0] == 2 * msg  # pairs to ranks 2 and 3, not de-duplicated
    # Rank 0's NIC: 2 messages (issue 1 s each) + 544 B / 2 B/s; fixed 7 s once.
    assert res.dispatch.time_s[0, 0] == 7.0 + 2 + 2 * msg / 2


def test_allgather_inference_moves_every_token_to_every_rank():
    counts = _counts(experts=((1, 2, 3), (0, 1, 2), (0, 2, 3), (0, 1, 3)), home=(0, 1, 2, 3))
    latency = dataclasses.replace(_ZERO, ring_base_s=1.0, ring_step_intra_s=10.0, ring_step_inter_s=100.0)
    res = simulate_dispatcher("allgather_inference", counts, wire=WIRE, cluster=dataclasses.replace(TINY, latency=latency),
                              top_k=3)
    x = 256 + 3 * (4 + 8)  # hidden row + fp32 probs + int64 routing map per token
    # Each GPU takes in 3x: (P - G) x / G = x through its NIC, the rest (2x) over NVLink.
    ring = 1.0 + 2 * 10.0 + 1 * 100.0  # P - N NVLink steps, N - 1 network steps
    assert res.dispatch.time_s[0, 0] == 3 * ring + max(2 * x / 4, x / 2)
    assert res.combine.time_s[0, 0] == ring + max(2 * 256 / 4, 256 / 2)
    assert res.dispatch.nic_bytes[0, 0] == 4 * x
    assert not_applicable("allgather_inference_nvls", num_ranks=4, gpus_per_node=2).startswith("NVLS multimem")
    with pytest.raises(ValueError, match="NVLS multimem needs one NVLink domain"):
        simulate_dispatcher("allgather_inference_nvls", counts, wire=WIRE, cluster=TINY, top_k=3)
    one_node = dataclasses.replace(TINY, gpus_per_node=4, nodes=1)
    counts4 = route_counts(RoutingTrace(experts=np.array([[[1, 2, 3]]] * 4, dtype=np.int32), num_experts=4),
                           [ExpertPlacement.contiguous(4, 4)], np.arange(4)[:, None], num_ranks=4,
                           gpus_per_node=4, tokens_per_step=4)
    nvls = simulate_dispatcher("allgather_inference_nvls", counts4, wire=WIRE, cluster=one_node, top_k=3)
    assert nvls.dispatch.time_s[0, 0] == 3 * x / 4  # one kernel; every GPU takes in 3 x over NVLink


def test_deepep_normal_beats_alltoall_across_nodes_on_deepseek_like_routes():
    # 256 experts, top-8, 4 of 8 groups, EP 32 on h800-ib: one RDMA row per node instead of per pair.
    trace = synthetic_routes(num_tokens=32 * 64, num_groups=8, top_groups=4)
    counts = route_counts(trace, [ExpertPlacement.contiguous(256, 32)], (np.arange(32 * 64) // 64)[:, None],
                          num_ranks=32, gpus_per_node=8, tokens_per_step=32 * 64)
    wire = WireDtypes(hidden_size=7168, dispatch="fp8", combine="bf16")
    cluster = cluster_preset("h800-ib").for_ranks(32)
    t = {n: simulate_dispatcher(n, counts, wire=wire, cluster=cluster, top_k=8) for n in ("alltoall", "deepep_normal")}
    assert t["deepep_normal"].dispatch.nic_bytes[0, 0] < 0.6 * t["alltoall"].dispatch.nic_bytes[0, 0]
    assert t["deepep_normal"].layer_time_s[0, 0] < t["alltoall"].layer_time_s[0, 0]


def test_plan_charge_and_attention_roofline():
    h200 = cluster_preset("h200-ib")
    decode = attention_roofline(hidden_size=4096, tokens_per_rank=64, tp=1, cluster=h200, phase="decode", context=4096)
    # Mixtral shape: 32 heads, 8 KV heads of 128. KV cache 64 x 4096 x 2 x 1024 x 2 B dominates.
    assert decode.bound == "memory" and decode.bytes > 64 * 4096 * 2 * 1024 * 2
    assert decode.time_s == pytest.approx(decode.bytes / h200.compute.hbm_bw)
    prefill = attention_roofline(hidden_size=4096, tokens_per_rank=4096, tp=1, cluster=h200, phase="prefill",
                                 context=4096)
    assert prefill.bound == "compute" and prefill.time_s == pytest.approx(prefill.flops / h200.compute.dense_flops)
    graph = PlanCharge(kernels=16, launch="graph", overlap=True)
    assert plan_time(graph, h200, attention_s=1e-3) == (pytest.approx(16 * 3.4e-6), 0.0)
    total, exposed = plan_time(graph, h200, attention_s=10e-6)
    assert exposed == pytest.approx(total - 10e-6)
    eager = PlanCharge(kernels=16, launch="eager", overlap=True)
    assert plan_time(eager, h200, attention_s=1.0) == (pytest.approx(80e-6), pytest.approx(80e-6))
    assert plan_time(PlanCharge(kernels=16, overlap=False), h200, attention_s=1.0)[1] == pytest.approx(16 * 3.4e-6)
    with pytest.raises(ValueError, match="--plan-kernels must be an int >= 0"):
        PlanCharge(kernels=-1)
    with pytest.raises(ValueError, match="--plan-launch must be one of graph, eager"):
        PlanCharge(launch="lazy")


def test_synthetic_routes_follow_the_group_limit():
    trace = synthetic_routes(num_tokens=512, num_groups=8, top_groups=4, seed=1)
    groups = trace.experts[:, 0] // 32
    assert max(len(set(g)) for g in groups.tolist()) == 4
    assert all(len(set(e)) == 8 for e in trace.experts[:, 0].tolist())  # top-8 distinct experts
    with pytest.raises(ValueError, match="hold fewer than top_k=8"):
        synthetic_routes(num_tokens=4, num_groups=64, top_groups=1)


def test_dispatcher_registry_matches_its_literals():
    from typing import get_args

    from megatron_specmoe.sim.dispatchers import DISPATCHERS, DispatcherName, Routes, Transport, check_dispatcher

    assert set(DISPATCHERS) == set(get_args(DispatcherName))
    for name, model in DISPATCHERS.items():
        assert model.name == name and model.transport in get_args(Transport) and model.routes in get_args(Routes)
        assert model.runs_in in ("megatron", "specmoe", "model only")
        assert model.routes == ("specmoe" if name.startswith("specmoe_") else "baseline")
    # Only specmoe on Megatron's all-to-all runs in this package today.
    assert [n for n, m in DISPATCHERS.items() if m.runs_in == "specmoe"] == ["specmoe_alltoall"]
    with pytest.raises(ValueError, match="unknown dispatcher 'dedup'; choose one of alltoall, deepep_normal"):
        check_dispatcher("dedup")
