"""Expert grouping: hand-worked layouts, fast path vs reference, exact solve vs heuristics, errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from megatron_specmoe.schedule import grouping_search as gs
from megatron_specmoe.schedule.grouping import (
    GroupingOptions,
    group_experts,
    group_layer,
    grouping_cost,
    placement_from_ranks,
)
from megatron_specmoe.schedule.grouping_milp import solve_exact
from megatron_specmoe.schedule.placement import ExpertPlacement
from megatron_specmoe.artifacts.traces import RoutingTrace

HEURISTICS = ["contiguous", "random", "eplb", "graph", "alternating", "search"]


def _random_routes(rng, tokens, num_experts, k):
    return np.stack([rng.choice(num_experts, k, replace=False) for _ in range(tokens)])


def _groups(placement: ExpertPlacement) -> set[frozenset]:
    return {frozenset(g) for g in placement.rank_groups()}


def _all_placements(num_experts, ep_size):
    """Every balanced partition of the experts into ep_size ranks (as rank_of arrays)."""
    n = num_experts // ep_size

    def rec(left):
        if not left:
            yield []
            return
        first, rest = left[0], left[1:]
        for mates in itertools.combinations(rest, n - 1):
            remaining = [e for e in rest if e not in mates]
            for tail in rec(remaining):
                yield [(first, *mates)] + tail

    for groups in rec(list(range(num_experts))):
        rank_of = np.empty(num_experts, dtype=np.int64)
        for r, g in enumerate(groups):
            rank_of[list(g)] = r
        yield rank_of


@pytest.mark.parametrize("method", ["graph", "alternating", "search", "milp"])
def test_pairs_that_fire_together_share_a_rank(method):
    # E=4, P=2: half the tokens use {0, 3}, half {1, 2}; contiguous puts {0,1} and {2,3}.
    ex = np.array([[0, 3], [1, 2]] * 20)
    pl = group_layer(ex, num_experts=4, ep_size=2, options=GroupingOptions(method=method, theta=0.1))
    assert _groups(pl) == {frozenset({0, 3}), frozenset({1, 2})}
    cost = grouping_cost(ex, pl, theta=0.1)
    assert cost.co_located_share == 1.0 and cost.remote_share == 0.0
    base = grouping_cost(ex, ExpertPlacement.contiguous(4, 2), theta=0.1)
    assert base.co_located_share == 0.0 and base.remote_share == 0.5


@pytest.mark.parametrize("method", HEURISTICS)
def test_every_rank_hosts_e_over_p_experts(method):
    rng = np.random.default_rng(3)
    ex = _random_routes(rng, 120, 12, 3)
    pl = group_layer(ex, num_experts=12, ep_size=3, options=GroupingOptions(method=method, seed=5))
    assert [len(g) for g in pl.rank_groups()] == [4, 4, 4]
    assert sorted(pl.physical_to_logical) == list(range(12))


def test_eplb_balances_a_known_load_vector():
    # Loads e0=8, e1=5, e2=1, e3=4 (top-1 routes). Heaviest first into the lightest rank with
    # room: 8->r0, 5->r1, 4->r1, 1->r0, so ranks carry 9 and 9 (contiguous: 13 and 5).
    ex = np.array([0] * 8 + [1] * 5 + [2] * 1 + [3] * 4)[:, None]
    pl = group_layer(ex, num_experts=4, ep_size=2, options=GroupingOptions(method="eplb"))
    assert pl.rank_groups() == [[0, 2], [1, 3]]
    assert grouping_cost(ex, pl, theta=1.0).load_imbalance == 1.0
    assert grouping_cost(ex, ExpertPlacement.contiguous(4, 2), theta=1.0).load_imbalance == pytest.approx(13 / 9)


def test_co_location_gains_match_recomputation_after_swaps():
    rng = np.random.default_rng(0)
    ex = _random_routes(rng, 200, 12, 3)
    routes = gs.compress_routes(ex, 12)
    state = gs.CoLocationState(routes, np.arange(12) % 4, 4, 0.3)
    for a, b in [(0, 1), (5, 2), (11, 4)]:  # incremental updates, then compare with scratch
        state.apply_swap(a, b)
    base = gs.co_location_local_pairs(routes, state.rank, 4)
    assert state.local == base
    gains = state.gains()
    for a in range(12):
        for b in range(12):
            if state.rank[a] != state.rank[b]:
                r = state.rank.copy()
                r[a], r[b] = r[b], r[a]
                assert gains[a, b] == gs.co_location_local_pairs(routes, r, 4) - base, (a, b)


def test_swap_costs_match_objective_differences():
    rng = np.random.default_rng(1)
    ex = _random_routes(rng, 150, 8, 2)
    routes = gs.compress_routes(ex, 8)
    home = rng.integers(0, 4, 150)
    counts = np.bincount(ex.ravel() * 4 + np.repeat(home, 2), minlength=32).reshape(8, 4)
    start = rng.permutation(np.arange(8) // 2)
    for state in (
        gs.CoLocationState(routes, start, 4, 0.4),
        gs.FixedHomeState(counts, routes.loads, start, 0.4),
        gs.PairwiseState(routes, start, 4, 0.4),
    ):
        cost, before = state.swap_costs(), state.objective()
        a, b = 0, int(np.nonzero(state.rank != state.rank[0])[0][0])
        state.apply_swap(a, b)
        assert state.objective() - before == pytest.approx(cost[a, b])


@pytest.mark.parametrize("theta", [0.0, 0.3])
@pytest.mark.parametrize("ep_size,k", [(3, 2), (2, 3)])
def test_milp_matches_enumeration_and_bounds_heuristics(theta, ep_size, k):
    # E=6: 15 (P=3) or 10 (P=2) balanced placements, enumerated; HiGHS must find the optimum.
    # k=2 uses the pairwise program, k=3 the general one.
    rng = np.random.default_rng(7)
    planted = [[0, 4, 2][:k]] * 30 + [[1, 5, 3][:k]] * 20
    ex = np.concatenate([np.array(planted), _random_routes(rng, 60, 6, k)])
    routes = gs.compress_routes(ex, 6)
    best = min(
        gs.objective_value(
            local_pairs=gs.co_location_local_pairs(routes, r, ep_size),
            rank_loads=np.bincount(r, weights=routes.loads, minlength=ep_size),
            pairs=routes.pairs,
            theta=theta,
        )
        for r in _all_placements(6, ep_size)
    )
    sol = solve_exact(ex, num_experts=6, ep_size=ep_size, theta=theta)
    assert sol.optimal
    assert sol.objective == pytest.approx(best, abs=1e-9)
    assert grouping_cost(ex, sol.placement, theta=theta).objective == pytest.approx(best, abs=1e-9)
    for method in HEURISTICS:
        opts = GroupingOptions(method=method, theta=theta)
        pl = group_layer(ex, num_experts=6, ep_size=ep_size, options=opts)
        assert sol.objective <= grouping_cost(ex, pl, theta=theta).objective + 1e-9, method
    pl = group_layer(ex, num_experts=6, ep_size=ep_size, options=GroupingOptions(method="search", theta=theta))
    assert grouping_cost(ex, pl, theta=theta).objective == pytest.approx(best, abs=1e-9)


def test_fixed_homes_milp_and_search_agree():
    rng = np.random.default_rng(11)
    ex = _random_routes(rng, 80, 6, 2)
    home = rng.integers(0, 3, 80)
    opts = GroupingOptions(method="search", theta=0.2)
    pl = group_layer(ex, num_experts=6, ep_size=3, options=opts, home_rank=home)
    sol = solve_exact(ex, num_experts=6, ep_size=3, theta=0.2, home_rank=home)
    brute = min(
        grouping_cost(ex, placement_from_ranks(r, 3), theta=0.2, home_rank=home).objective
        for groups in _all_placements(6, 3)
        for perm in itertools.permutations(range(3))  # with fixed homes rank labels matter
        for r in [np.asarray(perm)[groups]]
    )
    assert sol.objective == pytest.approx(brute, abs=1e-9)
    assert grouping_cost(ex, pl, theta=0.2, home_rank=home).objective >= brute - 1e-9


@pytest.mark.parametrize("method", ["random", "alternating", "search"])
def test_seeded_methods_are_deterministic(method):
    rng = np.random.default_rng(2)
    ex = _random_routes(rng, 100, 8, 2)
    runs = [
        group_layer(ex, num_experts=8, ep_size=4, options=GroupingOptions(method=method, seed=s))
        for s in (1, 1)
    ]
    assert runs[0] == runs[1]
    if method == "random":
        others = {
            group_layer(ex, num_experts=8, ep_size=4, options=GroupingOptions(method=method, seed=s))
            for s in range(2, 6)
        }
        assert len(others | {runs[0]}) > 1


def test_group_experts_per_layer_and_home_broadcast():
    # Layer 0 pairs {0,3}/{1,2}; layer 1 pairs {0,1}/{2,3}.
    ex = np.array([[[0, 3], [0, 1]], [[1, 2], [2, 3]]] * 10, dtype=np.int32)
    trace = RoutingTrace(experts=ex, num_experts=4)
    out = group_experts(trace, ep_size=2, options=GroupingOptions(method="search"))
    assert [_groups(p) for p in out] == [
        {frozenset({0, 3}), frozenset({1, 2})},
        {frozenset({0, 1}), frozenset({2, 3})},
    ]
    home = np.array([0, 1] * 10)
    out = group_experts(trace, ep_size=2, options=GroupingOptions(method="search", theta=0.0), home_ranks=home)
    # Fixed homes: tokens on rank 0 use {0,3} then {0,1}; rank labels now matter.
    assert out[0].rank_groups() == [[0, 3], [1, 2]]
    assert out[1].rank_groups() == [[0, 1], [2, 3]]


def test_balanced_homes_respects_capacity_and_preference():
    hits = np.array([[2, 0], [2, 0], [1, 1], [0, 2]])
    home = gs.balanced_homes(hits, capacity=2)
    assert home.tolist() == [0, 0, 1, 1]
    assert np.bincount(gs.balanced_homes(np.array([[2, 0]] * 4), capacity=2)).tolist() == [2, 2]


def test_bad_input_errors_name_the_problem():
    ex = np.array([[0, 1], [2, 3]])
    with pytest.raises(ValueError, match="ep_size=4 does not divide num_experts=6"):
        group_layer(ex, num_experts=6, ep_size=4, options=GroupingOptions())
    with pytest.raises(ValueError, match=r"theta=1.5 must lie in \[0, 1\]"):
        GroupingOptions(theta=1.5)
    with pytest.raises(ValueError, match=r"theta=-0.1 must lie in \[0, 1\]"):
        grouping_cost(ex, ExpertPlacement.contiguous(4, 2), theta=-0.1)
    with pytest.raises(ValueError, match="method='greedy' is unknown"):
        GroupingOptions(method="greedy")
    with pytest.raises(ValueError, match="selects the same expert twice"):
        group_layer(np.array([[1, 1]]), num_experts=4, ep_size=2, options=GroupingOptions())
    with pytest.raises(ValueError, match="'graph' plans from co-activation only"):
        group_layer(ex, num_experts=4, ep_size=2, options=GroupingOptions(method="graph"),
                    home_rank=np.array([0, 1]))
    with pytest.raises(ValueError, match=r"home ranks must lie in 0..1"):
        group_layer(ex, num_experts=4, ep_size=2, options=GroupingOptions(), home_rank=np.array([0, 2]))
    trace = RoutingTrace(experts=ex[:, None, :], num_experts=4)
    with pytest.raises(ValueError, match=r"home_ranks must be int \[T\]=\(2,\)"):
        group_experts(trace, ep_size=2, options=GroupingOptions(), home_ranks=np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match="the limit is"):
        solve_exact(_random_routes(np.random.default_rng(0), 3000, 32, 4), num_experts=32, ep_size=8, theta=0.1)


def test_cli_group_writes_one_placement_per_layer(tmp_path, capsys):
    import json

    from megatron_specmoe.cli.main import main
    from megatron_specmoe.artifacts.trace_io import write_trace

    ex = np.array([[[0, 3], [0, 1]], [[1, 2], [2, 3]]] * 10, dtype=np.int32)
    write_trace(RoutingTrace(experts=ex, num_experts=4), tmp_path / "t.npz")
    out = tmp_path / "g.json"
    assert main(["group", "--traces", str(tmp_path / "t.npz"), "--ep", "2", "--method", "search",
                 "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    placements = [ExpertPlacement.from_json(x) for x in doc["layers"]]
    assert [_groups(p) for p in placements] == [
        {frozenset({0, 3}), frozenset({1, 2})},
        {frozenset({0, 1}), frozenset({2, 3})},
    ]
    printed = capsys.readouterr().out
    assert "contiguous" in printed and "search" in printed
    assert main(["group", "--traces", str(tmp_path / "t.npz"), "--ep", "3", "--out", str(out)]) == 2
    assert "--ep 3 does not divide" in capsys.readouterr().err
