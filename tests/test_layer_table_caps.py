"""The layer table's capped fit (issue 15, item 5): the search reuses one lookup per held-out
context, stops at the first order that does not help, counts seeded samples, and stores no
context it would never use."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_specmoe.artifacts.traces import RoutingTrace
from megatron_specmoe.predict import layer_table as LT
from megatron_specmoe.predict import registry
from megatron_specmoe.predict.base import RouteContext
from megatron_specmoe.predict.common import frequency_prior, validation_split
from megatron_specmoe.predict.layer_table import LayerTable

NO_CAPS = dict(max_search_tokens=None, max_val_tokens=None, max_fit_tokens=None)


def _structured(tokens=1500, layers=4, experts=12, seed=0) -> RoutingTrace:
    """k = 2; layer l's first expert follows the previous layer's (noisily), the second is random."""
    rng = np.random.default_rng(seed)
    ex = np.zeros((tokens, layers, 2), dtype=np.int32)
    ex[:, 0, 0] = rng.integers(0, experts, tokens)
    for layer in range(1, layers):
        follow = (ex[:, layer - 1, 0] * 5 + 1) % experts
        ex[:, layer, 0] = np.where(rng.random(tokens) < 0.7, follow, rng.integers(0, experts, tokens))
    for layer in range(layers):
        second = rng.integers(0, experts - 1, tokens)
        ex[:, layer, 1] = np.where(second >= ex[:, layer, 0], second + 1, second)
    return RoutingTrace(experts=ex, num_experts=experts)


def test_search_scores_equal_scoring_each_candidate_from_scratch():
    trace = _structured()
    table = LayerTable(**NO_CAPS).fit(trace)
    fit_idx, val_idx = validation_split(trace, 0.2)
    fit_ex, val_ex = trace.experts[fit_idx], trace.experts[val_idx]
    prior = frequency_prior(fit_ex, trace.num_experts)
    tables = LayerTable._build(fit_ex, trace.num_experts, 3)
    assert table.selection
    for row in table.selection:
        hits, loglik = [], []
        for layer in range(1, trace.num_layers):
            for t in tables[layer]:
                t.compile(topk=2, min_count=row["min_count"], alpha=row["alpha"])
            sc = LayerTable._scores(tables[layer], prior[layer], val_ex[:, :layer], row["n"])
            truth = val_ex[:, layer].astype(np.int64)
            hits.append((truth == sc.argmax(axis=1)[:, None]).any(axis=1).mean())
            loglik.append(np.log(np.take_along_axis(sc, truth, axis=1) + 1e-12).mean())
        assert row["top1"] == float(np.mean(hits))
        assert row["loglik"] == float(np.mean(loglik))


def test_search_stops_at_the_first_order_that_does_not_help():
    # Every token takes expert l at layer l: the prior alone is right, so n = 2 cannot beat n = 1
    # and n = 3 is never scored.
    tokens, layers = 400, 4
    ex = np.broadcast_to(np.arange(layers, dtype=np.int32)[None, :, None], (tokens, layers, 1)).copy()
    table = LayerTable(**NO_CAPS).fit(RoutingTrace(experts=ex, num_experts=6))
    assert {row["n"] for row in table.selection} == {1, 2}
    assert len(table.selection) == 2 * len(LT.DEFAULT_GRID["min_count"]) * len(LT.DEFAULT_GRID["alpha"])


def test_search_caps_sample_the_fitting_and_held_out_parts(capsys):
    trace = _structured(tokens=2000)
    LayerTable(max_search_tokens=300, max_val_tokens=120, max_fit_tokens=None).fit(trace)
    err = capsys.readouterr().err
    assert "on 120 held-out fitting tokens, tables from 300" in err
    a = LayerTable(max_search_tokens=300, max_val_tokens=120).fit(trace)
    b = LayerTable(max_search_tokens=300, max_val_tokens=120).fit(trace)
    assert a.selection == b.selection  # seeded
    c = LayerTable(max_search_tokens=300, max_val_tokens=120, seed=1).fit(trace)
    assert c.selection != a.selection


def test_max_fit_tokens_bounds_the_counted_tokens_and_the_prior_sees_all():
    trace = _structured(tokens=1000)
    table = LayerTable(n=1, min_count=1, alpha=1.0, max_fit_tokens=250).fit(trace)
    for layer in range(1, trace.num_layers):
        assert int(table._fitted["tables"][layer][0].tokens.sum()) == 250
    np.testing.assert_array_equal(table._fitted["prior"], frequency_prior(trace.experts, trace.num_experts))
    again = LayerTable(n=1, min_count=1, alpha=1.0, max_fit_tokens=250).fit(trace)
    for name, arr in table.to_state()["arrays"].items():
        np.testing.assert_array_equal(arr, again.to_state()["arrays"][name])


def test_rare_contexts_are_not_stored_and_scores_do_not_change(monkeypatch):
    trace = _structured(tokens=600, experts=20)
    pruned = LayerTable(n=2, min_count=3, alpha=1.0).fit(trace)
    for layer in pruned._fitted["tables"]:
        for t in layer:
            assert t.tokens.size == 0 or int(t.tokens.min()) >= 3
    monkeypatch.setattr(LT._Table, "pruned", lambda self, min_count: self)
    full = LayerTable(n=2, min_count=3, alpha=1.0).fit(trace)
    assert sum(t.tokens.size for l in full._fitted["tables"] for t in l) > \
        sum(t.tokens.size for l in pruned._fitted["tables"] for t in l)
    for layer in range(trace.num_layers):
        ctx = RouteContext(layer=layer, history=trace.experts[:, :layer])
        np.testing.assert_array_equal(pruned.expert_scores(ctx), full.expert_scores(ctx))


def test_caps_round_trip_and_are_checked():
    table = LayerTable(n=1, min_count=1, alpha=1.0, max_search_tokens=None, max_fit_tokens=77, seed=3)
    table.fit(_structured(tokens=300))
    back = LayerTable.from_state(table.to_state())
    assert (back.max_search_tokens, back.max_val_tokens, back.max_fit_tokens, back.seed) == \
        (None, LT.MAX_VAL_TOKENS, 77, 3)
    for name in ("max_search_tokens", "max_val_tokens", "max_fit_tokens"):
        with pytest.raises(ValueError, match=f"{name} must be a positive int or None"):
            LayerTable(**{name: 0})


def test_estimate_fit_seconds_is_positive_and_the_registry_uses_it(monkeypatch):
    trace = _structured(tokens=800)
    est = LayerTable().estimate_fit_seconds(trace, sample_tokens=400)
    assert np.isfinite(est) and est > 0
    monkeypatch.setattr(LayerTable, "estimate_fit_seconds", lambda self, trace, sample_tokens=8192: 123.0)
    assert registry.estimate_fit_seconds("layer", trace) == 123.0


def test_counts_take_the_narrowest_dtype_and_round_trip():
    trace = _structured(tokens=600)
    table = LayerTable(n=1, min_count=1, alpha=1.0).fit(trace)
    t = table._fitted["tables"][1][0]
    assert t.counts.dtype == np.uint8 and int(t.counts.max()) <= 255
    back = LayerTable.from_state(table.to_state())
    assert back._fitted["tables"][1][0].counts.dtype == np.uint8
    ctx = RouteContext(layer=2, history=trace.experts[:, :2])
    np.testing.assert_array_equal(back.expert_scores(ctx), table.expert_scores(ctx))
    # One context chosen 300 times needs uint16.
    ex = np.zeros((300, 2, 1), dtype=np.int32)
    wide = LayerTable(n=1, min_count=1, alpha=1.0).fit(RoutingTrace(experts=ex, num_experts=4))
    assert wide._fitted["tables"][1][0].counts.dtype == np.uint16
    assert LT._narrow(np.array([70000])).dtype == np.uint32
    with pytest.raises(ValueError, match="counts must be non-negative integers"):
        LT._narrow(np.array([-1]))
