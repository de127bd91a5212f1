"""specmoe equals Megatron's alltoall dispatcher: outputs and input gradients, fp32, on gloo.

Each test starts one set of processes and runs several cases in it (interpreter and megatron are
started once per set). Weights come from a seeded bank of logical experts, arranged by the
placement under test, so a dispatcher that ignored the placement would send tokens to the wrong
experts and fail.
"""

import pytest

from megatron_specmoe.testing.spawn import run_local
from megatron_specmoe.megatron.build import MoEShape
from megatron_specmoe.testing.lossless import LosslessCase, run_cases
from megatron_specmoe.measure.measures import WireFormat

TOL = 1e-6
PERMUTED = (5, 2, 7, 0, 1, 6, 3, 4)


REPLICAS = ((7,), (1,), (3,), (5,))  # one replica slot per rank on top of PERMUTED (R = 4)


def _check(results_by_rank, cases):
    for case_index, (kind, case) in enumerate(cases):
        per_rank = [rank_results[case_index] for rank_results in results_by_rank]
        if case.wrong_replica:  # the harness's negative check: a wrong replica must show
            assert max(res.max_out_diff for res in per_rank) > 1e-3
            assert [res.slots_hold_their_experts for res in per_rank] == [False] + [True] * (case.ep - 1)
            continue
        if case.replica_extra is not None:
            assert all(res.slots_hold_their_experts for res in per_rank)
            _check_replica_routes(case, per_rank)
        for res in per_rank:
            assert res.max_out_diff <= TOL, (kind, case, res.rank, res.max_out_diff)
            assert res.max_grad_diff <= TOL, (kind, case, res.rank, res.max_grad_diff)
        _check_accounting(kind, case, per_rank)


def _check_accounting(kind, case, per_rank):
    """The dispatcher's records agree with Megatron's own split sizes and the wire format."""
    reports = per_rank[0].reports
    assert len(reports) == case.shape.layers
    wire = WireFormat(hidden_size=case.shape.hidden, activation_bytes=4, prob_bytes=4)
    for layer_index, report in enumerate(reports):
        # Every (token, expert) pair is accounted once: tokens on the EP ranks x top-k.
        # (With TP > 1 and no sequence parallelism every TP rank routes its own full copy.)
        ep_ranks_tokens = [r.tokens for r in per_rank]
        pairs_total = sum(sum(row) for row in report.pairs)
        if case.tp == 1:
            assert pairs_total == sum(ep_ranks_tokens[: case.ep]) * case.shape.topk
        assert report.measures.pairs == pairs_total
        for src, row in enumerate(report.pairs):
            for dst, pairs in enumerate(row):
                expected = 0 if src == dst else pairs * wire.dispatch_bytes_per_pair
                assert report.dispatch_bytes[src][dst] == expected
                assert report.combine_bytes[src][dst] == (0 if src == dst else pairs * wire.combine_bytes_per_pair)
        # Under the contiguous placement the pairs per destination are Megatron's input_splits.
        if case.placement is None and case.ep > 1:
            for src in range(case.ep):
                assert tuple(report.pairs[src]) == per_rank[src].alltoall_input_splits[layer_index]
        # The cluster simulator, replaying the same routes with the same placement, computes
        # exactly the matrices the dispatcher reported (MoE-layer cases; no duplicated TP copies).
        if kind == "layer" and case.tp == 1 and case.ep > 1 and case.replica_extra is None:
            import numpy as np

            from megatron_specmoe.schedule.placement import ExpertPlacement
            from megatron_specmoe.sim.simulate import assert_matches_report, layer_bytes

            placement = ExpertPlacement(physical_to_logical=case.placement or tuple(range(case.shape.experts)),
                                        ep_size=case.ep)
            routes = [per_rank[r].routes[layer_index] for r in range(case.ep)]
            expert_rank = placement.rank_of_logical()[np.concatenate(routes)]
            home = np.concatenate([np.full(len(x), r) for r, x in enumerate(routes)])
            assert_matches_report(layer_bytes(expert_rank, home, num_ranks=case.ep, wire=wire, dispatcher="specmoe"), report)
        # Node measures, counted again here by plain loops from the replayed routes.
        if case.gpus_per_node is not None:
            assert report.nodes is not None and report.nodes.gpus_per_node == case.gpus_per_node
            if kind == "layer" and case.tp == 1:
                g = case.gpus_per_node
                p2l = case.placement or tuple(range(case.shape.experts))
                n = case.shape.experts // case.ep
                node_of = {e: p2l.index(e) // n // g for e in range(case.shape.experts)}
                remote_pairs = remote_nodes = 0
                for src in range(case.ep):
                    for route in per_rank[src].routes[layer_index]:
                        other = [node_of[int(e)] for e in route if node_of[int(e)] != src // g]
                        remote_pairs += len(other)
                        remote_nodes += len(set(other))
                assert (report.nodes.remote_node_pairs, report.nodes.remote_nodes) == (remote_pairs, remote_nodes)
                row = case.shape.hidden * 4
                assert report.internode_bytes("per_pair") == remote_pairs * (2 * row + 4)
                assert report.internode_bytes("per_node") == remote_nodes * 2 * row + remote_pairs * 4
        else:
            assert report.nodes is None
        # Silent experts: the ranks that host only them receive nothing.
        if case.silent_experts:
            placement = case.placement or tuple(range(case.shape.experts))
            n = case.shape.experts // case.ep
            for dst in range(case.ep):
                if set(placement[dst * n : (dst + 1) * n]) <= set(case.silent_experts):
                    assert all(report.pairs[src][dst] == 0 for src in range(case.ep))
                    assert report.measures.load_per_rank[dst] == 0


def _check_replica_routes(case, per_rank):
    """The records equal the routes replayed through the plan's route table (a pair goes to the copy
    on its token's rank if there is one, else to the least planned-load copy), and the replicas
    made pairs local that the base placement sends away."""
    import numpy as np

    from megatron_specmoe.sim.simulate import assert_matches_report, layer_bytes
    from megatron_specmoe.testing.lossless import replica_placement

    rep = replica_placement(case)
    table, s = rep.route_table(), rep.slots_per_rank
    routes = [per_rank[r].routes[0] for r in range(case.ep)]
    home = np.concatenate([np.full(len(x), r) for r, x in enumerate(routes)])
    experts = np.concatenate(routes)
    slot = table[experts, home[:, None]]
    wire = WireFormat(hidden_size=case.shape.hidden, activation_bytes=4, prob_bytes=4)
    report = per_rank[0].reports[0]
    assert_matches_report(layer_bytes(slot // s, home, num_ranks=case.ep, wire=wire, dispatcher="specmoe"), report)
    # By hand for two pairs: expert 7 lives on rank 1 with a replica on rank 0 (planned load 0, the
    # least): from rank 3 it goes to rank 0's replica slot (0 * 3 + 2); from rank 1 it stays local.
    if case.replica_extra == REPLICAS and case.replica_load is None:
        assert table[7, 3] == 2 and table[7, 1] == 3 and table[1, 1] == 5
    base_local = int((rep.base.rank_of_logical()[experts] == home[:, None]).sum())
    assert sum(report.pairs[r][r] for r in range(case.ep)) > base_local
    assert int((slot % s >= rep.base.experts_per_rank).sum()) > 0  # replica slots served pairs


def test_lossless_four_ranks():
    cases = [
        ("layer", LosslessCase(ep=4)),
        ("layer", LosslessCase(ep=4, placement=PERMUTED, silent_experts=(5, 2), ragged=True)),
        ("layer", LosslessCase(ep=4, placement=PERMUTED, via="hook", gpus_per_node=2)),
        ("layer", LosslessCase(ep=2, placement=PERMUTED, shape=MoEShape(shared_ffn=24))),
        ("layer", LosslessCase(ep=1, placement=PERMUTED)),
        ("layer", LosslessCase(ep=4, placement=PERMUTED, replica_extra=REPLICAS)),
        ("layer", LosslessCase(ep=4, placement=PERMUTED, replica_extra=REPLICAS, wrong_replica=True)),
        ("layer", LosslessCase(ep=4, placement=PERMUTED, replica_extra=((7, 1), (1, 3), (3, 5), (5, 7)),
                               replica_load=(3.0, 2.0, 1.0, 0.0), ragged=True)),
        ("layer", LosslessCase(tp=2, ep=2)),
        ("layer", LosslessCase(tp=2, ep=2, placement=PERMUTED, silent_experts=(5, 2, 7, 0))),
        ("gpt", LosslessCase(ep=4, seq=8, shape=MoEShape(layers=2))),
        ("gpt", LosslessCase(ep=4, seq=8, shape=MoEShape(layers=2), placement=PERMUTED, via="hook",
                             gpus_per_node=2)),
        ("gpt", LosslessCase(tp=2, ep=2, seq=8, shape=MoEShape(layers=2), placement=PERMUTED)),
        # The launcher's replica path on a whole GPT model: twins swapped in, slots filled.
        ("gpt", LosslessCase(ep=4, seq=8, shape=MoEShape(layers=2), placement=PERMUTED, replica_extra=REPLICAS)),
        ("gpt", LosslessCase(ep=4, seq=8, shape=MoEShape(layers=2), placement=PERMUTED, replica_extra=REPLICAS,
                             wrong_replica=True)),
    ]
    _check(run_local(run_cases, 4, cases), cases)


@pytest.mark.slow
def test_lossless_eight_ranks():
    cases = [
        ("layer", LosslessCase(ep=8, placement=PERMUTED, silent_experts=(3,), ragged=True)),
    ]
    _check(run_local(run_cases, 8, cases), cases)
