"""``specmoe``: the command line.

Each subcommand is a module ``megatron_specmoe.cli.<name>`` exposing

    HELP: str                                  one line for ``specmoe --help``
    add_arguments(parser) -> None              its flags
    run(args) -> int                           the work; returns the exit code

The registry below is the list of allowed names; modules are imported only when their command
runs, so ``specmoe --help`` stays fast and imports no megatron.

Errors (docs/cli_errors.md): ``main`` runs the command through ``megatron_specmoe.entry.run_entry``:
a bad input prints one line ``specmoe <cmd>: error: <what> -- <fix>`` on stderr and exits 2 (a
flag) or 1 (an input file); ``--debug`` shows the traceback instead, ``--verbose`` says which known
megatron-core warnings were hidden. Both flags go before or after the command name.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Literal, get_args

Command = Literal["demo", "plan", "evaluate", "group", "simulate", "recipes"]

# The demo's command lives with the demo (``demo/command.py``): the library never imports the demo
# harness, and this registry imports a command's module only when that command runs.
_MODULES: dict[str, str] = {
    name: ("megatron_specmoe.demo.command" if name == "demo" else f"megatron_specmoe.cli.{name}")
    for name in get_args(Command)
}


def _available() -> dict[str, object]:
    """Every registered command's module (an allowed name without a module is a bug: it raises)."""
    return {name: importlib.import_module(modname) for name, modname in _MODULES.items()}


def _add_global_flags(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument("--debug", action="store_true", default=default,
                        help="on an error, show the full traceback instead of one line")
    parser.add_argument("--verbose", action="store_true", default=default,
                        help="say which known megatron-core warnings were hidden")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specmoe",
        description="Speculative MoE for Megatron-Core: profile, plan, evaluate, simulate, demo.",
    )
    _add_global_flags(parser, False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module in _available().items():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        # SUPPRESS: given after the command they set the flag, absent they keep the main value.
        _add_global_flags(p, argparse.SUPPRESS)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    from megatron_specmoe.entry import run_entry

    args = build_parser().parse_args(argv)
    return run_entry(f"specmoe {args.command}", lambda: args._module.run(args),
                     debug=args.debug, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
