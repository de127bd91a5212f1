"""The specmoe dispatcher sends the routing probs inside the tokens' all-to-all (``fuse_probs``).

- ``comm.payload``: values stored bit for bit in extra row columns (NaN payloads, negative zero,
  denormals; float32 values in bf16 / fp16 / float32 rows), the widths, the refusals by pattern;
- the decision (``_fused_width``) reads only what every EP rank shares: mode, device type,
  drop-and-pad, dtypes, EP size, shared-expert overlap, autograd; never the row count;
- on 4 gloo ranks (EP = 4): an MoE layer in inference with probs fused equals the same layer with
  Megatron's two calls and Megatron's own alltoall layer bit for bit (1 and 2 local experts, fp32
  and bf16, a permuted placement, drop-and-pad decode), and its dispatch issues one all-to-all
  instead of two (counted as the c10d ops a GPU would launch); a forward that builds an autograd
  graph keeps Megatron's two calls.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron_specmoe.comm.payload import append_value_columns, split_value_columns, value_columns
from megatron_specmoe.testing.spawn import run_local

A2A = "c10d::alltoall_base_"


# --------------------------------------------------------------------------- payload columns


@pytest.mark.parametrize("rows_dtype, width", [(torch.bfloat16, 2), (torch.float16, 2), (torch.float32, 1)])
def test_float32_values_arrive_bit_for_bit(rows_dtype, width):
    rows = torch.randn(6, 5).to(rows_dtype)
    special = torch.tensor([float("nan"), -0.0, 1e-45, float("inf"), 0.25, -3.5], dtype=torch.float32)
    special[0] = torch.tensor(0x7FC12345, dtype=torch.int32).view(torch.float32)  # a NaN with a payload
    packed = append_value_columns(rows, special)
    assert packed.shape == (6, 5 + width) and packed.dtype == rows_dtype
    back_rows, back = split_value_columns(packed, width, torch.float32)
    assert torch.equal(back.view(torch.int32), special.view(torch.int32))
    assert torch.equal(back_rows.view(torch.int16 if rows_dtype != torch.float32 else torch.int32),
                       rows.view(torch.int16 if rows_dtype != torch.float32 else torch.int32))
    # Row copies (what an all-to-all's receiver gets) keep the bits too.
    shuffled = packed[torch.tensor([5, 0, 3, 1, 4, 2])]
    _, moved = split_value_columns(shuffled, width, torch.float32)
    assert torch.equal(moved.view(torch.int32), special[[5, 0, 3, 1, 4, 2]].view(torch.int32))


def test_widths_and_values_per_row():
    assert value_columns(torch.bfloat16, torch.float32, 1) == 2
    assert value_columns(torch.float32, torch.float32, 3) == 3
    assert value_columns(torch.bfloat16, torch.bfloat16, 1) == 1
    assert value_columns(torch.float32, torch.bfloat16, 1) is None  # half a column
    assert value_columns(torch.float32, torch.bfloat16, 2) == 1
    values = torch.arange(8, dtype=torch.float32).view(4, 2)
    packed = append_value_columns(torch.zeros(4, 3), values)
    assert packed.shape == (4, 5)
    assert torch.equal(split_value_columns(packed, 2, torch.float32, (2,))[1], values)
    empty = append_value_columns(torch.zeros(0, 3, dtype=torch.bfloat16), torch.zeros(0))
    assert empty.shape == (0, 5)


def test_payload_refusals_name_the_problem():
    with pytest.raises(ValueError, match=r"rows must be \[N, H\] and values \[N, \.\.\.\] with the same N, "
                                         r"got \(4, 3\) and \(5,\)"):
        append_value_columns(torch.zeros(4, 3), torch.zeros(5))
    with pytest.raises(ValueError, match=r"1 torch.bfloat16 value\(s\) per row do not fill whole torch.float32 "
                                         r"columns; send them apart"):
        append_value_columns(torch.zeros(4, 3), torch.zeros(4, dtype=torch.bfloat16))


# --------------------------------------------------------------------------- the decision


def _fake(mode="auto", *, ep=4, shared=None, padded=False):
    from megatron_specmoe.megatron.dispatcher import SpecMoETokenDispatcher

    fake = SimpleNamespace(fuse_probs=mode, ep_size=ep, shared_experts=shared, drop_and_pad=padded)
    return lambda tokens, probs: SpecMoETokenDispatcher._fused_width(fake, tokens, probs)


def _tokens(n=4, *, cuda=False, dtype=torch.bfloat16, grad=False):
    return SimpleNamespace(is_cuda=cuda, dtype=dtype, requires_grad=grad, dim=lambda: 2, shape=(n, 8))


def test_fusion_is_decided_from_what_every_rank_shares():
    probs = torch.zeros(4)
    assert _fake()(_tokens(), probs) == 2  # CPU: fused
    assert _fake()(_tokens(0), torch.zeros(0)) == 2  # a rank with no pair decides as the others
    assert _fake()(_tokens(cuda=True), probs) is None  # a CUDA prefill: Megatron's two calls
    assert _fake(padded=True)(_tokens(cuda=True), probs) == 2  # padded CUDA-graph decode
    assert _fake("on")(_tokens(cuda=True), probs) == 2
    assert _fake("off")(_tokens(), probs) is None
    assert _fake(ep=1)(_tokens(), probs) is None
    assert _fake(shared=object())(_tokens(), probs) is None  # shared experts overlapped with dispatch
    assert _fake("on")(_tokens(dtype=torch.float32), probs.bfloat16()) is None  # half a column
    assert _fake()(_tokens(grad=True), probs) is None  # training: bits carry no gradient
    with torch.no_grad():
        assert _fake()(_tokens(grad=True), probs) == 2


def test_set_fuse_probs_refuses_an_unknown_mode():
    from megatron_specmoe.megatron.dispatcher import SpecMoETokenDispatcher

    fake = SimpleNamespace()
    SpecMoETokenDispatcher.set_fuse_probs(fake, "off")
    assert fake.fuse_probs == "off"
    with pytest.raises(ValueError, match=r"set_fuse_probs: mode must be one of \['auto', 'on', 'off'\], got 'yes'"):
        SpecMoETokenDispatcher.set_fuse_probs(fake, "yes")


# --------------------------------------------------------------------------- 4 gloo ranks

# (experts, dtype, padded decode, placement): 2 and 1 local experts per EP rank.
CASES = (
    (8, "fp32", False, None),
    (8, "bf16", False, (7, 6, 5, 4, 3, 2, 1, 0)),
    (4, "fp32", False, None),
    (8, "fp32", True, None),
)


def _worker(rank, world, cases):
    import warnings

    from megatron_specmoe.measure.launches import LaunchCounter
    from megatron_specmoe.megatron import cpu_support, parallel
    from megatron_specmoe.megatron.build import MoEShape, build_moe_layer, make_config
    from megatron_specmoe.schedule.placement import ExpertPlacement
    from megatron_specmoe.testing.lossless import arrange_layers
    from megatron_specmoe.testing.padded_decode import set_padded_decode

    warnings.filterwarnings("ignore")
    cpu_support.enable()
    parallel.initialize(parallel.ParallelLayout(tp=1, ep=4), seed=3)
    try:
        results = []
        for experts, dtype, padded, placement in cases:
            shape = MoEShape(hidden=16, ffn=8, experts=experts, topk=2, seq=6)
            ref = build_moe_layer(make_config(shape, dispatcher="alltoall", ep=4), shape, specmoe=False)
            spec = build_moe_layer(make_config(shape, dispatcher="specmoe", ep=4), shape, specmoe=True)
            places = [ExpertPlacement.contiguous(experts, 4),
                      ExpertPlacement.contiguous(experts, 4) if placement is None
                      else ExpertPlacement(physical_to_logical=placement, ep_size=4)]
            spec.token_dispatcher.set_placement(places[1])
            arrange_layers([ref, spec], places, seed=5, layer_index=0)
            torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
            ref.to(torch_dtype).eval()
            spec.to(torch_dtype).eval()
            if padded:
                set_padded_decode(ref, True, capacity_factor=experts / 2)
                set_padded_decode(spec, True, capacity_factor=experts / 2)
            x = torch.randn(6 + (0 if padded else rank), 1, 16, generator=torch.Generator().manual_seed(rank))
            x = x.to(torch_dtype)
            outs, a2a = {}, {}
            # Megatron's count all-gather: the all-to-alls counted here are dispatch's and combine's
            # (the count exchange by all-to-all: tests/test_count_exchange.py).
            spec.token_dispatcher.set_count_exchange("allgather")
            for name, layer, mode in (("megatron", ref, None), ("off", spec, "off"), ("auto", spec, "auto")):
                if mode is not None:
                    layer.token_dispatcher.set_fuse_probs(mode)
                with torch.no_grad(), LaunchCounter() as counter:
                    outs[name] = layer(x)[0]
                a2a[name] = counter.result().by_op.get(A2A, 0)
            fused = spec.token_dispatcher.fused_dispatches
            inp = x.clone().requires_grad_(True)
            with LaunchCounter() as counter:
                spec(inp)[0].float().sum().backward()
            results.append(dict(
                same_as_off=torch.equal(outs["auto"], outs["off"]),
                same_as_megatron=torch.equal(outs["auto"], outs["megatron"]),
                a2a=a2a, fused=fused, training_fused=spec.token_dispatcher.fused_dispatches - fused,
                training_a2a=counter.result().by_op.get(A2A, 0)))
        return results
    finally:
        parallel.destroy()


@pytest.fixture(scope="module")
def results():
    return run_local(_worker, 4, CASES, timeout_s=300)


@pytest.mark.parametrize("index", range(len(CASES)))
def test_fused_probs_are_megatrons_bit_for_bit_with_one_all_to_all_fewer(results, index):
    for per_rank in results:
        r = per_rank[index]
        assert r["same_as_off"] and r["same_as_megatron"], (CASES[index], r)
        # Megatron's forward: tokens and probs all-to-alls at dispatch, one at combine.
        assert r["a2a"] == {"megatron": 3, "off": 3, "auto": 2}, r
        assert r["fused"] == 1


def test_a_forward_with_autograd_keeps_megatrons_two_calls(results):
    for per_rank in results:
        for r in per_rank:
            assert r["training_fused"] == 0
            assert r["training_a2a"] >= 3  # forward's three (backward adds its own)
