"""Tables and plots of ``specmoe simulate`` (rows from ``sim.compare.Comparison.table_row``).

Notation
    row: one EP size; ``row[name]`` one dispatcher model's means per MoE layer per step.
    total: communication (dispatch + combine) + the exposed plan time (specmoe models only).
"""

from __future__ import annotations

__all__ = ["SHORT", "COLOURS", "format_table", "format_extras", "plot_rows"]

# Column headers (dispatcher name -> short label).
SHORT = {
    "alltoall": "a2a",
    "deepep_normal": "deepep",
    "deepep_ll": "deepep LL",
    "allgather_inference": "AG inf",
    "allgather_inference_nvls": "AG NVLS",
    "specmoe_alltoall": "specmoe a2a",
    "specmoe_deepep_normal": "specmoe deepep",
    "specmoe_deepep_ll": "specmoe LL",
}
COLOURS = {
    "alltoall": "tab:red", "deepep_normal": "tab:orange", "deepep_ll": "tab:brown",
    "allgather_inference": "tab:purple", "allgather_inference_nvls": "tab:pink",
    "specmoe_alltoall": "tab:green", "specmoe_deepep_normal": "tab:olive", "specmoe_deepep_ll": "tab:cyan",
}


def _names(rows: list[dict]) -> list[str]:
    seen: list[str] = []
    for r in rows:
        for name in SHORT:
            if (name in r or name in r.get("skipped", {})) and name not in seen:
                seen.append(name)
    return seen


def format_table(rows: list[dict]) -> str:
    """Markdown table of total time per MoE layer per step (us); '-' where a model cannot run."""
    names = _names(rows)
    head = "| EP | nodes | TP | split | " + " | ".join(f"{SHORT[n]} us" for n in names)
    has_spec = any("specmoe_alltoall" in r for r in rows)
    if has_spec:
        head += " | specmoe a2a vs a2a | LAR a2a / specmoe"
    head += " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = [f"{r[n]['total_time_s'] * 1e6:.1f}" if n in r else "-" for n in names]
        line = f"| {r['ep']} | {r['nodes']} | {r['tp']} | x{r['expert_split']} | " + " | ".join(cells)
        if has_spec:
            if "specmoe_alltoall" in r and "alltoall" in r:
                s, a = r["specmoe_alltoall"], r["alltoall"]
                line += (f" | {s['speedup_vs_alltoall']:.2f}x | {a['local_activation_rate']:.3f} / "
                         f"{s['local_activation_rate']:.3f}")
            else:
                line += " | - | -"
        lines.append(line + " |")
    skipped = {n: why for r in rows for n, why in r.get("skipped", {}).items()}
    for n, why in skipped.items():
        lines.append(f"\n'-' {n}: {why}")
    return "\n".join(lines)


def _nodes_text(entry: dict) -> str:
    nodes, b = entry.get("remote_nodes_per_token"), entry.get("internode_bytes_per_token")
    if nodes is None or b is None:
        return "node measures n/a"
    return f"remote nodes/token {nodes:.3f}, inter-node B/token {b['per_node']:.0f} per-node / {b['per_pair']:.0f} per-pair"


def format_extras(rows: list[dict]) -> str:
    """Lines for the replica routes and the request placement of each row ('' when neither)."""
    lines = []
    for r in rows:
        rep = r.get("replicas")
        if rep is not None:
            if "skipped" in rep:
                lines.append(f"EP {r['ep']} replicas: {rep['skipped']}")
            for name, entry in rep.items():
                if not isinstance(entry, dict) or name not in r:
                    continue
                base = r[name]
                lines.append(
                    f"EP {r['ep']} {SHORT[name]} with {rep['redundant_experts']} replicas ({rep['policy']}): "
                    f"LAR {base['local_activation_rate']:.3f} -> {entry['local_activation_rate']:.3f}, remote "
                    f"pairs/token {base['remote_pairs_per_token']:.3f} -> {entry['remote_pairs_per_token']:.3f}, "
                    f"{base['total_time_s'] * 1e6:.1f} -> {entry['total_time_s'] * 1e6:.1f} us "
                    f"({entry['vs_without_replicas']['total_time_s']:.3f}x)")
        req = r.get("request_placement")
        if req is not None:
            for name, entry in req["by_method"].items():
                lines.append(f"EP {r['ep']} requests {name}: LAR {entry['local_activation_rate']:.3f}, remote "
                             f"pairs/token {entry['remote_pairs_per_token']:.3f}, {_nodes_text(entry)}")
            for base in ("round_robin", "least_loaded"):
                ratio = req[f"vs_{base}"]
                if base != req["method"] and ratio.get("remote_nodes_per_token") is not None:
                    lines.append(f"EP {r['ep']} requests {req['method']} / {base}: remote nodes "
                                 f"{ratio['remote_nodes_per_token']:.3f}x, inter-node bytes "
                                 f"{ratio['internode_bytes_per_token']['per_pair']:.3f}x per-pair")
    return "\n".join(lines)


def plot_rows(series: dict[str, list[dict]], path: str, title: str) -> None:
    """PNG of total MoE-layer time vs EP, one panel per series label (e.g. prefill / decode)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(series), figsize=(5.5 * len(series), 4.5), squeeze=False)
    for ax, (label, rows) in zip(axes[0], series.items()):
        eps = [r["ep"] for r in rows]
        for name in _names(rows):
            pts = [(r["ep"], r[name]["total_time_s"] * 1e6) for r in rows if name in r]
            if not pts:
                continue
            style = "-" if name.startswith("specmoe") else "--"
            ax.plot(*zip(*pts), style, color=COLOURS[name], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(eps, [str(e) for e in eps])
        ax.set_xlabel("EP size (GPUs; 8 per node)")
        ax.set_ylabel("MoE-layer comm + plan per step (us)")
        ax.set_title(label, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    from megatron_specmoe.artifacts.files import atomic_file

    with atomic_file(path) as tmp:  # never half a PNG where --plot points
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
