"""Print the package's module map (one line per module: path and the first line of its docstring),
folder by folder, in the form docs/architecture.md holds it.

    python tools/module_map.py            # markdown for docs/architecture.md
    python tools/module_map.py --check    # exit 1 naming modules docs/architecture.md lacks
    python tools/module_map.py --write    # replace the map in docs/architecture.md (after its
                                          # "one line per module" paragraph)

tests/test_layers.py runs the check, so the map cannot fall behind the tree.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "megatron_specmoe"
DOC = REPO / "docs" / "architecture.md"


def modules() -> list[tuple[str, str]]:
    """(path relative to the package, first docstring line) for every module but __init__."""
    out = []
    paths = sorted(PKG.rglob("*.py"), key=lambda p: (len(p.relative_to(PKG).parts) > 1, str(p)))
    for path in paths:
        if path.name == "__init__.py" or "__pycache__" in path.parts:
            continue
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        first = doc.strip().splitlines()[0] if doc.strip() else ""
        out.append((str(path.relative_to(PKG)), first))
    return out


def markdown() -> str:
    lines, folder = [], None
    for rel, first in modules():
        here = rel.rpartition("/")[0] or "(top level)"
        if here != folder:
            folder = here
            lines.append(f"\n**{here}/**\n" if here != "(top level)" else "\n**top level**\n")
        lines.append(f"- `{rel}`: {first}")
    return "\n".join(lines).lstrip("\n") + "\n"


def missing() -> list[str]:
    text = DOC.read_text(encoding="utf-8") if DOC.exists() else ""
    return [rel for rel, _ in modules() if f"`{rel}`" not in text]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="list modules docs/architecture.md does not name")
    ap.add_argument("--write", action="store_true", help="rewrite the map in docs/architecture.md")
    args = ap.parse_args(argv)
    if args.write:
        text = DOC.read_text(encoding="utf-8")
        marker = "lacks).\n"
        head = text[: text.index(marker, text.index("## Module map")) + len(marker)]
        DOC.write_text(head + "\n" + markdown(), encoding="utf-8")
        return 0
    if args.check:
        gone = missing()
        for rel in gone:
            print(f"docs/architecture.md does not list megatron_specmoe/{rel}", file=sys.stderr)
        return 1 if gone else 0
    sys.stdout.write(markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
