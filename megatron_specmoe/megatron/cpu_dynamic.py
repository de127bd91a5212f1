"""CPU reference implementations for Megatron's dynamic inference context (core 0.19) on gloo.

Notation
    T: tokens of one flat batch (prefill chunks and decode tokens of every active request, padded).
    H / Hkv: query / key-value heads.   D: head dim.   N: KV-cache blocks.   Bk: tokens per block.
    B: requests.   cu_q, cu_k: int32 [B + 1] cumulative query / key lengths.

``DynamicInferenceContext`` (continuous batching, paged KV cache) and ``DynamicInferenceEngine``
assume CUDA in the places below, found by running the engine on a CPU build (each ``enable()``
patch names the failure it removes; ``disable()`` restores every original; nothing happens at
import time, and ``enable()`` does nothing where CUDA is available). Use it with
``cpu_support.enable()`` (the MoE / GPT patches).

| failure on a CPU build                                             | patch                                    |
| ------------------------------------------------------------------ | ---------------------------------------- |
| host bookkeeping tensors allocated with ``pin_memory=True``        | ``torch.{empty,full,zeros,ones,tensor,arange,empty_like,zeros_like}`` and ``Tensor.pin_memory`` ignore pinning (a CPU build cannot pin; nothing else changes) |
| ``torch.cuda.Event`` / ``Stream`` / ``current_stream`` / ``stream`` / ``synchronize`` (bookkeeping H2D overlap) | no-op stand-ins: the CPU runs in order |
| ``torch.cuda.use_mem_pool``, ``mem_get_info``                      | a null context; a fixed 16 GiB device    |
| ``torch.cuda.nvtx.range_push/pop`` (also imported by name in the text generation controller) | no-ops |
| attention asserts flash-attn >= 2.7.3 and calls ``flash_attn_varlen_func`` (prefill / mixed steps) and ``flash_attn_with_kvcache`` (decode-only steps) on the paged cache | ``paged_varlen_attention`` / ``paged_kvcache_attention``: the same causal attention over each request's blocks, in fp32 torch; the version check answers True |
| the Triton KV-cache append kernel asserts CUDA tensors             | ``triton_append_key_value_cache = None``: the context's own torch path |
| MLA's absorbed decode-only step calls FlashMLA (``flash_mla_with_kvcache``, ``get_mla_metadata``; None without the package) on the latent cache | ``paged_latent_attention``: each request's queries attend causally to its cached latents (values: their first ``head_dim_v`` entries), fp32 torch; the metadata call returns nothing (no tiles to schedule) |

MLA under the dynamic engine also needs ``mla_dynamic.enable()`` (its local-spec fixes, on any
device). Not covered: FlashInfer RoPE / sampling, CUDA graphs, Mamba
states, unified memory (``unified_memory_level > 0``). Checked in ``tests/test_cpu_dynamic.py``:
the engine's greedy tokens for requests of different lengths equal a full forward per token, and
the references equal dense causal attention on a shuffled block table.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any, Optional

import torch

from megatron_specmoe.megatron.patching import Patch, apply_without_cuda, original, revert_without_cuda

__all__ = ["enable", "disable", "paged_varlen_attention", "paged_kvcache_attention", "paged_latent_attention"]

log = logging.getLogger(__name__)

_PINNING = ("empty", "full", "zeros", "ones", "tensor", "arange", "empty_like", "zeros_like")


def _unpinned(fn):
    @functools.wraps(fn)
    def call(*args, **kwargs):
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    call.__specmoe_cpu__ = True
    return call


class _Event:
    """``torch.cuda.Event`` on the CPU: everything is already done."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, *args: Any, **kwargs: Any) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def wait(self, *args: Any, **kwargs: Any) -> None:
        return None

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: Any) -> float:
        return 0.0


class _Stream:
    """``torch.cuda.Stream`` on the CPU: one in-order stream."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def synchronize(self) -> None:
        return None

    def wait_stream(self, other: Any) -> None:
        return None

    def wait_event(self, event: Any) -> None:
        return None

    def record_event(self, event: Optional[Any] = None) -> Any:
        return event if event is not None else _Event()


def _none(*args: Any, **kwargs: Any) -> None:
    return None


def _null_context(*args: Any, **kwargs: Any):
    return contextlib.nullcontext()


def _current_stream(*args: Any, **kwargs: Any) -> _Stream:
    return _Stream()


def _mem_get_info(*args: Any, **kwargs: Any) -> tuple[int, int]:
    return (16 << 30, 16 << 30)


# --------------------------------------------------------------------------- attention references


def _blocks(cache: torch.Tensor, table_row: torch.Tensor, length: int) -> torch.Tensor:
    """[length, Hkv, D]: the first ``length`` cached tokens of one request (cache [N, Bk, Hkv, D],
    table_row int32 [blocks] of block ids)."""
    return cache[table_row.long()].reshape(-1, *cache.shape[2:])[:length]


def _causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """[Lq, H, D]: queries q [Lq, H, D] (the last Lq of the Lk positions) attend causally to
    k, v [Lk, Hkv, D] (GQA: each key head serves H / Hkv query heads); fp32 inside."""
    heads, kv_heads = q.shape[1], k.shape[1]
    if kv_heads != heads:
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
    lq, lk = q.shape[0], k.shape[0]
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    visible = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=lk - lq)
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.float()).to(q.dtype)


def _window(window_size: Any) -> None:
    if window_size not in (None, (-1, -1), [-1, -1]):
        raise NotImplementedError(f"cpu_dynamic: sliding-window attention (window_size={window_size}) "
                                  "has no CPU reference")


def paged_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, *,
                           softmax_scale=None, causal=True, window_size=(-1, -1), block_table=None,
                           return_attn_probs=False, **unused):
    """``flash_attn_varlen_func`` as Megatron's dynamic attention calls it. q [T, H, D] (request b's
    queries are rows cu_q[b]:cu_q[b+1]); k, v [N, Bk, Hkv, D] with ``block_table`` int32 [B, blocks]
    (or [Tk, Hkv, D] by cu_k without it); v's head size Dv may differ from D (MLA). Returns
    [T, H, Dv]; rows past cu_q[-1] (padding) are 0."""
    if not causal or return_attn_probs:
        raise NotImplementedError("cpu_dynamic: only causal attention without probabilities has a CPU reference")
    _window(window_size)
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    out = q.new_zeros(*q.shape[:2], v.shape[-1])  # MLA: value heads may be narrower than query heads
    for b in range(cu_seqlens_q.numel() - 1):
        start, stop = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        k0, k1 = int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1])
        if stop == start:
            continue
        if block_table is not None:
            kb, vb = _blocks(k, block_table[b], k1 - k0), _blocks(v, block_table[b], k1 - k0)
        else:
            kb, vb = k[k0:k1], v[k0:k1]
        out[start:stop] = _causal(q[start:stop], kb, vb, scale)
    return out


def paged_kvcache_attention(q, k_cache, v_cache, cache_seqlens=None, *, softmax_scale=None, causal=True,
                            window_size=(-1, -1), block_table=None, num_splits=0, return_softmax_lse=False,
                            **unused):
    """``flash_attn_with_kvcache`` as Megatron's decode-only step calls it: q [B, S, H, D] (S new
    tokens per request, already in the cache), k_cache / v_cache [N, Bk, Hkv, D], cache_seqlens
    int32 [B], block_table int32 [B, blocks]. Returns [B, S, H, D]."""
    if not causal or return_softmax_lse or block_table is None:
        raise NotImplementedError("cpu_dynamic: only causal, paged attention without LSE has a CPU reference")
    _window(window_size)
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        length = int(cache_seqlens[b])
        out[b] = _causal(q[b], _blocks(k_cache, block_table[b], length), _blocks(v_cache, block_table[b], length),
                         scale)
    return out


def paged_latent_attention(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata=None,
                           num_splits=None, softmax_scale=None, causal=False, **unused):
    """``flash_mla_with_kvcache`` as Megatron's absorbed MLA decode calls it: q [B, S, H, c + hr]
    (absorbed queries), k_cache [N, Bk, 1, c + hr] (latents and rotated positional keys; the first
    ``head_dim_v`` = c entries are the values), block_table int32 [B, blocks], cache_seqlens int32
    [B]. Returns ([B, S, H, head_dim_v], None): FlashMLA's output and, in place of its log-sum-exp,
    None (Megatron reads it only for attention sinks, which this reference refuses)."""
    if not causal:
        raise NotImplementedError("cpu_dynamic: only causal latent attention has a CPU reference")
    if unused.get("softmax_offset") is not None:
        raise NotImplementedError("cpu_dynamic: attention sinks have no CPU reference")
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    out = q.new_zeros(*q.shape[:3], head_dim_v)
    for b in range(q.shape[0]):
        cached = _blocks(k_cache, block_table[b], int(cache_seqlens[b]))  # [L, 1, c + hr]
        out[b] = _causal(q[b], cached, cached[..., :head_dim_v], scale)
    return out, None


def _mla_metadata(*args: Any, **kwargs: Any) -> tuple[None, None]:
    return None, None


def _fa_min_version(*args: Any, **kwargs: Any) -> bool:
    return True


# --------------------------------------------------------------------------- patches


def _patches() -> list[Patch]:
    from megatron.core.inference.contexts import dynamic_context
    from megatron.core.inference.text_generation_controllers import text_generation_controller
    from megatron.core.transformer import attention

    patches = [Patch(owner=torch, name=name, replacement=_unpinned(original(torch, name)),
                     why="host bookkeeping tensors are allocated with pin_memory=True") for name in _PINNING]
    patches += [
        Patch(owner=torch.Tensor, name="pin_memory", replacement=lambda self, *a, **k: self,
              why="Tensor.pin_memory() needs CUDA"),
        Patch(owner=torch.cuda, name="Event", replacement=_Event, why="torch.cuda.Event needs CUDA"),
        Patch(owner=torch.cuda, name="Stream", replacement=_Stream, why="torch.cuda.Stream needs CUDA"),
        Patch(owner=torch.cuda, name="current_stream", replacement=_current_stream,
              why="torch.cuda.current_stream needs CUDA"),
        Patch(owner=torch.cuda, name="stream", replacement=_null_context, why="torch.cuda.stream needs CUDA"),
        Patch(owner=torch.cuda, name="synchronize", replacement=_none, why="torch.cuda.synchronize needs CUDA"),
        Patch(owner=torch.cuda, name="use_mem_pool", replacement=_null_context,
              why="the context's memory pool is a CUDA one"),
        Patch(owner=torch.cuda, name="mem_get_info", replacement=_mem_get_info,
              why="the context sizes its buffers from the device memory"),
        Patch(owner=torch.cuda.nvtx, name="range_push", replacement=_none, why="NVTX needs a CUDA build"),
        Patch(owner=torch.cuda.nvtx, name="range_pop", replacement=_none, why="NVTX needs a CUDA build"),
        Patch(owner=text_generation_controller, name="range_push", replacement=_none,
              why="NVTX needs a CUDA build (the controller imports range_push by name)"),
        Patch(owner=text_generation_controller, name="range_pop", replacement=_none,
              why="NVTX needs a CUDA build (the controller imports range_pop by name)"),
        Patch(owner=attention, name="flash_attn_varlen_func", replacement=paged_varlen_attention,
              why="dynamic prefill / mixed steps call flash-attn's varlen kernel on the paged cache"),
        Patch(owner=attention, name="flash_attn_with_kvcache", replacement=paged_kvcache_attention,
              why="decode-only steps call flash-attn's paged KV-cache kernel"),
        Patch(owner=attention, name="is_fa_min_version", replacement=_fa_min_version,
              why="dynamic batching asserts flash-attn >= 2.7.3 (the references stand in for it)"),
        Patch(owner=dynamic_context, name="triton_append_key_value_cache", replacement=None,
              why="the Triton KV append kernel asserts CUDA tensors; the context has a torch path"),
        Patch(owner=attention, name="flash_mla_with_kvcache", replacement=paged_latent_attention,
              why="MLA's absorbed decode-only step calls FlashMLA on the latent cache"),
        Patch(owner=attention, name="get_mla_metadata", replacement=_mla_metadata,
              why="FlashMLA's tile scheduler metadata (no tiles on the CPU)"),
    ]
    return patches


def enable() -> bool:
    """Apply the patches (idempotent). Returns False, doing nothing, where CUDA is available."""
    return apply_without_cuda(_patches, log)


def disable() -> None:
    """Restore every original ``enable()`` replaced (idempotent)."""
    revert_without_cuda(_patches)
