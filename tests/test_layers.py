"""The tree's rules, read from the source (function-level imports included):

- each folder keeps one dependency tier (what it may import from outside the package, and which of
  the package's own folders it may import);
- no import cycle among the package's modules;
- the library never imports the test and demo harness (``testing/``, ``demo/``);
- no module is much over 600 lines, and every module opens with a docstring;
- importing the package imports nothing heavy.

The tiers (see docs/architecture.md):

    pure         predict/ schedule/ measure/ artifacts/ sim/   numpy / torch, no torch.distributed
    comm         comm/                                         + torch.distributed
    megatron     megatron/                                     + megatron.core (+ transformer_engine)
    megatron_lm  megatron_lm/                                  + megatron.training
    entry        cli/, the top-level modules                   imports its tiers lazily
    harness      testing/ demo/                                anything; nothing in the library imports it
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "megatron_specmoe"
PKG = "megatron_specmoe"

PURE = ("predict", "schedule", "measure", "artifacts", "sim")
HARNESS = ("testing", "demo")
# folder -> (outside modules it must not import, package folders it may import)
TIERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    **{f: (("megatron", "transformer_engine", "torch.distributed", "apex"), PURE) for f in PURE},
    "comm": (("megatron", "transformer_engine", "apex"), PURE + ("comm",)),
    "megatron": (("megatron.training", "apex"), PURE + ("comm", "megatron")),
    "megatron_lm": (("apex",), PURE + ("comm", "megatron", "megatron_lm")),
    "cli": (("apex",), PURE + ("comm", "megatron", "megatron_lm", "cli")),
}
MAX_LINES = 620


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        parts = (PKG,) + path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def _imports(path: pathlib.Path, module: str = ""):
    """(line, absolute module name) for every import in ``path``, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".")
                if path.name != "__init__.py":
                    pkg = pkg[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([node.module] if node.module else []))
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"


def _folder(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (ROOT / parts[1]).is_dir()) else ""


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        for _, target in _imports(path, m):
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target not in (m, PKG) and not m.startswith(target + "."):
                graph[m].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (iterative Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_every_folder_has_a_tier():
    folders = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders - set(TIERS) - set(HARNESS) == set(), "give each new folder a tier in TIERS"


@pytest.mark.parametrize("folder", sorted(TIERS))
def test_folder_dependency_tier(folder):
    forbidden, allowed = TIERS[folder]
    mods = {m: p for m, p in _modules().items() if _folder(m) == folder}
    assert mods, f"no modules found under {folder}/"
    violations = []
    for m, path in sorted(mods.items()):
        for lineno, name in _imports(path, m):
            for bad in forbidden:
                if name == bad or name.startswith(bad + "."):
                    violations.append(f"{path.relative_to(ROOT)}:{lineno} imports {name}")
            if name.startswith(PKG + "."):
                target = name.split(".")[1]
                if (ROOT / target).is_dir() and target not in allowed:
                    violations.append(f"{path.relative_to(ROOT)}:{lineno} imports {name} ({folder}/ may "
                                      f"import only {', '.join(allowed)})")
    assert not violations, "\n".join(violations)


def test_library_never_imports_the_harness():
    violations = []
    for m, path in sorted(_modules().items()):
        if _folder(m) in HARNESS:
            continue
        for lineno, name in _imports(path, m):
            for h in HARNESS:
                if name == f"{PKG}.{h}" or name.startswith(f"{PKG}.{h}."):
                    violations.append(f"{path.relative_to(ROOT)}:{lineno} imports {name}")
    assert not violations, "\n".join(violations)


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_cycle_check_catches_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_boundary_check_sees_function_level_and_relative_imports(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    import torch.distributed as dist\n    from megatron.core import parallel_state\n"
                   "    from ..megatron import dispatcher\n")
    names = [n for _, n in _imports(bad, "megatron_specmoe.predict.bad")]
    assert "torch.distributed" in names and "megatron.core" in names
    assert "megatron_specmoe.megatron" in names


def test_modules_are_small_and_say_what_they_are():
    big = []
    undocumented = []
    for m, path in sorted(_modules().items()):
        lines = path.read_text().count("\n")
        if lines > MAX_LINES:
            big.append(f"{path.relative_to(ROOT)}: {lines} lines")
        if path.name != "__init__.py" and ast.get_docstring(ast.parse(path.read_text())) is None:
            undocumented.append(str(path.relative_to(ROOT)))
    assert not big, "split these modules:\n" + "\n".join(big)
    assert not undocumented, "modules without a docstring:\n" + "\n".join(undocumented)


def test_import_package_is_light():
    code = (
        "import sys, megatron_specmoe, megatron_specmoe.predict, megatron_specmoe.schedule, "
        "megatron_specmoe.measure, megatron_specmoe.artifacts, megatron_specmoe.sim, megatron_specmoe.comm, "
        "megatron_specmoe.megatron, megatron_specmoe.megatron_lm, megatron_specmoe.cli.main;"
        "heavy=[m for m in ('megatron', 'megatron.core', 'transformer_engine') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT.parent)
    assert out.stdout.strip() == ""


def test_architecture_page_names_every_module():
    out = subprocess.run([sys.executable, str(ROOT.parent / "tools" / "module_map.py"), "--check"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_no_reference_to_documents_outside_the_repository():
    outside = ("DESIGN.md", "MEGATRON_NOTES.md", "STYLE.md", "../shared/docs")
    hits = []
    for path in list(ROOT.rglob("*.py")) + [ROOT.parent / "README.md", *sorted((ROOT.parent / "docs").glob("*.md"))]:
        text = path.read_text()
        hits += [f"{path.name}: {doc}" for doc in outside if doc in text]
    assert not hits, hits
