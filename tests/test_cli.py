"""The command registry: every allowed name has a module with the documented interface."""

from typing import get_args

import pytest

from megatron_specmoe.cli.main import Command, _available, build_parser, main


def test_every_command_has_its_module():
    modules = _available()
    assert sorted(modules) == sorted(get_args(Command))
    for name, module in modules.items():
        assert isinstance(module.HELP, str) and module.HELP, name
        assert callable(module.add_arguments) and callable(module.run), name


def test_unknown_command_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["frobnicate"])
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err


def test_help_lists_every_command():
    text = build_parser().format_help()
    for name in get_args(Command):
        assert name in text
