"""The cluster simulator: hand-worked bytes and times, dispatcher invariants, presets, errors."""

from __future__ import annotations

import dataclasses
from typing import get_args

import numpy as np
import pytest

from megatron_specmoe.sim.cluster import PRESETS, ClusterSpec, CommLatency, PresetName, cluster_preset
from megatron_specmoe.measure.measures import WireFormat
from megatron_specmoe.schedule.placement import ExpertPlacement
from megatron_specmoe.sim.dispatchers import simulate_dispatcher
from megatron_specmoe.sim.links import direct_loads, phase_time
from megatron_specmoe.sim.simulate import (
    ModelShape,
    ParallelLayout,
    assert_bytes_match,
    expert_ranks,
    layer_bytes,
    route_counts,
)
from megatron_specmoe.sim.wire import WireDtypes
from megatron_specmoe.sim.inputs import (
    contiguous_home_ranks,
    layer_rank_scores,
    oracle_expert_scores,
    shuffled_home_ranks,
    split_experts,
    split_placement,
)
from megatron_specmoe.artifacts.traces import RoutingTrace

# The hand-worked case: 2 nodes x 2 GPUs (P = 4), E = 8 experts, 2 per rank (expert e on rank e // 2),
# top-2, 4 tokens, token t at home on rank t. H = 2 in bf16: a row is 4 bytes; a prob is 4 bytes.
#   t0 home 0: experts 0, 1 -> rank 0 twice           (2 local pairs)
#   t1 home 1: experts 4, 5 -> rank 2 twice           (2 inter-node pairs, 1 copy)
#   t2 home 2: experts 0, 7 -> rank 0, rank 3         (1 inter pair, 1 intra pair)
#   t3 home 3: experts 6, 5 -> rank 3 (local), rank 2 (1 intra pair)
EXPERTS = np.array([[0, 1], [4, 5], [0, 7], [6, 5]], dtype=np.int32)
HOME = np.array([0, 1, 2, 3])
WIRE = WireFormat(hidden_size=2, activation_bytes=2, prob_bytes=4)
_ZERO_LATENCY = CommLatency(**{f: 0.0 for f in CommLatency.__dataclass_fields__ if f != "source"})
TINY = ClusterSpec(
    name="tiny",
    gpus_per_node=2,
    nodes=2,
    nvlink_bw_bytes_per_s=4.0,
    nvlink_nominal_bytes_per_s=4.0,
    nic_bw_bytes_per_s=2.0,
    nic_nominal_bytes_per_s=2.0,
    latency=_ZERO_LATENCY,
    compute=PRESETS["h100-ib"].compute,
    inter_node_routing="direct",
)


def _time(sent, cluster, **kw):
    """The old alpha-beta case: 1 s per NVLink message, 10 s per NIC message, no fixed cost."""
    return phase_time(direct_loads(sent, cluster, **kw), cluster, fixed_s=0.0, nvl_issue_s=1.0, nic_issue_s=10.0)


def _ranks():
    return expert_ranks(EXPERTS, ExpertPlacement.contiguous(8, 4))


def _split(sent: np.ndarray, cluster: ClusterSpec) -> tuple[int, int]:
    t = _time(sent, cluster, routing="direct")
    return int(t.nvlink_bytes), int(t.nic_bytes)


def test_hand_worked_pairs_and_bytes():
    lb = layer_bytes(_ranks(), HOME, num_ranks=4, wire=WIRE, dispatcher="alltoall")
    assert lb.pairs.tolist() == [[2, 0, 0, 0], [0, 0, 2, 0], [1, 0, 0, 1], [0, 0, 1, 1]]
    # 8 bytes per dispatched pair (4 row + 4 prob), 4 per combined pair; diagonal never on the wire.
    assert lb.dispatch.tolist() == [[0, 0, 0, 0], [0, 0, 16, 0], [8, 0, 0, 8], [0, 0, 8, 0]]
    assert lb.combine.tolist() == [[0, 0, 0, 0], [0, 0, 8, 0], [4, 0, 0, 4], [0, 0, 4, 0]]
    assert _split(lb.dispatch, TINY) == (16, 24)  # intra: 2->3, 3->2; inter: 1->2 (x2), 2->0
    assert _split(lb.combine, TINY) == (8, 12)


def test_hand_worked_deepep_normal_sends_one_row_per_destination():
    lb = layer_bytes(_ranks(), HOME, num_ranks=4, wire=WIRE, dispatcher="deepep_normal")
    # t1's two experts on rank 2 travel as one 4-byte row plus two 4-byte probs = 12 bytes.
    assert lb.dispatch.tolist() == [[0, 0, 0, 0], [0, 0, 12, 0], [8, 0, 0, 8], [0, 0, 8, 0]]
    assert lb.combine.tolist() == [[0, 0, 0, 0], [0, 0, 4, 0], [4, 0, 0, 4], [0, 0, 4, 0]]
    assert _split(lb.dispatch, TINY) == (16, 20)
    assert _split(lb.combine, TINY) == (8, 8)


def test_hand_worked_times():
    # Dispatch: rank 1 sends 16 B to rank 2 over the NIC: 10 + 16/2 = 18 s; rank 2 receives the
    # same (18 s); every other link is cheaper (rank 2 -> 0: 10 + 8/2 = 14; NVLink: 1 + 8/4 = 3).
    # Combine (transposed): rank 2 -> 1: 10 + 8/2 = 14 s is the slowest.
    lb = layer_bytes(_ranks(), HOME, num_ranks=4, wire=WIRE, dispatcher="alltoall")
    dispatch = _time(lb.dispatch, TINY)
    assert dispatch.rank_time_s.tolist() == [14.0, 18.0, 18.0, 3.0]
    assert dispatch.time_s == 18.0
    assert _time(lb.combine.T, TINY).time_s == 14.0
    # A fixed cost is paid once per phase, not per message.
    fixed = phase_time(direct_loads(lb.dispatch, TINY), TINY, fixed_s=5.0, nvl_issue_s=1.0, nic_issue_s=10.0)
    assert fixed.time_s == 23.0


def test_alltoall_model_charges_two_fixed_costs_on_dispatch():
    # The same case through the dispatcher model: bytes 8 per dispatched pair (row 4 + prob 4).
    trace = RoutingTrace(experts=EXPERTS[:, None, :], num_experts=8)
    counts = route_counts(trace, [ExpertPlacement.contiguous(8, 4)], HOME[:, None], num_ranks=4,
                          gpus_per_node=2, tokens_per_step=4)
    latency = dataclasses.replace(_ZERO_LATENCY, nccl_a2a_inter_s=100.0, nccl_issue_s=1.0)
    cluster = dataclasses.replace(TINY, latency=latency)
    wire = WireDtypes(hidden_size=2, dispatch="bf16", combine="bf16")
    res = simulate_dispatcher("alltoall", counts, wire=wire, cluster=cluster, top_k=2)
    # rank 1 -> 2: 1 message (issue 1 s) + 16 B / 2 = 9 s; count exchange + all-to-all: 2 x 100 s.
    assert res.dispatch.time_s[0, 0] == 209.0
    assert res.combine.time_s[0, 0] == 100.0 + 1.0 + 8 / 2
    assert res.local_activation_rate == 3 / 8
    assert res.summary()["inter_node_bytes_per_layer"] == 24 + 12


def test_shared_nic_adds_the_nodes_traffic():
    sent = np.zeros((4, 4), dtype=np.int64)
    sent[0, 2] = sent[1, 3] = 4  # both GPUs of node 0 send 4 B to node 1
    per_gpu = _time(sent, TINY)
    shared = _time(sent, dataclasses.replace(TINY, nic_shared_per_node=True))
    assert per_gpu.time_s == 10 + 4 / 2
    assert shared.time_s == 2 * 10 + 8 / 2  # one NIC: two messages, 8 bytes


def test_deepep_normal_never_sends_more_than_alltoall():
    rng = np.random.default_rng(0)
    for trial in range(20):
        num_ranks = int(rng.choice([2, 4, 8]))
        num_experts = num_ranks * int(rng.integers(1, 4))
        topk = int(rng.integers(1, min(4, num_experts) + 1))
        experts = np.stack([rng.choice(num_experts, topk, replace=False) for _ in range(64)])
        placement = ExpertPlacement(
            physical_to_logical=tuple(rng.permutation(num_experts).tolist()), ep_size=num_ranks
        )
        home = rng.integers(0, num_ranks, 64)
        ranks = expert_ranks(experts, placement)
        a = layer_bytes(ranks, home, num_ranks=num_ranks, wire=WIRE, dispatcher="alltoall")
        d = layer_bytes(ranks, home, num_ranks=num_ranks, wire=WIRE, dispatcher="deepep_normal")
        assert (d.dispatch <= a.dispatch).all() and (d.combine <= a.combine).all(), trial
        assert (a.pairs >= a.copies).all()


def test_assert_bytes_match():
    lb = layer_bytes(_ranks(), HOME, num_ranks=4, wire=WIRE, dispatcher="alltoall")
    assert_bytes_match(lb.dispatch, {0: 0, 1: 16, 2: 16, 3: 8}, measured_received={0: 8, 1: 0, 2: 24, 3: 8})
    with pytest.raises(AssertionError, match=r"sent bytes differ .*1: \(15, 16\)"):
        assert_bytes_match(lb.dispatch, {0: 0, 1: 15, 2: 16, 3: 8})
    with pytest.raises(AssertionError, match="must name ranks 0..3"):
        assert_bytes_match(lb.dispatch, {0: 0, 1: 16})


def test_presets_are_valid_and_named():
    assert set(PRESETS) == set(get_args(PresetName))
    for name, spec in PRESETS.items():
        assert spec.name == name and spec.source and spec.latency.source and spec.compute.source
        assert spec.nvlink_bw_bytes_per_s >= spec.nic_bw_bytes_per_s
        assert spec.nvlink_bw_bytes_per_s <= spec.nvlink_nominal_bytes_per_s  # achieved <= nominal
        assert spec.nic_bw_bytes_per_s <= spec.nic_nominal_bytes_per_s
    h200 = cluster_preset("h200-ib", nodes=8)
    assert h200.num_gpus == 64 and h200.nvlink_nominal_bytes_per_s == 450e9
    assert h200.nvlink_bw_bytes_per_s == 370e9 and h200.nic_bw_bytes_per_s == 48e9
    assert cluster_preset("b200-ib").nvlink_nominal_bytes_per_s == 900e9
    assert cluster_preset("h800-ib").nvlink_nominal_bytes_per_s == 200e9
    assert cluster_preset("pcie-eth").nic_shared_per_node
    assert h200.for_ranks(16).nodes == 2
    with pytest.raises(ValueError, match="unknown cluster preset 'dgx'"):
        cluster_preset("dgx")


def test_bad_inputs_name_the_field():
    with pytest.raises(ValueError, match="nic_bw_bytes_per_s must be > 0"):
        dataclasses.replace(TINY, nic_bw_bytes_per_s=0.0)
    with pytest.raises(ValueError, match="tp=3 must divide ep=4"):
        ParallelLayout(tp=3, ep=4).require_folding()
    with pytest.raises(ValueError, match="unknown dispatcher 'dedup'"):
        layer_bytes(_ranks(), HOME, num_ranks=4, wire=WIRE, dispatcher="dedup")
    with pytest.raises(ValueError, match=r"home ranks must be in 0..3"):
        layer_bytes(_ranks(), np.array([0, 1, 2, 4]), num_ranks=4, wire=WIRE, dispatcher="alltoall")
    with pytest.raises(ValueError, match="do not fit cluster 'tiny'"):
        direct_loads(np.zeros((8, 8)), TINY)
    trace = RoutingTrace(experts=EXPERTS[:, None, :], num_experts=8)
    common = dict(num_ranks=4, gpus_per_node=2)
    with pytest.raises(ValueError, match="tokens_per_step=3 must be >= 1 and divide"):
        route_counts(trace, [ExpertPlacement.contiguous(8, 4)], HOME[:, None], tokens_per_step=3, **common)
    with pytest.raises(ValueError, match="placement was made for ep_size=2"):
        route_counts(trace, [ExpertPlacement.contiguous(8, 2)], HOME[:, None], tokens_per_step=4, **common)
    with pytest.raises(ValueError, match="--dispatch-dtype must be one of bf16, fp16, fp32, fp8, got 'int4'"):
        ModelShape.from_trace(trace, hidden_size=2, dispatch_dtype="int4")
    with pytest.raises(ValueError, match="fp8 rows need the hidden size to be a multiple of 128"):
        ModelShape.from_trace(trace, hidden_size=100, combine_dtype="fp8")


def test_contiguous_home_ranks_follow_tp_groups():
    layout = ParallelLayout(tp=2, ep=4)
    # B = 4 tokens per TP group, 2 groups: a step is 8 tokens; group 0 -> ranks 0, 1; group 1 -> 2, 3.
    home = contiguous_home_ranks(16, 3, layout=layout, tokens_per_group=4)
    assert home[:, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3] * 2
    assert (home == home[:, :1]).all()
    with pytest.raises(ValueError, match="not a multiple of the step size 8"):
        contiguous_home_ranks(12, 1, layout=layout, tokens_per_group=4)


def test_oracle_shuffle_stays_in_group_and_raises_local_rate():
    rng = np.random.default_rng(1)
    layout = ParallelLayout(tp=2, ep=4)
    # E = 4, top-1: the oracle can make every token local only within its TP group's experts.
    experts = rng.integers(0, 4, (32, 2, 1)).astype(np.int32)
    trace = RoutingTrace(experts=experts, num_experts=4)
    placements = [ExpertPlacement.contiguous(4, 4)] * 2
    base = contiguous_home_ranks(32, 2, layout=layout, tokens_per_group=8)
    shuf = shuffled_home_ranks(layer_rank_scores(oracle_expert_scores(trace), placements), layout=layout, tokens_per_group=8)
    assert ((shuf // 2) == (base // 2)).all()  # nobody leaves its TP group
    for start in range(0, 32, 8):
        for layer in range(2):
            assert np.bincount(shuf[start : start + 8, layer] % 2, minlength=2).tolist() == [4, 4]
    rank = experts[..., 0]  # expert e on rank e
    assert (shuf == rank).mean() > (base == rank).mean()


def test_split_experts_is_the_same_routes_on_more_ranks():
    trace = RoutingTrace(experts=EXPERTS[:, None, :], num_experts=8)
    split = split_experts(trace, 2)
    assert split.num_experts == 16 and split.topk == 4
    assert split.experts[1, 0].tolist() == [8, 9, 10, 11]  # experts 4, 5 -> slices 8, 9 and 10, 11
    placement = split_placement(ExpertPlacement.contiguous(8, 8), 2, 16)
    ranks = expert_ranks(split.experts[:, 0], placement)
    # One slice per rank: expert e's two slices on ranks 2e, 2e + 1.
    assert ranks[2].tolist() == [0, 1, 14, 15]


def test_layer_rank_scores_sum_experts_per_rank():
    scores = np.zeros((1, 1, 4), dtype=np.float32)
    scores[0, 0] = [0.1, 0.2, 0.3, 0.4]
    placement = ExpertPlacement.from_rank_groups([[3, 0], [1, 2]])
    assert np.allclose(layer_rank_scores(scores, [placement])[0, 0], [0.5, 0.5])
    placement = ExpertPlacement.from_rank_groups([[3, 2], [1, 0]])
    assert np.allclose(layer_rank_scores(scores, [placement])[0, 0], [0.7, 0.3])


def test_compare_dispatchers_on_synthetic_routes():
    from megatron_specmoe.sim.compare import compare_dispatchers, experts_split_factor
    from megatron_specmoe.sim.dispatchers import DispatcherName

    rng = np.random.default_rng(3)
    # E = 4 experts, top-2, two layers; 32 tokens, 4 tokens per rank.
    experts = np.stack([rng.choice(4, 2, replace=False) for _ in range(64)]).reshape(32, 2, 2)
    trace = RoutingTrace(experts=experts.astype(np.int32), num_experts=4)
    common = dict(cluster=TINY, hidden_size=8, tokens_per_rank=4)
    scores = oracle_expert_scores(trace)
    cmp4 = compare_dispatchers(trace, scores, ep=4, tp=2, **common)
    res = cmp4.results
    assert cmp4.split == 1 and set(res) == set(get_args(DispatcherName)) - {"allgather_inference_nvls"}
    assert set(cmp4.skipped) == {"allgather_inference_nvls"}  # EP 4 spans TINY's 2-GPU nodes
    # DeepEP's internode kernels: one RDMA row (16 B + 2 x 12 B metadata) per (token, remote node);
    # alltoall: one row + prob (20 B) per remote pair, here all through NICs or PXN hops.
    home = contiguous_home_ranks(32, 2, layout=ParallelLayout(tp=2, ep=4), tokens_per_group=8)
    remote_nodes = sum(len({e // 2 for e in experts[t, layer]} - {home[t, layer] // 2})
                       for t in range(32) for layer in range(2))
    assert res["deepep_normal"].dispatch.nic_bytes.sum() == remote_nodes * (16 + 24)
    remote_node_pairs = (experts // 2 != home[..., None] // 2).sum()
    assert res["alltoall"].dispatch.nic_bytes.sum() == remote_node_pairs * 20
    row = cmp4.table_row()
    assert row["specmoe_alltoall"]["local_activation_rate"] > row["alltoall"]["local_activation_rate"]
    assert row["specmoe_deepep_ll"]["local_activation_rate"] == row["specmoe_alltoall"]["local_activation_rate"]
    assert row["alltoall"]["plan_time_s"] == 0.0 and row["specmoe_alltoall"]["plan_time_s"] >= 0.0
    # EP 8 > E: every expert split in two slices, one slice per rank; each pair becomes two rows.
    cmp8 = compare_dispatchers(trace, scores, ep=8, tp=2, **{**common, "tokens_per_rank": 2})
    assert cmp8.split == 2 and cmp8.results["alltoall"].cluster.nodes == 4
    # Each pair becomes two rows: twice the bytes on the wire in the first step's layers.
    assert cmp8.table_row()["expert_split"] == 2
    assert experts_split_factor(4, 2) == 1
    with pytest.raises(ValueError, match="one must divide the other"):
        experts_split_factor(4, 6)
    with pytest.raises(ValueError, match="T=32 is not a multiple of the step size 24"):
        compare_dispatchers(trace, scores, ep=4, tp=2, **{**common, "tokens_per_rank": 6})
    with pytest.raises(ValueError, match=r"expert_scores must be \[T, L, E\]"):
        compare_dispatchers(trace, scores[:, :1], ep=4, tp=2, **common)


def test_rail_routing_spreads_one_gpus_inter_node_traffic():
    sent = np.zeros((4, 4), dtype=np.int64)
    sent[0, 2] = sent[0, 3] = 4  # rank 0 (node 0) sends 4 B to each GPU of node 1
    direct = _time(sent, TINY)
    assert direct.time_s == 2 * 10 + 8 / 2  # two messages, 8 bytes through rank 0's NIC
    rail = _time(sent, TINY, routing="rail")
    # 0 -> 2 leaves through rank 0's NIC (local index 0): 10 + 4/2 = 12; 0 -> 3 hops over NVLink to
    # rank 1 (1 + 4/4 = 2) and leaves through rank 1's NIC: 12.
    assert rail.rank_time_s.tolist() == [12.0, 12.0, 12.0, 12.0]
    assert int(rail.nic_bytes) == 8 and int(rail.nvlink_bytes) == 4  # the hop is on NVLink
    with pytest.raises(ValueError, match="needs one NIC per GPU"):
        dataclasses.replace(TINY, inter_node_routing="rail", nic_shared_per_node=True)
    with pytest.raises(ValueError, match="inter_node_routing must be one of"):
        dataclasses.replace(TINY, inter_node_routing="pxn")


def test_cli_simulate_writes_table_json_and_plot(tmp_path, capsys):
    import json

    from megatron_specmoe.cli.main import main
    from megatron_specmoe.artifacts.trace_io import write_trace

    rng = np.random.default_rng(4)
    experts = np.stack([rng.choice(8, 2, replace=False) for _ in range(256 * 3)]).reshape(256, 3, 2)
    path = tmp_path / "t.npz"
    write_trace(RoutingTrace(experts=experts.astype(np.int32), num_experts=8), path)
    out_json, out_png = tmp_path / "s.json", tmp_path / "s.png"
    rc = main(["simulate", "--traces", str(path), "--ep", "4,16", "--tokens-per-rank", "8",
               "--hidden", "16", "--json", str(out_json), "--plot", str(out_png)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| 4 | 1 | 4 | x1 |" in text and "| 16 | 2 | 8 | x2 |" in text
    rows = json.loads(out_json.read_text())["rows"]
    assert [r["ep"] for r in rows] == [4, 16] and rows[1]["alltoall"]["inter_node_bytes_per_layer"] > 0
    # Node measures on every row: EP 4 fits one node (nothing remote), EP 16 spans two.
    assert rows[0]["alltoall"]["remote_nodes_per_token"] == 0.0
    assert rows[0]["specmoe_alltoall"]["internode_bytes_per_token"] == {"per_node": 0.0, "per_pair": 0.0}
    for name in ("alltoall", "deepep_normal", "specmoe_alltoall"):
        assert 0.0 < rows[1][name]["remote_nodes_per_token"] <= 1.0
        b = rows[1][name]["internode_bytes_per_token"]
        assert 0.0 < b["per_node"] <= b["per_pair"]
    assert out_png.stat().st_size > 0
    assert main(["simulate", "--traces", str(path), "--ep", "8,x"]) == 2
    assert "--ep '8,x': not comma-separated integers -- give EP sizes" in capsys.readouterr().err
    assert main(["simulate", "--traces", str(path), "--ep", "8", "--tokens-per-rank", "64"]) == 2
    assert "fewer than one step" in capsys.readouterr().err


def test_assert_matches_report_compares_whole_matrices():
    from types import SimpleNamespace

    from megatron_specmoe.sim.simulate import assert_matches_report

    lb = layer_bytes(_ranks(), HOME, num_ranks=4, wire=WIRE, dispatcher="alltoall")
    report = SimpleNamespace(pairs=lb.pairs.tolist(), dispatch_bytes=lb.dispatch.tolist(),
                             combine_bytes=lb.combine.tolist())
    assert_matches_report(lb, report)
    report.combine_bytes[2][0] += 1
    with pytest.raises(AssertionError, match=r"combine_bytes differs .*\[src=2, dst=0\]: reported 5, simulated 4"):
        assert_matches_report(lb, report)


def test_cli_simulate_with_fitted_predictor_and_plan(tmp_path, capsys):
    from megatron_specmoe.cli.main import main
    from megatron_specmoe.artifacts.plan_folder import make_plan, save_plan
    from megatron_specmoe.predict.registry import fit_predictor
    from megatron_specmoe.artifacts.trace_io import write_trace

    rng = np.random.default_rng(5)

    def trace(n):
        experts = np.stack([rng.choice(8, 2, replace=False) for _ in range(n * 3)]).reshape(n, 3, 2)
        return RoutingTrace(experts=experts.astype(np.int32), num_experts=8)

    fit_tr, sim_tr = trace(256), trace(128)
    fit_path, sim_path = tmp_path / "fit.npz", tmp_path / "sim.npz"
    write_trace(fit_tr, fit_path)
    write_trace(sim_tr, sim_path)
    common = ["simulate", "--traces", str(sim_path), "--ep", "8", "--tokens-per-rank", "8", "--hidden", "16"]
    assert main(common + ["--predictor", "layer", "--fit-traces", str(fit_path)]) == 0
    assert "predictor: layer fitted on" in capsys.readouterr().out
    layer = fit_predictor("layer", fit_tr)
    groups = [[1, 2, 3, 4, 5, 6, 7, 0]]
    plan = make_plan(num_layers=3, num_experts=8, topk=2, ep_size=8,
                     placements=[ExpertPlacement(physical_to_logical=tuple(groups[0]), ep_size=8)] * 3,
                     predictor_state={"layer": layer.to_state()})
    save_plan(plan, tmp_path / "plan")
    assert main(common + ["--plan", str(tmp_path / "plan")]) == 0
    assert "predictor 'layer'" in capsys.readouterr().out
    assert main(common + ["--predictor", "crystal-ball", "--fit-traces", str(fit_path)]) == 2
    assert "unknown predictor kind 'crystal-ball'" in capsys.readouterr().err
    assert main(common + ["--predictor", "layer"]) == 2
    assert "--predictor layer needs traces to fit on -- add --fit-traces" in capsys.readouterr().err


def test_refine_spread_evens_the_busiest_gpus_off_group_pairs():
    rng = np.random.default_rng(8)
    layout = ParallelLayout(tp=4, ep=8)  # 2 TP groups (nodes) of 4 ranks; E = 8, expert e on rank e
    experts = np.stack([rng.choice(8, 2, replace=False) for _ in range(256 * 2)]).reshape(256, 2, 2)
    trace = RoutingTrace(experts=experts.astype(np.int32), num_experts=8)
    scores = layer_rank_scores(oracle_expert_scores(trace), [ExpertPlacement.contiguous(8, 8)] * 2)
    home = {m: shuffled_home_ranks(scores, layout=layout, tokens_per_group=32, method=m)
            for m in ("refine", "refine_spread")}
    base = contiguous_home_ranks(256, 2, layout=layout, tokens_per_group=32)
    off_pairs = (experts // 4 != base[..., None] // 4).sum(-1)  # [T, L] true off-group pairs
    busiest = {}
    for m, h in home.items():
        assert ((h // 4) == (base // 4)).all()  # nobody leaves its TP group
        loads = np.zeros((256 // 64, 2, 8))  # [step, layer, rank]
        for t in range(256):
            for layer in range(2):
                loads[t // 64, layer, h[t, layer]] += off_pairs[t, layer]
        assert (np.stack([np.bincount(h[s : s + 64, 0], minlength=8) for s in range(0, 256, 64)]) == 8).all()
        busiest[m] = loads.max(-1)
    # Oracle weights are the true off-group shares: the pass never raises a group's busiest rank.
    assert (busiest["refine_spread"] <= busiest["refine"]).all()
    assert busiest["refine_spread"].sum() < busiest["refine"].sum()
    # ... and keeps every local pair refine found (tol 0).
    local = {m: (experts == h[..., None]).sum() for m, h in home.items()}
    assert local["refine_spread"] >= local["refine"]


def test_cli_assignment_choices_are_the_assignment_methods(tmp_path, capsys):
    from megatron_specmoe.cli.main import main
    from megatron_specmoe.cli.simulate import ASSIGNMENT_CHOICES
    from megatron_specmoe.schedule.assignment import AssignmentMethod

    from megatron_specmoe.artifacts.trace_io import write_trace

    assert ASSIGNMENT_CHOICES == get_args(AssignmentMethod)
    rng = np.random.default_rng(6)
    experts = np.stack([rng.choice(8, 2, replace=False) for _ in range(256 * 2)]).reshape(256, 2, 2)
    write_trace(RoutingTrace(experts=experts.astype(np.int32), num_experts=8), tmp_path / "t.npz")
    assert main(["simulate", "--traces", str(tmp_path / "t.npz"), "--ep", "16", "--tokens-per-rank", "8",
                 "--hidden", "16", "--assignment", "refine_spread"]) == 0
    assert "| 16 | 2 | 8 | x2 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["simulate", "--traces", str(tmp_path / "t.npz"), "--assignment", "hungarian"])
    assert "invalid choice: 'hungarian'" in capsys.readouterr().err


def test_route_counts_agree_with_the_byte_function():
    rng = np.random.default_rng(11)
    experts = np.stack([rng.choice(16, 3, replace=False) for _ in range(64)]).astype(np.int32)
    placement = ExpertPlacement(physical_to_logical=tuple(rng.permutation(16).tolist()), ep_size=8)
    home = rng.integers(0, 8, 64)
    counts = route_counts(RoutingTrace(experts=experts[:, None, :], num_experts=16), [placement], home[:, None],
                          num_ranks=8, gpus_per_node=4, tokens_per_step=64)
    lb = layer_bytes(expert_ranks(experts, placement), home, num_ranks=8, wire=WIRE, dispatcher="deepep_normal")
    assert (counts.pairs[0, 0] == lb.pairs).all() and (counts.copies[0, 0] == lb.copies).all()
    # Node copies: distinct destination nodes per token, summed per home rank.
    ranks = expert_ranks(experts, placement)
    expect = np.zeros((8, 2), dtype=np.int64)
    for t in range(64):
        for node in set((ranks[t] // 4).tolist()):
            expect[home[t], node] += 1
    assert (counts.node_copies[0, 0] == expect).all()
    assert counts.tokens[0, 0].tolist() == np.bincount(home, minlength=8).tolist()


def test_node_measures_per_dispatcher_row_hand_worked():
    # The hand-worked case on 2 nodes x 2 GPUs: t1 (node 0) reaches node 1 with 2 pairs; t2 (node 1)
    # reaches node 0 with 1 pair; t0 and t3 stay in their node. Remote nodes: 2 over 4 tokens = 0.5.
    # Row 4 B (H = 2, bf16), prob 4 B. per_pair: 3 pairs x (4 + 4 + 4) = 36 B (= the alltoall
    # model's NIC bytes); per_node: 2 node copies x (4 + 4) + 3 probs x 4 = 28 B; per token / 4.
    trace = RoutingTrace(experts=np.concatenate([EXPERTS, EXPERTS])[:, None, :], num_experts=8)
    home = np.concatenate([HOME, HOME])[:, None]
    wire = WireDtypes(hidden_size=2, dispatch="bf16", combine="bf16")
    counts = route_counts(trace, [ExpertPlacement.contiguous(8, 4)], home, num_ranks=4,
                          gpus_per_node=2, tokens_per_step=4)  # two steps, summed
    assert (counts.nodes.tokens, counts.nodes.remote_nodes, counts.nodes.remote_node_pairs) == (8, 4, 6)
    for name in ("alltoall", "deepep_normal", "deepep_ll", "allgather_inference"):
        summary = simulate_dispatcher(name, counts, wire=wire, cluster=TINY, top_k=2).summary()
        assert summary["remote_nodes_per_token"] == 0.5
        assert summary["internode_bytes_per_token"] == {"per_node": 28 / 4, "per_pair": 36 / 4}
    a2a = simulate_dispatcher("alltoall", counts, wire=wire, cluster=TINY, top_k=2).summary()
    assert a2a["inter_node_bytes_per_layer"] == 36
    # The same counts from measure/nodes.py's WireFormat path (equal rows): the same bytes.
    assert counts.nodes.internode_bytes(WIRE, "per_node") == 2 * 28
    assert counts.nodes.internode_bytes(WIRE, "per_pair") == 2 * 36
    # One node of 4 ranks (G = 8): nothing crosses nodes. G = 3 does not divide P = 4: no measure.
    one = route_counts(trace, [ExpertPlacement.contiguous(8, 4)], home, num_ranks=4, gpus_per_node=8,
                       tokens_per_step=4)
    assert one.nodes.num_nodes == 1 and one.nodes.remote_nodes == 0 and one.nodes.pairs == 16
    partial = route_counts(trace, [ExpertPlacement.contiguous(8, 4)], home, num_ranks=4, gpus_per_node=3,
                           tokens_per_step=4)
    assert partial.nodes is None
    none = dataclasses.replace(a2a_res := simulate_dispatcher("alltoall", counts, wire=wire, cluster=TINY,
                                                              top_k=2), nodes=None)
    assert a2a_res.nodes is not None
    assert none.summary()["remote_nodes_per_token"] is None
    assert none.summary()["internode_bytes_per_token"] is None
