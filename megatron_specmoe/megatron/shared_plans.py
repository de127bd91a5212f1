"""Shared plans: each TP rank makes 1/P of a forward's shuffle plans, and the first shuffle
layer's all-gather hands them to every rank.

Notation
    T: tokens of the TP group this forward.   P: TP size.   C = ceil(T / P).   T_pad = P * C.
    H: hidden size.   L: the model's shuffle layers on this rank, in layer order (layer j, 0-based).
    m = ceil(L / P): plans each rank makes.   home: int64 [T_pad], a plan's home rank of every row
    (real rows first, then the pad rows, which carry 0 here and are placed by the padding rule).

Why. Every TP rank computes the same plan (the scores and the assignment are identical on all
of them), so a TP group of P ranks pays for each plan P times. On a GPU the plan runs on a side
stream during attention and costs launches, not time on the critical path. On the CPU it costs
CPU time on every rank: with P ranks sharing fewer cores (``specmoe demo``: 4 ranks, 2 cores) the
P copies are paid for in wall time.

When. With predictor "route" every layer's scores come from the token ids alone, which every rank
holds before the first layer. With sequence parallelism the first shuffle layer all-gathers its
input anyway. So, at the first shuffle layer of a forward, TP rank r makes the plans of the
layers j with j mod P == r, and their home ranks ride along that all-gather as m * P integer
columns of its C rows (``comm.shuffle.append_route_columns``: the ids bit for bit in the hidden
dtype, exact for P <= 32768). Every rank then rebuilds each layer's plan from its home ranks
(``assignment.plan_from_home``: one stable sort and a scatter, the same order and inverse the
assignment gives). No extra collective; the all-gather grows by m * P columns (counted by the
``CollectiveCounter``); a rank makes m assignments per forward instead of L.

``ShuffleOptions.share_plans``: "on" (refused without predictor "route", sequence parallelism or
``shuffle_specs.feed_token_ids``), "off", "auto" ("on" where it can be and the plans are made on
the CPU). Other predictors score from the layer's own input or the routes of the layer before, which
exist only at that layer; they keep one plan per rank per layer.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from megatron_specmoe.comm.shuffle import append_route_columns, gather_shards, split_route_columns, true_order_rows
from megatron_specmoe.megatron.shuffle_state import SharedPlans, ShuffleState
from megatron_specmoe.schedule.assignment import ShufflePlan, plan_from_home

__all__ = ["shares_plans", "gather_sharing_plans", "shared_plan"]


def shares_plans(layer: Any, hidden_states: torch.Tensor, fresh: bool) -> bool:
    """Whether ``layer`` (a ShuffleTransformerLayer) makes and gathers this forward's shared plans.

    Args:
        layer: the shuffle layer at stage 1.
        hidden_states: float [C, B', H], its input shard.
        fresh: True when the input is Megatron's contiguous shard (the first shuffle layer of a
            forward), not the shard a previous shuffle layer handed on.

    A fresh input at a layer that is not the model's first shuffle layer (a layer run on its own)
    is planned by that layer alone, as without sharing.

    Raises:
        ValueError: share_plans="on" without sequence parallelism or without the model's layers
            (``feed_token_ids``), naming the fix.
    """
    carrier = layer.carrier
    options = carrier.options
    if not fresh or options.share_plans == "off" or options.predictor != "route" or layer.tp_group.size() < 2:
        return False
    problems = []
    if not layer.config.sequence_parallel:
        problems.append("sequence parallelism is off (the plans ride along its all-gather)")
    if not carrier.route_layers:
        problems.append("the carrier holds no shuffle layers (attach shuffle_specs.feed_token_ids(model, carrier))")
    if options.share_plans == "auto":
        return not problems and hidden_states.device.type == "cpu" and layer is carrier.route_layers[0]
    if problems:
        raise ValueError("ShuffleTransformerLayer: ShuffleOptions.share_plans='on' but " + "; ".join(problems)
                         + "; fix that or use share_plans='auto' / 'off'")
    return layer is carrier.route_layers[0]


def gather_sharing_plans(layer: Any, ln: torch.Tensor, prev: ShuffleState) -> torch.Tensor:
    """Stage 1 of the first shuffle layer with shared plans: make this rank's share of the plans,
    all-gather them with the normalised input, and keep every layer's plan in
    ``carrier.shared``.

    Args:
        layer: the first ShuffleTransformerLayer of the forward (``shares_plans`` said True).
        ln: float [C, H], this rank's normalised input rows (Megatron's contiguous shard).
        prev: the contiguous ShuffleState of the input (its plan orders the gathered rows).

    Returns:
        float [S, B, H], the normalised input in true order (what ``deferred_all_gather`` gives).
    """
    carrier, group = layer.carrier, layer.tp_group
    tp, rank, h = group.size(), group.rank(), ln.shape[-1]
    layers = carrier.route_layers
    t, c = prev.plan.num_tokens, prev.plan.capacity
    m = -(-len(layers) // tp)
    for other in layers:  # a layer's first call checks its EP span collectively: on every rank, in order
        other._ep_span()
    homes = torch.zeros(m, c * tp, dtype=torch.int64, device=ln.device)  # pad rows: 0, placed by rule
    for i, j in enumerate(range(rank, len(layers), tp)):
        homes[i, :t] = layers[j].assign_plan(layers[j].rank_scores(None, num_tokens=t)).home_rank
    # Rank r's row x carries entries x*P .. x*P + P - 1 of each of its m plans' home ranks.
    columns = homes.view(m, c, tp).permute(1, 0, 2).reshape(c, m * tp)
    packed = gather_shards(append_route_columns(ln, columns), prev.plan, group, counter=carrier.counter,
                           workspace=carrier.workspace)
    rows, ids = split_route_columns(packed, m * tp)
    # ids [TP rank q, its row x, its plan i, column] -> [plan i, q, x * P + column]: row i * P + q
    # holds the home ranks of layer j = i * P + q, in token order (one copy for all the layers).
    every_home = ids.view(tp, c, m, tp).permute(2, 0, 1, 3).reshape(m * tp, c * tp)
    plans = {}
    for j, other in enumerate(layers):
        plans[other.layer_number] = plan_from_home(every_home[j, :t], tp)
    carrier.shared = SharedPlans(token_ids=carrier.token_ids, plans=plans)
    # The layer input in true order dies inside this layer: the workspace holds it.
    return true_order_rows(rows, prev.plan, workspace=carrier.workspace).view(prev.seq, prev.batch, h)


def shared_plan(layer: Any) -> Optional[ShufflePlan]:
    """``layer``'s plan from this forward's shared plans, or None (then it makes its own)."""
    shared = layer.carrier.shared
    if shared is None or shared.token_ids is not layer.carrier.token_ids:
        return None
    return shared.plans.get(layer.layer_number)
