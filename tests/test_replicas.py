"""Redundant experts (schedule/replicas.py, measure/replica_routes.py) on a hand-worked layer."""

import numpy as np
import pytest
import torch

from megatron_specmoe.artifacts.traces import RoutingTrace
from megatron_specmoe.measure.evaluate import evaluate_trace
from megatron_specmoe.measure.measures import measure_routes
from megatron_specmoe.measure.replica_routes import replica_hits, replica_rank_scores, routed_rank_hits
from megatron_specmoe.predict.base import RouteContext
from megatron_specmoe.schedule.placement import ExpertPlacement
from megatron_specmoe.schedule.replicas import (
    ReplicatedPlacement,
    replicas_from_arrays,
    replicas_to_arrays,
    replicate,
)

# E = 4 on P = 2: rank 0 hosts {0, 1}, rank 1 {2, 3}. 12 top-2 tokens: 8 x {0, 2}, 2 x {1, 3}, 2 x {0, 1}.
BASE = ExpertPlacement.contiguous(4, 2)
ROUTES = np.array([[0, 2]] * 8 + [[1, 3]] * 2 + [[0, 1]] * 2)


@pytest.mark.parametrize("policy", ["load", "coactivation", "both"])
def test_replicas_by_hand(policy):
    # load: e0 has the most pairs (10) -> a copy on rank 1; then e2 (8 per copy) -> rank 0.
    # coactivation: every token's co-location home is rank 0 (ties low); rank 0 gains most from
    # e2 (8 tokens), then rank 1's free slot takes the first remaining (e0, gain 0).
    rep = replicate(BASE, ROUTES, redundant=2, policy=policy)
    assert rep.extra == ((2,), (0,)) and rep.policy == policy
    assert rep.physical_to_logical == (0, 1, 2, 2, 3, 0)
    assert rep.slots_per_rank == 3 and rep.redundant == 2
    assert rep.copies().tolist() == [2, 1, 2, 1]
    # planned load: rank 0 holds e0 (10/2), e1 (4), e2 (8/2) = 13; rank 1: e2 4, e3 2, e0 5 = 11
    assert rep.planned_load == (13.0, 11.0)
    # local copy if any, else the copy on the least planned load rank (rank 1 here)
    assert rep.route_table().tolist() == [[0, 5], [1, 1], [2, 3], [4, 4]]


def test_routed_measures_by_hand():
    rep = replicate(BASE, ROUTES, redundant=2, policy="load")
    ex = torch.from_numpy(ROUTES)
    mask = torch.from_numpy(rep.rank_mask())
    assert replica_hits(ex, mask)[:1].tolist() == [[2, 2]]  # {0, 2}: both copies on both ranks
    home = torch.tensor([0] * 4 + [1] * 4 + [1, 1] + [0, 0])
    hits = routed_rank_hits(ex, home, torch.from_numpy(rep.route_table()), rep.slots_per_rank, 2)
    m = measure_routes(hits, home)
    # {0,2} x8 all local; {1,3} on rank 1: e1 -> rank 0 (only copy), e3 local; {0,1} on 0: local
    assert (m.pairs, m.local_pairs, m.remote_ranks) == (24, 22, 2)
    assert m.load_per_rank == (8 + 2 + 4, 8 + 2)
    scores = np.full((1, 4), 0.25, np.float32)
    np.testing.assert_allclose(replica_rank_scores(scores, rep.rank_mask()), [[0.75, 0.75]])


class _Perfect:
    num_layers, num_experts = 1, 4

    def __init__(self, trace):
        self.trace = trace

    def expert_scores(self, ctx: RouteContext) -> np.ndarray:
        out = np.zeros((self.trace.num_tokens, 4), np.float32)
        np.put_along_axis(out, self.trace.experts[:, ctx.layer].astype(np.int64), 0.5, axis=1)
        return out

    def memory_bytes(self) -> int:
        return 0


def test_evaluate_with_replicas():
    trace = RoutingTrace(experts=ROUTES[:, None, :].astype(np.int32), num_experts=4)
    rep = replicate(BASE, ROUTES, redundant=2, policy="load")
    ev = evaluate_trace(trace, _Perfect(trace), [BASE], batch_size=12, method="optimal", replicas=[rep])
    out = ev.to_json()
    # Without replicas the best balanced shuffle keeps 14 of 24 pairs local: {0,1} x2 on rank 0
    # (4), each other token 1.
    assert out["oracle"]["local_activation_rate"] == pytest.approx(14 / 24)
    # With them, 22 of 24 ({1, 3} still splits), for perfect prediction and the oracle alike.
    assert out["oracle_replicas"]["local_activation_rate"] == pytest.approx(22 / 24)
    assert out["specmoe_replicas"]["local_activation_rate"] == pytest.approx(22 / 24)
    assert out["config"]["redundant_experts"] == 2
    with pytest.raises(ValueError, match="another base placement"):
        evaluate_trace(trace, _Perfect(trace), [ExpertPlacement(physical_to_logical=(1, 0, 2, 3), ep_size=2)],
                       replicas=[rep])


def test_arrays_round_trip():
    reps = [replicate(BASE, ROUTES, redundant=2, policy="both")] * 2
    back = replicas_from_arrays([BASE, BASE], replicas_to_arrays(reps), "both")
    assert back == reps
    assert replicas_from_arrays([BASE], {}, "load") is None


def test_bad_replicas():
    with pytest.raises(ValueError, match="multiple of the EP size 2"):
        replicate(BASE, ROUTES, redundant=3)
    with pytest.raises(ValueError, match="at most 2 replicas"):
        replicate(BASE, ROUTES, redundant=6)
    with pytest.raises(ValueError, match="policy='hot'"):
        replicate(BASE, ROUTES, redundant=2, policy="hot")
    with pytest.raises(ValueError, match="rank 0 would hold experts \\[1\\] twice"):
        ReplicatedPlacement(base=BASE, extra=((1,), (0,)), planned_load=(0.0, 0.0), policy="load")
    with pytest.raises(ValueError, match="same number of replica slots"):
        ReplicatedPlacement(base=BASE, extra=((2,), ()), planned_load=(0.0, 0.0), policy="load")
