"""tools/check_skips.py: CI's comparison of the skipped tests with the checked-in list per
megatron-core version. A synthetic pytest junit report, every way it can differ."""

import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "check_skips.py"

REPORT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="" name="tests.test_dp_coordinator"><skipped message="collection skipped">('/x/tests/test_dp_coordinator.py', 9, "Skipped: could not import 'megatron.core.inference.x': No module named 'x'")</skipped></testcase>
<testcase classname="tests.test_recipes" name="test_parse[mixtral]"><skipped type="pytest.skip" message="megatron.training is not importable here">/x/tests/test_recipes.py:36: ...</skipped></testcase>
<testcase classname="tests.test_recipes" name="test_ran" />
</testsuite></testsuites>
"""
EXPECTED = """# a comment
tests.test_dp_coordinator | could not import 'megatron.core.inference.x': No module named 'x'
tests.test_recipes::test_parse[mixtral] | megatron.training is not importable here
"""


def _run(tmp_path, expected, *extra):
    (tmp_path / "report.xml").write_text(REPORT)
    (tmp_path / "expected.txt").write_text(expected)
    return subprocess.run([sys.executable, str(TOOL), str(tmp_path / "report.xml"), str(tmp_path / "expected.txt"), *extra],
                          capture_output=True, text=True)


def test_the_expected_skips_pass_and_are_printed_with_reasons(tmp_path):
    done = _run(tmp_path, EXPECTED)
    assert done.returncode == 0, done.stderr
    assert "2 skipped, 2 expected" in done.stdout
    assert "skipped tests.test_recipes::test_parse[mixtral]: megatron.training is not importable here" in done.stdout


def test_a_new_skip_a_missing_skip_and_a_changed_reason_fail(tmp_path):
    lines = EXPECTED.splitlines()
    new_skip = _run(tmp_path, "\n".join(lines[:2]))
    assert new_skip.returncode == 1 and "unexpected skip: tests.test_recipes::test_parse[mixtral]" in new_skip.stderr
    gone = _run(tmp_path, EXPECTED + "tests.test_recipes::test_ran | old reason\n")
    assert gone.returncode == 1 and "expected to skip but did not (it ran or is gone): tests.test_recipes::test_ran" in gone.stderr
    changed = _run(tmp_path, EXPECTED.replace("is not importable here", "moved"))
    assert changed.returncode == 1 and "skip reason changed for tests.test_recipes::test_parse[mixtral]" in changed.stderr


def test_write_then_check_roundtrip_and_bad_lines(tmp_path):
    assert _run(tmp_path, "", "--write").returncode == 0
    again = subprocess.run([sys.executable, str(TOOL), str(tmp_path / "report.xml"), str(tmp_path / "expected.txt")],
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    bad = _run(tmp_path, "tests.test_x::test_y without a reason\n")
    assert bad.returncode == 1 and "expected 'test id | reason'" in bad.stderr
