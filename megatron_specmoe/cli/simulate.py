"""``specmoe simulate``: predicted MoE-layer communication time on a cluster, from real traces.

For every EP size asked for, simulate Megatron's ``alltoall``, a de-duplicating ``dedup`` and
``specmoe`` on the same tokens (``sim/compare.py``) and print one table row: time per
MoE layer per step (dispatch + combine, alpha-beta model of ``sim/simulate.py``), inter-node
bytes, local activation rate, and specmoe's speed-up. ``--json`` writes every number, ``--plot``
a PNG of time vs EP.

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

HELP = "predict MoE all-to-all time of specmoe vs alltoall vs dedup on a cluster, from traces"

# assignment.AssignmentMethod, spelled out so that building the parser does not import torch
# (tests/test_simulate.py checks that the two agree).
ASSIGNMENT_CHOICES = ("contiguous", "argsort", "greedy", "refine", "refine_spread", "optimal")

def add_arguments(parser: argparse.ArgumentParser) -> None:
    from megatron_specmoe.sim.cluster import PresetName
    from typing import get_args

    parser.add_argument("--traces", nargs="+", required=True, metavar="FILE",
                        help="routing traces to simulate (any format trace_io reads)")
    parser.add_argument("--fit-traces", nargs="+", metavar="FILE", default=None,
                        help="traces to fit --predictor layer on (other workloads than --traces)")
    parser.add_argument("--plan", metavar="DIR", default=None,
                        help="plan folder: its placements (and with --predictor plan its predictor)")
    parser.add_argument("--predictor", default=None,
                        help="s-TS predictor: oracle (default without --plan), plan (default with a "
                             "--plan that stores one), or a predictor kind (layer, history, ...) "
                             "fitted on --fit-traces")
    parser.add_argument("--plan-kind", default=None, help="predictor kind to take from the plan")
    parser.add_argument("--cluster", choices=get_args(PresetName), default="h200-ib",
                        help="cluster preset (sim/cluster.py states every constant)")
    parser.add_argument("--nic-routing", choices=("direct", "rail"), default="direct",
                        help="inter-node path: direct (each GPU's own NIC) or rail (NCCL PXN: hop over "
                             "NVLink to the GPU on the destination's rail)")
    parser.add_argument("--ep", default="8,16,32,64", help="EP sizes, comma-separated")
    parser.add_argument("--tp", default="node",
                        help="attention TP size (s-TS shuffle domain): an int, 'node' = min(GPUs per "
                             "node, EP) (default), or 'ep' = TP spans the whole EP group")
    parser.add_argument("--hidden", type=int, default=4096, help="hidden size H (Mixtral-8x7B: 4096)")
    parser.add_argument("--dtype", default="bf16", help="activation dtype: bf16, fp16, fp32, fp8")
    parser.add_argument("--tokens-per-rank", type=int, default=64,
                        help="tokens each GPU holds in a step (64 x TP 8 = the 512-token batch of docs/method.md)")
    parser.add_argument("--dedup", action="store_true",
                        help="drop tokens whose whole route repeats an earlier one (Mixtral MT-Bench traces)")
    parser.add_argument("--assignment", default="refine", choices=ASSIGNMENT_CHOICES,
                        help="balanced assignment method (schedule/assignment.py); refine_spread also "
                             "spreads predicted inter-node pairs evenly over a node's GPUs (TP < EP)")
    parser.add_argument("--json", metavar="OUT", default=None, help="write all numbers as JSON")
    parser.add_argument("--plot", metavar="OUT.png", default=None, help="write a PNG of time vs EP")


def parse_ep_list(text: str) -> list[int]:
    try:
        eps = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--ep must be comma-separated integers like 8,16,32,64, got {text!r}") from None
    if not eps or min(eps) < 1:
        raise ValueError(f"--ep needs at least one positive EP size, got {text!r}")
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
        raise ValueError(f"--tp must be an int, 'node' or 'ep', got {text!r}") from None
    if tp < 1 or ep % tp:
        raise ValueError(f"--tp {tp} must divide every EP size, and EP {ep} is not a multiple")
    return tp


def _predictor_scores(args, trace, plan):
    """float32 [T, L, E] expert scores and a one-line description."""
    from megatron_specmoe.sim.inputs import oracle_expert_scores, predictor_expert_scores

    kind = args.predictor or ("plan" if plan is not None and plan.header.predictor_kinds else "oracle")
    if kind == "oracle":
        return oracle_expert_scores(trace), "oracle (true routes; an upper bound)"
    from megatron_specmoe.predict import registry

    if kind != "plan":
        registry.check_kind(kind)
        if not args.fit_traces:
            raise ValueError(f"--predictor {kind} needs --fit-traces FILE... (other workloads to fit on)")
        from megatron_specmoe.artifacts.trace_io import dedup_routes, read_traces

        fit = read_traces(args.fit_traces)
        if args.dedup:
            fit, _ = dedup_routes(fit)
        print(f"simulate: fitting the {kind} predictor on {fit.num_tokens} tokens", file=sys.stderr)
        predictor = registry.fit_predictor(kind, fit)
        return predictor_expert_scores(predictor, trace), f"{kind} fitted on {', '.join(args.fit_traces)}"
    if plan is None:
        raise ValueError("--predictor plan needs --plan DIR")
    kinds = plan.header.predictor_kinds
    chosen = args.plan_kind or (kinds[0] if kinds else None)
    if chosen not in kinds:
        raise ValueError(f"plan {plan.source} stores predictor kinds {list(kinds)}; --plan-kind {chosen!r} is not one")
    predictor = registry.predictor_from_state(chosen, plan.predictor_state[chosen])
    return predictor_expert_scores(predictor, trace), f"plan {plan.source} predictor {chosen!r}"


def simulate_rows(
    trace, scores, *, eps: Sequence[int], tp_arg: str, cluster, hidden: int, dtype: str,
    tokens_per_rank: int, plan_placements=None, method: str = "refine",
) -> list[dict]:
    """One ``Comparison.table_row()`` per EP size, all on the same tokens."""
    from megatron_specmoe.sim.compare import compare_dispatchers

    rows = []
    for ep in eps:
        tp = resolve_tp(tp_arg, ep, cluster.gpus_per_node)
        t0 = time.perf_counter()
        cmp = compare_dispatchers(
            trace, scores, ep=ep, tp=tp, cluster=cluster, hidden_size=hidden, dtype=dtype,
            tokens_per_rank=tokens_per_rank, plan_placements=plan_placements, method=method,
        )
        rows.append(cmp.table_row())
        print(f"simulate: EP={ep} TP={tp} done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown table: per MoE layer per step, mean over steps and layers."""
    head = ("| EP | nodes | TP | split | alltoall us | dedup us | specmoe us | specmoe speed-up "
            "| inter-node MB/layer a2a / specmoe | LAR a2a / specmoe |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        a, d, s = r["alltoall"], r["dedup"], r["specmoe"]
        lines.append(
            f"| {r['ep']} | {r['nodes']} | {r['tp']} | x{r['expert_split']} "
            f"| {a['layer_time_s'] * 1e6:.1f} | {d['layer_time_s'] * 1e6:.1f} | {s['layer_time_s'] * 1e6:.1f} "
            f"| {s['speedup_vs_alltoall']:.2f}x "
            f"| {a['inter_node_bytes_per_layer'] / 1e6:.1f} / {s['inter_node_bytes_per_layer'] / 1e6:.1f} "
            f"| {a['local_activation_rate']:.3f} / {s['local_activation_rate']:.3f} |"
        )
    return "\n".join(lines)


def plot_rows(series: dict[str, list[dict]], path: str, title: str) -> None:
    """PNG of MoE-layer communication time vs EP; ``series`` label -> rows (one line style per
    label, one colour per dispatcher)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"alltoall": "tab:red", "dedup": "tab:orange", "specmoe": "tab:green"}
    styles = ["-", "--", ":", "-."]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (label, rows) in enumerate(series.items()):
        eps = [r["ep"] for r in rows]
        for name, colour in colours.items():
            if i and name != "specmoe":
                continue  # baselines do not depend on the series' predictor / layout label
            ax.plot(eps, [r[name]["layer_time_s"] * 1e6 for r in rows], styles[i % 4], color=colour,
                    marker="o", label=f"{name}" + (f" ({label})" if name == "specmoe" else ""))
    ax.set_xscale("log", base=2)
    ax.set_xticks(eps, [str(e) for e in eps])
    ax.set_xlabel("EP size (GPUs; 8 per node)")
    ax.set_ylabel("MoE-layer comm time per step (us)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from megatron_specmoe.sim.cluster import cluster_preset
    from megatron_specmoe.artifacts.trace_io import dedup_routes, read_traces

    # The simulator works on many small tensors; extra intra-op threads only add overhead (and
    # slow down 20x on a shared machine).
    torch.set_num_threads(1)
    try:
        eps = parse_ep_list(args.ep)
        cluster = cluster_preset(args.cluster)
        if args.nic_routing != cluster.inter_node_routing:
            cluster = dataclasses.replace(cluster, inter_node_routing=args.nic_routing)
        trace = read_traces(args.traces)
        total = trace.num_tokens
        if args.dedup:
            trace, _ = dedup_routes(trace)
            print(f"simulate: {total} tokens, {trace.num_tokens} after dropping repeated routes", file=sys.stderr)
        plan = None
        if args.plan:
            from megatron_specmoe.artifacts.plan_folder import load_plan

            plan = load_plan(args.plan)
            h = plan.header
            plan.check_compatible(num_layers=trace.num_layers, num_experts=trace.num_experts,
                                  topk=trace.topk, ep_size=h.ep_size)
        # Same tokens for every EP size: a multiple of the largest step.
        step = args.tokens_per_rank * max(eps)
        used = trace.num_tokens // step * step
        if used == 0:
            raise ValueError(
                f"--traces hold {trace.num_tokens} tokens, fewer than one step of EP {max(eps)} x "
                f"--tokens-per-rank {args.tokens_per_rank} = {step}; lower --tokens-per-rank"
            )
        print(f"simulate: using the first {used} of {trace.num_tokens} tokens (a multiple of the "
              f"largest step, {step})", file=sys.stderr)
        trace = trace.select(np.arange(used))
        scores, predictor_desc = _predictor_scores(args, trace, plan)
        rows = simulate_rows(
            trace, scores, eps=eps, tp_arg=args.tp, cluster=cluster, hidden=args.hidden,
            dtype=args.dtype, tokens_per_rank=args.tokens_per_rank,
            plan_placements=None if plan is None else plan.placements, method=args.assignment,
        )
    except ValueError as exc:
        print(f"specmoe simulate: error: {exc}", file=sys.stderr)
        return 2
    print(f"cluster {cluster.name} ({cluster.inter_node_routing} inter-node routing): {cluster.source}")
    print(f"predictor: {predictor_desc}; tokens: {used}; hidden {args.hidden} {args.dtype}; "
          f"{args.tokens_per_rank} tokens per GPU per step")
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cluster": cluster.to_json(), "predictor": predictor_desc, "tokens": used,
                       "hidden": args.hidden, "dtype": args.dtype, "rows": rows}, f, indent=1)
    if args.plot:
        plot_rows({predictor_desc.split(" (")[0]: rows}, args.plot,
                  f"{cluster.name}, H={args.hidden} {args.dtype}, {args.tokens_per_rank} tok/GPU")
    return 0
