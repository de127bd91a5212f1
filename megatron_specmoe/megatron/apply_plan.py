"""Apply a plan's expert placements to a live Megatron model, without changing what it computes.

Notation: E experts per MoE layer, P EP size, n = E / P, slot p = ep_rank * n + local index.

Two modes (``ApplyMode``):
    "router"      permute each router's output rows (``weight``, and ``expert_bias`` / ``bias``
                  where present) and move the expert weights, so that physical slot p holds
                  logical expert ``placement[p]`` and the router already emits physical ids. The
                  model is then an ordinary Megatron model again: any dispatcher (alltoall too)
                  computes the same function as before the move, and a checkpoint saved
                  afterwards stores the new layout.
    "dispatcher"  move the expert weights and tell each ``SpecMoETokenDispatcher`` the placement;
                  the router is left as it is (the dispatcher maps its columns).

Both need expert tensor parallel size 1 (each rank holds whole experts). Group-limited routing
(``moe_router_num_groups``) picks groups of contiguous router rows: "router" mode applies only
placements whose every block of E/G physical slots holds one whole logical group (groups may trade
blocks; ``schedule.router_groups.check_router_permutation`` refuses the others, naming the
slots), which plans made with ``--router-groups`` in the "rank" domain are. "dispatcher" mode
keeps the function for any placement (the router keeps its logical ids), but a placement that
moves experts off their group's node breaks the node bound (``max_nodes_per_token`` in
``specmoe evaluate`` measures it).

Replicas (``apply_replicas``): a layer built with E + R physical slots (``megatron/replicas.py``)
gets the plan's ``ReplicatedPlacement``: every slot is filled with its logical expert by
``comm.weight_move`` (moves of base experts and copies into the replica slots, one atomic,
verified exchange per layer) and the dispatcher is told the route table (dispatcher mode only:
the router keeps its E logical outputs).

Expert weights move with ``comm.weight_move`` (point-to-point over the EP group, atomic and
verified per layer; peak extra memory: at most one layer's local experts per rank).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence, get_args

import torch

from megatron_specmoe.comm.weight_move import move_layer_experts
from megatron_specmoe.megatron.experts import local_expert_state
from megatron_specmoe.megatron.model_tools import moe_sites
from megatron_specmoe.schedule.placement import ExpertPlacement
from megatron_specmoe.schedule.replicas import ReplicatedPlacement
from megatron_specmoe.schedule.router_groups import check_router_permutation

__all__ = ["ApplyMode", "ApplyReport", "apply_placements", "apply_replicas", "base_slots"]

ApplyMode = Literal["router", "dispatcher"]


@dataclass(frozen=True, kw_only=True)
class ApplyReport:
    """Attributes: layers (MoE layers changed), transfers (expert sends + receives + local copies
    on this rank), peak_extra_bytes (largest receive buffer of one layer on this rank), redundant
    (replica slots per layer, R; 0 for ``apply_placements``)."""

    layers: int
    transfers: int
    peak_extra_bytes: int
    redundant: int = 0


def _check(sites, placements, mode) -> None:
    if mode not in get_args(ApplyMode):
        raise ValueError(f"apply_placements: mode={mode!r}; choose one of {get_args(ApplyMode)}")
    if len(placements) != len(sites):
        raise ValueError(
            f"apply_placements: the plan has {len(placements)} placements but the model has "
            f"{len(sites)} MoE layers (num_layers / moe_layer_freq differ); make the plan for this model"
        )
    for site, placement in zip(sites, placements):
        d = site.dispatcher
        placement.check_matches(num_experts=d.num_experts, ep_size=d.ep_size, where=f"MoE layer {site.layer_number}")
        cfg = site.layer.config
        if getattr(d, "tp_size", 1) != 1:
            raise ValueError(
                f"MoE layer {site.layer_number}: expert_tensor_parallel_size={d.tp_size}; placements move "
                "whole experts and need expert_tensor_parallel_size=1"
            )
        if mode == "router" and (getattr(cfg, "moe_router_num_groups", None) or 1) > 1:
            # Router rows g*E/G.. form group g: each such block must hold one whole logical group.
            check_router_permutation(placement, int(cfg.moe_router_num_groups),
                                     where=f"MoE layer {site.layer_number}")
        if mode == "dispatcher" and not hasattr(d, "set_placement"):
            raise ValueError(
                f"MoE layer {site.layer_number} uses {type(d).__name__}; mode='dispatcher' needs "
                "moe_token_dispatcher_type='specmoe' (or use mode='router')"
            )


@torch.no_grad()
def _permute_router(router, current: Sequence[int], target: Sequence[int]) -> None:
    where = {logical: slot for slot, logical in enumerate(current)}
    rows = torch.tensor([where[logical] for logical in target], dtype=torch.long)
    for name in ("weight", "bias", "expert_bias"):
        t = getattr(router, name, None)
        if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == len(target):
            t.copy_(t.index_select(0, rows.to(t.device)))


def apply_placements(
    model: torch.nn.Module,
    placements: Sequence[ExpertPlacement],
    *,
    mode: ApplyMode = "router",
    current: Optional[Sequence[ExpertPlacement]] = None,
) -> ApplyReport:
    """Rearrange ``model``'s experts per ``placements`` (one per MoE layer). Call on every rank.

    Args:
        model: a built Megatron model (any dispatcher for "router"; specmoe for "dispatcher").
        placements: target placement per MoE layer.
        mode: see the module docstring.
        current: the placement the model has now (default: contiguous, i.e. as loaded from a
            checkpoint made by Megatron).
    """
    from megatron.core import parallel_state

    sites = moe_sites(model)
    _check(sites, placements, mode)
    group = parallel_state.get_expert_model_parallel_group()
    transfers, peak = 0, 0
    for index, (site, target) in enumerate(zip(sites, placements)):
        d = site.dispatcher
        now = current[index] if current is not None else ExpertPlacement.contiguous(d.num_experts, d.ep_size)

        def local(i, layer=site.layer):
            state = local_expert_state(layer, i)
            return [state[k] for k in sorted(state)]

        moved = move_layer_experts(local, current=now.physical_to_logical, target=target.physical_to_logical,
                                   group=group, layer_name=f"MoE layer {site.layer_number}")
        transfers += moved
        per_expert = sum(t.numel() * t.element_size() for t in local(0))
        peak = max(peak, min(moved, d.num_local_experts) * per_expert)
        if mode == "router":
            _permute_router(site.layer.router, now.physical_to_logical, target.physical_to_logical)
            if hasattr(d, "set_placement"):
                d.set_placement(None)
        else:
            d.set_placement(target)
    return ApplyReport(layers=len(sites), transfers=transfers, peak_extra_bytes=peak)


def base_slots(num_experts: int, ep_size: int, slots_per_rank: int) -> tuple[int, ...]:
    """Length P * s: what a replicated layer holds before ``apply_replicas`` when its base slots were
    loaded contiguously (rank q's first n slots: experts q*n .. q*n + n - 1) and its replica slots
    are empty (-1)."""
    n = num_experts // ep_size
    return tuple(q * n + i if i < n else -1 for q in range(ep_size) for i in range(slots_per_rank))


def apply_replicas(
    model: torch.nn.Module,
    replicas: Sequence[ReplicatedPlacement],
    *,
    current: Optional[Sequence[Sequence[int]]] = None,
) -> ApplyReport:
    """Fill every physical slot with its expert per ``replicas`` (one per MoE layer) and route by
    them. Call on every rank; the layers must have E + R slots and a specmoe dispatcher.

    Args:
        model: a built Megatron model (or one ``MoELayer``).
        replicas: the plan's ``ReplicatedPlacement`` per MoE layer.
        current: per MoE layer, the logical expert in each of the P * s slots now (-1: empty);
            default ``base_slots`` (contiguous base experts, empty replica slots).
    """
    from megatron.core import parallel_state

    sites = moe_sites(model)
    if len(replicas) != len(sites):
        raise ValueError(f"apply_replicas: the plan has {len(replicas)} replica layers but the model has "
                         f"{len(sites)} MoE layers; make the plan for this model")
    for site, rep in zip(sites, replicas):  # every layer checked before any weight moves
        d = site.dispatcher
        if not hasattr(d, "set_replicas"):
            raise ValueError(f"MoE layer {site.layer_number} uses {type(d).__name__}; replicas need "
                             "moe_token_dispatcher_type='specmoe'")
        if rep.num_experts + rep.redundant != d.num_experts or rep.ep_size != d.ep_size:
            raise ValueError(
                f"MoE layer {site.layer_number}: the plan has E={rep.num_experts} + R={rep.redundant} slots "
                f"on EP {rep.ep_size}, the layer num_moe_experts={d.num_experts} on EP {d.ep_size}; build it "
                "with megatron.replicas.replicated_config")
    group = parallel_state.get_expert_model_parallel_group()
    transfers, peak = 0, 0
    for index, (site, rep) in enumerate(zip(sites, replicas)):
        d = site.dispatcher
        s = rep.slots_per_rank
        now = (base_slots(rep.num_experts, rep.ep_size, s) if current is None else tuple(current[index]))

        def local(i, layer=site.layer):
            state = local_expert_state(layer, i)
            return [state[k] for k in sorted(state)]

        moved = move_layer_experts(local, current=now, target=rep.physical_to_logical, group=group,
                                   layer_name=f"MoE layer {site.layer_number}")
        d.set_replicas(rep)
        transfers += moved
        per_expert = sum(t.numel() * t.element_size() for t in local(0))
        peak = max(peak, min(moved, s) * per_expert)
    return ApplyReport(layers=len(sites), transfers=transfers, peak_extra_bytes=peak,
                       redundant=replicas[0].redundant if replicas else 0)
