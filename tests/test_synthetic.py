"""Synthetic routing traces (artifacts/synthetic.py): valid routes, seeded, group-limited."""

import numpy as np
import pytest

from megatron_specmoe.artifacts.synthetic import SyntheticSpec, synthetic_trace


def test_routes_are_valid_and_seeded():
    spec = SyntheticSpec(tokens=500, layers=3, num_experts=32, topk=4, request_length=50, seed=5)
    a, b = synthetic_trace(spec), synthetic_trace(spec)
    assert a.experts.shape == (500, 3, 4) and a.num_experts == 32
    np.testing.assert_array_equal(a.experts, b.experts)
    assert all(len(set(r.tolist())) == 4 for r in a.experts.reshape(-1, 4))
    assert a.request_ids.max() == 9 and a.token_ids.max() < spec.vocab
    c = synthetic_trace(SyntheticSpec(tokens=500, layers=3, num_experts=32, topk=4, seed=6))
    assert not np.array_equal(a.experts, c.experts)


def test_group_limited_routing():
    spec = SyntheticSpec(tokens=400, layers=2, num_experts=64, topk=8, router_groups=8, topk_groups=2)
    tr = synthetic_trace(spec)
    groups = tr.experts // 8
    assert max(len(set(r.tolist())) for r in groups.reshape(-1, 8)) <= 2


def test_topic_structure_is_predictable():
    # The planted topic ties layers together: experts at layer 1 depend on layer 0's.
    tr = synthetic_trace(SyntheticSpec(tokens=4000, layers=2, num_experts=32, topk=2, topics=4, p_topic=0.9))
    first = tr.experts[:, 0, 0]
    second = tr.experts[:, 1, 0]
    joint = np.zeros((32, 32))
    np.add.at(joint, (first, second), 1)
    # Mutual information well above an independent draw's.
    p = joint / joint.sum()
    px, py = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    mi = np.nansum(p * np.log(p / (px * py) + 1e-30))
    assert mi > 0.3


@pytest.mark.parametrize("kwargs, pattern", [
    ({"topk": 40}, "exceeds num_experts"),
    ({"router_groups": 8}, "together"),
    ({"router_groups": 5, "topk_groups": 1}, "must divide"),
    ({"p_topic": 1.5}, r"p_topic must lie in \[0, 1\]"),
])
def test_bad_specs(kwargs, pattern):
    base = {"tokens": 10, "layers": 1, "num_experts": 32, "topk": 4}
    with pytest.raises(ValueError, match=pattern):
        SyntheticSpec(**{**base, **kwargs})
