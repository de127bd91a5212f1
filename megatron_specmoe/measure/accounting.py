"""What a dispatcher actually sent in one forward: the record it keeps when recording is on.

Notation
    P: EP ranks.   src: the rank that holds the tokens (home rank).   dst: the rank of the expert.

A ``DispatchRecord`` is one source rank's view of one MoE layer's forward: its row of the traffic
matrix. ``TrafficReport`` stacks the rows of all ranks (gathered by ``comm.stats``) into the full
P x P matrices. Rows sent to ``dst == src`` never leave the rank: they are counted as local pairs
and contribute no bytes on the wire.

Nodes. When the recorder knows the GPUs per node G (EP rank r on node r // G), a record also holds
the ``nodes.NodeMeasures`` of its tokens: remote-node pairs and remote nodes, from which the
inter-node bytes of the per-node and per-pair transports follow (``measure/nodes.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from typing import Optional

from megatron_specmoe.measure.measures import RouteMeasures, WireFormat
from megatron_specmoe.measure.nodes import NodeMeasures, Transport

__all__ = ["DispatchRecord", "TrafficReport"]


@dataclass(frozen=True, kw_only=True)
class DispatchRecord:
    """One source rank, one MoE layer, one forward.

    Attributes:
        layer_number: Megatron's 1-based layer number (0 when unknown).
        ep_rank: this (source) rank in the EP group.
        ep_size: P.
        pairs_to_rank: length P; (token, expert) pairs sent to each destination (its own rank
            included, as Megatron's ``input_splits``).
        wire: bytes per pair on the dispatch and combine paths.
        measures: the route measures of this rank's tokens (home rank = ``ep_rank``).
        nodes: the node measures of this rank's tokens (None when G is unknown).
    """

    layer_number: int
    ep_rank: int
    ep_size: int
    pairs_to_rank: tuple[int, ...]
    wire: WireFormat
    measures: RouteMeasures
    nodes: Optional[NodeMeasures] = None

    @property
    def pairs_to_node(self) -> Optional[tuple[int, ...]]:
        """Pairs sent to each node (its own included); None when G is unknown."""
        if self.nodes is None:
            return None
        g = self.nodes.gpus_per_node
        return tuple(sum(self.pairs_to_rank[n * g : (n + 1) * g]) for n in range(self.nodes.num_nodes))

    def internode_bytes(self, transport: Transport) -> Optional[int]:
        """Dispatch plus combine bytes of this rank's tokens that cross nodes; None when G is unknown."""
        return None if self.nodes is None else self.nodes.internode_bytes(self.wire, transport)

    @property
    def remote_pairs(self) -> int:
        return sum(p for r, p in enumerate(self.pairs_to_rank) if r != self.ep_rank)

    @property
    def dispatch_bytes_to_rank(self) -> tuple[int, ...]:
        """Bytes this rank puts on the wire towards each rank (0 for itself)."""
        per = self.wire.dispatch_bytes_per_pair
        return tuple(0 if r == self.ep_rank else p * per for r, p in enumerate(self.pairs_to_rank))

    @property
    def combine_bytes_from_rank(self) -> tuple[int, ...]:
        """Bytes each rank sends back to this one on combine (0 for itself)."""
        per = self.wire.combine_bytes_per_pair
        return tuple(0 if r == self.ep_rank else p * per for r, p in enumerate(self.pairs_to_rank))


@dataclass(frozen=True, kw_only=True)
class TrafficReport:
    """All ranks' records of one layer and one forward, as matrices.

    Attributes:
        layer_number: Megatron's layer number.
        pairs: P x P nested tuple; ``pairs[src][dst]``.
        dispatch_bytes: P x P; bytes on the wire from src to dst on dispatch (diagonal 0).
        combine_bytes: P x P; bytes on the wire from dst back to src on combine, indexed
            ``[src][dst]`` like ``pairs`` (diagonal 0).
        measures: all ranks' measures added.
        nodes: all ranks' node measures added (None when the records carry none).
        wire: the records' bytes per pair (all ranks share it).
    """

    layer_number: int
    pairs: tuple[tuple[int, ...], ...]
    dispatch_bytes: tuple[tuple[int, ...], ...]
    combine_bytes: tuple[tuple[int, ...], ...]
    measures: RouteMeasures
    nodes: Optional[NodeMeasures] = None
    wire: Optional[WireFormat] = None

    @classmethod
    def from_records(cls, records: Sequence[DispatchRecord]) -> "TrafficReport":
        """Stack one record per EP rank (any order) into matrices."""
        if not records:
            raise ValueError("TrafficReport.from_records: no records given")
        size = records[0].ep_size
        by_rank = {r.ep_rank: r for r in records}
        if sorted(by_rank) != list(range(size)) or len(records) != size:
            raise ValueError(
                "TrafficReport.from_records: need exactly one record per EP rank 0.."
                f"{size - 1}, got ranks {sorted(r.ep_rank for r in records)}"
            )
        layers = {r.layer_number for r in records}
        if len(layers) != 1:
            raise ValueError(f"TrafficReport.from_records: records mix layers {sorted(layers)}")
        rows = [by_rank[r] for r in range(size)]
        measures = rows[0].measures
        for row in rows[1:]:
            measures = measures + row.measures
        with_nodes = {row.nodes is not None for row in rows}
        if len(with_nodes) != 1:
            raise ValueError("TrafficReport.from_records: some records carry node measures and some "
                             "do not; give every rank's recorder the same gpus_per_node")
        nodes = None
        if with_nodes.pop():
            nodes = rows[0].nodes
            for row in rows[1:]:
                nodes = nodes + row.nodes
        return cls(
            layer_number=layers.pop(),
            pairs=tuple(row.pairs_to_rank for row in rows),
            dispatch_bytes=tuple(row.dispatch_bytes_to_rank for row in rows),
            combine_bytes=tuple(row.combine_bytes_from_rank for row in rows),
            measures=measures,
            nodes=nodes,
            wire=rows[0].wire,
        )

    def internode_bytes(self, transport: Transport) -> Optional[int]:
        """Dispatch plus combine bytes that crossed nodes; None without node measures."""
        if self.nodes is None or self.wire is None:
            return None
        return self.nodes.internode_bytes(self.wire, transport)

    @property
    def bytes_on_wire(self) -> int:
        """Dispatch plus combine bytes that left their rank."""
        return sum(map(sum, self.dispatch_bytes)) + sum(map(sum, self.combine_bytes))
