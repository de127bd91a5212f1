"""Balanced token -> rank assignment: hand-worked plans, capacity, padding, optimality."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_specmoe.planning.assignment import (
    ASSIGNMENT_METHODS,
    assign,
    plan_from_home,
    planned_score,
    real_capacities,
)

METHODS = sorted(ASSIGNMENT_METHODS)


def test_t4_p2_hand_worked_optimum_for_every_method():
    # Gains of rank 0 over rank 1: 0.8, 0.6, 0.4, -0.8: tokens 0 and 1 belong on rank 0.
    scores = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.1, 0.9]], dtype=np.float32)
    for method in ["argsort", "greedy", "refine", "optimal"]:
        plan = assign(scores, method)
        plan.check()
        assert plan.home_rank.tolist() == [0, 0, 1, 1], method
        assert plan.order.tolist() == [0, 1, 2, 3]
        assert plan.capacity == 2
        assert planned_score(scores, plan) == pytest.approx(0.9 + 0.8 + 0.3 + 0.9)


def test_shuffled_tokens_are_grouped_by_home_rank():
    # Tokens 1 and 3 prefer rank 0, tokens 0 and 2 rank 1.
    scores = np.array([[0.0, 1.0], [1.0, 0.0], [0.2, 0.8], [0.7, 0.3]], dtype=np.float32)
    plan = assign(scores, "optimal")
    assert plan.home_rank.tolist() == [1, 0, 1, 0]
    assert plan.order.tolist() == [1, 3, 0, 2]  # rank 0 holds rows 1, 3; rank 1 holds rows 0, 2
    assert plan.inverse.tolist() == [2, 0, 3, 1]
    x = torch.arange(4) * 10
    assert torch.equal(x[plan.order][plan.inverse], x)


def test_greedy_is_suboptimal_where_refine_and_optimal_are_not():
    # Both tokens like rank 0 best; token 0 loses little by moving, token 1 a lot.
    scores = np.array([[1.0, 0.9], [0.95, 0.0]], dtype=np.float32)
    got = {m: assign(scores, m).home_rank.tolist() for m in METHODS}
    assert got["greedy"] == [0, 1] and got["argsort"] == [0, 1]
    assert got["refine"] == [1, 0] and got["optimal"] == [1, 0]
    assert planned_score(scores, assign(scores, "greedy")) == pytest.approx(1.0)
    assert planned_score(scores, assign(scores, "optimal")) == pytest.approx(1.85)


def test_padding_last_ranks_get_one_fewer_real_token():
    assert real_capacities(5, 2) == [3, 2]
    assert real_capacities(5, 4) == [2, 1, 1, 1]
    assert real_capacities(8, 4) == [2, 2, 2, 2]
    plan = assign(np.ones((5, 4), dtype=np.float32), "contiguous")
    plan.check()
    assert plan.capacity == 2 and plan.padded_tokens == 8
    assert plan.home_rank.tolist() == [0, 0, 1, 2, 3]
    # Pad rows 5, 6, 7 sit last on ranks 1, 2, 3.
    assert plan.shards().tolist() == [[0, 1], [2, 5], [3, 6], [4, 7]]


@pytest.mark.parametrize("method", METHODS)
def test_uneven_batch_respects_capacity_and_places_every_token_once(method):
    rng = np.random.default_rng(3)
    scores = rng.dirichlet(np.full(4, 0.3), size=13).astype(np.float32)
    plan = assign(scores, method)
    plan.check()  # permutation, inverse, per-rank real counts [4, 3, 3, 3]
    assert torch.bincount(plan.home_rank, minlength=4).tolist() == [4, 3, 3, 3]
    assert sorted(plan.order[plan.order < 13].tolist()) == list(range(13))


@pytest.mark.parametrize("method", METHODS)
def test_equal_scores_fall_back_to_contiguous_shards(method):
    plan = assign(np.full((6, 3), 0.5, dtype=np.float32), method)
    assert plan.home_rank.tolist() == [0, 0, 1, 1, 2, 2]
    plan = assign(np.tile(np.array([[1.0, 0.0, 0.0, 0.0]], dtype=np.float32), (8, 1)), method)
    assert plan.home_rank.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


@pytest.mark.parametrize("method", METHODS)
def test_deterministic(method):
    scores = np.round(np.random.default_rng(5).random((40, 4)), 1).astype(np.float32)  # many ties
    a, b = assign(scores, method), assign(torch.from_numpy(scores.copy()), method)
    assert torch.equal(a.order, b.order) and torch.equal(a.home_rank, b.home_rank)


@pytest.mark.parametrize("tokens,ranks", [(7, 3), (32, 4), (50, 8), (64, 8)])
def test_optimal_matches_linear_sum_assignment_and_bounds_the_others(tokens, ranks):
    lsa = pytest.importorskip("scipy.optimize").linear_sum_assignment
    rng = np.random.default_rng(tokens * ranks)
    for _ in range(3):
        scores = rng.dirichlet(np.full(ranks, 0.3), size=tokens).astype(np.float32)
        cols = np.repeat(np.arange(ranks), real_capacities(tokens, ranks))
        rows, slots = lsa(-scores[:, cols].astype(np.float64))
        best = float(scores[rows, cols[slots]].astype(np.float64).sum())
        got = {m: planned_score(scores, assign(scores, m)) for m in METHODS}
        assert got["optimal"] == pytest.approx(best, rel=1e-6)
        assert all(v <= best + 1e-4 for v in got.values())
        assert got["refine"] >= got["greedy"] - 1e-6
        assert got["greedy"] >= got["contiguous"] - 1e-6


def test_plan_from_home_roundtrip():
    home = torch.tensor([2, 0, 1, 0, 2, 1])
    plan = plan_from_home(home, 3)
    plan.check()
    assert plan.shards().tolist() == [[1, 3], [2, 5], [0, 4]]


def test_check_rejects_unbalanced_home():
    with pytest.raises(ValueError, match="real tokens per rank"):
        plan_from_home(torch.tensor([0, 0, 0, 1]), 2).check()


def test_bad_input_errors():
    with pytest.raises(ValueError, match="unknown method 'hungarian'"):
        assign(np.zeros((4, 2), dtype=np.float32), "hungarian")
    with pytest.raises(ValueError, match=r"must be \[T, P\]"):
        assign(np.zeros(4, dtype=np.float32), "greedy")
    with pytest.raises(ValueError, match="NaN or inf"):
        assign(np.array([[0.5, np.nan]], dtype=np.float32), "greedy")


def test_greedy_with_fewer_rounds_fills_the_free_rows_in_index_order():
    from megatron_specmoe.planning.assignment import _greedy

    scores = torch.tensor([[0.7, 0.0], [1.0, 0.0], [0.9, 0.0], [0.8, 0.0]])
    room = torch.tensor([2, 2])
    # Round 1: rank 0 takes its two best asks (tokens 1, 2); tokens 0 and 3 fill rank 1.
    assert _greedy(scores, room, rounds=1).tolist() == [1, 0, 0, 1]
    assert _greedy(scores, room).tolist() == [1, 0, 0, 1]


@pytest.mark.parametrize("ranks", [2, 3, 4, 5, 8])
def test_round_robin_schedule_covers_every_pair_once_with_disjoint_rounds(ranks):
    from megatron_specmoe.planning.assignment import _round_robin

    partner = _round_robin(ranks, torch.device("cpu"))
    n = ranks + ranks % 2
    assert partner.shape == (n - 1, n)
    pairs = []
    for row in partner.tolist():
        assert all(row[row[r]] == r and row[r] != r for r in range(n))  # a perfect matching
        pairs += [(r, row[r]) for r in range(ranks) if r < row[r] < ranks]
    assert sorted(pairs) == [(x, y) for x in range(ranks) for y in range(x + 1, ranks)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["contiguous", "argsort", "greedy", "refine"])
def test_torch_methods_on_cuda_match_cpu(method):
    scores = torch.from_numpy(np.random.default_rng(7).dirichlet(np.full(8, 0.3), size=1000).astype(np.float32))
    gpu = assign(scores.cuda(), method, validate=False)
    assert gpu.order.device.type == "cuda"
    assert torch.equal(gpu.order.cpu(), assign(scores, method).order)
