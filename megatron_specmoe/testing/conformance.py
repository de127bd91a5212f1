"""Conformance with Megatron's alltoall dispatcher across its own test matrix (forward and backward).

Megatron-Core tests its token dispatchers and ``MoELayer`` over a matrix of parallel layouts and
features. This harness runs that matrix, our own cases, with ``specmoe`` next to ``alltoall``: for
each ``ConformanceCase`` every rank builds one ``MoELayer`` per dispatcher with identical weights,
runs forward and backward in training mode on identical inputs, and returns the largest
differences of the output, the input gradient, the router's weight gradient and every expert's
weight gradients (by logical expert).

Weights. The specmoe layer loads the reference's state dict. Under a permuted placement its slot
p must then hold logical expert ``placement[p]``: every rank all-gathers the reference's local
expert tensors over its EP group (the ranks of one EP group share their expert-TP rank, so the
gathered tensors are this rank's expert-TP shard of every expert) and loads the ones its slots
hold. Expert gradients are compared the same way, gathered by logical id. This works for expert
tensor parallelism (ETP) > 1 too, where a seeded bank of whole experts would not.

Notation: S sequence length (the per-rank shard [S/TP, B, H] under sequence parallelism, which
Megatron requires for MoE training with TP > 1), B micro-batch, H hidden size, E experts, k top-k,
EP / ETP / TP the parallel sizes (world = TP x DP = ETP x EP x EDP).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal, Optional, get_args

import torch
import torch.distributed as dist

from megatron_specmoe.megatron import cpu_support, parallel
from megatron_specmoe.megatron.build import MoEShape, build_moe_layer, make_config
from megatron_specmoe.megatron.experts import load_local_expert_state, local_expert_state
from megatron_specmoe.schedule.placement import ExpertPlacement

__all__ = ["DType", "ConformanceCase", "ConformanceResult", "conformance_case", "run_conformance_cases"]

DType = Literal["fp32", "bf16", "fp16"]
_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True, kw_only=True)
class ConformanceCase:
    """One cell of the matrix.

    Attributes:
        name: for messages.
        tp, ep, etp: the parallel layout.
        placement: physical_to_logical, or None (contiguous).
        dtype: parameters and activations ("fp32", "bf16" or "fp16"; the router runs in fp32).
        capacity_factor: ``moe_expert_capacity_factor`` (tokens over an expert's capacity are
            dropped; no padding to capacity), None = dropless.
        drop_policy: ``moe_token_drop_policy`` ("probs" or "position") with a capacity factor.
        router_padding: ``moe_router_padding_for_quantization``: the dispatcher pads the routing
            map so that every expert's token count is a multiple of the fp8 alignment (16).
            Megatron's config accepts it only with fp8, which needs TransformerEngine; both are
            set on the built config, fp8 (``"e4m3"``) only so that Megatron computes the pad
            multiple: the local linears of the CPU build ignore it.
        recompute: activation recompute of the MoE layer (``recompute_granularity="selective"``,
            ``recompute_modules=["moe"]``).
        shape, seq, batch, seed: sizes (seq is the full sequence; each rank gets seq / tp rows).
        misplace: a control for the check itself: the specmoe layer is told ``placement`` but
            keeps the reference's contiguous experts, so it must differ.
    """

    name: str
    tp: int = 1
    ep: int = 4
    etp: int = 1
    placement: Optional[tuple[int, ...]] = None
    dtype: str = "fp32"
    capacity_factor: Optional[float] = None
    drop_policy: str = "probs"
    router_padding: bool = False
    recompute: bool = False
    shape: MoEShape = field(default_factory=MoEShape)
    seq: int = 8
    batch: int = 2
    seed: int = 5
    misplace: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in get_args(DType):
            raise ValueError(f"ConformanceCase.dtype={self.dtype!r}; choose one of {get_args(DType)}")
        if self.seq % self.tp:
            raise ValueError(f"ConformanceCase.seq={self.seq} must be a multiple of tp={self.tp} (sequence parallelism)")


@dataclass(frozen=True, kw_only=True)
class ConformanceResult:
    """Attributes: rank; out_diff, input_grad_diff, router_grad_diff, expert_grad_diff: max |specmoe
    - alltoall| of the output, the input gradient, the router weight gradient and the expert weight
    gradients (every expert, by logical id, this rank's shard); out_scale, grad_scale,
    router_grad_scale, expert_grad_scale: the same maxima of |alltoall| (tolerances are relative
    to them); pairs_routed: the
    (token, expert) pairs the router would choose without dropping on this rank (T x k);
    pairs_per_expert: the pairs the reference dispatcher sent to each expert after capacity
    dropping and padding (its routing map's column sums, physical = logical order)."""

    rank: int
    out_diff: float
    input_grad_diff: float
    router_grad_diff: float
    expert_grad_diff: float
    out_scale: float
    grad_scale: float
    router_grad_scale: float
    expert_grad_scale: float
    pairs_routed: int
    pairs_per_expert: tuple[int, ...]


def _config(case: ConformanceCase, dispatcher: str):
    dtype = _TORCH_DTYPES[case.dtype]
    extra = {}
    if case.dtype != "fp32":
        extra.update(params_dtype=dtype, bf16=case.dtype == "bf16", fp16=case.dtype == "fp16", moe_router_dtype="fp32")
    if case.capacity_factor is not None:
        extra.update(moe_expert_capacity_factor=case.capacity_factor, moe_token_drop_policy=case.drop_policy,
                     moe_pad_expert_input_to_capacity=False)
    if case.recompute:
        extra.update(recompute_granularity="selective", recompute_modules=["moe"])
    config = make_config(case.shape, dispatcher=dispatcher, tp=case.tp, ep=case.ep, etp=case.etp, **extra)
    if case.router_padding:
        config.fp8 = "e4m3"
        config.moe_router_padding_for_quantization = True
    return config


def _gather_experts(layer, values, group, ep_size: int) -> list[dict]:
    """Per physical slot (E of them, in slot order), this rank's shard of that slot's expert
    tensors (``values(layer, i)`` gives local expert i's), all-gathered over the EP group."""
    n = int(layer.num_local_experts)
    mine = [{k: v.detach().float().cpu() for k, v in values(layer, i).items()} for i in range(n)]
    every = [None] * ep_size
    dist.all_gather_object(every, mine, group=group)
    return [slot for rank_slots in every for slot in rank_slots]


def _params(layer, i):
    return local_expert_state(layer, i)


def _grads(layer, i):
    return {k: (p.grad if p.grad is not None else torch.zeros_like(p)) for k, p in local_expert_state(layer, i).items()}


def conformance_case(rank: int, world_size: int, case: ConformanceCase) -> ConformanceResult:
    """Run one case on every rank of an initialised process group (see the module docstring)."""
    from megatron.core import parallel_state

    warnings.filterwarnings("ignore")
    cpu_support.enable()
    parallel.initialize(parallel.ParallelLayout(tp=case.tp, ep=case.ep, etp=case.etp), seed=case.seed)
    try:
        shape, dtype = case.shape, _TORCH_DTYPES[case.dtype]
        ref = build_moe_layer(_config(case, "alltoall"), shape, specmoe=False)
        spec = build_moe_layer(_config(case, "specmoe"), shape, specmoe=True)
        spec.load_state_dict(ref.state_dict(), strict=True)
        placement = (ExpertPlacement.contiguous(shape.experts, case.ep) if case.placement is None
                     else ExpertPlacement(physical_to_logical=case.placement, ep_size=case.ep))
        ep_group = parallel_state.get_expert_model_parallel_group()
        ep_rank = parallel_state.get_expert_model_parallel_rank()
        n = shape.experts // case.ep
        by_logical = _gather_experts(ref, _params, ep_group, case.ep)  # contiguous: slot = logical
        for i in range(n):
            slot = ep_rank * n + i
            load_local_expert_state(spec, i, by_logical[slot if case.misplace else placement.physical_to_logical[slot]])
        spec.token_dispatcher.set_placement(placement)

        gen = torch.Generator().manual_seed(case.seed * 31 + rank)
        rows = case.seq // case.tp
        x = torch.randn(rows, case.batch, shape.hidden, generator=gen).to(dtype)
        upstream = torch.randn(rows, case.batch, shape.hidden, generator=gen).to(dtype)
        outs, grads = [], []
        for layer in (ref, spec):
            layer.train()
            inp = x.clone().requires_grad_(True)
            out, _ = layer(inp)
            out.backward(upstream)
            outs.append(out.detach().float())
            grads.append(inp.grad.detach().float())
        ref_grads = _gather_experts(ref, _grads, ep_group, case.ep)
        spec_grads = _gather_experts(spec, _grads, ep_group, case.ep)
        expert_diff = max(float((g - ref_grads[logical][k]).abs().max())
                          for slot, logical in enumerate(placement.physical_to_logical)
                          for k, g in spec_grads[slot].items())
        expert_scale = max(float(g.abs().max()) for slot in ref_grads for g in slot.values())
        # The reference dispatcher's routing map, after the router's dropping and its own padding.
        per_expert = tuple(int(c) for c in ref.token_dispatcher.routing_map.sum(dim=0))
        return ConformanceResult(
            rank=rank,
            out_diff=float((outs[0] - outs[1]).abs().max()),
            input_grad_diff=float((grads[0] - grads[1]).abs().max()),
            router_grad_diff=float((ref.router.weight.grad.float() - spec.router.weight.grad.float()).abs().max()),
            expert_grad_diff=expert_diff,
            out_scale=float(outs[0].abs().max()),
            grad_scale=float(grads[0].abs().max()),
            router_grad_scale=float(ref.router.weight.grad.float().abs().max()),
            expert_grad_scale=expert_scale,
            pairs_routed=rows * case.batch * shape.topk,
            pairs_per_expert=per_expert,
        )
    finally:
        parallel.destroy()


def run_conformance_cases(rank: int, world_size: int, cases) -> list:
    """Every case in one set of processes; a case that raises gives its error text instead of a
    result (so one failure does not hide the others)."""
    import traceback

    out = []
    for case in cases:
        try:
            out.append(conformance_case(rank, world_size, case))
        except Exception:  # noqa: BLE001 - reported per case to the test
            out.append(f"{case.name}: {traceback.format_exc()}")
    return out
