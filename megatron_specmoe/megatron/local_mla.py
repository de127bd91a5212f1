"""Multi-latent attention (MLA) with Megatron's local (non-TransformerEngine) layer spec.

Notation: sq, sk query and key lengths; b micro-batch; np heads on this TP rank; hk = qk_head_dim
+ qk_pos_emb_head_dim (query/key head size); hv = v_head_dim (value head size).

Megatron's local spec builds ``MLASelfAttention`` with ``DotProductAttention`` as its core
attention, but MLA passes ``k_channels`` / ``v_channels`` (hk != hv) and the local
``DotProductAttention`` of megatron-core 0.16.1 and 0.19.2 accepts neither, so the local MLA spec
does not build (only TE's attention does). ``LocalMLAAttention`` is that core attention for
hk != hv: softmax(scale * Q K^T + mask) V per head, with Megatron's own mask-softmax module, in
two batched matmuls (no fused kernel; for CPU runs, tests and small models).
``with_local_mla`` puts it into a layer spec of either form (``ModuleSpec`` or
``functools.partial``). Layers without MLA are returned unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention

__all__ = ["LocalMLAAttention", "with_local_mla"]


class LocalMLAAttention(DotProductAttention):
    """``DotProductAttention`` for heads whose key and value sizes differ (MLA).

    Args (besides ``DotProductAttention``'s): k_channels (hk), v_channels (hv); None: the
    config's head size.
    """

    def __init__(self, *args: Any, k_channels: Optional[int] = None, v_channels: Optional[int] = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # Megatron's Attention base builds a core attention without them first (MLA then builds
        # its own with both): default to the config's head size.
        self.k_channels = int(k_channels or self.hidden_size_per_attention_head)
        self.hidden_size_per_attention_head_v = int(v_channels or self.hidden_size_per_attention_head)
        if kwargs.get("softmax_scale") is None:
            self.softmax_scale = self.k_channels ** -0.5

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type=None, attention_bias=None,
                packed_seq_params=None) -> torch.Tensor:
        """query [sq, b, np, hk], key [sk, b, np, hk], value [sk, b, np, hv] (float, one dtype);
        attention_mask bool, True = masked, broadcastable to [b, np, sq, sk] (or None with a
        causal mask type). Returns [sq, b, np * hv]."""
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("LocalMLAAttention: packed sequences and attention bias need TE's attention")
        sq, b, heads, _ = query.shape
        scores = torch.matmul(query.permute(1, 2, 0, 3), key.permute(1, 2, 3, 0)) * self.softmax_scale
        probs = self.scale_mask_softmax(scores, attention_mask, self.softmax_offset)  # [b, np, sq, sk]
        probs = self.attention_dropout(probs)
        context = torch.matmul(probs, value.permute(1, 2, 0, 3))  # [b, np, sq, hv]
        return context.permute(2, 0, 1, 3).reshape(sq, b, heads * value.shape[-1])


def _replace_core(attention_spec: Any) -> Any:
    if isinstance(attention_spec, functools.partial):
        sub = attention_spec.keywords.get("submodules")
    else:
        sub = getattr(attention_spec, "submodules", None)
    if sub is None or not hasattr(sub, "linear_kv_down_proj"):
        return attention_spec  # not MLA
    if getattr(sub.core_attention, "func", getattr(sub.core_attention, "module", sub.core_attention)) is not DotProductAttention:
        return attention_spec  # already TE's or ours
    new_sub = dataclasses.replace(sub, core_attention=LocalMLAAttention)
    if isinstance(attention_spec, functools.partial):
        return functools.partial(attention_spec.func, *attention_spec.args,
                                 **{**attention_spec.keywords, "submodules": new_sub})
    return dataclasses.replace(attention_spec, submodules=new_sub)


def with_local_mla(spec: Any) -> Any:
    """A copy of a layer spec (or block spec) whose MLA self-attention uses ``LocalMLAAttention``
    in place of the local ``DotProductAttention``."""
    if hasattr(spec, "layer_specs"):
        return dataclasses.replace(spec, layer_specs=[with_local_mla(s) for s in spec.layer_specs])
    if isinstance(spec, functools.partial):
        sub = spec.keywords.get("submodules")
    else:
        sub = getattr(spec, "submodules", None)
    if sub is None or not hasattr(sub, "self_attention"):
        return spec
    new_sub = dataclasses.replace(sub, self_attention=_replace_core(sub.self_attention))
    if isinstance(spec, functools.partial):
        return functools.partial(spec.func, *spec.args, **{**spec.keywords, "submodules": new_sub})
    return dataclasses.replace(spec, submodules=new_sub)
