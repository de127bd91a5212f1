"""The demo's whole workflow on every rank: profile -> plan -> serve, on a trained model.

Notation: W ranks, TP / EP / DP sizes (DP = W / TP), S window length (tokens per sequence),
B sequences per forward per DP group, L MoE layers, E experts, k top-k.

1. profile  the ``alltoall`` model runs the calibration windows; a ``RouteRecorder`` on TP rank 0
            of each DP group records every MoE layer's top-k with token ids; rank 0 merges them.
2. plan     rank 0 fits the token table (the runtime predictor, on token ids every TP rank holds;
            with ``predictor="history"`` also the route-history MLP, combined with the table) and the
            expert grouping, and
            writes the plan folder; every rank loads it back.
3. serve    the evaluation windows go through three models with the same trained weights:
            ``alltoall`` and ``allgather`` (Megatron's layers and dispatchers; allgather's bytes are
            its collectives' payloads, counted) and ``specmoe`` (``ShuffleTransformerLayer`` with the
            plan's token table, and the plan's placement applied by moving expert weights between
            EP ranks). Logits are compared, traffic is taken from the routing map each dispatcher
            keeps (after the timed forward, for both), and forward times are the slowest rank's,
            per batch, interleaved: the models take turns on each batch, in an order that reverses
            every step, after untimed warm-up rounds, over ``passes`` passes of the windows, with the
            garbage collector's existing objects frozen (``gc.freeze``) while timing.

Both models run with sequence parallelism (``TokenwiseNorm`` for Megatron's torch norms, which
refuse it without TransformerEngine), so each token is routed once in both.
"""

from __future__ import annotations

import gc
import logging
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_specmoe.megatron import cpu_support
from megatron_specmoe.megatron import parallel
from megatron_specmoe.demo.serve import (
    DemoResult,
    DispatcherRun,
    PhaseTimer,
    _alltoall_records,
    _sum_reports,
    _timed,
)

__all__ = ["PipelineSettings", "PipelineResult", "pipeline_worker"]


@dataclass(frozen=True, kw_only=True)
class PipelineSettings:
    """Attributes:
    model_dir: checkpoint folder (``model.json`` + weights); None = the shipped demo model.
    calib, evalu: int64 [N, S] token windows (prepared by the caller, identical on every rank).
    tp, ep: layout (TP group inside the EP group, expert tensor parallel 1).
    batch: B.
    predictor: "route" (the plan's token table), "history" (the plan's token table combined with
        its route-history MLP on the routes carried between layers) or "pregate" (the layer's
        router; no fitting).
    placement: expert grouping method (``schedule.grouping.GroupingMethod``).
    plan_dir: where the plan is written.
    seed: grouping seed.
    passes: timed passes over the evaluation windows (>= 1); traffic counts the first pass only.
    warmup: untimed rounds (every model once each) before the timed ones (>= 0).
    """

    model_dir: Optional[str]
    calib: np.ndarray
    evalu: np.ndarray
    tp: int
    ep: int
    batch: int
    predictor: str
    placement: str
    plan_dir: str
    seed: int = 0
    passes: int = 2
    warmup: int = 2


@dataclass(frozen=True, kw_only=True)
class PipelineResult:
    """Attributes: serve (the alltoall / specmoe comparison), profile_tokens, plan_seconds,
    profile_seconds, plan_summary (predictor memory, placement measures)."""

    serve: DemoResult
    profile_tokens: int
    profile_seconds: float
    plan_seconds: float
    plan_summary: dict


def _bar(done: int, total: int, what: str, start: float) -> None:
    width = 30
    filled = int(width * done / max(total, 1))
    sys.stderr.write(f"\r[specmoe demo] {what} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} "
                     f"({time.perf_counter() - start:.0f}s)")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def _windows_for(windows: np.ndarray, dp_rank: int, dp: int, batch: int):
    """This DP group's share of the windows, in batches of ``batch`` (whole batches only)."""
    mine = windows[dp_rank::dp]
    usable = len(mine) // batch * batch
    return [torch.as_tensor(mine[i : i + batch]) for i in range(0, usable, batch)]


def _profile(card, settings: PipelineSettings, rank: int):
    from megatron.core import parallel_state

    from megatron_specmoe.megatron.checkpoint import load_model
    from megatron_specmoe.megatron.route_recorder import RouteRecorder
    from megatron_specmoe.artifacts.traces import RoutingTrace

    model = load_model(settings.model_dir, dispatcher="alltoall", tp=settings.tp, ep=settings.ep)
    recorder = RouteRecorder.attach(model)
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    batches = _windows_for(settings.calib, dp_rank, dp, settings.batch)
    seq = settings.calib.shape[1]
    positions = torch.arange(seq).unsqueeze(0).expand(settings.batch, -1)
    mask = torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool), diagonal=1)
    ids, start = [], time.perf_counter()
    with torch.no_grad():
        for i, tokens in enumerate(batches):
            model(tokens, positions, mask)
            ids.append(tokens.reshape(-1).numpy())
            if rank == 0:
                _bar(i + 1, len(batches), "profile", start)
    recorder.detach()
    mine = None
    if parallel_state.get_tensor_model_parallel_rank() == 0 and ids:
        token_ids = np.concatenate(ids)
        mine = recorder.trace(token_ids=token_ids)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    parts = [t for t in gathered if t is not None]
    return RoutingTrace.concat(parts) if rank == 0 else None


def _plan(trace, card, settings: PipelineSettings) -> dict:
    from megatron_specmoe.schedule.grouping import GroupingOptions, grouping_cost, group_experts
    from megatron_specmoe.schedule.placement import ExpertPlacement
    from megatron_specmoe.artifacts.plan_folder import make_plan, save_plan
    from megatron_specmoe.predict.token_table import TokenTable

    table = TokenTable(vocab_size=card.shape.vocab).fit(trace)
    states = {"token": table.to_state()}
    memory = table.memory_bytes()
    if settings.predictor == "history":
        from megatron_specmoe.predict.combined import Combined
        from megatron_specmoe.predict.history_mlp import HistoryMLP

        combined = Combined.of([table, HistoryMLP().fit(trace)])
        states["combined"] = combined.to_state()
        memory = combined.memory_bytes()
    groups = _router_groups(card)
    placements = group_experts(trace, ep_size=settings.ep,
                               options=GroupingOptions(method=settings.placement, seed=settings.seed,
                                                       router_groups=groups))
    contiguous = ExpertPlacement.contiguous(trace.num_experts, settings.ep)
    colocated = [
        (grouping_cost(trace.experts[:, l], contiguous, theta=0.1).co_located_share,
         grouping_cost(trace.experts[:, l], p, theta=0.1).co_located_share)
        for l, p in enumerate(placements)
    ]
    plan = make_plan(num_layers=trace.num_layers, num_experts=trace.num_experts, topk=trace.topk,
                     ep_size=settings.ep, hidden_size=card.shape.hidden, vocab_size=card.shape.vocab,
                     placements=placements, predictor_state=states,
                     notes={"source": "specmoe demo", "placement_method": settings.placement,
                            "router_groups": groups.to_json() if groups is not None else None})
    save_plan(plan, settings.plan_dir)
    return {
        "predictor": "combined" if settings.predictor == "history" else "token",
        "predictor_memory_bytes": memory,
        "placement": settings.placement,
        "co_located_share_contiguous": float(np.mean([c for c, _ in colocated])),
        "co_located_share_grouped": float(np.mean([g for _, g in colocated])),
    }


def _router_groups(card):
    """The model's group-limited routing (``schedule.router_groups``; groups stay on their own
    ranks, so the plan also keeps the node bound), or None."""
    from megatron_specmoe.schedule.router_groups import RouterGroups

    groups = int(card.config.get("moe_router_num_groups") or 1)
    if groups <= 1:
        return None
    return RouterGroups(num_groups=groups, group_topk=int(card.config.get("moe_router_group_topk") or 0))


def _serve_models(card, settings: PipelineSettings, plan, names=("alltoall", "allgather", "specmoe"), **overrides):
    """alltoall reference (and allgather) and the s-TS model, all with sequence parallelism, trained
    weights; ``overrides`` go into every model's config (the dynamic demo's inference dispatcher)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel

    from megatron_specmoe.megatron.apply_plan import apply_placements
    from megatron_specmoe.megatron.build import make_config, spec_options
    from megatron_specmoe.megatron.checkpoint import load_state, read_weights
    from megatron_specmoe.megatron.local_mla import with_local_mla
    from megatron_specmoe.megatron.shuffle_layer import ShuffleCarrier, ShuffleOptions
    from megatron_specmoe.megatron.shuffle_specs import (
        feed_token_ids,
        get_gpt_block_shuffle_spec,
        get_gpt_layer_shuffle_spec,
        true_order_output,
        with_tokenwise_norms,
    )
    from megatron_specmoe.predict.registry import predictor_from_state

    shape = card.shape
    kind = {"route": "token", "history": "combined"}.get(settings.predictor)
    route = predictor_from_state(kind, plan.predictor_state[kind]) if kind else None
    carrier = ShuffleCarrier(options=ShuffleOptions(predictor=settings.predictor, route_predictor=route))
    gpt = dict(card.gpt)
    gpt_kwargs = {"position_embedding_type": gpt["position_embedding_type"],
                  "rotary_base": int(gpt["rotary_base"]),
                  "share_embeddings_and_output_weights": bool(gpt["share_embeddings_and_output_weights"]),
                  "parallel_output": False}
    models = {}
    for name in names:
        config = make_config(shape, dispatcher=name, tp=settings.tp, ep=settings.ep,
                             **{**dict(card.config), "sequence_parallel": True, **overrides})
        opts = spec_options(config)  # multi-latent attention, RMSNorm (DeepSeek-style model)
        if name != "specmoe":
            spec = with_tokenwise_norms(with_local_mla(
                get_gpt_layer_local_spec(num_experts=shape.experts, moe_grouped_gemm=False, **opts)))
        else:
            spec = get_gpt_layer_shuffle_spec(shape.experts, carrier=carrier, sequence_parallel_norms=True, **opts)
        models[name] = GPTModel(config=config, transformer_layer_spec=get_gpt_block_shuffle_spec(config, spec),
                                vocab_size=shape.vocab, max_sequence_length=shape.seq, **gpt_kwargs).eval()
    weights = read_weights(card)
    for model in models.values():
        load_state(model, weights, source=card.weights_path)
    true_order_output(models["specmoe"], carrier)
    feed_token_ids(models["specmoe"], carrier)
    # The plan's grouping, applied for real: experts move between EP ranks, the router stays.
    apply_placements(models["specmoe"], plan.placements, mode="dispatcher")
    return models, carrier


def _timing_order(names: tuple[str, ...], step: int) -> tuple[str, ...]:
    """The order the models run in at timed step ``step``: as given on even steps, reversed on odd
    ones, so that no model always runs first (cold caches) or right after a given other one."""
    return names if step % 2 == 0 else tuple(reversed(names))


def _serve(card, settings: PipelineSettings, plan, rank: int, world_size: int) -> Optional[DemoResult]:
    from megatron.core import parallel_state

    from megatron_specmoe.comm.stats import gather_reports
    from megatron_specmoe.demo.serve import CollectiveBytes

    models, _ = _serve_models(card, settings, plan)
    allgather_bytes = CollectiveBytes(models["allgather"])
    ep_group = parallel_state.get_expert_model_parallel_group()
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    batches = _windows_for(settings.evalu, dp_rank, dp, settings.batch)
    counts = [None] * world_size
    dist.all_gather_object(counts, len(batches))
    batches = batches[: min(counts)]  # every rank runs the same number of forwards
    seq = settings.evalu.shape[1]
    positions = torch.arange(seq).unsqueeze(0).expand(settings.batch, -1)
    mask = torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool), diagonal=1)
    names = ("alltoall", "allgather", "specmoe")
    reports = {"alltoall": [], "specmoe": []}
    times = {name: [] for name in names}
    a2a = {name: [] for name in names}
    counted = 0
    timers = {name: PhaseTimer(model) for name, model in models.items()}
    max_diff, start = 0.0, time.perf_counter()
    steps = settings.passes * len(batches)
    with torch.no_grad():
        for w in range(settings.warmup):  # untimed rounds: first-call allocations, caches, the plans' shapes
            for name in _timing_order(names, w):
                models[name](batches[w % len(batches)], positions, mask)
                timers[name].take()
        allgather_bytes.take()
        # The models' objects are long-lived: kept out of the collector's reach while timing, so that
        # a full collection over them (tens of ms here) does not land inside one model's forward.
        gc.collect()
        gc.freeze()
        try:
            for step in range(steps):
                first_pass, b = step < len(batches), step % len(batches)
                tokens = batches[b]
                outs = {}
                for name in _timing_order(names, step):
                    outs[name], elapsed = _timed(lambda m=models[name]: m(tokens, positions, mask))
                    times[name].append(elapsed)
                    a2a[name].append(timers[name].take())
                    if name != "allgather" and first_pass:
                        # Traffic from the routing map each dispatcher keeps, after the timed forward
                        # for both (bookkeeping is not part of either's forward time).
                        reports[name].append(gather_reports(
                            _alltoall_records(models[name], ep_rank, settings.ep, card.shape.hidden), ep_group))
                bytes_now = allgather_bytes.take()
                counted += bytes_now if first_pass else 0
                diff = torch.tensor([max(float((outs["alltoall"] - outs[n]).abs().max()) for n in ("allgather", "specmoe"))],
                                    dtype=torch.float64)
                dist.all_reduce(diff, op=dist.ReduceOp.MAX)
                max_diff = max(max_diff, float(diff))
                if rank == 0:
                    _bar(step + 1, steps, "serve  ", start)
        finally:
            gc.unfreeze()
    if rank != 0:
        return None
    # allgather routes exactly as alltoall (same weights, same router): its pairs, LAR and load are
    # alltoall's; what differs is what it sends, which CollectiveBytes counted.
    summed = {"alltoall": _sum_reports(reports["alltoall"]), "specmoe": _sum_reports(reports["specmoe"])}
    summed["allgather"] = summed["alltoall"]
    return DemoResult(
        runs=tuple(DispatcherRun(name=n, reports=summed[n], forward_s=tuple(times[n]), a2a_s=tuple(a2a[n]),
                                 bytes_on_wire=counted if n == "allgather" else None)
                   for n in names),
        max_abs_diff=max_diff,
        tokens=len(batches) * settings.batch * seq * dp,
    )


def pipeline_worker(rank: int, world_size: int, settings: PipelineSettings) -> Optional[PipelineResult]:
    """Run on every rank; rank 0 returns the result, the others ``None``."""
    from megatron_specmoe.megatron.checkpoint import read_card
    from megatron_specmoe.artifacts.plan_folder import load_plan

    warnings.filterwarnings("ignore")
    logging.getLogger("megatron").setLevel(logging.ERROR)
    cpu_support.enable()
    parallel.initialize(parallel.ParallelLayout(tp=settings.tp, ep=settings.ep))
    try:
        card = read_card(settings.model_dir)
        t0 = time.perf_counter()
        trace = _profile(card, settings, rank)
        t1 = time.perf_counter()
        summary = _plan(trace, card, settings) if rank == 0 else None
        if rank == 0:
            label = "token table + route-history MLP" if summary["predictor"] == "combined" else "token table"
            print(f"[specmoe demo] plan: {trace.num_tokens} profiled tokens -> {label} "
                  f"({summary['predictor_memory_bytes'] / 1e6:.2f} MB) + '{settings.placement}' grouping "
                  f"(tokens with all experts on one rank: {summary['co_located_share_contiguous']:.3f} "
                  f"contiguous -> {summary['co_located_share_grouped']:.3f}); wrote {settings.plan_dir}",
                  file=sys.stderr, flush=True)
        t2 = time.perf_counter()
        dist.barrier()
        plan = load_plan(settings.plan_dir)
        plan.check_compatible(num_layers=card.shape.layers, num_experts=card.shape.experts,
                              topk=card.shape.topk, ep_size=settings.ep, vocab_size=card.shape.vocab)
        serve = _serve(card, settings, plan, rank, world_size)
        if rank != 0:
            return None
        return PipelineResult(serve=serve, profile_tokens=trace.num_tokens, profile_seconds=t1 - t0,
                              plan_seconds=t2 - t1, plan_summary=summary)
    finally:
        parallel.destroy()
