"""Inputs of the simulator: home ranks (contiguous or shuffled), and EP sizes beyond E.

Notation
    T: tokens.   L: MoE layers.   k: top-k.   E: experts.   P: EP ranks.
    B: tokens per TP group per step (one shuffle domain's batch; docs/method.md uses B = 512).
    p: TP size; a TP group is p consecutive EP ranks g*p .. g*p + p - 1.
    m: sub-experts per expert when P > E (``split_experts``).

Steps and groups
    A step holds B * (P / p) consecutive tokens of the trace: TP group g takes the g-th run of B
    tokens. Inside a group the baseline keeps Megatron's contiguous sequence-parallel shards (token
    j of the group on rank g*p + j // (B/p)); s-TS permutes the group's tokens over its p ranks with
    capacity B/p each (a token cannot leave its TP group: attention's reduce-scatter is where it
    moves, docs/method.md "s-TS").

EP larger than the number of experts (e.g. Mixtral, E = 8, at EP = 16 .. 64)
    Megatron needs P <= E. We make the larger EP sizes from an exact re-expression of the same model
    (``split_experts``): each expert's FFN is cut along its intermediate dimension into m = P / E
    slices, sub-expert e*m + j holding slice j of expert e. A gated MLP is a sum over its
    intermediate units, so the sum of the m slices' outputs is the expert's output: the function is
    unchanged. A token routed to expert e is routed to all m slices (top-k becomes k*m), each slice
    receives the token's hidden row and returns a partial output row, as with expert tensor
    parallelism of size m. Every dispatcher pays for this alike (m rows per pair); it is not a
    fine-grained model with different routing. Not modelled: Megatron's own expert tensor
    parallelism sends one row per pair through the all-to-all and fans it out with an all-gather
    inside the ETP group, and DeepEP's internode kernels send one copy per destination *node*;
    both would cut the inter-node rows up to m-fold for every dispatcher. Read EP > E numbers as
    "the same routes over more GPUs and more nodes", not as a deployment recommendation.
    ``split_placement`` keeps each expert's slices on consecutive ranks (one node when m <= GPUs
    per node). The other honest option, DP x EP with EP = E per node, has exactly the EP = E
    numbers on every node (no inter-node traffic at all).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from megatron_specmoe.schedule.assignment import assign
from megatron_specmoe.schedule.placement import ExpertPlacement
from megatron_specmoe.predict.base import RouteContext, RoutePredictor
from megatron_specmoe.sim.simulate import ParallelLayout, expert_ranks
from megatron_specmoe.artifacts.traces import RoutingTrace

__all__ = [
    "tokens_per_step",
    "contiguous_home_ranks",
    "oracle_expert_scores",
    "predictor_expert_scores",
    "layer_rank_scores",
    "split_scores",
    "shuffled_home_ranks",
    "split_experts",
    "split_placement",
]

def tokens_per_step(layout: ParallelLayout, tokens_per_group: int) -> int:
    """B * (P / p): tokens of one step, all TP groups of the EP group together."""
    if tokens_per_group < 1 or tokens_per_group % layout.tp:
        raise ValueError(
            f"tokens_per_group={tokens_per_group} must be a positive multiple of tp={layout.tp} "
            "(equal sequence-parallel shards)"
        )
    return tokens_per_group * layout.tp_groups


def contiguous_home_ranks(
    num_tokens: int, num_layers: int, *, layout: ParallelLayout, tokens_per_group: int
) -> np.ndarray:
    """int64 [T, L]: Megatron's baseline, contiguous shards of each TP group's B tokens.

    T must be a multiple of the step size ``tokens_per_step(layout, tokens_per_group)``."""
    step = tokens_per_step(layout, tokens_per_group)
    if num_tokens % step:
        raise ValueError(
            f"contiguous_home_ranks: T={num_tokens} is not a multiple of the step size {step} "
            f"(B={tokens_per_group} tokens x {layout.tp_groups} TP groups); trim the trace"
        )
    idx = np.arange(num_tokens) % step
    group, within = idx // tokens_per_group, idx % tokens_per_group
    home = group * layout.tp + within // (tokens_per_group // layout.tp)
    return np.repeat(home[:, None].astype(np.int64), num_layers, axis=1)


def oracle_expert_scores(trace: RoutingTrace) -> np.ndarray:
    """float32 [T, L, E]: 1/k on each token's true experts (a perfect predictor; an upper bound
    for any real one)."""
    num_tokens, num_layers, topk = trace.experts.shape
    out = np.zeros((num_tokens, num_layers, trace.num_experts), dtype=np.float32)
    t_idx = np.arange(num_tokens)[:, None, None]
    l_idx = np.arange(num_layers)[None, :, None]
    np.add.at(out, (t_idx, l_idx, trace.experts), 1.0 / topk)
    return out


def predictor_expert_scores(predictor: RoutePredictor, trace: RoutingTrace) -> np.ndarray:
    """float32 [T, L, E]: a fitted predictor's expert scores, layer l given the true routes of
    layers 0 .. l-1 (what travels with the hidden states) and the token ids if the trace has them."""
    num_tokens, num_layers, _ = trace.experts.shape
    out = np.zeros((num_tokens, num_layers, trace.num_experts), dtype=np.float32)
    for layer in range(num_layers):
        ctx = RouteContext(layer=layer, token_ids=trace.token_ids, history=trace.experts[:, :layer])
        out[:, layer] = predictor.expert_scores(ctx)
    return out


def layer_rank_scores(expert_scores: np.ndarray, placements: Sequence[ExpertPlacement]) -> np.ndarray:
    """float32 [T, L, P]: expert scores [T, L, E] summed per rank under each layer's placement
    (``predict.base.rank_scores`` per layer, as one matrix product)."""
    out = []
    for layer, pl in enumerate(placements):
        onehot = np.zeros((pl.num_experts, pl.ep_size), dtype=np.float32)
        onehot[np.arange(pl.num_experts), pl.rank_of_logical()] = 1.0
        out.append(np.asarray(expert_scores[:, layer], dtype=np.float32) @ onehot)
    return np.stack(out, axis=1)


def split_scores(expert_scores: np.ndarray, m: int) -> np.ndarray:
    """float32 [T, L, E*m]: each expert's score shared equally by its m slices (``split_experts``)."""
    return np.repeat(expert_scores, m, axis=-1) / np.float32(m)


def shuffled_home_ranks(
    scores: np.ndarray,
    *,
    layout: ParallelLayout,
    tokens_per_group: int,
    method: str = "refine",
) -> np.ndarray:
    """int64 [T, L]: s-TS home ranks; each TP group's B tokens spread over its p ranks, B/p each.

    Args:
        scores: float [T, L, P], rank scores (``layer_rank_scores``).
        layout: TP, EP.
        tokens_per_group: B.
        method: the balanced assignment, an ``assignment.AssignmentMethod`` ("refine": greedy
            proposal rounds plus pairwise exchanges; "optimal": exact min-cost flow, slower;
            "refine_spread": refine, then spread each token's predicted off-group pairs, its
            scores on the P - p ranks outside its TP group, evenly over the group's ranks).
    """
    num_tokens, num_layers, num_ranks = scores.shape
    if num_ranks != layout.ep:
        raise ValueError(f"shuffled_home_ranks: scores have P={num_ranks} ranks but ep={layout.ep}")
    step = tokens_per_step(layout, tokens_per_group)
    if num_tokens % step:
        raise ValueError(
            f"shuffled_home_ranks: T={num_tokens} is not a multiple of the step size {step}; trim the trace"
        )
    out = np.empty((num_tokens, num_layers), dtype=np.int64)
    for start in range(0, num_tokens, tokens_per_group):
        group = (start % step) // tokens_per_group
        lo = group * layout.tp
        sl = slice(start, start + tokens_per_group)
        for layer in range(num_layers):
            domain = scores[sl, layer, lo : lo + layout.tp]
            if method == "refine_spread":
                off = scores[sl, layer].sum(-1) - domain.sum(-1)
                plan = assign(domain, method, off_domain=np.maximum(off, 0.0).astype(np.float32))
            else:
                plan = assign(domain, method)
            out[sl, layer] = lo + plan.home_rank.numpy()
    return out


def split_experts(trace: RoutingTrace, m: int) -> RoutingTrace:
    """The same routes over E*m sub-experts (module docstring): ``experts`` int32 [T, L, k*m]
    with expert e replaced by e*m .. e*m + m - 1; probs and optional fields follow."""
    if m < 1:
        raise ValueError(f"split_experts: m must be >= 1, got {m}")
    if m == 1:
        return trace
    sub = (trace.experts[..., None].astype(np.int64) * m + np.arange(m)).reshape(
        trace.num_tokens, trace.num_layers, trace.topk * m
    )
    probs = None if trace.probs is None else np.repeat(trace.probs, m, axis=-1)
    return RoutingTrace(
        experts=sub.astype(np.int32),
        num_experts=trace.num_experts * m,
        token_ids=trace.token_ids,
        positions=trace.positions,
        request_ids=trace.request_ids,
        probs=probs,
        source=f"{trace.source} (experts split x{m})",
    )


def split_placement(placement: ExpertPlacement, m: int, ep_size: int) -> ExpertPlacement:
    """Placement of the E*m sub-experts on ``ep_size`` ranks: the slices of the expert in physical
    slot p take slots p*m .. p*m + m - 1, so an expert's slices sit on consecutive ranks."""
    p2l = np.asarray(placement.physical_to_logical, dtype=np.int64)
    sub = (p2l[:, None] * m + np.arange(m)).reshape(-1)
    return ExpertPlacement(physical_to_logical=tuple(sub.tolist()), ep_size=ep_size)
