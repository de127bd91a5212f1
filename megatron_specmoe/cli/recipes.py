"""``specmoe recipes``: print or write the calibrate -> plan -> serve recipes (torchrun, SLURM).

    specmoe recipes --model mixtral-8x7b --nodes 2 --launcher slurm --step serve --dry-run
    specmoe recipes --model all --nodes 1 --launcher torchrun --write recipes/
    specmoe recipes --committed --write recipes/      (regenerate the files kept in recipes/)
"""

from __future__ import annotations

import argparse
import sys

HELP = "print (--dry-run) or write (--write DIR) torchrun/SLURM recipes: calibrate, plan, serve"

_MODELS = ("mixtral-8x7b", "deepseek-v2-lite", "qwen3-30b-a3b")  # recipes.ModelName
_STEPS = ("calibrate", "plan", "serve")  # recipes.Step


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=(*_MODELS, "all"), default=None,
                        help="model preset, or 'all'")
    parser.add_argument("--nodes", type=int, default=1, help="node count (default 1)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    parser.add_argument("--launcher", choices=("torchrun", "slurm"), default="torchrun",
                        help="torchrun (run on each node) or slurm (an sbatch file)")
    parser.add_argument("--step", choices=(*_STEPS, "all"), default="all",
                        help="with --dry-run: the step(s) to print (default all)")
    parser.add_argument("--recorder", choices=("specmoe", "megatron"), default="specmoe",
                        help="calibration route recorder: --specmoe-record-routes (with token "
                        "ids) or Megatron's --moe-routing-trace-path")
    parser.add_argument("--predictor", default="token",
                        choices=("token", "layer", "history", "combined", "pregate"),
                        help="--specmoe-predictor to plan and serve with (default token, the one "
                        "request placement takes; the others are refused)")
    parser.add_argument("--committed", action="store_true",
                        help="the recipes kept in the repository's recipes/ folder")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--dry-run", action="store_true",
                      help="print the exact commands without running anything")
    what.add_argument("--write", metavar="DIR", default=None,
                      help="write the shell files into DIR")


def run(args: argparse.Namespace) -> int:
    from megatron_specmoe.artifacts.errors import SpecMoEUsageError
    from megatron_specmoe.artifacts.files import check_output_dir
    from megatron_specmoe.megatron_lm import recipes as R

    for flag, value in (("--nodes", args.nodes), ("--gpus-per-node", args.gpus_per_node)):
        if value < 1:
            raise SpecMoEUsageError(f"{flag} {value}: must be >= 1", f"give a positive {flag}, e.g. {flag} 8")
    if args.write is not None:
        check_output_dir("--write", args.write)
    try:
        if args.committed:
            chosen = R.committed_recipes()
        else:
            if args.model is None:
                raise SpecMoEUsageError("no model chosen", "pass --model NAME (or all), or --committed")
            names = list(R.PRESETS) if args.model == "all" else [args.model]
            chosen = [R.make_recipe(name, nodes=args.nodes, launcher=args.launcher,
                                    gpus_per_node=args.gpus_per_node, recorder=args.recorder,
                                    predictor=args.predictor) for name in names]
    except SpecMoEUsageError:
        raise
    except ValueError as exc:
        raise SpecMoEUsageError(str(exc), "change --model / --nodes / --gpus-per-node / --recorder / "
                                "--predictor as the message says") from None
    if args.dry_run:
        steps = R.STEPS if args.step == "all" else (args.step,)
        print("\n".join(r.dry_run(steps) for r in chosen), end="")
        return 0
    for path in R.write_recipes(chosen, args.write):
        print(path, file=sys.stderr)
    return 0
