"""``specmoe``: the command line.

Each subcommand is a module ``megatron_specmoe.cli.<name>`` exposing

    HELP: str                                  one line for ``specmoe --help``
    add_arguments(parser) -> None              its flags
    run(args) -> int                           the work; returns the exit code

The registry below is the list of allowed names; modules are imported only when their command
runs, so ``specmoe --help`` stays fast and imports no megatron.
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specmoe",
        description="Speculative MoE for Megatron-Core: profile, plan, evaluate, simulate, demo.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module in _available().items():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
