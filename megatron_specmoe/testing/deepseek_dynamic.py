"""The s-TS lossless check of a DeepSeek-style model under Megatron's dynamic inference engine (core 0.19).

Notation
    T: tokens of one engine step (prefill chunks and decode tokens of every active request, padded).
    P: TP = EP ranks.   E: routed experts.   L: generated tokens of a request.

``deepseek_dynamic_lossless(rank, world_size, cases)`` (on P gloo ranks, ``testing.spawn.run_local``)
builds GPT models with the same weights, all DeepSeek-style (multi-latent attention, one
shared expert, E = 16 routed experts top-4 in 4 router groups of which a token uses 2, a sigmoid
router with a nonzero expert bias):
    reference  Megatron's local spec (``local_mla``) with the alltoall dispatcher;
    shuffle    one per case: the shuffle spec (``ShuffleTransformerLayer``, ``ShuffleMLASelfAttention``,
               shared experts on the shuffled shard) with the specmoe dispatcher, under a placement
               that mixes router groups on every rank, the case's predictor and sequence parallelism;
    dense      the reference's weights with ``cache_mla_latents=False`` and no sequence parallelism,
               for a full causal forward per request (no cache): the engine's tokens and log-probs
               must equal it, which checks the MLA latent-cache path (``mla_dynamic`` and the
               ``cpu_dynamic`` FlashMLA reference) independently of the shuffle.
The reference runs without sequence parallelism, which core 0.19.2's MLA latent cache does not
support with TP > 1 (it scatters the latent back to the sequence shard but not the positional key:
a size mismatch); the shuffle layer's MLA sees its gathered input without it either way.
The reference and each shuffle model serve ``shuffle_dynamic``'s request stream through a
``DynamicInferenceEngine`` each (MLA's latent cache: ``cache_mla_latents=True``, blocks of 64
tokens). Returns each model's generated tokens and log-probs, the dense forward's, and how many
plans the shuffle made and how many tokens it moved.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

__all__ = ["DeepSeekDynamicCase", "DEEPSEEK_DYNAMIC", "ACROSS", "deepseek_dynamic_lossless"]

DEEPSEEK_DYNAMIC = (
    ("multi_latent_attention", True), ("q_lora_rank", None), ("kv_lora_rank", 8), ("qk_head_dim", 8),
    ("qk_pos_emb_head_dim", 4), ("v_head_dim", 8), ("rope_type", "rope"), ("normalization", "RMSNorm"),
    ("moe_router_num_groups", 4), ("moe_router_group_topk", 2), ("moe_router_score_function", "sigmoid"),
    ("moe_router_enable_expert_bias", True), ("moe_router_topk_scaling_factor", 2.5),
    ("cache_mla_latents", True),
)
ACROSS = (9, 2, 14, 5, 0, 11, 7, 12, 3, 15, 6, 1, 10, 4, 13, 8)  # mixes router groups on every rank


@dataclass(frozen=True, kw_only=True)
class DeepSeekDynamicCase:
    """One run. Attributes: tp (= EP; 4 for ``ACROSS``), sequence_parallel, predictor ("pregate",
    "route" or "history")."""

    tp: int = 4
    sequence_parallel: bool = True
    predictor: str = "pregate"


def _dense_forward(model, prompt: list, generated: list, vocab: int) -> tuple[list, list]:
    """Greedy tokens and their log-probs from one full causal forward over prompt + generated."""
    import torch

    tokens = list(prompt) + list(generated[:-1])
    n = len(tokens)
    mask = torch.triu(torch.ones(1, 1, n, n, dtype=torch.bool), diagonal=1)
    with torch.no_grad():
        logits = model(torch.tensor([tokens]), torch.arange(n)[None], mask, runtime_gather_output=True)
    rows = logits[0, len(prompt) - 1:, :vocab].float().log_softmax(-1)  # [L, V]
    return rows.argmax(-1).tolist(), [float(rows[i, t]) for i, t in enumerate(generated)]


def deepseek_dynamic_lossless(rank: int, world_size: int, cases: tuple) -> dict:
    """See the module docstring; ``cases`` is a tuple of ``DeepSeekDynamicCase`` (one TP size), one
    shuffle model each, against one reference and one dense model. Returns {"alltoall": request id
    -> (tokens, log-probs, finish step), "dense": id -> (greedy tokens, log-probs of the alltoall
    tokens), "shuffle": one {"served": like "alltoall", "plans": n, "moved": m} per case}."""
    warnings.filterwarnings("ignore")
    import torch
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel

    from megatron_specmoe.megatron import cpu_dynamic, cpu_support, mla_dynamic, parallel
    from megatron_specmoe.megatron.build import MoEShape, make_config, spec_options
    from megatron_specmoe.megatron.local_mla import with_local_mla
    from megatron_specmoe.megatron.model_tools import moe_sites, set_placements
    from megatron_specmoe.megatron.shuffle_layer import ShuffleCarrier, ShuffleOptions
    from megatron_specmoe.megatron.shuffle_specs import (
        feed_token_ids,
        get_gpt_block_shuffle_spec,
        get_gpt_layer_shuffle_spec,
        true_order_output,
    )
    from megatron_specmoe.schedule.layout import ParallelLayout
    from megatron_specmoe.schedule.placement import ExpertPlacement
    from megatron_specmoe.testing.lossless import arrange_layers
    from megatron_specmoe.testing.shuffle_dynamic import PROMPTS, serve_stream
    from megatron_specmoe.testing.shuffle_lossless import TokenModuloPredictor, toy_history_predictor

    tps = {case.tp for case in cases}
    if len(tps) != 1:
        raise ValueError(f"deepseek_dynamic_lossless: cases of TP sizes {sorted(tps)}; give cases of one TP size")
    tp = tps.pop()
    cpu_support.enable()
    cpu_dynamic.enable()
    mla_dynamic.enable()
    try:
        parallel.initialize(ParallelLayout(tp=tp, ep=tp, etp=1), seed=3)
        shape = MoEShape(hidden=16, ffn=8, experts=16, topk=4, shared_ffn=24, layers=2, vocab=64, seq=64)
        common = dict(tp=tp, ep=tp, inference_moe_token_dispatcher_type="nccl", **dict(DEEPSEEK_DYNAMIC))
        # The reference runs without sequence parallelism: core 0.19.2's MLA latent cache fails with
        # it (the latent is scattered back to the sequence shard, the positional key is not).
        ref_config = make_config(shape, dispatcher="alltoall", **{**common, "sequence_parallel": False})
        dense_config = make_config(shape, dispatcher="alltoall", **{**common, "sequence_parallel": False,
                                                                    "cache_mla_latents": False})
        mla_dynamic.check_dynamic_mla(ref_config, block_size_tokens=mla_dynamic.MLA_BLOCK_SIZE)
        opts = spec_options(ref_config)
        ref_spec = with_local_mla(get_gpt_layer_local_spec(num_experts=shape.experts, moe_grouped_gemm=False, **opts))

        def build(config, spec):
            return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=shape.vocab,
                            max_sequence_length=shape.seq, position_embedding_type="rope").eval()

        reference, dense = build(ref_config, ref_spec), build(dense_config, ref_spec)
        placement = ExpertPlacement(physical_to_logical=ACROSS, ep_size=tp)
        contiguous = ExpertPlacement.contiguous(shape.experts, tp)
        with torch.no_grad():
            for i, sites in enumerate(zip(moe_sites(reference), moe_sites(dense))):
                arrange_layers([s.layer for s in sites], [contiguous, contiguous], seed=3, layer_index=i)
                sites[1].layer.shared_experts.load_state_dict(sites[0].layer.shared_experts.state_dict())
        dense.load_state_dict(reference.state_dict(), strict=True)
        weights = {k: v.clone() if torch.is_tensor(v) else v for k, v in reference.state_dict().items()}  # kept
        # before serving: absorption (mla_dynamic) drops the kv up-projection from the module
        block = mla_dynamic.MLA_BLOCK_SIZE
        out = {"alltoall": serve_stream(reference, ref_config, block)}
        out["dense"] = {i: _dense_forward(dense, PROMPTS[i], out["alltoall"][i][0], shape.vocab)
                        for i in out["alltoall"]}
        out["shuffle"] = []
        for case in cases:
            sp = case.sequence_parallel
            config = make_config(shape, dispatcher="specmoe", **{**common, "sequence_parallel": sp})
            mla_dynamic.check_dynamic_mla(config, block_size_tokens=block)
            route = None
            if case.predictor == "route":
                route = TokenModuloPredictor(num_experts=shape.experts, num_layers=shape.layers)
            elif case.predictor == "history":
                route = toy_history_predictor(shape)
            carrier = ShuffleCarrier(options=ShuffleOptions(
                predictor=case.predictor, keep_plans=True, route_predictor=route,
                route_vocab_size=shape.vocab if case.predictor == "route" else None))
            spec = get_gpt_layer_shuffle_spec(shape.experts, carrier=carrier, sequence_parallel_norms=sp, **opts)
            shuffled = build(config, get_gpt_block_shuffle_spec(config, spec) if sp else spec)
            shuffled.load_state_dict(weights, strict=True)
            set_placements(shuffled, [placement] * shape.layers)
            with torch.no_grad():
                for i, (ref_site, site) in enumerate(zip(moe_sites(dense), moe_sites(shuffled))):
                    arrange_layers([ref_site.layer, site.layer], [contiguous, placement], seed=3, layer_index=i)
            if sp:
                true_order_output(shuffled, carrier)
            if route is not None:
                feed_token_ids(shuffled, carrier)
            served = serve_stream(shuffled, config, block)
            moved = sum(int((plan.home_rank != torch.arange(plan.num_tokens) // plan.capacity).sum())
                        for _, plan in carrier.plans)
            out["shuffle"].append({"served": served, "plans": len(carrier.plans), "moved": int(moved)})
        return out
    finally:
        mla_dynamic.disable()
        cpu_dynamic.disable()
        parallel.destroy()
