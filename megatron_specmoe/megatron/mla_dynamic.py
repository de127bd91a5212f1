"""Multi-latent attention (MLA) under Megatron's dynamic inference engine with the local layer spec.

Notation
    T: tokens of one flat engine step.   np: heads on this TP rank.   c: kv_lora_rank.
    hq = qk_head_dim, hr = qk_pos_emb_head_dim, hv = v_head_dim.   N: cache blocks, Bk: tokens
    per block (64, FlashMLA's).   B: requests.   S: new tokens per request (1 in decode).

Megatron-core 0.19.2 runs MLA under the dynamic engine only with ``cache_mla_latents=True``
(``MultiLatentAttention.forward`` asserts it): the paged cache holds each token's normalised
latent and rotated positional key (c + hr values) instead of keys and values. Two things in that
path fail with the local (non-TransformerEngine) spec the shuffle layer uses, on any device:

| failure in core 0.19.2                                                  | patch (``enable()``)             |
| ----------------------------------------------------------------------- | -------------------------------- |
| ``prepare_for_absorption`` splits TE's fused layernorm + kv up-projection (``split_te_layernorm_column_parallel_linear``: None without TE, and the local spec's ``linear_kv_up_proj`` is a plain ``ColumnParallelLinear`` after a separate ``kv_layernorm``) | ``_local_absorption``: the local spec is already split; it keeps ``kv_layernorm`` and takes the up-projection as the linear that uncompresses the cache, and its weight's K / V halves (``up_k_weight`` [np, hq, c], ``up_v_weight`` [np, hv, c]) exactly as Megatron slices them; TE layers go to the original |
| ``MultiLatentAttention.forward`` calls ``flash_decode_and_prefill`` with 9 arguments, the base ``Attention`` method requires a 10th (``is_decode_only``): a ``TypeError`` on every dynamic step | ``_mla_flash_decode_and_prefill``: the base method with ``is_decode_only`` supplied; in MLA's latent path the value is None exactly in decode-only steps (the absorbed step reads the latent cache, prefill / mixed steps uncompress it into keys and values) |

The decode-only step then calls FlashMLA (``flash_mla_with_kvcache``), a CUDA kernel: on a CPU
build ``cpu_dynamic.enable()`` supplies its reference. Megatron's context also asserts
``block_size_tokens == 64`` for the latent cache (``InferenceConfig``). Core 0.16.1 has none of
this (specmoe's dynamic path needs core 0.19's ``megatron.core.inference.config``), and
``check_dynamic_mla(config)`` says what a config lacks before an engine is built.

``enable()`` / ``disable()`` are idempotent and reversible (``patching.Patch``); nothing happens at
import time. The dynamic lossless test (``tests/test_deepseek_dynamic.py``) checks the result: the
engine's greedy tokens equal a full forward's, and the shuffle model's equal alltoall's.
"""

from __future__ import annotations

import inspect
from typing import Any

from megatron_specmoe.megatron.patching import Patch, apply_patches, original, revert_patches

__all__ = ["enable", "disable", "check_dynamic_mla", "MLA_BLOCK_SIZE"]

MLA_BLOCK_SIZE = 64  # tokens per KV-cache block Megatron's latent cache (FlashMLA) requires


def _local_absorption(self) -> None:
    """``prepare_for_absorption`` for the local spec (module docstring); TE's layers go to the original."""
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention

    if hasattr(self, "up_k_weight"):
        return
    up = getattr(self, "linear_kv_up_proj", None)
    if up is None or hasattr(up, "layer_norm_weight"):  # TE's fused layernorm + linear
        return original(MLASelfAttention, "prepare_for_absorption")(self)
    import torch

    with torch.no_grad():
        heads, hq, hv, c = (self.num_attention_heads_per_partition, self.config.qk_head_dim,
                            self.config.v_head_dim, self.config.kv_lora_rank)
        weight = up.weight.view(heads, hq + hv, c)  # [np * (hq + hv), c] -> [np, hq + hv, c]
        self.linear_kv_up_proj_linear = up
        self.up_k_weight = weight[:, :hq, :]
        self.up_v_weight = weight[:, hq:, :]
        del self.linear_kv_up_proj  # as Megatron does: the absorbed path reaches it as _linear


def _mla_flash_decode_and_prefill(self, q, k, v, max_seqlen_q, max_seqlen_k, cu_seqlens_q, cu_seqlens_k,
                                  seqlens_k, block_table, is_decode_only=None, **kwargs: Any):
    """``Attention.flash_decode_and_prefill`` with ``is_decode_only`` supplied when MLA leaves it
    out (module docstring). q [T, 1, np, hq + hr] (absorbed decode: [B * S, 1, np, c + hr])."""
    from megatron.core.transformer.attention import Attention

    if is_decode_only is None:
        is_decode_only = v is None
    return Attention.flash_decode_and_prefill(self, q, k, v, max_seqlen_q, max_seqlen_k, cu_seqlens_q,
                                              cu_seqlens_k, seqlens_k, block_table, is_decode_only, **kwargs)


def _needs_decode_flag() -> bool:
    from megatron.core.transformer.attention import Attention

    param = inspect.signature(Attention.flash_decode_and_prefill).parameters.get("is_decode_only")
    return param is not None and param.default is inspect.Parameter.empty


def _patches() -> list[Patch]:
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention, MultiLatentAttention

    patches = [Patch(owner=MLASelfAttention, name="prepare_for_absorption", replacement=_local_absorption,
                     why="absorption splits TE's fused layernorm + kv up-projection; the local spec has none")]
    if _needs_decode_flag():
        patches.append(Patch(owner=MultiLatentAttention, name="flash_decode_and_prefill",
                             replacement=_mla_flash_decode_and_prefill,
                             why="MLA's dynamic path omits flash_decode_and_prefill's is_decode_only"))
    return patches


def _available() -> bool:
    try:
        from megatron.core.inference import config  # noqa: F401  (core 0.19's dynamic engine)
        from megatron.core.transformer import multi_latent_attention  # noqa: F401
    except ImportError:
        return False
    return True


def enable() -> bool:
    """Apply the patches (idempotent). Returns False, doing nothing, on a core without the
    dynamic engine's inference config (0.16)."""
    if not _available():
        return False
    apply_patches(_patches())
    return True


def disable() -> None:
    """Restore every original ``enable()`` replaced (idempotent)."""
    if _available():
        revert_patches(_patches())


def check_dynamic_mla(config: Any, *, block_size_tokens: int, where: str = "config") -> None:
    """Raise a ValueError naming the field and the fix when an MLA ``config`` cannot run under the
    dynamic engine with blocks of ``block_size_tokens``; nothing for a config without MLA."""
    if not getattr(config, "multi_latent_attention", False):
        return
    if not _available():
        raise ValueError(f"{where}: multi-latent attention under the dynamic engine needs megatron-core "
                         ">= 0.19 (its dynamic engine and MLA latent cache); use the static engine on this core")
    if not getattr(config, "cache_mla_latents", False):
        raise ValueError(f"{where}.cache_mla_latents=False: Megatron's dynamic engine runs MLA only with "
                         "the latent KV cache; set cache_mla_latents=True")
    if block_size_tokens != MLA_BLOCK_SIZE:
        raise ValueError(f"block_size_tokens={block_size_tokens}: Megatron's MLA latent cache needs blocks "
                         f"of {MLA_BLOCK_SIZE} tokens; set InferenceConfig.block_size_tokens={MLA_BLOCK_SIZE}")
