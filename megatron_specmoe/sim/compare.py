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

Replicas (``replicas``: the plan's ``ReplicatedPlacement`` per layer, at the plan's EP size)
    At P = the plan's EP size (P <= E), a third route set: s-TS from the scores of the ranks that
    hold any copy of an expert (``measure.replica_routes.replica_rank_scores``), each pair sent where
    the route table sends it (``route_counts(replicas=...)``); every ``specmoe_*`` model runs on it
    too. At other P the replicas are not defined (they are per rank of the plan's EP group) and
    the row says so.

Request placement (``request_method``; DP attention, TP = 1)
    A token cannot leave its rank, so instead of s-TS every request is placed whole on a DP rank
    (``schedule.request_placement.trace_request_homes_from_scores``; affinity: the simulator's
    expert scores of the request's prompt, its first half, summed over layers and per rank). The
    ``specmoe_*`` models carry the plan's placement with those homes, the baseline models
    Megatron's contiguous placement with Megatron's ``least_loaded`` homes. ``request_placement``
    in the row counts the plan's placement under the chosen method, ``round_robin`` and
    ``least_loaded`` side by side (local activation rate, remote pairs, node measures) with the
    chosen method's ratios to each.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, get_args

import numpy as np

from megatron_specmoe.artifacts.traces import RoutingTrace
from megatron_specmoe.measure.nodes import TRANSPORTS
from megatron_specmoe.measure.replica_routes import replica_rank_scores
from megatron_specmoe.schedule.placement import ExpertPlacement
from megatron_specmoe.schedule.replicas import ReplicatedPlacement
from megatron_specmoe.schedule.request_placement import TraceRequestMethod, trace_request_homes_from_scores
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
from megatron_specmoe.sim.simulate import ModelShape, ParallelLayout, RouteCounts, route_counts

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
        replicas: ``specmoe_*`` name -> SimResult on the replica routes, or None without replicas.
        replicas_info: redundant experts, policy, slots per rank; or {"skipped": why}; None without.
        requests: ``request_placement`` block of the row (module docstring), or None.
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
    replicas: Optional[dict] = None
    replicas_info: Optional[dict] = None
    requests: Optional[dict] = None

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
        if self.replicas_info is not None:
            block = dict(self.replicas_info)
            for name, res in (self.replicas or {}).items():
                entry = res.summary()
                entry["plan_time_s"] = self.plan_exposed_s
                entry["total_time_s"] = entry["layer_time_s"] + entry["plan_time_s"]
                if "alltoall" in row and entry["total_time_s"]:
                    entry["speedup_vs_alltoall"] = row["alltoall"]["total_time_s"] / entry["total_time_s"]
                mine = row[name]
                entry["vs_without_replicas"] = {
                    key: (entry[key] / mine[key] if mine[key] else None)
                    for key in ("total_time_s", "remote_pairs_per_token", "inter_node_bytes_per_layer",
                                "nvlink_bytes_per_layer")}
                block[name] = entry
            row["replicas"] = block
        if self.requests is not None:
            row["request_placement"] = self.requests
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
    replicas: Optional[Sequence[ReplicatedPlacement]] = None,
    request_ids: Optional[np.ndarray] = None,
    request_method: Optional[str] = None,
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
        replicas: the plan's replicas, one per layer (module docstring), or None.
        request_ids: int [T], the trace's request ids (with ``request_method``).
        request_method: a ``TraceRequestMethod``: place requests instead of s-TS (needs tp = 1).
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
    if request_method is not None:
        if request_method not in get_args(TraceRequestMethod):
            raise ValueError(f"request placement method {request_method!r}; choose one of "
                             f"{list(get_args(TraceRequestMethod))}")
        if tp != 1:
            raise ValueError(f"request placement models DP attention (TP = 1); got TP = {tp} at EP {ep}")
        if request_ids is None or np.asarray(request_ids).shape != (num_tokens,):
            raise ValueError("request placement needs the trace's request ids, int [T]")
        if replicas is not None:
            raise ValueError("request placement and replicas are not simulated together")
    cluster = cluster if cluster.num_gpus >= ep else cluster.for_ranks(ep)
    m = experts_split_factor(trace.num_experts, ep)
    sim_trace = split_experts(trace, m)
    shape = ModelShape(hidden_size=hidden_size, top_k=sim_trace.topk, num_experts=sim_trace.num_experts,
                       num_layers=num_layers, dispatch_dtype=dispatch_dtype, combine_dtype=combine_dtype)
    gpn = cluster.gpus_per_node
    skipped = {n: why for n in names if (why := not_applicable(n, num_ranks=ep, gpus_per_node=gpn))}
    runnable = [n for n in names if n not in skipped]
    counts = {}
    scores = split_scores(expert_scores, m) if m > 1 else expert_scores
    spec_placements = _specmoe_placements(plan_placements, trace.num_experts, num_layers, ep, m)
    homes: dict[str, np.ndarray] = {}
    if request_method is not None:
        token_scores = layer_rank_scores(scores, spec_placements).sum(axis=1)  # [T, P]
        for name in dict.fromkeys((request_method, "round_robin", "least_loaded")):
            home = trace_request_homes_from_scores(request_ids, token_scores, method=name)
            homes[name] = np.repeat(home[:, None], num_layers, axis=1)
    if any(DISPATCHERS[n].routes == "baseline" for n in runnable):
        base_home = (homes["least_loaded"] if request_method is not None else
                     contiguous_home_ranks(num_tokens, num_layers, layout=layout, tokens_per_group=tokens_per_group))
        counts["baseline"] = route_counts(
            sim_trace, [ExpertPlacement.contiguous(sim_trace.num_experts, ep)] * num_layers, base_home,
            num_ranks=ep, gpus_per_node=gpn, tokens_per_step=step)
    spec_runnable = [n for n in runnable if DISPATCHERS[n].routes == "specmoe"]
    if spec_runnable:
        if request_method is not None:
            spec_home = homes[request_method]
        else:
            spec_home = shuffled_home_ranks(layer_rank_scores(scores, spec_placements), layout=layout,
                                            tokens_per_group=tokens_per_group, method=method)
        counts["specmoe"] = route_counts(sim_trace, spec_placements, spec_home, num_ranks=ep,
                                         gpus_per_node=gpn, tokens_per_step=step)
    results: dict[str, SimResult] = {}
    for name in runnable:
        results[name] = simulate_dispatcher(name, counts[DISPATCHERS[name].routes], wire=shape.wire,
                                            cluster=cluster, top_k=sim_trace.topk)
    replica_results, replicas_info = None, None
    if replicas is not None:
        replica_results, replicas_info = _replica_results(
            replicas, spec_placements, sim_trace, scores, spec_runnable, ep=ep, m=m, layout=layout,
            tokens_per_group=tokens_per_group, method=method, gpn=gpn, step=step, shape=shape, cluster=cluster)
    requests = None
    if request_method is not None:
        requests = _request_block(request_method, homes, sim_trace, spec_placements, ep=ep, gpn=gpn, step=step,
                                  shape=shape)
    attention = attention_roofline(hidden_size=hidden_size, tokens_per_rank=tokens_per_rank, tp=tp,
                                   cluster=cluster, phase=charge.phase, context=charge.context)
    plan_s, exposed_s = plan_time(charge, cluster, attention.time_s)
    return Comparison(layout=layout, split=m, tokens_per_step=step, steps=num_tokens // step,
                      results=results, skipped=skipped, plan_s=plan_s, plan_exposed_s=exposed_s,
                      attention=attention, charge=charge, replicas=replica_results, replicas_info=replicas_info,
                      requests=requests)


def _replica_results(replicas, spec_placements, sim_trace, scores, spec_runnable, *, ep, m, layout,
                     tokens_per_group, method, gpn, step, shape, cluster):
    """(specmoe_* name -> SimResult on the replica routes, the row's replica info) (module docstring)."""
    first = replicas[0]
    info = {"redundant_experts": first.redundant, "policy": first.policy, "slots_per_rank": first.slots_per_rank}
    if m != 1 or ep != first.ep_size:
        info = {"skipped": f"the plan's replicas are per rank of EP {first.ep_size}; EP {ep} is not simulated "
                           "with them (run --ep " + str(first.ep_size) + ")"}
        return None, info
    for layer, (rp, pl) in enumerate(zip(replicas, spec_placements)):
        if rp.base != pl:
            raise ValueError(f"compare_dispatchers: replicas[{layer}] is built on another base placement than the "
                             f"plan's placement of layer {layer}")
    rep_scores = np.stack([replica_rank_scores(scores[:, layer], rp.rank_mask())
                           for layer, rp in enumerate(replicas)], axis=1)  # [T, L, P]
    home = shuffled_home_ranks(rep_scores, layout=layout, tokens_per_group=tokens_per_group, method=method)
    counts = route_counts(sim_trace, spec_placements, home, num_ranks=ep, gpus_per_node=gpn,
                          tokens_per_step=step, replicas=replicas)
    results = {name: simulate_dispatcher(name, counts, wire=shape.wire, cluster=cluster, top_k=sim_trace.topk)
               for name in spec_runnable}
    return results, info


def _route_measures(counts: RouteCounts, shape: ModelShape) -> dict:
    """LAR, remote pairs and node measures of one route set (JSON-ready)."""
    out = {"local_activation_rate": counts.local_activation_rate(),
           "remote_pairs_per_token": counts.remote_pairs_per_token(),
           "max_tokens_per_rank_step": int(counts.tokens.max()) if counts.tokens.size else 0,
           "remote_nodes_per_token": None, "internode_bytes_per_token": None}
    nodes, wire = counts.nodes, shape.wire
    if nodes is not None:
        out["remote_nodes_per_token"] = nodes.remote_nodes_per_token
        out["internode_bytes_per_token"] = {
            t: (nodes.internode_bytes_rows(dispatch_row=wire.dispatch_row, combine_row=wire.combine_row,
                                           prob_bytes=wire.prob_bytes, transport=t) / nodes.tokens
                if nodes.tokens else 0.0) for t in TRANSPORTS}
    return out


def _request_block(request_method, homes, sim_trace, spec_placements, *, ep, gpn, step, shape) -> dict:
    """The row's ``request_placement`` block (module docstring)."""
    by = {name: _route_measures(route_counts(sim_trace, spec_placements, home, num_ranks=ep, gpus_per_node=gpn,
                                             tokens_per_step=step), shape)
          for name, home in homes.items()}
    mine = by[request_method]

    def ratios(base: dict) -> dict:
        out = {}
        for key in ("remote_pairs_per_token", "remote_nodes_per_token"):
            out[key] = mine[key] / base[key] if base[key] else None
        if mine["internode_bytes_per_token"] is not None:
            out["internode_bytes_per_token"] = {
                t: (mine["internode_bytes_per_token"][t] / base["internode_bytes_per_token"][t]
                    if base["internode_bytes_per_token"][t] else None) for t in TRANSPORTS}
        return out

    return {"method": request_method, "placement": "the plan's", "by_method": by,
            "vs_round_robin": ratios(by["round_robin"]), "vs_least_loaded": ratios(by["least_loaded"])}
