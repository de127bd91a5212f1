"""Route predictors on tiny synthetic traces whose answers are worked out by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megatron_specmoe.predict.base import RouteContext, RoutePredictor, top_experts
from megatron_specmoe.predict.combined import Combined, combine_scores
from megatron_specmoe.predict.history_mlp import HistoryMLP, history_mlp_bytes
from megatron_specmoe.predict.layer_table import LayerTable
from megatron_specmoe.predict.registry import (
    PREDICTORS,
    fit_predictor,
    load_predictor,
    make,
    predictor_from_state,
)
from megatron_specmoe.predict.token_table import TokenTable, token_table_bytes
from megatron_specmoe.artifacts.traces import RoutingTrace


def trace_of(routes, num_experts, token_ids=None):
    """routes: list of per-token [L][k] lists."""
    return RoutingTrace(
        experts=np.asarray(routes, dtype=np.int32),
        num_experts=num_experts,
        token_ids=None if token_ids is None else np.asarray(token_ids, dtype=np.int64),
    )


# ---- token table ------------------------------------------------------------------------------
# E = 4, k = 2, L = 2. Token 5 goes to expert 2 every time (with a varying partner) at layer 0;
# token 7 always to {0, 1}. Layer 0 selections: e0 3, e1 3, e2 3, e3 1 -> add-one prior
# q0 = [4, 4, 4, 2] / 14.
TOKEN_ROUTES = [
    [[2, 0], [1, 3]],
    [[1, 2], [1, 3]],
    [[3, 2], [1, 3]],
    [[0, 1], [0, 2]],
    [[1, 0], [0, 2]],
]
TOKEN_IDS = [5, 5, 5, 7, 7]
Q0 = np.array([4, 4, 4, 2]) / 14


def test_token_table_scores_by_hand():
    table = TokenTable(alpha=1.0, keep=4).fit(trace_of(TOKEN_ROUTES, 4, TOKEN_IDS))
    scores = table.expert_scores(RouteContext(layer=0, token_ids=np.array([5, 7, 99])))
    # token 5: 3 occurrences * k=2 = 6 selections, shares [1, 1, 3, 1] / 6, blended with alpha=1.
    expect5 = (6 * np.array([1, 1, 3, 1]) / 6 + Q0) / 7
    expect7 = (4 * np.array([2, 2, 0, 0]) / 4 + Q0) / 5
    np.testing.assert_allclose(scores[0], expect5, atol=1e-4)
    np.testing.assert_allclose(scores[1], expect7, atol=1e-4)
    np.testing.assert_allclose(scores[2], Q0, rtol=1e-6)  # unseen id -> the layer's prior
    assert top_experts(scores, 1)[0, 0] == 2
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-5)


def test_token_table_keep_spreads_dropped_mass_by_prior():
    table = TokenTable(alpha=1.0, keep=1).fit(trace_of(TOKEN_ROUTES, 4, TOKEN_IDS))
    scores = table.expert_scores(RouteContext(layer=0, token_ids=np.array([5])))
    # kept: e2 with share 1/2; the other 1/2 goes to e0, e1, e3 in proportion 4 : 4 : 2.
    dist = np.array([0.2, 0.2, 0.5, 0.1])
    np.testing.assert_allclose(scores[0], (6 * dist + Q0) / 7, atol=1e-4)


def test_token_table_vocab_bound_and_errors():
    trace = trace_of(TOKEN_ROUTES, 4, TOKEN_IDS)
    with pytest.raises(ValueError, match="token id 7 >= vocab_size=6"):
        TokenTable(vocab_size=6).fit(trace)
    table = TokenTable(vocab_size=8).fit(trace)
    scores = table.expert_scores(RouteContext(layer=0, token_ids=np.array([8, -1, 7])))
    np.testing.assert_allclose(scores[:2], np.stack([Q0, Q0]), rtol=1e-6)
    assert not np.allclose(scores[2], Q0)
    with pytest.raises(ValueError, match="has no token_ids"):
        TokenTable().fit(trace_of(TOKEN_ROUTES, 4))
    with pytest.raises(ValueError, match="token_ids is None"):
        table.expert_scores(RouteContext(layer=0, history=np.zeros((1, 0, 2), np.int32)))
    with pytest.raises(ValueError, match="layer=2 is outside"):
        table.expert_scores(RouteContext(layer=2, token_ids=np.array([5])))
    with pytest.raises(ValueError, match="not fitted"):
        TokenTable().expert_scores(RouteContext(layer=0, token_ids=np.array([5])))


def test_token_table_memory_matches_formula():
    table = TokenTable(keep=3).fit(trace_of(TOKEN_ROUTES, 4, TOKEN_IDS))
    assert table.memory_bytes() == token_table_bytes(vocab=2, layers=2, experts=4, keep=3)
    # default keep = min(E, 2k) = 4
    assert TokenTable().fit(trace_of(TOKEN_ROUTES, 4, TOKEN_IDS)).to_state()["config"]["keep"] == 4


# ---- layer table ------------------------------------------------------------------------------
def test_layer_table_deterministic_and_order_free():
    # layer 1 = the complement of layer 0's pair, E = 4, k = 2.
    routes = [[[0, 1], [2, 3]]] * 3 + [[[3, 2], [1, 0]]] * 2
    table = LayerTable(n=1, min_count=1, alpha=0.0).fit(trace_of(routes, 4))
    hist = np.array([[[1, 0]], [[0, 1]], [[2, 3]]])  # router order within a layer must not matter
    scores = table.expert_scores(RouteContext(layer=1, history=hist))
    np.testing.assert_allclose(scores, [[0, 0, 0.5, 0.5], [0, 0, 0.5, 0.5], [0.5, 0.5, 0, 0]])


def test_layer_table_smoothing_by_hand():
    routes = [[[0, 1], [2, 3]]] * 3 + [[[3, 2], [1, 0]]] * 2
    table = LayerTable(n=1, min_count=1, alpha=1.0).fit(trace_of(routes, 4))
    q1 = np.array([2 + 1, 2 + 1, 3 + 1, 3 + 1]) / 14  # layer-1 selections, add-one
    scores = table.expert_scores(RouteContext(layer=1, history=np.array([[[0, 1]]])))
    # p = (c + alpha*k*q) / (N*k + alpha*k) with c = [0, 0, 3, 3], N = 3
    np.testing.assert_allclose(scores[0], (np.array([0, 0, 3, 3]) + 2 * q1) / 8, rtol=1e-5)
    # unseen context and layer 0 -> prior
    unseen = table.expert_scores(RouteContext(layer=1, history=np.array([[[0, 3]]])))
    np.testing.assert_allclose(unseen[0], q1, rtol=1e-5)
    q0 = np.array([3 + 1, 3 + 1, 2 + 1, 2 + 1]) / 14  # layer-0 selections, add-one
    first = table.expert_scores(RouteContext(layer=0, history=np.zeros((2, 0, 2), np.int64)))
    np.testing.assert_allclose(first, np.stack([q0, q0]), rtol=1e-5)
    none = table.expert_scores(RouteContext(layer=1, token_ids=np.array([4, 4])))
    np.testing.assert_allclose(none, np.stack([q1, q1]), rtol=1e-5)


def test_layer_table_backs_off_from_rare_context():
    # L = 3. At layer 1 both token types share the set {2, 3}; they differ at layer 0.
    routes = [[[0, 1], [2, 3], [0, 2]]] * 3 + [[[1, 3], [2, 3], [1, 3]]]
    hist = np.array([[[1, 3], [2, 3]]])
    order1 = np.array([3, 1, 3, 1]) / 8  # after {2,3}: 4 tokens, 8 selections
    rare = LayerTable(n=2, min_count=2, alpha=0.0).fit(trace_of(routes, 4))
    np.testing.assert_allclose(rare.expert_scores(RouteContext(layer=2, history=hist))[0], order1)
    used = LayerTable(n=2, min_count=1, alpha=0.0).fit(trace_of(routes, 4))
    np.testing.assert_allclose(used.expert_scores(RouteContext(layer=2, history=hist))[0], [0, 0.5, 0, 0.5])
    # an order-2 context never seen backs off to order 1 as well
    hist_new = np.array([[[0, 3], [2, 3]]])
    np.testing.assert_allclose(used.expert_scores(RouteContext(layer=2, history=hist_new))[0], order1)


def test_layer_table_chooses_n_on_fitting_data():
    # Layer l's expert = (e[l-1] + e[l-2]) mod 4 (k = 1): one layer of context cannot tell it,
    # two can; the choice must find n >= 2 from the fitting data alone.
    rng = np.random.default_rng(0)
    tokens, layers = 600, 5
    ex = np.zeros((tokens, layers, 1), dtype=np.int32)
    ex[:, :2, 0] = rng.integers(0, 4, size=(tokens, 2))
    for layer in range(2, layers):
        ex[:, layer, 0] = (ex[:, layer - 1, 0] + ex[:, layer - 2, 0]) % 4
    trace = RoutingTrace(experts=ex, num_experts=4)
    table = LayerTable().fit(trace)
    assert table.chosen["n"] >= 2
    assert {row["n"] for row in table.selection} == {1, 2, 3}
    scores = table.expert_scores(RouteContext(layer=4, history=ex[:, :4]))
    assert (scores.argmax(axis=1) == ex[:, 4, 0]).mean() == 1.0


def test_layer_table_more_than_64_experts():
    # E = 70 needs two 64-bit words per expert set; experts 64..69 live in the second word.
    routes = [[[65, 3], [69, 1]]] * 2 + [[[3, 64], [0, 68]]] * 2
    table = LayerTable(n=1, min_count=1, alpha=0.0).fit(trace_of(routes, 70))
    scores = table.expert_scores(RouteContext(layer=1, history=np.array([[[3, 65]], [[64, 3]]])))
    assert set(top_experts(scores, 2)[0]) == {1, 69}
    assert set(top_experts(scores, 2)[1]) == {0, 68}


def test_layer_table_index_probes_past_occupied_slots():
    # 40 contexts whose hashes share their top 16 bits all want the same home slot, so the index
    # must probe up to 39 slots further; every stored context must still find its own row, and
    # look-alikes (same hash, other words; or an unseen hash) must miss.
    from megatron_specmoe.predict.layer_table import _Table

    hashes = (np.uint64(0xABCD) << np.uint64(48)) + np.arange(40, dtype=np.uint64) * np.uint64(7)
    keys = np.arange(40, dtype=np.uint64)[:, None]
    table = _Table(hashes, keys, np.ones((40, 2), np.uint32), np.ones(40, np.uint32))
    table.compile(topk=1, min_count=1, alpha=0.0)
    assert table.probes == 39
    order = np.random.default_rng(0).permutation(40)
    np.testing.assert_array_equal(table.lookup(hashes[order], keys[order]), order)
    wrong_words = table.lookup(hashes[:3], keys[:3] + np.uint64(100))
    unseen = table.lookup(hashes[:3] + np.uint64(1), keys[:3])
    np.testing.assert_array_equal(wrong_words, [40, 40, 40])
    np.testing.assert_array_equal(unseen, [40, 40, 40])


def test_history_shape_is_checked():
    table = LayerTable(n=1, min_count=1, alpha=0.0).fit(trace_of(TOKEN_ROUTES, 4))
    with pytest.raises(ValueError, match=r"history must be \[T, l=1, k=2\]"):
        table.expert_scores(RouteContext(layer=1, history=np.zeros((3, 2, 2), np.int64)))
    with pytest.raises(ValueError, match="outside 0..3"):
        table.expert_scores(RouteContext(layer=1, history=np.full((3, 1, 2), 4)))


# ---- history MLP ------------------------------------------------------------------------------
def test_history_mlp_learns_a_deterministic_mapping():
    # layer 1's pair is a fixed function of layer 0's pair (6 possible pairs of E = 4).
    pairs = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    target = {p: pairs[(i + 2) % 6] for i, p in enumerate(pairs)}
    rng = np.random.default_rng(1)
    first = [pairs[i] for i in rng.integers(0, 6, size=400)]
    ex = np.array([[a, target[a]] for a in first], dtype=np.int32)  # [T, L=2, k=2]
    model = HistoryMLP(hidden=16, epochs=40, patience=40, lr=1e-2, seed=0)
    model.fit(RoutingTrace(experts=ex, num_experts=4))
    hist = np.array([[p] for p in pairs])  # every pair once, [6, 1, 2]
    scores = model.expert_scores(RouteContext(layer=1, history=hist))
    predicted = [tuple(sorted(row)) for row in top_experts(scores, 2).tolist()]
    assert predicted == [target[p] for p in pairs]
    prior = model.expert_scores(RouteContext(layer=0, history=np.zeros((6, 0, 2), np.int64)))
    assert np.allclose(prior, prior[0])  # layer 0: one prior row for everyone
    assert model.memory_bytes() == history_mlp_bytes(layers=2, experts=4, hidden=16)


# ---- combined ---------------------------------------------------------------------------------
def test_combine_rules_by_hand():
    a = np.array([[0.7, 0.1, 0.1, 0.1], [0.4, 0.2, 0.2, 0.2]], dtype=np.float32)
    b = np.array([[0.1, 0.5, 0.2, 0.2], [0.1, 0.6, 0.2, 0.1]], dtype=np.float32)
    np.testing.assert_allclose(combine_scores([a, b], "max_confidence"), [a[0], b[1]])
    mixed0 = 0.7 * a[0] + 0.5 * b[0]
    np.testing.assert_allclose(combine_scores([a, b], "mixture")[0], mixed0 / mixed0.sum(), rtol=1e-6)
    with pytest.raises(ValueError, match="rule must be one of"):
        combine_scores([a, b], "vote")


def test_combined_token_wins_where_layer_table_knows_nothing():
    trace = trace_of(TOKEN_ROUTES, 4, TOKEN_IDS)
    exact_layer = {"layer": {"n": 1, "min_count": 1, "alpha": 0.0}}
    combined = Combined(members=("token", "layer"), rule="max_confidence", member_options=exact_layer)
    combined.fit(trace)
    token = combined.predictors[0]
    ctx = RouteContext(layer=0, token_ids=np.array([5, 7]), history=np.zeros((2, 0, 2), np.int32))
    np.testing.assert_allclose(combined.expert_scores(ctx), token.expert_scores(ctx))
    # at layer 1 the layer table is certain (alpha 0): it wins for token 5
    ctx1 = RouteContext(layer=1, token_ids=np.array([5]), history=np.array([[[2, 0]]]))
    np.testing.assert_allclose(combined.expert_scores(ctx1)[0], [0, 0.5, 0, 0.5])
    # the default rule mixes by confidence: token 5's certain layer-1 row keeps most of the weight
    mixed = Combined.of(combined.predictors).expert_scores(ctx1)[0]
    token1 = token.expert_scores(ctx1)[0]
    expect = 0.5 * np.array([0, 0.5, 0, 0.5]) + token1.max() * token1
    np.testing.assert_allclose(mixed, expect / expect.sum(), rtol=1e-5)
    with pytest.raises(ValueError, match="cannot itself be 'combined'"):
        Combined(members=("combined",))


# ---- every kind: rows sum to 1, state round trip ---------------------------------------------------
def _random_trace(seed=0, tokens=300, layers=4, experts=6, topk=2):
    rng = np.random.default_rng(seed)
    ex = np.argsort(rng.random((tokens, layers, experts)), axis=2)[:, :, :topk].astype(np.int32)
    return RoutingTrace(experts=ex, num_experts=experts, token_ids=rng.integers(0, 40, size=tokens))


FAST_OPTIONS = {
    "token": {},
    "layer": {},
    "history": {"hidden": 8, "epochs": 2},
    "combined": {
        "members": ("token", "layer", "history"),
        "member_options": {"history": {"hidden": 8, "epochs": 2}},
    },
}


@pytest.mark.parametrize("kind", sorted(PREDICTORS))
def test_rows_sum_to_one_and_state_round_trips(kind):
    trace = _random_trace()
    predictor = fit_predictor(kind, trace, **FAST_OPTIONS[kind])
    assert predictor.kind == kind and predictor.num_experts == 6 and predictor.num_layers == 4
    assert isinstance(predictor, RoutePredictor) and not isinstance(make(kind), RoutePredictor)
    assert predictor.memory_bytes() > 0
    state = predictor.to_state()
    assert json.loads(json.dumps(state["config"])) == state["config"]  # JSON-exact for the plan
    assert all(isinstance(a, np.ndarray) for a in state["arrays"].values())
    clone = load_predictor(state)
    assert type(clone) is type(predictor) and predictor_from_state(kind, state).kind == kind
    probe = _random_trace(seed=1, tokens=50)
    for layer in range(4):
        ctx = RouteContext(layer=layer, token_ids=probe.token_ids, history=probe.experts[:, :layer])
        scores = predictor.expert_scores(ctx)
        assert scores.dtype == np.float32 and scores.shape == (50, 6)
        assert (scores >= 0).all()
        np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-5)
        np.testing.assert_array_equal(clone.expert_scores(ctx), scores)


# ---- registry ---------------------------------------------------------------------------------
def test_registry_rejects_unknown_names():
    allowed = r"unknown predictor kind 'lstm'; allowed: token, layer, history, combined"
    with pytest.raises(ValueError, match=allowed):
        make("lstm")
    with pytest.raises(ValueError, match="'pregate' needs the model"):
        fit_predictor("pregate", _random_trace())
    with pytest.raises(ValueError, match="unknown predictor kind 'bogus'"):
        load_predictor({"config": {"kind": "bogus"}, "arrays": {}})
    with pytest.raises(ValueError, match="filed as 'layer' has config\\['kind'\\]='token'"):
        predictor_from_state("layer", {"config": {"kind": "token"}, "arrays": {}})
    assert isinstance(make("layer", n=2), LayerTable)


def test_validation_split_keeps_requests_whole():
    from megatron_specmoe.predict.common import validation_split

    ex = np.zeros((10, 1, 1), dtype=np.int32)
    plain = RoutingTrace(experts=ex, num_experts=2)
    fit, val = validation_split(plain, 0.3)
    np.testing.assert_array_equal(val, [7, 8, 9])  # the last 30%, in trace order
    # request 1 spans tokens 4..8: the cut at 7 moves back to its first token
    req = RoutingTrace(experts=ex, num_experts=2, request_ids=np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 2]))
    fit, val = validation_split(req, 0.3)
    np.testing.assert_array_equal(fit, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="cannot split 10 tokens"):
        validation_split(RoutingTrace(experts=ex, num_experts=2, request_ids=np.zeros(10, dtype=np.int64)), 0.3)


def test_history_layer_scorer_matches_expert_scores_on_device_tensors():
    import torch

    rng = np.random.default_rng(4)
    e, k, layers, t = 6, 2, 3, 300
    ex = np.stack([np.stack([rng.choice(e, k, replace=False) for _ in range(layers)]) for _ in range(t)])
    ex[:, 1, 0] = (ex[:, 0, 0] + 1) % e  # a learnable dependence, so the weights are not trivial
    model = HistoryMLP(hidden=8, epochs=2, seed=1).fit(RoutingTrace(experts=ex.astype(np.int32), num_experts=e))
    query = ex[:40]
    for layer in range(layers):
        want = model.expert_scores(RouteContext(layer=layer, history=query[:, :layer]))
        scorer = model.layer_scorer(layer)
        got = scorer.scores(history=torch.as_tensor(query[:, :layer]))
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"history must be \[T, 2, k\], got \(40, 1, 2\)"):
        model.layer_scorer(2).scores(history=torch.as_tensor(query[:, :1]))
    with pytest.raises(ValueError, match="layer=3 is outside the fitted layers 0..2"):
        model.layer_scorer(3)


def test_one_predictor_vocabulary():
    """The registry, the members and the run-time scorers each cover exactly their Literal."""
    import typing

    from megatron_specmoe.predict import vocabulary as V
    from megatron_specmoe.predict.members import MEMBERS
    from megatron_specmoe.predict.rank_scorers import RANK_SCORERS
    from megatron_specmoe.predict.registry import PREDICTORS

    V._check()
    assert set(PREDICTORS) == set(typing.get_args(V.PredictorKind))
    assert set(MEMBERS) == set(typing.get_args(V.MemberKind))
    assert set(RANK_SCORERS) == set(typing.get_args(V.ShufflePredictor))


def test_history_window_and_caps():
    import torch

    rng = np.random.default_rng(5)
    e, k, layers, t = 6, 2, 4, 400
    ex = np.stack([np.stack([rng.choice(e, k, replace=False) for _ in range(layers)]) for _ in range(t)])
    trace = RoutingTrace(experts=ex.astype(np.int32), num_experts=e)
    model = HistoryMLP(hidden=8, epochs=2, seed=1, window=1, max_fit_tokens=150, max_val_tokens=20).fit(trace)
    st = model.to_state()
    assert st["arrays"]["l3.w1"].shape == (1 * e, 8)  # reads one earlier layer, not three
    assert model.memory_bytes() == history_mlp_bytes(layers=4, experts=e, hidden=8, window=1)
    # Only layer l-1 matters: changing layers 0..l-2 leaves layer l's scores unchanged.
    query = ex[:30].copy()
    other = query.copy()
    other[:, :2] = (other[:, :2] + 1) % e
    for m in (model, HistoryMLP.from_state(st)):
        a = m.expert_scores(RouteContext(layer=3, history=query[:, :3]))
        np.testing.assert_allclose(a, m.expert_scores(RouteContext(layer=3, history=other[:, :3])))
        got = m.layer_scorer(3).scores(history=torch.as_tensor(query[:, :3]))
        np.testing.assert_allclose(got.numpy(), a, rtol=1e-5, atol=1e-6)
    # The caps draw a seeded sample: the same fit twice, another fit without them.
    again = HistoryMLP(hidden=8, epochs=2, seed=1, window=1, max_fit_tokens=150, max_val_tokens=20).fit(trace)
    np.testing.assert_array_equal(again.to_state()["arrays"]["l3.w1"], st["arrays"]["l3.w1"])
    full = HistoryMLP(hidden=8, epochs=2, seed=1, window=1, max_fit_tokens=None, max_val_tokens=None).fit(trace)
    assert not np.array_equal(full.to_state()["arrays"]["l3.w1"], st["arrays"]["l3.w1"])
    assert model.estimate_fit_seconds(trace) > 0.0
    for name in ("max_fit_tokens", "window"):
        with pytest.raises(ValueError, match=f"{name} must be an integer >= 1"):
            HistoryMLP(**{name: 0})
