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
