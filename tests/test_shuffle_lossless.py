"""s-TS inside Megatron's transformer layer is lossless, moves the same TP bytes, and cuts remote
pairs: fp32 on 4 gloo ranks, one set of processes for all cases.

Every case compares three models with identical weights on identical inputs (see
``testing.shuffle_lossless``): Megatron with ``alltoall`` (the outputs to match), Megatron's layers
with the specmoe dispatcher (what alltoall sends, by the dispatcher's own accounting), and the
shuffle layers.
"""

import pytest

from megatron_specmoe.comm.shuffle import ring_bytes
from megatron_specmoe.testing.spawn import run_local
from megatron_specmoe.megatron.build import MoEShape
from megatron_specmoe.testing.shuffle_lossless import ShuffleCase, run_shuffle_cases
from megatron_specmoe.schedule.assignment import capacity_of

TOL = 1e-5
WORLD = 4
PERMUTED = (5, 2, 7, 0, 1, 6, 3, 4)

CASES = [
    # Sequence parallel off, whole GPT model (logits).
    ("gpt", ShuffleCase(tp=4, ep=4, predictor="pregate", placement=PERMUTED)),
    ("gpt", ShuffleCase(tp=4, ep=4, predictor="random")),
    ("gpt", ShuffleCase(tp=4, ep=4, predictor="adversarial", seq=7, batch=2)),  # T = 14: padding
    ("gpt", ShuffleCase(tp=2, ep=2, predictor="pregate", batch=3)),  # DP = 2
    ("gpt", ShuffleCase(tp=2, ep=4, predictor="pregate", method="greedy")),  # TP group = half the EP group
    ("gpt", ShuffleCase(tp=4, ep=4, predictor="pregate", method="refine", seq=7, batch=2)),  # the reference method
    # Prefill, then decode steps with a KV cache (T = 3 < P = 4: one rank has no real token).
    ("gpt", ShuffleCase(tp=4, ep=4, predictor="pregate", batch=3, decode_steps=2)),
    # A fitted route predictor on token ids (a stand-in table), prefill + decode.
    ("gpt", ShuffleCase(tp=4, ep=4, predictor="route", placement=PERMUTED, decode_steps=1)),
    # A fitted history MLP on the routes carried along with the all-gathers, prefill + decode.
    ("gpt", ShuffleCase(tp=4, ep=4, predictor="history", placement=PERMUTED, seq=7, decode_steps=1,
                        shape=MoEShape(layers=3))),
    # Sequence parallel on, whole GPT model (logits in true order through the output layer's
    # own all-gather) ...
    ("gpt_sp", ShuffleCase(tp=4, ep=4, predictor="pregate", placement=PERMUTED)),
    ("gpt_sp", ShuffleCase(tp=2, ep=2, predictor="adversarial", batch=3)),
    ("gpt_sp", ShuffleCase(tp=2, ep=4, predictor="route")),
    ("gpt_sp", ShuffleCase(tp=4, ep=4, predictor="history", shape=MoEShape(layers=3))),
    # ... and a stack of layers from Megatron's contiguous shard, back with restore_true_order.
    ("layers", ShuffleCase(tp=4, ep=4, predictor="pregate", placement=PERMUTED)),
    ("layers", ShuffleCase(tp=2, ep=2, predictor="random", seq=6, batch=3)),
    # Refused: shared experts overlapped with the dispatcher; EP (2) not a multiple of TP (4); a sequence-parallel
    # model whose output nobody brings back to true order.
    ("refuse", ShuffleCase(tp=4, ep=2, shape=MoEShape(layers=1))),
]


def _steps(case):
    """Tokens T of each forward: the prefill, then one token per sequence per decode step."""
    return [case.seq * case.batch] + [case.batch] * case.decode_steps


def _tp_bytes_expected_extra(case, kind):
    """Bytes the shuffle sends beyond Megatron: the pad rows (none when P divides T), and k fp32 id
    columns on the all-gathers that carry ids: with "history", every layer's deferred all-gather
    without sequence parallelism, the next layer's input all-gather with it (the last layer's
    routes are not needed, so L - 1); with "pregate" / "adversarial" and sequence parallelism,
    every layer's input all-gather (each rank's gate on its own rows)."""
    extra = 0
    for t in _steps(case):
        t_pad = capacity_of(t, case.tp) * case.tp
        extra += case.shape.layers * 2 * ring_bytes("reduce_scatter", (t_pad - t) * case.shape.hidden * 4, case.tp)
        if case.predictor == "history":
            carrying = case.shape.layers if kind == "gpt" else case.shape.layers - 1
            extra += carrying * ring_bytes("all_gather", t_pad * case.shape.topk * 4, case.tp)
        if kind != "gpt" and case.predictor in ("pregate", "adversarial"):
            # Sequence parallel: every layer's input all-gather carries the k gate ids per row.
            extra += case.shape.layers * ring_bytes("all_gather", t_pad * case.shape.topk * 4, case.tp)
    return extra


def _shuffle_tokens(case):
    """Tokens routed per TP group: every real token once, plus one zero row on each rank that has
    no real token (T < P), which still takes part in the EP collectives."""
    return sum(t + max(0, case.tp - t) for t in _steps(case)) * case.shape.layers


def test_shuffle_lossless_four_ranks():
    _check(run_local(run_shuffle_cases, WORLD, CASES), CASES, WORLD)


@pytest.mark.slow
def test_shuffle_lossless_eight_ranks():
    """TP = EP = 8 at tiny sizes: decode with T = 2 < P (six ranks route only a zero row), and
    sequence parallelism with adversarial predictions."""
    shape = MoEShape(layers=2, heads=8)
    cases = [
        ("gpt", ShuffleCase(tp=8, ep=8, predictor="pregate", seq=5, batch=2, decode_steps=1, shape=shape)),
        ("gpt_sp", ShuffleCase(tp=8, ep=8, predictor="adversarial", seq=8, batch=2, shape=shape)),
    ]
    _check(run_local(run_shuffle_cases, 8, cases), cases, 8)


def _check(results, cases, world):
    for i, (kind, case) in enumerate(cases):
        per_rank = [r[i] for r in results]
        if kind == "refuse":
            for shared_msg, ep_msg, order_msg in per_rank:
                assert "moe_shared_expert_overlap must be False" in shared_msg
                assert "EP size 2 is not a multiple of TP size 4" in ep_msg
                assert "leaves tokens in shuffled order; call shuffle_specs.true_order_output" in order_msg
            continue
        where = (kind, case.tp, case.ep, case.predictor)
        dp = world // case.tp
        for res in per_rank:
            # Lossless, whatever the predictions.
            assert res.max_out_diff <= TOL, (where, res.rank, res.max_out_diff)
            # Every TP rank computed the identical plan, once per layer.
            assert res.plans_agree, where
            assert res.plans == case.shape.layers * len(_steps(case)), where
            # Same TP bytes as Megatron (plus pad rows only).
            base, shuf = sum(res.base_tp_bytes.values()), sum(res.shuffle_tp_bytes.values())
            assert base > 0, where
            assert shuf - base == _tp_bytes_expected_extra(case, kind), (where, res.base_tp_bytes, res.shuffle_tp_bytes)
            # The carried route history is Megatron's own routes, token for token.
            assert res.history_ok is (True if case.predictor == "history" else None), (where, res.history_ok)
        # Accounting: the shuffle routes every real token exactly once per layer ...
        shuffle_tokens = sum(r.shuffle.tokens for r in per_rank)
        assert shuffle_tokens == dp * _shuffle_tokens(case), where
        base_tokens = sum(r.base.tokens for r in per_rank)
        # ... Megatron without sequence parallelism routes a full copy on every TP rank.
        copies = world if kind == "gpt" else dp
        assert base_tokens == copies * sum(_steps(case)) * case.shape.layers, where
        shuffle_remote = sum(r.shuffle.remote_pairs for r in per_rank) / shuffle_tokens
        base_remote = sum(r.base.remote_pairs for r in per_rank) / base_tokens
        if case.predictor == "pregate":
            assert shuffle_remote < base_remote, (where, shuffle_remote, base_remote)
        if case.predictor == "adversarial":
            assert shuffle_remote > base_remote, (where, shuffle_remote, base_remote)
