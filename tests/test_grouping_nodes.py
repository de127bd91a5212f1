"""Node-aware grouping (schedule/grouping_nodes.py): nodes first, router groups kept whole."""

import numpy as np
import pytest
import torch

from megatron_specmoe.measure.measures import rank_hits
from megatron_specmoe.measure.nodes import measure_nodes
from megatron_specmoe.schedule.grouping_nodes import NodeGroupingOptions, _pairs, group_layer_by_nodes


def _routes(tokens=64):
    # Top-4 routes: half the tokens use {0, 4, 1, 5}, half {2, 6, 3, 7}; inside each, the pairs
    # (0, 4), (1, 5), ... are used more (extra top-4 rows repeat them with a neighbour).
    a = np.array([[0, 4, 1, 5], [2, 6, 3, 7]])
    return np.repeat(a, tokens // 2, axis=0)


def _remote_nodes(placement, ex, gpn):
    hits = rank_hits(torch.from_numpy(placement.rank_of_logical()[ex]), placement.ep_size)
    return measure_nodes(hits, hits.argmax(dim=1), gpn)


def test_pairs_by_hand():
    # row 0: units 1, 1, 2 -> one distinct pair (1, 2); row 1: 0, -1 (absent), 3 -> (0, 3)
    assert _pairs(np.array([[1, 1, 2], [0, -1, 3]]), 4).tolist() == [[1, 2], [0, 3]]


def test_node_sets_cover_whole_routes():
    ex = _routes()
    pl = group_layer_by_nodes(ex, num_experts=8, ep_size=4, node_options=NodeGroupingOptions(gpus_per_node=2))
    node_of = pl.rank_of_logical() // 2
    assert node_of[0] == node_of[4] == node_of[1] == node_of[5]
    assert node_of[2] == node_of[6] == node_of[3] == node_of[7] != node_of[0]
    m = _remote_nodes(pl, ex, 2)
    assert m.remote_nodes == 0 and m.remote_node_pairs == 0
    assert sorted(len(g) for g in pl.rank_groups()) == [2, 2, 2, 2]


def test_keep_groups_puts_each_router_group_on_one_node():
    rng = np.random.default_rng(0)
    ex = np.stack([rng.permutation(16)[:4] for _ in range(200)])
    opts = NodeGroupingOptions(gpus_per_node=2, router_groups=4, keep_groups=True)
    pl = group_layer_by_nodes(ex, num_experts=16, ep_size=4, node_options=opts)
    node_of = pl.rank_of_logical() // 2
    for group in range(4):
        assert len(set(node_of[group * 4 : (group + 1) * 4].tolist())) == 1
    # A token touching g groups reaches at most g nodes, so at most g - 1 remote ones.
    groups_per_token = np.array([len(set((r // 4).tolist())) for r in ex])
    hits = rank_hits(torch.from_numpy(pl.rank_of_logical()[ex]), 4)
    nodes_per_token = (hits.view(-1, 2, 2).sum(2) > 0).sum(1).numpy()
    assert (nodes_per_token <= groups_per_token).all()


@pytest.mark.parametrize("kwargs, pattern", [
    ({"gpus_per_node": 3}, "gpus_per_node=3 does not divide the EP size 4"),
    ({"gpus_per_node": 1, "router_groups": 2, "keep_groups": True}, "not a multiple of the 4 nodes"),
    ({"gpus_per_node": 2, "router_groups": 3}, "router_groups=3 does not divide"),
])
def test_bad_layouts(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        group_layer_by_nodes(_routes(), num_experts=8, ep_size=4, node_options=NodeGroupingOptions(**kwargs))


def test_bad_options():
    with pytest.raises(ValueError, match="keep_groups needs router_groups"):
        NodeGroupingOptions(gpus_per_node=2, keep_groups=True)
    with pytest.raises(ValueError, match="positive integer"):
        NodeGroupingOptions(gpus_per_node=0)
