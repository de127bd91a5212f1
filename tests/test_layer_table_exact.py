"""The layer predictor's context table is exact by construction (issue 18, finding 1).

Routes of a DeepSeek-V2-Lite-shaped model (top-6 of 64) stopped ``specmoe plan`` with "two
different contexts share a 64-bit hash": the old hash moved multiplication carries only upwards,
and experts 56-63 differ only in the top bits of the set word. The table now groups contexts by
their words and compares words at every probe, so even a hash that is constant gives the same
counts; these tests check that against a plain-Python count of every context.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import pytest

from megatron_specmoe.artifacts.traces import RoutingTrace
from megatron_specmoe.predict import layer_table as LT
from megatron_specmoe.predict.base import RouteContext

# The pair from the issue: order-2 contexts (layer l-2, layer l-1) that the old hash mapped to one value.
PAIR_A = ([3, 22, 33, 51, 58, 60], [0, 7, 10, 44, 52, 60])
PAIR_B = ([3, 22, 31, 33, 51, 58], [0, 7, 10, 44, 52, 62])


def _old_hash(words: np.ndarray) -> np.ndarray:
    """The hash before the fix (multiply-xor, final multiply), order 2, for the record."""
    mul, mix = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9)
    h = np.full(words.shape[0], np.uint64(0x243F6A8885A308D3), dtype=np.uint64)
    for j in (1, 2):
        h = (h ^ words[:, words.shape[1] - j, 0]) * mul
        h = h ^ (h >> np.uint64(29))
    return h * mix


def test_the_colliding_pair_collided_and_no_longer_does():
    a = LT.set_words(np.array([PAIR_A]), 64)
    b = LT.set_words(np.array([PAIR_B]), 64)
    assert _old_hash(a)[0] == _old_hash(b)[0]  # the pair, as reported
    assert LT.context_hashes(a, 2)[1][0] != LT.context_hashes(b, 2)[1][0]
    # The words are kept and hash_keys recomputes the same hash from them.
    assert LT.hash_keys(LT.context_words(a, 2))[0] == LT.context_hashes(a, 2)[1][0]


def _pair_trace(repeat: int = 6) -> RoutingTrace:
    """3 layers, top-6 of 64: layers 0-1 are PAIR_A or PAIR_B, layer 2 follows from which."""
    rows = []
    for i in range(2 * repeat):
        ctx = PAIR_A if i % 2 == 0 else PAIR_B
        nxt = [1, 2, 3, 4, 5, 6] if i % 2 == 0 else [40, 41, 42, 43, 44, 45]
        rows.append([ctx[0], ctx[1], nxt])
    return RoutingTrace(experts=np.array(rows, dtype=np.int32), num_experts=64)


@pytest.mark.parametrize("hashing", ["real", "constant"])
def test_colliding_contexts_keep_their_own_counts(monkeypatch, hashing):
    if hashing == "constant":  # every context on one hash: only the words can tell them apart
        monkeypatch.setattr(LT, "context_hashes", lambda words, n: [np.zeros(words.shape[0], np.uint64)] * n)
        monkeypatch.setattr(LT, "hash_keys", lambda keys: np.zeros(keys.shape[0], np.uint64))
    trace = _pair_trace()
    pred = LT.LayerTable(n=2, min_count=1, alpha=0.0).fit(trace)  # raised before the fix
    scores = pred.expert_scores(RouteContext(layer=2, token_ids=None, history=trace.experts[:2, :2]))
    assert sorted(np.argsort(-scores[0])[:6].tolist()) == [1, 2, 3, 4, 5, 6]
    assert sorted(np.argsort(-scores[1])[:6].tolist()) == [40, 41, 42, 43, 44, 45]
    np.testing.assert_allclose(scores[0, [1, 2, 3, 4, 5, 6]], 1 / 6, rtol=1e-6)
    # A saved and reloaded table (hashes recomputed from the stored words) answers the same.
    again = LT.LayerTable.from_state(pred.to_state())
    np.testing.assert_array_equal(
        again.expert_scores(RouteContext(layer=2, token_ids=None, history=trace.experts[:2, :2])), scores)


def _top_heavy_routes(num_experts: int, tokens: int, layers: int, topk: int, seed: int) -> np.ndarray:
    """int32 [T, L, k]: k distinct experts per token, drawn mostly from the top 16 ids."""
    rng = np.random.default_rng(seed)
    weights = np.ones(num_experts)
    weights[-16:] = 200.0
    weights /= weights.sum()
    out = np.empty((tokens, layers, topk), dtype=np.int32)
    for t in range(tokens):
        for layer in range(layers):
            out[t, layer] = rng.choice(num_experts, size=topk, replace=False, p=weights)
    return out


@pytest.mark.parametrize("num_experts", [64, 128, 256])
def test_table_counts_equal_a_plain_count_on_routes_of_the_highest_ids(num_experts):
    experts = _top_heavy_routes(num_experts, tokens=1500, layers=4, topk=6, seed=num_experts)
    trace = RoutingTrace(experts=experts, num_experts=num_experts)
    pred = LT.LayerTable(n=2, min_count=1, alpha=1.0).fit(trace)
    tables = pred._fitted["tables"]
    for layer in range(1, 4):
        for order in range(1, min(2, layer) + 1):
            ref_counts: dict[tuple, Counter] = defaultdict(Counter)
            ref_tokens: Counter = Counter()
            for t in range(experts.shape[0]):
                key = tuple(frozenset(experts[t, layer - j].tolist()) for j in range(1, order + 1))
                ref_counts[key].update(experts[t, layer].tolist())
                ref_tokens[key] += 1
            table = tables[layer][order - 1]
            assert table.keys.shape[0] == len(ref_tokens)  # one row per distinct context
            words = LT.set_words(experts[:, layer - order: layer], num_experts)
            rows = table.lookup(LT.context_hashes(words, order)[order - 1], LT.context_words(words, order))
            assert (rows < table.keys.shape[0]).all()  # every seen context is found
            for t in range(0, experts.shape[0], 7):
                key = tuple(frozenset(experts[t, layer - j].tolist()) for j in range(1, order + 1))
                assert table.tokens[rows[t]] == ref_tokens[key]
                want = np.zeros(num_experts, np.uint32)
                for e, c in ref_counts[key].items():
                    want[e] = c
                np.testing.assert_array_equal(table.counts[rows[t]], want)
    # An unseen context misses (the pass-through row), it does not borrow another's counts.
    unseen = np.array([[list(range(6)), list(range(6, 12))]], dtype=np.int64)
    words = LT.set_words(unseen, num_experts)
    table = tables[2][1]
    row = table.lookup(LT.context_hashes(words, 2)[1], LT.context_words(words, 2))
    assert row[0] == table.keys.shape[0] or np.array_equal(table.keys[row[0]], LT.context_words(words, 2)[0])
