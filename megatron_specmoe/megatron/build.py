"""Build small Megatron MoE layers and GPT models from specs, on either spec form.

Used by the tests and the demo; a user's own model is built by Megatron (or Megatron-LM) as
usual, with ``megatron_specmoe.install()`` or the specmoe layer spec.

Notation: H hidden size, E experts, k top-k, S sequence length, B micro-batch, V vocabulary.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch

__all__ = ["MoEShape", "make_config", "build_from_spec", "layer_spec", "spec_options", "build_moe_layer", "build_gpt_model"]


@dataclass(frozen=True, kw_only=True)
class MoEShape:
    """Model shape. Attributes: hidden (H), ffn (expert FFN size), experts (E), topk (k),
    heads, layers, vocab (V), seq (max sequence length), shared_ffn (0: no shared expert)."""

    hidden: int = 16
    ffn: int = 32
    experts: int = 8
    topk: int = 2
    heads: int = 4
    layers: int = 1
    vocab: int = 64
    seq: int = 64
    shared_ffn: int = 0


def make_config(shape: MoEShape, *, dispatcher: str, tp: int = 1, ep: int = 1, etp: int = 1, **overrides: Any):
    """A ``TransformerConfig`` for fp32 CPU/GPU runs of ``shape`` with the given dispatcher
    (an ``MLATransformerConfig`` when ``overrides`` say ``multi_latent_attention=True``: then
    ``q_lora_rank``, ``kv_lora_rank``, ``qk_head_dim``, ``qk_pos_emb_head_dim``, ``v_head_dim``
    and ``rope_type`` come from ``overrides`` or Megatron's defaults)."""
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    kwargs = dict(
        num_layers=shape.layers,
        hidden_size=shape.hidden,
        ffn_hidden_size=shape.ffn,
        num_attention_heads=shape.heads,
        num_moe_experts=shape.experts,
        moe_router_topk=shape.topk,
        moe_ffn_hidden_size=shape.ffn,
        moe_token_dispatcher_type=dispatcher,
        tensor_model_parallel_size=tp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        sequence_parallel=tp > 1,
        use_cpu_initialization=True,
        moe_permute_fusion=False,
        gradient_accumulation_fusion=False,
        params_dtype=torch.float32,
        bf16=False,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        moe_aux_loss_coeff=0.0,
    )
    if shape.shared_ffn:
        kwargs["moe_shared_expert_intermediate_size"] = shape.shared_ffn
    kwargs.update(overrides)
    if kwargs.get("multi_latent_attention"):
        return MLATransformerConfig(**kwargs)
    return TransformerConfig(**kwargs)


def spec_options(config) -> dict:
    """The layer-spec options a config needs (``multi_latent_attention``, ``qk_layernorm``,
    ``normalization``), for Megatron's spec builders; {} for a standard-attention LayerNorm config."""
    out = {}
    if getattr(config, "multi_latent_attention", False):
        out["multi_latent_attention"] = True
    if getattr(config, "qk_layernorm", False):
        out["qk_layernorm"] = True
    if config is not None and getattr(config, "normalization", "LayerNorm") != "LayerNorm":
        out["normalization"] = config.normalization
    return out


def build_from_spec(spec: Any, **kwargs: Any):
    """Instantiate a spec: ``ModuleSpec`` (core 0.16) or ``functools.partial`` (core 0.19)."""
    if isinstance(spec, functools.partial):
        return spec(**kwargs)
    from megatron.core.transformer.spec_utils import build_module

    return build_module(spec, **kwargs)


Via = Literal["spec", "hook"]


def layer_spec(shape: MoEShape, specmoe: bool, via: Via = "spec", config=None):
    """Megatron's local layer spec; with ``specmoe`` either the specmoe spec (``via="spec"``) or
    the stock spec after ``megatron_specmoe.install()`` (``via="hook"``). ``config`` (optional)
    selects multi-latent attention and RMSNorm where it asks for them (``spec_options``)."""
    from megatron_specmoe.megatron.local_mla import with_local_mla

    options = spec_options(config)
    if via not in get_args(Via):
        raise ValueError(f"via={via!r}: choose one of {get_args(Via)}")
    if specmoe and via == "hook":
        from megatron_specmoe.megatron.install import install

        install()
    elif specmoe:
        from megatron_specmoe.megatron.specs import get_gpt_layer_specmoe_spec

        return with_local_mla(get_gpt_layer_specmoe_spec(shape.experts, use_transformer_engine=False, **options))
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return with_local_mla(get_gpt_layer_local_spec(num_experts=shape.experts, moe_grouped_gemm=False, **options))


def build_moe_layer(config, shape: MoEShape, *, specmoe: bool, via: Via = "spec", layer_number: int = 1):
    """A lone ``MoELayer`` (SequentialMLP experts) from Megatron's local spec; with ``specmoe``
    through the specmoe spec or the install hook (``via``)."""
    spec = layer_spec(shape, specmoe, via, config).submodules.mlp
    layer = build_from_spec(spec, config=config)
    layer.set_layer_number(layer_number)
    return layer


def build_gpt_model(config, shape: MoEShape, *, specmoe: bool, via: Via = "spec"):
    """A tiny ``GPTModel`` with local linears, every layer MoE."""
    from megatron.core.models.gpt.gpt_model import GPTModel

    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(shape, specmoe, via, config),
        vocab_size=shape.vocab,
        max_sequence_length=shape.seq,
        position_embedding_type="rope",
    )
