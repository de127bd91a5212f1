"""``specmoe evaluate``: how much of the EP all-to-all a plan saves on routing traces.

Simulates s-TS on the traces as docs/method.md "Measures" defines it (``measure/evaluate.py``): batches
of ``--batch`` tokens in trace order; baseline = contiguous shards + contiguous experts; specmoe =
the plan's placement + a balanced assignment (``--assignment``) from the plan's predictor; oracle =
the same assignment from the true routes (the ceiling). Prints a table, or with ``--json`` ONE JSON
object on stdout with ``baseline``, ``placement_only``, ``specmoe`` and ``oracle`` (each:
local_activation_rate, remote_pairs_per_token, remote_ranks_per_token, load_imbalance, per_layer;
with ``--gpus-per-node`` also remote_nodes_per_token and internode_bytes_per_token), for a plan
with redundant experts also ``specmoe_replicas`` and ``oracle_replicas``,
and ``prediction`` {precision, recall, f1, rank_accuracy} (also inside ``specmoe``). Progress goes
to stderr.

Evaluate on other workloads than the plan was fitted on, and pass ``--dedup`` for traces that
repeat prompts (the Mixtral MT-Bench files), or the numbers measure memory, not prediction.
"""

from __future__ import annotations

import argparse
import json
import sys

HELP = "simulate s-TS on routing traces with a plan: local activation rate, remote pairs, prediction"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plan", required=True, metavar="DIR",
                        help="plan folder (specmoe plan): placements and predictor")
    parser.add_argument("--traces", required=True, nargs="+", metavar="FILE",
                        help="routing traces to evaluate on (any format artifacts/trace_io.py reads)")
    parser.add_argument("--batch", type=int, default=512,
                        help="tokens per shuffle domain (one TP group's batch), default 512")
    parser.add_argument("--assignment", default="refine",
                        help="balanced assignment (schedule/assignment.py): contiguous, argsort, "
                             "greedy, refine (default, the runtime's), optimal")
    parser.add_argument("--kind", default=None,
                        help="which of the plan's predictors to use (default: the first it stores)")
    parser.add_argument("--dedup", action="store_true",
                        help="drop tokens whose whole route repeats an earlier token's (count on stderr)")
    parser.add_argument("--num-experts", type=int, default=None, metavar="E",
                        help="routed experts per MoE layer; required for JSON / JSONL traces (they do "
                             "not record it), and must equal the plan's")
    parser.add_argument("--gpus-per-node", type=int, default=None, metavar="G",
                        help="EP ranks per node (rank r on node r // G); adds remote_nodes_per_token, "
                             "max_nodes_per_token (the bound of group-limited routing) and "
                             "internode_bytes_per_token (per_node and per_pair transports) to every side")
    parser.add_argument("--hidden-size", type=int, default=None, metavar="H",
                        help="model hidden size for the inter-node bytes (default: the plan's, if it "
                             "records one)")
    parser.add_argument("--activation-bytes", type=int, default=2, choices=(1, 2, 4),
                        help="bytes per activation element on the wire (default 2: bf16)")
    parser.add_argument("--request-placement", default=None, metavar="METHOD",
                        help="also measure DP-attention request placement (side 'requests'): round_robin, "
                             "least_loaded (Megatron's), affinity or group_mask; needs request ids")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def load_predictor(plan, kind: str | None):
    """The plan's predictor of ``kind`` (default: its first), rebuilt from ``plan.predictor_state``."""
    from megatron_specmoe.artifacts.errors import SpecMoEDataError, SpecMoEUsageError

    kinds = list(plan.header.predictor_kinds)
    if not kinds:
        raise SpecMoEDataError(f"plan {plan.source} stores no predictor",
                               "make it with `specmoe plan --predictor KIND`, or evaluate another plan")
    kind = kinds[0] if kind is None else kind
    if kind not in kinds:
        raise SpecMoEUsageError(f"--kind {kind!r}: plan {plan.source} stores the predictors {kinds}",
                                f"choose one of {kinds}")
    from megatron_specmoe.predict.registry import predictor_from_state

    return predictor_from_state(kind, plan.predictor_state[kind])


def _table(result: dict) -> str:
    rows = [f"{'side':16s} {'LAR':>7s} {'remote pairs/tok':>17s} {'remote ranks/tok':>17s} "
            f"{'load imb.':>10s}"]
    nodes = result["config"].get("gpus_per_node") is not None
    if nodes:
        rows[0] += f" {'remote nodes/tok':>17s} {'max nodes':>10s} {'inter-node B/tok (per node | per pair)':>40s}"
    for side in ("baseline", "placement_only", "specmoe", "oracle", "specmoe_replicas", "oracle_replicas",
                 "requests"):
        if side not in result:
            continue
        r = result[side]
        row = (f"{side:16s} {r['local_activation_rate']:7.4f} {r['remote_pairs_per_token']:17.4f} "
               f"{r['remote_ranks_per_token']:17.4f} {r['load_imbalance']:10.4f}")
        if nodes:
            b = r["internode_bytes_per_token"]
            row += (f" {r['remote_nodes_per_token']:17.4f} {r['max_nodes_per_token']:10d} "
                    f"{b['per_node']:19.1f} | {b['per_pair']:18.1f}")
        rows.append(row)
    p = result["prediction"]
    rows.append(f"prediction: precision {p['precision']:.4f} recall {p['recall']:.4f} "
                f"F1 {p['f1']:.4f} rank accuracy {p['rank_accuracy']:.4f}")
    return "\n".join(rows)


def run(args: argparse.Namespace) -> int:
    from typing import get_args

    from megatron_specmoe.artifacts.errors import SpecMoEDataError, SpecMoEUsageError
    from megatron_specmoe.artifacts.plan_folder import load_plan
    from megatron_specmoe.artifacts.trace_checks import check_num_experts
    from megatron_specmoe.artifacts.trace_io import dedup_routes, read_traces
    from megatron_specmoe.measure.evaluate import evaluate_trace
    from megatron_specmoe.measure.measures import WireFormat
    from megatron_specmoe.measure.nodes import check_gpus_per_node
    from megatron_specmoe.schedule.assignment import AssignmentMethod

    methods = get_args(AssignmentMethod)
    if args.assignment not in methods:
        raise SpecMoEUsageError(f"--assignment {args.assignment!r} is not a method", f"choose one of {list(methods)}")
    if args.batch < 1:
        raise SpecMoEUsageError(f"--batch {args.batch}: must be >= 1",
                                "give the tokens per shuffle domain, e.g. --batch 512")
    check_num_experts(args.num_experts)
    plan = load_plan(args.plan)
    wire = None
    if args.gpus_per_node is not None:
        try:
            check_gpus_per_node(args.gpus_per_node, plan.header.ep_size, where="--gpus-per-node")
        except ValueError as exc:
            raise SpecMoEUsageError(str(exc), "pass the GPUs per node of the EP group") from None
        hidden = args.hidden_size if args.hidden_size is not None else plan.header.hidden_size
        if hidden is None or hidden < 1:
            raise SpecMoEUsageError(f"--gpus-per-node reports inter-node bytes, but the plan {args.plan} records "
                                    "no hidden size", "pass --hidden-size H (a positive integer)")
        wire = WireFormat(hidden_size=hidden, activation_bytes=args.activation_bytes)
    elif args.hidden_size is not None:
        raise SpecMoEUsageError("--hidden-size only sizes the inter-node bytes", "pass --gpus-per-node too")
    if args.num_experts is not None and args.num_experts != plan.header.num_experts:
        raise SpecMoEUsageError(f"--num-experts {args.num_experts} but the plan {args.plan} was made for "
                                f"{plan.header.num_experts} experts", "evaluate a plan of this model")
    trace = read_traces(args.traces, num_experts=args.num_experts)
    if trace.num_experts != plan.header.num_experts:
        raise SpecMoEDataError(f"--traces record {trace.num_experts} experts but the plan {args.plan} was "
                               f"made for {plan.header.num_experts}", "evaluate a plan of this model")
    try:
        plan.check_compatible(num_layers=trace.num_layers, num_experts=trace.num_experts,
                              topk=trace.topk, ep_size=plan.header.ep_size)
    except ValueError as exc:
        raise SpecMoEDataError(f"--plan {args.plan} does not fit --traces: {exc}",
                               "evaluate a plan made for this model") from None
    if args.dedup:
        before = trace.num_tokens
        trace, _ = dedup_routes(trace)
        print(f"[evaluate] --dedup: dropped {before - trace.num_tokens} of {before} tokens that "
              "repeat an earlier route", file=sys.stderr)
    if trace.num_tokens == 0:
        raise SpecMoEDataError(f"--traces {' '.join(args.traces)}: no tokens", "give traces with routes")
    from megatron_specmoe.schedule.replicas import replicas_from_arrays

    replicas = replicas_from_arrays(plan.placements, plan.arrays, plan.header.notes.get("replica_policy", "load"))
    predictor = load_predictor(plan, args.kind)
    request_home = None
    if args.request_placement is not None:
        from typing import get_args as _methods

        from megatron_specmoe.schedule.request_placement import TraceRequestMethod, trace_request_homes

        if args.request_placement not in _methods(TraceRequestMethod):
            raise SpecMoEUsageError(f"--request-placement {args.request_placement!r} is not a method",
                                    f"choose one of {list(_methods(TraceRequestMethod))}")
        if trace.request_ids is None:
            raise SpecMoEDataError(f"--request-placement needs traces with request ids; {' '.join(args.traces)} "
                                   "carry none", "give traces with request ids (Megatron JSONL, specmoe npz)")
        request_home = trace_request_homes(trace.request_ids, trace.token_ids, predictor=predictor,
                                           placements=plan.placements, method=args.request_placement)
    result = evaluate_trace(trace, predictor, plan.placements, batch_size=args.batch,
                            method=args.assignment, progress=True,
                            gpus_per_node=args.gpus_per_node, wire=wire, replicas=replicas,
                            request_home=request_home)
    out = result.to_json()
    out["config"].update(plan=str(args.plan), traces=[str(p) for p in args.traces], dedup=args.dedup)
    if args.json:
        print(json.dumps(out))
    else:
        print(f"plan {args.plan}, predictor {out['config']['predictor']!r}, {result.num_tokens} tokens, "
              f"EP={result.num_ranks}, batch {args.batch}, assignment {args.assignment}")
        print(_table(out))
    return 0
