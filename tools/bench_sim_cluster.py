"""The simulator with redundant experts (EP 8, Mixtral) and with request placement (EP 16-64).

Usage:
    python tools/bench_sim_cluster.py --part replicas   [--redundant 0,8,16] [--policy coactivation]
    python tools/bench_sim_cluster.py --part requests   [--ep 16,32,64] [--tokens 16384]

Both parts call ``sim.compare.compare_dispatchers``, what ``specmoe simulate`` runs per row, on
the h200-ib preset (8 GPUs per node), and print per-MoE-layer means per step.

replicas. The real Mixtral-8x7B MT-Bench traces (E = 8, top-2, 32 layers), leave-one-workload-out:
the plan (``search`` placement, replicas by ``--policy``, layer-table predictor) is made on three
workloads and simulated on the fourth (repeated routes dropped, ``trace_io.leave_one_out_splits``),
EP 8 = TP 8 (s-TS over the node), 64 tokens per GPU, H = 4096 bf16. Means over the folds of
``specmoe_alltoall``'s local activation rate, remote pairs per token, NVLink bytes and time, with
the replicas against the same plan without them (the same run), for the layer-table predictor and
the oracle (perfect prediction, the same slots).

requests. Synthetic routes of DeepSeek-V3's shape (``artifacts/synthetic.py``: E = 256, top-8, 8
router groups of which a token uses 4, requests of 128 tokens; no real trace of such a model is
here): ``--tokens`` tokens to plan on (placement, token-table predictor) and as many later ones to
simulate, DP attention (TP = 1), 16 tokens per GPU, H = 7168 bf16. Placements: rank-level
``search`` and node-aware ``nodes+groups`` (``schedule/grouping_nodes.py``). Request placement by
``affinity`` and ``group_mask`` (affinity from the token table's scores of each request's first
half; ``--affinity oracle``: the prompt's true routes, an upper bound), against round-robin and
Megatron's least-loaded choice, on the same placement, the same run. The baseline models (Megatron's contiguous placement) use least-loaded homes.
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
from megatron_specmoe.predict.registry import make  # noqa: E402
from megatron_specmoe.schedule.grouping import GroupingOptions, group_experts  # noqa: E402
from megatron_specmoe.schedule.grouping_nodes import NodeGroupingOptions, group_experts_by_nodes  # noqa: E402
from megatron_specmoe.schedule.replicas import replicate_layers  # noqa: E402
from megatron_specmoe.sim.cluster import cluster_preset  # noqa: E402
from megatron_specmoe.sim.compare import compare_dispatchers  # noqa: E402
from megatron_specmoe.sim.inputs import oracle_expert_scores, predictor_expert_scores  # noqa: E402


def part_replicas(args) -> None:
    folds = mixtral_folds()
    if not folds:
        return
    cluster = cluster_preset("h200-ib")
    redundant = [int(x) for x in args.redundant.split(",")]
    acc: dict[tuple, list[dict]] = {}
    for fold, (path, split) in enumerate(folds):
        fit, held = split.fit, split.eval
        step = 64 * 8
        held = held.select(np.arange(held.num_tokens // step * step))
        placements = group_experts(fit, ep_size=8, options=GroupingOptions(method="search"))
        predictor = make("layer").fit(fit)
        scores = {"layer table": predictor_expert_scores(predictor, held), "oracle": oracle_expert_scores(held)}
        for r in redundant:
            reps = replicate_layers(placements, fit.experts, redundant=r, policy=args.policy)
            for label, sc in scores.items():
                row = compare_dispatchers(held, sc, ep=8, tp=8, cluster=cluster, hidden_size=4096, tokens_per_rank=64,
                                          plan_placements=placements, replicas=reps,
                                          dispatchers=["alltoall", "specmoe_alltoall"]).table_row()
                base, rep = row["specmoe_alltoall"], row["replicas"]["specmoe_alltoall"]
                acc.setdefault((r, label), []).append({
                    "lar0": base["local_activation_rate"], "lar": rep["local_activation_rate"],
                    "rem0": base["remote_pairs_per_token"], "rem": rep["remote_pairs_per_token"],
                    "nvl0": base["nvlink_bytes_per_layer"], "nvl": rep["nvlink_bytes_per_layer"],
                    "t0": base["total_time_s"], "t": rep["total_time_s"], "a2a": row["alltoall"]["total_time_s"],
                })
        print(f"[bench_sim_cluster] fold {fold + 1}/{len(folds)} ({Path(path).stem}) done", file=sys.stderr, flush=True)
    print(f"## specmoe_alltoall with redundant experts, simulated: Mixtral-8x7B MT-Bench, EP 8 = TP 8, "
          f"h200-ib, 64 tokens/GPU, H 4096 bf16, policy {args.policy}, mean of {len(folds)} folds")
    print()
    print("| R | predictor | LAR without -> with | remote pairs/tok without -> with | NVLink bytes with / without "
          "| time us without -> with | with / without | with vs alltoall |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for (r, label), folds in acc.items():
        m = {k: float(np.mean([f[k] for f in folds])) for k in folds[0]}
        print(f"| {r} | {label} | {m['lar0']:.3f} -> {m['lar']:.3f} | {m['rem0']:.3f} -> {m['rem']:.3f} | "
              f"{m['nvl'] / m['nvl0']:.3f} | {m['t0'] * 1e6:.1f} -> {m['t'] * 1e6:.1f} | {m['t'] / m['t0']:.3f} | "
              f"{m['a2a'] / m['t']:.3f}x |")


def part_requests(args) -> None:
    T, L = args.tokens, args.layers
    full = synthetic_trace(SyntheticSpec(tokens=2 * T, layers=L, num_experts=256, topk=8, router_groups=8,
                                         topk_groups=4, request_length=128, seed=args.seed))
    plan_part, sim_part = full.select(np.arange(T)), full.select(np.arange(T, 2 * T))
    if args.affinity == "oracle":
        scores = oracle_expert_scores(sim_part)  # the true routes of each prompt: an upper bound
    else:
        scores = predictor_expert_scores(make("token").fit(plan_part), sim_part)
    cluster = cluster_preset("h200-ib")
    g = cluster.gpus_per_node
    print(f"## Request placement in the simulator: synthetic E=256 top-8, 8 router groups (4 per token), {T} planning "
          f"+ {T} simulated tokens, {L} layers, DP attention (TP = 1), 16 tokens/GPU, h200-ib, H 7168 bf16, "
          f"affinity from {'the true routes (oracle)' if args.affinity == 'oracle' else 'the token table'}")
    print()
    print("| EP | nodes | placement | method | remote nodes/tok | vs round_robin | vs least_loaded | inter-node B/tok "
          "per-node | vs RR | per-pair | vs RR | specmoe a2a us | specmoe deepep us | a2a (LL) us |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for ep in [int(x) for x in args.ep.split(",")]:
        t0 = time.process_time()
        opts = GroupingOptions(method="search", seed=args.seed)
        places = {"rank": group_experts(plan_part, ep_size=ep, options=opts)}
        if 8 % (ep // g) == 0:
            places["nodes+groups"] = group_experts_by_nodes(plan_part, ep_size=ep, node_options=NodeGroupingOptions(
                gpus_per_node=g, router_groups=8, keep_groups=True, options=opts))
        print(f"[bench_sim_cluster] EP {ep}: placements in {time.process_time() - t0:.0f} CPU s", file=sys.stderr,
              flush=True)
        for name, pls in places.items():
            for method in ("affinity", "group_mask"):
                row = compare_dispatchers(sim_part, scores, ep=ep, tp=1, cluster=cluster, hidden_size=7168,
                                          tokens_per_rank=16, plan_placements=pls, request_ids=sim_part.request_ids,
                                          request_method=method,
                                          dispatchers=["alltoall", "specmoe_alltoall", "specmoe_deepep_normal"]
                                          ).table_row()
                req = row["request_placement"]
                shown = ("round_robin", "least_loaded", method) if method == "affinity" else (method,)
                for m in shown:
                    e = req["by_method"][m]
                    rr = req["by_method"]["round_robin"]
                    ll = req["by_method"]["least_loaded"]
                    b, brr = e["internode_bytes_per_token"], rr["internode_bytes_per_token"]
                    times = ("-", "-", "-")
                    if m == method:
                        times = tuple(f"{row[n]['total_time_s'] * 1e6:.1f}"
                                      for n in ("specmoe_alltoall", "specmoe_deepep_normal", "alltoall"))
                    print(f"| {ep} | {ep // g} | {name} | {m} | {e['remote_nodes_per_token']:.3f} | "
                          f"{e['remote_nodes_per_token'] / rr['remote_nodes_per_token']:.3f} | "
                          f"{e['remote_nodes_per_token'] / ll['remote_nodes_per_token']:.3f} | {b['per_node']:.0f} | "
                          f"{b['per_node'] / brr['per_node']:.3f} | {b['per_pair']:.0f} | "
                          f"{b['per_pair'] / brr['per_pair']:.3f} | {times[0]} | {times[1]} | {times[2]} |", flush=True)
    print()
    print("Times (per MoE layer per step) only for the method the row's specmoe models ran with; "
          "a2a (LL) is Megatron's alltoall on its contiguous placement with least-loaded homes.")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("replicas", "requests"), required=True)
    ap.add_argument("--redundant", default="0,8,16")
    ap.add_argument("--policy", default="coactivation")
    ap.add_argument("--ep", default="16,32,64")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--affinity", choices=("token", "oracle"), default="token",
                    help="requests: affinity from a token table fitted on the planning tokens, or from the "
                         "true routes of each prompt (an upper bound)")
    args = ap.parse_args(argv)
    print("command: python " + " ".join(shlex.quote(a) for a in [sys.argv[0]] + (argv if argv is not None else sys.argv[1:])))
    print()
    torch.set_num_threads(1)
    {"replicas": part_replicas, "requests": part_requests}[args.part](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
