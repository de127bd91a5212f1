"""s-TS inside Megatron's transformer layer is lossless, moves the same TP bytes, and cuts remote
pairs: fp32 on 4 gloo ranks, one set of processes for all cases.

Collectives are counted at the raw ``torch.distributed`` functions (``testing.collectives``), for
the reference and for the shuffle model, and compared call by call with what this file works out
by hand from the case (``_expected_tp_calls``), not with the library's own byte counter. Every plan
every rank used is checked here too: a permutation, its inverse, no rank over capacity, the
shards agree with the home ranks, identical on every rank of a TP group. Two mutants of the
library (``testing.mutants``) run with the cases and must fail these checks while staying
lossless.

Every case compares three models with identical weights on identical inputs (see
``testing.shuffle_lossless``): Megatron with ``alltoall`` (the outputs to match), Megatron's layers
with the specmoe dispatcher (what alltoall sends, by the dispatcher's own accounting), and the
shuffle layers.
"""

from collections import Counter

import pytest

from megatron_specmoe.megatron.build import MoEShape
from megatron_specmoe.testing.shuffle_lossless import ShuffleCase, run_shuffle_cases
from megatron_specmoe.testing.spawn import run_local

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
    # Every token predicted to TP rank 0 (experts 0 and 1, contiguous): the plan must overflow.
    ("gpt", ShuffleCase(tp=4, ep=4, predictor="route", route_stand_in="one_rank", decode_steps=1)),
    # A fitted history MLP on the routes carried along with the all-gathers, prefill + decode.
    ("gpt", ShuffleCase(tp=4, ep=4, predictor="history", placement=PERMUTED, seq=7, decode_steps=1,
                        shape=MoEShape(layers=3))),
    # Sequence parallel on, whole GPT model (logits in true order through the output layer's
    # own all-gather) ...
    ("gpt_sp", ShuffleCase(tp=4, ep=4, predictor="pregate", placement=PERMUTED)),
    ("gpt_sp", ShuffleCase(tp=2, ep=2, predictor="adversarial", batch=3)),
    ("gpt_sp", ShuffleCase(tp=2, ep=4, predictor="route")),
    # Shared plans (route, sequence parallel, CPU: "auto" shares): a rank that makes no plan (3
    # layers, P = 4); two plans per rank (3 layers, P = 2) against the same case with every rank
    # making every plan ("off"): the same plans.
    ("gpt_sp", ShuffleCase(tp=4, ep=4, predictor="route", placement=PERMUTED, shape=MoEShape(layers=3))),
    ("gpt_sp", ShuffleCase(tp=2, ep=2, predictor="route", share_plans="on", shape=MoEShape(layers=3))),
    ("gpt_sp", ShuffleCase(tp=2, ep=2, predictor="route", share_plans="off", shape=MoEShape(layers=3))),
    ("gpt_sp", ShuffleCase(tp=4, ep=4, predictor="history", shape=MoEShape(layers=3))),
    # ... and a stack of layers from Megatron's contiguous shard, back with restore_true_order.
    ("layers", ShuffleCase(tp=4, ep=4, predictor="pregate", placement=PERMUTED)),
    ("layers", ShuffleCase(tp=2, ep=2, predictor="random", seq=6, batch=3)),
    # Refused: shared experts overlapped with the dispatcher; EP (2) not a multiple of TP (4); a sequence-parallel
    # model whose output nobody brings back to true order.
    ("refuse", ShuffleCase(tp=4, ep=2, shape=MoEShape(layers=1))),
]


# Mutants of the library: lossless, but each must fail the checks below.
MUTANTS = [
    ("gpt", ShuffleCase(tp=4, ep=4, predictor="pregate", shape=MoEShape(layers=1), mutant="reduce_scatter_twice")),
    ("gpt", ShuffleCase(tp=2, ep=2, predictor="pregate", shape=MoEShape(layers=1), mutant="over_capacity")),
]
F32 = "torch.float32"


def _steps(case):
    """Tokens T of each forward: the prefill, then one token per sequence per decode step."""
    return [case.seq * case.batch] + [case.batch] * case.decode_steps


def _ceil(a, b):
    return -(-a // b)


def _expected_tp_calls(case, kind, model, logit_rows=()):
    """The float collectives one rank issues on its TP group, worked out from the model's
    structure (all fp32, H hidden, k top-k, V vocabulary, P = TP, T tokens of a forward,
    T_pad = P * ceil(T / P)), as a multiset of (function, payload bytes, dtype); payloads are full
    tensors (``CollectiveCall.payload_bytes``).

    Megatron ("ref"), sequence parallelism off: the vocab-parallel embedding all-reduces [T, H];
    every layer's output projection all-reduces [T, H]; with a KV cache the logits [T, V] are
    all-gathered (runtime_gather_output; ``logit_rows`` says how many rows Megatron materialised:
    the whole prefill on core 0.19, its last token on 0.16). On: the embedding reduce-scatters [T, H]; every layer
    all-gathers its input [T, H] and reduce-scatters its projection [T, H]; the output layer
    all-gathers [T, H]. The MoE layers (ETP = 1) add no float TP collective.

    The shuffle: each projection all-reduce (or reduce-scatter) becomes one reduce-scatter of
    [T_pad, H], and the next all-gather (the deferred one; the next layer's input one with
    sequence parallelism; the output layer's) gathers [T_pad, H + ids] where ids = k when the
    rows carry expert ids: "history" (every layer without sequence parallelism; every layer but
    the first with it, the ids of the layer before) and "pregate"/"adversarial" with sequence
    parallelism (each rank's gate ids, every layer). Shared plans (route with sequence
    parallelism, share_plans not "off") add P * ceil(layers / P) columns to the first layer's
    all-gather: each rank's share of the plans' home ranks. The embedding and the logits are Megatron's.
    """
    h, k, layers, v, p = case.shape.hidden, case.shape.topk, case.shape.layers, case.shape.vocab, case.tp
    shared = p * _ceil(layers, p) if _shares(case, kind) else 0
    calls = Counter()

    def add(name, rows, cols):
        calls[(name, rows * cols * 4, F32)] += 1

    for step, t in enumerate(_steps(case)):
        t_pad = p * _ceil(t, p)
        if kind == "gpt":
            add("all_reduce", t, h)
            for _ in range(layers):
                if model == "ref":
                    add("all_reduce", t, h)
                else:
                    add("reduce_scatter_tensor", t_pad, h)
                    add("all_gather_into_tensor", t_pad, h + (k if case.predictor == "history" else 0))
            if case.decode_steps:
                add("all_gather_into_tensor", logit_rows[step], v)
            continue
        if kind == "gpt_sp":
            add("reduce_scatter_tensor", t, h)
        for layer in range(layers):
            if model == "ref":
                add("all_gather_into_tensor", t, h)
                add("reduce_scatter_tensor", t, h)
            else:
                gate_ids = case.predictor in ("pregate", "adversarial")
                history_ids = case.predictor == "history" and layer > 0
                add("all_gather_into_tensor", t_pad, h + (k if gate_ids or history_ids else 0) + (shared if layer == 0 else 0))
                add("reduce_scatter_tensor", t_pad, h)
        if kind == "gpt_sp":
            add("all_gather_into_tensor", t_pad if model == "shuffle" else t, h)
    return calls


def _shares(case, kind):
    """Whether the case's forwards share their plans (``megatron/shared_plans.py``)."""
    return kind == "gpt_sp" and case.predictor == "route" and case.share_plans != "off" and case.tp > 1


def _float_tp_calls(calls):
    """The measured calls as the same multiset: float payloads, the EP all-to-alls left out (they
    run on the TP group's ranks when TP = EP; the dispatcher accounting checks them)."""
    return Counter((c.name, c.payload_bytes, c.dtype) for c in calls
                   if c.name != "all_to_all_single" and c.dtype in (F32, "torch.bfloat16", "torch.float16"))


def _ring_sent(calls, p):
    """Bytes one rank sends for these calls in a ring: (P-1)/P of the payload for a
    reduce-scatter or an all-gather, twice that for an all-reduce."""
    return sum(n * (p - 1) // p * (2 if name == "all_reduce" else 1) * count for (name, n, _), count in calls.items())


def _shuffle_tokens(case):
    """Tokens routed per TP group: every real token once, plus one zero row on each rank that has
    no real token (T < P), which still takes part in the EP collectives."""
    return sum(t + max(0, case.tp - t) for t in _steps(case)) * case.shape.layers


def _check_plans(per_rank, case, world, where):
    """Every plan: C = ceil(T/P); order a permutation of 0..T_pad-1 and inverse its inverse; no rank
    given more than C real tokens, all T placed; each shard's real rows are homed on that shard's
    rank; and every rank of a TP group (contiguous global ranks) used the same plans."""
    for group in range(world // case.tp):
        members = per_rank[group * case.tp:(group + 1) * case.tp]
        plans = members[0].plan_rows
        assert len(plans) == case.shape.layers * len(_steps(case)), where
        for other in members[1:]:
            assert other.plan_rows == plans, (where, "plans differ across the TP group")
        for plan in plans:
            t, p, c = plan.num_tokens, plan.num_ranks, plan.capacity
            assert p == case.tp and c == _ceil(t, p), (where, plan)
            assert sorted(plan.order) == list(range(p * c)), (where, "order is not a permutation")
            assert all(plan.inverse[j] == i for i, j in enumerate(plan.order)), (where, "inverse")
            per = Counter(plan.home_rank)
            assert sum(per.values()) == t and max(per.values(), default=0) <= c, (where, "over capacity", dict(per), c)
            for row, token in enumerate(plan.order):
                if token < t:
                    assert plan.home_rank[token] == row // c, (where, "shard and home rank disagree", row, token)
            if case.route_stand_in == "one_rank":
                assert per[0] == c, (where, "rank 0 is predicted for every token and must be full", dict(per))


def _check_case(kind, case, per_rank, world):
    if kind == "refuse":
        for shared_msg, ep_msg, order_msg in per_rank:
            assert "moe_shared_expert_overlap must be False" in shared_msg
            assert "EP size 2 is not a multiple of TP size 4" in ep_msg
            assert "leaves tokens in shuffled order; call shuffle_specs.true_order_output" in order_msg
        return
    where = (kind, case.tp, case.ep, case.predictor, case.mutant)
    dp = world // case.tp
    for res in per_rank:
        # Lossless, whatever the predictions.
        assert res.max_out_diff <= TOL, (where, res.rank, res.max_out_diff)
        assert res.plans_agree, where
        assert res.plans == case.shape.layers * len(_steps(case)), where
        # Shared plans: each rank makes its share, layers j = rank mod P; else every plan.
        mine = len(range(res.rank % case.tp, case.shape.layers, case.tp)) if _shares(case, kind) else case.shape.layers
        assert res.plans_made == mine * len(_steps(case)), (where, res.rank, res.plans_made)
        # Same collectives and bytes as worked out by hand, for Megatron and for the shuffle, and
        # Megatron's layers with the specmoe dispatcher issue exactly Megatron's.
        measured = {name: _float_tp_calls(calls) for name, calls in res.tp_calls.items()}
        for model in ("ref", "shuffle"):
            want = _expected_tp_calls(case, kind, model, res.logit_rows)
            assert measured[model] == want, (where, model, "TP collectives", measured[model], want)
        assert measured["base"] == measured["ref"], where
        # Same bytes on the wire where there is neither a pad row nor an id column to carry.
        pads = any(t % case.tp for t in _steps(case))
        carries = case.predictor == "history" or (kind != "gpt" and case.predictor in ("pregate", "adversarial")) \
            or _shares(case, kind)
        if not pads and not carries:
            assert _ring_sent(measured["shuffle"], case.tp) == _ring_sent(measured["ref"], case.tp), where
        # The carried route history is Megatron's own routes, token for token.
        assert res.history_ok is (True if case.predictor == "history" else None), (where, res.history_ok)
        # The layers reused the carrier's buffers (comm/workspace.py) for their rows in flight.
        if kind in ("gpt", "gpt_sp"):
            assert res.workspace_bytes > 0, where
    _check_plans(per_rank, case, world, where)
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


def _check(results, cases, world):
    for i, (kind, case) in enumerate(cases):
        _check_case(kind, case, [r[i] for r in results], world)


@pytest.fixture(scope="module")
def four_rank_results():
    """CASES and MUTANTS in one set of 4 processes."""
    return run_local(run_shuffle_cases, WORLD, CASES + MUTANTS)


def test_shuffle_lossless_four_ranks(four_rank_results):
    _check([r[: len(CASES)] for r in four_rank_results], CASES, WORLD)


def test_shared_plans_are_the_plans_every_rank_makes(four_rank_results):
    """share_plans="on" (each rank makes its share, gathered with the first layer's input) and
    "off" (every rank makes every plan) use the same plans, bit for bit, on every rank."""
    on, off = (CASES.index(("gpt_sp", ShuffleCase(tp=2, ep=2, predictor="route", share_plans=s,
                                                  shape=MoEShape(layers=3)))) for s in ("on", "off"))
    for r in four_rank_results:
        assert r[on].plan_rows and r[on].plan_rows == r[off].plan_rows
        assert (r[on].plans_made, r[off].plans_made) == ((2, 3) if r[on].rank % 2 == 0 else (1, 3))


@pytest.mark.parametrize("index, pattern", [(0, "TP collectives"), (1, "over capacity")])
def test_mutants_stay_lossless_and_fail_the_checks(four_rank_results, index, pattern):
    """reduce_scatter_twice: the shuffle's own counter sees one reduce-scatter per layer, the raw
    count two. over_capacity: rank 0 gets C + 1 tokens; the outputs are still right."""
    kind, case = MUTANTS[index]
    per_rank = [r[len(CASES) + index] for r in four_rank_results]
    assert all(res.max_out_diff <= TOL for res in per_rank)
    with pytest.raises(AssertionError, match=pattern):
        _check_case(kind, case, per_rank, WORLD)


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
