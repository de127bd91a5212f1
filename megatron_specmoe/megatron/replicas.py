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

A model that is already built (Megatron-LM's ``get_model``, a loaded checkpoint) is replicated in
place by ``replicate_layers``: every plain MoE layer is swapped, in its parent module, for an
E + R-slot *twin* built from the layer's own spec (``submodules``) and ``replicated_config``. The
twin shares the plain layer's modules: its router, shared experts and any other child, and its
first n local experts (the base slots) are the plain layer's objects, so only the r replica
experts are new memory. ``plain_layers`` swaps the plain layers back (same modules, so what a
checkpoint loader writes into them the twin sees); Megatron's checkpoint code then finds the
model it saved, with its names and sharding. A twin refuses to run in training mode. Experts must
be a ``SequentialMLP`` (local or TE linears): TE's grouped GEMM holds all local experts in one
module and is refused by name (``--moe-grouped-gemm``).
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import torch

__all__ = ["replicated_config", "use_logical_router", "is_twin", "logical_config", "replicate_layers",
           "plain_layers"]

_TWIN = "_specmoe_twin"    # on a plain layer: its E + R-slot twin (a plain attribute, not a submodule)
_PLAIN = "_specmoe_plain"  # on a twin: the plain layer it was made from


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



def is_twin(layer) -> bool:
    """Whether ``layer`` is an E + R-slot twin made by ``replicate_layers``."""
    return _PLAIN in layer.__dict__


def logical_config(layer):
    """The E-expert config of a MoE layer: the plain layer's for a twin, else its own."""
    return layer.__dict__[_PLAIN].config if is_twin(layer) else layer.config


def _refuse_training(module, _args) -> None:
    if module.training:
        raise RuntimeError(
            f"MoE layer {module.layer_number} has replicated experts (--specmoe-plan with redundant experts), "
            "which serve inference only: the copies of an expert would get separate gradients. Call "
            "model.eval(), or re-plan without --redundant-experts for training")


def _twin_of(layer, redundant: int):
    """Build (or find) ``layer``'s E + R-slot twin (module docstring)."""
    twin = layer.__dict__.get(_TWIN)
    if twin is not None:
        if twin.num_local_experts - layer.num_local_experts != redundant // twin.token_dispatcher.ep_size:
            raise ValueError(f"MoE layer {layer.layer_number} was replicated with another --redundant-experts; "
                             "rebuild the model for this plan")
        return twin
    experts = getattr(layer, "experts", None)
    if not hasattr(experts, "local_experts"):
        raise ValueError(
            f"MoE layer {layer.layer_number}: experts are {type(experts).__name__}; redundant experts need "
            "SequentialMLP experts (each local expert its own module). Drop --moe-grouped-gemm, or re-plan "
            "without --redundant-experts")
    kwargs = {"is_mtp_layer": layer.is_mtp_layer} if hasattr(layer, "is_mtp_layer") else {}
    twin = type(layer)(config=replicated_config(layer.config, redundant), submodules=layer.submodules,
                       layer_number=layer.layer_number, **kwargs)
    old_d, new_d = layer.token_dispatcher, twin.token_dispatcher
    if new_d.ep_group is not old_d.ep_group or getattr(new_d, "tp_group", None) is not getattr(old_d, "tp_group", None):
        raise ValueError(f"MoE layer {layer.layer_number} was built on process groups other than Megatron's "
                         "default ones; replicate_layers builds on the default groups")
    for name, child in list(layer.named_children()):
        if name != "experts":  # router, shared experts, latent projections: the plain layer's own
            setattr(twin, name, child)
    if getattr(new_d, "shared_experts", None) is not None and getattr(layer, "shared_experts", None) is not None:
        new_d.set_shared_experts(layer.shared_experts)
    n = layer.num_local_experts
    template = next(experts.local_experts[0].parameters())
    for i in range(twin.num_local_experts):
        if i < n:
            twin.experts.local_experts[i] = experts.local_experts[i]
        else:
            twin.experts.local_experts[i].to(device=template.device, dtype=template.dtype)
    twin.train(layer.training)
    twin.register_forward_pre_hook(_refuse_training)
    twin.__dict__[_PLAIN] = layer
    layer.__dict__[_TWIN] = twin
    return twin


def _swap(root: torch.nn.Module, old: torch.nn.Module, new: torch.nn.Module) -> None:
    for module in root.modules():
        for name, child in module.named_children():
            if child is old:
                setattr(module, name, new)
                return
    raise ValueError(f"MoE layer {getattr(old, 'layer_number', '?')} is not a child of any module in the model")


def _moe_layers(root: torch.nn.Module) -> list:
    return [m for m in root.modules() if getattr(m, "token_dispatcher", None) is not None]


@torch.no_grad()
def replicate_layers(root: torch.nn.Module, redundant: int) -> list:
    """Swap every plain MoE layer under ``root`` for its E + R-slot twin (module docstring), in
    model order; twins already there stay. Returns the twins. The replica slots hold untrained
    weights until ``apply_plan.apply_replicas`` fills them; base slot i of a rank holds what the
    plain layer's local expert i held."""
    twins = []
    for layer in _moe_layers(root):
        if not is_twin(layer):
            twin = _twin_of(layer, redundant)
            _swap(root, layer, twin)
            layer = twin
        twins.append(layer)
    return twins


def plain_layers(root: torch.nn.Module) -> int:
    """Swap every twin under ``root`` back for its plain layer (same router, shared experts and base
    expert modules). Returns how many were swapped."""
    twins = [m for m in _moe_layers(root) if is_twin(m)]
    for twin in twins:
        _swap(root, twin, twin.__dict__[_PLAIN])
    return len(twins)
