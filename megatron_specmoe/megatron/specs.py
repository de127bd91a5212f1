"""The public entry point for layer specs that select the specmoe dispatcher without any global hook
(with or without speculative token shuffling).

Megatron describes a layer by a spec: ``ModuleSpec(module=..., submodules=...)`` in core 0.16.x,
``functools.partial(module, submodules=...)`` in 0.19.x. ``with_specmoe`` walks either form and
replaces the MoE layer class ``MoELayer`` by ``SpecMoELayer``; everything else (attention, norms,
experts: SequentialMLP with local linears, or TEGroupedMLP where TransformerEngine is present) is
exactly Megatron's.
"""

from __future__ import annotations

from typing import Any

from megatron_specmoe.megatron.moe_specs import dispatcher_layer_spec, have_te, with_specmoe
from megatron_specmoe.megatron.shuffle_specs import get_gpt_block_shuffle_spec, get_gpt_layer_shuffle_spec
from megatron_specmoe.megatron.shuffle_state import ShuffleCarrier, ShuffleOptions

__all__ = [
    "with_specmoe",
    "get_gpt_layer_specmoe_spec",
    "get_gpt_decoder_block_specmoe_spec",
    "get_gpt_layer_shuffle_spec",
    "get_gpt_block_shuffle_spec",
    "have_te",
]


def get_gpt_layer_specmoe_spec(
    num_experts: int,
    *,
    use_transformer_engine: bool | None = None,
    moe_grouped_gemm: bool | None = None,
    shuffle: Any = None,
    **kwargs: Any,
):
    """Megatron's GPT layer spec with the specmoe MoE layer.

    Args:
        num_experts: routed experts per MoE layer.
        use_transformer_engine: ``None`` picks the TE spec (TEGroupedMLP experts, TE linears)
            when TransformerEngine imports, else the local spec (SequentialMLP, plain linears,
            runs on the CPU).
        moe_grouped_gemm: defaults to ``use_transformer_engine``.
        shuffle: a ``megatron.shuffle_layer.ShuffleCarrier`` (or ``ShuffleOptions``) turns on speculative
            token shuffling: the layer becomes ``ShuffleTransformerLayer``
            (``megatron.shuffle_specs.get_gpt_layer_shuffle_spec``; local linears unless
            ``use_transformer_engine=True``). ``None``: the dispatcher alone.
        kwargs: passed to Megatron's spec builder (qk_layernorm, multi_latent_attention, ...).
    """
    if shuffle is not None:
        if isinstance(shuffle, ShuffleOptions):
            shuffle = ShuffleCarrier(options=shuffle)
        if not isinstance(shuffle, ShuffleCarrier):
            raise ValueError(
                f"get_gpt_layer_specmoe_spec: shuffle must be a ShuffleCarrier or ShuffleOptions, got "
                f"{type(shuffle).__name__}"
            )
        # TE linears only when asked for explicitly (megatron.te_shuffle; verified by the GPU check).
        return get_gpt_layer_shuffle_spec(num_experts, carrier=shuffle,
                                          use_transformer_engine=bool(use_transformer_engine), **kwargs)

    return dispatcher_layer_spec(num_experts, use_transformer_engine=use_transformer_engine,
                                 moe_grouped_gemm=moe_grouped_gemm, **kwargs)


def get_gpt_decoder_block_specmoe_spec(config, *, use_transformer_engine: bool | None = None, **kwargs: Any):
    """Megatron's decoder block spec (dense or MoE per layer from ``moe_layer_freq``) with the
    specmoe MoE layer."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    if use_transformer_engine is None:
        use_transformer_engine = have_te()
    return with_specmoe(
        get_gpt_decoder_block_spec(config, use_transformer_engine=use_transformer_engine, **kwargs)
    )
