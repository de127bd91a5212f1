"""tools/bench_shuffle_collectives.py: refuses bad sizes by flag; a tiny 2-rank run prints the
command, every collective's time and the three ratios."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench_shuffle_collectives as bench  # noqa: E402


@pytest.mark.parametrize("argv, pattern", [
    (["--repeats", "0"], r"--repeats 0: must be >= 1"),
    (["--ranks", "3", "--tokens", "8"], r"--ranks 3 must be >= 2 and divide --tokens 8"),
    (["--ranks", "1"], r"--ranks 1 must be >= 2"),
])
def test_bad_sizes_are_refused_by_flag(argv, pattern, capsys):
    assert bench.main(argv) == 2
    assert __import__("re").search(pattern, capsys.readouterr().err)


def test_tiny_run_reports_every_collective_and_the_ratios(capsys):
    assert bench.main(["--ranks", "2", "--tokens", "8", "--hidden", "4", "--repeats", "2", "--json"]) == 0
    out = capsys.readouterr().out
    command, body = out.split("\n", 1)
    assert command.startswith("python tools/bench_shuffle_collectives.py --ranks 2")
    data = json.loads(body)
    assert set(data["ms"]) == {"all-gather", "all-gather + inverse", "reduce-scatter + residual",
                               "reduce-scatter + fold", "all-to-all 4 rows/peer", "all-to-all 2 rows/peer"}
    assert len(data["per_rank_ms"]) == 2 and all(v > 0 for v in data["ms"].values())
    assert set(data["ratios"]) == {"all-gather: shuffle / Megatron", "reduce-scatter: shuffle / Megatron",
                                   "all-to-all: half the rows / all"}
