"""Benchmark expert grouping (schedule/grouping.py): quality on real traces, gap to the optimum,
planning time at scale. Prints its numbers and the command that made them.

Part A - Mixtral-8x7B MT-Bench traces (../shared/traces/mixtral-mtbench), EP = 4 (2 experts per
rank), leave-one-category-out: plan on three categories, evaluate on the fourth (repeated routes
dropped within each side first, as the traces' README asks). Per planner, on the held-out tokens,
pooled over layers and the four held-out categories:
    both-on-one-rank  share of (token, layer) whose k experts share a rank (placement alone)
    LAR contiguous    local activation rate with Megatron's contiguous shards (no shuffle)
    LAR shuffle       local activation rate with the oracle balanced shuffle: per batch of B tokens
                      (trace order), ``assignment.assign(true rank hits, --assignment)`` with
                      capacity B/P per rank (home = rank with most of the token's experts, balanced)
    imbalance         load imbalance (max/mean pairs per rank) per layer over the held-out tokens,
                      mean over layers; and the mean over (batch, layer) at B
Part B - gap to the optimum: the exact 0-1 program (HiGHS) vs every heuristic on the fitting data of
the first split, per layer, for --milp-layers layers.
Part C - planning time: synthetic routes with planted structure (the shape of a 64-expert, top-6,
27-layer model such as DeepSeek-V2-Lite; no such real trace is available here), 100k tokens, EP = 8,
one CPU core (BLAS/OpenMP/torch threads set to 1). CPU time of this process is reported beside wall
time, which other jobs on a shared machine inflate.

    python tools/bench_grouping.py                 # all parts
    python tools/bench_grouping.py --parts A       # only the Mixtral table
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one core, before numpy/torch load

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from bench_data import MIXTRAL_TRACES  # noqa: E402 - tools/ is on sys.path when run


def _mixtral(args, methods):
    import torch

    from megatron_specmoe.schedule.assignment import assign
    from megatron_specmoe.schedule.grouping import GroupingOptions, group_experts
    from megatron_specmoe.measure.measures import RouteMeasures, measure_routes, rank_hits
    from megatron_specmoe.artifacts.trace_io import leave_one_out_splits, read_traces

    files = sorted(Path(args.traces).glob("experts_*_mixtral.json"))
    if not files:
        raise SystemExit(f"no experts_*_mixtral.json in {args.traces}")
    traces = [read_traces(str(f), num_experts=8) for f in files]
    names = [f.name.split("_")[1] for f in files]
    splits = leave_one_out_splits(traces, dedup=True)
    P, B = args.ep, args.batch
    stats = {m: {"both": [0, 0], "fit_both": [0, 0], "lar_c": RouteMeasures.empty(P),
                 "lar_s": RouteMeasures.empty(P), "lar_p": RouteMeasures.empty(P), "imb_layer": [],
                 "imb_batch": [], "secs": 0.0}
             for m in methods}
    per_split: dict[tuple[str, str], list[int]] = {}
    for si, split in enumerate(splits):
        ev, fit = split.eval, split.fit
        print(f"[A] split {si + 1}/{len(splits)}: fit {[n for j, n in enumerate(names) if j != si]} "
              f"({fit.num_tokens} tokens after dedup), eval {names[si]} ({ev.num_tokens})", file=sys.stderr)
        ex_eval = torch.from_numpy(ev.experts.astype(np.int64))
        scores = None
        if args.predictor != "none":
            from megatron_specmoe.predict.base import RouteContext
            from megatron_specmoe.predict.registry import fit_predictor

            pred = fit_predictor(args.predictor, fit)
            scores = [np.asarray(pred.expert_scores(RouteContext(layer=l, token_ids=ev.token_ids,
                                                                 history=ev.experts[:, :l])), np.float32)
                      for l in range(ev.num_layers)]
        k = ev.topk
        bounds = [(lo, min(lo + B, ev.num_tokens)) for lo in range(0, ev.num_tokens, B)]
        contiguous_home = {n: assign(np.zeros((n, P), np.float32), "contiguous").home_rank
                           for n in {hi - lo for lo, hi in bounds}}
        for m in methods:
            c0 = time.process_time()
            pls = group_experts(fit, ep_size=P, options=GroupingOptions(method=m, theta=args.theta, seed=args.seed))
            stats[m]["secs"] += time.process_time() - c0
            s = stats[m]
            for layer, pl in enumerate(pls):
                rank_of = torch.from_numpy(pl.rank_of_logical())
                hits = rank_hits(rank_of[ex_eval[:, layer]], P)
                both = int((hits.max(dim=1).values == k).sum())
                s["both"][0] += both
                s["both"][1] += ev.num_tokens
                per_split.setdefault((m, names[si]), [0, 0])
                per_split[(m, names[si])][0] += both
                per_split[(m, names[si])][1] += ev.num_tokens
                fit_hits = rank_hits(rank_of[torch.from_numpy(fit.experts[:, layer].astype(np.int64))], P)
                s["fit_both"][0] += int((fit_hits.max(dim=1).values == k).sum())
                s["fit_both"][1] += fit.num_tokens
                whole = RouteMeasures.empty(P)
                if scores is not None:
                    from megatron_specmoe.predict.base import rank_scores

                    predicted = torch.from_numpy(rank_scores(scores[layer], pl))
                for lo, hi in bounds:
                    if scores is not None:
                        s["lar_p"] += measure_routes(hits[lo:hi], assign(predicted[lo:hi], args.assignment).home_rank)
                    h = hits[lo:hi]
                    mc = measure_routes(h, contiguous_home[hi - lo])
                    ms = measure_routes(h, assign(h.float(), args.assignment).home_rank)
                    s["lar_c"] += mc
                    s["lar_s"] += ms
                    s["imb_batch"].append(ms.load_imbalance)
                    whole += ms
                s["imb_layer"].append(whole.load_imbalance)
    print()
    print(f"## A. Mixtral-8x7B MT-Bench, EP={P}, leave-one-category-out (fit 3, eval 1), dedup, "
          f"theta={args.theta}, B={B}, shuffle = assignment '{args.assignment}' on true hits")
    print()
    print(f"| planner | both-on-one-rank (eval) | (fit) | LAR contiguous shards | LAR + oracle shuffle | "
          f"LAR + '{args.predictor}' predicted shuffle | imbalance (layer) | imbalance (B) | plan CPU time (s, 4 splits) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for m in methods:
        s = stats[m]
        lar_p = f"{s['lar_p'].local_activation_rate:.3f}" if s["lar_p"].pairs else "-"
        print(f"| {m} | {s['both'][0] / s['both'][1]:.3f} | {s['fit_both'][0] / s['fit_both'][1]:.3f} | "
              f"{s['lar_c'].local_activation_rate:.3f} | {s['lar_s'].local_activation_rate:.3f} | {lar_p} | "
              f"{np.mean(s['imb_layer']):.3f} | {np.mean(s['imb_batch']):.3f} | {s['secs']:.1f} |")
    print()
    print("Both-on-one-rank share per held-out category:")
    print()
    print("| planner | " + " | ".join(names) + " |")
    print("| --- |" + " --- |" * len(names))
    for m in methods:
        vals = [per_split[(m, n)][0] / per_split[(m, n)][1] for n in names]
        print(f"| {m} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    print()


def _gap(args, methods):
    from megatron_specmoe.schedule.grouping import GroupingOptions, group_layer, grouping_cost
    from megatron_specmoe.schedule.grouping_milp import solve_exact
    from megatron_specmoe.artifacts.trace_io import leave_one_out_splits, read_traces

    files = sorted(Path(args.traces).glob("experts_*_mixtral.json"))
    fit = leave_one_out_splits([read_traces(str(f), num_experts=8) for f in files], dedup=True)[0].fit
    layers = range(min(args.milp_layers, fit.num_layers))
    gaps = {m: [] for m in methods}
    secs = []
    optimal = 0
    for layer in layers:
        ex = fit.experts[:, layer]
        t0 = time.perf_counter()
        sol = solve_exact(ex, num_experts=fit.num_experts, ep_size=args.ep, theta=args.theta,
                          time_limit_s=args.milp_time_limit)
        secs.append(time.perf_counter() - t0)
        optimal += sol.optimal
        for m in methods:
            pl = group_layer(ex, num_experts=fit.num_experts, ep_size=args.ep, layer=layer,
                             options=GroupingOptions(method=m, theta=args.theta, seed=args.seed))
            gaps[m].append(grouping_cost(ex, pl, theta=args.theta).objective - sol.objective)
        print(f"[B] layer {layer}: optimum {sol.objective:.4f} ({secs[-1]:.1f} s, "
              f"{'optimal' if sol.optimal else 'time limit'})", file=sys.stderr)
    print(f"## B. Gap to the exact optimum (HiGHS), fitting data of split 1 ({fit.num_tokens} tokens), "
          f"EP={args.ep}, theta={args.theta}, layers 0..{len(layers) - 1}; {optimal}/{len(layers)} "
          f"proved optimal, {np.mean(secs):.1f} s per layer")
    print()
    print("| planner | mean gap | max gap | layers at the optimum |")
    print("| --- | --- | --- | --- |")
    for m in methods:
        g = np.array(gaps[m])
        print(f"| {m} | {g.mean():.4f} | {g.max():.4f} | {int((g < 1e-9).sum())}/{len(g)} |")
    print()


def synthetic_routes(tokens, layers, num_experts, k, seed, cluster=4, p_in=0.5):
    """int32 [T, L, k] with planted structure: per layer, experts form hidden clusters of
    ``cluster``; a token picks one cluster and prefers its experts (each with probability p_in),
    on top of skewed expert popularity (1/sqrt(rank))."""
    rng = np.random.default_rng(seed)
    out = np.empty((tokens, layers, k), dtype=np.int32)
    for layer in range(layers):
        clusters = rng.permutation(num_experts).reshape(-1, cluster)
        pop = (1.0 / np.sqrt(np.arange(1, num_experts + 1)))[rng.permutation(num_experts)]
        c = rng.integers(0, len(clusters), tokens)
        scores = rng.random((tokens, num_experts)) * pop
        boost = np.zeros((tokens, num_experts), dtype=bool)
        boost[np.arange(tokens)[:, None], clusters[c]] = True
        scores += boost & (rng.random((tokens, num_experts)) < p_in)
        out[:, layer] = np.argpartition(-scores, k, axis=1)[:, :k]
    return out


def _timing(args, methods):
    import torch

    torch.set_num_threads(1)
    from megatron_specmoe.schedule.grouping import GroupingOptions, group_experts, grouping_cost
    from megatron_specmoe.schedule.placement import ExpertPlacement
    from megatron_specmoe.artifacts.traces import RoutingTrace

    T, L, E, k, P = args.synthetic_tokens, 27, 64, 6, 8
    trace = RoutingTrace(experts=synthetic_routes(T, L, E, k, args.seed), num_experts=E, source="synthetic")
    contiguous = ExpertPlacement.contiguous(E, P)
    print(f"## C. Planning time: synthetic planted routes, T={T}, L={L}, E={E}, top-{k}, EP={P}, "
          f"theta={args.theta}, one CPU core")
    print()
    print("| planner | CPU time, 27 layers (s) | wall time (s) | objective | LAR (co-location) | load imbalance |")
    print("| --- | --- | --- | --- | --- | --- |")
    base = [grouping_cost(trace.experts[:, l], contiguous, theta=args.theta) for l in range(L)]
    print(f"| contiguous | - | - | {np.mean([c.objective for c in base]):.4f} | "
          f"{1 - np.mean([c.remote_share for c in base]):.3f} | {np.mean([c.load_imbalance for c in base]):.3f} |")
    for m in methods:
        t0, c0 = time.perf_counter(), time.process_time()
        pls = group_experts(trace, ep_size=P, options=GroupingOptions(method=m, theta=args.theta, seed=args.seed),
                            progress=args.verbose)
        secs, cpu = time.perf_counter() - t0, time.process_time() - c0
        costs = [grouping_cost(trace.experts[:, l], pl, theta=args.theta) for l, pl in enumerate(pls)]
        print(f"| {m} | {cpu:.1f} | {secs:.1f} | {np.mean([c.objective for c in costs]):.4f} | "
              f"{1 - np.mean([c.remote_share for c in costs]):.3f} | {np.mean([c.load_imbalance for c in costs]):.3f} |")
        print(f"[C] {m}: {cpu:.1f} s CPU, {secs:.1f} s wall", file=sys.stderr)
    print()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--traces", default=MIXTRAL_TRACES)
    ap.add_argument("--parts", default="ABC", help="which parts to run: any of A, B, C")
    ap.add_argument("--ep", type=int, default=4)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--theta", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--assignment", default="optimal", help="assignment method for the shuffle")
    ap.add_argument("--predictor", default="layer",
                    help="predictor fitted on the fit side for the predicted-shuffle column, or 'none'")
    ap.add_argument("--methods", default="contiguous,random,eplb,graph,alternating,search")
    ap.add_argument("--milp-layers", type=int, default=32)
    ap.add_argument("--milp-time-limit", type=float, default=60.0)
    ap.add_argument("--synthetic-tokens", type=int, default=100_000)
    ap.add_argument("--timing-methods", default="eplb,graph,alternating,search")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    print("command: python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])))
    print()
    methods = args.methods.split(",")
    if "A" in args.parts:
        _mixtral(args, methods)
    if "B" in args.parts:
        _gap(args, [m for m in methods if m != "milp"])
    if "C" in args.parts:
        _timing(args, args.timing_methods.split(","))
    return 0


if __name__ == "__main__":
    sys.exit(main())
