"""Request placement for DP attention, on hand-worked examples."""

import numpy as np
import pytest

from megatron_specmoe.schedule.placement import ExpertPlacement
from megatron_specmoe.predict.base import RouteContext
from megatron_specmoe.schedule.request_placement import place_requests, request_affinity


def test_group_mask_matches_each_group_one_to_one():
    # 4 requests, 2 ranks: requests 0 and 3 prefer rank 1, 1 and 2 prefer rank 0.
    aff = np.array([[1, 5], [4, 0], [6, 1], [0, 3]], dtype=np.float32)
    out = place_requests(aff, np.array([10, 10, 10, 10]), method="group_mask")
    assert out.rank.tolist() == [1, 0, 0, 1]
    assert out.predicted_local_pairs == pytest.approx(5 + 4 + 6 + 3)
    assert out.tokens_per_rank.tolist() == [20, 20]
    # Round robin ignores affinity.
    rr = place_requests(aff, np.array([10, 10, 10, 10]), method="round_robin")
    assert rr.rank.tolist() == [0, 1, 0, 1] and rr.predicted_local_pairs == pytest.approx(1 + 0 + 6 + 3)


def test_group_mask_keeps_counts_even_when_all_prefer_one_rank():
    aff = np.array([[9, 0], [8, 0], [7, 0], [6, 0]], dtype=np.float32)
    out = place_requests(aff, np.ones(4, dtype=np.int64), method="group_mask")
    assert np.bincount(out.rank, minlength=2).tolist() == [2, 2]


def test_balanced_respects_token_slack():
    # One long request and three short ones all preferring rank 0.
    aff = np.array([[30, 0], [10, 0], [10, 0], [10, 0]], dtype=np.float32)
    lens = np.array([30, 10, 10, 10])
    out = place_requests(aff, lens, method="balanced", slack=0.0)
    assert out.tokens_per_rank.tolist() == [30, 30]
    assert out.rank[0] == 0  # longest first takes its best rank
    assert out.token_imbalance == pytest.approx(1.0)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="method='fifo'"):
        place_requests(np.zeros((2, 2)), np.ones(2), method="fifo")
    with pytest.raises(ValueError, match=r"affinity must be \[R, P\] and lengths \[R\]"):
        place_requests(np.zeros((2, 2)), np.ones(3))


class _TwoTokenPredictor:
    """Token 0 always routes to expert 0, token 1 to expert 3 (E = 4)."""

    kind, num_experts, num_layers = "test", 4, 2

    def expert_scores(self, ctx: RouteContext):
        out = np.zeros((len(ctx.token_ids), 4), dtype=np.float32)
        out[ctx.token_ids == 0, 0] = 1.0
        out[ctx.token_ids == 1, 3] = 1.0
        return out


def test_request_affinity_sums_tokens_and_layers():
    placements = [ExpertPlacement.contiguous(4, 2), ExpertPlacement(physical_to_logical=(3, 1, 2, 0), ep_size=2)]
    aff = request_affinity(_TwoTokenPredictor(), [np.array([0, 0]), np.array([1])], placements)
    # layer 0: expert 0 on rank 0, expert 3 on rank 1; layer 1: expert 0 on rank 1, expert 3 on rank 0.
    assert aff.tolist() == [[2.0, 2.0], [1.0, 1.0]]


def test_online_rank_hand_worked():
    from megatron_specmoe.schedule.request_placement import online_rank

    # Shares 0.1 / 0.6 / 0.3; free slots 4/4, 1/4, 3/4 (max 4).
    aff, pending = np.array([1.0, 6.0, 3.0]), np.array([0, 3, 1])
    # weight 0.5: 0.5*[0.1, 0.6, 0.3] + 0.5*[1, 0.25, 0.75] = [0.55, 0.425, 0.525] -> rank 0.
    assert online_rank(aff, pending, max_requests=4, weight=0.5) == 0
    # weight 0.9: [0.19, 0.565, 0.345] -> rank 1 (affinity wins).
    assert online_rank(aff, pending, max_requests=4, weight=0.9) == 1
    # weight 0: Megatron's least-loaded; ties (no affinity, equal load) go to the lower rank.
    assert online_rank(aff, pending, max_requests=4, weight=0.0) == 0
    assert online_rank(np.zeros(3), np.array([2, 1, 1]), max_requests=4) == 1
    with pytest.raises(ValueError, match=r"weight must be in \[0, 1\], got 1.5"):
        online_rank(aff, pending, max_requests=4, weight=1.5)
    with pytest.raises(ValueError, match=r"both be \[P\], got \(3,\) and \(2,\)"):
        online_rank(aff, pending[:2], max_requests=4)


# ---- whole traces (trace_request_homes) and the evaluator's "requests" side ----------------------
class _ByTokenId:
    """Token id 0 -> expert 0 (rank 0 of 2), token id 1 -> expert 2 (rank 1); E = 4, top-1 scores."""

    num_layers, num_experts = 1, 4

    def expert_scores(self, ctx):
        out = np.zeros((len(ctx.token_ids), 4), np.float32)
        out[np.arange(len(ctx.token_ids)), 2 * np.asarray(ctx.token_ids)] = 1.0
        return out

    def memory_bytes(self):
        return 0


REQ = np.array([0, 0, 1, 1, 1, 2, 3, 3])
IDS = np.array([1, 1, 1, 1, 0, 0, 0, 0])  # request 0 -> rank 1; 1 -> rank 1 (2 of 3); 2, 3 -> rank 0


def test_trace_request_homes_by_hand():
    from megatron_specmoe.schedule.request_placement import trace_request_homes

    pl = [ExpertPlacement.contiguous(4, 2)]
    kw = dict(predictor=_ByTokenId(), placements=pl)
    rr = trace_request_homes(REQ, IDS, method="round_robin", **kw)
    assert rr.tolist() == [0, 0, 1, 1, 1, 0, 1, 1]
    # group_mask: requests (0, 1) both prefer rank 1 -> the matching gives 1 to one of them;
    # prompts are the first halves: request 1's prompt is token 2 (id 1) -> both want rank 1 fully,
    # the tie goes to the earlier request's lower cost assignment; (2, 3) both want rank 0.
    gm = trace_request_homes(REQ, IDS, method="group_mask", **kw)
    assert sorted(set(gm[[0, 2]].tolist())) == [0, 1] and sorted(set(gm[[5, 6]].tolist())) == [0, 1]
    # affinity, one slot per rank per round of 2: request 0 takes rank 1 (share 1); request 1 also
    # prefers rank 1 but finds it full: 0.5 * 1 + 0.5 * 0 ties rank 0's 0.5 * 0 + 0.5 * 1 -> rank 0.
    # Round 2 starts free: request 2 (id 0) -> rank 0; request 3 ties again -> rank 0 (the load
    # term is soft: online_rank never refuses a full rank).
    af = trace_request_homes(REQ, IDS, method="affinity", slots=1, weight=0.5, **kw)
    assert af.tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    # least loaded ignores affinity: lowest rank with free slots first.
    ll = trace_request_homes(REQ, IDS, method="least_loaded", slots=1, **kw)
    assert ll.tolist() == rr.tolist()
    with pytest.raises(ValueError, match="choose one of"):
        trace_request_homes(REQ, IDS, method="random", **kw)
    with pytest.raises(ValueError, match="has none; use round_robin"):
        trace_request_homes(REQ, None, method="affinity", **kw)
    with pytest.raises(ValueError, match="consecutive"):
        trace_request_homes(np.array([0, 1, 0]), None, method="round_robin", **kw)


def test_evaluate_requests_side():
    from megatron_specmoe.artifacts.traces import RoutingTrace
    from megatron_specmoe.measure.evaluate import evaluate_trace

    experts = (2 * IDS)[:, None, None].astype(np.int32)  # top-1: the expert the id names
    trace = RoutingTrace(experts=experts, num_experts=4, token_ids=IDS, request_ids=REQ)
    home = np.array([1, 1, 0, 0, 0, 0, 1, 1])
    ev = evaluate_trace(trace, _ByTokenId(), [ExpertPlacement.contiguous(4, 2)], batch_size=8,
                        request_home=home).to_json()
    # local: tokens 0, 1 (expert 2 on rank 1), 4, 5 (expert 0 on rank 0) -> 4 of 8
    assert ev["requests"]["local_activation_rate"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="request_home must be int"):
        evaluate_trace(trace, _ByTokenId(), [ExpertPlacement.contiguous(4, 2)], request_home=home[:3])
