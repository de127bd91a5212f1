"""Megatron-LM command line: the specmoe flags, the widened dispatcher choice, early checks, the
parse_args hook and specmoe-launch, against the real ``megatron.training.arguments`` (shipped in
the megatron-core 0.19 wheel; tests that need it skip where it is absent, e.g. core 0.16.1).

CPU-only adjustments, all local to these tests:
- megatron-core 0.19 declares Python >= 3.12 and ``megatron.training`` imports ``typing.override``;
  on 3.11 the tests add it from ``typing_extensions`` before importing megatron.
- ``validate_args`` asks the GPU for its architecture when TP > 1; the tests that run it pretend
  to be on Hopper (``get_device_arch_version`` -> 9) and set ``CUDA_DEVICE_MAX_CONNECTIONS=1``.
"""

from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path

import numpy as np
import pytest

from megatron_specmoe.megatron_lm import args as M

# The smallest MoE command line Megatron-LM's parse_args + validate_args accept on the CPU.
BASE_ARGV = [
    "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", "128", "--max-position-embeddings", "128", "--micro-batch-size", "1",
    "--num-experts", "8", "--moe-router-topk", "2",
]
GOOD_LAYOUT = [
    "--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "4",
    "--expert-tensor-parallel-size", "1", "--sequence-parallel",
]
# What token shuffling (on by default with TP > 1) needs on top: Megatron's local linears.
SHUFFLE_READY = ["--transformer-impl", "local"]


def megatron_training(name: str = "arguments"):
    """megatron.training.<name>, or skip (absent from the megatron-core wheel before 0.19). On
    Python 3.11 it needs typing.override, which typing_extensions provides."""
    import importlib

    if not hasattr(typing, "override"):
        import typing_extensions

        typing.override = typing_extensions.override
    try:
        return importlib.import_module(f"megatron.training.{name}")
    except ImportError as exc:
        pytest.skip(f"megatron.training is not importable here ({exc}); it ships from core 0.19")


def megatron_arguments():
    """megatron.training.arguments, or skip."""
    return megatron_training("arguments")


def parse(monkeypatch, argv, provider=M.add_specmoe_args, world_size=8):
    """Megatron-LM's own parse_args on argv (sys.argv is what it reads)."""
    A = megatron_arguments()
    monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py", *argv])
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setenv("RANK", "0")
    return A.parse_args(extra_args_provider=provider)


def cpu_validate_args(monkeypatch):
    A = megatron_arguments()
    monkeypatch.setattr(A, "get_device_arch_version", lambda: 9)
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    return A


# --------------------------------------------------------------------------- parser


def test_real_parser_accepts_specmoe_and_our_flags(monkeypatch, tmp_path):
    args = parse(monkeypatch, [
        *BASE_ARGV, *GOOD_LAYOUT, "--moe-token-dispatcher-type", "specmoe",
        "--specmoe-plan", str(tmp_path / "plan"), "--specmoe-predictor", "history",
        "--specmoe-stats", "stats/rank{rank}.jsonl", "--specmoe-record-routes", "routes",
        "--specmoe-fallback-alltoall",
    ])
    assert args.moe_token_dispatcher_type == "specmoe"
    assert args.specmoe_plan == str(tmp_path / "plan")
    assert args.specmoe_predictor == "history"
    assert args.specmoe_stats == "stats/rank{rank}.jsonl"
    assert args.specmoe_record_routes == "routes"
    assert args.specmoe_fallback_alltoall is True


def test_real_parser_defaults_of_our_flags(monkeypatch):
    args = parse(monkeypatch, BASE_ARGV)
    assert args.moe_token_dispatcher_type == "allgather"  # Megatron's own default is untouched
    assert (args.specmoe_plan, args.specmoe_record_routes, args.specmoe_stats) == (None, None, None)
    assert args.specmoe_predictor is None  # the plan's first predictor, or pregate without a plan
    assert args.specmoe_fallback_alltoall is False
    assert (args.specmoe_shuffle, args.specmoe_request_placement) == (False, False)


def test_real_parser_rejects_specmoe_without_our_provider(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        parse(monkeypatch, [*BASE_ARGV, "--moe-token-dispatcher-type", "specmoe"], provider=None)
    assert "invalid choice: 'specmoe'" in capsys.readouterr().err


def test_real_parser_rejects_unknown_predictor(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        parse(monkeypatch, [*BASE_ARGV, "--specmoe-predictor", "oracle"])
    assert "invalid choice: 'oracle'" in capsys.readouterr().err


def test_widening_core016_generated_choices_is_idempotent():
    A = megatron_arguments()
    parser = argparse.ArgumentParser(allow_abbrev=False)
    A.add_megatron_arguments(parser)
    action = parser._option_string_actions["--moe-token-dispatcher-type"]
    before = tuple(action.choices)
    assert "specmoe" not in before
    M.add_specmoe_args(parser)
    M.add_specmoe_args(parser)  # a second provider in the chain must not add anything twice
    assert tuple(action.choices) == before + ("specmoe",)
    groups = [g for g in parser._action_groups if g.title == "specmoe"]
    assert len(groups) == 1 and len(groups[0]._group_actions) == len(M.SPECMOE_OPTION_STRINGS)


def test_widening_core015_literal_choices_list():
    # Up to core 0.15, Megatron-LM declared the flag with a literal list (no megatron needed here).
    parser = argparse.ArgumentParser()
    parser.add_argument("--moe-token-dispatcher-type", type=str, default="allgather",
                        choices=["allgather", "alltoall", "flex"])
    M.add_specmoe_args(parser)
    args = parser.parse_args(["--moe-token-dispatcher-type", "specmoe", "--specmoe-plan", "p"])
    assert args.moe_token_dispatcher_type == "specmoe" and args.specmoe_plan == "p"
    assert parser._option_string_actions["--moe-token-dispatcher-type"].choices == [
        "allgather", "alltoall", "flex", "specmoe"]


def test_add_specmoe_args_needs_megatron_parser():
    with pytest.raises(ValueError, match="has no --moe-token-dispatcher-type.*extra_args_provider"):
        M.add_specmoe_args(argparse.ArgumentParser())


def test_compose_keeps_the_scripts_provider(monkeypatch):
    def script_provider(parser):
        parser.add_argument("--port", type=int, default=5000)
        return parser

    composed = M.compose(script_provider)
    assert M.compose(composed) is composed
    assert M.compose(None) is M.add_specmoe_args
    args = parse(monkeypatch, [*BASE_ARGV, "--port", "6000", "--moe-token-dispatcher-type",
                               "specmoe"], provider=composed)
    assert args.port == 6000 and args.moe_token_dispatcher_type == "specmoe"


def test_compose_accepts_a_provider_that_returns_none():
    parser = argparse.ArgumentParser()
    parser.add_argument("--moe-token-dispatcher-type", choices=["alltoall"])
    composed = M.compose(lambda p: p.add_argument("--extra") and None)
    assert composed(parser) is parser
    assert parser.parse_args(["--extra", "1", "--moe-token-dispatcher-type", "specmoe"]).extra == "1"


# --------------------------------------------------------------------------- checks


def specmoe_args(monkeypatch, *extra, layout=GOOD_LAYOUT):
    return parse(monkeypatch, [*BASE_ARGV, *layout, *SHUFFLE_READY, "--moe-token-dispatcher-type", "specmoe",
                               *extra])


def test_predictor_that_needs_a_plan_without_one(monkeypatch):
    args = specmoe_args(monkeypatch, "--specmoe-predictor", "history")
    with pytest.raises(M.SpecMoEArgumentError, match="--specmoe-predictor history needs --specmoe-plan"):
        M.validate_specmoe_args(args)


def test_pregate_needs_no_plan(monkeypatch):
    args = specmoe_args(monkeypatch, "--specmoe-predictor", "pregate")
    check = M.validate_specmoe_args(args)
    assert check == M.SpecMoEArgsCheck(active=True, method="shuffle", predictor="pregate", shuffle="pregate")
    assert args.moe_token_dispatcher_type == "specmoe" and args.specmoe_shuffle
    # Without --specmoe-predictor and without a plan, the same.
    assert M.validate_specmoe_args(specmoe_args(monkeypatch)) == check


@pytest.mark.parametrize("layout, message", [
    (["--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "1",
      "--expert-tensor-parallel-size", "1"], "--expert-model-parallel-size is 1"),
    (["--tensor-model-parallel-size", "8", "--expert-model-parallel-size", "4",
      "--expert-tensor-parallel-size", "1"], r"TP group \(8 ranks\) is not inside one EP group \(4"),
    # ETP not given: Megatron-LM makes it TP (2), so experts would be split.
    (["--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "4"],
     "expert tensor parallel size is 2.*--expert-tensor-parallel-size 1"),
])
def test_layouts_where_the_dispatcher_can_do_nothing(monkeypatch, layout, message):
    args = specmoe_args(monkeypatch, "--specmoe-predictor", "pregate", layout=layout)
    with pytest.raises(M.SpecMoEArgumentError, match=message + ".*--specmoe-fallback-alltoall"):
        M.validate_specmoe_args(args)
    assert args.moe_token_dispatcher_type == "specmoe"  # no silent fallback


def test_fallback_to_alltoall_only_when_asked(monkeypatch, capsys):
    layout = ["--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "1",
              "--expert-tensor-parallel-size", "1"]
    args = specmoe_args(monkeypatch, "--specmoe-fallback-alltoall", "--specmoe-plan", "p",
                        layout=layout)
    check = M.validate_specmoe_args(args)
    assert not check.active and "--expert-model-parallel-size is 1" in check.fallback_reason
    assert args.moe_token_dispatcher_type == "alltoall"
    assert "specmoe: falling back to alltoall" in capsys.readouterr().err
    assert M.validate_specmoe_args(args) == check  # a second look gives the same answer


def test_unsupported_settings_are_named(monkeypatch):
    args = specmoe_args(monkeypatch, "--specmoe-predictor", "pregate", "--moe-shared-expert-overlap",
                        "--moe-shared-expert-intermediate-size", "128")
    with pytest.raises(M.SpecMoEArgumentError, match="does not support --moe-shared-expert-overlap"):
        M.validate_specmoe_args(args)
    args = specmoe_args(monkeypatch, "--specmoe-predictor", "pregate",
                        "--moe-expert-capacity-factor", "1.0", "--moe-pad-expert-input-to-capacity")
    with pytest.raises(M.SpecMoEArgumentError, match="--moe-pad-expert-input-to-capacity: padding"):
        M.validate_specmoe_args(args)


def test_specmoe_needs_an_moe_model(monkeypatch):
    argv = [a for a in BASE_ARGV if a not in ("--num-experts", "8", "--moe-router-topk", "2")]
    args = parse(monkeypatch, [*argv, *GOOD_LAYOUT, "--moe-token-dispatcher-type", "specmoe"])
    with pytest.raises(M.SpecMoEArgumentError, match="--num-experts is not set"):
        M.validate_specmoe_args(args)


def test_specmoe_flags_with_another_dispatcher(monkeypatch):
    args = parse(monkeypatch, [*BASE_ARGV, "--moe-token-dispatcher-type", "alltoall",
                               "--specmoe-plan", "p"])
    with pytest.raises(M.SpecMoEArgumentError, match="--specmoe-plan only appl.*is 'alltoall'"):
        M.validate_specmoe_args(args)
    # Recording routes is what a calibration run does with the stock dispatcher.
    args = parse(monkeypatch, [*BASE_ARGV, "--moe-token-dispatcher-type", "alltoall",
                               "--specmoe-record-routes", "routes"])
    assert M.validate_specmoe_args(args) == M.SpecMoEArgsCheck(active=False)


def test_args_parsed_without_our_provider_are_reported():
    with pytest.raises(M.SpecMoEArgumentError, match="parsed without the specmoe flags"):
        M.validate_specmoe_args(argparse.Namespace(moe_token_dispatcher_type="specmoe"))


def write_plan(folder: Path, *, num_layers=4, num_experts=8, topk=2, ep_size=4, kinds=("history",)):
    from megatron_specmoe.artifacts.plan_folder import make_plan, save_plan

    state = {kind: {"config": {}, "arrays": {"w": np.zeros((2, 2), np.float32)}} for kind in kinds}
    save_plan(make_plan(num_layers=num_layers, num_experts=num_experts, topk=topk,
                        ep_size=ep_size, hidden_size=64, predictor_state=state), folder)
    return folder


def test_matching_plan_is_accepted(monkeypatch, tmp_path):
    plan = write_plan(tmp_path / "plan")
    args = specmoe_args(monkeypatch, "--specmoe-plan", str(plan), "--specmoe-predictor", "history")
    assert M.validate_specmoe_args(args) == M.SpecMoEArgsCheck(
        active=True, method="shuffle", predictor="history", plan=plan, shuffle="history")
    # Unset, the predictor is the plan's first.
    args = specmoe_args(monkeypatch, "--specmoe-plan", str(plan))
    assert M.validate_specmoe_args(args).predictor == "history" and args.specmoe_predictor == "history"


def test_plan_for_another_shape(monkeypatch, tmp_path):
    plan = write_plan(tmp_path / "plan", num_experts=16, ep_size=8)
    args = specmoe_args(monkeypatch, "--specmoe-plan", str(plan), "--specmoe-predictor", "history")
    with pytest.raises(M.SpecMoEArgumentError,
                       match=r"(?s)--specmoe-plan .*num_experts=16 but the run has num_experts=8.*"
                             r"ep_size=8 but the run has ep_size=4"):
        M.validate_specmoe_args(args)


def test_plan_counts_only_moe_layers(monkeypatch, tmp_path):
    # DeepSeek-style: first layer dense, so 3 MoE layers out of 4.
    plan = write_plan(tmp_path / "plan", num_layers=3)
    args = specmoe_args(monkeypatch, "--specmoe-plan", str(plan), "--specmoe-predictor", "history",
                        "--moe-layer-freq", "([0]+[1]*3)")
    assert M.num_moe_layers(args) == 3
    assert M.validate_specmoe_args(args).active
    args.moe_layer_freq = 2  # layers 0 and 2
    with pytest.raises(M.SpecMoEArgumentError, match="num_layers=3 but the run has num_layers=2"):
        M.validate_specmoe_args(args)


def test_plan_without_the_chosen_predictor(monkeypatch, tmp_path):
    plan = write_plan(tmp_path / "plan", kinds=("token",))
    args = specmoe_args(monkeypatch, "--specmoe-plan", str(plan), "--specmoe-predictor", "history")
    with pytest.raises(M.SpecMoEArgumentError, match="holds no such predictor \\(it has token\\)"):
        M.validate_specmoe_args(args)


def test_missing_plan_directory(monkeypatch, tmp_path):
    args = specmoe_args(monkeypatch, "--specmoe-plan", str(tmp_path / "nope"))
    with pytest.raises(M.SpecMoEArgumentError, match="nope: no such directory.*specmoe plan"):
        M.validate_specmoe_args(args)


# --------------------------------------------------------------------------- config Literal


def test_widen_and_narrow_the_config_literal():
    A = megatron_arguments()
    from megatron.core.transformer import MLATransformerConfig, TransformerConfig

    field = TransformerConfig.__dataclass_fields__["moe_token_dispatcher_type"]
    original = typing.get_args(field.type)
    try:
        assert M.widen_dispatcher_literal() is True
        assert M.widen_dispatcher_literal() is False
        assert typing.get_args(field.type) == original + ("specmoe",)
        mla_field = MLATransformerConfig.__dataclass_fields__["moe_token_dispatcher_type"]
        assert "specmoe" in typing.get_args(mla_field.type)
        # Megatron-LM's generated argument now offers it without any provider.
        parser = argparse.ArgumentParser(allow_abbrev=False)
        A.add_megatron_arguments(parser)
        assert "specmoe" in parser._option_string_actions["--moe-token-dispatcher-type"].choices
    finally:
        M.narrow_dispatcher_literal()
    assert typing.get_args(field.type) == original
    assert M.narrow_dispatcher_literal() is False


# --------------------------------------------------------------------------- parse_args hook


def test_args_hook_composes_and_validates_then_reverts(monkeypatch):
    A = cpu_validate_args(monkeypatch)
    original_parse, original_validate = A.parse_args, A.validate_args

    def script_provider(parser):
        parser.add_argument("--port", type=int, default=5000)
        return parser

    try:
        patched = M.install_args_hook()
        assert M.install_args_hook() == patched  # idempotent
        assert "megatron.training.arguments.parse_args" in patched
        assert "megatron.training.arguments.validate_args" in patched
        assert M.is_args_hook_installed()
        args = parse(monkeypatch, [*BASE_ARGV, *GOOD_LAYOUT, *SHUFFLE_READY, "--port", "1",
                                   "--moe-token-dispatcher-type", "specmoe",
                                   "--specmoe-predictor", "pregate"], provider=script_provider)
        assert args.port == 1 and args.moe_token_dispatcher_type == "specmoe"
        A.validate_args(args, {})  # Megatron's checks, then ours: this layout is fine
        # ... and Megatron-LM's own args -> TransformerConfig copy keeps the choice.
        config = A.core_transformer_config_from_args(args)
        assert config.moe_token_dispatcher_type == "specmoe"
        assert (config.expert_model_parallel_size, config.expert_tensor_parallel_size) == (4, 1)
        bad = parse(monkeypatch, [*BASE_ARGV, *GOOD_LAYOUT, *SHUFFLE_READY, "--moe-token-dispatcher-type",
                                  "specmoe", "--specmoe-predictor", "token"], provider=script_provider)
        with pytest.raises(M.SpecMoEArgumentError, match="needs --specmoe-plan"):
            A.validate_args(bad, {})
    finally:
        M.uninstall_args_hook()
    M.uninstall_args_hook()
    assert not M.is_args_hook_installed()
    assert A.parse_args is original_parse and A.validate_args is original_validate


# --------------------------------------------------------------------------- specmoe-launch

SCRIPT = '''
import json, os, sys
from megatron.training.arguments import parse_args, validate_args
import megatron_specmoe

def add_script_args(parser):          # a script's own provider, as Megatron-LM scripts have
    parser.add_argument("--port", type=int, default=5000)
    return parser

args = parse_args(extra_args_provider=add_script_args)
validate_args(args, {})
with open(os.environ["SPECMOE_TEST_OUT"], "w") as f:
    json.dump({"name": __name__, "argv": sys.argv, "path0": sys.path[0], "port": args.port,
               "dispatcher": args.moe_token_dispatcher_type,
               "predictor": args.specmoe_predictor,
               "installed": megatron_specmoe.is_installed()}, f)
if args.port == 13:
    sys.exit(13)
'''


@pytest.fixture
def fake_install(monkeypatch):
    """Stand-in for megatron_specmoe.install() so that these tests check the launcher's argument
    plumbing alone (the real install is tested where megatron/install.py is)."""
    import megatron_specmoe

    state = {"installed": False, "calls": []}

    def install():
        state["calls"].append("install")
        state["installed"] = True

    def uninstall():
        state["calls"].append("uninstall")
        state["installed"] = False

    monkeypatch.setattr(megatron_specmoe, "install", install)
    monkeypatch.setattr(megatron_specmoe, "uninstall", uninstall)
    monkeypatch.setattr(megatron_specmoe, "is_installed", lambda: state["installed"])
    return state


def launch_argv(monkeypatch, tmp_path, *extra):
    import json

    cpu_validate_args(monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "0")
    out = tmp_path / "out.json"
    monkeypatch.setenv("SPECMOE_TEST_OUT", str(out))
    argv = [*BASE_ARGV, *GOOD_LAYOUT, *SHUFFLE_READY, "--moe-token-dispatcher-type", "specmoe",
            "--specmoe-predictor", "pregate", *extra]
    return argv, (lambda: json.loads(out.read_text()))


def test_launch_runs_an_unmodified_script(monkeypatch, tmp_path, fake_install):
    from megatron_specmoe.megatron_lm import launch

    A = megatron_arguments()
    script = tmp_path / "scripts" / "serve.py"
    script.parent.mkdir()
    script.write_text(SCRIPT)
    argv, result = launch_argv(monkeypatch, tmp_path, "--port", "7")
    saved_argv = list(sys.argv)
    assert launch.main([str(script), *argv]) == 0
    seen = result()
    assert seen["name"] == "__main__" and seen["argv"] == [str(script), *argv]
    assert seen["path0"] == str(script.parent.resolve())
    assert (seen["port"], seen["dispatcher"], seen["predictor"]) == (7, "specmoe", "pregate")
    assert seen["installed"] is True
    # Everything is put back.
    assert fake_install["calls"] == ["install", "uninstall"] and not fake_install["installed"]
    assert not M.is_args_hook_installed() and not hasattr(A.parse_args, "__wrapped__")
    assert sys.argv == saved_argv


def test_launch_reports_bad_combinations_before_the_script_goes_on(monkeypatch, tmp_path,
                                                                     fake_install):
    from megatron_specmoe.megatron_lm import launch

    script = tmp_path / "serve.py"
    script.write_text(SCRIPT)
    argv, _ = launch_argv(monkeypatch, tmp_path, "--expert-model-parallel-size", "1")
    with pytest.raises(M.SpecMoEArgumentError, match="--expert-model-parallel-size is 1"):
        launch.main([str(script), *argv])
    assert not (tmp_path / "out.json").exists()
    assert not M.is_args_hook_installed() and not fake_install["installed"]


def test_launch_passes_the_scripts_exit_code_and_cleans_up(monkeypatch, tmp_path, fake_install):
    from megatron_specmoe.megatron_lm import launch

    script = tmp_path / "serve.py"
    script.write_text(SCRIPT)
    argv, result = launch_argv(monkeypatch, tmp_path, "--port", "13")
    with pytest.raises(SystemExit) as exc:
        launch.main([str(script), *argv])
    assert exc.value.code == 13 and result()["port"] == 13
    assert not M.is_args_hook_installed() and not fake_install["installed"]


def test_launch_runs_a_module(monkeypatch, tmp_path, fake_install):
    from megatron_specmoe.megatron_lm import launch

    pkg = tmp_path / "examples_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "server.py").write_text(SCRIPT)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    argv, result = launch_argv(monkeypatch, tmp_path)
    assert launch.main(["-m", "examples_pkg.server", *argv]) == 0
    seen = result()
    assert seen["name"] == "__main__" and seen["path0"] == str(tmp_path)
    assert seen["argv"][0].endswith("server.py") and seen["argv"][1:] == argv


@pytest.mark.parametrize("argv, message", [
    ([], "no script given"),
    (["-m"], "-m needs a module name"),
    (["--nproc", "8"], "unknown option '--nproc' before the script"),
    (["missing_script.py"], "missing_script.py does not exist"),
])
def test_launch_usage_errors(argv, message, capsys):
    """The specmoe-launch entry point: one line, exit 2, no traceback (docs/cli_errors.md)."""
    from megatron_specmoe import launch

    assert launch.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("specmoe-launch: error: ") and message in err and " -- " in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_launch_argument_error_is_one_line_not_a_traceback(monkeypatch, tmp_path, fake_install, capsys):
    """Issue 18 finding 5: a --specmoe-* refusal arrived under a 10-frame traceback."""
    from megatron_specmoe import launch

    script = tmp_path / "serve.py"
    script.write_text(SCRIPT)
    argv, _ = launch_argv(monkeypatch, tmp_path, "--expert-model-parallel-size", "1")
    assert launch.main([str(script), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("specmoe-launch: error: ") and "--expert-model-parallel-size is 1" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out.json").exists()
    with pytest.raises(M.SpecMoEArgumentError):  # --debug: the exception and its traceback
        launch.main(["--debug", str(script), *argv])


def test_find_megatron_root(tmp_path):
    from megatron_specmoe.megatron_lm.launch import find_megatron_root

    (tmp_path / "megatron" / "training").mkdir(parents=True)
    (tmp_path / "megatron" / "training" / "arguments.py").write_text("")
    deep = tmp_path / "examples" / "inference"
    deep.mkdir(parents=True)
    assert find_megatron_root(deep) == tmp_path.resolve()
    other = tmp_path / "other"
    other.mkdir()
    (other / "megatron" / "core").mkdir(parents=True)  # a wheel layout: no training/
    assert find_megatron_root(other / "megatron") == tmp_path.resolve()  # found further up
    assert find_megatron_root(Path("/")) is None


def test_launch_installs_the_real_plugin(monkeypatch, tmp_path):
    """With the project's own install() (megatron/install.py)."""
    import megatron_specmoe
    from megatron_specmoe.megatron_lm import launch

    megatron_arguments()
    script = tmp_path / "serve.py"
    script.write_text(SCRIPT)
    argv, result = launch_argv(monkeypatch, tmp_path)
    was = megatron_specmoe.is_installed()
    assert launch.main([str(script), *argv]) == 0
    assert result()["installed"] is True
    assert megatron_specmoe.is_installed() is was


def test_python_dash_m_launch_end_to_end(tmp_path):
    """`python -m megatron_specmoe.launch SCRIPT ...` in a fresh process, real install(); the
    layout (TP=1, EP=1) cannot benefit and --specmoe-fallback-alltoall was given, so the script
    runs with alltoall and a warning."""
    import json
    import os
    import subprocess

    megatron_arguments()
    script = tmp_path / "serve.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out.json"
    # Python 3.11 only: add typing.override before megatron.training is imported (see the top).
    code = ("import sys, typing, typing_extensions, runpy\n"
            "typing.override = getattr(typing, 'override', typing_extensions.override)\n"
            "sys.argv[0] = 'launch'\n"
            "runpy.run_module('megatron_specmoe.launch', run_name='__main__', alter_sys=True)\n")
    env = {**os.environ, "SPECMOE_TEST_OUT": str(out), "WORLD_SIZE": "1", "RANK": "0",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(script), *BASE_ARGV, "--moe-token-dispatcher-type",
         "specmoe", "--specmoe-fallback-alltoall", "--port", "9"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(out.read_text())
    assert seen["dispatcher"] == "alltoall" and seen["port"] == 9 and seen["installed"] is True
    assert "specmoe: falling back to alltoall: the specmoe dispatcher can do nothing" in proc.stderr
