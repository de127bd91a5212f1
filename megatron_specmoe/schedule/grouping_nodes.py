"""Node-aware expert grouping: nodes first, then ranks within a node.

Notation
    T: tokens.   k: top-k.   E: experts.   P: EP ranks.   G: EP ranks per node.   N = P / G nodes.
    EP rank r lives on node r // G (ranks of a node are consecutive).
    R: router groups (DeepSeek-style group-limited routing: expert e in group e // (E / R); a
       token selects experts from at most a few groups).

Why. Rank-level grouping (``grouping.py``) keeps a token's experts on few *ranks*, but says nothing
about which ranks share a node, so its node measures are those of an arbitrary order. Across nodes
the bytes that cost are the inter-node ones (``measure/nodes.py``), so the objective is taken
hierarchically:

    1. nodes: partition the E experts into N balanced node sets (E/N each) with the rank-level
       objective applied at node granularity (``grouping.group_layer`` with N "ranks": theta *
       load imbalance + (1 - theta) * remote share, co-location homes). With ``router_groups``
       (``keep_groups``) the units are whole router groups instead of experts, so that the experts
       of one group stay on one node: a token that touches g groups then reaches at most g nodes.
       Group units are partitioned on their pairwise co-activation (each token's distinct groups
       expanded into pairs; ``grouping`` method ``search`` on those two-element routes).
    2. ranks: inside each node, partition its E/N experts into G ranks the same way, on the
       pairwise co-activation of the experts that a token uses *within that node* (a token with j
       of its experts there contributes its j*(j-1)/2 pairs). This is a proxy of co-location
       (pairs, not whole sets), stated as such.

The result is an ordinary ``ExpertPlacement`` (a permutation), ranks numbered node by node.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from megatron_specmoe.artifacts.traces import RoutingTrace
from megatron_specmoe.schedule.grouping import GroupingOptions, group_layer
from megatron_specmoe.schedule.placement import ExpertPlacement

__all__ = ["NodeGroupingOptions", "group_layer_by_nodes", "group_experts_by_nodes"]


@dataclass(frozen=True, kw_only=True)
class NodeGroupingOptions:
    """How to group hierarchically.

    Attributes:
        gpus_per_node: G, EP ranks per node; must divide P.
        router_groups: R, the router's expert groups (None: no group-limited routing).
        keep_groups: keep each router group's experts on one node (needs ``router_groups``, and R
            must be a multiple of N so that every node holds R / N whole groups).
        options: the rank-level grouping options used at both levels (method, theta, seed, ...).
    """

    gpus_per_node: int
    router_groups: Optional[int] = None
    keep_groups: bool = False
    options: GroupingOptions = GroupingOptions()

    def __post_init__(self) -> None:
        if isinstance(self.gpus_per_node, bool) or not isinstance(self.gpus_per_node, int) or self.gpus_per_node < 1:
            raise ValueError(f"NodeGroupingOptions.gpus_per_node must be a positive integer, got {self.gpus_per_node!r}")
        if self.keep_groups and self.router_groups is None:
            raise ValueError("NodeGroupingOptions.keep_groups needs router_groups (the router's number of groups)")
        if self.router_groups is not None and self.router_groups < 1:
            raise ValueError(f"NodeGroupingOptions.router_groups must be >= 1, got {self.router_groups}")

    def check(self, num_experts: int, ep_size: int) -> int:
        """Validate against a layer; returns N."""
        g = self.gpus_per_node
        if ep_size % g:
            raise ValueError(f"node grouping: gpus_per_node={g} does not divide the EP size {ep_size}")
        if num_experts % ep_size:
            raise ValueError(f"node grouping: EP size {ep_size} does not divide num_experts={num_experts}")
        nodes = ep_size // g
        if self.router_groups is not None and num_experts % self.router_groups:
            raise ValueError(f"node grouping: router_groups={self.router_groups} does not divide num_experts={num_experts}")
        if self.keep_groups and self.router_groups % nodes:
            raise ValueError(
                f"node grouping: keep_groups needs whole router groups on every node, but "
                f"router_groups={self.router_groups} is not a multiple of the {nodes} nodes; pass "
                "keep_groups=False or a layout whose node count divides the groups"
            )
        return nodes


def _pairs(units_Tk: np.ndarray, num_units: int) -> np.ndarray:
    """int64 [M, 2]: each row's distinct unordered pairs of distinct units (-1 marks an absent
    entry), one row of the result per (token, pair)."""
    t, k = units_Tk.shape
    if k < 2 or t == 0:
        return np.zeros((0, 2), dtype=np.int64)
    i, j = np.triu_indices(k, 1)
    a, b = units_Tk[:, i], units_Tk[:, j]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    ok = (lo >= 0) & (lo != hi)
    row = np.broadcast_to(np.arange(t)[:, None], lo.shape)
    keys = np.unique((row[ok] * num_units + lo[ok]) * num_units + hi[ok])
    return np.stack([(keys // num_units) % num_units, keys % num_units], axis=1)


def _pairwise_partition(pairs: np.ndarray, num_units: int, bins: int, options: GroupingOptions, layer: int,
                        loads: np.ndarray) -> np.ndarray:
    """int64 [U]: bin of each unit, a balanced partition on the pairs' co-activation. Without
    any pair (no unit co-occurs) a load-balanced packing."""
    if num_units == bins:
        return np.arange(num_units)
    if pairs.shape[0] == 0:
        from megatron_specmoe.schedule.grouping_search import eplb_packing

        return eplb_packing(loads, bins)
    placement = group_layer(pairs, num_experts=num_units, ep_size=bins, options=options, layer=layer)
    return placement.rank_of_logical()


def group_layer_by_nodes(
    experts_Tk: np.ndarray, *, num_experts: int, ep_size: int, node_options: NodeGroupingOptions, layer: int = 0
) -> ExpertPlacement:
    """Hierarchical placement of one layer (module docstring).

    Args:
        experts_Tk: int [T, k], the logical experts each token selected at this layer.
        num_experts: E.   ep_size: P.
        node_options: G, router groups, and the grouping options of both levels.
        layer: for seeding and messages.
    """
    nodes = node_options.check(num_experts, ep_size)
    g, opts = node_options.gpus_per_node, node_options.options
    ex = np.asarray(experts_Tk).astype(np.int64)
    loads = np.bincount(ex.ravel(), minlength=num_experts)
    # Step 1: experts -> nodes.
    if nodes == 1:
        node_of = np.zeros(num_experts, dtype=np.int64)
    elif node_options.keep_groups:
        size = num_experts // node_options.router_groups
        group_loads = loads.reshape(node_options.router_groups, size).sum(axis=1)
        group_node = _pairwise_partition(_pairs(ex // size, node_options.router_groups),
                                         node_options.router_groups, nodes, opts, layer, group_loads)
        node_of = group_node[np.arange(num_experts) // size]
    else:
        node_of = group_layer(ex, num_experts=num_experts, ep_size=nodes, options=opts, layer=layer).rank_of_logical()
    # Step 2: inside each node, its experts -> its G ranks.
    rank_of = np.empty(num_experts, dtype=np.int64)
    for node in range(nodes):
        members = np.nonzero(node_of == node)[0]  # ascending: local id i is expert members[i]
        local = np.full(num_experts, -1, dtype=np.int64)
        local[members] = np.arange(members.shape[0])
        local_rank = _pairwise_partition(_pairs(local[ex], members.shape[0]), members.shape[0], g, opts, layer,
                                         loads[members])
        rank_of[members] = node * g + local_rank
    groups = [np.nonzero(rank_of == r)[0].tolist() for r in range(ep_size)]
    return ExpertPlacement.from_rank_groups(groups)


def group_experts_by_nodes(
    trace: RoutingTrace, *, ep_size: int, node_options: NodeGroupingOptions, progress: bool = False
) -> list[ExpertPlacement]:
    """One hierarchical placement per MoE layer of ``trace``; a line per layer on stderr with
    ``progress``."""
    out = []
    t0 = time.perf_counter()
    for layer in range(trace.num_layers):
        out.append(group_layer_by_nodes(trace.experts[:, layer], num_experts=trace.num_experts, ep_size=ep_size,
                                        node_options=node_options, layer=layer))
        if progress:
            print(f"[group] nodes x{node_options.gpus_per_node}: layer {layer + 1}/{trace.num_layers} done "
                  f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return out
