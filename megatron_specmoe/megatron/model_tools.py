"""Find the specmoe dispatchers in a built model and configure them: placements, recording.

MoE layers are numbered in model order (the 0-based MoE-layer index used by plans and traces);
``layer_number`` is Megatron's own 1-based transformer layer number.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from megatron_specmoe.megatron.dispatcher import DispatchRecorder, SpecMoETokenDispatcher
from megatron_specmoe.schedule.placement import ExpertPlacement

__all__ = ["MoESite", "moe_sites", "set_placements", "attach_recorder"]


@dataclass(frozen=True, kw_only=True)
class MoESite:
    """One MoE layer of a model. Attributes: index (0-based among MoE layers), layer_number
    (Megatron's), layer (the MoELayer module), dispatcher (its token dispatcher)."""

    index: int
    layer_number: int
    layer: torch.nn.Module
    dispatcher: object


def moe_sites(model: torch.nn.Module) -> list[MoESite]:
    """Every module with a ``token_dispatcher`` (Megatron's MoE layers), in model order."""
    sites = []
    for module in model.modules():
        dispatcher = getattr(module, "token_dispatcher", None)
        if dispatcher is None:
            continue
        sites.append(
            MoESite(
                index=len(sites),
                layer_number=int(getattr(module, "layer_number", 0) or 0),
                layer=module,
                dispatcher=dispatcher,
            )
        )
    return sites


def _specmoe_sites(model) -> list[MoESite]:
    sites = moe_sites(model)
    wrong = [s for s in sites if not isinstance(s.dispatcher, SpecMoETokenDispatcher)]
    if wrong:
        raise ValueError(
            f"MoE layer(s) {[s.layer_number for s in wrong]} use "
            f"{type(wrong[0].dispatcher).__name__}, not the specmoe dispatcher; build the model with "
            "moe_token_dispatcher_type='specmoe' (megatron_specmoe.install() or the specmoe spec)"
        )
    return sites


def set_placements(model: torch.nn.Module, placements: Sequence[ExpertPlacement]) -> None:
    """Route MoE layer i by ``placements[i]``. The expert weights must already be arranged so
    (see ``megatron.experts`` and the weight mover)."""
    sites = _specmoe_sites(model)
    if len(placements) != len(sites):
        raise ValueError(
            f"set_placements: {len(placements)} placements for {len(sites)} MoE layers; the plan "
            "must have one placement per MoE layer"
        )
    for site, placement in zip(sites, placements):
        site.dispatcher.set_placement(placement)


def attach_recorder(model: torch.nn.Module, recorder: Optional[DispatchRecorder]) -> int:
    """Record every specmoe dispatcher's traffic into ``recorder`` (``None`` turns recording
    off). Returns the number of dispatchers attached."""
    sites = _specmoe_sites(model)
    for site in sites:
        site.dispatcher.recorder = recorder
        site.dispatcher.layer_number = site.layer_number
    return len(sites)
