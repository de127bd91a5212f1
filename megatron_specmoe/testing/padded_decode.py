"""Megatron's padded decode (drop-and-pad MoE, the CUDA-graph decode mode) on the CPU: the switch
and a guard that fails where the dispatcher reads device data on the host.

Notation: T tokens on a rank, E experts (router's), k top-k, C rows of a shuffle shard.

``set_padded_decode(model, on)`` calls Megatron's own switch, ``set_decode_expert_padding`` (what
its text generation controller calls around CUDA-graph decode steps when
``moe_pad_experts_for_cuda_graph_inference`` is set), with the capacity factor it uses there,
``num_moe_experts / moe_router_topk`` (no token is dropped). Megatron caches the MoE layers of the
first model it is given in a module global (``inference.utils.moe_layer_cache``); tests build
several models per process, so the cache is emptied before each call, then left empty.

``guarded_phases(dispatcher)`` runs each of the dispatcher's six phases (``dispatch_preprocess`` ...
``combine_postprocess``) under ``measure.launches.HostSyncGuard`` (``.item()``, data-dependent
shapes, device-to-host copies) and, because every tensor lives on the host here, also refuses
the host reads a CPU run never dispatches as an op: ``Tensor.tolist``, ``Tensor.numpy`` and
``Tensor.__array__`` (how the dropless dispatcher's split sizes reach gloo and Python, its
``cuda_sync_point`` on a GPU). Only the dispatcher's phases are guarded: the experts in between
(Megatron's ``SequentialMLP`` splits its rows by ``tokens_per_expert.tolist()``) read a tensor that
drop-and-pad builds on the host from shapes, which is no device-to-host copy on a GPU either; and
gloo's all-to-all with equal splits takes no split list.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch

from megatron_specmoe.measure.launches import HostSyncError, HostSyncGuard
from megatron_specmoe.megatron.patching import Patch, apply_patches, revert_patches

__all__ = ["PHASES", "set_padded_decode", "decode_capacity_factor", "guarded_phases", "dispatchers_of",
           "decode_padding"]

PHASES = ("dispatch_preprocess", "token_dispatch", "dispatch_postprocess", "combine_preprocess",
          "token_combine", "combine_postprocess")


def decode_capacity_factor(config: Any) -> float:
    """Megatron's padded-decode capacity factor for ``config``: num_moe_experts / moe_router_topk."""
    return config.num_moe_experts / config.moe_router_topk


def set_padded_decode(model: torch.nn.Module, on: bool, *, capacity_factor: Optional[float] = None) -> None:
    """Megatron's ``set_decode_expert_padding(model, on, capacity_factor)`` on ``model`` (module
    docstring); ``capacity_factor`` defaults to ``decode_capacity_factor`` of the model's config."""
    import megatron.core.inference.utils as inference_utils
    from megatron.core.utils import get_model_config

    if capacity_factor is None and on:
        capacity_factor = decode_capacity_factor(get_model_config(model))
    inference_utils.moe_layer_cache = None
    try:
        inference_utils.set_decode_expert_padding(model, on, capacity_factor=capacity_factor if on else None)
    finally:
        inference_utils.moe_layer_cache = None


def dispatchers_of(model: torch.nn.Module) -> list:
    """Every MoE layer's token dispatcher in ``model`` (the model itself may be an MoE layer)."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    return [m.token_dispatcher for m in model.modules() if isinstance(m, MoELayer)]


def decode_padding(models: dict) -> tuple:
    """Per model name, (drop_and_pad, capacity) of each of its MoE dispatchers (after a forward)."""
    return tuple((name, tuple((bool(d.drop_and_pad), d.capacity) for d in dispatchers_of(model)))
                 for name, model in models.items())


def _refuse(name: str):
    def read(self, *args, **kwargs):
        raise HostSyncError(f"Tensor.{name} of a {tuple(self.shape)} tensor in a dispatcher phase reads its data "
                            "on the host (on a GPU a device-to-host copy; CUDA graphs refuse it)")
    return read


_READS = ("tolist", "numpy", "__array__")


def _guard(fn):
    def guarded(*args, **kwargs):
        applied = apply_patches([Patch(owner=torch.Tensor, name=n, replacement=_refuse(n),
                                       why="padded decode test: no host reads in a dispatcher phase")
                                 for n in _READS])
        try:
            with HostSyncGuard():
                return fn(*args, **kwargs)
        finally:
            revert_patches(applied)
    return guarded


@contextlib.contextmanager
def guarded_phases(dispatchers):
    """Inside the block, each phase of each dispatcher in ``dispatchers`` fails with
    ``HostSyncError`` at its first host read (module docstring). Instance attributes shadow the
    class's methods and are removed on exit. A specmoe dispatcher's ``recorder`` is detached for
    the block (recording reads counts on the host by design and is refused under CUDA-graph
    capture) and put back after."""
    dispatchers = list(dispatchers)
    recorders = [getattr(d, "recorder", None) for d in dispatchers]
    try:
        for d in dispatchers:
            if getattr(d, "recorder", None) is not None:
                d.recorder = None
            for name in PHASES:
                setattr(d, name, _guard(getattr(d, name)))
        yield
    finally:
        for d, recorder in zip(dispatchers, recorders):
            for name in PHASES:
                d.__dict__.pop(name, None)
            if recorder is not None:
                d.recorder = recorder
