"""Predicted MoE-layer communication time, specmoe vs alltoall vs DeepEP, EP = 8 .. 64 on H200 nodes.

Fits on some MT-Bench categories of the Mixtral-8x7B traces and simulates on the others (repeated
routes dropped on both sides first, as the traces' README asks), for every combination of

    predictor      oracle (the true routes: an upper bound), and the inter-layer table ("layer")
                   and route-history MLP ("history") of predict/registry.py fitted on the
                   fitting categories;
    shuffle domain TP = 8 (one node: s-TS moves tokens only inside their node) and TP = EP (one
                   shuffle domain spanning all nodes: what s-TS could do if tokens could move
                   between nodes, e.g. DP-attention request placement; idealised);
    NIC routing    direct (each GPU's own NIC) and rail (NCCL PXN, the default on DGX/HGX).

Mixtral has 8 experts: EP > 8 uses the exact expert split of sim/inputs.py (each
expert cut into EP/8 slices along its FFN dimension, a token's row sent to every slice), the same
for all dispatchers. Runs alltoall, deepep_normal and specmoe_alltoall (every model:
tools/bench_regimes.py). Prints one markdown table per combination, the command, and writes a PNG.

    /work/venvs/mc016/bin/python tools/bench_simulate.py --plot docs/figures/simulate_h200.png

``--compare-assignments refine,refine_spread`` instead prints one table comparing balanced
assignment methods for TP = 8 (one node): alltoall and specmoe with each method, time per MoE
layer per step and the busiest GPU's NIC bytes (``PhaseTime.busiest_nic_bytes``), both NIC routings.

    /work/venvs/mc016/bin/python tools/bench_simulate.py --ep 16,32 --compare-assignments refine,refine_spread
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from bench_data import MIXTRAL_TRACES  # noqa: E402 - tools/ is on sys.path when run

DEFAULT_TRACES = MIXTRAL_TRACES
# The grid compares specmoe on Megatron's all-to-all with the baselines it replaces.
_BENCH_DISPATCHERS = ("alltoall", "deepep_normal", "specmoe_alltoall")
# Run from a checkout without installing: the package is the folder above tools/.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces-dir", default=DEFAULT_TRACES, help="folder of experts_<cat>_mixtral.json")
    parser.add_argument("--fit", default="coding,math", help="categories to fit on")
    parser.add_argument("--eval", default="roleplay,writing", help="categories to simulate")
    parser.add_argument("--cluster", default="h200-ib", help="cluster preset")
    parser.add_argument("--ep", default="8,16,32,64", help="EP sizes")
    parser.add_argument("--hidden", type=int, default=4096, help="hidden size (Mixtral-8x7B: 4096)")
    parser.add_argument("--dtype", default="bf16", help="dtype of both phases (sim/wire.py)")
    parser.add_argument("--tokens-per-rank", type=int, default=64, help="tokens per GPU per step")
    parser.add_argument("--assignment", default="refine", help="balanced assignment method")
    parser.add_argument("--predictors", default="layer,history",
                        help="registry predictor kinds fitted on --fit (the oracle always runs)")
    parser.add_argument("--compare-assignments", default=None, metavar="M1,M2,...",
                        help="compare these assignment methods at TP = 8 instead of the full grid")
    parser.add_argument("--plot", default=None, help="PNG path (folders are created)")
    parser.add_argument("--json", default=None, help="write every row as JSON")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from megatron_specmoe.cli.simulate import parse_ep_list, simulate_rows
    from megatron_specmoe.cli.simulate_report import format_table
    from megatron_specmoe.sim.cluster import cluster_preset
    from megatron_specmoe.sim.inputs import oracle_expert_scores, predictor_expert_scores
    from megatron_specmoe.artifacts.trace_io import cross_domain_split, read_traces

    torch.set_num_threads(1)  # many small tensors: threads only add overhead
    command = " ".join([sys.executable, *sys.argv])
    eps = parse_ep_list(args.ep)

    def load(cats: str):
        return [read_traces(os.path.join(args.traces_dir, f"experts_{c}_mixtral.json"), num_experts=8) for c in cats.split(",")]

    split = cross_domain_split(load(args.fit), load(args.eval), dedup=True)
    fit, ev = split.fit, split.eval
    step = args.tokens_per_rank * max(eps)
    used = ev.num_tokens // step * step
    if used == 0:
        parser.error(f"{ev.num_tokens} eval tokens < one step ({step}); lower --tokens-per-rank")
    ev = ev.select(np.arange(used))
    print(f"fit: {args.fit} ({fit.num_tokens} distinct routes); simulate: {args.eval} "
          f"(first {used} of {split.eval.num_tokens} distinct routes)", file=sys.stderr)

    from megatron_specmoe.predict.registry import fit_predictor

    predictors = {"oracle": oracle_expert_scores(ev)}
    for kind in args.predictors.split(","):
        t0 = time.perf_counter()
        predictor = fit_predictor(kind, fit)
        predictors[kind] = predictor_expert_scores(predictor, ev)
        print(f"{kind} predictor fitted in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    base = cluster_preset(args.cluster)
    if args.compare_assignments:
        return _compare_assignments(args, ev, predictors, base, eps, command)
    results: dict[str, list[dict]] = {}
    print(f"# Predicted MoE-layer communication time per step (dispatch + combine), {args.cluster}")
    print(f"cluster: {base.source}")
    print(f"model: Mixtral-8x7B traces, H={args.hidden} {args.dtype}, top-2, 8 experts (split for EP > 8); "
          f"{args.tokens_per_rank} tokens per GPU per step; fit {args.fit}, simulate {args.eval} "
          f"({used} tokens); assignment {args.assignment}")
    for routing in ("direct", "rail"):
        cluster = dataclasses.replace(base, inter_node_routing=routing)
        for tp_mode, tp_desc in (("node", "TP = 8 (shuffle inside a node)"), ("ep", "TP = EP (idealised)")):
            for pname, scores in predictors.items():
                key = f"{routing} | {tp_desc} | {pname}"
                print(f"\n## NIC routing {routing}, {tp_desc}, predictor {pname}\n", flush=True)
                rows = simulate_rows(
                    ev, scores, eps=eps, tp_arg=tp_mode, cluster=cluster, hidden=args.hidden,
                    dispatch_dtype=args.dtype, combine_dtype=args.dtype, tokens_per_rank=args.tokens_per_rank,
                    method=args.assignment, dispatchers=_BENCH_DISPATCHERS,
                )
                results[key] = rows
                print(format_table(rows), flush=True)
    print(f"\ncommand: {command}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": command, "results": results}, f, indent=1)
    if args.plot:
        _plot(results, args.plot, eps, title=f"{args.cluster}, Mixtral-8x7B traces, "
              f"H={args.hidden} {args.dtype}, {args.tokens_per_rank} tok/GPU")
        print(f"plot: {args.plot}")
    return 0


def _compare_assignments(args, ev, predictors: dict, base, eps: list[int], command: str) -> int:
    """One table: alltoall vs specmoe with each of ``--compare-assignments``, TP = 8."""
    import numpy as np

    from megatron_specmoe.cli.simulate import ASSIGNMENT_CHOICES, resolve_tp
    from megatron_specmoe.sim.compare import compare_dispatchers

    methods = args.compare_assignments.split(",")
    unknown = [m for m in methods if m not in ASSIGNMENT_CHOICES]
    if unknown:
        raise SystemExit(f"--compare-assignments: unknown {unknown}; choose from {list(ASSIGNMENT_CHOICES)}")
    print(f"# Assignment methods at TP = 8 (one node), {args.cluster}: time per MoE layer per step "
          "(dispatch + combine), busiest NIC = mean over steps and layers of the max over GPUs of "
          "max(NIC bytes out, in), dispatch + combine (PhaseTime.busiest_nic_bytes)")
    print(f"cluster: {base.source}; Mixtral-8x7B traces, H={args.hidden} {args.dtype}, "
          f"{args.tokens_per_rank} tokens per GPU per step, {ev.num_tokens} tokens\n")
    head = ("| EP | NIC routing | predictor | alltoall us | " + " | ".join(f"specmoe {m} us" for m in methods)
            + " | busiest NIC MB/layer a2a / " + " / ".join(methods)
            + " | inter-node MB/layer a2a / " + " / ".join(methods)
            + " | LAR " + " / ".join(methods) + " |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1), flush=True)
    results = []
    for routing in ("direct", "rail"):
        cluster = dataclasses.replace(base, inter_node_routing=routing)
        for pname, scores in predictors.items():
            for ep in eps:
                tp = resolve_tp("node", ep, cluster.gpus_per_node)
                runs = {}
                for m in methods:
                    t0 = time.perf_counter()
                    runs[m] = compare_dispatchers(
                        ev, scores, ep=ep, tp=tp, cluster=cluster, hidden_size=args.hidden,
                        dispatch_dtype=args.dtype, combine_dtype=args.dtype,
                        tokens_per_rank=args.tokens_per_rank, method=m, dispatchers=("alltoall", "specmoe_alltoall"),
                    )
                    print(f"EP={ep} {routing} {pname} {m}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)

                def nic(res):
                    return float((res.dispatch.busiest_nic_bytes + res.combine.busiest_nic_bytes).mean())

                a2a = runs[methods[0]].results["alltoall"]
                spec = {m: runs[m].results["specmoe_alltoall"] for m in methods}
                row = {
                    "ep": ep, "tp": tp, "routing": routing, "predictor": pname,
                    "alltoall": {"layer_time_s": float(a2a.layer_time_s.mean()), "busiest_nic_bytes": nic(a2a),
                                 **{k: a2a.summary()[k] for k in ("inter_node_bytes_per_layer",)}},
                    **{m: {"layer_time_s": float(r.layer_time_s.mean()), "busiest_nic_bytes": nic(r),
                           **{k: r.summary()[k] for k in ("inter_node_bytes_per_layer", "local_activation_rate")}}
                       for m, r in spec.items()},
                }
                results.append(row)
                ta = row["alltoall"]["layer_time_s"]
                print(f"| {ep} | {routing} | {pname} | {ta * 1e6:.1f} | "
                      + " | ".join(f"{row[m]['layer_time_s'] * 1e6:.1f} ({ta / row[m]['layer_time_s']:.2f}x)"
                                   for m in methods)
                      + f" | {row['alltoall']['busiest_nic_bytes'] / 1e6:.2f} / "
                      + " / ".join(f"{row[m]['busiest_nic_bytes'] / 1e6:.2f}" for m in methods)
                      + f" | {row['alltoall']['inter_node_bytes_per_layer'] / 1e6:.1f} / "
                      + " / ".join(f"{row[m]['inter_node_bytes_per_layer'] / 1e6:.1f}" for m in methods)
                      + " | " + " / ".join(f"{row[m]['local_activation_rate']:.3f}" for m in methods) + " |",
                      flush=True)
    print(f"\ncommand: {command}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": command, "compare_assignments": results}, f, indent=1)
    return 0


def _plot(results: dict, path: str, eps: list[int], *, title: str) -> None:
    """Top row: time per MoE layer per step (log); bottom row: time relative to alltoall."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True, sharey="row",
                             gridspec_kw={"height_ratios": [3, 2]})
    ticks = [f"{e}\n({max(1, e // 8)} node{'s' if e > 8 else ''})" for e in eps]
    for col, routing in enumerate(("direct", "rail")):
        top, bottom = axes[0, col], axes[1, col]
        mine = {k: v for k, v in results.items() if k.startswith(routing + " |")}
        first = next(iter(mine.values()))
        base = [r["alltoall"]["layer_time_s"] for r in first]
        for name, colour, width in (("alltoall", "tab:red", 3), ("deepep_normal", "tab:orange", 1.5)):
            t = [r[name]["layer_time_s"] for r in first]
            top.plot(eps, [x * 1e6 for x in t], "-o", color=colour, label=name, linewidth=width)
            bottom.plot(eps, [x / b for x, b in zip(t, base)], "-o", color=colour, linewidth=width)
        palette = ["tab:green", "tab:blue", "tab:purple", "tab:brown", "tab:gray"]
        names = list(dict.fromkeys(key.split(" | ")[2] for key in mine))
        for key, rows in mine.items():
            _, tp_desc, pname = key.split(" | ")
            colour = palette[names.index(pname) % len(palette)]
            style = ("-" if pname == "oracle" else "--") + ("s" if tp_desc.startswith("TP = 8") else "^")
            t = [r["specmoe_alltoall"]["layer_time_s"] for r in rows]
            top.plot(eps, [x * 1e6 for x in t], style, color=colour,
                     label=f"specmoe, {pname}, {tp_desc.split(' (')[0]}")
            bottom.plot(eps, [x / b for x, b in zip(t, base)], style, color=colour)
        top.set_yscale("log")
        top.set_title(f"NIC routing: {routing}", fontsize=10)
        bottom.set_xscale("log", base=2)
        bottom.set_xticks(eps, ticks)
        bottom.set_xlabel("EP size")
        for ax in (top, bottom):
            ax.grid(True, which="both", alpha=0.3)
    axes[0, 0].set_ylabel("MoE-layer comm time per step (us)")
    axes[1, 0].set_ylabel("time / alltoall time")
    axes[0, 1].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
