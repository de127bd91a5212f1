"""Layer and block specs that put ``ShuffleTransformerLayer`` (s-TS) into a Megatron model.

``get_gpt_layer_shuffle_spec`` starts from the specmoe layer spec (``glue.specs``) and replaces:
the layer class by ``ShuffleTransformerLayer`` (with the model's ``ShuffleCarrier`` as a build
parameter), attention's linear_qkv / linear_proj by their non-communicating variants, and, with
sequence parallelism on a machine without TransformerEngine, the torch norms by ``TokenwiseNorm``
(Megatron's ``WrappedTorchNorm`` refuses ``sequence_parallel=True`` because its weight gradients
would need a TP all-reduce; a norm is per token, so its forward is exact on a shard, and the
shuffle layer is forward-only).

Local (CPU-capable) linears only for now: TransformerEngine's fused layernorm-linear
(``TELayerNormColumnParallelLinear``) all-gathers inside TE, which the shuffle must own; that path
is not written (refused with a clear error).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any, Optional

from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_specmoe.glue.shuffle_layer import (
    NoCommColumnParallelLinear,
    NoCommRowParallelLinear,
    ShuffleCarrier,
    ShuffleOptions,
    ShuffleTransformerLayer,
)

__all__ = ["TokenwiseNorm", "get_gpt_layer_shuffle_spec", "get_gpt_block_shuffle_spec"]


class TokenwiseNorm:
    """Megatron's ``WrappedTorchNorm`` (LayerNorm / RMSNorm per ``config.normalization``) built
    from a copy of ``config`` with ``sequence_parallel=False`` (forward-exact on a shard). A class
    (Megatron's ``build_module`` returns plain functions unbuilt) whose construction returns the
    torch norm module, as ``WrappedTorchNorm`` itself does."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5):
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        cfg = copy.copy(config)
        cfg.sequence_parallel = False
        return WrappedTorchNorm(config=cfg, hidden_size=hidden_size, eps=eps)


def _replace(spec: Any, **changes: Any) -> Any:
    """dataclasses.replace for a ModuleSpec's submodules (both core versions use ModuleSpec at the
    layer and attention level)."""
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, **changes))


def get_gpt_layer_shuffle_spec(
    num_experts: int,
    *,
    carrier: Optional[ShuffleCarrier] = None,
    options: Optional[ShuffleOptions] = None,
    sequence_parallel_norms: bool = False,
    **kwargs: Any,
) -> ModuleSpec:
    """Megatron's local GPT layer spec with the specmoe MoE layer and s-TS around attention.

    Args:
        num_experts: routed experts per layer (every layer is MoE).
        carrier: the ShuffleCarrier shared by the model's layers; a new one (with ``options``) if
            None. Read it back from the spec's ``params["carrier"]`` or any layer's ``.carrier``.
        options: ShuffleOptions for a new carrier (ignored when ``carrier`` is given).
        sequence_parallel_norms: use ``TokenwiseNorm`` for the layer norms (needed with
            ``sequence_parallel=True`` without TransformerEngine).
        kwargs: passed to Megatron's local spec builder (qk_layernorm, ...).
    """
    from megatron_specmoe.glue.specs import get_gpt_layer_specmoe_spec

    if kwargs.get("use_transformer_engine"):
        raise ValueError(
            "get_gpt_layer_shuffle_spec: TransformerEngine linears are not supported yet (TE's fused "
            "layernorm-linear all-gathers inside TE); pass use_transformer_engine=False"
        )
    kwargs.pop("use_transformer_engine", None)
    if carrier is None:
        carrier = ShuffleCarrier(options=options or ShuffleOptions())
    base = get_gpt_layer_specmoe_spec(num_experts, use_transformer_engine=False, **kwargs)
    attention = _replace(
        base.submodules.self_attention,
        linear_qkv=NoCommColumnParallelLinear,
        linear_proj=NoCommRowParallelLinear,
    )
    changes: dict[str, Any] = {"self_attention": attention}
    if sequence_parallel_norms:
        changes.update(input_layernorm=TokenwiseNorm, pre_mlp_layernorm=TokenwiseNorm)
    spec = _replace(base, **changes)
    return dataclasses.replace(spec, module=ShuffleTransformerLayer, params={**spec.params, "carrier": carrier})


def get_gpt_block_shuffle_spec(config, layer_spec: ModuleSpec, *, final_norm: Any = None):
    """A TransformerBlockSubmodules with ``config.num_layers`` copies of ``layer_spec`` and a final
    norm (``TokenwiseNorm`` by default, so that a sequence-parallel model builds without TE)."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    return TransformerBlockSubmodules(
        layer_specs=[layer_spec] * config.num_layers,
        layer_norm=final_norm if final_norm is not None else TokenwiseNorm,
    )


def carrier_of(spec: Any) -> ShuffleCarrier:
    """The ShuffleCarrier a shuffle layer spec builds its layers with."""
    if isinstance(spec, functools.partial):
        return spec.keywords["carrier"]
    return spec.params["carrier"]
