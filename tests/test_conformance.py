"""Conformance: a ``MoELayer`` with ``specmoe`` computes what Megatron's ``alltoall`` computes, forward
and backward, over the matrix Megatron's own dispatcher and MoE-layer tests cover (our cases, not
theirs): TP / EP / ETP layouts including ETP > 1, capacity factor with token dropping (no padding;
both drop policies), router padding for quantization, fp16 and bf16, activation recompute, and
permuted placements. 4 gloo ranks, one set of processes for every case (``testing.conformance``).

Compared per rank: the output, the input gradient, the router weight gradient and every expert's
weight gradients (by logical expert). Tolerances, relative to the reference's largest magnitude of
the same tensor: fp32 1e-6; bf16 2^-8 and fp16 2^-11 (one unit in the last place at that magnitude).
On the CPU the two dispatchers have so far agreed bit for bit in every case. A control case gives
the specmoe layer a permuted placement with unpermuted experts and must fail the comparison.
"""

import math

import pytest

from megatron_specmoe.megatron.build import MoEShape
from megatron_specmoe.testing.conformance import ConformanceCase, run_conformance_cases
from megatron_specmoe.testing.spawn import run_local

WORLD = 4
PERMUTED = (5, 2, 7, 0, 1, 6, 3, 4)
TOL = {"fp32": 1e-6, "bf16": 2.0 ** -8, "fp16": 2.0 ** -11}
PAD_MULTIPLE = 16  # Megatron's fp8 alignment (delayed / current scaling recipes)

CASES = [
    # Layouts (world 4 = TP x DP = ETP x EP x EDP).
    ConformanceCase(name="tp1 ep4"),
    ConformanceCase(name="tp1 ep4 permuted", placement=PERMUTED),
    ConformanceCase(name="tp2 ep2 permuted", tp=2, ep=2, placement=PERMUTED),
    ConformanceCase(name="tp4 ep1 etp4", tp=4, ep=1, etp=4),
    ConformanceCase(name="tp1 ep1 etp4", ep=1, etp=4),
    ConformanceCase(name="tp1 ep2 etp2 permuted", ep=2, etp=2, placement=PERMUTED),
    ConformanceCase(name="tp2 ep2 etp2 permuted", tp=2, ep=2, etp=2, placement=PERMUTED),
    # Capacity factor with dropping, no padding to capacity.
    ConformanceCase(name="capacity probs", placement=PERMUTED, capacity_factor=0.5),
    ConformanceCase(name="capacity position etp2", tp=2, ep=2, etp=2, placement=PERMUTED,
                    capacity_factor=0.5, drop_policy="position"),
    # Router padding for quantization.
    ConformanceCase(name="router padding", placement=PERMUTED, router_padding=True),
    ConformanceCase(name="router padding etp2", ep=2, etp=2, placement=PERMUTED, router_padding=True),
    # Half precision.
    ConformanceCase(name="bf16", placement=PERMUTED, dtype="bf16"),
    ConformanceCase(name="fp16 etp2", tp=2, ep=2, etp=2, placement=PERMUTED, dtype="fp16"),
    # Activation recompute of the MoE layer.
    ConformanceCase(name="recompute", placement=PERMUTED, recompute=True),
    ConformanceCase(name="recompute tp2 etp2 shared", tp=2, ep=2, etp=2, placement=PERMUTED, recompute=True,
                    shape=MoEShape(shared_ffn=24)),
]
CONTROL = ConformanceCase(name="control: placement without moved experts", placement=PERMUTED, misplace=True)


@pytest.fixture(scope="module")
def results():
    return run_local(run_conformance_cases, WORLD, CASES + [CONTROL])


def _diffs(res):
    return {"output": (res.out_diff, res.out_scale), "input grad": (res.input_grad_diff, res.grad_scale),
            "router grad": (res.router_grad_diff, res.router_grad_scale),
            "expert grads": (res.expert_grad_diff, res.expert_grad_scale)}


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c.name for c in CASES])
def test_specmoe_equals_alltoall(results, index):
    case = CASES[index]
    for rank_results in results:
        res = rank_results[index]
        assert not isinstance(res, str), res
        for what, (diff, scale) in _diffs(res).items():
            assert scale > 0, (case.name, res.rank, what, "nothing to compare")
            assert diff <= TOL[case.dtype] * scale, (case.name, res.rank, what, diff, scale)
        sent = sum(res.pairs_per_expert)
        if case.capacity_factor is not None:
            # Megatron's capacity: ceil(T * k / E * factor) pairs per expert on this rank.
            tokens = case.seq // case.tp * case.batch
            capacity = math.ceil(tokens * case.shape.topk / case.shape.experts * case.capacity_factor)
            assert max(res.pairs_per_expert) <= capacity, (case.name, res.rank, res.pairs_per_expert, capacity)
        elif case.router_padding:
            assert all(c % PAD_MULTIPLE == 0 for c in res.pairs_per_expert), (case.name, res.pairs_per_expert)
            assert sent > res.pairs_routed, (case.name, res.rank, "nothing was padded")
        else:
            assert sent == res.pairs_routed, (case.name, res.rank)
    if case.capacity_factor is not None:  # tokens were dropped somewhere
        assert any(sum(r[index].pairs_per_expert) < r[index].pairs_routed for r in results), case.name


def test_the_comparison_fails_when_experts_are_misplaced(results):
    """The check can fail: a placement the weights do not follow sends tokens to wrong experts."""
    for rank_results in results:
        res = rank_results[len(CASES)]
        assert not isinstance(res, str), res
        assert res.out_diff > 1e-3 * res.out_scale, (res.rank, res.out_diff, res.out_scale)
