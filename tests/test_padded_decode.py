"""Megatron's padded decode (drop-and-pad, its CUDA-graph decode mode) with the specmoe dispatcher and
the shuffle layer, and the CUDA-graph refusals narrowed to what still blocks capture.

- the dispatcher's drop-and-pad capacity on hand-worked sizes (logical experts with replicas, never
  above T) and the shuffle layer's refusal of a capacity that drops;
- the refusal table (``megatron/shuffle_refusals.py``): graphs accepted with
  ``moe_pad_experts_for_cuda_graph_inference``, refused dropless, on a config without the field
  (core 0.16), for training graph implementations, with sequence parallelism and with predictors
  fed as Python state; the same through Megatron-LM's parser (skipped without megatron.training);
- on 4 gloo ranks: in padded mode the specmoe dispatcher (contiguous, a placement, replicas)
  equals Megatron's alltoall in the same mode, drops nothing, and its six phases read nothing on
  the host (the dropless dispatcher fails the same guard: the guard's negative check); the shuffle
  GPT's decode steps in padded mode equal Megatron's unshuffled model, phases guarded likewise.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from megatron_specmoe.megatron.shuffle_refusals import graph_predictor_problem, layer_refusals
from megatron_specmoe.testing.spawn import run_local

TOL = 1e-5
FIELD = "moe_pad_experts_for_cuda_graph_inference"
OK = dict(expert_tensor_parallel_size=1, context_parallel_size=1, recompute_granularity=None,
          inference_fuse_tp_communication=False, moe_pad_expert_input_to_capacity=False,
          moe_token_dispatcher_type="specmoe", cuda_graph_impl="none", sequence_parallel=False)


def _refusals(**change):
    return layer_refusals(SimpleNamespace(**{**OK, **change}))


# --------------------------------------------------------------------------- capacity on the host


def test_padded_capacity_counts_logical_experts_and_never_exceeds_t():
    from megatron_specmoe.megatron.dispatcher import SpecMoETokenDispatcher

    def capacity(tokens, factor, replicas=None, experts=12):
        fake = SimpleNamespace(num_experts=experts, replicas=replicas, moe_expert_capacity_factor=factor,
                               config=SimpleNamespace(moe_router_topk=2))
        return SpecMoETokenDispatcher.padded_capacity(fake, tokens)

    four_replicas = SimpleNamespace(num_experts=8)  # E = 8 logical experts in 12 slots
    # T = 6, k = 2: ceil(12 / 8 * 1.0) = 2 rows per slot (Megatron's formula on 12 slots: 1, which
    # would drop a logical expert's second pair).
    assert capacity(6, 1.0, four_replicas) == 2
    assert capacity(6, 1.0) == 1  # no replicas: Megatron's own capacity, ceil(12 / 12)
    # The decode factor E / k gives T; (E + R) / k (Megatron's on the whole config) is capped at T.
    assert capacity(6, 8 / 2, four_replicas) == 6 and capacity(6, 12 / 2, four_replicas) == 6
    assert capacity(1, 12 / 2) == 1


def test_shuffle_layer_refuses_a_padded_capacity_that_drops():
    from megatron_specmoe.megatron.dispatcher import SpecMoETokenDispatcher
    from megatron_specmoe.megatron.shuffle_layer import ShuffleTransformerLayer

    def layer(factor):
        dispatcher = SimpleNamespace(num_experts=8, replicas=None, moe_expert_capacity_factor=factor,
                                     config=SimpleNamespace(moe_router_topk=2))
        dispatcher.padded_capacity = lambda t: SpecMoETokenDispatcher.padded_capacity(dispatcher, t)
        router = SimpleNamespace(weight=SimpleNamespace(shape=(8, 16)))
        return SimpleNamespace(mlp=SimpleNamespace(token_dispatcher=dispatcher, router=router),
                               config=SimpleNamespace(moe_router_topk=2))

    assert ShuffleTransformerLayer._padded_rows(layer(4.0), 3) == 3
    for factor in (1.0, None):
        with pytest.raises(ValueError, match=rf"moe_expert_capacity_factor={factor}, which drops tokens at 3 rows "
                                             r"per rank.*num_moe_experts / moe_router_topk.*"
                                             r"--moe-pad-experts-for-cuda-graph-inference"):
            ShuffleTransformerLayer._padded_rows(layer(factor), 3)


# --------------------------------------------------------------------------- the refusal table


def test_cuda_graphs_are_accepted_with_padded_decode_and_refused_only_where_capture_breaks():
    assert _refusals() == []
    assert _refusals(cuda_graph_impl="local", **{FIELD: True}) == []
    assert _refusals(cuda_graph_impl="none", enable_cuda_graph=True, **{FIELD: True}) == []
    dropless = _refusals(cuda_graph_impl="local", **{FIELD: False})
    assert len(dropless) == 1
    assert dropless[0].startswith(f"{FIELD} must be True with CUDA graphs")
    assert "reads the per-rank token counts on the host" in dropless[0]
    assert "set --moe-pad-experts-for-cuda-graph-inference" in dropless[0]
    assert _refusals(enable_cuda_graph=True, **{FIELD: False}) == dropless
    # Core 0.16's TransformerConfig has no such field.
    (old,) = _refusals(cuda_graph_impl="local")
    assert "need megatron-core >= 0.19" in old and "InferenceWrapperConfig" in old and "cuda_graph_impl='none'" in old
    for impl in ("transformer_engine", "full_iteration"):
        (msg,) = _refusals(cuda_graph_impl=impl, **{FIELD: True})
        assert msg.startswith("cuda_graph_impl must be 'none' or 'local'") and "for training" in msg
    (sp,) = _refusals(cuda_graph_impl="local", sequence_parallel=True, **{FIELD: True})
    assert sp.startswith("sequence_parallel must be False with CUDA graphs") and "Python state" in sp
    assert _refusals(sequence_parallel=True) == []  # without graphs sequence parallelism is fine


def test_graph_refusal_names_the_predictors_fed_as_python_state():
    graphs = SimpleNamespace(cuda_graph_impl="local")
    assert graph_predictor_problem(graphs, "pregate") is None
    assert graph_predictor_problem(SimpleNamespace(cuda_graph_impl="none"), "route") is None
    assert graph_predictor_problem(graphs, "route").startswith(
        "ShuffleOptions.predictor='route' with CUDA graphs: its token ids reach the layer through the carrier")
    assert "use the 'pregate' predictor" in graph_predictor_problem(graphs, "history")


def test_this_megatron_core_config_decides_by_its_own_fields():
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_specmoe.megatron.build import MoEShape, make_config

    config = make_config(MoEShape(), dispatcher="specmoe", tp=1, ep=1)
    config.cuda_graph_impl = "local"  # set after construction: no GPU here for its own checks
    if hasattr(TransformerConfig, FIELD):  # core 0.19
        config.moe_pad_experts_for_cuda_graph_inference = True
        assert layer_refusals(config) == []
        config.moe_pad_experts_for_cuda_graph_inference = False
        assert layer_refusals(config)[0].startswith(f"{FIELD} must be True")
    else:  # core 0.16
        assert "need megatron-core >= 0.19" in layer_refusals(config)[0]


def _parse(monkeypatch, *extra):
    from tests.test_launch_shuffle import GOOD, parse, without
    from tests.test_megatron_args import BASE_ARGV

    return parse(monkeypatch, [*BASE_ARGV, *without(GOOD, "--sequence-parallel"), *extra])


def test_launcher_accepts_graphs_with_the_padding_flag(monkeypatch):
    from megatron_specmoe.megatron_lm import args as M

    args = _parse(monkeypatch, "--cuda-graph-impl", "local", "--moe-pad-experts-for-cuda-graph-inference")
    assert (args.cuda_graph_impl, args.moe_pad_experts_for_cuda_graph_inference) == ("local", True)
    assert M.validate_specmoe_args(args).shuffle == "pregate"


@pytest.mark.parametrize("extra, message", [
    (("--cuda-graph-impl", "local"),
     r"--specmoe-shuffle with --cuda-graph-impl local needs --moe-pad-experts-for-cuda-graph-inference: "
     r"the dropless dispatcher reads the per-rank token counts on the host"),
    (("--cuda-graph-impl", "local", "--moe-pad-experts-for-cuda-graph-inference", "--sequence-parallel"),
     r"--sequence-parallel and CUDA graphs: .*Drop --sequence-parallel, or drop --cuda-graph-impl"),
    (("--cuda-graph-impl", "transformer_engine", "--moe-pad-experts-for-cuda-graph-inference"),
     r"does not support --cuda-graph-impl \(Megatron captures inference decode graphs with --cuda-graph-impl "
     r"local only\)"),
])
def test_launcher_refuses_what_still_blocks_capture(monkeypatch, extra, message):
    from megatron_specmoe.megatron_lm import args as M

    args = _parse(monkeypatch, *extra)
    with pytest.raises(M.SpecMoEArgumentError, match=message):
        M.validate_specmoe_args(args)


# --------------------------------------------------------------------------- 4 gloo ranks

REPLICAS = ((5,), (0,), (2,), (1,))


def _cases():
    from megatron_specmoe.testing.lossless import LosslessCase
    from megatron_specmoe.testing.shuffle_lossless import ShuffleCase

    padded = dict(padded_decode=True, guard_host_reads=True, seq=2, batch=2)
    layer = [
        LosslessCase(**padded),
        LosslessCase(**padded, placement=(7, 6, 5, 4, 3, 2, 1, 0)),
        LosslessCase(**padded, replica_extra=REPLICAS),
        LosslessCase(guard_host_reads=True, seq=2, batch=2),  # dropless: the guard must fire
    ]
    shuffle = [ShuffleCase(decode_steps=2, padded_decode=True, seq=5, batch=1),
               # history: the routes it carries come from the router's probabilities in padded mode.
               ShuffleCase(decode_steps=1, padded_decode=True, seq=5, batch=1, predictor="history")]
    return [("layer", c) for c in layer], [("gpt", c) for c in shuffle]


def _both(rank, world, layer_cases, shuffle_cases):
    from megatron_specmoe.testing.lossless import run_cases
    from megatron_specmoe.testing.shuffle_lossless import run_shuffle_cases

    return run_cases(rank, world, layer_cases), run_shuffle_cases(rank, world, shuffle_cases)


@pytest.fixture(scope="module")
def results():
    layer_cases, shuffle_cases = _cases()
    return run_local(_both, 4, layer_cases, shuffle_cases, timeout_s=600)


def test_padded_specmoe_dispatcher_equals_padded_alltoall_and_reads_nothing_on_the_host(results):
    for rank_results, _ in results:
        *padded, dropless = rank_results
        for r in padded:
            assert r.max_out_diff <= TOL and r.max_grad_diff <= TOL
            assert r.dropped_pairs == 0
            assert r.host_reads == ""
        assert padded[2].slots_hold_their_experts
        # The same guard on the dropless dispatcher: its split sizes go to the host.
        assert dropless.host_reads.startswith("Tensor.tolist of a (4,) tensor in a dispatcher phase")


def test_shuffle_decode_in_padded_mode_equals_the_unshuffled_model(results):
    for _, shuffle in results:
        for r in shuffle:
            assert r.max_out_diff <= TOL and r.plans_agree
            assert r.host_reads == ""
            # Every model's dispatchers are in drop-and-pad mode for the decode steps, with capacity
            # T: the reference routes its 1 decode token per rank, the shuffle its C = 1 row per rank.
            padding = dict(r.decode_padding)
            for name in ("ref", "base", "shuffle"):
                assert padding[name] == ((True, 1), (True, 1)), (name, padding)
        assert shuffle[1].history_ok  # the prefill's carried routes are Megatron's
