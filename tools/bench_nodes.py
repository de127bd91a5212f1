"""Remote nodes and inter-node bytes at EP 16-64: rank-level against node-aware grouping, with
token shuffling or with request placement (DP attention).

Usage:
    python tools/bench_nodes.py [--ep 16,32,64] [--gpus-per-node 8] [--tokens 16384] [--layers 2]

Data. No real trace of a 256-expert model is available here, so the cluster-scale part uses
synthetic routes (``artifacts/synthetic.py``) of DeepSeek-V3's routing shape: E = 256, top-8, 8
router groups of which each token uses 4 (group-limited routing), ``--tokens`` tokens to plan on and
as many others (the same generator, later requests) to measure on, requests of 128 tokens. The
Mixtral-8x7B MT-Bench traces (E = 8) allow EP <= 8 only: they are measured at EP 8 with 4 and 2
GPUs per node (fit on three workloads, measured on the fourth, repeated routes dropped).

Placements (one per layer, from the planning tokens): ``rank`` = today's rank-level ``search``
(nodes are whatever ranks r // G happen to share), ``nodes`` = ``grouping_nodes`` (experts to nodes
first, then ranks), ``nodes+groups`` = the same keeping each router group on one node.

Homes (where a token is when the MoE layer starts):
    shuffle        s-TS with perfect prediction: per batch of 64 * P tokens, the balanced
                   ``refine`` assignment of the true rank hits (the oracle side of evaluate).
    round_robin    DP attention, TP = 1: request i on rank i mod P; all its tokens live there.
    least_loaded   Megatron's choice (``online_rank`` with weight 0): the rank with the most free
                   request slots, in rounds of 4 * P concurrent requests.
    affinity       ``online_rank`` with weight 0.5: predicted affinity of the request's first half
                   (its "prompt"; token-table predictor fitted on the planning tokens) against the
                   same free-slot term.
    group_mask     ``place_requests(method="group_mask")``: per group of P arriving requests, the
                   one-to-one matching that maximises predicted local pairs.

Measures per token and MoE layer (``measure/nodes.py``): remote nodes, and inter-node bytes of the
per-node de-duplicating and the per-pair transports for hidden 7168 in bf16 (DeepSeek-V3). Ratios
are to ``rank`` with the same homes, and to round_robin with the same placement, all measured in
the same run.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_data import mixtral_folds  # noqa: E402 - tools/ is on sys.path when run

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_specmoe.artifacts.synthetic import SyntheticSpec, synthetic_trace  # noqa: E402
from megatron_specmoe.artifacts.traces import RoutingTrace  # noqa: E402
from megatron_specmoe.measure.measures import WireFormat, rank_hits  # noqa: E402
from megatron_specmoe.measure.nodes import NodeMeasures, measure_nodes  # noqa: E402
from megatron_specmoe.predict.registry import make  # noqa: E402
from megatron_specmoe.schedule.assignment import assign  # noqa: E402
from megatron_specmoe.schedule.grouping import GroupingOptions, group_experts  # noqa: E402
from megatron_specmoe.schedule.grouping_nodes import NodeGroupingOptions, group_experts_by_nodes  # noqa: E402
from megatron_specmoe.schedule.request_placement import online_rank, place_requests, request_affinity  # noqa: E402

WIRE = WireFormat(hidden_size=7168, activation_bytes=2)


def request_homes(trace: RoutingTrace, placements, predictor, ep: int, how: str) -> np.ndarray:
    """int64 [T]: each token's rank when whole requests are placed (module docstring)."""
    rid = trace.request_ids
    starts = np.flatnonzero(np.r_[True, rid[1:] != rid[:-1]])
    ends = np.r_[starts[1:], trace.num_tokens]
    n = starts.shape[0]
    if how == "round_robin":
        rank = np.arange(n) % ep
    else:
        prompts = [trace.token_ids[s : s + max(1, (e - s) // 2)] for s, e in zip(starts, ends)]
        aff = request_affinity(predictor, prompts, placements)
        if how == "group_mask":
            rank = place_requests(aff, ends - starts, method="group_mask").rank
        else:
            weight = 0.0 if how == "least_loaded" else 0.5
            rank = np.empty(n, dtype=np.int64)
            window, slots = 4 * ep, 4
            for i in range(n):
                if i % window == 0:
                    pending = np.zeros(ep, dtype=np.int64)
                rank[i] = online_rank(aff[i], pending, max_requests=slots, weight=weight)
                pending[rank[i]] += 1
    return np.repeat(rank, ends - starts)


def measure(trace: RoutingTrace, placements, homes: str, gpn: int, ep: int, request_home=None) -> NodeMeasures:
    total = None
    batch = 64 * ep
    for layer, pl in enumerate(placements):
        rank_of = torch.from_numpy(pl.rank_of_logical())
        hits = rank_hits(rank_of[torch.from_numpy(trace.experts[:, layer].astype(np.int64))], ep)
        for lo in range(0, trace.num_tokens, batch):
            h = hits[lo : lo + batch]
            if homes == "shuffle":
                home = assign(h.float(), "refine").home_rank
            else:
                home = torch.from_numpy(request_home[lo : lo + batch])
            m = measure_nodes(h, home, gpn)
            total = m if total is None else total + m
    return total


def synthetic_part(args) -> None:
    T, L = args.tokens, args.layers
    full = synthetic_trace(SyntheticSpec(tokens=2 * T, layers=L, num_experts=256, topk=8, router_groups=8,
                                         topk_groups=4, request_length=128, seed=args.seed))
    plan_part, eval_part = full.select(np.arange(T)), full.select(np.arange(T, 2 * T))
    t0 = time.process_time()
    predictor = make("token").fit(plan_part)
    print(f"## Synthetic E=256 top-8, 8 router groups (4 per token), {T} planning + {T} measured tokens, "
          f"{L} layers, {args.gpus_per_node} GPUs per node, hidden 7168 bf16")
    print()
    print("| EP | nodes | homes | placement | remote nodes/tok | vs rank | inter-node B/tok per-node | vs rank "
          "| inter-node B/tok per-pair | vs rank | remote nodes vs round_robin |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    g = args.gpus_per_node
    for ep in [int(x) for x in args.ep.split(",")]:
        opts = GroupingOptions(method="search", seed=args.seed)
        places = {
            "rank": group_experts(plan_part, ep_size=ep, options=opts),
            "nodes": group_experts_by_nodes(plan_part, ep_size=ep, node_options=NodeGroupingOptions(
                gpus_per_node=g, options=opts)),
        }
        if 8 % (ep // g) == 0:
            places["nodes+groups"] = group_experts_by_nodes(plan_part, ep_size=ep, node_options=NodeGroupingOptions(
                gpus_per_node=g, router_groups=8, keep_groups=True, options=opts))
        print(f"[bench_nodes] EP {ep}: placements in {time.process_time() - t0:.0f} CPU s", file=sys.stderr, flush=True)
        rr = {}
        for homes in ("shuffle", "round_robin", "least_loaded", "affinity", "group_mask"):
            base = None
            for name, pls in places.items():
                req = None if homes == "shuffle" else request_homes(eval_part, pls, predictor, ep, homes)
                m = measure(eval_part, pls, homes, g, ep, req)
                b = m.internode_bytes_per_token(WIRE)
                if homes == "round_robin":
                    rr[name] = m.remote_nodes_per_token
                base = base or (m, b)
                vs_rr = "-" if homes == "shuffle" else f"{m.remote_nodes_per_token / rr[name]:.3f}"
                print(f"| {ep} | {ep // g} | {homes} | {name} | {m.remote_nodes_per_token:.3f} | "
                      f"{m.remote_nodes_per_token / base[0].remote_nodes_per_token:.3f} | {b['per_node']:.0f} | "
                      f"{b['per_node'] / base[1]['per_node']:.3f} | {b['per_pair']:.0f} | "
                      f"{b['per_pair'] / base[1]['per_pair']:.3f} | {vs_rr} |", flush=True)
    print()


def mixtral_part(args) -> None:
    folds = mixtral_folds()
    if not folds:
        return
    splits = [split for _, split in folds]
    print("## Mixtral-8x7B MT-Bench (E=8, top-2), EP 8, shuffle homes, mean over 4 leave-one-workload-out folds")
    print()
    print("| GPUs/node | placement | remote nodes/tok | vs rank | inter-node B/tok per-node | vs rank |")
    print("| --- | --- | --- | --- | --- | --- |")
    opts = GroupingOptions(method="search", seed=args.seed)
    for g in (4, 2):
        acc: dict[str, list] = {}
        for split in splits:
            fit, held = split.fit, split.eval
            pls = {"rank": group_experts(fit, ep_size=8, options=opts),
                   "nodes": group_experts_by_nodes(fit, ep_size=8, node_options=NodeGroupingOptions(gpus_per_node=g,
                                                                                                   options=opts))}
            for name, pl in pls.items():
                acc.setdefault(name, []).append(measure(held, pl, "shuffle", g, 8))
        base = None
        for name, ms in acc.items():
            tot = ms[0]
            for m in ms[1:]:
                tot = tot + m
            rn, b = tot.remote_nodes_per_token, tot.internode_bytes_per_token(WIRE)["per_node"]
            base = base or (rn, b)
            print(f"| {g} | {name} | {rn:.3f} | {rn / base[0]:.3f} | {b:.0f} | {b / base[1]:.3f} |", flush=True)
    print()
    print("(Folds pooled: token-weighted means.)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ep", default="16,32,64")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-mixtral", action="store_true")
    args = ap.parse_args(argv)
    print("command: python " + " ".join(shlex.quote(a) for a in [sys.argv[0]] + (argv if argv is not None else sys.argv[1:])))
    print()
    synthetic_part(args)
    if not args.skip_mixtral:
        mixtral_part(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
