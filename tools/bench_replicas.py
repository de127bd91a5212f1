"""Local activation rate with redundant experts at EP 8, against the oracle with the same slots.

Usage:
    python tools/bench_replicas.py [--redundant 0,8,16] [--policies load,coactivation,both]

Data: the real Mixtral-8x7B MT-Bench traces (E = 8, top-2, 32 layers). Leave-one-workload-out:
for each file, the plan (layer-table predictor, ``search`` placement, replicas by each policy) is
made on the other three files and evaluated on it; repeated routes are dropped and evaluation
tokens whose route occurs on the fitting side too (``trace_io.leave_one_out_splits``). Means over
the four folds. Batches of ``--batch`` tokens, ``refine`` assignment, as ``specmoe evaluate``.

Columns: LAR of specmoe and of the oracle (perfect prediction) with the replicas, the oracle
without replicas (the balanced ceiling of issue 15), and their ratios, measured in the same run;
load imbalance of specmoe with replicas.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import glob  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from bench_data import MIXTRAL_TRACES  # noqa: E402 - tools/ is on sys.path when run

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_specmoe.artifacts.trace_io import leave_one_out_splits, read_traces  # noqa: E402
from megatron_specmoe.measure.evaluate import evaluate_trace  # noqa: E402
from megatron_specmoe.predict.registry import make  # noqa: E402
from megatron_specmoe.schedule.grouping import GroupingOptions, group_experts  # noqa: E402
from megatron_specmoe.schedule.replicas import replicate_layers  # noqa: E402

MIXTRAL = MIXTRAL_TRACES


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--traces", default=MIXTRAL)
    ap.add_argument("--ep", type=int, default=8)
    ap.add_argument("--redundant", default="0,8,16")
    ap.add_argument("--policies", default="load,coactivation,both")
    ap.add_argument("--batch", type=int, default=512)
    args = ap.parse_args(argv)
    print("command: python " + " ".join(shlex.quote(a) for a in [sys.argv[0]] + (argv if argv is not None else sys.argv[1:])))
    print()
    files = sorted(glob.glob(f"{args.traces}/*.json"))
    if not files:
        print(f"no traces under {args.traces}")
        return 1
    traces = [read_traces(f, num_experts=8) for f in files]
    splits = leave_one_out_splits(traces, dedup=True, drop_seen_in_fit=True)
    redundant = [int(x) for x in args.redundant.split(",")]
    policies = args.policies.split(",")
    rows: dict[tuple, list[dict]] = {}
    for fold, (split, path) in enumerate(zip(splits, files)):
        fit, held = split.fit, split.eval
        predictor = make("layer").fit(fit)
        placements = group_experts(fit, ep_size=args.ep, options=GroupingOptions(method="search"))
        for r in redundant:
            for policy in (policies if r else ["-"]):
                reps = None if r == 0 else replicate_layers(placements, fit.experts, redundant=r, policy=policy)
                ev = evaluate_trace(held, predictor, placements, batch_size=args.batch, method="refine",
                                    replicas=reps).to_json()
                spec = ev["specmoe_replicas"] if reps else ev["specmoe"]
                orc = ev["oracle_replicas"] if reps else ev["oracle"]
                rows.setdefault((r, policy), []).append({
                    "specmoe": spec["local_activation_rate"], "oracle_same": orc["local_activation_rate"],
                    "oracle_none": ev["oracle"]["local_activation_rate"],
                    "baseline": ev["baseline"]["local_activation_rate"],
                    "imbalance": spec["load_imbalance"], "remote_ranks": spec["remote_ranks_per_token"],
                })
        print(f"[bench_replicas] fold {fold + 1}/{len(files)} ({Path(path).stem}) done", file=sys.stderr, flush=True)
    print(f"## LAR at EP {args.ep} with redundant experts: Mixtral-8x7B MT-Bench, leave-one-workload-out "
          f"(mean of {len(files)} folds), layer-table predictor, batch {args.batch}, refine")
    print()
    print("| R | policy | specmoe LAR | oracle LAR, same slots | oracle LAR, no replicas | specmoe / oracle same | "
          "oracle same / oracle none | specmoe remote ranks/tok | specmoe load imb. |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for (r, policy), folds in rows.items():
        m = {k: float(np.mean([f[k] for f in folds])) for k in folds[0]}
        print(f"| {r} | {policy} | {m['specmoe']:.4f} | {m['oracle_same']:.4f} | {m['oracle_none']:.4f} | "
              f"{m['specmoe'] / m['oracle_same']:.3f} | {m['oracle_same'] / m['oracle_none']:.3f} | "
              f"{m['remote_ranks']:.3f} | {m['imbalance']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
