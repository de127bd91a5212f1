"""The lossless check: a model with ``specmoe`` must compute what it computes with ``alltoall``.

Each function here runs on every rank of an initialised process group (``testing.spawn.run_local``
starts them on the CPU; torchrun on GPUs). It builds the same model twice, once per dispatcher,
with identical weights (expert weights from a seeded bank, arranged by the placement under test),
feeds identical inputs, and returns the largest differences of outputs and input gradients, plus
the specmoe dispatcher's traffic reports.

Notation: S sequence length per rank, B micro-batch, H hidden size, E experts, V vocabulary.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from megatron_specmoe.megatron import cpu_support
from megatron_specmoe.megatron import parallel
from megatron_specmoe.megatron.build import MoEShape, build_gpt_model, build_moe_layer, make_config
from megatron_specmoe.megatron.experts import load_bank, make_expert_bank
from megatron_specmoe.measure.accounting import TrafficReport
from megatron_specmoe.schedule.placement import ExpertPlacement

__all__ = ["LosslessCase", "LosslessResult", "arrange_layers", "moe_layer_lossless", "gpt_lossless", "run_cases"]


@dataclass(frozen=True, kw_only=True)
class LosslessCase:
    """One configuration to check.

    Attributes:
        shape: model shape.
        tp, ep, etp: parallel layout (etp must be 1: banks hold whole experts).
        placement: physical_to_logical for every MoE layer, or None (contiguous).
        silent_experts: logical experts that the router is made never to select, so that the
            ranks hosting them receive zero tokens.
        seq, batch: tokens per rank are seq x batch (seq is the per-rank shard under sequence
            parallelism, the full sequence for the GPT case).
        ragged: rank r gets ``seq + r`` tokens (MoE-layer case with tp = 1 only).
        seed: weights and inputs.
        via: how specmoe is selected: "spec" (the specmoe layer spec) or "hook" (install()).
        device: "cpu" (gloo) or "cuda" (NCCL; rank r uses GPU r mod the visible count).
        gpus_per_node: given to the specmoe dispatcher's recorder (node measures), or None.
        replica_extra: redundant experts: rank q's replica slots hold experts
            ``replica_extra[q]`` on top of ``placement``. The specmoe layer is built with E + R slots
            and an E-expert router (``megatron/replicas.py``), its base slots loaded contiguously and
            its replica slots with NaN, then ``apply_replicas`` moves and copies the experts in
            (``comm.weight_move``); the reference is alltoall on E experts without replicas. GPT
            case: the specmoe model is built plain and loaded contiguously (as from a checkpoint),
            then ``replicas.replicate_layers`` swaps every MoE layer for its E + R-slot twin (the
            launcher's path) and ``apply_replicas`` fills the slots; every layer has this plan.
        replica_load: the planned load per rank (route table: which remote copy a pair uses).
        wrong_replica: after applying, overwrite rank 0's first replica slot with another expert's
            weights (the harness's own negative check: the outputs must then differ).
        padded_decode: both layers run in Megatron's padded decode (``testing.padded_decode``:
            drop-and-pad at capacity factor E / k, switched on after the build as Megatron's
            inference does); ``LosslessResult.dropped_pairs`` counts what its capacity left out.
        guard_host_reads: the specmoe layer makes one more forward with its dispatcher's phases
            guarded against host reads (``LosslessResult.host_reads``; the dropless dispatcher
            fails it, which is the guard's own negative check).
        config: extra ``TransformerConfig`` fields as (name, value) pairs, for both models (e.g.
            DeepSeek-style routing: moe_router_num_groups, moe_router_group_topk, a sigmoid score
            with moe_router_enable_expert_bias; multi_latent_attention for the GPT case). With an
            expert bias the routers get the same random nonzero bias, so that it takes part.
    """

    shape: MoEShape = field(default_factory=MoEShape)
    tp: int = 1
    ep: int = 4
    etp: int = 1
    placement: Optional[tuple[int, ...]] = None
    silent_experts: tuple[int, ...] = ()
    seq: int = 6
    batch: int = 2
    ragged: bool = False
    seed: int = 7
    via: str = "spec"
    device: str = "cpu"
    gpus_per_node: Optional[int] = None
    replica_extra: Optional[tuple[tuple[int, ...], ...]] = None
    replica_load: Optional[tuple[float, ...]] = None
    wrong_replica: bool = False
    padded_decode: bool = False
    guard_host_reads: bool = False
    config: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True, kw_only=True)
class LosslessResult:
    """Attributes: rank; max_out_diff and max_grad_diff (max |specmoe - alltoall|); tokens on
    this rank; reports: the specmoe dispatcher's traffic reports (whole EP group), one per
    MoE-layer forward; alltoall_input_splits: Megatron's own ``input_splits`` of the reference
    dispatcher on this rank, per MoE layer (pairs sent to each EP rank under the contiguous
    placement), to check the accounting against; routes: per MoE layer, int64 [T, k] the logical
    experts the router chose for this rank's tokens (MoE-layer case), to replay in the simulator;
    slots_hold_their_experts (replica cases): every local slot's weights have the fingerprint of the
    bank's expert that the replica plan puts there (the weights encode the logical id);
    host_reads (guard_host_reads cases): "" when the guarded forward read nothing on the host, else the
    guard's message; dropped_pairs (padded_decode cases): routed (token, expert) pairs of this rank
    that the dispatcher's capacity left out (0: lossless)."""

    rank: int
    max_out_diff: float
    max_grad_diff: float
    tokens: int
    reports: tuple[TrafficReport, ...]
    alltoall_input_splits: tuple[tuple[int, ...], ...] = ()
    routes: tuple = ()
    slots_hold_their_experts: Optional[bool] = None
    host_reads: Optional[str] = None
    dropped_pairs: Optional[int] = None


def _setup(case: LosslessCase) -> None:
    warnings.filterwarnings("ignore")
    if case.etp != 1:
        raise ValueError("LosslessCase.etp must be 1 (expert banks hold whole experts)")
    if case.device == "cuda":
        torch.cuda.set_device(torch.distributed.get_rank() % torch.cuda.device_count())
    cpu_support.enable()
    parallel.initialize(parallel.ParallelLayout(tp=case.tp, ep=case.ep, etp=case.etp), seed=case.seed)


def _placement(case: LosslessCase) -> ExpertPlacement:
    if case.placement is None:
        return ExpertPlacement.contiguous(case.shape.experts, case.ep)
    return ExpertPlacement(physical_to_logical=case.placement, ep_size=case.ep)


@torch.no_grad()
def arrange_layers(layers, placements, *, seed: int, layer_index: int, silent_experts=()) -> None:
    """Give the MoE layers of several models the same router and the same logical experts.

    Args:
        layers: MoE layers (one per model) for MoE-layer ``layer_index``.
        placements: one ``ExpertPlacement`` per layer: how that model's slots hold the experts.
        seed, layer_index: seed the router weights and the expert bank.
        silent_experts: logical experts the router is made never to select (inputs carry a positive
            feature 0 and these rows get a large negative weight on it), so ranks can be left empty.
    """
    from megatron.core import parallel_state

    first = layers[0]
    num_experts, hidden = first.router.weight.shape
    gen = torch.Generator().manual_seed(seed * 7919 + layer_index)
    router = torch.randn(num_experts, hidden, generator=gen) * 0.5
    for e in silent_experts:
        router[e] = 0.0
        router[e, 0] = -1e4
    bank = make_expert_bank(first, num_experts, seed + 100 * layer_index)
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    bias = torch.randn(num_experts, generator=gen) * 0.3  # the expert bias, where the router has one
    for layer, placement in zip(layers, placements):
        layer.router.weight.copy_(router)
        if getattr(layer.router, "expert_bias", None) is not None:
            layer.router.expert_bias.copy_(bias)
        load_bank(layer, bank, placement, ep_rank)


@torch.no_grad()
def _arrange(ref_layer, spec_layer, case: LosslessCase, layer_index: int) -> None:
    """Same router, same experts by logical id (reference contiguous), shared experts copied."""
    contiguous = ExpertPlacement.contiguous(case.shape.experts, case.ep)
    arrange_layers([ref_layer, spec_layer], [contiguous, _placement(case)], seed=case.seed,
                   layer_index=layer_index, silent_experts=case.silent_experts)
    if getattr(ref_layer, "shared_experts", None) is not None:
        spec_layer.shared_experts.load_state_dict(ref_layer.shared_experts.state_dict())


def _splits(dispatcher, ep: int) -> tuple[int, ...]:
    splits = dispatcher.input_splits
    if splits is None:  # EP = 1 and TP = 1: Megatron skips the split computation
        return (int(dispatcher.routing_map.sum()),) if ep == 1 else ()
    return tuple(int(s) for s in splits)


def _logical_routes(dispatcher, topk: int):
    """int64 [T, k]: logical experts per token from the dispatcher's last (physical) routing map."""
    physical = dispatcher.routing_map.nonzero()[:, 1].view(-1, topk).cpu()
    where = dispatcher.replicas if getattr(dispatcher, "replicas", None) is not None else dispatcher.placement
    p2l = torch.tensor(where.physical_to_logical, dtype=torch.long)
    return p2l[physical].numpy()


def replica_placement(case: LosslessCase):
    """The case's ``ReplicatedPlacement`` (``replica_extra`` over ``placement``)."""
    from megatron_specmoe.schedule.replicas import ReplicatedPlacement

    load = case.replica_load if case.replica_load is not None else tuple(float(q) for q in range(case.ep))
    return ReplicatedPlacement(base=_placement(case), extra=case.replica_extra, planned_load=load, policy="load")


@torch.no_grad()
def _build_replicated(case: LosslessCase, ref):
    """The specmoe layer with E + R slots, filled by ``apply_replicas`` (``LosslessCase.replica_extra``);
    returns (layer, whether every slot holds its expert's fingerprint)."""
    from megatron.core import parallel_state

    from megatron_specmoe.comm.weight_move import fingerprint
    from megatron_specmoe.megatron.apply_plan import apply_replicas, base_slots
    from megatron_specmoe.megatron.experts import load_local_expert_state, local_expert_state
    from megatron_specmoe.megatron.replicas import replicated_config, use_logical_router

    shape, rep = case.shape, replica_placement(case)
    logical_cfg = make_config(shape, dispatcher="specmoe", tp=case.tp, ep=case.ep)
    spec = build_moe_layer(replicated_config(logical_cfg, rep.redundant), shape, specmoe=True, via=case.via)
    use_logical_router(spec, logical_cfg)
    spec.router.weight.copy_(ref.router.weight)
    bank = make_expert_bank(ref, shape.experts, case.seed)  # arrange_layers' bank of MoE layer 0
    rank, s = parallel_state.get_expert_model_parallel_rank(), rep.slots_per_rank
    start = base_slots(shape.experts, case.ep, s)
    for i in range(s):
        logical = start[rank * s + i]
        state = bank[logical] if logical >= 0 else {k: torch.full_like(v, float("nan")) for k, v in bank[0].items()}
        load_local_expert_state(spec, i, state)
    apply_replicas(spec, [rep], current=[start])
    if case.wrong_replica and rank == 0:
        wrong = next(e for e in range(shape.experts) if e != rep.extra[0][0])
        load_local_expert_state(spec, s - len(rep.extra[0]), bank[wrong])

    def prints(state):
        return fingerprint([state[k] for k in sorted(state)])

    ok = all(torch.allclose(prints(local_expert_state(spec, i)), prints(bank[rep.physical_to_logical[rank * s + i]]))
             for i in range(s))
    return spec, ok


def _reports(spec_recorder) -> tuple[TrafficReport, ...]:
    from megatron.core import parallel_state

    from megatron_specmoe.comm.stats import gather_reports

    return tuple(gather_reports(spec_recorder.records, parallel_state.get_expert_model_parallel_group()))


def moe_layer_lossless(rank: int, world_size: int, case: LosslessCase) -> LosslessResult:
    """One ``MoELayer`` per dispatcher; forward and backward on identical inputs."""
    from megatron_specmoe.megatron.dispatcher import DispatchRecorder

    _setup(case)
    try:
        shape = case.shape
        extra = dict(case.config)
        ref = build_moe_layer(make_config(shape, dispatcher="alltoall", tp=case.tp, ep=case.ep, **extra), shape,
                              specmoe=False)
        slots_ok = None
        if case.replica_extra is not None:
            if shape.shared_ffn or case.silent_experts or extra:
                raise ValueError("LosslessCase.replica_extra: no shared experts, silent experts or extra config "
                                 "with replicas")
            arrange_layers([ref], [ExpertPlacement.contiguous(shape.experts, case.ep)], seed=case.seed,
                           layer_index=0)
            spec, slots_ok = _build_replicated(case, ref)
        else:
            spec = build_moe_layer(make_config(shape, dispatcher="specmoe", tp=case.tp, ep=case.ep, **extra), shape,
                                   specmoe=True, via=case.via)
            spec.token_dispatcher.set_placement(_placement(case))
            _arrange(ref, spec, case, 0)
        ref.to(case.device)
        spec.to(case.device)
        if case.padded_decode:
            if case.ragged:
                raise ValueError("LosslessCase.padded_decode: equal tokens per rank (drop-and-pad sends equal "
                                 "splits), so not ragged")
            from megatron_specmoe.testing.padded_decode import set_padded_decode

            # Megatron's decode factor E / k on the logical experts (with replicas the specmoe
            # layer's config says E + R; its dispatcher must still drop nothing).
            factor = shape.experts / shape.topk
            set_padded_decode(ref, True, capacity_factor=factor)
            set_padded_decode(spec, True, capacity_factor=factor)
        recorder = DispatchRecorder(gpus_per_node=case.gpus_per_node)
        spec.token_dispatcher.recorder = recorder

        seq = case.seq + (rank if case.ragged else 0)
        gen = torch.Generator().manual_seed(case.seed * 31 + rank)
        x = torch.randn(seq, case.batch, shape.hidden, generator=gen)
        x[..., 0] = x[..., 0].abs() + 1.0
        upstream = torch.randn(seq, case.batch, shape.hidden, generator=gen).to(case.device)
        x = x.to(case.device)

        outs, grads = [], []
        for layer in (ref, spec):
            inp = x.clone().requires_grad_(True)
            out, _ = layer(inp)
            out.backward(upstream)
            outs.append(out.detach())
            grads.append(inp.grad.detach())
        host_reads = _guarded_forward(spec, x) if case.guard_host_reads else None
        dropped = _dropped_pairs(spec.token_dispatcher) if case.padded_decode else None
        return LosslessResult(
            rank=rank,
            max_out_diff=float((outs[0] - outs[1]).abs().max()),
            max_grad_diff=float((grads[0] - grads[1]).abs().max()),
            tokens=seq * case.batch,
            reports=_reports(recorder),
            alltoall_input_splits=(_splits(ref.token_dispatcher, case.ep),),
            routes=() if case.padded_decode else (_logical_routes(spec.token_dispatcher, shape.topk),),
            slots_hold_their_experts=slots_ok,
            host_reads=host_reads,
            dropped_pairs=dropped,
        )
    finally:
        parallel.destroy()


def gpt_lossless(rank: int, world_size: int, case: LosslessCase) -> LosslessResult:
    """A tiny ``GPTModel`` per dispatcher (every layer MoE); logits and embedding gradients."""
    from megatron_specmoe.megatron.dispatcher import DispatchRecorder
    from megatron_specmoe.megatron.model_tools import attach_recorder, moe_sites, set_placements

    _setup(case)
    try:
        shape = case.shape
        # Megatron's torch norms (no TE) refuse sequence parallelism, so TP > 1 runs the model
        # in inference mode without it (allowed for MoE in eval mode): every TP rank then
        # routes its own full copy of the tokens.
        cfgs = [
            make_config(shape, dispatcher=d, tp=case.tp, ep=case.ep, **{**dict(case.config), "sequence_parallel": False})
            for d in ("alltoall", "specmoe")
        ]
        ref = build_gpt_model(cfgs[0], shape, specmoe=False).eval()
        spec = build_gpt_model(cfgs[1], shape, specmoe=True, via=case.via).eval()
        spec.load_state_dict(ref.state_dict(), strict=True)
        slots_ok = None
        if case.replica_extra is not None:
            for i, (a, b) in enumerate(zip(moe_sites(ref), moe_sites(spec))):
                contiguous = ExpertPlacement.contiguous(shape.experts, case.ep)
                arrange_layers([a.layer, b.layer], [contiguous, contiguous], seed=case.seed, layer_index=i)
            slots_ok = _replicate_gpt(case, spec)
        else:
            set_placements(spec, [_placement(case)] * shape.layers)
            for i, (a, b) in enumerate(zip(moe_sites(ref), moe_sites(spec))):
                _arrange(a.layer, b.layer, case, i)
        ref.to(case.device)
        spec.to(case.device)
        recorder = DispatchRecorder(gpus_per_node=case.gpus_per_node)
        attach_recorder(spec, recorder)

        # Data parallel ranks (outside a TP group) see different sequences.
        from megatron.core import parallel_state

        dp_rank = parallel_state.get_data_parallel_rank()
        gen = torch.Generator().manual_seed(case.seed * 131 + dp_rank)
        tokens = torch.randint(0, shape.vocab, (case.batch, case.seq), generator=gen)
        positions = torch.arange(case.seq).unsqueeze(0).expand(case.batch, -1)
        mask = torch.triu(torch.ones(1, 1, case.seq, case.seq, dtype=torch.bool), diagonal=1)
        tokens, positions, mask = (t.to(case.device) for t in (tokens, positions, mask))

        logits, grads = [], []
        for model in (ref, spec):
            model.zero_grad(set_to_none=True)
            out = model(tokens, positions, mask)
            out.float().square().mean().backward()
            logits.append(out.detach())
            grads.append(model.embedding.word_embeddings.weight.grad.detach().clone())
        return LosslessResult(
            rank=rank,
            max_out_diff=float((logits[0] - logits[1]).abs().max()),
            max_grad_diff=float((grads[0] - grads[1]).abs().max()),
            tokens=case.seq * case.batch,
            reports=_reports(recorder),
            alltoall_input_splits=tuple(_splits(s.dispatcher, case.ep) for s in moe_sites(ref)),
            routes=tuple(_logical_routes(s.dispatcher, shape.topk) for s in moe_sites(spec)),
            slots_hold_their_experts=slots_ok,
        )
    finally:
        parallel.destroy()


@torch.no_grad()
def _guarded_forward(layer, x: torch.Tensor) -> str:
    """One forward of ``layer`` with its dispatcher's phases guarded (``testing.padded_decode``):
    "" or the guard's message."""
    from megatron_specmoe.measure.launches import HostSyncError
    from megatron_specmoe.testing.padded_decode import guarded_phases

    try:
        with guarded_phases([layer.token_dispatcher]):
            layer(x)
    except HostSyncError as err:
        return str(err)
    return ""


def _dropped_pairs(dispatcher) -> int:
    """Pairs of the dispatcher's last physical routing map [T, E] that its drop-and-pad permute did
    not keep (it keeps ``capacity`` rows per slot, the map's own first)."""
    kept = dispatcher.reversed_local_input_permutation_mapping.view(dispatcher.num_experts, -1)
    wanted = dispatcher.routing_map.T
    taken = torch.zeros_like(wanted).scatter_(1, kept, True)
    return int((wanted & ~taken).sum())


def _replicate_gpt(case: LosslessCase, spec) -> bool:
    """The launcher's path on a loaded GPT model: twins, then ``apply_replicas``; returns whether
    every slot of every layer holds its expert's fingerprint."""
    from megatron.core import parallel_state

    from megatron_specmoe.comm.weight_move import fingerprint
    from megatron_specmoe.megatron.apply_plan import apply_replicas
    from megatron_specmoe.megatron.experts import local_expert_state
    from megatron_specmoe.megatron.model_tools import moe_sites
    from megatron_specmoe.megatron.replicas import replicate_layers

    rep = replica_placement(case)
    twins = replicate_layers(spec, rep.redundant)
    apply_replicas(spec, [rep] * len(twins))
    if case.wrong_replica and parallel_state.get_expert_model_parallel_rank() == 0:
        from megatron_specmoe.megatron.experts import load_local_expert_state

        wrong = next(e for e in range(case.shape.experts) if e != rep.extra[0][0])
        layer = twins[0]
        bank = make_expert_bank(layer, case.shape.experts, case.seed)
        load_local_expert_state(layer, rep.slots_per_rank - len(rep.extra[0]), bank[wrong])
    rank, s, ok = parallel_state.get_expert_model_parallel_rank(), rep.slots_per_rank, True
    for index, site in enumerate(moe_sites(spec)):
        bank = make_expert_bank(site.layer, case.shape.experts, case.seed + 100 * index)
        for i in range(s):
            got = fingerprint([v for _, v in sorted(local_expert_state(site.layer, i).items())])
            want = fingerprint([v for _, v in sorted(bank[rep.physical_to_logical[rank * s + i]].items())])
            ok &= bool(torch.allclose(got, want))
    return ok


def run_cases(rank: int, world_size: int, cases) -> list[LosslessResult]:
    """Several (kind, case) pairs in one set of processes (kind: "layer" or "gpt"), so that the
    interpreter and megatron are started once."""
    kinds = {"layer": moe_layer_lossless, "gpt": gpt_lossless}
    return [kinds[kind](rank, world_size, case) for kind, case in cases]
