"""Gather the dispatchers' per-rank records into whole-group traffic reports.

Each rank's ``DispatchRecorder`` holds its own rows (what it sent). ``gather_reports`` exchanges
them over the EP group handed in (one ``all_gather_object``, off the hot path: call it after the
forwards you want to measure) and stacks them per (forward, layer) into ``TrafficReport``s.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch.distributed as dist

from megatron_specmoe.measure.accounting import DispatchRecord, TrafficReport

__all__ = ["gather_reports", "summarize_by_layer"]


def gather_reports(records: Sequence[DispatchRecord], group) -> list[TrafficReport]:
    """All ranks' records -> one ``TrafficReport`` per (forward, layer), in recording order.

    Args:
        records: this rank's records, in the order they were made (the same number and layer
            sequence on every rank of ``group``: each forward visits the same MoE layers).
        group: the EP process group whose ranks the records' ``ep_rank`` refer to.
    """
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, list(records), group=group)
    counts = {len(rows) for rows in gathered}
    if len(counts) != 1:
        raise ValueError(f"gather_reports: ranks recorded different numbers of forwards: {sorted(counts)}")
    reports = []
    for step in range(counts.pop()):
        reports.append(TrafficReport.from_records([rows[step] for rows in gathered]))
    return reports


def summarize_by_layer(reports: Sequence[TrafficReport]) -> dict[int, TrafficReport]:
    """Reports of several forwards added per layer (pairs, bytes and measures summed)."""
    acc: dict[int, list[TrafficReport]] = defaultdict(list)
    for rep in reports:
        acc[rep.layer_number].append(rep)
    out = {}
    for layer, reps in acc.items():
        measures = reps[0].measures
        for r in reps[1:]:
            measures = measures + r.measures
        nodes = reps[0].nodes
        for r in reps[1:]:
            if (nodes is None) != (r.nodes is None):
                raise ValueError(f"summarize_by_layer: layer {layer} mixes reports with and without "
                                 "node measures; record every forward with the same gpus_per_node")
            nodes = None if nodes is None else nodes + r.nodes

        def add(name):
            mats = [getattr(r, name) for r in reps]
            return tuple(tuple(sum(m[i][j] for m in mats) for j in range(len(mats[0]))) for i in range(len(mats[0])))

        out[layer] = TrafficReport(
            layer_number=layer,
            pairs=add("pairs"),
            dispatch_bytes=add("dispatch_bytes"),
            combine_bytes=add("combine_bytes"),
            measures=measures,
            nodes=nodes,
            wire=reps[0].wire,
        )
    return out
