"""``specmoe group``: plan which experts each EP rank hosts, per MoE layer (s-EG).

Reads routing traces (any format ``artifacts/trace_io.py`` reads), runs a grouping method of
``schedule/grouping.py`` on every layer, writes the placements as JSON and prints, for the plan
and for Megatron's contiguous placement, the measures of the objective (homes unknown: each token
on the rank holding most of its experts, no capacity limit).

Output JSON: {"format": "specmoe-grouping", "version": 1, "method", "theta", "seed", "ep_size",
"num_experts", "num_layers", "sources", "tokens", "layers": [ExpertPlacement.to_json(), ...]}.
"""

from __future__ import annotations

import argparse

HELP = "plan expert placement per MoE layer (speculative expert grouping) from routing traces"

GROUPING_JSON_FORMAT = "specmoe-grouping"
GROUPING_JSON_VERSION = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--traces", nargs="+", required=True, metavar="FILE",
                        help="routing traces to plan from (any format trace_io reads)")
    parser.add_argument("--ep", type=int, required=True, help="EP size P (must divide the experts)")
    parser.add_argument("--method", default="search",
                        help="contiguous, random, eplb, graph, alternating, search (default), milp")
    parser.add_argument("--theta", type=float, default=0.1,
                        help="weight of load imbalance vs remote activations, in [0, 1] (default 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    parser.add_argument("--restarts", type=int, default=4, help="random starts (graph, search, alternating)")
    parser.add_argument("--dedup", action="store_true",
                        help="drop tokens whose whole route repeats an earlier one (Mixtral MT-Bench traces)")
    parser.add_argument("--out", required=True, metavar="FILE.json", help="where to write the placements")


def run(args: argparse.Namespace) -> int:
    import json
    import sys
    import time

    import numpy as np

    from megatron_specmoe.schedule.grouping import GroupingOptions, group_experts, grouping_cost
    from megatron_specmoe.schedule.placement import ExpertPlacement
    from megatron_specmoe.artifacts.trace_io import dedup_routes, read_traces

    options = GroupingOptions(method=args.method, theta=args.theta, seed=args.seed, restarts=args.restarts)
    trace = read_traces(args.traces)
    if args.dedup:
        before = trace.num_tokens
        trace, _ = dedup_routes(trace)
        print(f"[group] dedup: kept {trace.num_tokens} of {before} tokens", file=sys.stderr)
    if trace.num_experts % args.ep != 0:
        raise ValueError(
            f"--ep {args.ep} does not divide the traces' num_experts={trace.num_experts}; every EP rank "
            "must host E/P experts"
        )
    start = time.perf_counter()
    placements = group_experts(trace, ep_size=args.ep, options=options, progress=True)
    seconds = time.perf_counter() - start
    doc = {
        "format": GROUPING_JSON_FORMAT,
        "version": GROUPING_JSON_VERSION,
        "method": args.method,
        "theta": args.theta,
        "seed": args.seed,
        "ep_size": args.ep,
        "num_experts": trace.num_experts,
        "num_layers": trace.num_layers,
        "sources": list(args.traces),
        "tokens": trace.num_tokens,
        "layers": [p.to_json() for p in placements],
    }
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)

    contiguous = ExpertPlacement.contiguous(trace.num_experts, args.ep)
    rows = {"contiguous": [], args.method: []}
    for layer, pl in enumerate(placements):
        ex = trace.experts[:, layer]
        rows["contiguous"].append(grouping_cost(ex, contiguous, theta=args.theta))
        rows[args.method].append(grouping_cost(ex, pl, theta=args.theta))
    print(f"{trace.num_tokens} tokens, {trace.num_layers} layers, E={trace.num_experts}, top-{trace.topk}, "
          f"EP={args.ep}, theta={args.theta}; planned in {seconds:.1f} s -> {args.out}")
    print("placement     all-experts-on-home  local-activation-rate  load-imbalance  objective "
          "(means over layers; home = rank with most of the token's experts)")
    for name, costs in rows.items():
        print(f"{name:<13} {np.mean([c.co_located_share for c in costs]):>19.3f}  "
              f"{1 - np.mean([c.remote_share for c in costs]):>21.3f}  "
              f"{np.mean([c.load_imbalance for c in costs]):>14.3f}  {np.mean([c.objective for c in costs]):>9.4f}")
    return 0
