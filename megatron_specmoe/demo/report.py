"""Turn dispatcher runs into the demo's table, JSON and figure (pure: no megatron).

The table has one row per dispatcher: lossless check, (token, expert) pairs and bytes sent off
their rank per token, local activation rate, remote ranks per token, load imbalance, and forward
time as a ratio to ``alltoall`` (absolute CPU times mean little on a shared machine).

Forward time ratio. The dispatchers serve the same inputs back to back, so forward i of one and
forward i of ``alltoall`` form a pair that saw the same input and about the same machine load. The
table's ratio is the median over the pairs of each pair's ratio (``paired_ratio``), with its
quartiles and range on a line below: on a shared machine a load spike then moves one pair, not the
median of one side only.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Sequence

from megatron_specmoe.measure.accounting import TrafficReport
from megatron_specmoe.measure.measures import RouteMeasures

__all__ = ["PairedRatio", "paired_ratio", "add_paired_ratios", "run_summary", "format_table", "plot_layer_lar"]


@dataclass(frozen=True, kw_only=True)
class PairedRatio:
    """The per-pair time ratios of one dispatcher to the baseline.

    Attributes:
        median, q1, q3: the median and the quartiles of the pairs' ratios (``statistics.quantiles``,
            inclusive method; with one pair all three are its ratio).
        low, high: the smallest and the largest ratio.
        pairs: how many pairs.
    """

    median: float
    q1: float
    q3: float
    low: float
    high: float
    pairs: int

    def to_json(self) -> dict:
        return {"median": self.median, "q1": self.q1, "q3": self.q3, "min": self.low, "max": self.high,
                "pairs": self.pairs}


def paired_ratio(times: Sequence[float], base_times: Sequence[float]) -> PairedRatio:
    """Ratios ``times[i] / base_times[i]`` (seconds of the same input i, measured back to back),
    summarised.

    Raises:
        ValueError: the two lists differ in length, are empty, or a baseline time is not positive.
    """
    if len(times) != len(base_times) or not times:
        raise ValueError(f"paired_ratio: needs two equally long, non-empty lists of times, got {len(times)} "
                         f"and {len(base_times)}")
    if min(base_times) <= 0:
        raise ValueError(f"paired_ratio: baseline times must be > 0, got {min(base_times)!r}")
    ratios = sorted(t / b for t, b in zip(times, base_times))
    if len(ratios) == 1:
        q1 = med = q3 = ratios[0]
    else:
        q1, med, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return PairedRatio(median=med, q1=q1, q3=q3, low=ratios[0], high=ratios[-1], pairs=len(ratios))


def add_paired_ratios(summaries: Sequence[dict], baseline: str = "alltoall") -> None:
    """Give every summary (``run_summary``) a ``forward_ratio`` key: its ``paired_ratio`` to
    ``baseline``'s forward times, as JSON (the baseline's own is all 1.0). Summaries whose times
    cannot be paired (different counts, none) get None."""
    base = next((s for s in summaries if s["dispatcher"] == baseline), summaries[0])
    for s in summaries:
        pairable = len(s["forward_s"]) == len(base["forward_s"]) > 0 and min(base["forward_s"]) > 0
        s["forward_ratio"] = paired_ratio(s["forward_s"], base["forward_s"]).to_json() if pairable else None


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
    paired = all(s.get("forward_ratio") for s in summaries)
    for s in summaries:
        lossless = "ref" if s is base else f"{max_abs_diff:.1e}"
        if paired:
            ratio = s["forward_ratio"]["median"]
        else:
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
        + (f" (the median over {timed}s of each one's ratio to {base['dispatcher']}'s {timed} on the same "
           "input, run back to back)" if paired else "")
        + ("; a2a time = median time in the EP all-to-all phases (dispatch + combine), same ratio"
           if timed_a2a else "")
    )
    if paired:
        for s in summaries:
            if s is base:
                continue
            r = s["forward_ratio"]
            lines.append(f"fwd time {s['dispatcher']} / {base['dispatcher']}: median {r['median']:.3f}x, "
                         f"quartiles {r['q1']:.3f}-{r['q3']:.3f}x, range {r['min']:.3f}-{r['max']:.3f}x "
                         f"over {r['pairs']} pairs")
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
