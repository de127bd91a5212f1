"""``specmoe simulate``: MoE-layer time of specmoe and of the dispatchers users pick instead, on a cluster.

From real or synthetic traces; ``--calibration`` prints the model against every published
measurement it is checked on.

For every EP size asked for, simulate every dispatcher model of ``sim/dispatchers.py`` on the same
tokens (``sim/compare.py``) and print one table row: time per MoE layer per step (dispatch +
combine, plus specmoe's exposed plan time), specmoe's speed-up over ``alltoall`` and the local
activation rates. ``--json`` writes every number (``rows[i][name]`` holds ``dispatch_time_s`` and
``combine_time_s`` of each model), ``--plot`` a PNG of time vs EP.

Replicas. With a ``--plan`` made with ``--redundant-experts R``, the row of the plan's EP size also
holds ``replicas``: every ``specmoe_*`` model on the replica routes (s-TS by ranks holding any copy,
each pair to the copy on its home rank, else to the least planned-load copy: the plan's route
table), with its local activation rate, remote pairs, bytes, times and ratios to the same model
without replicas. Other EP sizes say why they have none.

Request placement (``--request-placement METHOD``, DP attention, ``--tp 1`` only): whole requests
placed on DP ranks instead of s-TS; each row's ``request_placement`` compares the method with
round_robin and Megatron's least_loaded on the plan's placement (local activation rate, remote
pairs, remote nodes per token, inter-node bytes per token), ``sim/compare.py`` says how.

Predictors for s-TS (``--predictor``)
    oracle   the true routes (perfect prediction): an upper bound, needs no fitting.
    plan     the predictor stored in ``--plan`` (kind ``--plan-kind``, default its first).
    KIND     a kind of ``predict/registry.py`` (layer, history, token, combined) fitted on
             ``--fit-traces`` (other workloads than ``--traces``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Sequence

from megatron_specmoe.artifacts.errors import SpecMoEDataError, SpecMoEUsageError
from megatron_specmoe.artifacts.files import atomic_file, check_output_file

HELP = ("predict MoE-layer time of specmoe vs alltoall, DeepEP and the inference all-gather on a "
        "cluster, from traces; --calibration checks the model against published measurements")

# assignment.AssignmentMethod, spelled out so that building the parser does not import torch
# (tests/test_simulate.py checks that the two agree).
ASSIGNMENT_CHOICES = ("contiguous", "argsort", "greedy", "refine", "refine_spread", "prices", "optimal")
DTYPE_CHOICES = ("bf16", "fp16", "fp32", "fp8")  # sim.wire.WireDtype (checked by the tests)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from megatron_specmoe.sim.cluster import PresetName
    from typing import get_args

    parser.add_argument("--traces", nargs="+", default=None, metavar="FILE",
                        help="routing traces to simulate (any format trace_io reads); required unless --calibration")
    parser.add_argument("--calibration", action="store_true",
                        help="print the model against every published measurement (sim/calibration.csv) and exit")
    parser.add_argument("--fit-traces", nargs="+", metavar="FILE", default=None,
                        help="traces to fit --predictor KIND on (other workloads than --traces)")
    parser.add_argument("--plan", metavar="DIR", default=None,
                        help="plan folder: its placements (and with --predictor plan its predictor)")
    parser.add_argument("--predictor", default=None,
                        help="s-TS predictor: oracle (default without --plan), plan (default with a "
                             "--plan that stores one), or a predictor kind fitted on --fit-traces")
    parser.add_argument("--plan-kind", default=None, help="predictor kind to take from the plan")
    parser.add_argument("--cluster", choices=get_args(PresetName), default="h200-ib",
                        help="cluster preset (sim/cluster.py states every constant and its source)")
    parser.add_argument("--nic-routing", choices=("direct", "rail"), default=None,
                        help="NCCL all-to-all's inter-node path: rail (PXN, the preset default on HGX) "
                             "or direct (each GPU's own NIC)")
    parser.add_argument("--ep", default="8,16,32,64", help="EP sizes, comma-separated")
    parser.add_argument("--tp", default="node",
                        help="attention TP size (s-TS shuffle domain): an int, 'node' = min(GPUs per "
                             "node, EP) (default), or 'ep' = TP spans the whole EP group")
    parser.add_argument("--hidden", type=int, default=4096, help="hidden size H (Mixtral-8x7B: 4096)")
    parser.add_argument("--dispatch-dtype", choices=DTYPE_CHOICES, default=None,
                        help="dtype of dispatched rows (fp8: 1 B per element + one fp32 scale per 128); default bf16")
    parser.add_argument("--combine-dtype", choices=DTYPE_CHOICES, default=None,
                        help="dtype of combined rows; default bf16")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                        help="both phases' dtype (refused together with --dispatch-dtype / --combine-dtype)")
    parser.add_argument("--tokens-per-rank", type=int, default=64,
                        help="tokens each GPU holds in a step (prefill: thousands; decode: tens to hundreds)")
    parser.add_argument("--dispatchers", default=None,
                        help="comma-separated dispatcher models (default: all of sim/dispatchers.py)")
    parser.add_argument("--plan-kernels", type=int, default=None,
                        help="kernels specmoe's plan launches per MoE layer (default 16, the fast-plan "
                             "budget; replace by the measured count)")
    parser.add_argument("--plan-launch", choices=("graph", "eager"), default="graph",
                        help="plan kernels replayed in a CUDA graph (default) or launched eagerly")
    parser.add_argument("--no-plan-overlap", action="store_true",
                        help="charge the whole plan (default: hidden behind attention on a side stream)")
    parser.add_argument("--phase", choices=("decode", "prefill"), default="decode",
                        help="attention roofline used to hide the plan (default decode)")
    parser.add_argument("--context", type=int, default=4096,
                        help="context length for the attention roofline (decode KV length; prefill sequence)")
    parser.add_argument("--dedup", action="store_true",
                        help="drop tokens whose whole route repeats an earlier one (Mixtral MT-Bench traces)")
    parser.add_argument("--assignment", default="refine", choices=ASSIGNMENT_CHOICES,
                        help="balanced assignment method (schedule/assignment.py)")
    parser.add_argument("--num-experts", type=int, default=None, metavar="E",
                        help="routed experts per MoE layer; required for JSON / JSONL traces without --plan "
                             "(they do not record it)")
    parser.add_argument("--request-placement", default=None, metavar="METHOD",
                        help="DP attention (needs --tp 1): place whole requests on DP ranks instead of s-TS, "
                             "by round_robin, least_loaded (Megatron's), affinity or group_mask; the rows "
                             "then compare the three side by side (needs traces with request ids)")
    parser.add_argument("--json", metavar="OUT", default=None, help="write all numbers as JSON")
    parser.add_argument("--plot", metavar="OUT.png", default=None, help="write a PNG of time vs EP")


def parse_ep_list(text: str) -> list[int]:
    try:
        eps = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SpecMoEUsageError(f"--ep {text!r}: not comma-separated integers",
                                "give EP sizes like --ep 8,16,32,64") from None
    if not eps or min(eps) < 1:
        raise SpecMoEUsageError(f"--ep {text!r}: needs positive EP sizes", "give EP sizes like --ep 8,16,32,64")
    return eps


def resolve_tp(text: str, ep: int, gpus_per_node: int) -> int:
    """The TP size for one EP size from ``--tp``."""
    if text == "node":
        return min(gpus_per_node, ep)
    if text == "ep":
        return ep
    try:
        tp = int(text)
    except ValueError:
        raise SpecMoEUsageError(f"--tp {text!r}: not an int, 'node' or 'ep'", "e.g. --tp 8 or --tp node") from None
    if tp < 1 or ep % tp:
        raise SpecMoEUsageError(f"--tp {tp}: must divide every EP size, and EP {ep} is not a multiple",
                                "choose a --tp that divides every --ep, or --tp node")
    return tp


def resolve_dtypes(args: argparse.Namespace) -> tuple[str, str]:
    """(dispatch dtype, combine dtype) from --dtype / --dispatch-dtype / --combine-dtype."""
    if args.dtype is not None and (args.dispatch_dtype is not None or args.combine_dtype is not None):
        raise SpecMoEUsageError("--dtype sets both phases and cannot go with --dispatch-dtype / --combine-dtype",
                                "use --dtype alone, or --dispatch-dtype / --combine-dtype")
    if args.dtype is not None:
        return args.dtype, args.dtype
    return args.dispatch_dtype or "bf16", args.combine_dtype or "bf16"


def parse_dispatchers(text) -> list[str] | None:
    from typing import get_args

    from megatron_specmoe.sim.dispatchers import DispatcherName

    if text is None:
        return None
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in get_args(DispatcherName)]
    if bad or not names:
        raise SpecMoEUsageError(f"--dispatchers: unknown {bad or text!r}",
                                f"choose from {', '.join(get_args(DispatcherName))}")
    return names


def _predictor_scores(args, trace, plan):
    """float32 [T, L, E] expert scores and a one-line description."""
    from megatron_specmoe.sim.inputs import oracle_expert_scores, predictor_expert_scores

    kind = args.predictor or ("plan" if plan is not None and plan.header.predictor_kinds else "oracle")
    if kind == "oracle":
        return oracle_expert_scores(trace), "oracle (true routes; an upper bound)"
    from megatron_specmoe.predict import registry

    if kind != "plan":
        try:
            registry.check_kind(kind)
        except ValueError as exc:
            raise SpecMoEUsageError(f"--predictor {kind}: {exc}", "use oracle, plan or a predictor kind") from None
        from megatron_specmoe.artifacts.trace_io import dedup_routes, read_traces

        fit = read_traces(args.fit_traces, num_experts=trace.num_experts)
        if args.dedup:
            fit, _ = dedup_routes(fit)
        print(f"simulate: fitting the {kind} predictor on {fit.num_tokens} tokens", file=sys.stderr)
        predictor = registry.fit_predictor(kind, fit)
        return predictor_expert_scores(predictor, trace), f"{kind} fitted on {', '.join(args.fit_traces)}"
    kinds = plan.header.predictor_kinds
    chosen = args.plan_kind or (kinds[0] if kinds else None)
    if chosen not in kinds:
        raise SpecMoEUsageError(f"--plan-kind {chosen!r}: plan {plan.source} stores predictor kinds {list(kinds)}",
                                "choose one of those, or --predictor oracle")
    predictor = registry.predictor_from_state(chosen, plan.predictor_state[chosen])
    return predictor_expert_scores(predictor, trace), f"plan {plan.source} predictor {chosen!r}"


def simulate_rows(
    trace, scores, *, eps: Sequence[int], tp_arg: str, cluster, hidden: int, dispatch_dtype: str = "bf16",
    combine_dtype: str = "bf16", tokens_per_rank: int, plan_placements=None, method: str = "refine",
    dispatchers=None, charge=None, replicas=None, request_method=None,
) -> list[dict]:
    """One ``Comparison.table_row()`` per EP size, all on the same tokens."""
    from megatron_specmoe.sim.compare import compare_dispatchers

    rows = []
    for ep in eps:
        tp = resolve_tp(tp_arg, ep, cluster.gpus_per_node)
        t0 = time.perf_counter()
        cmp = compare_dispatchers(
            trace, scores, ep=ep, tp=tp, cluster=cluster, hidden_size=hidden, dispatch_dtype=dispatch_dtype,
            combine_dtype=combine_dtype, tokens_per_rank=tokens_per_rank, plan_placements=plan_placements,
            method=method, dispatchers=dispatchers, charge=charge, replicas=replicas,
            request_ids=None if request_method is None else trace.request_ids, request_method=request_method,
        )
        rows.append(cmp.table_row())
        print(f"simulate: EP={ep} TP={tp} done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return rows


def _calibration(args) -> int:
    from megatron_specmoe.sim.calibration import format_calibration, run_calibration

    def progress(i, n, row):
        print(f"simulate --calibration: {i + 1}/{n} {row.id}", file=sys.stderr, flush=True)

    results = run_calibration(progress=progress)
    print("Model vs published measurements (ratio = predicted / measured):\n")
    print(format_calibration(results))
    if args.json:
        with atomic_file(args.json) as tmp:
            tmp.write_text(json.dumps([{**dataclasses.asdict(r.row), "predicted": r.predicted, "ratio": r.ratio,
                                        "within": r.within, "miss_reason": r.miss_reason} for r in results], indent=1))
    return 0


def _checked(args) -> None:
    """SpecMoEUsageError naming the flag for values argparse cannot check, before any work."""
    from megatron_specmoe.artifacts.trace_checks import check_num_experts

    for flag, value, least in (("--hidden", args.hidden, 1), ("--tokens-per-rank", args.tokens_per_rank, 1),
                               ("--plan-kernels", args.plan_kernels, 0), ("--context", args.context, 1)):
        if value is not None and value < least:
            raise SpecMoEUsageError(f"{flag} {value}: must be >= {least}", f"give {flag} a count >= {least}")
    check_num_experts(args.num_experts)
    if args.predictor not in (None, "oracle", "plan") and not args.fit_traces:
        raise SpecMoEUsageError(f"--predictor {args.predictor} needs traces to fit on",
                                "add --fit-traces FILE... (other workloads than --traces)")
    if args.predictor == "plan" and not args.plan:
        raise SpecMoEUsageError("--predictor plan needs a plan", "add --plan DIR")
    if args.request_placement is not None:
        from typing import get_args

        from megatron_specmoe.schedule.request_placement import TraceRequestMethod

        methods = list(get_args(TraceRequestMethod))
        if args.request_placement not in methods:
            raise SpecMoEUsageError(f"--request-placement {args.request_placement!r} is not a method",
                                    f"choose one of {methods}")
    for flag, out in (("--json", args.json), ("--plot", args.plot)):
        if out is not None:
            check_output_file(flag, out)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from megatron_specmoe.artifacts.trace_io import dedup_routes, read_traces
    from megatron_specmoe.cli.simulate_report import format_extras, format_table, plot_rows
    from megatron_specmoe.sim.cluster import cluster_preset
    from megatron_specmoe.sim.plan_cost import DEFAULT_PLAN_KERNELS, PlanCharge
    from megatron_specmoe.sim.wire import WireDtypes

    # The simulator works on many small tensors; extra intra-op threads only add overhead.
    torch.set_num_threads(1)
    if args.calibration:
        if args.traces:
            raise SpecMoEUsageError("--calibration uses the published measurements' own routes",
                                    "drop --traces (or drop --calibration)")
        if args.json is not None:
            check_output_file("--json", args.json)
        return _calibration(args)
    if not args.traces:
        raise SpecMoEUsageError("no traces given", "pass --traces FILE... (or --calibration)")
    _checked(args)
    eps = parse_ep_list(args.ep)
    for ep in eps:
        resolve_tp(args.tp, ep, 1 << 30)  # refuse a bad --tp before any work ('node' resolved later)
    dispatch_dtype, combine_dtype = resolve_dtypes(args)
    try:
        WireDtypes(hidden_size=args.hidden, dispatch=dispatch_dtype, combine=combine_dtype)
    except ValueError as exc:
        raise SpecMoEUsageError(f"--hidden {args.hidden} / dtypes: {exc}", "see `specmoe simulate --help`") from None
    names = parse_dispatchers(args.dispatchers)
    charge = PlanCharge(
        kernels=DEFAULT_PLAN_KERNELS if args.plan_kernels is None else args.plan_kernels,
        launch=args.plan_launch, overlap=not args.no_plan_overlap, phase=args.phase, context=args.context,
    )
    cluster = cluster_preset(args.cluster)
    if args.nic_routing is not None and args.nic_routing != cluster.inter_node_routing:
        cluster = dataclasses.replace(cluster, inter_node_routing=args.nic_routing)
    if args.request_placement is not None:
        wide = [(ep, tp) for ep in eps if (tp := resolve_tp(args.tp, ep, cluster.gpus_per_node)) != 1]
        if wide:
            raise SpecMoEUsageError(
                f"--request-placement models DP attention (TP = 1, a token never leaves its rank), but --tp "
                f"{args.tp} gives TP = {wide[0][1]} at EP {wide[0][0]}", "pass --tp 1")
    plan, num_experts = None, args.num_experts
    if args.plan:
        from megatron_specmoe.artifacts.plan_folder import load_plan

        plan = load_plan(args.plan)
        if num_experts is not None and num_experts != plan.header.num_experts:
            raise SpecMoEUsageError(f"--num-experts {num_experts} but the plan {args.plan} was made for "
                                    f"{plan.header.num_experts} experts", "simulate with a plan of this model")
        num_experts = plan.header.num_experts
    trace = read_traces(args.traces, num_experts=num_experts)
    total = trace.num_tokens
    if args.dedup:
        trace, _ = dedup_routes(trace)
        print(f"simulate: {total} tokens, {trace.num_tokens} after dropping repeated routes", file=sys.stderr)
    if plan is not None:
        try:
            plan.check_compatible(num_layers=trace.num_layers, num_experts=trace.num_experts,
                                  topk=trace.topk, ep_size=plan.header.ep_size)
        except ValueError as exc:
            raise SpecMoEDataError(f"--plan {args.plan} does not fit --traces: {exc}",
                                   "simulate with a plan made for this model") from None
    # Same tokens for every EP size: a multiple of the largest step.
    step = args.tokens_per_rank * max(eps)
    used = trace.num_tokens // step * step
    if used == 0:
        raise SpecMoEUsageError(
            f"--traces hold {trace.num_tokens} tokens, fewer than one step of EP {max(eps)} x "
            f"--tokens-per-rank {args.tokens_per_rank} = {step}", "lower --tokens-per-rank or --ep")
    print(f"simulate: using the first {used} of {trace.num_tokens} tokens (a multiple of the "
          f"largest step, {step})", file=sys.stderr)
    trace = trace.select(np.arange(used))
    replicas = None
    if plan is not None:
        from megatron_specmoe.schedule.replicas import replicas_from_arrays

        replicas = replicas_from_arrays(plan.placements, plan.arrays, plan.header.notes.get("replica_policy", "load"))
    if args.request_placement is not None:
        if trace.request_ids is None:
            raise SpecMoEDataError(f"--request-placement needs traces with request ids; {' '.join(args.traces)} "
                                   "carry none", "give traces with request ids (Megatron JSONL, specmoe npz)")
        if replicas is not None:
            raise SpecMoEUsageError(f"--request-placement and the replicas of plan {args.plan} are not simulated "
                                    "together", "use a plan made without --redundant-experts, or drop --request-placement")
    if replicas is not None and plan.header.ep_size not in eps:
        print(f"simulate: the plan's {replicas[0].redundant} replicas are per rank of EP {plan.header.ep_size}, "
              f"which --ep {args.ep} does not include: no row simulates them", file=sys.stderr)
    scores, predictor_desc = _predictor_scores(args, trace, plan)
    rows = simulate_rows(
        trace, scores, eps=eps, tp_arg=args.tp, cluster=cluster, hidden=args.hidden,
        dispatch_dtype=dispatch_dtype, combine_dtype=combine_dtype, tokens_per_rank=args.tokens_per_rank,
        plan_placements=None if plan is None else plan.placements, method=args.assignment,
        dispatchers=names, charge=charge, replicas=replicas, request_method=args.request_placement,
    )
    print(f"cluster {cluster.name} (NCCL all-to-all NIC routing {cluster.inter_node_routing}): {cluster.source}")
    print(f"predictor: {predictor_desc}; tokens: {used}; hidden {args.hidden}, dispatch {dispatch_dtype}, "
          f"combine {combine_dtype}; {args.tokens_per_rank} tokens per GPU per step")
    print(f"plan: {charge.kernels} kernels per MoE layer, {charge.launch} launches, "
          f"{'overlapped with' if charge.overlap else 'not overlapped with'} {charge.phase} attention "
          f"(context {charge.context}); times per MoE layer per step = dispatch + combine + exposed plan")
    print(format_table(rows))
    extras = format_extras(rows)
    if extras:
        print(extras)
    if args.json:
        with atomic_file(args.json) as tmp:
            tmp.write_text(json.dumps({"cluster": cluster.to_json(), "predictor": predictor_desc, "tokens": used,
                                       "hidden": args.hidden, "dispatch_dtype": dispatch_dtype,
                                       "combine_dtype": combine_dtype, "tokens_per_rank": args.tokens_per_rank,
                                       "request_placement": args.request_placement,
                                       "redundant_experts": 0 if replicas is None else replicas[0].redundant,
                                       "plan": dataclasses.asdict(charge), "rows": rows}, indent=1))
    if args.plot:
        plot_rows({f"{args.tokens_per_rank} tokens/GPU": rows}, args.plot,
                  f"{cluster.name}, H={args.hidden} {dispatch_dtype}/{combine_dtype}, {predictor_desc.split(' (')[0]}")
    return 0
