"""The s-TS lossless check: a model with ``ShuffleTransformerLayer`` computes what Megatron computes.

Each function runs on every rank of a process group (``testing.spawn.run_local`` on the CPU). Three
models with identical weights (seeded expert banks, arranged by the placement) see identical inputs:
    ref       Megatron's layers with the ``alltoall`` dispatcher: the outputs to match.
    base      Megatron's layers with the ``specmoe`` dispatcher and contiguous placement: what
              ``alltoall`` sends, recorded by the dispatcher's own accounting.
    shuffle   ``ShuffleTransformerLayer`` (s-TS) with the specmoe dispatcher, recorded likewise.
Each returns the largest output difference, both models' summed route measures (this rank's records),
the TP bytes each moved (counted), and whether every TP rank computed the same plans.
Notation: S sequence length, B micro-batch, H hidden size, E experts, P TP size.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from megatron_specmoe.comm.shuffle import CollectiveCounter
from megatron_specmoe.megatron import cpu_support, parallel
from megatron_specmoe.megatron.build import MoEShape, build_from_spec, make_config, spec_options
from megatron_specmoe.megatron.local_mla import with_local_mla
from megatron_specmoe.testing.collectives import RawCollectiveCounter, count_collectives
from megatron_specmoe.testing.lossless import arrange_layers
from megatron_specmoe.testing.padded_decode import decode_padding, dispatchers_of, guarded_phases, set_padded_decode
from megatron_specmoe.measure.measures import RouteMeasures
from megatron_specmoe.schedule.placement import ExpertPlacement

__all__ = [
    "ShuffleCase",
    "ShuffleResult",
    "gpt_shuffle_lossless",
    "layers_shuffle_lossless",
    "shuffle_refusals",
    "run_shuffle_cases",
    "count_tp_collectives",
]


@dataclass(frozen=True, kw_only=True)
class ShuffleCase:
    """One configuration. Attributes: shape; tp, ep (etp is 1); placement (physical_to_logical
    for every layer, None = contiguous); predictor, method, share_plans (``ShuffleOptions``); seq,
    batch (S and B of the whole sequence); seed; decode_steps (GPT case: extra one-token steps with a
    KV cache after the prefill); route_stand_in (predictor "route": "modulo", ``TokenModuloPredictor``,
    or "one_rank", ``OneRankPredictor``: every token predicted to TP rank 0's experts); mutant (a
    ``testing.mutants`` name applied on every rank for this case, None: the library as it is); config:
    extra ``TransformerConfig`` fields as (name, value) pairs for every model (DeepSeek-style:
    multi_latent_attention and its sizes, normalization, router groups and expert bias; shared experts
    come from ``shape.shared_ffn``); padded_decode (GPT, decode_steps): after the prefill every model
    runs Megatron's padded decode (``testing.padded_decode``), the shuffle model's phases guarded."""

    shape: MoEShape = field(default_factory=lambda: MoEShape(layers=2))
    tp: int = 4
    ep: int = 4
    placement: Optional[tuple[int, ...]] = None
    predictor: str = "pregate"
    method: str = "prices"
    seq: int = 8
    batch: int = 2
    seed: int = 7
    decode_steps: int = 0
    route_stand_in: str = "modulo"
    mutant: Optional[str] = None
    config: tuple = ()
    padded_decode: bool = False
    share_plans: str = "auto"


@dataclass(frozen=True, kw_only=True)
class PlanRows:
    """One ShufflePlan as plain lists (picklable, for checks in the parent): layer_number, and
    the plan's home_rank [T], order [T_pad], inverse [T_pad], capacity C, num_tokens T,
    num_ranks P."""

    layer_number: int
    home_rank: tuple[int, ...]
    order: tuple[int, ...]
    inverse: tuple[int, ...]
    capacity: int
    num_tokens: int
    num_ranks: int


@dataclass(frozen=True, kw_only=True)
class ShuffleResult:
    """Attributes: rank; max_out_diff (max |shuffle - ref| over every output compared); base /
    shuffle: this rank's summed RouteMeasures (None when it recorded nothing); tp_calls: per model
    ("ref", "base", "shuffle"), the raw ``torch.distributed`` collectives this rank issued on its TP
    group during the forwards (``testing.collectives``), in order; plans_agree: every TP rank
    computed identical plans; plans: layers x forwards planned; plan_rows: every plan this rank
    used, in order (``PlanRows``); logit_rows (GPT cases): per forward, the rows of logits
    Megatron's model returned (numel / V; with a KV cache they are gathered over TP: all of the
    prefill's on core 0.19, the last token's on 0.16); history_ok (predictor "history", GPT cases):
    after the prefill, the route history the shuffle layers carried equals the routes Megatron's own
    routers chose, token for token (None: not checked); host_reads, decode_padding (padded_decode
    cases): "" once the decode steps ran with the dispatcher phases guarded (a host read raises);
    ``padded_decode.decode_padding`` at the end; plans_made: ``ShuffleCarrier.plans_made``;
    workspace_bytes (GPT cases): what the carrier's reused ``workspace`` held at the end."""

    rank: int
    max_out_diff: float
    base: Optional[RouteMeasures]
    shuffle: Optional[RouteMeasures]
    tp_calls: dict
    plans_agree: bool
    plans: int
    plan_rows: tuple = ()
    history_ok: Optional[bool] = None
    logit_rows: tuple[int, ...] = ()
    host_reads: Optional[str] = None
    decode_padding: tuple = ()
    plans_made: int = 0
    workspace_bytes: int = 0


@contextlib.contextmanager
def count_tp_collectives(group, counter: CollectiveCounter):
    """Count Megatron's collectives on ``group``: ``torch.distributed.all_reduce`` (looked up at
    call time by ``mappings._reduce``) and the all-gather / reduce-scatter functions that
    ``tensor_parallel.mappings`` and ``tensor_parallel.layers`` bind at import
    (``dist_all_gather_func``, ``dist_reduce_scatter_func``). Explicit, reversed on exit;
    measurement only (our own comm layer counts itself)."""
    from megatron.core.tensor_parallel import layers, mappings

    size = dist.get_world_size(group)
    saved = [(dist, "all_reduce", dist.all_reduce)]
    for module in (mappings, layers):
        for name in ("dist_all_gather_func", "dist_reduce_scatter_func"):
            if hasattr(module, name):
                saved.append((module, name, getattr(module, name)))

    def wrap(kind, fn, payload_arg):
        def counted(*args, **kwargs):
            if kwargs.get("group") is group:
                tensor = args[payload_arg]
                counter.add(kind, tensor.numel() * tensor.element_size(), size)
            return fn(*args, **kwargs)

        return counted

    kinds = {"all_reduce": ("all_reduce", 0), "dist_all_gather_func": ("all_gather", 0),
             "dist_reduce_scatter_func": ("reduce_scatter", 1)}
    try:
        for owner, name, fn in saved:
            kind, arg = kinds[name]
            setattr(owner, name, wrap(kind, fn, arg))
        yield counter
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


@dataclass(frozen=True, kw_only=True)
class TokenModuloPredictor:
    """A stand-in fitted RoutePredictor for tests: token v at MoE layer l scores experts
    ``(v + l) % E`` and ``(3v + 1) % E`` (half each). Any fixed map exercises the "route" path;
    its accuracy is irrelevant to losslessness."""

    kind: str = "modulo"
    num_experts: int = 8
    num_layers: int = 2

    def expert_scores(self, ctx):
        import numpy as np

        ids = np.asarray(ctx.token_ids, dtype=np.int64)
        out = np.zeros((ids.shape[0], self.num_experts), dtype=np.float32)
        rows = np.arange(ids.shape[0])
        np.add.at(out, (rows, (ids + ctx.layer) % self.num_experts), 0.5)
        np.add.at(out, (rows, (3 * ids + 1) % self.num_experts), 0.5)
        return out

    def memory_bytes(self) -> int:
        return 0


@dataclass(frozen=True, kw_only=True)
class OneRankPredictor:
    """A stand-in fitted RoutePredictor for tests: every token scores experts 0 and 1 (half
    each), which the contiguous placement puts on EP rank 0, so every token of a TP group is
    predicted to one rank and the assignment must overflow it to the others, within capacity."""

    kind: str = "one_rank"
    num_experts: int = 8
    num_layers: int = 2

    def expert_scores(self, ctx):
        import numpy as np

        out = np.zeros((len(ctx.token_ids), self.num_experts), dtype=np.float32)
        out[:, :2] = 0.5
        return out

    def memory_bytes(self) -> int:
        return 0


def toy_history_predictor(shape: MoEShape, seed: int = 0):
    """The "history" predictor's usual form, a Combined (mixture) of a TokenTable and a HistoryMLP,
    fitted (seeded, so identically on every rank) on 256 tokens of random ids and routes with a
    planted dependence (layer l's first expert follows layer l-1's): real fitted models for the
    run-time path; their accuracy is irrelevant to losslessness."""
    import numpy as np

    from megatron_specmoe.predict.combined import Combined
    from megatron_specmoe.predict.history_mlp import HistoryMLP
    from megatron_specmoe.predict.token_table import TokenTable
    from megatron_specmoe.artifacts.traces import RoutingTrace

    rng = np.random.default_rng(seed)
    e, k, layers = shape.experts, shape.topk, shape.layers
    ex = np.stack([np.stack([rng.choice(e, k, replace=False) for _ in range(layers)]) for _ in range(256)])
    for layer in range(1, layers):
        follow = (ex[:, layer - 1, 0] + 3) % e
        clash = (ex[:, layer, 1:] == follow[:, None]).any(axis=1)
        ex[~clash, layer, 0] = follow[~clash]
    trace = RoutingTrace(experts=ex.astype(np.int32), num_experts=e,
                         token_ids=rng.integers(0, shape.vocab, size=ex.shape[0]))
    return Combined.of([TokenTable(vocab_size=shape.vocab).fit(trace),
                        HistoryMLP(hidden=8, epochs=2, seed=seed).fit(trace)])


def _options(case: ShuffleCase):
    from megatron_specmoe.megatron.shuffle_layer import ShuffleOptions

    route = None
    if case.predictor == "history":
        route = toy_history_predictor(case.shape)
    if case.predictor == "route":
        stand_ins = {"modulo": TokenModuloPredictor, "one_rank": OneRankPredictor}
        if case.route_stand_in not in stand_ins:
            raise ValueError(f"ShuffleCase.route_stand_in={case.route_stand_in!r}; choose one of {sorted(stand_ins)}")
        route = stand_ins[case.route_stand_in](num_experts=case.shape.experts, num_layers=case.shape.layers)
    return ShuffleOptions(predictor=case.predictor, method=case.method, seed=case.seed, keep_plans=True,
                          route_predictor=route, share_plans=case.share_plans,
                          route_vocab_size=case.shape.vocab if case.predictor == "route" else None)


def _placement(case: ShuffleCase) -> ExpertPlacement:
    if case.placement is None:
        return ExpertPlacement.contiguous(case.shape.experts, case.ep)
    return ExpertPlacement(physical_to_logical=case.placement, ep_size=case.ep)


@torch.no_grad()
def _arrange(layers, case: ShuffleCase, placements, layer_index: int) -> None:
    """Same router weights and logical experts in every model's MoE layer ``layer_index``."""
    arrange_layers(layers, placements, seed=case.seed, layer_index=layer_index)


def _sum_measures(records) -> Optional[RouteMeasures]:
    total = None
    for rec in records:
        total = rec.measures if total is None else total + rec.measures
    return total


def _plan_rows(plans) -> tuple[PlanRows, ...]:
    return tuple(PlanRows(layer_number=int(n), home_rank=tuple(p.home_rank.tolist()), order=tuple(p.order.tolist()),
                          inverse=tuple(p.inverse.tolist()), capacity=int(p.capacity), num_tokens=int(p.num_tokens),
                          num_ranks=int(p.num_ranks)) for n, p in plans)


def _tp_calls(counters: dict, group) -> dict:
    return {name: tuple(c.on(group)) for name, c in counters.items()}


@contextlib.contextmanager
def _mutant(case: ShuffleCase):
    if case.mutant is None:
        yield
        return
    from megatron_specmoe.testing.mutants import apply_mutant, revert_mutant

    applied = apply_mutant(case.mutant)
    try:
        yield
    finally:
        revert_mutant(applied)


def _plans_agree(plans, group) -> tuple[bool, int]:
    mine = [p.order.tolist() for _, p in plans]
    every = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, mine, group=group)
    return all(other == every[0] for other in every), len(mine)


def _setup(case: ShuffleCase) -> None:
    warnings.filterwarnings("ignore")
    cpu_support.enable()
    parallel.initialize(parallel.ParallelLayout(tp=case.tp, ep=case.ep, etp=1), seed=case.seed)


def gpt_shuffle_lossless(rank: int, world_size: int, case: ShuffleCase, sequence_parallel: bool = False) -> ShuffleResult:
    """Whole GPT model: logits of the three models (prefill, then ``case.decode_steps`` one-token
    steps with a KV cache). Sequence parallel off: Megatron's local spec. On: every model's norms
    are ``TokenwiseNorm`` (torch norms refuse sequence parallelism) and the shuffle model's
    logits come back in true order through ``true_order_output``."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel

    from megatron_specmoe.megatron.dispatcher import DispatchRecorder
    from megatron_specmoe.megatron.model_tools import attach_recorder, moe_sites, set_placements
    from megatron_specmoe.megatron.shuffle_layer import ShuffleCarrier
    from megatron_specmoe.megatron.shuffle_specs import (
        feed_token_ids, get_gpt_block_shuffle_spec, get_gpt_layer_shuffle_spec, true_order_output, with_tokenwise_norms)
    from megatron_specmoe.megatron.specs import get_gpt_layer_specmoe_spec

    if sequence_parallel and case.decode_steps:
        raise ValueError("ShuffleCase.decode_steps: decode is checked with sequence parallelism off")
    if case.padded_decode and not case.decode_steps:
        raise ValueError("ShuffleCase.padded_decode needs decode_steps > 0 (padding is switched on for decode)")
    _setup(case)
    try:
        shape = case.shape
        cfg = {d: make_config(shape, dispatcher=d, tp=case.tp, ep=case.ep,
                              **{**dict(case.config), "sequence_parallel": sequence_parallel})
               for d in ("alltoall", "specmoe")}
        carrier = ShuffleCarrier(
            options=_options(case),
            counter=CollectiveCounter(),
        )
        opts = spec_options(cfg["specmoe"])
        layer_specs = {
            "ref": with_local_mla(get_gpt_layer_local_spec(num_experts=shape.experts, moe_grouped_gemm=False, **opts)),
            "base": with_local_mla(get_gpt_layer_specmoe_spec(shape.experts, use_transformer_engine=False, **opts)),
            "shuffle": get_gpt_layer_shuffle_spec(shape.experts, carrier=carrier,
                                                  sequence_parallel_norms=sequence_parallel, **opts),
        }
        models = {}
        for name, spec in layer_specs.items():
            config = cfg["alltoall" if name == "ref" else "specmoe"]
            if sequence_parallel:
                spec = get_gpt_block_shuffle_spec(config, spec if name == "shuffle" else with_tokenwise_norms(spec))
            models[name] = GPTModel(
                config=config, transformer_layer_spec=spec, vocab_size=shape.vocab,
                max_sequence_length=shape.seq + case.decode_steps, position_embedding_type="rope",
            ).eval()
        ref, base, shuffle = models["ref"], models["base"], models["shuffle"]
        if sequence_parallel:
            true_order_output(shuffle, carrier)
        feed_token_ids(shuffle, carrier)
        base.load_state_dict(ref.state_dict(), strict=True)
        shuffle.load_state_dict(ref.state_dict(), strict=True)
        placement = _placement(case)
        set_placements(shuffle, [placement] * shape.layers)
        contiguous = ExpertPlacement.contiguous(shape.experts, case.ep)
        for i, sites in enumerate(zip(moe_sites(ref), moe_sites(base), moe_sites(shuffle))):
            _arrange([s.layer for s in sites], case, [contiguous, contiguous, placement], i)
        recorders = {"base": DispatchRecorder(), "shuffle": DispatchRecorder()}
        attach_recorder(base, recorders["base"])
        attach_recorder(shuffle, recorders["shuffle"])
        ref_routes: dict[int, torch.Tensor] = {}
        if case.predictor == "history":
            for i, site in enumerate(moe_sites(ref)):
                site.layer.router.register_forward_hook(functools.partial(_keep_router_routes, ref_routes, i, shape.topk))
        history_ok = None

        dp_rank = parallel_state.get_data_parallel_rank()
        gen = torch.Generator().manual_seed(case.seed * 131 + dp_rank)
        tokens = torch.randint(0, shape.vocab, (case.batch, case.seq), generator=gen)
        positions = torch.arange(case.seq).unsqueeze(0).expand(case.batch, -1)
        mask = torch.triu(torch.ones(1, 1, case.seq, case.seq, dtype=torch.bool), diagonal=1)

        tp_group = parallel_state.get_tensor_model_parallel_group()
        raw = {name: RawCollectiveCounter() for name in models}
        diff = 0.0
        if case.decode_steps:
            from megatron.core.inference.contexts import StaticInferenceContext

            contexts = {n: StaticInferenceContext(case.batch, case.seq + case.decode_steps) for n in models}
        else:
            contexts = {n: None for n in models}
        # Prefill, then (with decode_steps) one-token steps that read the KV cache.
        steps = [(tokens, positions, mask)]
        full = torch.triu(torch.ones(1, 1, case.seq + case.decode_steps, case.seq + case.decode_steps,
                                     dtype=torch.bool), diagonal=1)
        for i in range(case.decode_steps):
            pos = case.seq + i
            step_tokens = torch.randint(0, shape.vocab, (case.batch, 1), generator=gen)
            steps.append((step_tokens, torch.full((case.batch, 1), pos), full[..., pos : pos + 1, : pos + 1]))
        logit_rows = []
        host_reads = None
        with torch.no_grad():
            for step_index, (step_tokens, step_positions, step_mask) in enumerate(steps):
                if case.padded_decode and step_index == 1:
                    for model in models.values():
                        set_padded_decode(model, True)
                outs = {}
                for name, model in models.items():
                    with count_collectives(raw[name]):
                        extra = {} if contexts[name] is None else {
                            "inference_context": contexts[name], "runtime_gather_output": True}
                        if case.padded_decode and step_index >= 1 and name == "shuffle":
                            with guarded_phases(dispatchers_of(model)):  # raises at a host read
                                outs[name] = model(step_tokens, step_positions, step_mask, **extra)
                            host_reads = ""
                        else:
                            outs[name] = model(step_tokens, step_positions, step_mask, **extra)
                    if contexts[name] is not None:
                        contexts[name].sequence_len_offset += step_tokens.shape[1]
                logit_rows.append(outs["ref"].numel() // shape.vocab)
                diff = max(diff, float((outs["ref"] - outs["shuffle"]).abs().max()),
                           float((outs["ref"] - outs["base"]).abs().max()))
                if case.predictor == "history" and step_index == 0:
                    history_ok = _history_matches(carrier, ref_routes, tp_group, sequence_parallel)
        agree, planned = _plans_agree(carrier.plans, tp_group)
        return ShuffleResult(
            rank=rank, max_out_diff=diff,
            base=_sum_measures(recorders["base"].records),
            shuffle=_sum_measures(recorders["shuffle"].records),
            tp_calls=_tp_calls(raw, tp_group),
            plans_agree=agree, plans=planned, plan_rows=_plan_rows(carrier.plans), history_ok=history_ok,
            logit_rows=tuple(logit_rows), host_reads=host_reads, workspace_bytes=carrier.workspace.nbytes(),
            decode_padding=decode_padding(models) if case.padded_decode else (), plans_made=carrier.plans_made)
    finally:
        parallel.destroy()


def _keep_router_routes(store: dict, index: int, topk: int, _router, _args, output) -> None:
    from megatron_specmoe.megatron.route_recorder import _topk_from_output

    if output[1].dtype == torch.bool and bool((output[1].sum(dim=1) > topk).any()):  # padded: all marked
        output = (output[0], output[0] > 0)
    store[index] = _topk_from_output(output, topk)[0]


def _history_matches(carrier, ref_routes: dict, tp_group, sequence_parallel: bool) -> bool:
    """Whether the carried route history equals Megatron's routes (as sets per token and layer).
    Without sequence parallelism every TP rank of the reference routes all T tokens in (s, b)
    order; with it, rank r routes the contiguous shard r, so the shards are all-gathered."""
    carried = carrier.routes.history  # [T, l, k]
    truth = torch.stack([ref_routes[i] for i in sorted(ref_routes)], dim=1)  # [rows, L, k]
    if sequence_parallel:
        parts = [torch.empty_like(truth) for _ in range(dist.get_world_size(tp_group))]
        dist.all_gather(parts, truth.contiguous(), group=tp_group)
        truth = torch.cat(parts, dim=0)
    layers = carried.shape[1]
    want_layers = truth.shape[1] - (1 if sequence_parallel else 0)  # SP: the last layer's are pending
    return layers == want_layers and torch.equal(
        torch.sort(carried, dim=-1).values, torch.sort(truth[:, :layers], dim=-1).values
    )


def layers_shuffle_lossless(rank: int, world_size: int, case: ShuffleCase) -> ShuffleResult:
    """A stack of ``shape.layers`` transformer layers with sequence parallelism on: Megatron's
    layers (reduce-scatter / all-gather inside the linears) against the shuffle layers, from the
    same contiguous input shard [S/P, B, H]; the shuffle output is brought back to true order
    with ``restore_true_order`` and compared row for row."""
    from megatron.core import parallel_state

    from megatron_specmoe.megatron.dispatcher import DispatchRecorder
    from megatron_specmoe.megatron.shuffle_layer import ShuffleCarrier, restore_true_order
    from megatron_specmoe.megatron.shuffle_specs import TokenwiseNorm, get_gpt_layer_shuffle_spec
    from megatron_specmoe.megatron.specs import get_gpt_layer_specmoe_spec

    _setup(case)
    try:
        shape = case.shape
        if case.seq % case.tp:
            raise ValueError(f"ShuffleCase.seq={case.seq} must be a multiple of tp={case.tp} with sequence parallelism")
        cfg = {d: make_config(shape, dispatcher=d, tp=case.tp, ep=case.ep,
                              **{**dict(case.config), "sequence_parallel": case.tp > 1})
               for d in ("alltoall", "specmoe")}
        opts = spec_options(cfg["specmoe"])
        carrier = ShuffleCarrier(
            options=_options(case),
            counter=CollectiveCounter(),
            output_consumer="restore_true_order",
        )
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        def norms(spec):
            import dataclasses

            return dataclasses.replace(spec, submodules=dataclasses.replace(
                spec.submodules, input_layernorm=TokenwiseNorm, pre_mlp_layernorm=TokenwiseNorm))

        specs = {
            "ref": norms(with_local_mla(get_gpt_layer_local_spec(num_experts=shape.experts, moe_grouped_gemm=False,
                                                                 **opts))),
            "base": norms(with_local_mla(get_gpt_layer_specmoe_spec(shape.experts, use_transformer_engine=False, **opts))),
            "shuffle": get_gpt_layer_shuffle_spec(shape.experts, carrier=carrier, sequence_parallel_norms=True, **opts),
        }
        stacks = {}
        for name, spec in specs.items():
            config = cfg["alltoall" if name == "ref" else "specmoe"]
            torch.manual_seed(case.seed)
            stacks[name] = [build_from_spec(spec, config=config, layer_number=i + 1).eval()
                            for i in range(shape.layers)]
        placement = _placement(case)
        contiguous = ExpertPlacement.contiguous(shape.experts, case.ep)
        for i in range(shape.layers):
            state = stacks["ref"][i].state_dict()
            stacks["base"][i].load_state_dict(state, strict=True)
            stacks["shuffle"][i].load_state_dict(state, strict=True)
            stacks["shuffle"][i].mlp.token_dispatcher.set_placement(placement)
            _arrange([stacks[n][i].mlp for n in ("ref", "base", "shuffle")], case,
                     [contiguous, contiguous, placement], i)
        recorders = {"base": DispatchRecorder(), "shuffle": DispatchRecorder()}
        for name in recorders:
            for layer in stacks[name]:
                layer.mlp.token_dispatcher.recorder = recorders[name]

        tp_group = parallel_state.get_tensor_model_parallel_group()
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        dp_rank = parallel_state.get_data_parallel_rank()
        gen = torch.Generator().manual_seed(case.seed * 131 + dp_rank)
        full = torch.randn(case.seq, case.batch, shape.hidden, generator=gen)
        per = case.seq // case.tp
        x = full[tp_rank * per : (tp_rank + 1) * per].contiguous()
        mask = torch.triu(torch.ones(1, 1, case.seq, case.seq, dtype=torch.bool), diagonal=1)

        outs = {}
        raw = {name: RawCollectiveCounter() for name in ("ref", "base", "shuffle")}
        with torch.no_grad():
            for name in ("ref", "base", "shuffle"):
                h = x
                with count_collectives(raw[name]):
                    for layer in stacks[name]:
                        h, _ = layer(hidden_states=h, attention_mask=mask)
                outs[name] = h
            shuffled_out = outs["shuffle"]
            outs["shuffle"] = restore_true_order(shuffled_out, carrier, tp_group)
        diff = max(float((outs["ref"] - outs[n]).abs().max()) for n in ("base", "shuffle"))
        agree, planned = _plans_agree(carrier.plans, tp_group)
        return ShuffleResult(
            rank=rank, max_out_diff=diff,
            base=_sum_measures(recorders["base"].records),
            shuffle=_sum_measures(recorders["shuffle"].records),
            tp_calls=_tp_calls(raw, tp_group),
            plans_agree=agree, plans=planned, plan_rows=_plan_rows(carrier.plans), plans_made=carrier.plans_made,
        )
    finally:
        parallel.destroy()


def shuffle_refusals(rank: int, world_size: int, case: ShuffleCase) -> tuple[str, ...]:
    """Settings the shuffle layer refuses, on a live process group: the error messages of (1) a
    model with shared experts overlapped with the dispatcher (at build time), (2) a forward with an EP size that is
    not a multiple of the TP size (``case.ep``, at the first forward) and (3) a sequence-parallel
    GPT whose output layer was not told to restore true order (``true_order_output``)."""
    from megatron.core.models.gpt.gpt_model import GPTModel

    from megatron_specmoe.megatron.shuffle_specs import get_gpt_block_shuffle_spec, get_gpt_layer_shuffle_spec

    _setup(case)
    messages = []
    try:
        shared = MoEShape(layers=1, shared_ffn=24)
        for shape, sp in ((shared, False), (case.shape, False), (case.shape, True)):
            config = make_config(shape, dispatcher="specmoe", tp=case.tp, ep=case.ep, sequence_parallel=sp)
            if shape.shared_ffn:  # set after construction: Megatron's own check refuses it for 'specmoe'
                config.moe_shared_expert_overlap = True
            spec = get_gpt_layer_shuffle_spec(shape.experts, sequence_parallel_norms=sp)
            if sp:
                spec = get_gpt_block_shuffle_spec(config, spec)
            try:
                model = GPTModel(config=config, transformer_layer_spec=spec,
                                 vocab_size=shape.vocab, max_sequence_length=shape.seq,
                                 position_embedding_type="rope").eval()
                tokens = torch.zeros(1, case.seq, dtype=torch.long)
                positions = torch.arange(case.seq).unsqueeze(0)
                with torch.no_grad():
                    model(tokens, positions, None)
                messages.append("")
            except ValueError as err:
                messages.append(str(err))
        return tuple(messages)
    finally:
        parallel.destroy()


def run_shuffle_cases(rank: int, world_size: int, cases) -> list[ShuffleResult]:
    """Several (kind, case) pairs in one set of processes (kind: "gpt", "gpt_sp", "layers" or
    "refuse")."""
    kinds = {
        "gpt": gpt_shuffle_lossless,
        "gpt_sp": functools.partial(gpt_shuffle_lossless, sequence_parallel=True),
        "layers": layers_shuffle_lossless,
        "refuse": shuffle_refusals,
    }
    out = []
    for kind, case in cases:
        with _mutant(case):
            out.append(kinds[kind](rank, world_size, case))
    return out
