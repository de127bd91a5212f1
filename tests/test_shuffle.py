"""s-TS building blocks: the permuted reduce-scatter / deferred all-gather (hand-worked, 2 gloo
ranks), byte counting, and the shuffle layer's refusals and spec."""

from types import SimpleNamespace

import pytest
import torch

from megatron_specmoe.comm.shuffle import CollectiveCounter, ring_bytes
from megatron_specmoe.testing.spawn import run_local
from megatron_specmoe.schedule.assignment import plan_from_home


def _collectives(rank, world_size):
    import torch.distributed as dist

    from megatron_specmoe.comm.shuffle import deferred_all_gather, shuffled_reduce_scatter

    group = dist.new_group(list(range(world_size)))
    # T = 3 tokens, P = 2, C = 2: rank 0 holds tokens 1 and 2, rank 1 holds token 0 and a pad row.
    plan = plan_from_home(torch.tensor([1, 0, 0]), 2)
    # Partial sums: rank r holds (r + 1) * [[1, 10], [2, 20], [3, 30]] in true order.
    partial = (rank + 1) * torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]])
    # Residual rows: rank 0 folds token 0 (+100), rank 1 folds tokens 1 and 2 (+1000, +2000).
    if rank == 0:
        rows, fold = torch.tensor([0]), torch.tensor([[100.0, 100.0]])
    else:
        rows, fold = torch.tensor([1, 2]), torch.tensor([[1000.0, 1000.0], [2000.0, 2000.0]])
    from megatron_specmoe.testing.collectives import count_collectives

    counter = CollectiveCounter()
    with count_collectives() as raw:
        shard = shuffled_reduce_scatter(partial, plan, group, fold_rows=rows, fold=fold, counter=counter)
        back = deferred_all_gather(shard, plan, group, counter=counter)
    raw_calls = [(c.name, c.payload_bytes, c.dtype, c.group_ranks) for c in raw.calls]
    try:
        shuffled_reduce_scatter(partial[:2], plan, group)
        wrong_rows = None
    except ValueError as err:
        wrong_rows = str(err)
    # The same calls with a workspace, twice: the same values, the rows in reused buffers.
    from megatron_specmoe.comm.workspace import Workspace

    workspace, reused = Workspace(), []
    for _ in range(2):
        ws_shard = shuffled_reduce_scatter(partial, plan, group, fold_rows=rows, fold=fold, workspace=workspace)
        ws_back = deferred_all_gather(ws_shard, plan, group, workspace=workspace)
        reused.append((ws_back.data_ptr(), ws_shard.data_ptr() == ws_back.data_ptr()))
    with_workspace = (ws_shard.tolist(), ws_back.tolist(), reused[0][0] == reused[1][0], reused[0][1],
                      workspace.nbytes())
    return (shard.tolist(), back.tolist(), dict(counter.sent_bytes), dict(counter.calls), wrong_rows, raw_calls,
            with_workspace)


def test_shuffled_reduce_scatter_and_deferred_all_gather_hand_worked():
    results = run_local(_collectives, 2)
    # Sum over ranks = 3 * partial; token t gets its residual once.
    want_true = [[3 + 100, 30 + 100], [6 + 1000, 60 + 1000], [9 + 2000, 90 + 2000]]
    shard0, back0, sent0, calls0, err0, raw0, ws0 = results[0]
    shard1, back1, _, _, _, _, ws1 = results[1]
    assert shard0 == [want_true[1], want_true[2]]  # rank 0: tokens 1, 2
    assert shard1 == [want_true[0], [0.0, 0.0]]  # rank 1: token 0, then its zero pad row
    assert back0 == want_true and back1 == want_true
    # [T_pad=4, H=2] fp32 = 32 bytes each way; a ring sends half of it at P = 2.
    assert sent0 == {"reduce_scatter": 16, "all_gather": 16}
    assert calls0 == {"reduce_scatter": 1, "all_gather": 1}
    # At the raw torch.distributed functions: exactly one reduce-scatter of [T_pad=4, H=2] fp32 in
    # and one all-gather of [4, 2] fp32 out, on the two ranks' group.
    assert raw0 == [("reduce_scatter_tensor", 32, "torch.float32", (0, 1)),
                    ("all_gather_into_tensor", 32, "torch.float32", (0, 1))]
    assert "partial has 2 rows, plan has 3 tokens" in err0
    # With a workspace: the same shards and true-order rows; the true-order rows sit in the same
    # buffer on the second call; the shard handed on is a fresh tensor; the buffers hold
    # shuffled [4, 2] + gathered [4, 2] + true order [3, 2] fp32 = 88 bytes.
    assert ws0 == ([want_true[1], want_true[2]], want_true, True, False, 88)
    assert ws1[:2] == ([want_true[0], [0.0, 0.0]], want_true)


def test_raw_collective_counter_wraps_aliases_refuses_nesting_and_reverts():
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    from megatron_specmoe.testing.collectives import count_collectives

    originals = dist.all_reduce, dist.reduce_scatter_tensor, mappings.dist_all_gather_func
    assert mappings.dist_all_gather_func is dist.all_gather_into_tensor  # bound at import
    with count_collectives():
        assert dist.all_reduce is not originals[0] and dist.reduce_scatter_tensor is not originals[1]
        # Megatron's alias is wrapped too: the same counted function as torch.distributed's.
        assert mappings.dist_all_gather_func is dist.all_gather_into_tensor is not originals[2]
        with pytest.raises(RuntimeError, match="already patched .* nested counting is not supported"):
            with count_collectives():
                pass
    assert (dist.all_reduce, dist.reduce_scatter_tensor, mappings.dist_all_gather_func) == originals


def test_ring_bytes_all_reduce_equals_reduce_scatter_plus_all_gather():
    payload = 8 * 16 * 4
    for p in (1, 2, 4, 8):
        assert ring_bytes("all_reduce", payload, p) == (
            ring_bytes("reduce_scatter", payload, p) + ring_bytes("all_gather", payload, p)
        )
    assert ring_bytes("reduce_scatter", 400, 4) == 300
    assert ring_bytes("all_gather", 400, 1) == 0


def test_counter_accumulates_and_clears():
    c = CollectiveCounter()
    c.add("all_gather", 400, 4)
    c.add("all_gather", 400, 4)
    assert c.calls == {"all_gather": 2} and c.sent_bytes == {"all_gather": 600} and c.total_sent == 600
    c.clear()
    assert c.total_sent == 0


def test_options_refuse_unknown_names():
    from megatron_specmoe.megatron.shuffle_layer import ShuffleOptions

    with pytest.raises(ValueError, match="ShuffleOptions.predictor='oracle'"):
        ShuffleOptions(predictor="oracle")
    with pytest.raises(ValueError, match="ShuffleOptions.method='best'"):
        ShuffleOptions(method="best")
    with pytest.raises(ValueError, match="predictor='route' needs route_predictor="):
        ShuffleOptions(predictor="route")
    with pytest.raises(ValueError, match="predictor='history' needs route_predictor= a fitted 'history' predictor .* got 'token'"):
        ShuffleOptions(predictor="history", route_predictor=SimpleNamespace(kind="token"))


def test_layer_refuses_unsupported_settings():
    from megatron_specmoe.megatron.shuffle_layer import _check_config

    ok = dict(expert_tensor_parallel_size=1, context_parallel_size=1, recompute_granularity=None,
              inference_fuse_tp_communication=False, moe_pad_expert_input_to_capacity=False,
              moe_token_dispatcher_type="specmoe", cuda_graph_impl="none")
    _check_config(SimpleNamespace(**ok))
    with pytest.raises(ValueError, match="expert_tensor_parallel_size must be 1"):
        _check_config(SimpleNamespace(**{**ok, "expert_tensor_parallel_size": 2}))
    with pytest.raises(ValueError, match="moe_token_dispatcher_type must be 'specmoe'"):
        _check_config(SimpleNamespace(**{**ok, "moe_token_dispatcher_type": "alltoall"}))
    with pytest.raises(ValueError, match="pipeline_model_parallel_size must be 1 with sequence_parallel=True"):
        _check_config(SimpleNamespace(**{**ok, "sequence_parallel": True, "pipeline_model_parallel_size": 2}))
    _check_config(SimpleNamespace(**{**ok, "sequence_parallel": False, "pipeline_model_parallel_size": 2}))
    with pytest.raises(ValueError, match="inference_fuse_tp_communication must be False"):
        _check_config(SimpleNamespace(**{**ok, "inference_fuse_tp_communication": True}))


def test_shuffle_spec_replaces_layer_linears_and_carries_one_carrier():
    from megatron_specmoe.megatron.install import SpecMoELayer
    from megatron_specmoe.megatron.shuffle_layer import (
        NoCommColumnParallelLinear,
        NoCommRowParallelLinear,
        ShuffleCarrier,
        ShuffleOptions,
        ShuffleTransformerLayer,
    )
    from megatron_specmoe.megatron.shuffle_specs import TokenwiseNorm, carrier_of, get_gpt_layer_shuffle_spec

    carrier = ShuffleCarrier(options=ShuffleOptions(predictor="random"))
    spec = get_gpt_layer_shuffle_spec(8, carrier=carrier, sequence_parallel_norms=True)
    assert spec.module is ShuffleTransformerLayer
    assert carrier_of(spec) is carrier
    attn = spec.submodules.self_attention.submodules
    assert attn.linear_qkv is NoCommColumnParallelLinear and attn.linear_proj is NoCommRowParallelLinear
    assert spec.submodules.input_layernorm is TokenwiseNorm
    mlp = spec.submodules.mlp
    assert getattr(mlp, "module", getattr(mlp, "func", None)) is SpecMoELayer
    fresh = get_gpt_layer_shuffle_spec(8, options=ShuffleOptions(method="greedy"))
    assert carrier_of(fresh).options.method == "greedy"
    from megatron_specmoe.megatron.specs import have_te

    if not have_te():
        with pytest.raises(ValueError, match="use_transformer_engine=True needs TransformerEngine, which is not importable"):
            get_gpt_layer_shuffle_spec(8, use_transformer_engine=True)


def test_state_dict_keys_from_a_fused_te_spec():
    from megatron_specmoe.megatron.shuffle_specs import shuffle_state_dict_from_fused

    w, b, q = torch.ones(2), torch.zeros(2), torch.ones(3, 2)
    fused = {
        "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight": w,
        "decoder.layers.0.self_attention.linear_qkv.layer_norm_bias": b,
        "decoder.layers.0.self_attention.linear_qkv.weight": q,
        "decoder.layers.0.self_attention.linear_qkv._extra_state": None,
        "decoder.layers.1.pre_mlp_layernorm.weight": w,
    }
    out = shuffle_state_dict_from_fused(fused)
    assert list(out) == [
        "decoder.layers.0.input_layernorm.weight",
        "decoder.layers.0.input_layernorm.bias",
        "decoder.layers.0.self_attention.linear_qkv.weight",
        "decoder.layers.0.self_attention.linear_qkv._extra_state",
        "decoder.layers.1.pre_mlp_layernorm.weight",
    ]
    assert out["decoder.layers.0.input_layernorm.weight"] is w  # tensors are not copied


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_route_columns_travel_bit_for_bit(dtype):
    from megatron_specmoe.comm.shuffle import append_route_columns, split_route_columns

    rows = torch.tensor([[1.5, -2.0, 3.25], [0.0, 7.0, -1.0]], dtype=dtype)
    routes = torch.tensor([[0, 255], [31, 7]])
    packed = append_route_columns(rows, routes)
    assert packed.shape == (2, 5) and packed.dtype == dtype
    # A row gather (what the deferred all-gather's inverse permutation does) keeps the bits.
    back_rows, back_routes = split_route_columns(packed.index_select(0, torch.tensor([1, 0])), 2)
    assert torch.equal(back_rows, rows[[1, 0]])
    assert torch.equal(back_routes, routes[[1, 0]]) and back_routes.dtype == torch.int64
    with pytest.raises(ValueError, match=r"routes must be \[N=2, k\], got \(3, 2\)"):
        append_route_columns(rows, torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="has no integer twin"):
        append_route_columns(rows.double(), routes)


def test_workspace_buffers_grow_by_role_dtype_and_device():
    from megatron_specmoe.comm.workspace import Workspace

    ws = Workspace()
    a = ws.take("gathered", (4, 3), torch.float32, torch.device("cpu"))
    a.fill_(1.0)
    b = ws.take("gathered", (2, 3), torch.float32, "cpu")  # smaller: a view of the same buffer
    assert b.is_contiguous() and b.data_ptr() == a.data_ptr() and torch.equal(b, torch.ones(2, 3))
    c = ws.take("true_order", (4, 3), torch.float32, "cpu")  # another role: another buffer
    d = ws.take("gathered", (4, 3), torch.bfloat16, "cpu")  # another dtype: another buffer
    assert len({a.data_ptr(), c.data_ptr(), d.data_ptr()}) == 3
    assert ws.nbytes() == 12 * 4 + 12 * 4 + 12 * 2
    e = ws.take("gathered", (5, 3), torch.float32, "cpu")  # larger: the buffer grows
    assert e.shape == (5, 3) and ws.nbytes() == 15 * 4 + 12 * 4 + 12 * 2
