"""The three layers stay visible: planning imports no torch.distributed / megatron / TE, comm
imports no megatron / TE, and importing the package imports nothing heavy."""

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "megatron_specmoe"

FORBIDDEN = {
    "planning": ("megatron", "transformer_engine", "torch.distributed", "apex"),
    "comm": ("megatron", "transformer_engine", "apex"),
}


def _imports(path: pathlib.Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
            for alias in node.names:
                yield node.lineno, f"{node.module}.{alias.name}"


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_import_boundary(layer):
    files = sorted((ROOT / layer).rglob("*.py"))
    assert files, f"no modules found under {layer}/"
    violations = []
    for path in files:
        for lineno, name in _imports(path):
            for bad in FORBIDDEN[layer]:
                if name == bad or name.startswith(bad + "."):
                    violations.append(f"{path.relative_to(ROOT)}:{lineno} imports {name}")
    assert not violations, "\n".join(violations)


def test_boundary_check_catches_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch.distributed as dist\nfrom megatron.core import parallel_state\n")
    names = [n for _, n in _imports(bad)]
    assert "torch.distributed" in names and "megatron.core" in names


def test_import_package_is_light():
    code = (
        "import sys, megatron_specmoe, megatron_specmoe.planning, megatron_specmoe.comm, "
        "megatron_specmoe.glue, megatron_specmoe.cli.main;"
        "heavy=[m for m in ('megatron', 'megatron.core', 'transformer_engine') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT.parent)
    assert out.stdout.strip() == ""
