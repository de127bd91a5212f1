"""Redundant experts in a Megatron ``MoELayer``: E logical experts served from E + R physical slots.

Notation
    E: logical experts (the router's outputs).   R: redundant experts (replica slots in all).
    P: EP size.   n = E / P base slots and s = (E + R) / P slots per rank.

How the layer is built. Megatron's ``MoELayer`` gives every rank ``num_moe_experts / P`` local
experts and its router ``num_moe_experts`` outputs, from one config field. A replicated layer needs
the two apart, so:
    1. build the layer from ``replicated_config(config, R)`` (``num_moe_experts = E + R``):
       SequentialMLP / TEGroupedMLP then holds s local experts per rank, the dispatcher E + R
       physical columns, ``local_expert_indices`` the rank's s slots;
    2. ``use_logical_router(layer, config)`` replaces the router by one of the same class built from
       the E-expert ``config`` (same process groups), so routing, top-k, group limits and aux
       losses see the E logical experts exactly as without replicas;
    3. the ``SpecMoETokenDispatcher`` maps logical columns to physical slots by the plan's route
       table (``set_replicas``; ``apply_plan.apply_replicas`` also copies the weights in).
Only the specmoe dispatcher can serve such a layer: Megatron's own dispatchers would take the
router's E columns for the E + R slots. Inference only: the copies of one expert get separate
gradients, and nothing here all-reduces them (training with replicas is not supported).
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

__all__ = ["replicated_config", "use_logical_router"]


def replicated_config(config, redundant: int):
    """``config`` (a TransformerConfig with E = num_moe_experts) with E + R physical slots.

    Raises:
        ValueError: R < 0, or E + R not divisible by the EP size.
    """
    e, ep = config.num_moe_experts, config.expert_model_parallel_size
    if redundant < 0 or (e + redundant) % ep:
        raise ValueError(f"replicated_config: --redundant-experts {redundant} must be >= 0 and make E + R = "
                         f"{e + redundant} divisible by the EP size {ep}")
    return dataclasses.replace(config, num_moe_experts=e + redundant)


def use_logical_router(layer, logical_config) -> None:
    """Replace ``layer.router`` by one of its class built from ``logical_config`` (E experts), on
    the same process groups and device, with the same layer number. Idempotent: a router that
    already has ``logical_config.num_moe_experts`` outputs is left as it is."""
    old = layer.router
    if old.num_experts == logical_config.num_moe_experts:
        return
    groups = SimpleNamespace(tp=old.tp_group, cp=old.cp_group, tp_cp=old.tp_cp_group,
                             tp_dp_cp=old.tp_dp_cp_group)
    kwargs = {"is_mtp_layer": old.is_mtp_layer} if hasattr(old, "is_mtp_layer") else {}
    new = type(old)(config=logical_config, pg_collection=groups, **kwargs)
    if getattr(old, "layer_number", None) is not None:
        new.set_layer_number(old.layer_number)
    layer.router = new.to(old.weight.device)

