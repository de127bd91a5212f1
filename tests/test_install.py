"""Selecting specmoe: the hook is idempotent and reversible, errors name the field, and
recording costs nothing when off. One process, a gloo world of size 1."""

import warnings

import pytest
import torch
import torch.distributed as dist

from megatron_specmoe.testing.spawn import free_port
from megatron_specmoe.schedule.placement import ExpertPlacement

warnings.filterwarnings("ignore")


@pytest.fixture(scope="module")
def world():
    from megatron_specmoe.megatron import cpu_support
    from megatron_specmoe.megatron import parallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    cpu_support.enable()
    parallel.initialize(parallel.ParallelLayout())
    yield
    parallel.destroy()
    dist.destroy_process_group()


def _layer(dispatcher, specmoe, via="spec", **overrides):
    from megatron_specmoe.megatron.build import MoEShape, build_moe_layer, make_config

    shape = MoEShape()
    return build_moe_layer(make_config(shape, dispatcher=dispatcher, **overrides), shape, specmoe=specmoe, via=via)


def test_install_is_idempotent_and_reversible(world):
    import megatron_specmoe
    from megatron.core.transformer.moe.moe_layer import MoELayer

    original_init = MoELayer.__init__
    megatron_specmoe.install()
    patched = MoELayer.__init__
    megatron_specmoe.install()
    assert MoELayer.__init__ is patched is not original_init
    assert megatron_specmoe.is_installed()
    layer = _layer("specmoe", specmoe=True, via="hook")
    assert type(layer).__name__ == "MoELayer"
    assert type(layer.token_dispatcher).__name__ == "SpecMoETokenDispatcher"
    assert type(_layer("alltoall", specmoe=False).token_dispatcher).__name__ == "MoEAlltoAllTokenDispatcher"
    megatron_specmoe.uninstall()
    megatron_specmoe.uninstall()
    assert MoELayer.__init__ is original_init
    assert not megatron_specmoe.is_installed()
    # Without the hook Megatron itself refuses the name.
    with pytest.raises(ValueError, match="specmoe"):
        _layer("specmoe", specmoe=False)


def test_unknown_dispatcher_name(world):
    import megatron_specmoe

    megatron_specmoe.install()
    try:
        with pytest.raises(ValueError, match=r"moe_token_dispatcher_type='bogus' is not a known dispatcher; choose one of allgather, alltoall, flex, specmoe"):
            _layer("bogus", specmoe=False)
    finally:
        megatron_specmoe.uninstall()


def test_spec_and_config_must_agree(world):
    with pytest.raises(ValueError, match="needs TransformerConfig.moe_token_dispatcher_type='specmoe', got 'alltoall'"):
        _layer("alltoall", specmoe=True)


def test_unsupported_setting_refused(world):
    with pytest.raises(ValueError, match="does not support moe_pad_expert_input_to_capacity=True"):
        _layer("specmoe", specmoe=True, moe_pad_expert_input_to_capacity=True, moe_expert_capacity_factor=1.0)


def test_placement_must_match_layer(world):
    dispatcher = _layer("specmoe", specmoe=True).token_dispatcher
    with pytest.raises(ValueError, match="expert_model_parallel_size=1; make the plan for this EP size"):
        dispatcher.set_placement(ExpertPlacement.contiguous(8, 2))
    with pytest.raises(ValueError, match="placement has 4 experts but the model layer has num_moe_experts=8"):
        dispatcher.set_placement(ExpertPlacement.contiguous(4, 1))
    dispatcher.set_placement(ExpertPlacement(physical_to_logical=(7, 6, 5, 4, 3, 2, 1, 0), ep_size=1))
    assert dispatcher.placement.physical_to_logical[0] == 7


def test_recording_off_costs_nothing(world, monkeypatch):
    from megatron_specmoe.megatron.dispatcher import DispatchRecorder, SpecMoETokenDispatcher

    layer = _layer("specmoe", specmoe=True)
    calls = []
    monkeypatch.setattr(SpecMoETokenDispatcher, "_record", lambda self, *a: calls.append(1) or (_ for _ in ()).throw(AssertionError("recorded while off")))
    layer(torch.randn(4, 2, 16))
    assert calls == []
    monkeypatch.undo()
    recorder = DispatchRecorder()
    layer.token_dispatcher.recorder = recorder
    layer(torch.randn(4, 2, 16))
    assert len(recorder.records) == 1
    rec = recorder.records[0]
    assert rec.measures.tokens == 8 and rec.measures.pairs == 16
    assert rec.measures.local_activation_rate == 1.0  # EP = 1: everything is local


def test_cpu_support_is_reversible(world):
    from megatron_specmoe.megatron import cpu_support

    assert cpu_support.is_enabled()
    cpu_support.disable()
    try:
        assert not cpu_support.is_enabled()
        with pytest.raises((AssertionError, RuntimeError)):
            torch.cuda.current_device()
    finally:
        cpu_support.enable()
    cpu_support.enable()
    assert cpu_support.is_enabled()
    assert torch.cuda.current_device() == "cpu"


def _transformer_engine_imports() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # noqa: BLE001 - the TE meta package raises RuntimeError on a CPU box
        return False
    return True


def test_transformer_engine_detection_agrees_with_the_import_and_is_logged_once(world, caplog):
    """have_te() is whether transformer_engine imports here (False on the CPU machines, True on a
    GPU machine with TE), decided and logged once; the spec's experts follow it."""
    import logging

    from megatron_specmoe.megatron import specs

    te = _transformer_engine_imports()
    specs.have_te.cache_clear()
    with caplog.at_level(logging.INFO, logger="megatron_specmoe.megatron.moe_specs"):
        assert specs.have_te() is te
        assert specs.have_te() is te
    word = "TransformerEngine found" if te else "not importable"
    messages = [r.getMessage() for r in caplog.records if r.name == "megatron_specmoe.megatron.moe_specs"]
    assert len(messages) == 1 and word in messages[0], messages
    spec = specs.get_gpt_layer_specmoe_spec(8)
    mlp = spec.submodules.mlp
    experts = mlp.submodules.experts if hasattr(mlp, "submodules") else mlp.keywords["submodules"].experts
    experts_cls = getattr(experts, "module", None) or experts.func
    assert experts_cls.__name__ == ("TEGroupedMLP" if te else "SequentialMLP")


def test_specmoe_spec_with_shuffle_selects_the_shuffle_layer(world):
    from megatron_specmoe.megatron.shuffle_layer import ShuffleCarrier, ShuffleOptions, ShuffleTransformerLayer
    from megatron_specmoe.megatron.shuffle_specs import carrier_of
    from megatron_specmoe.megatron.specs import get_gpt_layer_specmoe_spec

    carrier = ShuffleCarrier(options=ShuffleOptions(predictor="pregate"))
    spec = get_gpt_layer_specmoe_spec(8, use_transformer_engine=False, shuffle=carrier)
    assert spec.module is ShuffleTransformerLayer and carrier_of(spec) is carrier
    assert get_gpt_layer_specmoe_spec(8, use_transformer_engine=False, shuffle=ShuffleOptions()).module is ShuffleTransformerLayer
    with pytest.raises(ValueError, match="shuffle must be a ShuffleCarrier or ShuffleOptions, got str"):
        get_gpt_layer_specmoe_spec(8, shuffle="yes")
    from megatron_specmoe.megatron.specs import have_te

    if not have_te():  # the TE shuffle spec needs TE; with TE it is built (tools/gpu_check.py)
        with pytest.raises(ValueError, match="use_transformer_engine=True needs TransformerEngine"):
            get_gpt_layer_specmoe_spec(8, use_transformer_engine=True, shuffle=carrier)


def test_capacity_padding_refusal_gives_the_real_reason(world):
    """Issue 18 finding 9: the refusal said "the shuffle assumes dropless routing", but dropping
    without padding works; the reason is the padding sent over the all-to-all."""
    with pytest.raises(ValueError, match=r"padding every expert to its capacity sends the padding over "
                       r"the all-to-all.*moe_expert_capacity_factor alone, is supported") as exc:
        _layer("specmoe", specmoe=True, moe_pad_expert_input_to_capacity=True, moe_expert_capacity_factor=1.0)
    assert "dropless" not in str(exc.value)
    layer = _layer("specmoe", specmoe=True, moe_expert_capacity_factor=1.0)  # dropping alone: built
    out = layer(torch.randn(4, 2, 16))[0]
    assert out.shape == (4, 2, 16)


def test_recorder_counts_the_pairs_megatron_pads_and_sends(world, monkeypatch):
    """Issue 18 finding 8: with moe_router_padding_for_quantization the recorder reported the
    pairs from before Megatron padded the routing map, not the ones on the wire."""
    from megatron.core.transformer.moe import token_dispatcher as td

    from megatron_specmoe.megatron.dispatcher import DispatchRecorder

    dispatcher = _layer("specmoe", specmoe=True).token_dispatcher
    monkeypatch.setattr(dispatcher.config, "moe_router_padding_for_quantization", True)
    monkeypatch.setattr(td, "get_align_size_for_quantization", lambda config: 8)  # fp8's alignment, no fp8
    dispatcher.recorder = DispatchRecorder()
    tokens = 8
    routing_map = torch.zeros(tokens, 8, dtype=torch.bool)
    for t in range(tokens):  # token t -> experts t % 8 and (t + 1) % 8: 2 pairs per expert
        routing_map[t, [t % 8, (t + 1) % 8]] = True
    probs = routing_map.float() * 0.5
    dispatcher.dispatch_preprocess(torch.randn(tokens, 1, 16), routing_map, probs)
    rec = dispatcher.recorder.records[-1]
    sent = int(dispatcher.routing_map.sum())  # what Megatron permutes and sends
    assert sent == 8 * 8  # every expert padded from 2 to 8 tokens
    assert rec.measures.pairs == sent and list(rec.pairs_to_rank) == [sent]  # was 16 before the fix


def test_cpu_support_keeps_expert_tp_splits_a_tensor():
    """Issue 18 finding 7: cpu_support turned output_splits_tp into a list, and Megatron's
    dispatch_postprocess calls .tolist() on it when ETP > 1."""
    from types import SimpleNamespace

    from megatron_specmoe.megatron.cpu_support import _cpu_maybe_dtoh_and_synchronize

    d = SimpleNamespace(drop_and_pad=False, cuda_dtoh_point="before_ep_alltoall",
                        input_splits=torch.tensor([3, 1]), output_splits=torch.tensor([2, 2]),
                        output_splits_tp=torch.tensor([4, 5]), num_out_tokens=torch.tensor(9))
    _cpu_maybe_dtoh_and_synchronize(d, "before_ep_alltoall")
    assert d.input_splits == [3, 1] and d.output_splits == [2, 2]  # gloo's all_to_all wants lists
    assert d.output_splits_tp.tolist() == [4, 5]  # what Megatron does with it (ETP > 1)
    assert d.num_out_tokens == 9


def test_expert_tensor_parallelism_runs_on_the_cpu_patches():
    """Issue 18 finding 7, end to end: ETP = 2 on two gloo ranks, alltoall and specmoe give the same
    output (before the fix Megatron's output_splits_tp.tolist() failed on the patched list)."""
    from megatron_specmoe.testing.etp_check import etp_forward
    from megatron_specmoe.testing.spawn import run_local

    results = run_local(etp_forward, 2, 7)
    for res in results:
        assert res["max_diff"] <= 1e-6
    assert torch.tensor(results[0]["alltoall"]).abs().sum() > 0
