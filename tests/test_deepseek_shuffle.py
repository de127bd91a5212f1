"""The shuffle layer with DeepSeek-style layers is lossless: multi-latent attention, a shared expert at
TP > 1, group-limited routing and an expert-bias router, with pregate / route / history predictions,
sequence parallelism on and off, and Megatron's static inference engine (prefill + decode with a KV
cache); fp32 on 4 gloo ranks, one set of processes.

Each case compares Megatron with ``alltoall`` (the outputs to match), Megatron's layers with the
specmoe dispatcher, and the shuffle layers (``testing.shuffle_lossless``).
"""

from megatron_specmoe.comm.shuffle import ring_bytes
from megatron_specmoe.megatron.build import MoEShape
from megatron_specmoe.schedule.assignment import capacity_of
from megatron_specmoe.testing.shuffle_lossless import ShuffleCase, run_shuffle_cases
from megatron_specmoe.testing.spawn import run_local

TOL = 1e-5
DEEPSEEK = (
    ("multi_latent_attention", True), ("q_lora_rank", None), ("kv_lora_rank", 8), ("qk_head_dim", 8),
    ("qk_pos_emb_head_dim", 4), ("v_head_dim", 8), ("rope_type", "rope"), ("normalization", "RMSNorm"),
    ("moe_router_num_groups", 4), ("moe_router_group_topk", 2), ("moe_router_score_function", "sigmoid"),
    ("moe_router_enable_expert_bias", True), ("moe_router_topk_scaling_factor", 2.5),
)
SHAPE = MoEShape(hidden=16, ffn=8, experts=16, topk=4, shared_ffn=24, layers=2)
ACROSS = (9, 2, 14, 5, 0, 11, 7, 12, 3, 15, 6, 1, 10, 4, 13, 8)  # mixes router groups on every rank
# DeepSeek-V2's attention: YaRN RoPE, a compressed query and q/kv layernorms (Megatron's local
# spec refuses a q layernorm without query compression, as V2-Lite has; TE fuses it there).
V2_ATTENTION = tuple(kv for kv in DEEPSEEK if kv[0] not in ("rope_type", "q_lora_rank")) + (
    ("rope_type", "yarn"), ("rotary_scaling_factor", 40.0), ("mscale", 0.707), ("mscale_all_dim", 0.707),
    ("original_max_position_embeddings", 16), ("qk_layernorm", True), ("q_lora_rank", 8))
CASES = [
    ("gpt", ShuffleCase(tp=4, ep=4, shape=SHAPE, config=DEEPSEEK, predictor="pregate", placement=ACROSS)),
    ("gpt", ShuffleCase(tp=4, ep=4, shape=SHAPE, config=DEEPSEEK, predictor="route", placement=ACROSS,
                        decode_steps=2, batch=3)),
    ("gpt", ShuffleCase(tp=2, ep=4, shape=MoEShape(**{**SHAPE.__dict__, "layers": 3}), config=DEEPSEEK,
                        predictor="history", seq=7, decode_steps=1)),
    ("gpt_sp", ShuffleCase(tp=4, ep=4, shape=SHAPE, config=DEEPSEEK, predictor="pregate", placement=ACROSS,
                           batch=3)),
    ("gpt_sp", ShuffleCase(tp=2, ep=2, shape=MoEShape(**{**SHAPE.__dict__, "layers": 3}), config=DEEPSEEK,
                           predictor="history", batch=3)),
    ("gpt_sp", ShuffleCase(tp=2, ep=4, shape=SHAPE, config=DEEPSEEK, predictor="route")),
    ("layers", ShuffleCase(tp=4, ep=4, shape=SHAPE, config=DEEPSEEK, predictor="pregate", placement=ACROSS)),
    ("gpt", ShuffleCase(tp=2, ep=2, shape=SHAPE, config=V2_ATTENTION, predictor="pregate", decode_steps=1)),
]


def _steps(case):
    return [case.seq * case.batch] + [case.batch] * case.decode_steps


def _extra_bytes(case):
    """Bytes the shuffle adds without sequence parallelism: the pad rows of the shuffled
    reduce-scatter and the deferred all-gather, and of the shared expert's all-gather and
    reduce-scatter over the C-row shards; with "history", k id columns on every layer's deferred
    all-gather."""
    extra = 0
    for t in _steps(case):
        t_pad = capacity_of(t, case.tp) * case.tp
        extra += case.shape.layers * 4 * ring_bytes("reduce_scatter", (t_pad - t) * case.shape.hidden * 4, case.tp)
        if case.predictor == "history":
            extra += case.shape.layers * ring_bytes("all_gather", t_pad * case.shape.topk * 4, case.tp)
    return extra


def _tp_bytes(calls, p):
    """Bytes one rank sends in a ring for the float TP collectives it issued (``testing.collectives``
    records every raw torch.distributed call; the expert all-to-all is not a TP collective)."""
    total = 0
    for c in calls:
        if c.name == "all_to_all_single" or c.dtype not in ("torch.float32", "torch.bfloat16", "torch.float16"):
            continue
        kind = ("all_reduce" if "all_reduce" in c.name else "reduce_scatter" if "reduce_scatter" in c.name
                else "all_gather" if "all_gather" in c.name else None)
        assert kind is not None, c
        total += ring_bytes(kind, c.payload_bytes, p)
    return total


def test_deepseek_style_shuffle_is_lossless():
    results = run_local(run_shuffle_cases, 4, CASES)
    for i, (kind, case) in enumerate(CASES):
        where = (kind, case.tp, case.ep, case.predictor)
        per_rank = [r[i] for r in results]
        for res in per_rank:
            assert res.max_out_diff <= TOL, (where, res.rank, res.max_out_diff)
            assert res.plans_agree, where
            assert res.plans == case.shape.layers * len(_steps(case)), where
            assert res.history_ok is (True if case.predictor == "history" else None), (where, res.history_ok)
            base, shuffled = _tp_bytes(res.tp_calls["ref"], case.tp), _tp_bytes(res.tp_calls["shuffle"], case.tp)
            assert base > 0 and shuffled > 0, where
            if kind == "gpt":
                # Without sequence parallelism: Megatron's bytes exactly, plus the pad rows (the
                # shared expert's all-gather + reduce-scatter replace its all-reduce).
                assert shuffled - base == _extra_bytes(case), (where, base, shuffled)
            else:
                # With it, fewer: Megatron's MLA all-gathers its sequence shard once per column
                # linear (q and kv down-projections) and again for the latent; the shuffle once.
                assert shuffled < base, (where, base, shuffled)
        tokens = sum(r.shuffle.tokens for r in per_rank)
        if case.predictor == "pregate":
            shuffle_remote = sum(r.shuffle.remote_pairs for r in per_rank) / tokens
            base_remote = sum(r.base.remote_pairs for r in per_rank) / sum(r.base.tokens for r in per_rank)
            assert shuffle_remote < base_remote, (where, shuffle_remote, base_remote)
