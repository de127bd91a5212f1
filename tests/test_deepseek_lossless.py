"""DeepSeek-style MoE layers through the specmoe dispatcher equal Megatron's alltoall (gloo, 4 ranks).

DeepSeek-style here: shared experts (also at TP = 2), group-limited routing
(moe_router_num_groups / moe_router_group_topk), sigmoid scores with an expert bias (aux-loss-free
router, the bias set nonzero so it takes part) and a top-k scaling factor; the GPT cases add
multi-latent attention and RMSNorm. The placement moves experts across router groups: in
dispatcher mode the router keeps its logical ids, so the function is kept although the groups'
rank blocks are broken (the node bound is what breaks, ``schedule.router_groups``).
"""

import numpy as np
import pytest

from megatron_specmoe.megatron.build import MoEShape
from megatron_specmoe.testing.lossless import LosslessCase, run_cases
from megatron_specmoe.testing.spawn import run_local

TOL = 1e-6
GROUPS, GROUP_TOPK = 4, 2
ROUTER = (
    ("moe_router_num_groups", GROUPS),
    ("moe_router_group_topk", GROUP_TOPK),
    ("moe_router_score_function", "sigmoid"),
    ("moe_router_enable_expert_bias", True),
    ("moe_router_topk_scaling_factor", 2.5),
)
MLA = (
    ("multi_latent_attention", True),
    ("q_lora_rank", None),
    ("kv_lora_rank", 8),
    ("qk_head_dim", 8),
    ("qk_pos_emb_head_dim", 4),
    ("v_head_dim", 8),
    ("rope_type", "rope"),
    ("normalization", "RMSNorm"),
)
SHAPE = MoEShape(hidden=16, ffn=8, experts=16, topk=4, shared_ffn=24)
# Crosses the router groups ({0..3}, {4..7}, ...): slot block 0 holds experts of groups 2, 0, 3, 1.
ACROSS = (9, 2, 14, 5, 0, 11, 7, 12, 3, 15, 6, 1, 10, 4, 13, 8)
CASES = [
    ("layer", LosslessCase(tp=2, ep=2, shape=SHAPE, placement=ACROSS, config=ROUTER)),
    ("layer", LosslessCase(tp=1, ep=4, shape=SHAPE, placement=ACROSS, config=ROUTER, via="hook", ragged=True)),
    ("layer", LosslessCase(tp=4, ep=4, shape=SHAPE, config=ROUTER, seq=4)),
    ("gpt", LosslessCase(tp=2, ep=2, seq=8, shape=MoEShape(**{**SHAPE.__dict__, "layers": 2}), placement=ACROSS,
                         config=ROUTER + MLA)),
    ("gpt", LosslessCase(tp=1, ep=4, seq=8, shape=MoEShape(**{**SHAPE.__dict__, "layers": 2}), placement=ACROSS,
                         config=ROUTER + MLA)),
]


def test_deepseek_style_layers_are_lossless():
    results = run_local(run_cases, 4, CASES)
    for index, (kind, case) in enumerate(CASES):
        for rank_results in results:
            res = rank_results[index]
            assert res.max_out_diff <= TOL, (kind, index, res.rank, res.max_out_diff)
            assert res.max_grad_diff <= TOL, (kind, index, res.rank, res.max_grad_diff)
            assert len(res.reports) == case.shape.layers
            if kind == "layer":
                # Group-limited routing really ran: no token's experts span more than M groups.
                groups = np.sort(np.asarray(res.routes[0]) // (case.shape.experts // GROUPS), axis=1)
                distinct = 1 + (groups[:, 1:] != groups[:, :-1]).sum(axis=1)
                assert distinct.max() <= GROUP_TOPK and distinct.min() >= 1
                assert res.routes[0].shape == (res.tokens, case.shape.topk)
