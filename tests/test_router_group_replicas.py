"""Redundant experts together with group-limited routing: every copy of an expert stays in its router
group's domain (its own ranks, or its node), so the route table never sends a pair outside it and
the most nodes any token reaches (``max_nodes_per_token``) keeps the bound of the base placement;
without the constraint the same policies break it. Hand-worked allowed-rank maps, the refusals, and
the bound on group-limited routes for every policy, domain and home-rank choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_specmoe.measure.nodes import measure_nodes
from megatron_specmoe.measure.replica_routes import replica_hits, routed_rank_hits
from megatron_specmoe.schedule.assignment import assign
from megatron_specmoe.schedule.grouping import GroupingOptions, group_layer
from megatron_specmoe.schedule.placement import ExpertPlacement
from megatron_specmoe.schedule.replicas import REPLICA_POLICIES, replicate
from megatron_specmoe.schedule.router_groups import RouterGroups, check_replica_domains


def test_replica_ranks_by_hand():
    # E=8, G=2 (groups {0..3}, {4..7}), P=4, domain rank: group 0 on ranks 0-1, group 1 on ranks 2-3.
    allowed = RouterGroups(num_groups=2).replica_ranks(8, 4)
    assert allowed.tolist() == [[True, True, False, False]] * 4 + [[False, False, True, True]] * 4
    # Node domain, 16 experts in 8 groups on 8 ranks, 4 ranks per node: a copy stays on its node.
    node = RouterGroups(num_groups=8, domain="node", ranks_per_node=4).replica_ranks(16, 8)
    assert node[0].tolist() == [True] * 4 + [False] * 4 and node[15].tolist() == [False] * 4 + [True] * 4
    assert RouterGroups(num_groups=2, domain="none").replica_ranks(8, 4).all()
    assert RouterGroups().replica_ranks(8, 4).all()  # no groups
    # G = P: each group is one rank, which already holds all of it: no copy may go anywhere.
    assert RouterGroups(num_groups=4).replica_ranks(8, 4).sum() == 8


def test_replicas_refused_where_a_domain_has_no_room():
    base = ExpertPlacement.contiguous(8, 4)
    ex = np.random.default_rng(0).integers(0, 8, (64, 2))
    with pytest.raises(ValueError, match=r"--redundant-experts 4: rank 0 may hold copies of only 0 expert\(s\) it "
                                         r"lacks .* choose fewer redundant experts, or a wider --group-domain"):
        replicate(base, ex, redundant=4, allowed=RouterGroups(num_groups=4).replica_ranks(8, 4))
    # Domain of 2 ranks x 2 experts: a rank may copy the 2 experts of its neighbour, not 3.
    allowed = RouterGroups(num_groups=2).replica_ranks(8, 4)
    assert replicate(base, ex, redundant=8, allowed=allowed).redundant == 8
    with pytest.raises(ValueError, match=r"rank 0 may hold copies of only 2 expert\(s\) it lacks \(3 replica"):
        replicate(base, ex, redundant=12, allowed=allowed)
    with pytest.raises(ValueError, match=r"allowed must be bool \[E, P\]=\(8, 4\)"):
        replicate(base, ex, redundant=4, allowed=np.ones((4, 8), dtype=bool))


def _group_limited_routes(rng, tokens, num_experts, groups, group_topk, topk):
    """int [T, k]: each token picks ``group_topk`` groups, then ``topk`` experts inside them, with a
    skewed popularity (hot experts, as replicas are made for)."""
    size = num_experts // groups
    popularity = rng.dirichlet(np.full(num_experts, 0.3))
    out = np.empty((tokens, topk), dtype=np.int64)
    for t in range(tokens):
        chosen = rng.choice(groups, group_topk, replace=False)
        pool = np.concatenate([np.arange(g * size, (g + 1) * size) for g in chosen])
        weights = popularity[pool] / popularity[pool].sum()
        out[t] = rng.choice(pool, topk, replace=False, p=weights)
    return out


def _max_nodes(rep, ex, gpus_per_node, rng):
    """The most nodes any token reaches, over three home-rank choices: the balanced assignment on
    the true routes (the oracle), the contiguous one, and random homes (any prediction)."""
    experts = torch.from_numpy(ex)
    mask = torch.from_numpy(rep.rank_mask())
    table = torch.from_numpy(rep.route_table())
    p, t = rep.ep_size, ex.shape[0]
    homes = [assign(replica_hits(experts, mask).float(), "refine").home_rank,
             torch.arange(t) * p // t, torch.from_numpy(rng.integers(0, p, t))]
    worst = 0
    for home in homes:
        hits = routed_rank_hits(experts, home.long(), table, rep.slots_per_rank, p)
        worst = max(worst, measure_nodes(hits, home.long(), gpus_per_node).max_nodes)
    return worst


@pytest.mark.parametrize("groups,gpus_per_node", [
    (RouterGroups(num_groups=4, group_topk=2), 2),  # E=32 on P=8: a group's 2 ranks are one node
    (RouterGroups(num_groups=8, group_topk=2, domain="node", ranks_per_node=2), 2),  # 2 groups per node
], ids=["rank-domain", "node-domain"])
def test_replicas_keep_the_node_bound(groups, gpus_per_node):
    rng = np.random.default_rng(1)
    e, p, k = 32, 8, 4
    ex = _group_limited_routes(rng, 768, e, groups.num_groups, groups.group_topk, k)
    base = group_layer(ex, num_experts=e, ep_size=p, options=GroupingOptions(method="search", theta=0.1,
                                                                              router_groups=groups))
    bound = _max_nodes(replicate(base, ex, redundant=0), ex, gpus_per_node, rng)
    assert bound <= groups.group_topk  # the base placement keeps it
    allowed = groups.replica_ranks(e, p)
    broken = 0
    for policy in REPLICA_POLICIES:
        kept = replicate(base, ex, redundant=16, policy=policy, allowed=allowed)
        check_replica_domains(kept, groups)
        assert kept.redundant == 16 and (kept.copies() > 1).sum() > 0
        assert _max_nodes(kept, ex, gpus_per_node, rng) <= bound, policy
        free = replicate(base, ex, redundant=16, policy=policy)  # copies anywhere
        if _max_nodes(free, ex, gpus_per_node, rng) > bound:
            broken += 1
            with pytest.raises(ValueError, match=r"a copy of logical expert \d+ \(router group \d+\) sits on rank "
                                                 r"\d+, outside its group's (rank|node) domain"):
                check_replica_domains(free, groups)
    assert broken > 0  # the constraint is what keeps the bound
