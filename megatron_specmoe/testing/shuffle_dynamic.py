"""The s-TS lossless check under Megatron's dynamic inference engine (core 0.19, continuous batching).

Notation
    T: tokens of one engine step, a flat batch [T, 1, H] mixing prefill chunks and decode tokens of
       every active request, padded to the engine's token count.   P: TP = EP ranks.

``dynamic_shuffle_lossless(rank, world_size, case)`` (run on P gloo ranks with
``testing.spawn.run_local``) builds two GPT models with the same weights, Megatron's local spec with
the alltoall dispatcher and the shuffle spec (``ShuffleTransformerLayer`` + the specmoe dispatcher),
and serves the same request stream through a ``DynamicInferenceEngine`` for each: requests of
different lengths, one arriving after ``ARRIVE_AT`` steps, each generating a different number of
tokens (so they finish at different steps), greedy. It returns each request's generated tokens
and log-probs, and the shuffle plans the carrier kept. ``megatron/cpu_dynamic.py`` supplies the
CPU references the engine needs; ``inference_moe_token_dispatcher_type='nccl'`` because the default
('nvls') allocates symmetric-memory buffers that need Hopper GPUs on NVLink (the context allocates
them for EP > 1 whatever the model's dispatcher).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

__all__ = ["DynamicCase", "PROMPTS", "NEW_TOKENS", "ARRIVE_AT", "dynamic_shuffle_lossless", "serve_stream"]

PROMPTS = ([1, 2, 3, 4, 5, 6, 7], [9, 8, 7], [11, 12, 13, 14, 15], [40])
NEW_TOKENS = (5, 2, 4, 3)
ARRIVE_AT = 2  # the last request is added after this many engine steps


@dataclass(frozen=True, kw_only=True)
class DynamicCase:
    """One run. Attributes: tp (= EP), sequence_parallel, predictor ("pregate" or "route")."""

    tp: int = 2
    sequence_parallel: bool = False
    predictor: str = "pregate"


class _Tokenizer:
    eod, vocab_size = 63, 64

    def detokenize(self, tokens, **kwargs) -> str:
        return " ".join(map(str, tokens))


def serve_stream(model, config, block_size_tokens: int = 16) -> dict:
    """Run the request stream through a DynamicInferenceEngine with KV-cache blocks of
    ``block_size_tokens`` (64 for MLA's latent cache); request id -> (tokens, log-probs, the step
    it finished at)."""
    from megatron.core.inference.config import InferenceConfig
    from megatron.core.inference.contexts.dynamic_context import DynamicInferenceContext
    from megatron.core.inference.engines.dynamic_engine import DynamicInferenceEngine
    from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
    from megatron.core.inference.sampling_params import SamplingParams
    from megatron.core.inference.text_generation_controllers.text_generation_controller import (
        TextGenerationController,
    )

    inference = InferenceConfig(block_size_tokens=block_size_tokens, buffer_size_gb=0.01, max_requests=4,
                                max_tokens=64, max_sequence_length=64, num_cuda_graphs=None)
    context = DynamicInferenceContext(config, inference)
    controller = TextGenerationController(inference_wrapped_model=GPTInferenceWrapper(model, context),
                                          tokenizer=_Tokenizer())
    engine = DynamicInferenceEngine(controller, context)

    def add(i: int) -> None:
        engine.add_request(i, list(PROMPTS[i]), SamplingParams(
            num_tokens_to_generate=NEW_TOKENS[i], top_k=1, termination_id=-1, return_log_probs=True,
            skip_prompt_log_probs=True))

    for i in range(len(PROMPTS) - 1):
        add(i)
    out, steps = {}, 0
    while (engine.has_unfinished_requests() or steps < ARRIVE_AT) and steps < 64:
        if steps == ARRIVE_AT:
            add(len(PROMPTS) - 1)
        result = engine.step_modern()
        steps += 1
        for record in result["finished_request_records"]:
            request = record.merge()
            out[request.request_id] = (list(request.generated_tokens), list(request.generated_log_probs),
                                       steps)
    return out


def dynamic_shuffle_lossless(rank: int, world_size: int, case: DynamicCase) -> dict:
    """See the module docstring. Returns {"alltoall": ..., "shuffle": ..., "plans": n, "moved": m}
    (m: tokens whose home TP rank was not their contiguous one, summed over plans)."""
    warnings.filterwarnings("ignore")
    import torch
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel

    from megatron_specmoe.megatron import cpu_dynamic, cpu_support, parallel
    from megatron_specmoe.megatron.build import MoEShape, make_config
    from megatron_specmoe.megatron.shuffle_layer import ShuffleCarrier, ShuffleOptions
    from megatron_specmoe.megatron.shuffle_specs import (
        feed_token_ids,
        get_gpt_block_shuffle_spec,
        get_gpt_layer_shuffle_spec,
        true_order_output,
        with_tokenwise_norms,
    )
    from megatron_specmoe.schedule.layout import ParallelLayout
    from megatron_specmoe.testing.shuffle_lossless import TokenModuloPredictor

    cpu_support.enable()
    cpu_dynamic.enable()
    parallel.initialize(ParallelLayout(tp=case.tp, ep=case.tp, etp=1), seed=3)
    shape = MoEShape(layers=2, vocab=64, seq=64)
    sp = case.sequence_parallel
    common = dict(tp=case.tp, ep=case.tp, sequence_parallel=sp, inference_moe_token_dispatcher_type="nccl")
    configs = {d: make_config(shape, dispatcher=d, **common) for d in ("alltoall", "specmoe")}
    route = (TokenModuloPredictor(num_experts=shape.experts, num_layers=shape.layers)
             if case.predictor == "route" else None)
    carrier = ShuffleCarrier(options=ShuffleOptions(predictor=case.predictor, keep_plans=True, route_predictor=route,
                                                    route_vocab_size=shape.vocab if route is not None else None))
    ref_spec = get_gpt_layer_local_spec(num_experts=shape.experts, moe_grouped_gemm=False)
    shuffle_spec = get_gpt_layer_shuffle_spec(shape.experts, carrier=carrier, sequence_parallel_norms=sp)
    if sp:
        ref_spec = get_gpt_block_shuffle_spec(configs["alltoall"], with_tokenwise_norms(ref_spec))
        shuffle_spec = get_gpt_block_shuffle_spec(configs["specmoe"], shuffle_spec)

    def build(config, spec):
        return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=shape.vocab,
                        max_sequence_length=shape.seq, position_embedding_type="rope").eval()

    reference = build(configs["alltoall"], ref_spec)
    shuffled = build(configs["specmoe"], shuffle_spec)
    with torch.no_grad():  # larger router weights, so that routes (and the plans) vary
        for i, layer in enumerate(m for m in reference.modules() if hasattr(m, "router")):
            gen = torch.Generator().manual_seed(i)
            layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=gen) * 2)
    shuffled.load_state_dict(reference.state_dict(), strict=True)
    if sp:
        true_order_output(shuffled, carrier)
    if route is not None:
        feed_token_ids(shuffled, carrier)
    out = {"alltoall": serve_stream(reference, configs["alltoall"]),
           "shuffle": serve_stream(shuffled, configs["specmoe"])}
    out["plans"] = len(carrier.plans)
    out["moved"] = int(sum(int((plan.home_rank != torch.arange(plan.num_tokens) // plan.capacity).sum())
                           for _, plan in carrier.plans))
    cpu_dynamic.disable()
    return out
