"""Predictors in device form (``predict.device``, ``device_scorer``): row for
row equal to the host path, hand-worked values, ids outside the table, and the refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_specmoe.schedule.placement import ExpertPlacement
from megatron_specmoe.predict.base import RouteContext, rank_scores
from megatron_specmoe.predict.layer_table import LayerTable
from megatron_specmoe.predict.device import compile_rank_table, token_id_bound
from megatron_specmoe.predict.token_table import TokenTable
from megatron_specmoe.artifacts.traces import RoutingTrace

# E = 4, k = 1, L = 1: token 2 always to expert 3, token 5 always to expert 0; ids 0, 1, 3, 4
# never seen and score the layer prior.
ROUTES = np.array([[[3]], [[3]], [[0]], [[3]]], dtype=np.int32)
IDS = np.array([2, 2, 5, 2], dtype=np.int64)


def _table(**kw) -> TokenTable:
    return TokenTable(alpha=0.0, **kw).fit(RoutingTrace(experts=ROUTES, num_experts=4, token_ids=IDS))


def test_hand_worked_values_and_ids_outside_the_table():
    # Placement: EP ranks {0: experts 0, 1}, {1: experts 2, 3}; alpha = 0, so a seen token scores
    # its own counts: id 2 -> all on expert 3 (rank 1), id 5 -> all on expert 0 (rank 0).
    placement = ExpertPlacement.contiguous(4, 2)
    table = _table()
    assert token_id_bound(table) == 6  # largest fitted id 5, plus one
    rt = compile_rank_table(table, layer=0, placement=placement, ep_base=0, tp=2)
    assert rt.vocab_size == 6 and tuple(rt.table.shape) == (7, 2)
    got = rt.lookup(torch.tensor([2, 5, 0, 99, -3]))
    prior = table.expert_scores(RouteContext(layer=0, token_ids=np.array([0])))[0]
    prior_ranks = [prior[0] + prior[1], prior[2] + prior[3]]
    want = torch.tensor([[0.0, 1.0], [1.0, 0.0], prior_ranks, prior_ranks, prior_ranks])
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("vocab_size", [None, 40])
def test_lookup_equals_the_host_path_row_for_row(vocab_size):
    rng = np.random.default_rng(0)
    t, layers, e, k = 400, 3, 8, 2
    experts = np.stack([rng.choice(e, size=(layers, k), replace=False) for _ in range(t)]).astype(np.int32)
    ids = rng.integers(0, 30, size=t)
    trace = RoutingTrace(experts=experts, num_experts=e, token_ids=ids)
    pred = TokenTable(alpha=1.0, vocab_size=vocab_size).fit(trace)
    placement = ExpertPlacement.from_rank_groups([[5, 1], [0, 7], [2, 3], [6, 4]])  # permuted
    query = np.concatenate([rng.integers(-5, 60, size=300), [0, 29, 39, 40]])
    for layer in range(layers):
        host = rank_scores(pred.expert_scores(RouteContext(layer=layer, token_ids=query)), placement)
        for ep_base, tp in ((0, 4), (2, 2)):
            rt = compile_rank_table(pred, layer=layer, placement=placement, ep_base=ep_base, tp=tp, chunk=7)
            got = rt.lookup(torch.as_tensor(query)).numpy()
            np.testing.assert_allclose(got, host[:, ep_base : ep_base + tp], rtol=0, atol=1e-6)


def test_refusals_name_the_field():
    placement = ExpertPlacement.contiguous(4, 2)
    with pytest.raises(ValueError, match=r"ep_base=1 \.\. 2 \(tp=2\) lies outside the placement's 2 EP ranks"):
        compile_rank_table(_table(), layer=0, placement=placement, ep_base=1, tp=2)
    with pytest.raises(ValueError, match="vocab_size must be >= 0"):
        compile_rank_table(_table(), layer=0, placement=placement, ep_base=0, tp=2, vocab_size=-1)
    history_only = LayerTable(n=1, min_count=1, alpha=1.0).fit(RoutingTrace(experts=ROUTES, num_experts=4))
    with pytest.raises(ValueError, match="'layer' predictor states no vocabulary size; pass vocab_size="):
        compile_rank_table(history_only, layer=0, placement=placement, ep_base=0, tp=2)


@pytest.mark.parametrize("rule", ["mixture", "max_confidence"])
def test_device_scorers_equal_the_host_predictors(rule):
    from megatron_specmoe.predict.combined import Combined
    from megatron_specmoe.predict.device import layer_device_scorer
    from megatron_specmoe.predict.history_mlp import HistoryMLP

    rng = np.random.default_rng(2)
    t, layers, e, k = 300, 3, 6, 2
    experts = np.stack([np.stack([rng.choice(e, k, replace=False) for _ in range(layers)]) for _ in range(t)])
    ids = rng.integers(0, 25, size=t)
    trace = RoutingTrace(experts=experts.astype(np.int32), num_experts=e, token_ids=ids)
    token = TokenTable(alpha=1.0).fit(trace)
    history = HistoryMLP(hidden=8, epochs=2).fit(trace)
    combined = Combined.of([token, history], rule=rule)
    q_ids = np.concatenate([rng.integers(-3, 40, size=50), [24, 25]])
    q_hist = experts[rng.integers(0, t, size=q_ids.shape[0])]
    for layer in range(layers):
        ctx = RouteContext(layer=layer, token_ids=q_ids, history=q_hist[:, :layer])
        for pred in (token, history, combined):
            scorer = layer_device_scorer(pred, layer=layer)
            got = scorer.scores(token_ids=torch.as_tensor(q_ids), history=torch.as_tensor(q_hist[:, :layer]))
            np.testing.assert_allclose(got.numpy(), pred.expert_scores(ctx), rtol=1e-5, atol=1e-6,
                                       err_msg=f"{pred.kind} layer {layer}")


def test_device_scorer_refuses_kinds_without_a_device_form():
    from megatron_specmoe.predict.device import layer_device_scorer

    table = LayerTable(n=1, min_count=1, alpha=1.0).fit(RoutingTrace(experts=ROUTES, num_experts=4))
    with pytest.raises(ValueError, match="the 'layer' predictor has no device form; use one of"):
        layer_device_scorer(table, layer=0)
