"""Expert weights by *logical* id: read, write and generate them on a live ``MoELayer``.

Notation
    E: routed experts.   P: EP size.   n = E / P local experts per rank.
    slot p = ep_rank * n + i holds local expert i of rank ep_rank; under a placement it holds
    logical expert ``physical_to_logical[p]``.

A *bank* maps a logical expert id to a dict of its parameters by name (``linear_fc1.weight`` ...),
each the full (expert-tensor-parallel size 1) tensor. Banks let tests and tools arrange experts
by a placement without moving anything between ranks: every rank builds the same bank from a
seed, and loads the experts its slots hold.

Supported expert modules: ``SequentialMLP`` (local linears; CPU and GPU) and ``TEGroupedMLP``
(TransformerEngine grouped GEMM, parameters ``linear_fc1.weight{i}``).
"""

from __future__ import annotations

from typing import Mapping

import torch

from megatron_specmoe.schedule.placement import ExpertPlacement

__all__ = ["local_expert_state", "load_local_expert_state", "make_expert_bank", "load_bank", "load_seeded_banks"]

Bank = Mapping[int, Mapping[str, torch.Tensor]]


def _num_local(layer) -> int:
    return int(layer.num_local_experts)


def local_expert_state(layer, index: int) -> dict[str, torch.Tensor]:
    """Parameters of local expert ``index`` of ``layer`` (a MoELayer), by name (views, not copies).

    Names are the SequentialMLP names (``linear_fc1.weight``, ``linear_fc2.weight``, biases);
    TEGroupedMLP's ``weight{i}`` parameters are mapped to the same names.
    """
    experts = layer.experts
    if hasattr(experts, "local_experts"):
        return dict(experts.local_experts[index].named_parameters())
    out = {}
    for lin in ("linear_fc1", "linear_fc2"):
        mod = getattr(experts, lin)
        for kind in ("weight", "bias"):
            param = getattr(mod, f"{kind}{index}", None)
            if param is not None:
                out[f"{lin}.{kind}"] = param
    if not out:
        raise TypeError(
            f"unsupported expert module {type(experts).__name__}: expected SequentialMLP "
            "(local_experts) or TEGroupedMLP (linear_fc1.weight{i})"
        )
    return out


@torch.no_grad()
def load_local_expert_state(layer, index: int, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` (name -> tensor, same shapes) into local expert ``index`` in place."""
    params = local_expert_state(layer, index)
    if set(params) != set(state):
        raise ValueError(
            f"expert state names differ: layer has {sorted(params)}, state has {sorted(state)}"
        )
    for name, param in params.items():
        src = state[name]
        if tuple(src.shape) != tuple(param.shape):
            raise ValueError(
                f"expert parameter {name}: shape {tuple(src.shape)} does not fit {tuple(param.shape)}"
            )
        param.copy_(src.to(param.device, param.dtype))


def make_expert_bank(layer, num_experts: int, seed: int) -> dict[int, dict[str, torch.Tensor]]:
    """A deterministic bank: logical expert e's tensors come from a generator seeded by
    ``seed * 1000 + e``, so they are identical on every rank and distinct per expert (a misplaced
    expert changes the output). Shapes are those of ``layer``'s local expert 0."""
    template = local_expert_state(layer, 0)
    bank = {}
    for e in range(num_experts):
        gen = torch.Generator().manual_seed(seed * 1000 + e)
        bank[e] = {
            name: torch.randn(tuple(p.shape), generator=gen, dtype=torch.float32) * 0.1
            for name, p in sorted(template.items())
        }
    return bank


def load_bank(layer, bank: Bank, placement: ExpertPlacement, ep_rank: int) -> None:
    """Load the experts that ``placement`` puts in this rank's slots from ``bank``."""
    n = _num_local(layer)
    if placement.experts_per_rank != n:
        raise ValueError(
            f"placement has {placement.experts_per_rank} experts per rank but the layer has "
            f"num_local_experts={n}"
        )
    for i in range(n):
        logical = placement.physical_to_logical[ep_rank * n + i]
        load_local_expert_state(layer, i, bank[logical])


def load_seeded_banks(layers, num_experts: int, placement: ExpertPlacement, ep_rank: int, *,
                      seed: int) -> list[dict[int, dict[str, torch.Tensor]]]:
    """Give MoE layer ``layers[i]`` the bank ``make_expert_bank(layers[i], num_experts, seed + i)``,
    its slots filled by ``placement``; return the banks (one per layer, the same on every rank)."""
    banks = [make_expert_bank(layer, num_experts, seed=seed + i) for i, layer in enumerate(layers)]
    for bank, layer in zip(banks, layers):
        load_bank(layer, bank, placement, ep_rank)
    return banks
