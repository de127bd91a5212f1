"""The shipped DeepSeek-style model: its card and files, its routing (top-6 of 64 in at most 2 of 4
router groups, learned), its traces, and sharded loading (MLA, shared expert, expert bias) that
computes the single-process logits at TP 2 x EP 2 and TP 4 x EP 4 on 4 gloo ranks, fp32."""

import os
import warnings

import numpy as np
import torch

from megatron_specmoe.megatron import checkpoint
from megatron_specmoe.testing.spawn import run_local

TOL = 1e-5
SEQ, BATCH = 24, 2
PATH = checkpoint.demo_model_dir("deepseek-style")


def _tokens(dp_rank: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(2000 + dp_rank))


def _logits_and_routes(model, tokens):
    from megatron_specmoe.megatron.route_recorder import RouteRecorder

    rec = RouteRecorder.attach(model)
    pos = torch.arange(SEQ).unsqueeze(0).expand(BATCH, -1)
    mask = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1)
    with torch.no_grad():
        logits = model(tokens, pos, mask).float().numpy()
    rec.detach()
    return logits, rec.routes()


def _run(rank, world_size, layouts):
    from megatron.core import parallel_state

    from megatron_specmoe.megatron import cpu_support, parallel

    warnings.filterwarnings("ignore")
    cpu_support.enable()
    out = []
    for tp, ep in layouts:
        parallel.initialize(parallel.ParallelLayout(tp=tp, ep=ep))
        try:
            model = checkpoint.load_model(PATH, tp=tp, ep=ep)
            dp = parallel_state.get_data_parallel_rank()
            logits, routes = _logits_and_routes(model, _tokens(dp, checkpoint.read_card(PATH).shape.vocab))
            out.append(dict(tp=tp, ep=ep, dp=dp, logits=logits, routes=routes))
        finally:
            parallel.destroy()
    return out


def test_card_files_and_validation_loss():
    card = checkpoint.read_card(PATH)
    shape, cfg = card.shape, card.config
    assert (shape.experts, shape.topk, shape.shared_ffn) == (64, 6, 64)
    assert cfg["multi_latent_attention"] and cfg["moe_router_enable_expert_bias"]
    assert (cfg["moe_router_num_groups"], cfg["moe_router_group_topk"]) == (4, 2)
    assert checkpoint.sha256_file(card.tokenizer_path) == card.tokenizer_sha256
    state = checkpoint.read_weights(card)  # sha256 and dtype
    assert any(k.endswith("linear_kv_down_proj.weight") for k in state)
    assert any(".shared_experts." in k for k in state)
    bias = state["decoder.layers.0.mlp.router.expert_bias"].float()
    assert bias.abs().max() > 0  # the aux-loss-free bias was trained
    training = card.training
    assert training["val_loss"] < training["unigram_ce"] - 2.0
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(PATH) for f in fs)
    assert size < 8e6


def test_traces_have_token_ids_and_group_limited_routes():
    from megatron_specmoe.artifacts.trace_io import read_trace

    for split in ("calibration", "evaluation"):
        trace = read_trace(os.path.join(PATH, "traces", f"deepseek-style-{split}.npz"))
        assert (trace.num_experts, trace.num_layers, trace.topk) == (64, 4, 6)
        assert trace.token_ids is not None and trace.token_ids.shape == (trace.num_tokens,)
        groups = np.sort(trace.experts.astype(np.int64) // 16, axis=2)
        distinct = 1 + (groups[..., 1:] != groups[..., :-1]).sum(axis=2)
        assert distinct.max() == 2  # moe_router_group_topk


def test_sharded_logits_match_single_process():
    card = checkpoint.read_card(PATH)
    ref_by_dp = run_local(_reference_per_dp, 1, 4)[0]
    for per_layout in run_local(_run, 4, ((2, 2), (4, 4))):
        for res in per_layout:
            want_logits, want_routes = ref_by_dp[res["dp"]]
            assert res["logits"].shape == (BATCH, SEQ, card.shape.vocab)
            diff = float(np.abs(res["logits"] - want_logits).max())
            assert diff <= TOL, (res["tp"], res["ep"], diff)
            np.testing.assert_array_equal(res["routes"], want_routes)


def _reference_per_dp(rank, world_size, count):
    from megatron_specmoe.megatron import cpu_support, parallel

    warnings.filterwarnings("ignore")
    cpu_support.enable()
    parallel.initialize(parallel.ParallelLayout())
    try:
        model = checkpoint.load_model(PATH)
        vocab = checkpoint.read_card(PATH).shape.vocab
        return [_logits_and_routes(model, _tokens(dp, vocab)) for dp in range(count)]
    finally:
        parallel.destroy()
