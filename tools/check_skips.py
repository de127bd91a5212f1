"""Compare the tests pytest skipped with the checked-in list for this megatron-core version.

CI (``.ci/run``) runs ``pytest -rs --junitxml=REPORT`` and then

    python tools/check_skips.py REPORT tests/expected_skips/mcore-<version>.txt

which prints every skip with its reason and exits 1 when the skipped tests are not exactly the
expected ones (a test that newly skips, one that no longer does, or a changed reason). A test id is
pytest's junit ``classname::name`` (``tests.test_recipes::test_x[param]``); a whole module skipped
at collection is its module name alone (``tests.test_dp_coordinator``), one entry however many
tests it holds. The expected file holds one ``id | reason`` per line; ``#`` starts a comment.

To rewrite the expected file after a deliberate change (then review the diff):

    python tools/check_skips.py REPORT tests/expected_skips/mcore-<version>.txt --write
"""

from __future__ import annotations

import argparse
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

_SEP = " | "


def _reason(element) -> str:
    """The skip reason, without file paths or line numbers (stable across machines)."""
    message = element.get("message") or ""
    if message == "collection skipped":  # text: ('/abs/path.py', 12, 'Skipped: reason')
        found = re.search(r"Skipped: (.*)['\"]\)\s*$", element.text or "", re.S)
        message = found.group(1) if found else (element.text or "")
    return " ".join(message.split())


def skipped(report: Path) -> dict[str, str]:
    """id -> reason for every skipped test case of a pytest junit XML report."""
    out = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        element = case.find("skipped")
        if element is None:
            continue
        classname, name = case.get("classname") or "", case.get("name") or ""
        out[f"{classname}::{name}" if classname else name] = _reason(element)
    return out


def read_expected(path: Path) -> dict[str, str]:
    out = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if _SEP not in line:
            raise SystemExit(f"{path}:{number}: expected 'test id | reason', got {line!r}")
        test_id, reason = line.split(_SEP, 1)
        out[test_id.strip()] = " ".join(reason.split())
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="pytest --junitxml report")
    parser.add_argument("expected", type=Path, help="tests/expected_skips/mcore-<version>.txt")
    parser.add_argument("--write", action="store_true", help="rewrite the expected file from the report")
    args = parser.parse_args(argv)
    if not args.report.is_file():
        print(f"check_skips: no report at {args.report}; run pytest with --junitxml={args.report}", file=sys.stderr)
        return 2
    got = skipped(args.report)
    if args.write:
        lines = [f"# Skipped tests on this megatron-core version (tools/check_skips.py --write; review the diff).",
                 *(f"{k}{_SEP}{v}" for k, v in sorted(got.items()))]
        args.expected.write_text("\n".join(lines) + "\n")
        print(f"check_skips: wrote {len(got)} skip(s) to {args.expected}")
        return 0
    if not args.expected.is_file():
        print(f"check_skips: no expected-skips file {args.expected}; create it with --write", file=sys.stderr)
        return 2
    want = read_expected(args.expected)
    print(f"check_skips: {len(got)} skipped, {len(want)} expected ({args.expected})")
    for test_id in sorted(got):
        print(f"  skipped {test_id}: {got[test_id]}")
    problems = [f"unexpected skip: {k} ({got[k]})" for k in sorted(set(got) - set(want))]
    problems += [f"expected to skip but did not (it ran or is gone): {k}" for k in sorted(set(want) - set(got))]
    problems += [f"skip reason changed for {k}: expected {want[k]!r}, got {got[k]!r}"
                 for k in sorted(set(got) & set(want)) if got[k] != want[k]]
    for p in problems:
        print(f"check_skips: {p}", file=sys.stderr)
    if problems:
        print(f"check_skips: {len(problems)} difference(s); fix the test, or update {args.expected} "
              "with --write if the change is deliberate", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
