"""``specmoe-launch``: run an unmodified Megatron-LM script with the specmoe plug-in.

    specmoe-launch SCRIPT.py ARGS...          (or python -m megatron_specmoe.launch SCRIPT.py ...)
    specmoe-launch -m PACKAGE.MODULE ARGS...  (e.g. -m examples.inference.launch_inference_server)

Under torchrun every rank runs the launcher: ``torchrun ... -m megatron_specmoe.launch SCRIPT.py``
or ``torchrun ... --no-python specmoe-launch SCRIPT.py``.

Steps, in this order:
1. ``sys.path`` as Python would set it for the script (its folder first; the working directory
   for ``-m``), so that the script's own imports behave as without the launcher.
2. ``megatron_specmoe.install()``: MoELayer builds the specmoe dispatcher when
   ``config.moe_token_dispatcher_type == "specmoe"``.
3. ``megatron_lm.args.install_args_hook()``: Megatron-LM's ``parse_args`` composes the script's
   ``extra_args_provider`` with ours (so ``--moe-token-dispatcher-type specmoe`` and the
   ``--specmoe-*`` flags parse), and ``validate_args`` runs our checks before any GPU work.
   This covers the scripts listed in docs/megatron_core.md: ``parse_and_validate_args`` (core 0.19:
   examples/inference/offline_inference.py, launch_inference_server.py) and
   ``initialize_megatron(extra_args_provider=...)`` (earlier: tools/run_text_generation_server.py,
   examples/inference/gpt/gpt_static_inference.py, pretrain_gpt.py).
4. ``megatron_lm.runtime_hook.install_runtime_hook()``: after Megatron-LM's ``get_model`` and
   ``load_checkpoint`` return, the ``--specmoe-*`` flags take effect on the model: the plan's
   expert placements are applied (``--specmoe-plan``), routes are recorded
   (``--specmoe-record-routes``) and dispatch stats kept (``--specmoe-stats``), written at exit.
   ``megatron_lm.shuffle_hook.install_shuffle_hook()``: with ``--specmoe-shuffle`` the spec builders
   Megatron-LM's model builder calls (``gpt_layer_specs.get_gpt_decoder_block_spec``,
   ``get_gpt_layer_local_spec``) return shuffle layer specs for the MoE layers (s-TS, inference
   only, ``--transformer-impl local``); without the flag they return Megatron's own specs. After
   ``get_model`` the runtime hook attaches what the shuffle layers need (true-order output with
   sequence parallelism, token ids for the route predictor).
5. ``runpy`` runs the script as ``__main__`` with ``sys.argv = [SCRIPT, ARGS...]``.
6. The hooks are removed afterwards (also on error or ``sys.exit``); recorded routes and stats
   are still written at interpreter exit.

This module imports no megatron itself; megatron/ and megatron_lm/ do, inside ``main``.
"""

from __future__ import annotations

import os
import runpy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from megatron_specmoe.artifacts.errors import SpecMoEEnvironmentError, SpecMoEUsageError

__all__ = ["LaunchTarget", "MIN_PYTHON", "parse_launch_argv", "find_megatron_root", "launch", "main"]

# megatron.training (core 0.19) imports typing.override, new in Python 3.12.
MIN_PYTHON = (3, 12)

USAGE = """\
usage: specmoe-launch [--debug] [--verbose] SCRIPT.py [ARGS...]
       specmoe-launch [--debug] [--verbose] -m MODULE [ARGS...]

Needs Python >= 3.12 (Megatron-LM's megatron.training imports typing.override).
--debug: a full traceback instead of one line on an error (also SPECMOE_DEBUG=1);
--verbose: say which known megatron-core warnings were hidden.

Runs a Megatron-LM script with the specmoe plug-in installed and the --specmoe-* flags added to
Megatron-LM's parser. ARGS go to the script unchanged, e.g.
  torchrun --nproc-per-node 8 -m megatron_specmoe.launch tools/run_text_generation_server.py \\
      --moe-token-dispatcher-type specmoe --specmoe-plan plans/mixtral ...
With TP > 1 the specmoe dispatcher shuffles tokens (speculative token shuffling: inference only,
--transformer-impl local); with TP = 1 (DP attention) it places requests.
"""


@dataclass(frozen=True, kw_only=True)
class LaunchTarget:
    """What to run.

    Attributes:
        script: path of a .py file, or None with ``module``.
        module: dotted module name for ``-m``, or None with ``script``.
        argv: the arguments for the script (without its name).
    """

    script: Optional[Path] = None
    module: Optional[str] = None
    argv: tuple[str, ...] = ()

    @property
    def display(self) -> str:
        return str(self.script) if self.script is not None else f"-m {self.module}"


_USAGE_FIX = "see `specmoe-launch --help`: specmoe-launch [--debug] [--verbose] SCRIPT.py ARGS or -m MODULE ARGS"


def parse_launch_argv(argv: Sequence[str]) -> LaunchTarget:
    """Split the launcher's command line; raises SpecMoEUsageError when it is unusable."""
    argv = list(argv)
    if not argv:
        raise SpecMoEUsageError("no script given", _USAGE_FIX)
    if argv[0] == "-m":
        if len(argv) < 2:
            raise SpecMoEUsageError("-m needs a module name", _USAGE_FIX)
        return LaunchTarget(module=argv[1], argv=tuple(argv[2:]))
    if argv[0].startswith("-"):
        raise SpecMoEUsageError(f"unknown option {argv[0]!r} before the script", _USAGE_FIX)
    script = Path(argv[0])
    if not script.is_file():
        raise SpecMoEUsageError(f"script {script} does not exist (or is not a file)",
                                "check the path of the Megatron-LM script")
    return LaunchTarget(script=script, argv=tuple(argv[1:]))


def find_megatron_root(start: Path) -> Optional[Path]:
    """The nearest folder at or above ``start`` that holds ``megatron/training/arguments.py``
    (a Megatron-LM checkout), or None."""
    start = start.resolve()
    for folder in (start, *start.parents):
        if (folder / "megatron" / "training" / "arguments.py").is_file():
            return folder
    return None


def _import_megatron_training(target: LaunchTarget) -> None:
    """Make ``megatron.training`` importable before the script runs: the script would import it
    itself, often after appending its Megatron-LM checkout to ``sys.path``; do the same (append,
    so that an installed megatron.core keeps precedence, as for the script)."""
    try:
        import megatron.training.arguments  # noqa: F401
        return
    except ImportError as exc:
        first_error = exc
        _refuse_old_python(exc)
    start = target.script.parent if target.script is not None else Path.cwd()
    root = find_megatron_root(start)
    if root is None:
        raise SpecMoEEnvironmentError(
            f"cannot import megatron.training ({first_error}) and there is no Megatron-LM checkout "
            f"(megatron/training/arguments.py) at or above {start}",
            "run from a Megatron-LM checkout, put its root on PYTHONPATH, or install megatron-core "
            ">= 0.19 (it ships megatron.training)" + (
                f"; megatron.training also needs Python >= {MIN_PYTHON[0]}.{MIN_PYTHON[1]}, this is "
                f"{sys.version.split()[0]}" if sys.version_info < MIN_PYTHON else ""))
    if str(root) not in sys.path:
        sys.path.append(str(root))
    try:
        import megatron.training.arguments  # noqa: F401,F811
    except ImportError as exc:
        _refuse_old_python(exc)
        raise


def _refuse_old_python(exc: ImportError) -> None:
    """megatron.training imports ``typing.override`` (Python >= 3.12): say so in one line."""
    if sys.version_info < MIN_PYTHON and "override" in str(exc):
        raise SpecMoEEnvironmentError(
            f"specmoe-launch runs Megatron-LM's megatron.training, which needs Python >= "
            f"{MIN_PYTHON[0]}.{MIN_PYTHON[1]} (it imports typing.override); this is Python "
            f"{sys.version.split()[0]}", "run the launcher with a Python 3.12 environment (README: "
            "'Which Python'); the planning commands (specmoe ...) run on 3.10+") from None


def launch(target: LaunchTarget) -> None:
    """Install the plug-in and the argument, runtime and shuffle hooks, run ``target`` as
    ``__main__``, remove what this call installed."""
    import megatron_specmoe
    from megatron_specmoe.megatron_lm import args as megatron_args
    from megatron_specmoe.megatron_lm import runtime_hook
    from megatron_specmoe.megatron_lm import shuffle_hook as megatron_shuffle

    saved_argv, saved_path0 = list(sys.argv), (sys.path[0] if sys.path else None)
    # 1. sys.path[0] as `python SCRIPT.py` / `python -m MODULE` would set it.
    entry = str(target.script.resolve().parent) if target.script is not None else os.getcwd()
    if sys.path:
        sys.path[0] = entry
    else:
        sys.path.insert(0, entry)
    _import_megatron_training(target)
    # 2.-4. the plug-in, the argument hook and the runtime hook.
    was_installed = megatron_specmoe.is_installed()
    megatron_specmoe.install()
    megatron_args.install_args_hook()
    runtime_was_installed = runtime_hook.is_runtime_hook_installed()
    runtime_hook.install_runtime_hook()
    shuffle_was_installed = megatron_shuffle.is_shuffle_hook_installed()
    megatron_shuffle.install_shuffle_hook()
    try:
        # 5. the script, unmodified.
        if target.script is not None:
            sys.argv = [str(target.script), *target.argv]
            runpy.run_path(str(target.script), run_name="__main__")
        else:
            sys.argv = [target.module, *target.argv]
            runpy.run_module(target.module, run_name="__main__", alter_sys=True)
    finally:
        # 6. leave the process as we found it.
        if not shuffle_was_installed:
            megatron_shuffle.uninstall_shuffle_hook()
        if not runtime_was_installed:
            runtime_hook.uninstall_runtime_hook()
        megatron_args.uninstall_args_hook()
        if not was_installed:
            megatron_specmoe.uninstall()
        sys.argv = saved_argv
        if saved_path0 is not None and sys.path and sys.path[0] == entry:
            sys.path[0] = saved_path0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse and launch; raises SpecMoEError subclasses for bad input (the entry point
    ``megatron_specmoe.launch.main`` prints them as one line and exits 2 or 1)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    launch(parse_launch_argv(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
