"""Which logical expert each local expert slot of a built model holds, for saving and loading by logical id.

Notation
    E: logical experts.   P: EP size.   s: local expert slots per rank (n = E / P for a plain
    layer, n + r with r replicas per rank, ``megatron/replicas.py``).   slot p = ep_rank * s + i
    holds local expert i of rank ep_rank.

A MoE layer's *slot map* (``SlotMap``) is the logical expert in each of its P * s slots:
    a layer whose specmoe dispatcher serves replicas: ``replicas.physical_to_logical``;
    a layer whose specmoe dispatcher routes by a placement: ``placement.physical_to_logical``;
    any other layer (Megatron's dispatchers, or a router already permuted): contiguous, slot p
    holds expert p (the router's column p).
Keys are the model's own state-dict names: ``{prefix}{i}.{rest}`` with ``prefix`` ending in
``experts.local_experts.``, the local index i, and the parameter name ``rest``.

``gather_logical_experts`` (a collective over the EP group: call on every rank) returns, for
every layer, each logical expert's tensors once, taken from its base copy (the slot the plan's base
placement gives it; replica slots are copies of it). Only whole experts per rank (expert tensor
parallel size 1) and ``SequentialMLP`` experts (``local_experts`` keys).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_specmoe.megatron.experts import local_expert_state
from megatron_specmoe.megatron.model_tools import moe_sites

__all__ = ["SlotMap", "slot_maps", "gather_logical_experts", "EXPERT_KEY"]

EXPERT_KEY = re.compile(r"^(?P<prefix>.*\.experts\.local_experts\.)(?P<index>\d+)(?P<rest>\..*)$")


@dataclass(frozen=True, kw_only=True)
class SlotMap:
    """One MoE layer's slots.

    Attributes:
        prefix: the state-dict prefix of its local experts (``...experts.local_experts.``).
        physical_to_logical: length P * s, the logical expert in each slot.
        base_slot: length E, the slot of each logical expert's base copy.
        slots_per_rank: s.
    """

    prefix: str
    physical_to_logical: tuple[int, ...]
    base_slot: tuple[int, ...]
    slots_per_rank: int

    def logical(self, ep_rank: int, index: int) -> int:
        """The logical expert in local slot ``index`` of EP rank ``ep_rank``."""
        return self.physical_to_logical[ep_rank * self.slots_per_rank + index]


def _slot_map(prefix: str, dispatcher, num_local: int, ep_size: int) -> SlotMap:
    replicas = getattr(dispatcher, "replicas", None)
    placement = getattr(dispatcher, "placement", None)
    if replicas is not None:
        p2l = tuple(replicas.physical_to_logical)
        n, s = replicas.base.experts_per_rank, replicas.slots_per_rank
        base = [0] * replicas.num_experts
        for p, e in enumerate(replicas.base.physical_to_logical):
            base[e] = (p // n) * s + p % n
        return SlotMap(prefix=prefix, physical_to_logical=p2l, base_slot=tuple(base), slots_per_rank=s)
    if placement is not None:
        p2l = tuple(placement.physical_to_logical)
    else:
        p2l = tuple(range(num_local * ep_size))
    base = [0] * len(p2l)
    for p, e in enumerate(p2l):
        base[e] = p
    return SlotMap(prefix=prefix, physical_to_logical=p2l, base_slot=tuple(base), slots_per_rank=num_local)


def _layer_maps(model: torch.nn.Module) -> list[tuple[SlotMap, torch.nn.Module]]:
    names = {id(module): name for name, module in model.named_modules()}
    out = []
    for site in moe_sites(model):
        experts = site.layer.experts
        if not hasattr(experts, "local_experts"):
            continue  # grouped experts: keys of another form, left to the caller's checks
        name = names[id(experts.local_experts)]
        prefix = f"{name}." if name else ""
        ep_size = int(getattr(site.dispatcher, "ep_size", 1) or 1)
        out.append((_slot_map(prefix, site.dispatcher, int(site.layer.num_local_experts), ep_size), site.layer))
    return out


def slot_maps(model: torch.nn.Module) -> dict[str, SlotMap]:
    """Every MoE layer's ``SlotMap``, by its local-experts state-dict prefix."""
    return {m.prefix: m for m, _ in _layer_maps(model)}


@torch.no_grad()
def gather_logical_experts(model: torch.nn.Module, group: Optional[object] = None) -> dict[str, torch.Tensor]:
    """Every layer's logical experts, once each, as full-model keys ``{prefix}{e}.{rest}`` (module
    docstring). A collective over ``group`` (default: Megatron's EP group): every rank gets all."""
    from megatron.core import parallel_state

    if group is None:
        group = parallel_state.get_expert_model_parallel_group()
    world = torch.distributed.get_world_size(group) if torch.distributed.is_initialized() else 1
    out: dict[str, torch.Tensor] = {}
    for m, layer in _layer_maps(model):
        for name in sorted(local_expert_state(layer, 0)):
            local = torch.stack([local_expert_state(layer, i)[name].detach() for i in range(m.slots_per_rank)])
            if world > 1:
                parts = [torch.empty_like(local) for _ in range(world)]
                torch.distributed.all_gather(parts, local.contiguous(), group=group)
                full = torch.cat(parts)  # [P * s, ...], slot order
            else:
                full = local
            for e, slot in enumerate(m.base_slot):
                out[f"{m.prefix}{e}.{name}"] = full[slot].clone()
    return out
