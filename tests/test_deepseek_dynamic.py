"""A DeepSeek-style model (multi-latent attention, one shared expert, 16 experts top-4 in 4 router
groups of which a token uses 2, a sigmoid router with an expert bias) under Megatron's dynamic
inference engine (core 0.19; continuous batching, MLA's latent KV cache): on 4 gloo ranks the
shuffle model's generated tokens equal Megatron's alltoall model's and its log-probs agree within
fp32 rounding, with pregate, route and history predictions and sequence parallelism on (and once
off), under a placement that mixes router groups on every rank; the alltoall engine's tokens and
log-probs equal a full causal forward without a cache (``testing/deepseek_dynamic.py``). Also: the
CPU reference for FlashMLA's decode kernel against dense attention, the MLA patches' reversal, and
the refusals of what Megatron's MLA dynamic path cannot run (on 0.16.1: all of it)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from megatron_specmoe.megatron import cpu_dynamic, mla_dynamic
from megatron_specmoe.megatron.build import MoEShape, make_config
from megatron_specmoe.testing.deepseek_dynamic import DEEPSEEK_DYNAMIC, DeepSeekDynamicCase, deepseek_dynamic_lossless
from megatron_specmoe.testing.shuffle_dynamic import NEW_TOKENS, PROMPTS
from megatron_specmoe.testing.spawn import run_local

CORE_19 = importlib.util.find_spec("megatron.core.inference.config") is not None
SHAPE = MoEShape(hidden=16, ffn=8, experts=16, topk=4, shared_ffn=24, layers=2)
CASES = (
    DeepSeekDynamicCase(predictor="pregate", sequence_parallel=True),
    DeepSeekDynamicCase(predictor="route", sequence_parallel=True),
    DeepSeekDynamicCase(predictor="history", sequence_parallel=True),
    DeepSeekDynamicCase(predictor="pregate", sequence_parallel=False),
)


@pytest.mark.skipif(not CORE_19, reason="Megatron's dynamic engine API (InferenceConfig) is core 0.19's; "
                                        "the refusal on 0.16 is tested below")
def test_deepseek_style_under_the_dynamic_engine_is_lossless():
    pytest.importorskip("einops")
    results = run_local(deepseek_dynamic_lossless, 4, CASES, timeout_s=400)
    for out in results:
        reference = out["alltoall"]
        assert sorted(reference) == list(range(len(PROMPTS)))
        for i, (tokens, log_probs, _) in reference.items():
            assert len(tokens) == NEW_TOKENS[i]
            dense_tokens, dense_log_probs = out["dense"][i]  # a full forward, no cache
            assert dense_tokens == tokens, (i, dense_tokens, tokens)
            assert max(abs(a - b) for a, b in zip(log_probs, dense_log_probs)) < 1e-4
        assert len({step for _, _, step in reference.values()}) > 1  # requests left at different steps
        for case, shuffled in zip(CASES, out["shuffle"]):
            served = shuffled["served"]
            assert sorted(served) == sorted(reference), case
            for i in reference:
                tokens, log_probs, finished_at = served[i]
                assert tokens == reference[i][0], (case, i)
                assert max(abs(a - b) for a, b in zip(log_probs, reference[i][1])) < 1e-5, case
                assert finished_at == reference[i][2], case
            # Every engine step ran the shuffle on both MoE layers, and moved tokens.
            assert shuffled["plans"] >= 2 * max(step for _, _, step in reference.values()), case
            assert shuffled["moved"] > 0, case
    for other in results[1:]:  # every rank serves the same output
        assert [s["served"] for s in other["shuffle"]] == [s["served"] for s in results[0]["shuffle"]]


def test_flash_mla_reference_equals_dense_latent_attention():
    gen = torch.Generator().manual_seed(0)
    heads, latent, rope, block = 4, 8, 4, 4
    lengths = [7, 3, 9]
    cache = torch.randn(8, block, 1, latent + rope, generator=gen)
    table = torch.tensor([[5, 2, 0], [7, 0, 0], [1, 6, 3]], dtype=torch.int32)  # blocks out of order
    q = torch.randn(3, 1, heads, latent + rope, generator=gen)  # one decode token per request
    out, lse = cpu_dynamic.paged_latent_attention(q, cache, table, torch.tensor(lengths, dtype=torch.int32),
                                                  latent, None, None, softmax_scale=0.3, causal=True)
    assert out.shape == (3, 1, heads, latent) and lse is None
    for b, n in enumerate(lengths):
        kv = cache[table[b].long()].reshape(-1, latent + rope)[:n]  # [n, c + hr]
        probs = (torch.einsum("hd,kd->hk", q[b, 0], kv) * 0.3).softmax(-1)
        torch.testing.assert_close(out[b, 0], probs @ kv[:, :latent], rtol=1e-5, atol=1e-6)
    with pytest.raises(NotImplementedError, match="only causal latent attention"):
        cpu_dynamic.paged_latent_attention(q, cache, table, torch.tensor(lengths, dtype=torch.int32), latent)


@pytest.mark.skipif(not CORE_19, reason="the MLA patches are for core 0.19's dynamic path")
def test_mla_patches_are_reversible():
    from megatron.core.transformer.attention import Attention
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention, MultiLatentAttention

    before = (MLASelfAttention.__dict__["prepare_for_absorption"],
              MultiLatentAttention.__dict__.get("flash_decode_and_prefill"))
    assert before[1] is None  # MLA inherits Attention's, which needs is_decode_only
    assert mla_dynamic.enable() and mla_dynamic.enable()  # idempotent
    assert MLASelfAttention.prepare_for_absorption is not before[0]
    assert MultiLatentAttention.flash_decode_and_prefill is not Attention.flash_decode_and_prefill
    mla_dynamic.disable()
    mla_dynamic.disable()
    assert MLASelfAttention.__dict__["prepare_for_absorption"] is before[0]
    assert "flash_decode_and_prefill" not in MultiLatentAttention.__dict__


def test_dynamic_mla_refusals():
    config = make_config(SHAPE, dispatcher="alltoall", **{**dict(DEEPSEEK_DYNAMIC), "cache_mla_latents": False})
    if not CORE_19:
        assert mla_dynamic.enable() is False  # nothing to patch: no dynamic engine for specmoe here
        with pytest.raises(ValueError, match=r"multi-latent attention under the dynamic engine needs megatron-core "
                                             r">= 0\.19 .* use the static engine"):
            mla_dynamic.check_dynamic_mla(config, block_size_tokens=64)
        return
    with pytest.raises(ValueError, match=r"config\.cache_mla_latents=False: .* set cache_mla_latents=True"):
        mla_dynamic.check_dynamic_mla(config, block_size_tokens=64)
    cached = make_config(SHAPE, dispatcher="alltoall", **dict(DEEPSEEK_DYNAMIC))
    with pytest.raises(ValueError, match=r"block_size_tokens=16: .* set InferenceConfig\.block_size_tokens=64"):
        mla_dynamic.check_dynamic_mla(cached, block_size_tokens=16)
    mla_dynamic.check_dynamic_mla(cached, block_size_tokens=64)
    mla_dynamic.check_dynamic_mla(make_config(SHAPE, dispatcher="alltoall"), block_size_tokens=16)  # no MLA
