"""``--specmoe-shuffle`` through Megatron-LM's own model builder (``megatron_lm/shuffle_hook.py``).

Three parts:
- the flag's early checks on Megatron-LM's real parser (``megatron.training`` ships in the
  megatron-core 0.19 wheel; those tests skip where it is absent, as in test_megatron_args.py);
- the spec-builder hook in one process: idempotent, reversible (also in modules that imported the
  builders by name, before or after it was installed), Megatron's specs unchanged without the
  flag, shuffle specs with one carrier per model with it, refusals named;
- end to end on 4 gloo ranks (TP = EP = 4, fp32): a model provider that calls
  ``gpt_layer_specs.get_gpt_decoder_block_spec`` through the module attribute, as Megatron-LM's
  ``gpt_builder`` does, builds a GPTModel with the hook installed; after the runtime hook's
  set-up its logits equal those of the same weights built without the hook (alltoall).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import warnings

import numpy as np
import pytest
import torch

from megatron_specmoe.testing.spawn import run_local
from megatron_specmoe.megatron_lm import args as M
from megatron_specmoe.megatron_lm import shuffle_hook as MS
from tests.test_megatron_args import BASE_ARGV
from tests.test_megatron_args import parse as parse_megatron_args
from tests.test_megatron_runtime import _Wrapper

TOL = 1e-5

# --------------------------------------------------------------------------- real parser

GOOD = [
    "--tensor-model-parallel-size", "4", "--expert-model-parallel-size", "4",
    "--expert-tensor-parallel-size", "1", "--sequence-parallel",
    "--moe-token-dispatcher-type", "specmoe", "--transformer-impl", "local", "--specmoe-shuffle",
]


def parse(monkeypatch, argv):
    """Megatron-LM's parse_args with our provider on 16 ranks, or skip (no megatron.training before
    core 0.19)."""
    return parse_megatron_args(monkeypatch, argv, world_size=16)


def without(argv, *flags):
    """argv without the given flags (and the value after each that takes one)."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a in flags:
            skip = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            continue
        out.append(a)
    return out


def write_plan(folder, *, kinds=("token",), num_layers=4, ep_size=4, hidden_size=64):
    """A plan with real fitted "token" and "combined" (token + history) predictors, or a stand-in
    state for other kinds."""
    from megatron_specmoe.artifacts.plan_folder import make_plan, save_plan
    from megatron_specmoe.predict.registry import fit_predictor
    from megatron_specmoe.artifacts.traces import RoutingTrace

    rng = np.random.default_rng(0)
    tokens = 64
    experts = np.stack([np.stack([rng.permutation(8)[:2] for _ in range(num_layers)]) for _ in range(tokens)])
    trace = RoutingTrace(experts=experts.astype(np.int32), num_experts=8,
                         token_ids=rng.integers(0, 64, tokens).astype(np.int64))
    state = {}
    for kind in kinds:
        if kind == "token":
            state[kind] = fit_predictor("token", trace).to_state()
        elif kind == "combined":  # what `specmoe demo --predictor history` plans: token + history
            state[kind] = fit_predictor("combined", trace, members=("token", "history"),
                                        member_options={"history": {"hidden": 8, "epochs": 1}}).to_state()
        else:
            state[kind] = {"config": {"kind": kind}, "arrays": {"w": np.zeros((2, 2), np.float32)}}
    save_plan(make_plan(num_layers=num_layers, num_experts=8, topk=2, ep_size=ep_size, hidden_size=hidden_size,
                        predictor_state=state), folder)
    return folder


def test_good_command_line_is_accepted(monkeypatch):
    args = parse(monkeypatch, [*BASE_ARGV, *GOOD])
    # No plan: the shuffle predicts with the layer's own router.
    assert M.validate_specmoe_args(args) == M.SpecMoEArgsCheck(active=True, method="shuffle",
                                                               predictor="pregate", shuffle="pregate")
    assert (args.specmoe_shuffle, args.specmoe_predictor) == (True, "pregate")
    assert MS.ShuffleSettings.from_args(args) == MS.ShuffleSettings(predictor="pregate")
    assert M.validate_specmoe_args(args).shuffle == "pregate"  # the same answer again


def test_shuffle_is_on_by_default_with_tp_inside_ep(monkeypatch, tmp_path):
    plan = write_plan(tmp_path / "plan")
    args = parse(monkeypatch, [*BASE_ARGV, *without(GOOD, "--specmoe-shuffle"), "--specmoe-plan", str(plan)])
    assert not args.specmoe_shuffle
    # The plan's first predictor (its token table) is the shuffle's.
    assert M.validate_specmoe_args(args) == M.SpecMoEArgsCheck(
        active=True, method="shuffle", predictor="token", plan=plan, shuffle="route")
    assert args.specmoe_shuffle and not args.specmoe_request_placement
    settings = MS.ShuffleSettings.from_args(args)
    assert (settings.predictor, settings.plan_kind) == ("route", "token")
    assert settings.options().route_predictor.kind == "token"


def test_core_019s_dynamic_engine_is_accepted(monkeypatch):
    # Core 0.19's engines run on the dynamic context unless --use-legacy-static-engine; the shuffle
    # layer runs on both (tests/test_shuffle_dynamic.py).
    args = parse(monkeypatch, [*BASE_ARGV, *without(GOOD, "--use-legacy-static-engine")])
    assert not args.use_legacy_static_engine
    assert M.validate_specmoe_args(args).method == "shuffle"


def test_flag_is_off_by_default(monkeypatch):
    args = parse(monkeypatch, BASE_ARGV)
    assert (args.specmoe_shuffle, args.specmoe_predictor) == (False, None)
    assert MS.ShuffleSettings.from_args(args) is None


@pytest.mark.parametrize("change, message", [
    # Megatron-LM's default --transformer-impl is transformer_engine.
    (lambda a: without(a, "--transformer-impl"),
     "--transformer-impl transformer_engine.*default.*Pass --transformer-impl local"),
    (lambda a: [*without(a, "--moe-token-dispatcher-type"), "--moe-token-dispatcher-type", "alltoall"],
     "--specmoe-shuffle only appl.* to the specmoe dispatcher.*is 'alltoall'.*--moe-token-dispatcher-type specmoe"),
    (lambda a: [*a, "--pipeline-model-parallel-size", "2"],
     "--sequence-parallel and --pipeline-model-parallel-size 2.*Drop --sequence-parallel"),
    (lambda a: [*a, "--moe-shared-expert-intermediate-size", "128", "--moe-shared-expert-overlap"],
     r"does not support --moe-shared-expert-overlap"),
    (lambda a: [*a, "--spec", "my.module", "my_spec"], r"does not support --spec \(Megatron-LM then takes"),
    (lambda a: [*a, "--moe-layer-freq", "([1]+[0]+[1]*2)"],
     r"dense layer\(s\) \[1\] come after the MoE layer 0.*Drop --sequence-parallel"),
    (lambda a: [*a, "--specmoe-record-routes", "routes"],
     "--specmoe-record-routes routes with token shuffling .*would not line up with the batch's token ids"),
    (lambda a: [*a, "--specmoe-predictor", "token"],
     "--specmoe-predictor token needs --specmoe-plan DIR"),
    (lambda a: [*a, "--specmoe-predictor", "layer"],
     "--specmoe-predictor layer: the n-gram layer table has no run-time form"),
    (lambda a: [*a, "--specmoe-request-placement"],
     "--specmoe-shuffle and --specmoe-request-placement: the layout selects one"),
])
def test_refused_before_any_gpu_work(monkeypatch, change, message):
    args = parse(monkeypatch, change([*BASE_ARGV, *GOOD]))
    with pytest.raises(M.SpecMoEArgumentError, match=message):
        M.validate_specmoe_args(args)


def test_shuffle_at_tp1_and_layout_problems_are_refused_even_with_fallback(monkeypatch):
    layout = ["--tensor-model-parallel-size", "1", "--expert-model-parallel-size", "4"]
    argv = [*BASE_ARGV, *without(GOOD, "--tensor-model-parallel-size", "--expert-model-parallel-size",
                                 "--sequence-parallel"), *layout, "--specmoe-fallback-alltoall"]
    args = parse(monkeypatch, argv)
    with pytest.raises(M.SpecMoEArgumentError, match="--specmoe-shuffle with --tensor-model-parallel-size 1: "
                       ".*with DP attention the specmoe dispatcher places requests instead"):
        M.validate_specmoe_args(args)
    argv = [*without(argv, "--expert-model-parallel-size"), "--expert-model-parallel-size", "1"]
    args = parse(monkeypatch, argv)
    with pytest.raises(M.SpecMoEArgumentError, match="--expert-model-parallel-size is 1.*--specmoe-shuffle asks "
                       "for the method, so --specmoe-fallback-alltoall does not apply"):
        M.validate_specmoe_args(args)
    assert args.moe_token_dispatcher_type == "specmoe"  # no silent fallback


def test_dense_layers_first_are_accepted_and_history_needs_consecutive_moe_layers(monkeypatch, tmp_path):
    plan = write_plan(tmp_path / "plan", num_layers=3)
    argv = [*BASE_ARGV, *GOOD, "--moe-layer-freq", "([0]+[1]*3)", "--specmoe-plan", str(plan)]
    args = parse(monkeypatch, [*argv, "--specmoe-predictor", "pregate"])
    assert M.validate_specmoe_args(args).shuffle == "pregate"
    # The plan's MoE-layer index comes from --moe-layer-freq, so the token table works with dense layers.
    args = parse(monkeypatch, [*argv, "--specmoe-predictor", "token"])
    assert M.validate_specmoe_args(args) == M.SpecMoEArgsCheck(active=True, method="shuffle", predictor="token",
                                                               plan=plan, shuffle="route")
    # The route history passes from MoE layer to MoE layer: a dense layer between them breaks it,
    # with or without sequence parallelism.
    history_plan = write_plan(tmp_path / "history", kinds=("token", "combined"), num_layers=3)
    args = parse(monkeypatch, [*BASE_ARGV, *without(GOOD, "--sequence-parallel"), "--moe-layer-freq",
                               "([1]+[0]+[1]*2)", "--specmoe-plan", str(history_plan),
                               "--specmoe-predictor", "combined"])
    with pytest.raises(M.SpecMoEArgumentError, match=r"route-history predictor .*: dense layer\(s\) \[1\] "
                       "come after the MoE layer 0"):
        M.validate_specmoe_args(args)


def test_history_predictors_need_their_plan_kind(monkeypatch, tmp_path):
    token_only = write_plan(tmp_path / "token")
    for name in ("history", "combined"):
        args = parse(monkeypatch, [*BASE_ARGV, *GOOD, "--specmoe-predictor", name, "--specmoe-plan", str(token_only)])
        with pytest.raises(M.SpecMoEArgumentError, match=f"--specmoe-predictor {name}: the plan .*token holds no "
                           "such predictor \\(it has token\\).*--predictor " + name):
            M.validate_specmoe_args(args)
    history_plan = write_plan(tmp_path / "history", kinds=("combined", "token"))
    args = parse(monkeypatch, [*BASE_ARGV, *GOOD, "--specmoe-plan", str(history_plan)])
    assert M.validate_specmoe_args(args).shuffle == "history"  # the plan's first: combined
    options = MS.ShuffleSettings.from_args(args).options()
    assert options.predictor == "history" and options.route_predictor.kind == "combined"


def test_combined_members_without_a_device_form_are_refused(monkeypatch, tmp_path):
    from megatron_specmoe.artifacts.plan_folder import load_plan, make_plan, save_plan

    plan = load_plan(write_plan(tmp_path / "src", kinds=("combined",)))
    state = {"combined": {"config": {**plan.predictor_state["combined"]["config"],
                                     "members": [{"kind": "token"}, {"kind": "layer"}]},
                          "arrays": plan.predictor_state["combined"]["arrays"]}}
    h = plan.header
    save_plan(make_plan(num_layers=h.num_layers, num_experts=h.num_experts, topk=h.topk, ep_size=h.ep_size,
                        hidden_size=h.hidden_size, predictor_state=state), tmp_path / "layer")
    args = parse(monkeypatch, [*BASE_ARGV, *GOOD, "--specmoe-plan", str(tmp_path / "layer")])
    with pytest.raises(M.SpecMoEArgumentError, match=r"combined predictor has member\(s\) \['layer'\] with no "
                       "run-time form; re-plan with `specmoe plan --predictor combined --members token,history`"):
        M.validate_specmoe_args(args)


def test_route_predictor_needs_the_plans_token_table(monkeypatch, tmp_path):
    bad = write_plan(tmp_path / "bad", kinds=("history",))
    args = parse(monkeypatch, [*BASE_ARGV, *GOOD, "--specmoe-predictor", "token", "--specmoe-plan", str(bad)])
    with pytest.raises(M.SpecMoEArgumentError, match="--specmoe-predictor token: the plan .*bad holds no such "
                       r"predictor \(it has history\)"):
        M.validate_specmoe_args(args)


# --------------------------------------------------------------------------- the hook, in-process


def _config(*, layers=3, freq=1, sp=False, dispatcher="specmoe", tp=4):
    from megatron_specmoe.megatron.build import MoEShape, make_config

    return make_config(MoEShape(layers=layers), dispatcher=dispatcher, tp=tp, ep=4,
                       sequence_parallel=sp, moe_layer_freq=freq)


# The shuffle layer's predictor names -> the --specmoe-predictor values that select them.
FLAG_OF = {"pregate": "pregate", "route": "token", "history": "combined"}


def _flag_args(on=True, predictor="pregate", plan=None):
    return argparse.Namespace(specmoe_shuffle=on, specmoe_predictor=FLAG_OF[predictor], specmoe_plan=plan)


@pytest.fixture
def hook():
    """install_shuffle_hook with a settable args namespace; always uninstalled afterwards."""
    warnings.filterwarnings("ignore")
    holder = types.SimpleNamespace(args=_flag_args())
    MS.uninstall_shuffle_hook()
    yield holder, MS.install_shuffle_hook(get_args=lambda: holder.args)
    MS.uninstall_shuffle_hook()


def test_hook_is_idempotent_and_reversible(monkeypatch):
    from megatron.core.models.gpt import gpt_layer_specs as G

    originals = {name: getattr(G, name) for name in MS.SPEC_BUILDERS}
    early = types.ModuleType("specmoe_test_early_importer")  # imported a builder by name before
    early.get_gpt_decoder_block_spec = originals["get_gpt_decoder_block_spec"]
    monkeypatch.setitem(sys.modules, early.__name__, early)
    MS.uninstall_shuffle_hook()
    try:
        names = MS.install_shuffle_hook(get_args=lambda: _flag_args())
        wrapped = {name: getattr(G, name) for name in MS.SPEC_BUILDERS}
        assert MS.install_shuffle_hook() == names  # idempotent: nothing wrapped twice
        assert {name: getattr(G, name) for name in MS.SPEC_BUILDERS} == wrapped
        assert MS.is_shuffle_hook_installed()
        assert f"{G.__name__}.get_gpt_layer_local_spec" in names
        assert f"{early.__name__}.get_gpt_decoder_block_spec" in names
        assert early.get_gpt_decoder_block_spec is wrapped["get_gpt_decoder_block_spec"]
        assert all(wrapped[n] is not originals[n] and wrapped[n].__wrapped__ is originals[n] for n in wrapped)
        # A module imported after installing (gpt_builders.py, say) takes the wrapped builder ...
        late = types.ModuleType("specmoe_test_late_importer")
        late.get_gpt_layer_local_spec = G.get_gpt_layer_local_spec
        monkeypatch.setitem(sys.modules, late.__name__, late)
    finally:
        MS.uninstall_shuffle_hook()
    # ... and gets Megatron's back, as do the rest.
    assert {name: getattr(G, name) for name in MS.SPEC_BUILDERS} == originals
    assert early.get_gpt_decoder_block_spec is originals["get_gpt_decoder_block_spec"]
    assert late.get_gpt_layer_local_spec is originals["get_gpt_layer_local_spec"]
    assert not MS.is_shuffle_hook_installed()
    MS.uninstall_shuffle_hook()  # idempotent


def _layer_classes(block):
    return [s.module.__name__ for s in block.layer_specs]


def test_without_the_flag_megatron_specs_are_unchanged(hook):
    from megatron.core.models.gpt import gpt_layer_specs as G

    holder, _ = hook
    holder.args = _flag_args(on=False)
    config = _config(freq=[0, 1, 1])
    block = G.get_gpt_decoder_block_spec(config, use_transformer_engine=False, pp_rank=0)
    reference = G.get_gpt_decoder_block_spec.__wrapped__(config, use_transformer_engine=False, pp_rank=0)
    assert _layer_classes(block) == _layer_classes(reference) == ["TransformerLayer"] * 3
    assert block.layer_specs[1].submodules.mlp.__class__ is reference.layer_specs[1].submodules.mlp.__class__
    assert block.layer_norm is reference.layer_norm
    assert G.get_gpt_layer_local_spec(num_experts=8).module.__name__ == "TransformerLayer"


def test_block_spec_with_the_flag(hook):
    from megatron.core.models.gpt import gpt_layer_specs as G
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from megatron_specmoe.megatron.install import SpecMoELayer
    from megatron_specmoe.megatron.shuffle_layer import NoCommColumnParallelLinear, NoCommRowParallelLinear
    from megatron_specmoe.megatron.shuffle_specs import TokenwiseNorm, carrier_of

    config = _config(freq=[0, 1, 1], sp=True)
    block = G.get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="LayerNorm", pp_rank=0)
    # First-k-dense: the dense layer stays Megatron's TransformerLayer.
    assert _layer_classes(block) == ["TransformerLayer", "ShuffleTransformerLayer", "ShuffleTransformerLayer"]
    moe = block.layer_specs[1]
    attention = moe.submodules.self_attention.submodules
    assert (attention.linear_qkv, attention.linear_proj) == (NoCommColumnParallelLinear, NoCommRowParallelLinear)
    mlp = moe.submodules.mlp
    assert getattr(mlp, "module", getattr(mlp, "func", None)) is SpecMoELayer
    # One carrier per model, a new one per call (per model chunk).
    assert carrier_of(block.layer_specs[1]) is carrier_of(block.layer_specs[2])
    again = G.get_gpt_decoder_block_spec(config, use_transformer_engine=False, pp_rank=0)
    assert carrier_of(again.layer_specs[1]) is not carrier_of(block.layer_specs[1])
    # Sequence parallel without Apex: torch norms (which refuse SP) become TokenwiseNorm everywhere.
    if G.LNImpl is WrappedTorchNorm:
        assert block.layer_norm is TokenwiseNorm
        assert all(s.submodules.input_layernorm is TokenwiseNorm for s in block.layer_specs)
    # Without sequence parallelism Megatron's norms stay.
    plain = G.get_gpt_decoder_block_spec(_config(freq=[0, 1, 1]), use_transformer_engine=False, pp_rank=0)
    assert plain.layer_norm is G.LNImpl and _layer_classes(plain) == _layer_classes(block)


def test_local_layer_spec_with_the_flag(hook):
    from megatron.core.models.gpt import gpt_layer_specs as G

    from megatron_specmoe.megatron.shuffle_specs import carrier_of

    spec = G.get_gpt_layer_local_spec(8, False, qk_layernorm=True)
    assert spec.module.__name__ == "ShuffleTransformerLayer"
    assert carrier_of(spec).options.predictor == "pregate"
    assert spec.submodules.self_attention.submodules.q_layernorm is not None
    assert G.get_gpt_layer_local_spec(num_experts=None).module.__name__ == "TransformerLayer"  # dense


def test_hook_refusals(hook, tmp_path):
    from megatron.core.models.gpt import gpt_layer_specs as G

    holder, _ = hook
    with pytest.raises(ValueError, match="TransformerEngine.*Pass --transformer-impl local"):
        G.get_gpt_decoder_block_spec(_config(), use_transformer_engine=True, pp_rank=0)
    with pytest.raises(ValueError, match="TransformerEngine.*Pass --transformer-impl local"):
        G.get_gpt_layer_with_transformer_engine_spec(num_experts=8)
    with pytest.raises(ValueError, match=r"dense layer\(s\) \[1\] come after the MoE layer 0"):
        G.get_gpt_decoder_block_spec(_config(freq=[1, 0, 1], sp=True), use_transformer_engine=False, pp_rank=0)
    # Without sequence parallelism dense layers may sit anywhere (shuffle layers return true order).
    block = G.get_gpt_decoder_block_spec(_config(freq=[1, 0, 1]), use_transformer_engine=False, pp_rank=0)
    assert _layer_classes(block) == ["ShuffleTransformerLayer", "TransformerLayer", "ShuffleTransformerLayer"]
    # The route table indexes MoE layers by moe_layer_freq: dense layers in between are fine ...
    holder.args = _flag_args(predictor="route", plan=str(write_plan(tmp_path / "plan", num_layers=2)))
    block = G.get_gpt_decoder_block_spec(_config(freq=[1, 0, 1]), use_transformer_engine=False, pp_rank=0)
    assert _layer_classes(block) == ["ShuffleTransformerLayer", "TransformerLayer", "ShuffleTransformerLayer"]
    # ... but the route history cannot pass a dense layer.
    holder.args = _flag_args(predictor="history", plan=str(write_plan(tmp_path / "history", kinds=("combined",),
                                                                       num_layers=2)))
    with pytest.raises(ValueError, match=r"route-history predictor .*: dense layer\(s\) \[1\] come after the MoE layer 0"):
        G.get_gpt_decoder_block_spec(_config(freq=[1, 0, 1]), use_transformer_engine=False, pp_rank=0)


LAUNCHED_SCRIPT = """
import json, os
# As Megatron-LM's gpt_builders.py does: the builder imported by name, after the launcher started.
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
import megatron.core.models.gpt.gpt_layer_specs as G
with open(os.environ["SPECMOE_TEST_OUT"], "w") as f:
    json.dump({"by_name": hasattr(get_gpt_decoder_block_spec, "__specmoe_shuffle_hook__"),
               "local": hasattr(G.get_gpt_layer_local_spec, "__specmoe_shuffle_hook__")}, f)
"""


def test_launcher_installs_the_shuffle_hook_around_the_script(monkeypatch, tmp_path):
    import json

    parse(monkeypatch, BASE_ARGV)  # skips where megatron.training (which the launcher needs) is absent
    from megatron.core.models.gpt import gpt_layer_specs as G

    from megatron_specmoe.megatron_lm import launch

    script = tmp_path / "script.py"
    script.write_text(LAUNCHED_SCRIPT)
    monkeypatch.setenv("SPECMOE_TEST_OUT", str(tmp_path / "out.json"))
    original = {name: getattr(G, name) for name in MS.SPEC_BUILDERS}
    assert launch.main([str(script)]) == 0
    assert json.loads((tmp_path / "out.json").read_text()) == {"by_name": True, "local": True}
    assert {name: getattr(G, name) for name in MS.SPEC_BUILDERS} == original
    assert not MS.is_shuffle_hook_installed()


# --------------------------------------------------------------------------- end to end, 4 ranks


def _model_provider(config, vocab, seq):
    """What Megatron-LM's gpt_builder does for an MoE model with --transformer-impl local: the
    decoder block spec through the module attribute, then a GPTModel."""
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.models.gpt.gpt_model import GPTModel

    spec = gpt_layer_specs.get_gpt_decoder_block_spec(
        config, use_transformer_engine=False, normalization=config.normalization, qk_l2_norm=False,
        vp_stage=None)
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=vocab, max_sequence_length=seq,
                    parallel_output=True, share_embeddings_and_output_weights=True,
                    position_embedding_type="rope")


def _reference(config, vocab, seq):
    """The same model built by Megatron without the hook. With sequence parallelism, torch norms
    refuse to build on the CPU, so they are TokenwiseNorm (forward-exact), as the hook makes them."""
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.models.gpt.gpt_model import GPTModel

    from megatron_specmoe.megatron.shuffle_specs import TokenwiseNorm, with_tokenwise_norms

    block = gpt_layer_specs.get_gpt_decoder_block_spec(config, use_transformer_engine=False)
    if config.sequence_parallel:
        block = dataclasses.replace(block, layer_specs=[with_tokenwise_norms(s) for s in block.layer_specs],
                                    layer_norm=TokenwiseNorm)
    return GPTModel(config=config, transformer_layer_spec=block, vocab_size=vocab, max_sequence_length=seq,
                    parallel_output=True, share_embeddings_and_output_weights=True,
                    position_embedding_type="rope")


def _e2e_worker(rank, world, cases):
    warnings.filterwarnings("ignore")
    from megatron.core import parallel_state

    from megatron_specmoe.megatron import cpu_support
    from megatron_specmoe.megatron import parallel
    from megatron_specmoe.megatron_lm import runtime as R
    from megatron_specmoe.megatron.build import MoEShape, make_config
    from megatron_specmoe.megatron.shuffle_layer import ShuffleTransformerLayer

    cpu_support.enable()
    parallel.initialize(parallel.ParallelLayout(tp=4, ep=4, etp=1), seed=5)
    results = []
    try:
        for freq, sp, predictor, plan in cases:
            shape = MoEShape(layers=len(freq), vocab=64, seq=16)
            make = dict(tp=4, ep=4, sequence_parallel=sp, moe_layer_freq=list(freq))
            ref = _reference(make_config(shape, dispatcher="alltoall", **make), shape.vocab, shape.seq).eval()
            args = argparse.Namespace(
                moe_token_dispatcher_type="specmoe", specmoe_shuffle=True, specmoe_predictor=FLAG_OF[predictor],
                specmoe_plan=plan, specmoe_record_routes=None, specmoe_record_every=0, specmoe_stats=None)
            MS.install_shuffle_hook(get_args=lambda: args)
            try:
                model = _model_provider(make_config(shape, dispatcher="specmoe", **make), shape.vocab, shape.seq)
            finally:
                MS.uninstall_shuffle_hook()
            model.eval()
            with torch.no_grad():  # larger router weights, so that routing (and the plans) vary
                for i, layer in enumerate(m for m in ref.modules() if hasattr(m, "router")):
                    gen = torch.Generator().manual_seed(i)
                    layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=gen) * 2)
            model.load_state_dict(ref.state_dict(), strict=True)  # identical weights, contiguous experts
            wrapped = [_Wrapper(model)]
            runtime = R.setup_specmoe_runtime(wrapped, args, after_load=True)  # what get_model's hook does
            carrier = MS.shuffle_carriers(model)[0]
            carrier.options = dataclasses.replace(carrier.options, keep_plans=True)
            tp_rank = parallel_state.get_tensor_model_parallel_rank()
            gen = torch.Generator().manual_seed(17 + parallel_state.get_data_parallel_rank())
            tokens = torch.randint(0, shape.vocab, (2, 8), generator=gen)
            positions = torch.arange(8).unsqueeze(0).expand(2, -1)
            mask = torch.triu(torch.ones(1, 1, 8, 8, dtype=torch.bool), diagonal=1)
            with torch.no_grad():
                want = ref(tokens, positions, mask)
                got = wrapped[0](tokens, positions, mask)
            results.append({
                "diff": float((got - want).abs().max()),
                "shape_equal": tuple(got.shape) == tuple(want.shape),
                "classes": [type(layer).__name__ for layer in model.decoder.layers],
                # T = 16 tokens over 4 ranks: no pad rows, Megatron's order is 0 .. 15.
                "shuffled": sum(not torch.equal(p.order.cpu(), torch.arange(16)) for _, p in carrier.plans),
                "plans": len(carrier.plans),
                "handles": len(runtime.shuffle_handles),
                "consumer": carrier.output_consumer,
                "tp_rank": tp_rank,
                "is_shuffle": [isinstance(layer, ShuffleTransformerLayer) for layer in model.decoder.layers],
            })
            runtime.close()
            results[-1]["closed_consumer"] = carrier.output_consumer
            # A model built without the hook (e.g. from --spec): the runtime says so, not silently.
            try:
                MS.attach_shuffle_outputs([ref])
                results[-1]["unhooked"] = ""
            except ValueError as err:
                results[-1]["unhooked"] = str(err)
        return results
    finally:
        parallel.destroy()


def test_megatron_builder_with_the_hook_is_lossless(tmp_path):
    plan = str(write_plan(tmp_path / "plan", num_layers=2, hidden_size=16))
    history_plan = str(write_plan(tmp_path / "history", kinds=("combined",), num_layers=2, hidden_size=16))
    cases = [
        # Sequence parallel, first layer dense (first-k-dense), pregate.
        ([0, 1, 1], True, "pregate", None),
        # No sequence parallelism, every layer MoE, the plan's token table on the token ids.
        ([1, 1], False, "route", plan),
        # The token table with a dense layer between MoE layers (MoE index from moe_layer_freq).
        ([1, 0, 1], False, "route", plan),
        # Sequence parallel, first-k-dense, the plan's token table + route-history MLP.
        ([0, 1, 1], True, "history", history_plan),
    ]
    results = run_local(_e2e_worker, 4, cases)
    for i, (freq, sp, predictor, _) in enumerate(cases):
        for rank, per_case in enumerate(results):
            res = per_case[i]
            where = (freq, sp, predictor, rank)
            assert res["shape_equal"] and res["diff"] <= TOL, (where, res["diff"])
            assert res["classes"] == ["ShuffleTransformerLayer" if x else "TransformerLayer" for x in freq], where
            assert res["plans"] == sum(freq), where  # one plan per MoE layer per forward
            # true_order_output with SP, feed_token_ids with route and history.
            assert res["handles"] == int(sp) + int(predictor in ("route", "history")), where
            assert res["consumer"] == ("output_layer" if sp else None), where
            assert res["closed_consumer"] is None, where  # close() undid it
            assert "chunk 0 has MoE layers but no ShuffleTransformerLayer" in res["unhooked"], where
        # The plans actually moved tokens (not Megatron's contiguous shards) somewhere.
        assert sum(r[i]["shuffled"] for r in results) > 0, (freq, sp, predictor)


def test_te_refusal_names_the_gpu_check_where_te_is_present(monkeypatch):
    from megatron_specmoe.megatron_lm import checks

    real = checks.importlib.util.find_spec
    args = parse(monkeypatch, [*BASE_ARGV, *without(GOOD, "--transformer-impl")])
    # Here TE is absent: the message says so and asks for local linears.
    with pytest.raises(M.SpecMoEArgumentError, match="TransformerEngine is not installed here.*Pass --transformer-impl local"):
        M.validate_specmoe_args(args)
    # Where TE is importable, the refusal stays and names the check that lifts it.
    monkeypatch.setattr(checks.importlib.util, "find_spec",
                        lambda name, *a: object() if name == "transformer_engine" else real(name, *a))
    with pytest.raises(M.SpecMoEArgumentError, match=r"--transformer-impl transformer_engine.*stay refused until "
                       r"tools/gpu_check.sh has verified them on a GPU.*Pass --transformer-impl local"):
        M.validate_specmoe_args(args)
    with pytest.raises(ValueError, match="--specmoe-shuffle: get_gpt_layer_with_transformer_engine_spec.*"
                       "tools/gpu_check.sh has verified them"):
        raise MS._refuse_te("get_gpt_layer_with_transformer_engine_spec(num_experts=...)")


def test_deepseek_layers_are_accepted(monkeypatch, capsys):
    """Multi-latent attention, a shared expert at TP 4 and group-limited routing with an expert bias
    (DeepSeek's layers) pass the check before any GPU work: no refusal row names them any more."""
    deepseek = ["--multi-latent-attention", "--kv-lora-rank", "32", "--qk-head-dim", "16",
                "--qk-pos-emb-head-dim", "8", "--v-head-dim", "16",
                "--moe-shared-expert-intermediate-size", "128", "--moe-router-num-groups", "4",
                "--moe-router-group-topk", "2", "--moe-router-score-function", "sigmoid",
                "--moe-router-enable-expert-bias"]
    args = parse(monkeypatch, [*BASE_ARGV, *GOOD, *deepseek])
    assert M.validate_specmoe_args(args) == M.SpecMoEArgsCheck(active=True, method="shuffle",
                                                               predictor="pregate", shuffle="pregate")
