"""``specmoe plan``: fit route predictors and an expert placement on routing traces, write a plan.

Steps (each prints a progress bar to stderr; before fitting, a fit-time estimate per predictor):
1. read the traces (any format ``artifacts/trace_io.py`` reads), optionally drop repeated routes;
2. fit each requested predictor (``predict/registry.py``);
3. group experts per layer (``schedule/grouping.py``; ``--placement contiguous`` skips it);
4. write the plan folder (``artifacts/plan_folder.py``): header, placements, predictor states.

Evaluate the plan on *other* traces than it was fitted on (``specmoe evaluate``).
"""

from __future__ import annotations

import argparse
import sys
import time

HELP = "fit route predictors and an expert placement on routing traces; write a plan folder"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--traces", required=True, nargs="+", metavar="FILE",
                   help="routing traces to fit on (layer-major JSON, Megatron router-trace JSONL or folder, "
                        "specmoe .npz)")
    p.add_argument("--ep", required=True, type=int, metavar="P", help="expert-parallel size the plan is for")
    p.add_argument("--out", required=True, metavar="DIR", help="plan folder to write")
    p.add_argument("--predictor", nargs="+", default=None, metavar="KIND",
                   help="predictor kinds to fit, first is the default at run time: token, layer, history, "
                        "combined (default: combined; its members are token+layer when the traces carry "
                        "token ids, else layer+history)")
    p.add_argument("--members", default=None, metavar="K1,K2",
                   help="members of the combined predictor (comma-separated kinds)")
    p.add_argument("--placement", default="search", metavar="METHOD",
                   help="expert grouping method (schedule/grouping.py): contiguous, random, eplb, graph, "
                        "alternating, search (default), milp")
    p.add_argument("--redundant-experts", type=int, default=0, metavar="R",
                   help="extra physical slots (a multiple of --ep) that replicate hot experts "
                        "(schedule/replicas.py); with --router-groups each copy stays in its group's "
                        "--group-domain, so the node bound holds; 0: none (default)")
    p.add_argument("--replica-policy", default="load", metavar="POLICY",
                   help="how replicas are chosen: load (EPLB), coactivation, both (default load)")
    p.add_argument("--theta", type=float, default=0.1, help="weight of load imbalance in the grouping objective")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--router-groups", type=int, default=1, metavar="G",
                   help="the model's moe_router_num_groups (group-limited routing); the grouping then keeps "
                        "each group on its own ranks or nodes (--group-domain). Default 1: no groups")
    p.add_argument("--group-topk", type=int, default=0, metavar="M",
                   help="the model's moe_router_group_topk (recorded in the plan; 0: unknown)")
    p.add_argument("--group-domain", default="rank", choices=("rank", "node", "none"),
                   help="with --router-groups: where a group's experts may move: among its own ranks "
                        "(default; also valid for router mode), within its node (keeps the node bound; "
                        "dispatcher mode only), or anywhere (breaks the bound; dispatcher mode only)")
    p.add_argument("--ranks-per-node", type=int, default=8, metavar="R",
                   help="EP ranks per node, for --group-domain node (default 8)")
    p.add_argument("--dedup", action="store_true",
                   help="drop tokens whose whole route repeats an earlier token's before fitting")
    p.add_argument("--num-experts", type=int, default=None, metavar="E",
                   help="routed experts per MoE layer; required for JSON / JSONL traces, which do not "
                        "record it (a .npz records it; checked when given)")
    p.add_argument("--hidden-size", type=int, default=None, help="model hidden size, recorded in the plan")
    p.add_argument("--vocab-size", type=int, default=None, help="model vocabulary, recorded in the plan")


def _log(msg: str) -> None:
    print(f"[specmoe plan] {msg}", file=sys.stderr, flush=True)


def check_flags(args: argparse.Namespace):
    """Every flag check that needs no trace, before any reading or fitting; returns the
    GroupingOptions. Raises SpecMoEUsageError naming the flag."""
    from megatron_specmoe.artifacts.errors import SpecMoEUsageError
    from megatron_specmoe.artifacts.files import check_output_dir
    from megatron_specmoe.artifacts.trace_checks import check_num_experts
    from megatron_specmoe.predict.registry import check_kind
    from megatron_specmoe.schedule.grouping import GroupingOptions

    if args.ep < 1:
        raise SpecMoEUsageError(f"--ep {args.ep}: must be >= 1", "give the EP size the plan is for, e.g. --ep 8")
    check_num_experts(args.num_experts)
    from megatron_specmoe.schedule.replicas import REPLICA_POLICIES

    if args.replica_policy not in REPLICA_POLICIES:
        raise SpecMoEUsageError(f"--replica-policy {args.replica_policy!r} is not a policy",
                                f"choose one of {list(REPLICA_POLICIES)}")
    if args.redundant_experts < 0 or args.redundant_experts % args.ep:
        raise SpecMoEUsageError(f"--redundant-experts {args.redundant_experts} must be a non-negative multiple "
                                f"of --ep {args.ep}", "every rank gains the same number of slots")
    if args.num_experts is not None and args.num_experts % args.ep:
        raise SpecMoEUsageError(f"--ep {args.ep} does not divide --num-experts {args.num_experts}",
                                "every EP rank hosts the same number of experts: pick a divisor")
    for flag, value in (("--hidden-size", args.hidden_size), ("--vocab-size", args.vocab_size)):
        if value is not None and value < 1:
            raise SpecMoEUsageError(f"{flag} {value}: must be >= 1", f"give the model's {flag[2:]} or leave it out")
    for kind in args.predictor or ["combined"]:
        try:
            check_kind(kind)
        except ValueError as exc:
            raise SpecMoEUsageError(f"--predictor {kind}: {exc}", "choose token, layer, history or combined") from None
    for kind in (args.members.split(",") if args.members else []):
        try:
            check_kind(kind)
        except ValueError as exc:
            raise SpecMoEUsageError(f"--members {args.members}: {exc}", "list kinds like layer,history") from None
    groups = check_router_groups(args)
    try:
        options = GroupingOptions(method=args.placement, theta=args.theta, seed=args.seed,
                                  router_groups=groups if groups.active else None)
    except ValueError as exc:
        raise SpecMoEUsageError(f"--placement {args.placement} / --theta {args.theta}: {exc}",
                                "see `specmoe plan --help` for the methods; --theta lies in [0, 1]") from None
    check_output_dir("--out", args.out, marker="plan.json")
    return options


def check_router_groups(args: argparse.Namespace):
    """The --router-groups / --group-topk / --group-domain / --ranks-per-node flags as a
    ``RouterGroups`` (checked against --ep and --num-experts when given)."""
    from megatron_specmoe.artifacts.errors import SpecMoEUsageError
    from megatron_specmoe.schedule.router_groups import RouterGroups

    try:
        groups = RouterGroups(num_groups=args.router_groups, group_topk=args.group_topk,
                              domain=args.group_domain, ranks_per_node=args.ranks_per_node)
        if groups.active and args.num_experts is not None:
            groups.domain_ranks(args.num_experts, args.ep)
    except ValueError as exc:
        raise SpecMoEUsageError(f"--router-groups {args.router_groups}: {exc}",
                                "give the model's moe_router_num_groups / moe_router_group_topk") from None
    return groups


def run(args: argparse.Namespace) -> int:
    from megatron_specmoe.artifacts.errors import SpecMoEUsageError
    from megatron_specmoe.artifacts.plan_folder import make_plan, save_plan
    from megatron_specmoe.artifacts.trace_io import dedup_routes, read_traces
    from megatron_specmoe.cli.progress import ProgressBar
    from megatron_specmoe.predict.registry import estimate_fit_seconds, make
    from megatron_specmoe.schedule.grouping import group_experts
    from megatron_specmoe.schedule.placement import ExpertPlacement

    options = check_flags(args)
    t0 = time.perf_counter()
    trace = read_traces(args.traces, num_experts=args.num_experts)
    if trace.num_experts % args.ep:
        raise SpecMoEUsageError(
            f"--ep {args.ep} does not divide the traces' {trace.num_experts} experts",
            "every EP rank hosts the same number of experts: pick a divisor of the expert count")
    _log(f"read {trace.num_tokens} tokens, {trace.num_layers} MoE layers, top-{trace.topk} of "
         f"{trace.num_experts} experts from {len(args.traces)} file(s) ({time.perf_counter() - t0:.1f}s)")
    if trace.num_tokens == 0:
        raise SpecMoEUsageError(f"--traces {' '.join(args.traces)}: no tokens", "give traces with routes")
    groups = options.router_groups
    if groups is not None:
        try:
            d = groups.domain_ranks(trace.num_experts, args.ep)
        except ValueError as exc:
            raise SpecMoEUsageError(f"--router-groups {args.router_groups}: {exc}",
                                    "give the model's moe_router_num_groups and an EP size it fits") from None
        _log(f"router groups: {groups.num_groups} of {trace.num_experts // groups.num_groups} experts, "
             f"domain {groups.domain!r}: experts move only inside blocks of {d} rank(s)"
             + (" (one rank per domain: the placement stays contiguous)" if d == 1 else ""))
    if args.dedup:
        before = trace.num_tokens
        trace, _ = dedup_routes(trace)
        _log(f"--dedup: dropped {before - trace.num_tokens} of {before} tokens repeating an earlier route")

    kinds = args.predictor or ["combined"]
    has_ids = trace.token_ids is not None
    members = (args.members.split(",") if args.members else (["token", "layer"] if has_ids else ["layer", "history"]))
    states = {}
    for kind in kinds:
        needs_ids = kind == "token" or (kind == "combined" and "token" in members)
        if needs_ids and not has_ids:
            raise SpecMoEUsageError(
                f"--predictor {kind} needs token ids, and the traces {' '.join(args.traces)} carry none",
                "use --predictor layer or history, or --members layer,history")
    estimates = {}
    for kind in kinds:
        opts = {"members": tuple(members)} if kind == "combined" else {}
        estimates[kind] = estimate_fit_seconds(kind, trace, **opts)
    _log("fit-time estimate: " + ", ".join(f"{k!r} ~{v:.0f} s" for k, v in estimates.items())
         + " (history: an upper bound at its most epochs; tables: a sample's fit scaled by tokens)")
    for kind in kinds:
        t1 = time.perf_counter()
        opts = {"members": tuple(members)} if kind == "combined" else {}
        predictor = make(kind, **opts)
        units = (trace.num_layers - 1 if kind == "history" else
                 sum(trace.num_layers - 1 if m == "history" else 1 for m in members) if kind == "combined" else 1)
        bar = ProgressBar(f"specmoe plan: fit {kind}", max(1, units), unit="layers" if kind == "history" else "steps")
        if kind in ("history", "combined"):
            predictor.fit(trace, progress=bar.update)
        else:
            predictor.fit(trace)
        bar.finish()
        states[kind] = predictor.to_state()
        _log(f"fitted {kind!r} ({predictor.memory_bytes() / 1e6:.2f} MB) in {time.perf_counter() - t1:.1f}s")

    t2 = time.perf_counter()
    if args.placement == "contiguous":
        placements = [ExpertPlacement.contiguous(trace.num_experts, args.ep)] * trace.num_layers
    else:
        bar = ProgressBar(f"specmoe plan: group {args.placement}", trace.num_layers)
        placements = group_experts(trace, ep_size=args.ep, options=options, on_layer=bar.update)
        bar.finish()
    _log(f"placement {args.placement!r} for {trace.num_layers} layers in {time.perf_counter() - t2:.1f}s")

    arrays, replica_notes = {}, {}
    if args.redundant_experts:
        from megatron_specmoe.schedule.replicas import replicas_to_arrays, replicate_layers

        # With router groups a copy stays in its group's domain (the node bound holds with replicas).
        allowed = groups.replica_ranks(trace.num_experts, args.ep) if groups is not None else None
        try:
            replicas = replicate_layers(placements, trace.experts, redundant=args.redundant_experts,
                                        policy=args.replica_policy, allowed=allowed)
        except ValueError as exc:
            raise SpecMoEUsageError(str(exc), "choose fewer redundant experts"
                                    + (" or a wider --group-domain" if groups is not None else "")) from None
        if groups is not None:
            from megatron_specmoe.schedule.router_groups import check_replica_domains

            for layer, rep in enumerate(replicas):
                check_replica_domains(rep, groups, where=f"layer {layer} replicas")
        arrays = replicas_to_arrays(replicas)
        replica_notes = {"redundant_experts": args.redundant_experts, "replica_policy": args.replica_policy}
        _log(f"replicas: {args.redundant_experts} slots per layer by {args.replica_policy!r} "
             f"({args.redundant_experts // args.ep} per rank)"
             + (f", each copy inside its router group's {groups.domain!r} domain" if groups is not None else ""))
    plan = make_plan(
        num_layers=trace.num_layers, num_experts=trace.num_experts, topk=trace.topk, ep_size=args.ep,
        hidden_size=args.hidden_size, vocab_size=args.vocab_size, placements=placements,
        predictor_state=states, arrays=arrays,
        notes={"traces": [str(p) for p in args.traces], "dedup": bool(args.dedup),
               "placement_method": args.placement, "theta": args.theta, "members": members,
               "router_groups": groups.to_json() if groups is not None else None,
               **replica_notes},
    )
    saved = save_plan(plan, args.out)
    _log(f"wrote {args.out} (predictors {list(states)}, checksum {saved.header.checksum[:12]}...) "
         f"in {time.perf_counter() - t0:.1f}s total")
    return 0
