"""Node measures (measure/nodes.py) on hand-worked examples."""

import pytest
import torch

from megatron_specmoe.measure.measures import WireFormat, rank_hits
from megatron_specmoe.measure.nodes import NodeMeasures, check_gpus_per_node, measure_nodes, node_hits

# 4 EP ranks, 2 per node: node 0 = ranks {0, 1}, node 1 = ranks {2, 3}. One expert per rank.
# Top-3 routes (expert = rank), homes as given.
ROUTES = torch.tensor([[0, 1, 2], [2, 3, 1], [0, 2, 3], [1, 0, 3]])
HOME = torch.tensor([0, 3, 1, 2])
WIRE = WireFormat(hidden_size=8, activation_bytes=2, prob_bytes=4)  # a row is 16 B


def _measures():
    return measure_nodes(rank_hits(ROUTES, 4), HOME, 2)


def test_node_hits_by_hand():
    assert node_hits(rank_hits(ROUTES, 4), 2).tolist() == [[2, 1], [1, 2], [1, 2], [2, 1]]


def test_node_measures_by_hand():
    m = _measures()
    # token 0 (node 0): expert 2 on node 1 -> 1 remote-node pair, 1 remote node
    # token 1 (node 1): expert 1 on node 0 -> 1, 1
    # token 2 (node 0): experts 2, 3 on node 1 -> 2 pairs, 1 node
    # token 3 (node 1): experts 1, 0 on node 0 -> 2 pairs, 1 node
    assert (m.tokens, m.pairs, m.remote_node_pairs, m.remote_nodes) == (4, 12, 6, 4)
    assert m.remote_nodes_per_token == pytest.approx(1.0)
    assert m.remote_node_pairs_per_token == pytest.approx(1.5)
    assert m.num_nodes == 2


def test_internode_bytes_by_hand():
    m = _measures()
    # per pair: 6 pairs x (dispatch 16 + 4, combine 16) = 216
    assert m.internode_bytes(WIRE, "per_pair") == 6 * (16 + 4 + 16) == 216
    # per node: 4 (token, node) rows each way = 4 x 2 x 16 = 128, plus 6 probs x 4 B = 24
    assert m.internode_bytes(WIRE, "per_node") == 4 * 2 * 16 + 6 * 4 == 152
    assert m.internode_bytes_per_token(WIRE) == {"per_node": 38.0, "per_pair": 54.0}


def test_one_node_has_no_internode_traffic():
    m = measure_nodes(rank_hits(ROUTES, 4), HOME, 4)
    assert (m.remote_node_pairs, m.remote_nodes) == (0, 0)
    assert m.internode_bytes_per_token(WIRE) == {"per_node": 0.0, "per_pair": 0.0}


def test_one_gpu_per_node_equals_rank_measures():
    from megatron_specmoe.measure.measures import measure_routes

    hits = rank_hits(ROUTES, 4)
    ranks, nodes = measure_routes(hits, HOME), measure_nodes(hits, HOME, 1)
    assert nodes.remote_node_pairs == ranks.remote_pairs
    assert nodes.remote_nodes == ranks.remote_ranks


def test_dropped_selections_not_counted():
    hits = rank_hits(torch.tensor([[0, -1, 3]]), 4)
    m = measure_nodes(hits, torch.tensor([0]), 2)
    assert (m.pairs, m.remote_node_pairs, m.remote_nodes) == (2, 1, 1)


def test_add_and_empty():
    m = _measures()
    total = NodeMeasures.empty(gpus_per_node=2, num_nodes=2) + m + m
    assert (total.tokens, total.remote_node_pairs, total.remote_nodes) == (8, 12, 8)
    with pytest.raises(ValueError, match="different node layouts"):
        m + measure_nodes(rank_hits(ROUTES, 4), HOME, 1)


@pytest.mark.parametrize("gpn, pattern", [(0, "positive integer"), (3, "does not divide the EP size 4"),
                                          (True, "positive integer")])
def test_bad_gpus_per_node(gpn, pattern):
    with pytest.raises(ValueError, match=pattern):
        check_gpus_per_node(gpn, 4, where="--gpus-per-node")
    with pytest.raises(ValueError, match="gpus_per_node"):
        measure_nodes(rank_hits(ROUTES, 4), HOME, 3)


def test_bad_transport():
    with pytest.raises(ValueError, match="transport='dedup'"):
        _measures().internode_bytes(WIRE, "dedup")


def test_dispatch_record_node_counts_by_hand():
    pytest.importorskip("megatron.core")
    from megatron_specmoe.comm.stats import summarize_by_layer
    from megatron_specmoe.measure.accounting import TrafficReport
    from megatron_specmoe.megatron.dispatcher import DispatchRecorder, record_from_routing_map

    # EP 4, one expert per rank, 2 ranks per node. Rank r holds token r of ROUTES (home = r here).
    records = []
    for rank in range(4):
        rmap = torch.zeros(1, 4, dtype=torch.bool)
        rmap[0, ROUTES[rank]] = True
        records.append(record_from_routing_map(rmap, ep_rank=rank, ep_size=4, layer_number=2, wire=WIRE,
                                               gpus_per_node=2))
    # token 0 on rank 0 (node 0) -> experts 0, 1, 2: one remote-node pair (2), one node
    assert records[0].pairs_to_node == (2, 1)
    assert (records[0].nodes.remote_node_pairs, records[0].nodes.remote_nodes) == (1, 1)
    assert records[0].internode_bytes("per_pair") == 36 and records[0].internode_bytes("per_node") == 36
    # token 2 on rank 2 (node 1) -> experts 0, 2, 3: one remote-node pair (0)
    assert records[2].pairs_to_node == (1, 2)
    rep = TrafficReport.from_records(records)
    # remote-node pairs: t0 1, t1 (rank 1, node 0: 2, 3 remote) 2, t2 1, t3 (node 1: 1, 0) 2
    assert (rep.nodes.remote_node_pairs, rep.nodes.remote_nodes) == (6, 4)
    assert rep.internode_bytes("per_pair") == 216 and rep.internode_bytes("per_node") == 152
    twice = summarize_by_layer([rep, rep])[2]
    assert twice.internode_bytes("per_node") == 304
    plain = record_from_routing_map(torch.ones(1, 4, dtype=torch.bool), ep_rank=0, ep_size=4, layer_number=2,
                                    wire=WIRE)
    assert plain.nodes is None and plain.pairs_to_node is None and plain.internode_bytes("per_node") is None
    with pytest.raises(ValueError, match="same gpus_per_node"):
        TrafficReport.from_records([plain] + records[1:])
    with pytest.raises(ValueError, match="DispatchRecorder.gpus_per_node=3 does not divide"):
        record_from_routing_map(torch.ones(1, 4, dtype=torch.bool), ep_rank=0, ep_size=4, layer_number=2,
                                wire=WIRE, gpus_per_node=3)
    with pytest.raises(ValueError, match="positive integer"):
        DispatchRecorder(gpus_per_node=0)
