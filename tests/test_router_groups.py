"""Group-limited routing in planning: domains, router-mode permutations, node reach, grouping that
keeps groups where they belong, and the evaluate / plan commands' use of them (hand-worked)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megatron_specmoe.artifacts.traces import RoutingTrace
from megatron_specmoe.schedule.grouping import GroupingOptions, group_experts, group_layer
from megatron_specmoe.schedule.placement import ExpertPlacement
from megatron_specmoe.schedule.router_groups import RouterGroups, check_domains, check_router_permutation

HEURISTICS = ["contiguous", "random", "eplb", "graph", "alternating", "search"]


def _sets(placement: ExpertPlacement) -> set[frozenset]:
    return {frozenset(g) for g in placement.rank_groups()}


# ---- domains -------------------------------------------------------------------------------------
def test_domains_by_hand():
    # E=8, G=2 (groups {0..3}, {4..7}), P=4: each group owns 2 ranks.
    g = RouterGroups(num_groups=2)
    assert g.domain_ranks(8, 4) == 2
    assert g.expert_domain(8, 4).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert g.rank_domain(8, 4).tolist() == [0, 0, 1, 1]
    # G=4 > P=2: each rank hosts two whole groups, nothing may move.
    g = RouterGroups(num_groups=4)
    assert g.domain_ranks(8, 2) == 1
    assert g.expert_domain(8, 2).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    # Node domain: E=16, G=4, P=8, 4 ranks per node: a node (4 ranks) hosts 2 groups (8 experts).
    g = RouterGroups(num_groups=4, domain="node", ranks_per_node=4)
    assert g.domain_ranks(16, 8) == 4
    assert g.expert_domain(16, 8).tolist() == [0] * 8 + [1] * 8
    # Node smaller than a group's ranks: the group's own ranks win.
    assert RouterGroups(num_groups=2, domain="node", ranks_per_node=1).domain_ranks(16, 8) == 4
    assert RouterGroups(num_groups=2, domain="none").domain_ranks(16, 8) == 8


def test_domain_errors_name_the_fix():
    with pytest.raises(ValueError, match="num_groups=3 does not divide num_experts=8"):
        RouterGroups(num_groups=3).domain_ranks(8, 4)
    with pytest.raises(ValueError, match="ep_size=4 is not a multiple of moe_router_num_groups=3"):
        RouterGroups(num_groups=3).domain_ranks(12, 4)
    with pytest.raises(ValueError, match="moe_router_num_groups=6 is not a multiple of ep_size=4"):
        RouterGroups(num_groups=6).domain_ranks(24, 4)
    with pytest.raises(ValueError, match="ranks_per_node=3"):
        RouterGroups(num_groups=8, domain="node", ranks_per_node=3).domain_ranks(16, 8)
    with pytest.raises(ValueError, match="domain='socket'"):
        RouterGroups(num_groups=2, domain="socket")
    with pytest.raises(ValueError, match="group_topk=3"):
        RouterGroups(num_groups=2, group_topk=3)
    with pytest.raises(ValueError, match="'milp' cannot keep router groups"):
        GroupingOptions(method="milp", router_groups=RouterGroups(num_groups=2))


# ---- router mode -----------------------------------------------------------------------------------
def test_router_permutation_keeps_or_refuses_groups():
    # E=8, G=2: slots 0..3 become router group 0, slots 4..7 group 1.
    ok = [
        (1, 0, 3, 2, 4, 5, 6, 7),  # inside groups
        (4, 5, 6, 7, 0, 1, 2, 3),  # the groups trade blocks
        (7, 6, 5, 4, 3, 2, 1, 0),
    ]
    for p2l in ok:
        check_router_permutation(ExpertPlacement(physical_to_logical=p2l, ep_size=4), 2)
    bad = ExpertPlacement(physical_to_logical=(0, 1, 2, 4, 3, 5, 6, 7), ep_size=4)
    with pytest.raises(ValueError, match=r"slots 0\.\.3 router group 0, but they hold experts of router "
                                         r"groups \[0, 1\].*mode='dispatcher'"):
        check_router_permutation(bad, 2, where="MoE layer 3")
    check_router_permutation(bad, 1)  # no groups: anything goes


def test_check_domains():
    g = RouterGroups(num_groups=2)
    check_domains(ExpertPlacement(physical_to_logical=(1, 0, 3, 2, 4, 5, 6, 7), ep_size=4), g)
    with pytest.raises(ValueError, match="logical expert 3 .router group 0. sits in rank domain 1"):
        check_domains(ExpertPlacement(physical_to_logical=(0, 1, 2, 4, 3, 5, 6, 7), ep_size=4), g)


# ---- node reach ------------------------------------------------------------------------------------
def node_reach(ex, placement, gpus_per_node):
    """NodeMeasures of tokens ``ex`` int [T, k] under ``placement`` (homes on rank 0)."""
    import torch

    from megatron_specmoe.measure.measures import rank_hits
    from megatron_specmoe.measure.nodes import measure_nodes

    ranks = torch.from_numpy(placement.rank_of_logical()[np.asarray(ex)])
    return measure_nodes(rank_hits(ranks, placement.ep_size), torch.zeros(len(ex), dtype=torch.long), gpus_per_node)


def test_max_nodes_by_hand():
    # E=8, P=4, 2 ranks per node: contiguous expert e on rank e // 2, node e // 4.
    ex = np.array([[0, 1], [0, 4], [3, 7], [5, 6]])
    contiguous = ExpertPlacement.contiguous(8, 4)
    r = node_reach(ex, contiguous, 2)
    assert r.max_nodes == 2 and r.remote_nodes == 0 + 1 + 1 + 1  # homes on node 0
    assert node_reach(ex[[0, 3]], contiguous, 2).max_nodes == 1
    # Swap experts 1 and 4 between the nodes: token [0, 1] now spans 2 nodes, [0, 4] one.
    swapped = ExpertPlacement(physical_to_logical=(0, 4, 2, 3, 1, 5, 6, 7), ep_size=4)
    assert node_reach(ex[[0]], swapped, 2).max_nodes == 2 and node_reach(ex[[1]], swapped, 2).max_nodes == 1
    assert (node_reach(ex[[0]], contiguous, 2) + node_reach(ex[[2]], contiguous, 2)).max_nodes == 2
    # One rank per node: the distinct ranks.
    assert node_reach(ex, contiguous, 1).max_nodes == 2 and node_reach(ex[[0]], contiguous, 1).max_nodes == 1


# ---- grouping ----------------------------------------------------------------------------------------
def _cross_group_routes():
    # E=8 (groups {0..3}, {4..7}), P=4. Heavy pairs cross the groups ({0,4}, {1,5}); light pairs
    # stay inside ({0,2}, {1,3}, {4,6}, {5,7}).
    return np.array([[0, 4]] * 30 + [[1, 5]] * 30 + [[0, 2]] * 10 + [[1, 3]] * 10
                    + [[4, 6]] * 10 + [[5, 7]] * 10)


@pytest.mark.parametrize("method", ["graph", "alternating", "search"])
def test_grouping_keeps_groups_on_their_ranks(method):
    ex = _cross_group_routes()
    free = group_layer(ex, num_experts=8, ep_size=4, options=GroupingOptions(method=method, theta=0.0))
    assert {frozenset({0, 4}), frozenset({1, 5})} <= _sets(free)  # unconstrained: across groups
    with pytest.raises(ValueError, match="router mode"):
        check_router_permutation(free, 2)
    opts = GroupingOptions(method=method, theta=0.0, router_groups=RouterGroups(num_groups=2))
    kept = group_layer(ex, num_experts=8, ep_size=4, options=opts)
    assert _sets(kept) == {frozenset({0, 2}), frozenset({1, 3}), frozenset({4, 6}), frozenset({5, 7})}
    assert [sorted(g) for g in kept.rank_groups()[:2]] in ([[0, 2], [1, 3]], [[1, 3], [0, 2]])
    check_router_permutation(kept, 2)  # router mode may apply it
    # 2 ranks per node: the group-kept placement reaches one node per group a token uses.
    assert node_reach(ex, kept, 2).max_nodes == 2 and node_reach(ex[60:], kept, 2).max_nodes == 1


def test_node_domain_mixes_groups_inside_a_node_only():
    # E=8, G=4 ({0,1}, {2,3}, {4,5}, {6,7}), P=4, 2 ranks per node: node 0 hosts groups 0 and 1.
    ex = np.array([[0, 2]] * 20 + [[1, 3]] * 20 + [[4, 6]] * 20 + [[5, 7]] * 20 + [[0, 6]] * 30)
    node = GroupingOptions(method="search", theta=0.0,
                           router_groups=RouterGroups(num_groups=4, domain="node", ranks_per_node=2))
    pl = group_layer(ex, num_experts=8, ep_size=4, options=node)
    assert _sets(pl) == {frozenset({0, 2}), frozenset({1, 3}), frozenset({4, 6}), frozenset({5, 7})}
    assert node_reach(ex, pl, 2).max_nodes == 2  # [0, 6] spans both nodes, as contiguous does
    with pytest.raises(ValueError, match="router groups \\[0, 1\\]"):
        check_router_permutation(pl, 4)  # dispatcher mode only
    # Rank domain with G = P: each rank is one group, nothing can move.
    rank = GroupingOptions(method="search", theta=0.0, router_groups=RouterGroups(num_groups=4))
    assert group_layer(ex, num_experts=8, ep_size=4, options=rank).is_contiguous


@pytest.mark.parametrize("method", HEURISTICS)
def test_every_method_respects_domains_on_random_routes(method):
    rng = np.random.default_rng(3)
    E, k, T, L = 16, 3, 300, 2
    experts = np.stack([np.stack([rng.choice(E, k, replace=False) for _ in range(T)]) for _ in range(L)], axis=1)
    trace = RoutingTrace(experts=experts.astype(np.int32), num_experts=E, source="random")
    for groups in (RouterGroups(num_groups=4), RouterGroups(num_groups=2, domain="node", ranks_per_node=4)):
        opts = GroupingOptions(method=method, restarts=1, router_groups=groups)
        for pl in group_experts(trace, ep_size=8, options=opts):
            check_domains(pl, groups)
            if groups.domain == "rank":
                check_router_permutation(pl, groups.num_groups)


# ---- commands ------------------------------------------------------------------------------------------
def test_plan_and_evaluate_commands_with_router_groups(tmp_path, capsys):
    from megatron_specmoe.artifacts.trace_io import write_trace
    from megatron_specmoe.cli.main import main

    rng = np.random.default_rng(0)
    E, T, L = 16, 400, 2
    token_ids = rng.integers(0, 50, T)
    # Token id decides the experts: group g = id % 4, experts inside it from the id.
    experts = np.stack([np.stack([(t % 4) * 4 + np.array([(t + l) % 4, (t + l + 1) % 4]) for t in token_ids])
                        for l in range(L)], axis=1).astype(np.int32)
    path = tmp_path / "t.npz"
    write_trace(RoutingTrace(experts=experts, num_experts=E, token_ids=token_ids, source="t"), path)
    assert main(["plan", "--traces", str(path), "--ep", "8", "--out", str(tmp_path / "plan"),
                 "--predictor", "token", "--router-groups", "4", "--group-topk", "1",
                 "--ranks-per-node", "2", "--hidden-size", "16"]) == 0
    err = capsys.readouterr().err
    assert "router groups: 4 of 4 experts, domain 'rank': experts move only inside blocks of 2 rank(s)" in err
    from megatron_specmoe.artifacts.plan_folder import load_plan

    plan = load_plan(tmp_path / "plan")
    assert plan.header.notes["router_groups"] == {"num_groups": 4, "group_topk": 1, "domain": "rank",
                                                  "ranks_per_node": 2}
    for pl in plan.placements:
        check_router_permutation(pl, 4)
    assert main(["evaluate", "--plan", str(tmp_path / "plan"), "--traces", str(path), "--json",
                 "--gpus-per-node", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    # Each token uses one group; a group's 2 ranks are one node of 2 ranks: one node per token.
    for side in ("baseline", "specmoe"):
        assert out[side]["max_nodes_per_token"] == 1
    assert main(["evaluate", "--plan", str(tmp_path / "plan"), "--traces", str(path), "--json",
                 "--gpus-per-node", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["baseline"]["max_nodes_per_token"] == 2  # a pair of experts on the group's two ranks
    assert main(["plan", "--traces", str(path), "--ep", "8", "--out", str(tmp_path / "p2"),
                 "--predictor", "token", "--router-groups", "3"]) == 2
    assert "num_groups=3 does not divide num_experts=16" in capsys.readouterr().err
    # Replicas with router groups: every copy stays on its group's 2 ranks (one node of 2).
    assert main(["plan", "--traces", str(path), "--ep", "8", "--out", str(tmp_path / "p3"), "--predictor",
                 "token", "--router-groups", "4", "--group-topk", "1", "--redundant-experts", "8",
                 "--hidden-size", "16"]) == 0
    assert "each copy inside its router group's 'rank' domain" in capsys.readouterr().err
    from megatron_specmoe.schedule.replicas import replicas_from_arrays
    from megatron_specmoe.schedule.router_groups import check_replica_domains

    plan = load_plan(tmp_path / "p3")
    for rep in replicas_from_arrays(plan.placements, plan.arrays, "load"):
        check_replica_domains(rep, RouterGroups(num_groups=4))
    assert main(["evaluate", "--plan", str(tmp_path / "p3"), "--traces", str(path), "--json",
                 "--gpus-per-node", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    for side in ("specmoe", "oracle", "specmoe_replicas", "oracle_replicas"):
        assert out[side]["max_nodes_per_token"] == 1, side
    # A domain of one rank (G = P) leaves no room for a copy: refused, naming the fix.
    assert main(["plan", "--traces", str(path), "--ep", "4", "--out", str(tmp_path / "p4"), "--predictor",
                 "token", "--router-groups", "4", "--redundant-experts", "4"]) == 2
    assert "may hold copies of only 0 expert(s)" in capsys.readouterr().err
