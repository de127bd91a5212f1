"""Turn dispatcher runs into the demo's table, JSON and figure (pure: no megatron).

The table has one row per dispatcher: lossless check, (token, expert) pairs and bytes sent off
their rank per token, local activation rate, remote ranks per token, load imbalance, and forward
time as a ratio to ``alltoall`` (absolute CPU times mean little on a shared machine).
"""

from __future__ import annotations

import statistics
from typing import Sequence

from megatron_specmoe.measure.accounting import TrafficReport
from megatron_specmoe.measure.measures import RouteMeasures

__all__ = ["run_summary", "format_table", "plot_layer_lar"]


def _total(reports: Sequence[TrafficReport]) -> RouteMeasures:
    total = reports[0].measures
    for r in reports[1:]:
        total = total + r.measures
    return total


def run_summary(
    name: str, reports: Sequence[TrafficReport], forward_s: Sequence[float], tokens: int,
    a2a_s: Sequence[float] = (), bytes_on_wire: int | None = None,
) -> dict:
    """JSON-ready numbers of one dispatcher over all MoE layers and batches.

    ``tokens`` is the number of tokens served; per-token figures are per token per MoE layer.
    ``bytes_on_wire``: the bytes the dispatcher's collectives moved, counted, for a dispatcher
    that does not send (token, expert) pairs (allgather); None: the reports' pair bytes.
    """
    m = _total(reports)
    layers = len(reports)
    counted = bytes_on_wire is not None
    if not counted:
        bytes_on_wire = sum(r.bytes_on_wire for r in reports)
    return {
        "dispatcher": name,
        "moe_layers": layers,
        "tokens": tokens,
        "remote_pairs": m.remote_pairs,
        "remote_pairs_per_token": m.remote_pairs / (tokens * layers) if tokens else 0.0,
        "bytes_on_wire": bytes_on_wire,
        "bytes_per_token": bytes_on_wire / (tokens * layers) if tokens else 0.0,
        "bytes_counted_from_collectives": counted,
        "local_activation_rate": m.local_activation_rate,
        "remote_ranks_per_token": m.remote_ranks_per_token,
        "load_imbalance": max(r.measures.load_imbalance for r in reports),
        "per_layer_local_activation_rate": [r.measures.local_activation_rate for r in reports],
        "forward_s_median": statistics.median(forward_s) if forward_s else 0.0,
        "forward_s": list(forward_s),
        "a2a_s_median": statistics.median(a2a_s) if a2a_s else None,
        "a2a_s": list(a2a_s),
    }


def format_table(summaries: Sequence[dict], max_abs_diff: float, baseline: str = "alltoall",
                 timed: str = "forward", compared: str = "logits") -> str:
    """A fixed-width table; times as a ratio to ``baseline`` measured in the same run. ``timed``
    names what ``forward_s`` timed ("forward"; the dynamic demo: "engine step"), ``compared`` what
    the lossless column compares."""
    base = next((s for s in summaries if s["dispatcher"] == baseline), summaries[0])
    timed_a2a = all(s.get("a2a_s_median") for s in summaries)
    head = (
        f"{'dispatcher':<10} {'lossless':>10} {'remote pairs/tok':>16} {'bytes/tok':>10} "
        f"{'LAR':>6} {'remote ranks/tok':>16} {'imbalance':>9} {'fwd time':>9}"
        + (f" {'a2a time':>9}" if timed_a2a else "")
    )
    lines = [head, "-" * len(head)]
    for s in summaries:
        lossless = "ref" if s is base else f"{max_abs_diff:.1e}"
        ratio = s["forward_s_median"] / base["forward_s_median"] if base["forward_s_median"] else float("nan")
        lines.append(
            f"{s['dispatcher']:<10} {lossless:>10} {s['remote_pairs_per_token']:>16.3f} "
            f"{s['bytes_per_token']:>10.1f} {s['local_activation_rate']:>6.3f} "
            f"{s['remote_ranks_per_token']:>16.3f} {s['load_imbalance']:>9.3f} {ratio:>8.2f}x"
            + (f" {s['a2a_s_median'] / base['a2a_s_median']:>8.2f}x" if timed_a2a else "")
        )
    if any(s.get("bytes_counted_from_collectives") for s in summaries):
        lines.append(
            "allgather: the same routes as alltoall (pairs, LAR, imbalance); it sends every token to every "
            "rank of the TP x EP group and reduce-scatters the outputs, so its bytes are those collectives' "
            "payloads, counted"
        )
    lines.append(
        "per MoE layer and token; LAR = local activation rate; imbalance = max/mean pairs per rank "
        f"(worst layer); lossless = max |{compared} diff|; fwd time = median {timed}, ratio to " + base["dispatcher"]
        + ("; a2a time = median time in the EP all-to-all phases (dispatch + combine), same ratio"
           if timed_a2a else "")
    )
    return "\n".join(lines)


def plot_layer_lar(summaries: Sequence[dict], path: str, title: str = "Local activation rate per MoE layer") -> None:
    """Bar chart of each dispatcher's per-layer local activation rate, written to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = len(summaries[0]["per_layer_local_activation_rate"])
    width = 0.8 / len(summaries)
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * layers + 2), 3.5))
    for i, s in enumerate(summaries):
        xs = [l + (i - (len(summaries) - 1) / 2) * width for l in range(layers)]
        ax.bar(xs, s["per_layer_local_activation_rate"], width=width, label=s["dispatcher"])
    ax.set_xticks(range(layers))
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("local activation rate")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    from megatron_specmoe.artifacts.files import atomic_file

    with atomic_file(path) as tmp:  # never half a PNG where --figure points
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
