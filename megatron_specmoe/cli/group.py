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
    parser.add_argument("--num-experts", type=int, default=None, metavar="E",
                        help="routed experts per MoE layer; required for JSON / JSONL traces (they do "
                             "not record it)")
    parser.add_argument("--out", required=True, metavar="FILE.json", help="where to write the placements")


def run(args: argparse.Namespace) -> int:
    import json
    import sys
    import time

    import numpy as np

    from megatron_specmoe.schedule.grouping import GroupingOptions, group_experts, grouping_cost
    from megatron_specmoe.schedule.placement import ExpertPlacement
    from megatron_specmoe.artifacts.trace_io import dedup_routes, read_traces

    from megatron_specmoe.artifacts.errors import SpecMoEUsageError
    from megatron_specmoe.artifacts.files import atomic_file, check_output_file
    from megatron_specmoe.artifacts.trace_checks import check_num_experts

    if args.ep < 1:
        raise SpecMoEUsageError(f"--ep {args.ep}: must be >= 1", "give the EP size, e.g. --ep 8")
    if args.restarts < 0:
        raise SpecMoEUsageError(f"--restarts {args.restarts}: must be >= 0", "give a count of random starts")
    check_num_experts(args.num_experts)
    try:
        options = GroupingOptions(method=args.method, theta=args.theta, seed=args.seed, restarts=args.restarts)
    except ValueError as exc:
        raise SpecMoEUsageError(f"--method {args.method} / --theta {args.theta}: {exc}",
                                "see `specmoe group --help`; --theta lies in [0, 1]") from None
    check_output_file("--out", args.out)
    trace = read_traces(args.traces, num_experts=args.num_experts)
    if args.dedup:
        before = trace.num_tokens
        trace, _ = dedup_routes(trace)
        print(f"[group] dedup: kept {trace.num_tokens} of {before} tokens", file=sys.stderr)
    if trace.num_experts % args.ep != 0:
        raise SpecMoEUsageError(
            f"--ep {args.ep} does not divide the traces' num_experts={trace.num_experts}",
            "every EP rank hosts E/P experts: pick a divisor of the expert count")
    if trace.num_tokens == 0:
        raise SpecMoEUsageError(f"--traces {' '.join(args.traces)}: no tokens", "give traces with routes")
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
    with atomic_file(args.out) as tmp:
        tmp.write_text(json.dumps(doc, indent=1))

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
