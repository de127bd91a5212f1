"""Megatron's dynamic inference engine (core 0.19: continuous batching, paged KV cache) on the CPU
with ``megatron/cpu_dynamic.py``: the attention references against dense causal attention, and the
engine's greedy tokens for requests of different lengths (prefill and decode in one flat batch,
a request arriving after two steps, requests finishing at different steps, padding to the
engine's token count) against a full forward
per token, on 1 gloo rank. The patches are reversible."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core.inference.contexts.dynamic_context")
pytest.importorskip("einops")

from megatron_specmoe.megatron import cpu_dynamic  # noqa: E402
from megatron_specmoe.testing.spawn import run_local  # noqa: E402


def _dense(q, k, v):
    """Causal attention of q [Lq, H, D] (the last Lq positions) over k, v [Lk, H, D], by softmax."""
    lq, lk = q.shape[0], k.shape[0]
    scores = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
    mask = torch.arange(lk)[None, :] <= (torch.arange(lq)[:, None] + lk - lq)
    return torch.einsum("hqk,khd->qhd", scores.masked_fill(~mask, float("-inf")).softmax(-1), v)


def test_paged_references_equal_dense_causal_attention():
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, dim, block = 4, 2, 8, 4
    lengths_k, lengths_q = [7, 3, 9], [7, 1, 2]  # a prefill, a decode token, a 2-token chunk
    num_blocks = 8
    k_cache = torch.randn(num_blocks, block, kv_heads, dim, generator=gen)
    v_cache = torch.randn(num_blocks, block, kv_heads, dim, generator=gen)
    table = torch.tensor([[5, 2, 0], [7, 0, 0], [1, 6, 3]], dtype=torch.int32)  # blocks out of order
    q = torch.randn(sum(lengths_q) + 2, heads, dim, generator=gen)  # 2 padding rows
    cu_q = torch.tensor([0, 7, 8, 10], dtype=torch.int32)
    cu_k = torch.tensor([0, 7, 10, 19], dtype=torch.int32)
    out = cpu_dynamic.paged_varlen_attention(q, k_cache, v_cache, cu_q, cu_k, 7, 9, block_table=table)
    for b in range(3):
        kb = k_cache[table[b].long()].reshape(-1, kv_heads, dim)[:lengths_k[b]].repeat_interleave(2, dim=1)
        vb = v_cache[table[b].long()].reshape(-1, kv_heads, dim)[:lengths_k[b]].repeat_interleave(2, dim=1)
        want = _dense(q[cu_q[b]:cu_q[b + 1]], kb, vb)
        torch.testing.assert_close(out[cu_q[b]:cu_q[b + 1]], want, rtol=1e-5, atol=1e-6)
    assert torch.equal(out[10:], torch.zeros_like(out[10:]))  # padding rows stay zero
    # Decode-only form: one new token per request, already in the cache.
    qd = torch.randn(3, 1, heads, dim, generator=gen)
    seqlens = torch.tensor(lengths_k, dtype=torch.int32)
    outd = cpu_dynamic.paged_kvcache_attention(qd, k_cache, v_cache, seqlens, block_table=table)
    for b in range(3):
        kb = k_cache[table[b].long()].reshape(-1, kv_heads, dim)[:lengths_k[b]].repeat_interleave(2, dim=1)
        vb = v_cache[table[b].long()].reshape(-1, kv_heads, dim)[:lengths_k[b]].repeat_interleave(2, dim=1)
        torch.testing.assert_close(outd[b], _dense(qd[b], kb, vb), rtol=1e-5, atol=1e-6)
    with pytest.raises(NotImplementedError, match="sliding-window attention"):
        cpu_dynamic.paged_kvcache_attention(qd, k_cache, v_cache, seqlens, block_table=table, window_size=(4, 0))


PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7], [11, 12, 13, 14, 15], [40]]
STEPS = [5, 2, 4, 3]  # tokens to generate: requests finish at different steps


def _engine_worker(rank, world_size):
    import warnings

    warnings.filterwarnings("ignore")
    from megatron.core.inference.config import InferenceConfig
    from megatron.core.inference.contexts.dynamic_context import DynamicInferenceContext
    from megatron.core.inference.engines.dynamic_engine import DynamicInferenceEngine
    from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
    from megatron.core.inference.sampling_params import SamplingParams
    from megatron.core.inference.text_generation_controllers.text_generation_controller import (
        TextGenerationController,
    )
    from megatron.core.transformer import attention

    from megatron_specmoe.megatron import cpu_support, parallel
    from megatron_specmoe.megatron.build import MoEShape, build_gpt_model, make_config
    from megatron_specmoe.schedule.layout import ParallelLayout

    class Tokenizer:
        eod, vocab_size = 63, 64

        def detokenize(self, tokens, **kwargs):
            return " ".join(map(str, tokens))

    cpu_support.enable()
    originals = (torch.full, torch.cuda.Event, attention.flash_attn_varlen_func)
    assert cpu_dynamic.enable() and cpu_dynamic.enable()  # idempotent
    parallel.initialize(ParallelLayout(tp=1, ep=1, etp=1), seed=3)
    shape = MoEShape(layers=2, vocab=64, seq=64)
    config = make_config(shape, dispatcher="alltoall")
    model = build_gpt_model(config, shape, specmoe=False).eval()
    # 16-token blocks, at most 64 tokens per step: the engine pads each flat batch to its sizes.
    inference = InferenceConfig(block_size_tokens=16, buffer_size_gb=0.01, max_requests=4, max_tokens=64,
                                max_sequence_length=64, num_cuda_graphs=None)
    context = DynamicInferenceContext(config, inference)
    controller = TextGenerationController(inference_wrapped_model=GPTInferenceWrapper(model, context),
                                          tokenizer=Tokenizer())
    engine = DynamicInferenceEngine(controller, context)
    def add(i):
        engine.add_request(i, PROMPTS[i], SamplingParams(num_tokens_to_generate=STEPS[i], top_k=1, termination_id=-1))

    for i in range(len(PROMPTS) - 1):
        add(i)
    finished, steps = {}, 0
    while (engine.has_unfinished_requests() or steps < 2) and steps < 50:
        if steps == 2:
            add(len(PROMPTS) - 1)  # arrives while the others are decoding
        result = engine.step_modern()
        steps += 1
        for record in result["finished_request_records"]:
            request = record.merge()
            finished[request.request_id] = (list(request.generated_tokens), steps)
    reference = []
    for prompt, n in zip(PROMPTS, STEPS):
        tokens = list(prompt)
        for _ in range(n):
            with torch.no_grad():
                logits = model(torch.tensor([tokens]), torch.arange(len(tokens))[None], None,
                               runtime_gather_output=True)
            tokens.append(int(logits[0, -1].argmax()))
        reference.append(tokens[len(prompt):])
    cpu_dynamic.disable()
    restored = (torch.full, torch.cuda.Event, attention.flash_attn_varlen_func) == originals
    return {"finished": finished, "reference": reference, "restored": restored, "steps": steps}


def test_dynamic_engine_runs_on_the_cpu_and_equals_a_full_forward():
    # core 0.19's engine API (InferenceConfig); 0.16's dynamic engine is built differently.
    pytest.importorskip("megatron.core.inference.config")
    (out,) = run_local(_engine_worker, 1, timeout_s=300)
    assert out["restored"]
    got = [out["finished"][i][0] for i in range(len(PROMPTS))]
    assert got == out["reference"]
    # Continuous batching: the requests left the batch at different steps.
    finish_steps = [out["finished"][i][1] for i in range(len(PROMPTS))]
    assert len(set(finish_steps)) > 1, finish_steps
