"""Rank scores from router logits: hand-worked counts, ties, the TP span, numpy vs torch."""

from __future__ import annotations

import pytest
import torch

from megatron_specmoe.predict.pregate import topk_rank_scores

BOTH = [True, False]  # numpy_on_cpu: the numpy version, then the torch one


@pytest.mark.parametrize("numpy_on_cpu", BOTH)
def test_hand_worked_counts_and_ties(numpy_on_cpu):
    # Experts 0, 1 on rank 0 and 2, 3 on rank 1; k = 2. Token 0 takes experts 0, 1; token 1
    # takes 3, 2; token 2 has four equal logits and takes the lower experts 0, 1; token 3 takes
    # 2 then (a tie of 0 and 3) 0.
    logits = torch.tensor([[3.0, 2, 1, 0], [0, 1, 2, 3], [1, 1, 1, 1], [0.5, -1, 2, 0.5]])
    got = topk_rank_scores(logits, k=2, rank_of=torch.tensor([0, 0, 1, 1]), ep_base=0, tp=2,
                           numpy_on_cpu=numpy_on_cpu)
    assert got.dtype == torch.float32
    assert got.tolist() == [[2, 0], [0, 2], [2, 0], [1, 1]]


@pytest.mark.parametrize("numpy_on_cpu", BOTH)
def test_experts_outside_the_tp_span_count_nowhere(numpy_on_cpu):
    # EP = 4, one expert per EP rank; this TP group spans EP ranks 2 and 3 (ep_base 2).
    logits = torch.tensor([[3.0, 2, 1, 0], [0, 1, 2, 3], [0, 3, 2, 1]])
    got = topk_rank_scores(logits, k=2, rank_of=torch.tensor([0, 1, 2, 3]), ep_base=2, tp=2,
                           numpy_on_cpu=numpy_on_cpu)
    assert got.tolist() == [[0, 0], [1, 1], [1, 0]]


@pytest.mark.parametrize("numpy_on_cpu", BOTH)
def test_minus_infinity_logits_are_still_taken_once(numpy_on_cpu):
    # Token 0 takes expert 2, then the first of the -inf ones (expert 0), never expert 2 again.
    logits = torch.tensor([[float("-inf"), float("-inf"), 5.0, float("-inf")]])
    got = topk_rank_scores(logits, k=2, rank_of=torch.tensor([0, 1, 1, 1]), ep_base=0, tp=2,
                           numpy_on_cpu=numpy_on_cpu)
    assert got.tolist() == [[1, 1]]
    got = topk_rank_scores(logits, k=4, rank_of=torch.tensor([0, 1, 1, 1]), ep_base=0, tp=2,
                           numpy_on_cpu=numpy_on_cpu)
    assert got.tolist() == [[1, 3]]


@pytest.mark.parametrize("tokens,experts,k,tp,ep_base,ep", [(500, 8, 2, 8, 0, 8), (300, 64, 6, 4, 4, 16),
                                                             (77, 16, 4, 2, 6, 8)])
def test_matches_topk_on_tie_free_logits_on_both_paths(tokens, experts, k, tp, ep_base, ep):
    gen = torch.Generator().manual_seed(tokens)
    logits = torch.randn(tokens, experts, generator=gen)  # no ties
    rank_of = torch.arange(experts) * ep // experts
    top = torch.topk(logits, k, dim=1).indices
    local = rank_of[top] - ep_base
    want = torch.zeros(tokens, tp).scatter_add_(1, local.clamp(0, tp - 1), ((local >= 0) & (local < tp)).float())
    for numpy_on_cpu in BOTH:
        got = topk_rank_scores(logits, k=k, rank_of=rank_of, ep_base=ep_base, tp=tp, numpy_on_cpu=numpy_on_cpu)
        assert torch.equal(got, want), numpy_on_cpu


def test_bad_input_errors():
    logits = torch.zeros(3, 4)
    rank_of = torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match=r"logits must be \[T, E\]"):
        topk_rank_scores(torch.zeros(4), k=1, rank_of=rank_of, ep_base=0, tp=2)
    with pytest.raises(ValueError, match="k=5 must be in 1 .. E=4"):
        topk_rank_scores(logits, k=5, rank_of=rank_of, ep_base=0, tp=2)
    with pytest.raises(ValueError, match=r"rank_of must have shape \(4,\)"):
        topk_rank_scores(logits, k=2, rank_of=torch.tensor([0, 1]), ep_base=0, tp=2)
    with pytest.raises(ValueError, match="tp must be >= 1"):
        topk_rank_scores(logits, k=2, rank_of=rank_of, ep_base=0, tp=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    logits = torch.randn(1000, 8, generator=torch.Generator().manual_seed(1)).round(decimals=1)  # ties
    rank_of = torch.arange(8) // 2
    cpu = topk_rank_scores(logits, k=2, rank_of=rank_of, ep_base=0, tp=4)
    gpu = topk_rank_scores(logits.cuda(), k=2, rank_of=rank_of.cuda(), ep_base=0, tp=4)
    assert torch.equal(gpu.cpu(), cpu)


@pytest.mark.parametrize("numpy_on_cpu", BOTH)
def test_top_experts_then_counts_equal_topk_rank_scores(numpy_on_cpu):
    from megatron_specmoe.predict.pregate import expert_rank_counts, top_experts

    logits = torch.tensor([[3.0, 2, 1, 0], [0, 1, 2, 3], [1, 1, 1, 1], [0.5, -1, 2, 0.5]])
    ids = top_experts(logits, 2, numpy_on_cpu=numpy_on_cpu)
    assert ids.dtype == torch.int64 and ids.tolist() == [[0, 1], [3, 2], [0, 1], [2, 0]]
    gen = torch.Generator().manual_seed(3)
    rand = torch.randn(200, 8, generator=gen).round(decimals=1)  # rounded: many ties
    rank_of = torch.tensor([1, 0, 3, 2, 2, 1, 0, 3])
    for ep_base, tp in ((0, 4), (2, 2)):
        want = topk_rank_scores(rand, k=3, rank_of=rank_of, ep_base=ep_base, tp=tp)
        got = expert_rank_counts(top_experts(rand, 3, numpy_on_cpu=numpy_on_cpu), rank_of=rank_of,
                                 ep_base=ep_base, tp=tp)
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match=r"top_experts: logits must be \[T, E\] with 1 <= k <= E"):
        top_experts(logits, 5)


def test_span_hosts_marks_the_experts_each_tp_rank_of_the_span_hosts():
    from megatron_specmoe.predict.pregate import span_hosts

    # EP ranks of experts 0..4: [2, 0, 3, 2, 1]; the span is EP ranks 2, 3 (ep_base 2, TP 2).
    got = span_hosts(torch.tensor([2, 0, 3, 2, 1]), ep_base=2, tp=2)
    assert got.dtype == torch.float32
    assert got.tolist() == [[1, 0], [0, 0], [0, 1], [1, 0], [0, 0]]
