"""Where the benchmarks in tools/ find the shared Mixtral-8x7B MT-Bench routing traces.

They are development and benchmark data, never copied into the repository: ``$SPECMOE_MIXTRAL_TRACES``
when set, else the machine's shared folder. Every benchmark that reads them takes the path from here
(a benchmark with a ``--traces``-style flag uses it as the default), and skips or refuses, saying so,
when the folder is absent.
"""

from __future__ import annotations

import os

__all__ = ["MIXTRAL_TRACES"]

MIXTRAL_TRACES = os.environ.get("SPECMOE_MIXTRAL_TRACES", "/work/shared/traces/mixtral-mtbench")
