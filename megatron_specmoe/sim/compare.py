"""specmoe against the dispatchers users would pick instead, on one trace, one EP size, one cluster.

Notation
    T: tokens.   L: MoE layers.   k: top-k.   E: experts of the trace's model.
    P: EP size simulated.   p: TP size.   B: tokens per TP group per step.   m: slices per expert.

Steps (``compare_dispatchers``)
    1. P <= E: placements of E experts on P ranks. P > E: the exact split of every expert into
       m = P / E slices (``inputs.split_experts``), one slice per rank.
    2. Baseline routes (``alltoall``, ``deepep_*``, ``allgather_inference*``): Megatron's contiguous
       placement, contiguous sequence-parallel shards (``contiguous_home_ranks``).
    3. specmoe routes (``specmoe_*``): the plan's placement (its slot order, regrouped for P;
       contiguous without a plan) and s-TS home ranks from the given expert scores by a balanced
       assignment inside each TP group (``shuffled_home_ranks``).
    4. Count both route sets once (``simulate.route_counts``) and time every dispatcher model on its
       set (``dispatchers.simulate_dispatcher``); charge specmoe's plan per MoE layer
       (``plan_cost``). Models that cannot run at this P are listed with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, get_args

import numpy as np

from megatron_specmoe.artifacts.traces import RoutingTrace
from megatron_specmoe.schedule.placement import ExpertPlacement
from megatron_specmoe.sim.cluster import ClusterSpec
from megatron_specmoe.sim.dispatchers import (
    DISPATCHERS,
    DispatcherName,
    SimResult,
    check_dispatcher,
    not_applicable,
    simulate_dispatcher,
)
from megatron_specmoe.sim.inputs import (
    contiguous_home_ranks,
    layer_rank_scores,
    shuffled_home_ranks,
    split_experts,
    split_placement,
    split_scores,
    tokens_per_step,
)
from megatron_specmoe.sim.plan_cost import AttentionRoofline, PlanCharge, attention_roofline, plan_time
from megatron_specmoe.sim.simulate import ModelShape, ParallelLayout, route_counts

__all__ = ["Comparison", "experts_split_factor", "compare_dispatchers"]


@dataclass(frozen=True, kw_only=True)
class Comparison:
    """Every dispatcher model on the same tokens.

    Attributes:
        layout: TP, EP.
        split: m, slices per expert (1 when P <= E).
        tokens_per_step: tokens of one step (all EP ranks together).
        steps: steps simulated.
        results: dispatcher name -> SimResult.
        skipped: dispatcher name -> why it cannot run at this EP size.
        plan_s: plan time per MoE layer (charged to ``specmoe_*``).
        plan_exposed_s: the part of it not hidden behind attention.
        attention: the attention roofline used.
        charge: how the plan was charged.
    """

    layout: ParallelLayout
    split: int
    tokens_per_step: int
    steps: int
    results: dict
    skipped: dict
    plan_s: float
    plan_exposed_s: float
    attention: AttentionRoofline
    charge: PlanCharge = field(default_factory=PlanCharge)

    def table_row(self) -> dict:
        """One row of the report: per MoE layer per step, means (JSON-ready).

        ``row[name]`` holds ``dispatch_time_s``, ``combine_time_s``, ``plan_time_s`` (exposed),
        ``total_time_s`` (communication + exposed plan) and ``speedup_vs_alltoall`` of that total.
        """
        first = next(iter(self.results.values()))
        row = {
            "ep": self.layout.ep, "tp": self.layout.tp, "expert_split": self.split,
            "nodes": -(-self.layout.ep // first.cluster.gpus_per_node),
            "tokens_per_step": self.tokens_per_step, "steps": self.steps,
            "attention_time_s": self.attention.time_s, "attention_bound": self.attention.bound,
            "plan": {"kernels": self.charge.kernels, "launch": self.charge.launch,
                     "overlap": self.charge.overlap, "plan_time_s": self.plan_s,
                     "exposed_s": self.plan_exposed_s},
            "skipped": dict(self.skipped),
        }
        for name, res in self.results.items():
            entry = res.summary()
            entry["plan_time_s"] = self.plan_exposed_s if DISPATCHERS[name].routes == "specmoe" else 0.0
            entry["total_time_s"] = entry["layer_time_s"] + entry["plan_time_s"]
            row[name] = entry
        if "alltoall" in row:
            base = row["alltoall"]["total_time_s"]
            for name in self.results:
                row[name]["speedup_vs_alltoall"] = base / row[name]["total_time_s"] if row[name]["total_time_s"] else 1.0
        return row


def experts_split_factor(num_experts: int, ep: int) -> int:
    """m: 1 when P divides E, P / E when E divides P; otherwise a ValueError."""
    if num_experts % ep == 0:
        return 1
    if ep % num_experts == 0:
        return ep // num_experts
    raise ValueError(
        f"EP size {ep} and E={num_experts} experts: one must divide the other (each rank hosts "
        "E/P experts, or each expert is split into P/E slices)"
    )


def _specmoe_placements(
    plan_placements: Optional[Sequence[ExpertPlacement]], num_experts: int, num_layers: int, ep: int, m: int
) -> list[ExpertPlacement]:
    if plan_placements is None:
        orders = [tuple(range(num_experts))] * num_layers
    else:
        if len(plan_placements) != num_layers:
            raise ValueError(
                f"compare_dispatchers: the plan has {len(plan_placements)} placements for "
                f"{num_layers} MoE layers"
            )
        orders = [pl.physical_to_logical for pl in plan_placements]
    if m == 1:
        return [ExpertPlacement(physical_to_logical=o, ep_size=ep) for o in orders]
    return [
        split_placement(ExpertPlacement(physical_to_logical=o, ep_size=num_experts), m, ep) for o in orders
    ]


def compare_dispatchers(
    trace: RoutingTrace,
    expert_scores: np.ndarray,
    *,
    ep: int,
    tp: int,
    cluster: ClusterSpec,
    hidden_size: int,
    dispatch_dtype: str = "bf16",
    combine_dtype: str = "bf16",
    tokens_per_rank: int,
    plan_placements: Optional[Sequence[ExpertPlacement]] = None,
    method: str = "refine",
    dispatchers: Optional[Sequence[str]] = None,
    charge: Optional[PlanCharge] = None,
) -> Comparison:
    """Simulate every dispatcher model on ``trace`` (module docstring, steps 1-4).

    Args:
        trace: routes [T, L, k] over E experts; T must be a multiple of tokens_per_rank * P.
        expert_scores: float [T, L, E], the predictor's scores used for s-TS.
        ep, tp: P and p.
        cluster: the cluster (nodes are added to fit P).
        hidden_size: H.
        dispatch_dtype, combine_dtype: ``wire.WireDtype`` names.
        tokens_per_rank: tokens each rank holds in a step (B = tokens_per_rank * p).
        plan_placements: the plan's placements (E experts each, any EP size: only the slot
            order is used), or None for contiguous.
        method: the balanced assignment (``assignment.AssignmentMethod``).
        dispatchers: the ``DispatcherName``s to run (default: all).
        charge: the plan charge (default ``PlanCharge()``).
    """
    names = list(get_args(DispatcherName)) if dispatchers is None else list(dispatchers)
    for name in names:
        check_dispatcher(name)
    charge = PlanCharge() if charge is None else charge
    num_tokens, num_layers, _ = trace.experts.shape
    expert_scores = np.asarray(expert_scores)
    if expert_scores.shape != (num_tokens, num_layers, trace.num_experts):
        raise ValueError(
            f"compare_dispatchers: expert_scores must be [T, L, E]=({num_tokens}, {num_layers}, "
            f"{trace.num_experts}), got {expert_scores.shape}"
        )
    layout = ParallelLayout(tp=tp, ep=ep).require_folding()
    if tokens_per_rank < 1:
        raise ValueError(f"compare_dispatchers: tokens_per_rank must be >= 1, got {tokens_per_rank}")
    tokens_per_group = tokens_per_rank * tp
    step = tokens_per_step(layout, tokens_per_group)
    if num_tokens % step:
        raise ValueError(
            f"compare_dispatchers: T={num_tokens} is not a multiple of the step size {step} "
            f"(B={tokens_per_group} x {layout.tp_groups} TP groups); trim the trace"
        )
    cluster = cluster if cluster.num_gpus >= ep else cluster.for_ranks(ep)
    m = experts_split_factor(trace.num_experts, ep)
    sim_trace = split_experts(trace, m)
    shape = ModelShape(hidden_size=hidden_size, top_k=sim_trace.topk, num_experts=sim_trace.num_experts,
                       num_layers=num_layers, dispatch_dtype=dispatch_dtype, combine_dtype=combine_dtype)
    gpn = cluster.gpus_per_node
    skipped = {n: why for n in names if (why := not_applicable(n, num_ranks=ep, gpus_per_node=gpn))}
    runnable = [n for n in names if n not in skipped]
    counts = {}
    if any(DISPATCHERS[n].routes == "baseline" for n in runnable):
        base_home = contiguous_home_ranks(num_tokens, num_layers, layout=layout, tokens_per_group=tokens_per_group)
        counts["baseline"] = route_counts(
            sim_trace, [ExpertPlacement.contiguous(sim_trace.num_experts, ep)] * num_layers, base_home,
            num_ranks=ep, gpus_per_node=gpn, tokens_per_step=step)
    if any(DISPATCHERS[n].routes == "specmoe" for n in runnable):
        scores = split_scores(expert_scores, m) if m > 1 else expert_scores
        spec_placements = _specmoe_placements(plan_placements, trace.num_experts, num_layers, ep, m)
        spec_home = shuffled_home_ranks(layer_rank_scores(scores, spec_placements), layout=layout,
                                        tokens_per_group=tokens_per_group, method=method)
        counts["specmoe"] = route_counts(sim_trace, spec_placements, spec_home, num_ranks=ep,
                                         gpus_per_node=gpn, tokens_per_step=step)
    results: dict[str, SimResult] = {}
    for name in runnable:
        results[name] = simulate_dispatcher(name, counts[DISPATCHERS[name].routes], wire=shape.wire,
                                            cluster=cluster, top_k=sim_trace.topk)
    attention = attention_roofline(hidden_size=hidden_size, tokens_per_rank=tokens_per_rank, tp=tp,
                                   cluster=cluster, phase=charge.phase, context=charge.context)
    plan_s, exposed_s = plan_time(charge, cluster, attention.time_s)
    return Comparison(layout=layout, split=m, tokens_per_step=step, steps=num_tokens // step,
                      results=results, skipped=skipped, plan_s=plan_s, plan_exposed_s=exposed_s,
                      attention=attention, charge=charge)
