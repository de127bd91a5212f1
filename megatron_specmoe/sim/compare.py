"""specmoe vs alltoall vs dedup on one trace, one EP size, one cluster: the simulator's report.

Notation
    T: tokens.   L: MoE layers.   k: top-k.   E: experts of the trace's model.
    P: EP size simulated.   p: TP size.   B: tokens per TP group per step.   m: slices per expert.

Steps (``compare_dispatchers``)
    1. P <= E: placements of E experts on P ranks. P > E: the exact split of every expert into
       m = P / E slices (``simulate_inputs.split_experts``), one slice per rank.
    2. Baselines (``alltoall``, ``dedup``): Megatron's contiguous placement, contiguous
       sequence-parallel shards (``contiguous_home_ranks``).
    3. ``specmoe``: the plan's placement (its slot order, regrouped for P; contiguous without a
       plan) and s-TS home ranks from the given expert scores by a balanced assignment inside
       each TP group (``shuffled_home_ranks``).
    4. ``simulate`` each; the same tokens, steps and cluster for all three.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from megatron_specmoe.sim.cluster import ClusterSpec
from megatron_specmoe.schedule.placement import ExpertPlacement
from megatron_specmoe.sim.simulate import (
    DTYPE_BYTES,
    ModelShape,
    ParallelLayout,
    SimResult,
    simulate,
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
from megatron_specmoe.artifacts.traces import RoutingTrace

__all__ = ["Comparison", "experts_split_factor", "compare_dispatchers"]


@dataclass(frozen=True, kw_only=True)
class Comparison:
    """The three dispatchers on the same tokens.

    Attributes:
        layout: TP, EP.
        split: m, slices per expert (1 when P <= E).
        results: dispatcher name -> SimResult ("alltoall", "dedup", "specmoe").
    """

    layout: ParallelLayout
    split: int
    results: dict

    def table_row(self) -> dict:
        """One row of the report: per MoE layer per step, means (JSON-ready)."""
        row = {"ep": self.layout.ep, "tp": self.layout.tp, "expert_split": self.split}
        first = next(iter(self.results.values()))
        row["nodes"] = -(-self.layout.ep // first.cluster.gpus_per_node)
        row["tokens_per_step"] = first.tokens_per_step
        row["steps"] = first.num_steps
        for name, res in self.results.items():
            row[name] = res.summary()
        base = self.results["alltoall"].layer_time_s.mean()
        for name, res in self.results.items():
            row[name]["speedup_vs_alltoall"] = float(base / res.layer_time_s.mean()) if base else 1.0
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
    dtype: str,
    tokens_per_rank: int,
    plan_placements: Optional[Sequence[ExpertPlacement]] = None,
    method: str = "refine",
) -> Comparison:
    """Simulate alltoall, dedup and specmoe on ``trace`` (module docstring, steps 1-4).

    Args:
        trace: routes [T, L, k] over E experts; T must be a multiple of tokens_per_rank * P.
        expert_scores: float [T, L, E], the predictor's scores used for s-TS (an oracle's or a
            fitted predictor's; ``simulate_inputs``).
        ep, tp: P and p.
        cluster: the cluster (nodes are added to fit P).
        hidden_size, dtype: H and a ``DTYPE_BYTES`` name.
        tokens_per_rank: tokens each rank holds in a step (B = tokens_per_rank * p), so that
            every EP size sees the same load per GPU.
        plan_placements: the plan's placements (E experts each, any EP size: only the slot
            order is used), or None for contiguous.
        method: the balanced assignment (``assignment.AssignmentMethod``).
    """
    num_tokens, num_layers, _ = trace.experts.shape
    expert_scores = np.asarray(expert_scores)
    if expert_scores.shape != (num_tokens, num_layers, trace.num_experts):
        raise ValueError(
            f"compare_dispatchers: expert_scores must be [T, L, E]=({num_tokens}, {num_layers}, "
            f"{trace.num_experts}), got {expert_scores.shape}"
        )
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_BYTES)}")
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
    # Step 1: experts per rank, or slices per expert.
    m = experts_split_factor(trace.num_experts, ep)
    sim_trace = split_experts(trace, m)
    scores = split_scores(expert_scores, m) if m > 1 else expert_scores
    num_sim_experts = sim_trace.num_experts
    shape = ModelShape(
        hidden_size=hidden_size,
        activation_bytes=DTYPE_BYTES[dtype],
        top_k=sim_trace.topk,
        num_experts=num_sim_experts,
        num_layers=num_layers,
    )
    # Step 2: baselines.
    base_placements = [ExpertPlacement.contiguous(num_sim_experts, ep)] * num_layers
    base_home = contiguous_home_ranks(num_tokens, num_layers, layout=layout, tokens_per_group=tokens_per_group)
    # Step 3: specmoe.
    spec_placements = _specmoe_placements(plan_placements, trace.num_experts, num_layers, ep, m)
    spec_home = shuffled_home_ranks(
        layer_rank_scores(scores, spec_placements),
        layout=layout,
        tokens_per_group=tokens_per_group,
        method=method,
    )
    # Step 4: the same tokens, steps and cluster for all three.
    runs = {
        "alltoall": (base_placements, base_home),
        "dedup": (base_placements, base_home),
        "specmoe": (spec_placements, spec_home),
    }
    results = {
        name: simulate(
            sim_trace,
            placements,
            home,
            shape=shape,
            layout=layout,
            cluster=cluster,
            dispatcher=name,
            tokens_per_step=step,
        )
        for name, (placements, home) in runs.items()
    }
    return Comparison(layout=layout, split=m, results=results)
