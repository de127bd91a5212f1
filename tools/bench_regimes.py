"""The regimes users run: prefill (4096 tokens per GPU) and decode (64 and 256 tokens per GPU) at
EP 8, 16, 32, 64, on the shared Mixtral-8x7B traces and the demo model's traces; every dispatcher
model of megatron_specmoe/sim/dispatchers.py; MoE-layer communication + specmoe's exposed plan time.

Trace sets
    mixtral  fit the predictor on MT-Bench coding + math, simulate roleplay + writing (repeated routes
             dropped on both sides); Mixtral has 8 experts, so EP > 8 splits each expert into EP/8
             exact slices (sim/inputs.py), the same for every dispatcher. H = 4096.
    demo     the package's demo traces (32 experts, top-4): token predictor fitted on
             demo-calibration, simulated on demo-evaluation; EP 64 splits each expert in two. H = 4096
             (a real model's rows; the demo model itself is tiny).
Where a regime needs more tokens than the trace holds (prefill: 4096 x EP), the trace is repeated
(routes and scores alike) up to one step; the tables say how many copies. ``--layers`` simulates a
subset of Mixtral's 32 MoE layers (default 4 of them, to cut CPU time; the demo set keeps its 4).

Prints one markdown table per (trace set, regime): time per MoE layer per step of every model, and
specmoe_alltoall's time over each baseline's (< 1: specmoe wins), writes a PNG and a JSON.

    python tools/bench_regimes.py --plot docs/figures/simulator_regimes.png --json /tmp/regimes.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from bench_data import MIXTRAL_TRACES  # noqa: E402 - tools/ is on sys.path when run

DEFAULT_MIXTRAL = MIXTRAL_TRACES
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
REGIMES = (("prefill", 4096), ("decode", 64), ("decode", 256))
BASELINES = ("alltoall", "deepep_normal", "deepep_ll", "allgather_inference", "allgather_inference_nvls")


def _tile(trace, scores, need: int):
    """(trace, scores) repeated to at least ``need`` tokens and cut to a multiple of ``need``."""
    import numpy as np

    copies = max(1, -(-need // trace.num_tokens))
    idx = np.tile(np.arange(trace.num_tokens), copies)
    used = len(idx) // need * need
    idx = idx[:used]
    return trace.select(idx), scores[idx], copies


def _sets(args):
    """name -> (eval trace, expert scores [T, L, E], description)."""
    import numpy as np

    from megatron_specmoe.artifacts.trace_io import cross_domain_split, read_traces
    from megatron_specmoe.predict.registry import fit_predictor
    from megatron_specmoe.sim.inputs import oracle_expert_scores, predictor_expert_scores

    layers = None if args.layers == "all" else [int(x) for x in args.layers.split(",")]
    out = {}
    if "mixtral" in args.sets:
        if not os.path.isdir(args.mixtral_dir):
            print(f"skipping mixtral: {args.mixtral_dir} not found", file=sys.stderr)
        else:
            load = lambda cats: [read_traces(os.path.join(args.mixtral_dir, f"experts_{c}_mixtral.json"))  # noqa: E731
                                 for c in cats.split(",")]
            split = cross_domain_split(load("coding,math"), load("roleplay,writing"), dedup=True)
            fit, ev = split.fit, split.eval
            t0 = time.perf_counter()
            pred = fit_predictor(args.predictor, fit)
            scores = predictor_expert_scores(pred, ev) if args.predictor != "oracle" else oracle_expert_scores(ev)
            print(f"mixtral: {args.predictor} predictor fitted in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            out["mixtral"] = (ev, scores, f"Mixtral-8x7B MT-Bench, {args.predictor} predictor fitted on coding+math")
    if "demo" in args.sets:
        data = os.path.join(ROOT, "megatron_specmoe", "data", "traces")
        cal = read_traces([os.path.join(data, "demo-calibration.npz")])
        ev = read_traces([os.path.join(data, "demo-evaluation.npz")])
        pred = fit_predictor("token", cal)
        out["demo"] = (ev, predictor_expert_scores(pred, ev), "demo model, token predictor fitted on demo-calibration")
    if layers is not None and "mixtral" in out:
        for name, (ev, scores, desc) in [("mixtral", out["mixtral"])]:
            keep = [layer for layer in layers if layer < ev.num_layers]
            sub = type(ev)(experts=ev.experts[:, keep], num_experts=ev.num_experts, token_ids=ev.token_ids,
                           positions=ev.positions, request_ids=ev.request_ids,
                           probs=None if ev.probs is None else ev.probs[:, keep], source=ev.source)
            out[name] = (sub, scores[:, keep], f"{desc}; MoE layers {keep}")
    return out


def _table(rows: list[dict]) -> str:
    from megatron_specmoe.cli.simulate_report import SHORT

    names = [n for n in SHORT if any(n in r for r in rows)]
    head = ("| EP | nodes | " + " | ".join(f"{SHORT[n]} us" for n in names)
            + " | specmoe a2a / " + " / ".join(SHORT[b] for b in BASELINES) + " |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = [f"{r[n]['total_time_s'] * 1e6:.1f}" if n in r else "-" for n in names]
        s = r["specmoe_alltoall"]["total_time_s"]
        ratios = [f"{s / r[b]['total_time_s']:.2f}" if b in r else "-" for b in BASELINES]
        lines.append(f"| {r['ep']} | {r['nodes']} | " + " | ".join(cells) + " | " + " / ".join(ratios) + " |")
    return "\n".join(lines)


def _plot(results: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megatron_specmoe.cli.simulate_report import COLOURS

    sets = list(dict.fromkeys(k.split(" | ")[0] for k in results))
    fig, axes = plt.subplots(len(sets), len(REGIMES), figsize=(5 * len(REGIMES), 4 * len(sets)), squeeze=False)
    for i, name in enumerate(sets):
        for j, (phase, tokens) in enumerate(REGIMES):
            ax = axes[i, j]
            rows = results.get(f"{name} | {phase} {tokens}", [])
            for model, colour in COLOURS.items():
                pts = [(r["ep"], r[model]["total_time_s"] * 1e6) for r in rows if model in r]
                if pts:
                    ax.plot(*zip(*pts), "-" if model.startswith("specmoe") else "--", marker="o", color=colour,
                            label=model, linewidth=2.5 if model == "specmoe_alltoall" else 1.2)
            eps = [r["ep"] for r in rows]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            if eps:
                ax.set_xticks(eps, [str(e) for e in eps])
            ax.set_title(f"{name}: {phase}, {tokens} tokens/GPU", fontsize=9)
            ax.set_xlabel("EP size (8 GPUs per node)")
            ax.set_ylabel("MoE layer: comm + exposed plan (us)")
            ax.grid(True, which="both", alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cluster", default="h200-ib", help="cluster preset")
    parser.add_argument("--ep", default="8,16,32,64")
    parser.add_argument("--sets", default="mixtral,demo", help="trace sets: mixtral, demo")
    parser.add_argument("--mixtral-dir", default=DEFAULT_MIXTRAL)
    parser.add_argument("--predictor", default="layer", help="predictor kind for the Mixtral set (or oracle)")
    parser.add_argument("--layers", default="0,8,16,24",
                        help="Mixtral MoE layers to simulate (comma list or 'all'; the demo set always uses its 4)")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--dispatch-dtype", default="bf16")
    parser.add_argument("--combine-dtype", default="bf16")
    parser.add_argument("--plan-kernels", type=int, default=16)
    parser.add_argument("--plot", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    import torch

    from megatron_specmoe.cli.simulate import parse_ep_list, simulate_rows
    from megatron_specmoe.sim.cluster import cluster_preset
    from megatron_specmoe.sim.plan_cost import PlanCharge

    torch.set_num_threads(1)
    command = " ".join([sys.executable, *sys.argv])
    eps = parse_ep_list(args.ep)
    cluster = cluster_preset(args.cluster)
    results: dict[str, list[dict]] = {}
    print(f"# MoE-layer communication + exposed plan time per step, {cluster.name}: {cluster.source}")
    print(f"H = {args.hidden}, dispatch {args.dispatch_dtype}, combine {args.combine_dtype}; TP = 8 inside each "
          f"node (s-TS shuffle domain); plan {args.plan_kernels} kernels per layer in a CUDA graph, overlapped "
          "with attention (roofline of sim/plan_cost.py, context 4096)")
    for name, (trace, scores, desc) in _sets(args).items():
        for phase, tokens in REGIMES:
            need = tokens * max(eps)
            tr, sc, copies = _tile(trace, scores, need)
            charge = PlanCharge(kernels=args.plan_kernels, launch="graph", overlap=True, phase=phase, context=4096)
            t0 = time.perf_counter()
            rows = simulate_rows(tr, sc, eps=eps, tp_arg="node", cluster=cluster, hidden=args.hidden,
                                 dispatch_dtype=args.dispatch_dtype, combine_dtype=args.combine_dtype,
                                 tokens_per_rank=tokens, charge=charge)
            key = f"{name} | {phase} {tokens}"
            results[key] = rows
            print(f"\n## {desc}: {phase}, {tokens} tokens per GPU ({tr.num_tokens} tokens = trace x{copies}"
                  f"{' repeated' if copies > 1 else ''}; {time.perf_counter() - t0:.0f} s)\n", flush=True)
            print(_table(rows), flush=True)
    print(f"\ncommand: {command}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": command, "cluster": cluster.to_json(), "results": results}, f, indent=1)
    if args.plot:
        _plot(results, args.plot, f"{cluster.name}: MoE layer comm + exposed plan per step, H={args.hidden} "
              f"{args.dispatch_dtype}/{args.combine_dtype}")
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
