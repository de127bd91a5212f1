"""Calibration as code: every published measurement the cluster model is checked against.

Notation
    P: EP ranks.   G: GPUs per node.   T_r: tokens per rank.   row: bytes of one hidden row.
    ratio = predicted / measured (both in the row's unit).

The data (``calibration.csv``, shipped with the package; one line per published figure)
    id, source (repository + file or thread), page_or_commit, hardware, preset (the
    ``cluster.PresetName`` it is evaluated on), model (a ``dispatchers.DispatcherName`` or
    ``nccl_alltoall``), phase, ep, tokens_per_rank, hidden, top_k, num_experts, groups ("1": none,
    "nodes": one group per node as DeepEP's internode test), top_groups, dispatch_dtype,
    combine_dtype, metric, measured, unit, use ("fit": a constant of ``cluster.py`` was derived
    from it; "check": not used to set any constant).

Metrics, counted the way each source counts them (``predict``)
    deepep_nvl_bw   DeepEP intranode: copies received per (token, rank), the rank itself included,
                    x row / time (mean over ranks).
    deepep_rdma_bw  DeepEP internode: (token, node) pairs sent, the own node included, x row / time.
    latency         the phase time in us (DeepEP low-latency kernels, 128 tokens per rank).
    nccl_busbw      nccl-tests' alltoall bus bandwidth: S x (P - 1) / P / time for S = 1 GiB per rank
                    spread evenly over the P ranks (NCCL fixed cost once, no count exchange).
Routes: ``synthetic.synthetic_routes`` with the row's experts, top-k and groups (seed 0), experts
placed contiguously (E / P per rank), token t of rank r at home on r.

``TOLERANCE`` is the +-25% band of the issue; ``KNOWN_MISSES`` names the rows outside it and why
(``tests/test_calibration.py`` fails on any other miss, and on a listed row that no longer misses).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from importlib import resources
from typing import Optional

import numpy as np

from megatron_specmoe.schedule.placement import ExpertPlacement
from megatron_specmoe.sim.cluster import ClusterSpec, cluster_preset
from megatron_specmoe.sim.dispatchers import simulate_dispatcher
from megatron_specmoe.sim.links import direct_loads, phase_time
from megatron_specmoe.sim.simulate import route_counts
from megatron_specmoe.sim.synthetic import synthetic_routes
from megatron_specmoe.sim.wire import WireDtypes

__all__ = ["CalibrationRow", "CalibrationResult", "TOLERANCE", "KNOWN_MISSES", "load_rows", "predict",
           "run_calibration", "format_calibration"]

TOLERANCE = 0.25
# row id -> why the model misses it by more than TOLERANCE (empty when every row is inside).
KNOWN_MISSES: dict[str, str] = {}

_INT_FIELDS = ("ep", "tokens_per_rank", "hidden", "top_k", "num_experts", "top_groups")


@dataclass(frozen=True, kw_only=True)
class CalibrationRow:
    """One published measurement (columns of ``calibration.csv``, module docstring)."""

    id: str
    source: str
    page_or_commit: str
    hardware: str
    preset: str
    model: str
    phase: str
    ep: int
    tokens_per_rank: int
    hidden: int
    top_k: int
    num_experts: int
    groups: str
    top_groups: int
    dispatch_dtype: str
    combine_dtype: str
    metric: str
    measured: float
    unit: str
    use: str


@dataclass(frozen=True, kw_only=True)
class CalibrationResult:
    """A row with the model's prediction.

    Attributes:
        row: the measurement.
        predicted: the model's value in ``row.unit``.
        ratio: predicted / measured.
        miss_reason: ``KNOWN_MISSES``' entry for the row, or None.
    """

    row: CalibrationRow
    predicted: float
    ratio: float
    miss_reason: Optional[str]

    @property
    def within(self) -> bool:
        return abs(self.ratio - 1.0) <= TOLERANCE


def load_rows(text: Optional[str] = None) -> list[CalibrationRow]:
    """The rows of ``calibration.csv`` (or of ``text`` in the same format)."""
    if text is None:
        text = resources.files("megatron_specmoe.sim").joinpath("calibration.csv").read_text()
    rows = []
    for i, rec in enumerate(csv.DictReader(io.StringIO(text)), start=2):
        try:
            values = {k: (int(v) if k in _INT_FIELDS else float(v) if k == "measured" else v)
                      for k, v in rec.items()}
            rows.append(CalibrationRow(**values))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"calibration.csv line {i}: {exc}") from None
    ids = [r.id for r in rows]
    if len(set(ids)) != len(ids):
        raise ValueError("calibration.csv: duplicate ids")
    return rows


def _nccl_busbw(row: CalibrationRow, cluster: ClusterSpec) -> float:
    p = row.ep
    size = float(1 << 30)
    sent = np.full((p, p), size / p)
    lat = cluster.latency
    fixed = lat.nccl_a2a_inter_s if p > cluster.gpus_per_node else lat.nccl_a2a_intra_s
    t = phase_time(direct_loads(sent, cluster), cluster, fixed_s=fixed,
                   nvl_issue_s=lat.nccl_issue_s, nic_issue_s=lat.nccl_issue_s)
    return size * (p - 1) / p / float(t.time_s) / 1e9


def predict(row: CalibrationRow, cluster: Optional[ClusterSpec] = None) -> float:
    """The model's value of ``row.metric`` in ``row.unit`` (module docstring).

    Args:
        row: the measurement.
        cluster: the cluster to evaluate on (default: the row's preset), e.g. a preset with one
            constant zeroed to see what it contributes (``tools/fit_calibration.py``).
    """
    cluster = (cluster_preset(row.preset) if cluster is None else cluster).for_ranks(row.ep)
    if row.metric == "nccl_busbw":
        return _nccl_busbw(row, cluster)
    gpn = cluster.gpus_per_node
    nodes = -(-row.ep // gpn)
    groups = nodes if row.groups == "nodes" else int(row.groups)
    top_groups = min(row.top_groups, groups)
    tokens = row.tokens_per_rank * row.ep
    trace = synthetic_routes(num_tokens=tokens, num_experts=row.num_experts, top_k=row.top_k,
                             num_groups=groups, top_groups=top_groups, seed=0)
    home = (np.arange(tokens) // row.tokens_per_rank)[:, None]
    counts = route_counts(trace, [ExpertPlacement.contiguous(row.num_experts, row.ep)], home,
                          num_ranks=row.ep, gpus_per_node=gpn, tokens_per_step=tokens)
    wire = WireDtypes(hidden_size=row.hidden, dispatch=row.dispatch_dtype, combine=row.combine_dtype)
    res = simulate_dispatcher(row.model, counts, wire=wire, cluster=cluster, top_k=row.top_k)
    phase = res.dispatch if row.phase == "dispatch" else res.combine
    t = float(phase.time_s.mean())
    if row.metric == "latency":
        return t * 1e6
    rows_bytes = wire.dispatch_row if row.phase == "dispatch" else wire.combine_row
    if row.metric == "deepep_nvl_bw":
        per_rank = counts.copies.sum(-2).mean()  # copies received per rank, self included
    elif row.metric == "deepep_rdma_bw":
        per_rank = counts.node_copies.sum(-1).mean()  # (token, node) pairs sent, own node included
    else:
        raise ValueError(f"calibration row {row.id}: unknown metric {row.metric!r}")
    return float(per_rank) * rows_bytes / t / 1e9


def run_calibration(rows: Optional[list[CalibrationRow]] = None, progress=None) -> list[CalibrationResult]:
    """Predict every row; ``progress(i, n, row)`` is called before each when given."""
    rows = load_rows() if rows is None else rows
    out = []
    for i, row in enumerate(rows):
        if progress is not None:
            progress(i, len(rows), row)
        value = predict(row)
        out.append(CalibrationResult(row=row, predicted=value, ratio=value / row.measured,
                                     miss_reason=KNOWN_MISSES.get(row.id)))
    return out


def format_calibration(results: list[CalibrationResult]) -> str:
    """Markdown table: id, hardware, preset, measured, predicted, ratio, use, source."""
    head = "| id | preset | measured | predicted | ratio | use | source (commit / page) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        flag = "" if r.within else " **miss**"
        lines.append(
            f"| {r.row.id} | {r.row.preset} | {r.row.measured:g} {r.row.unit} | {r.predicted:.1f} {r.row.unit} "
            f"| {r.ratio:.2f}{flag} | {r.row.use} | {r.row.source} ({r.row.page_or_commit[:12]}) |"
        )
    inside = sum(r.within for r in results)
    lines.append(f"\n{inside} of {len(results)} rows within +-{TOLERANCE:.0%}.")
    for r in results:
        if not r.within:
            lines.append(f"- {r.row.id}: ratio {r.ratio:.2f}: {r.miss_reason or 'not explained'}")
    return "\n".join(lines)
