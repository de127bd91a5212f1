"""Shared plans (``megatron/shared_plans.py``): who decides to share, and what is refused.

The plans themselves (each rank makes its share, gathered with the first layer's input; equal to
the plans every rank makes alone; the extra all-gather columns counted) are checked on 4 gloo ranks
in ``tests/test_shuffle_lossless.py`` (the route cases with sequence parallelism, and
``test_shared_plans_are_the_plans_every_rank_makes``).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron_specmoe.megatron.shared_plans import shares_plans
from megatron_specmoe.megatron.shuffle_state import ShuffleCarrier, ShuffleOptions
from megatron_specmoe.testing.shuffle_lossless import TokenModuloPredictor


class _Group:
    def __init__(self, size):
        self._size = size

    def size(self):
        return self._size


def _layer(share="auto", *, sp=True, tp=4, registered=True, predictor="route"):
    route = TokenModuloPredictor(num_experts=8, num_layers=2) if predictor == "route" else None
    carrier = ShuffleCarrier(options=ShuffleOptions(predictor=predictor, route_predictor=route, share_plans=share))
    layer = SimpleNamespace(carrier=carrier, config=SimpleNamespace(sequence_parallel=sp), tp_group=_Group(tp),
                            layer_number=1)
    second = SimpleNamespace(layer_number=2)
    if registered:
        carrier.route_layers = (layer, second)
    return layer, second


CPU = torch.zeros(2, 1, 4)


def test_auto_shares_at_the_first_layer_of_a_forward_on_the_cpu():
    layer, second = _layer()
    assert shares_plans(layer, CPU, fresh=True)
    assert not shares_plans(layer, CPU, fresh=False)  # the shard a previous layer handed on
    second.carrier, second.config, second.tp_group = layer.carrier, layer.config, layer.tp_group
    assert not shares_plans(second, CPU, fresh=True)  # a later layer run on its own plans alone


@pytest.mark.parametrize("kwargs", [dict(sp=False), dict(registered=False), dict(tp=1), dict(share="off")])
def test_auto_and_off_fall_back_to_one_plan_per_rank(kwargs):
    layer, _ = _layer(**kwargs)
    assert not shares_plans(layer, CPU, fresh=True)


def test_auto_does_not_share_on_a_device_but_on_does():
    layer, _ = _layer()
    meta = torch.empty(2, 1, 4, device="meta")
    assert not shares_plans(layer, meta, fresh=True)
    layer, _ = _layer("on")
    assert shares_plans(layer, meta, fresh=True)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(sp=False), r"share_plans='on' but sequence parallelism is off .*use share_plans='auto' / 'off'"),
    (dict(registered=False), r"share_plans='on' but the carrier holds no shuffle layers \(attach "
                             r"shuffle_specs.feed_token_ids\(model, carrier\)\)"),
])
def test_on_refuses_what_it_cannot_do(kwargs, pattern):
    layer, _ = _layer("on", **kwargs)
    with pytest.raises(ValueError, match=pattern):
        shares_plans(layer, CPU, fresh=True)


def test_options_refuse_an_unknown_value_and_on_without_route():
    with pytest.raises(ValueError, match=r"share_plans='sometimes'; choose one of \('auto', 'on', 'off'\)"):
        ShuffleOptions(share_plans="sometimes")
    with pytest.raises(ValueError, match=r"share_plans='on' needs predictor='route' .*got predictor='pregate'"):
        ShuffleOptions(predictor="pregate", share_plans="on")
    assert ShuffleOptions(predictor="pregate").share_plans == "auto"  # auto: other predictors plan per layer
