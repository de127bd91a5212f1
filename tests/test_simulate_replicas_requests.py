"""The simulator with redundant experts and with request placement (issue 15, items 3 and 4):
hand-worked routes and bytes, the same numbers as without replicas when there are none, and the
CLI's rows and refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from megatron_specmoe.artifacts.synthetic import SyntheticSpec, synthetic_trace
from megatron_specmoe.artifacts.traces import RoutingTrace
from megatron_specmoe.measure.measures import WireFormat
from megatron_specmoe.measure.replica_routes import routed_ranks
from megatron_specmoe.schedule.placement import ExpertPlacement
from megatron_specmoe.schedule.replicas import ReplicatedPlacement, replicas_to_arrays, replicate_layers
from megatron_specmoe.schedule.request_placement import trace_request_homes_from_scores
from megatron_specmoe.sim.cluster import cluster_preset
from megatron_specmoe.sim.compare import compare_dispatchers
from megatron_specmoe.sim.dispatchers import simulate_dispatcher
from megatron_specmoe.sim.inputs import oracle_expert_scores
from megatron_specmoe.sim.simulate import layer_bytes, route_counts
from megatron_specmoe.sim.wire import WireDtypes

# P = 2, E = 4, experts 0, 1 on rank 0 and 2, 3 on rank 1; one replica slot per rank: rank 0 also
# holds expert 2, rank 1 expert 0. Top-2, one layer, four tokens:
#   t0 home 0: experts 0, 2 -> both local (2 by its replica)        without replicas: 1 remote
#   t1 home 0: experts 1, 3 -> 3 remote (only on rank 1)             1 remote
#   t2 home 1: experts 0, 1 -> 0 local (replica), 1 remote           2 remote
#   t3 home 1: experts 2, 3 -> both local                            0 remote
# pairs [src, dst]: with replicas [[3, 1], [1, 3]], without [[2, 2], [2, 2]].
# H = 4 in bf16: a row is 8 B, a prob 4 B. alltoall: 12 B per remote pair on dispatch, 8 on combine:
# with replicas 2 remote pairs -> 24 + 16 = 40 B; without 4 -> 48 + 32 = 80 B.
EXPERTS = np.array([[0, 2], [1, 3], [0, 1], [2, 3]], dtype=np.int32)
HOME = np.array([0, 0, 1, 1])
BASE = ExpertPlacement.contiguous(4, 2)
REPS = ReplicatedPlacement(base=BASE, extra=((2,), (0,)), planned_load=(1.0, 1.0), policy="load")


def _ranks(rp: ReplicatedPlacement, experts, home):
    return routed_ranks(torch.as_tensor(experts.astype(np.int64)), torch.as_tensor(home),
                        torch.as_tensor(rp.route_table()), rp.slots_per_rank).numpy()


def test_hand_worked_replica_routes_pairs_and_bytes():
    trace = RoutingTrace(experts=EXPERTS[:, None, :], num_experts=4)
    home = HOME[:, None]
    with_r = route_counts(trace, [BASE], home, num_ranks=2, gpus_per_node=2, tokens_per_step=4, replicas=[REPS])
    without = route_counts(trace, [BASE], home, num_ranks=2, gpus_per_node=2, tokens_per_step=4)
    assert with_r.pairs[0, 0].tolist() == [[3, 1], [1, 3]]
    assert without.pairs[0, 0].tolist() == [[2, 2], [2, 2]]
    assert with_r.local_activation_rate() == 6 / 8 and without.local_activation_rate() == 4 / 8
    assert with_r.remote_pairs_per_token() == 2 / 4 and without.remote_pairs_per_token() == 4 / 4
    lb = layer_bytes(_ranks(REPS, EXPERTS, HOME), HOME, num_ranks=2,
                     wire=WireFormat(hidden_size=4, activation_bytes=2, prob_bytes=4), dispatcher="alltoall")
    assert lb.dispatch.tolist() == [[0, 12], [12, 0]] and lb.combine.tolist() == [[0, 8], [8, 0]]
    cluster = cluster_preset("h100-ib").for_ranks(2)
    cluster = type(cluster)(**{**cluster.__dict__, "gpus_per_node": 2, "nodes": 1})
    wire = WireDtypes(hidden_size=4)
    a2a_r = simulate_dispatcher("specmoe_alltoall", with_r, wire=wire, cluster=cluster, top_k=2).summary()
    a2a = simulate_dispatcher("specmoe_alltoall", without, wire=wire, cluster=cluster, top_k=2).summary()
    assert a2a_r["nvlink_bytes_per_layer"] == 40 and a2a["nvlink_bytes_per_layer"] == 80
    assert a2a_r["remote_pairs_per_token"] == 0.5 and a2a["remote_pairs_per_token"] == 1.0


@pytest.mark.parametrize("load, rank", [((5.0, 3.0, 1.0), 2), ((1.0, 3.0, 5.0), 0), ((2.0, 2.0, 2.0), 0)])
def test_remote_pairs_go_to_the_least_planned_load_copy(load, rank):
    # P = 3, E = 6 (two per rank), replicas: rank 0 holds 4, rank 1 holds 0, rank 2 holds 1. A token
    # at home on rank 1 using experts 4 (copies on ranks 2 and 0) and 0 (a copy on rank 1 itself).
    rp = ReplicatedPlacement(base=ExpertPlacement.contiguous(6, 3), extra=((4,), (0,), (1,)),
                             planned_load=load, policy="load")
    trace = RoutingTrace(experts=np.array([[[4, 0]]], dtype=np.int32), num_experts=6)
    c = route_counts(trace, [rp.base], np.array([[1]]), num_ranks=3, gpus_per_node=8, tokens_per_step=1,
                     replicas=[rp])
    expect = [0, 1, 0]
    expect[rank] += 1
    assert c.pairs[0, 0, 1].tolist() == expect


def test_replicas_without_slots_give_the_plain_numbers():
    trace = synthetic_trace(SyntheticSpec(tokens=512, layers=2, num_experts=16, topk=2, seed=3))
    scores = oracle_expert_scores(trace)
    placements = [ExpertPlacement.contiguous(16, 8)] * 2
    none = [ReplicatedPlacement(base=pl, extra=((),) * 8, planned_load=(0.0,) * 8, policy="load") for pl in placements]
    cmp = compare_dispatchers(trace, scores, ep=8, tp=8, cluster=cluster_preset("h200-ib"), hidden_size=64,
                              tokens_per_rank=8, plan_placements=placements, replicas=none,
                              dispatchers=["alltoall", "specmoe_alltoall", "specmoe_deepep_normal"])
    row = cmp.table_row()
    assert row["replicas"]["redundant_experts"] == 0
    for name in ("specmoe_alltoall", "specmoe_deepep_normal"):
        for key in ("local_activation_rate", "remote_pairs_per_token", "total_time_s", "nvlink_bytes_per_layer"):
            assert row["replicas"][name][key] == row[name][key]


def test_compare_with_replicas_at_the_plans_ep_only():
    trace = synthetic_trace(SyntheticSpec(tokens=1024, layers=2, num_experts=16, topk=2, seed=4))
    scores = oracle_expert_scores(trace)
    placements = [ExpertPlacement.contiguous(16, 8)] * 2
    reps = replicate_layers(placements, trace.experts, redundant=8, policy="load")
    kw = dict(cluster=cluster_preset("h200-ib"), hidden_size=64, tokens_per_rank=8, plan_placements=placements,
              replicas=reps, dispatchers=["alltoall", "specmoe_alltoall"])
    row = compare_dispatchers(trace, scores, ep=8, tp=8, **kw).table_row()
    rep = row["replicas"]
    assert (rep["redundant_experts"], rep["slots_per_rank"], rep["policy"]) == (8, 3, "load")
    mine, base = rep["specmoe_alltoall"], row["specmoe_alltoall"]
    assert mine["local_activation_rate"] >= base["local_activation_rate"] - 1e-9
    assert mine["vs_without_replicas"]["remote_pairs_per_token"] == pytest.approx(
        mine["remote_pairs_per_token"] / base["remote_pairs_per_token"])
    assert "alltoall" not in rep  # the baseline has no replicas
    other = compare_dispatchers(trace, scores, ep=16, tp=8, **kw).table_row()
    assert "per rank of EP 8" in other["replicas"]["skipped"]


def test_request_homes_from_scores_by_hand():
    rid = np.array([0, 0, 1, 1, 1, 1, 2, 2])
    # Prompts (first half): request 0 token 0, request 1 tokens 2-3, request 2 token 6.
    scores = np.zeros((8, 2), dtype=np.float32)
    scores[0] = [0.0, 1.0]
    scores[1] = [9.0, 0.0]  # not in request 0's prompt: ignored
    scores[2:4] = [1.0, 0.0]
    scores[6] = [0.0, 1.0]
    rr = trace_request_homes_from_scores(rid, scores, method="round_robin")
    assert rr.tolist() == [0, 0, 1, 1, 1, 1, 0, 0]
    gm = trace_request_homes_from_scores(rid, scores, method="group_mask")
    # Group (0, 1) matched one-to-one by affinity; request 2, alone in its group, takes its best rank.
    assert gm.tolist() == [1, 1, 0, 0, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="request placement method 'nearest'"):
        trace_request_homes_from_scores(rid, scores, method="nearest")


def test_compare_with_request_placement_reports_the_three_methods():
    trace = synthetic_trace(SyntheticSpec(tokens=4096, layers=2, num_experts=64, topk=4, request_length=64,
                                          p_topic=0.9, seed=5))
    scores = oracle_expert_scores(trace)
    kw = dict(cluster=cluster_preset("h200-ib"), hidden_size=64, tokens_per_rank=16,
              dispatchers=["alltoall", "specmoe_alltoall"], request_ids=trace.request_ids)
    row = compare_dispatchers(trace, scores, ep=16, tp=1, request_method="group_mask", **kw).table_row()
    req = row["request_placement"]
    assert set(req["by_method"]) == {"group_mask", "round_robin", "least_loaded"}
    rr, gm = req["by_method"]["round_robin"], req["by_method"]["group_mask"]
    # Rounds with every slot free: Megatron's least-loaded choice is round-robin here.
    assert req["by_method"]["least_loaded"] == rr
    assert gm["remote_nodes_per_token"] < rr["remote_nodes_per_token"]
    assert req["vs_round_robin"]["remote_nodes_per_token"] == pytest.approx(
        gm["remote_nodes_per_token"] / rr["remote_nodes_per_token"])
    assert row["specmoe_alltoall"]["local_activation_rate"] == gm["local_activation_rate"]
    with pytest.raises(ValueError, match=r"DP attention \(TP = 1\); got TP = 8"):
        compare_dispatchers(trace, scores, ep=16, tp=8, request_method="group_mask", **kw)


def _cli_trace(tmp_path, with_requests=True):
    from megatron_specmoe.artifacts.trace_io import write_trace

    trace = synthetic_trace(SyntheticSpec(tokens=512, layers=2, num_experts=8, topk=2, request_length=16, seed=6))
    if not with_requests:
        trace = RoutingTrace(experts=trace.experts, num_experts=8)
    path = tmp_path / ("t.npz" if with_requests else "plain.npz")
    write_trace(trace, path)
    return trace, path


def test_cli_simulate_plan_with_replicas(tmp_path, capsys):
    from megatron_specmoe.artifacts.plan_folder import make_plan, save_plan
    from megatron_specmoe.cli.main import main

    trace, path = _cli_trace(tmp_path)
    placements = [ExpertPlacement.contiguous(8, 4)] * 2
    reps = replicate_layers(placements, trace.experts, redundant=4, policy="load")
    plan = make_plan(num_layers=2, num_experts=8, topk=2, ep_size=4, placements=placements,
                     arrays=replicas_to_arrays(reps), notes={"redundant_experts": 4, "replica_policy": "load"})
    save_plan(plan, tmp_path / "plan")
    out = tmp_path / "s.json"
    assert main(["simulate", "--traces", str(path), "--plan", str(tmp_path / "plan"), "--ep", "4,8",
                 "--tokens-per-rank", "8", "--hidden", "16", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "specmoe a2a with 4 replicas (load): LAR" in text
    data = json.loads(out.read_text())
    assert data["redundant_experts"] == 4
    four, eight = data["rows"]
    assert four["replicas"]["specmoe_alltoall"]["local_activation_rate"] >= 0.0
    assert "per rank of EP 4" in eight["replicas"]["skipped"]
    assert main(["simulate", "--traces", str(path), "--plan", str(tmp_path / "plan"), "--ep", "4", "--tp", "1",
                 "--tokens-per-rank", "8", "--request-placement", "affinity"]) == 2
    assert "are not simulated together" in capsys.readouterr().err


def test_cli_simulate_request_placement_and_refusals(tmp_path, capsys):
    from megatron_specmoe.cli.main import main

    _, path = _cli_trace(tmp_path)
    out = tmp_path / "r.json"
    common = ["simulate", "--traces", str(path), "--ep", "8,16", "--tokens-per-rank", "8", "--hidden", "16"]
    assert main(common + ["--tp", "1", "--request-placement", "group_mask", "--json", str(out)]) == 0
    assert "requests group_mask / round_robin: remote nodes" in capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert rows[1]["request_placement"]["by_method"]["group_mask"]["remote_nodes_per_token"] is not None
    assert main(common + ["--request-placement", "group_mask"]) == 2
    assert "--request-placement models DP attention (TP = 1" in capsys.readouterr().err
    assert main(common + ["--tp", "1", "--request-placement", "nearest"]) == 2
    assert "--request-placement 'nearest' is not a method" in capsys.readouterr().err
    _, plain = _cli_trace(tmp_path, with_requests=False)
    assert main(["simulate", "--traces", str(plain), "--num-experts", "8", "--ep", "8", "--tp", "1",
                 "--tokens-per-rank", "8", "--request-placement", "round_robin"]) == 1  # a data error
    assert "needs traces with request ids" in capsys.readouterr().err
