"""Where the benchmarks in tools/ find the shared Mixtral-8x7B MT-Bench routing traces.

They are development and benchmark data, never copied into the repository: ``$SPECMOE_MIXTRAL_TRACES``
when set, else the machine's shared folder. Every benchmark that reads them takes the path from here
(a benchmark with a ``--traces``-style flag uses it as the default), and skips or refuses, saying so,
when the folder is absent.
"""

from __future__ import annotations

import glob
import os

__all__ = ["MIXTRAL_TRACES", "mixtral_folds"]

MIXTRAL_TRACES = os.environ.get("SPECMOE_MIXTRAL_TRACES", "/work/shared/traces/mixtral-mtbench")


def mixtral_folds() -> list:
    """The leave-one-workload-out folds of the shared Mixtral traces: (trace file, split) for each
    file held out in turn (E = 8; repeated routes dropped, held-out tokens seen in fitting dropped:
    ``trace_io.leave_one_out_splits``), in file-name order. [] after printing that they were not
    found (the benchmark then skips its Mixtral part)."""
    files = sorted(glob.glob(f"{MIXTRAL_TRACES}/*.json"))
    if not files:
        print(f"(Mixtral traces not found under {MIXTRAL_TRACES}: skipped)")
        return []
    from megatron_specmoe.artifacts.trace_io import leave_one_out_splits, read_traces

    traces = [read_traces(f, num_experts=8) for f in files]  # Mixtral-8x7B: E = 8
    return list(zip(files, leave_one_out_splits(traces, dedup=True, drop_seen_in_fit=True)))
