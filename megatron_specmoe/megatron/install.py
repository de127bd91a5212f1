"""Selecting the ``specmoe`` dispatcher in Megatron-Core.

Megatron picks a dispatcher with a hard if/elif on ``config.moe_token_dispatcher_type`` inside
``MoELayer.__init__`` and has no registry (docs/megatron_core.md). Two ways in, both sharing
``build_specmoe_dispatcher``:

1. The spec path (preferred where the caller builds the model): ``SpecMoELayer``, a ``MoELayer``
   subclass, placed in the layer spec by ``megatron.specs.get_gpt_layer_specmoe_spec``.
2. The hook (for builders we do not control, e.g. Megatron-LM's scripts): ``install()`` wraps
   ``MoELayer.__init__`` so that ``moe_token_dispatcher_type="specmoe"`` builds the stock layer
   with Megatron's alltoall dispatcher and then hands that dispatcher's state to a
   ``SpecMoETokenDispatcher``. ``uninstall()`` restores the original ``__init__``. Both are
   idempotent; the saved original lives on the class (``megatron.patching``).

In both, the config keeps saying ``"specmoe"`` after construction; only during the stock
constructor does it read ``"alltoall"`` (restored in a ``finally``).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Literal, get_args

from megatron.core.transformer.moe.moe_layer import MoELayer

from megatron_specmoe.megatron.dispatcher import SpecMoETokenDispatcher
from megatron_specmoe.megatron.patching import Patch, apply_patches, original, patched_names, revert_patches

__all__ = [
    "DispatcherType",
    "SPECMOE",
    "install",
    "uninstall",
    "is_installed",
    "check_dispatcher_type",
    "build_specmoe_dispatcher",
    "SpecMoELayer",
]

DispatcherType = Literal["allgather", "alltoall", "flex", "specmoe"]
SPECMOE = "specmoe"


def check_dispatcher_type(value) -> None:
    """Raise a ValueError naming the field when ``value`` is not a known dispatcher."""
    allowed = get_args(DispatcherType)
    if value not in allowed:
        raise ValueError(
            f"TransformerConfig.moe_token_dispatcher_type={value!r} is not a known dispatcher; "
            f"choose one of {', '.join(allowed)} (specmoe needs megatron_specmoe.install() or "
            "the specmoe layer spec)"
        )


@contextlib.contextmanager
def _reads_as_alltoall(config):
    saved = config.moe_token_dispatcher_type
    config.moe_token_dispatcher_type = "alltoall"
    try:
        yield
    finally:
        config.moe_token_dispatcher_type = saved


def build_specmoe_dispatcher(layer: MoELayer, init, config, args, kwargs) -> None:
    """Run the stock ``MoELayer`` constructor ``init`` with the alltoall dispatcher, then replace
    that dispatcher by a ``SpecMoETokenDispatcher`` holding the same state."""
    unsupported = [
        name
        for name in ("moe_pad_expert_input_to_capacity",)
        if getattr(config, name, False)
    ]
    if unsupported:
        raise ValueError(
            f"moe_token_dispatcher_type='specmoe' does not support {', '.join(unsupported)}=True "
            "(padding every expert to its capacity sends the padding over the all-to-all, which "
            "defeats keeping tokens local; token dropping without padding, "
            "moe_expert_capacity_factor alone, is supported); turn it off or use 'alltoall'. For CUDA-graph "
            "decode Megatron switches padding on at run time (moe_pad_experts_for_cuda_graph_inference, "
            "core 0.19), which the specmoe dispatcher runs"
        )
    with _reads_as_alltoall(config):
        init(layer, config, *args, **kwargs)
    stock = layer.token_dispatcher
    layer.token_dispatcher = SpecMoETokenDispatcher.adopt(stock)
    layer.token_dispatcher.layer_number = getattr(layer, "layer_number", 0) or 0
    # 0.19.x keeps the training dispatcher aside when an inference dispatcher exists.
    if getattr(layer, "_training_token_dispatcher", None) is stock:
        layer._training_token_dispatcher = layer.token_dispatcher


def _hooked_init(self, config, *args, **kwargs):
    init = original(MoELayer, "__init__")
    value = getattr(config, "moe_token_dispatcher_type", None)
    if value != SPECMOE or isinstance(self, SpecMoELayer):
        check_dispatcher_type(value)
        return init(self, config, *args, **kwargs)
    build_specmoe_dispatcher(self, init, config, args, kwargs)


def _hooked_set_layer_number(self, layer_number):
    original(MoELayer, "set_layer_number")(self, layer_number)
    if isinstance(self.token_dispatcher, SpecMoETokenDispatcher):
        self.token_dispatcher.layer_number = layer_number


def _patches() -> list[Patch]:
    return [
        Patch(owner=MoELayer, name="__init__",
              replacement=functools.wraps(original(MoELayer, "__init__"))(_hooked_init),
              why="moe_token_dispatcher_type='specmoe' builds a SpecMoETokenDispatcher"),
        Patch(owner=MoELayer, name="set_layer_number", replacement=_hooked_set_layer_number,
              why="records carry the layer number"),
    ]


def install() -> None:
    """Make every ``MoELayer`` built from now on honour ``moe_token_dispatcher_type='specmoe'``.
    Idempotent; ``uninstall()`` reverts it."""
    apply_patches(_patches())


def uninstall() -> None:
    """Restore Megatron's ``MoELayer`` (idempotent). Layers already built keep their dispatcher."""
    revert_patches(_patches())


def is_installed() -> bool:
    return "__init__" in patched_names(MoELayer)


class SpecMoELayer(MoELayer):
    """``MoELayer`` with the specmoe dispatcher, for layer specs (no global hook needed).

    The config must say ``moe_token_dispatcher_type='specmoe'``: a spec and a config that disagree
    are refused rather than silently reconciled.

    On megatron-core 0.16.x, ``TransformerLayer`` passes ``pg_collection`` only to modules that
    *are* ``MoELayer``; a subclass then gets ``None`` and, like Megatron's own layers, falls back
    to the global parallel state (Megatron logs "Unknown MLP type" once).
    """

    def __init__(self, config, *args, **kwargs):
        if config.moe_token_dispatcher_type != SPECMOE:
            raise ValueError(
                "SpecMoELayer (the specmoe layer spec) needs "
                "TransformerConfig.moe_token_dispatcher_type='specmoe', got "
                f"{config.moe_token_dispatcher_type!r}; set it, or use Megatron's own MoE spec"
            )
        build_specmoe_dispatcher(self, original(MoELayer, "__init__"), config, args, kwargs)

    def set_layer_number(self, layer_number):
        super().set_layer_number(layer_number)
        self.token_dispatcher.layer_number = layer_number

