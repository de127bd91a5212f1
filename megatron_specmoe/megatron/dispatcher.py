"""``SpecMoETokenDispatcher``: Megatron's all-to-all dispatcher, routed by an expert placement,
with exact accounting of what it sends.

Notation (as Megatron's token_dispatcher.py)
    H: hidden size.   T: tokens on this rank (S/TP * B).   E: routed experts.   k: top-k.
    EP / P: expert-parallel size.   n: experts per EP rank (num_local_experts).

Placement. The router emits *logical* experts. A placement (``schedule.placement``) says which
*physical* slot, and so which EP rank, hosts each logical expert. The dispatcher permutes the
columns of ``routing_map`` and ``probs`` from logical to physical order before Megatron's own
permute / all-to-all: physical slot p then receives the tokens of logical expert
``physical_to_logical[p]``. The expert weights in slot p must be that expert's (the
weight mover arranges that). With the contiguous placement nothing is permuted.

Lossless. Only the column order changes; every (token, expert) pair is still sent to the rank that
computes it, with its own probability, and combined back into its own row. Tokens whose experts are
local (because the token shuffle put them there) never leave the rank: Megatron's all-to-all sends
a zero-length chunk to itself by construction.

Replicas (``schedule/replicas.py``). A layer with R redundant experts is built with
``num_moe_experts = E + R`` physical slots (SequentialMLP then holds s = (E + R) / P local experts
per rank, this dispatcher E + R columns) and a router built with E experts (``megatron/replicas.py``),
so the router still emits E *logical* columns. ``set_replicas`` gives the dispatcher the plan's
``ReplicatedPlacement``; ``dispatch_preprocess`` then scatters logical column e to physical column
``route_table[e, ep_rank]``: the copy on this rank if there is one, else the plan's chosen copy.
Every token on this rank is at home here, so the table row is fixed per rank: one static
``index_copy`` per tensor (no host sync, deterministic; static shapes, so capturable by
construction, though not yet run under a CUDA graph).

Padded decode (drop-and-pad). Megatron's CUDA-graph decode (core 0.19's
``moe_pad_experts_for_cuda_graph_inference``) switches every dispatcher to drop-and-pad at run time
(``megatron.core.inference.utils.set_decode_expert_padding``: ``drop_and_pad = True`` and a
capacity factor of E / k): every physical slot then receives exactly ``capacity`` rows from every
rank, the all-to-all splits are equal and nothing is read on the host (no ``cuda_sync_point``), so
dispatch + combine are capturable. This dispatcher keeps that mode with its own column mapping:
``preprocess`` sizes the capacity on the router's *logical* experts (with replicas the layer has
E + R physical columns, the router E; Megatron's own formula on E + R would give each slot fewer
rows than a logical expert may select, and drop them) and never above T, the most rows one rank
can send one expert (each token picks an expert once; Megatron's permute fails above T). With the
decode capacity factor E / k the capacity is exactly T: nothing is dropped, and every slot without
real pairs (the replicas this rank does not route to) is filled with zero-probability rows, as
Megatron pads. The recorder, in that mode, counts the routing map it permutes; the wire carries
``capacity`` rows per slot whatever the map says (``DispatchRecord`` is about real pairs).

Six-phase contract. ``dispatch_preprocess`` permutes columns and records (no communication);
``preprocess`` is Megatron's except for the drop-and-pad capacity above and the count exchange
(below); ``token_dispatch`` sends the probs with the tokens (below); the other phases are
Megatron's, unchanged. Under CUDA-graph capture the recorder is refused (a record is Python work
that a replay would not repeat).

Probs ride with the tokens (``fuse_probs``). Megatron's ``token_dispatch`` runs two all-to-alls
with the same splits: the permuted tokens [N, H], then their probs [N]. Here the probs' bits ride
in w extra columns of the tokens' dtype (``comm.payload``; w = 2 for float32 probs with bf16
tokens), so dispatch issues one all-to-all: the count exchange, this one, and combine's make three
collectives per MoE layer instead of four. The values that arrive are Megatron's bit for bit. Cost:
one copy of the N x H permuted tokens into the packed send buffer, and, where the next phase
needs contiguous tokens, one of the M x H received ones, against one collective's fixed cost. The
send buffer is reused (``comm.workspace``): the all-to-all has read it when it returns. Every EP
rank must decide the same way (one all-to-all against two would mismatch), so the decision reads
only what all ranks share: ``"auto"`` fuses on the CPU (gloo: each collective is a rendezvous of
the ranks) and in drop-and-pad mode (padded CUDA-graph decode: small, static messages), and leaves
other CUDA steps to Megatron's two calls (a prefill's N x H copy can cost more than an NCCL
all-to-all's ~10 us fixed cost); ``"on"`` always fuses, ``"off"`` never. Never fused, whatever the
mode: EP = 1 (no all-to-all), shared experts overlapped with dispatch (Megatron 0.19 launches their
fc1 between the two calls), probs whose bytes do not fill whole token columns, and a forward that
builds an autograd graph (bits carry no gradient; the package serves inference).

Count exchange (``count_exchange``). A dropless dispatch must learn, before its all-to-all, how
many rows every rank will send it. Megatron all-gathers every rank's [E] counts over the tp_ep
group and keeps the n columns of this rank's experts; ``"alltoall"`` (the default) sends each rank
only those n counts (``comm.counts``): the same values bit for bit, EP times fewer bytes, and one
round of messages instead of a ring's EP * TP - 1 (on gloo each round is a rendezvous of the
ranks). ``"allgather"`` keeps Megatron's call. Like ``fuse_probs`` this is a dispatcher
improvement, not s-TS: Megatron's dispatcher could do the same.

Accounting. When ``recorder`` is set, ``dispatch_preprocess`` appends a ``DispatchRecord`` (pairs
and bytes this rank sends to each rank, route measures) per forward, counted on the routing map
Megatron actually permutes and sends (after its padding for quantization, if any). When it is ``None`` the only
cost is one attribute test. A recorder made with ``gpus_per_node`` also counts, per record, the
remote nodes and remote-node pairs of the rank's tokens (``measure/nodes.py``).
"""

from __future__ import annotations

import math
from typing import Literal, Optional, get_args

import torch
from megatron.core.tensor_parallel.mappings import all_to_all
from megatron.core.transformer.moe.moe_utils import get_capacity
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

from megatron_specmoe.comm.counts import exchange_expert_counts
from megatron_specmoe.comm.payload import append_value_columns, split_value_columns, value_columns
from megatron_specmoe.comm.workspace import Workspace
from megatron_specmoe.measure.accounting import DispatchRecord
from megatron_specmoe.measure.measures import WireFormat, measure_routes
from megatron_specmoe.measure.nodes import check_gpus_per_node, measure_nodes
from megatron_specmoe.schedule.placement import ExpertPlacement
from megatron_specmoe.schedule.replicas import ReplicatedPlacement

__all__ = ["CountExchange", "FuseProbs", "SpecMoETokenDispatcher", "DispatchRecorder", "record_from_routing_map"]

FuseProbs = Literal["auto", "on", "off"]  # SpecMoETokenDispatcher.set_fuse_probs (module docstring)
CountExchange = Literal["alltoall", "allgather"]  # SpecMoETokenDispatcher.set_count_exchange


class DispatchRecorder:
    """Collects ``DispatchRecord``s from every dispatcher it is attached to (this rank only).

    Attach with ``megatron.model_tools.attach_recorder(model, recorder)``; gather all ranks' records
    with ``comm.stats.gather_reports``.

    Args:
        gpus_per_node: EP ranks per node (rank r on node r // G); when given, every record also
            carries node measures. None: unknown, no node measures.
    """

    def __init__(self, *, gpus_per_node: Optional[int] = None) -> None:
        if gpus_per_node is not None and (isinstance(gpus_per_node, bool) or not isinstance(gpus_per_node, int)
                                          or gpus_per_node < 1):
            raise ValueError(f"DispatchRecorder: gpus_per_node must be a positive integer, got {gpus_per_node!r}")
        self.gpus_per_node = gpus_per_node
        self.records: list[DispatchRecord] = []

    def add(self, record: DispatchRecord) -> None:
        self.records.append(record)

    def clear(self) -> None:
        self.records.clear()


class SpecMoETokenDispatcher(MoEAlltoAllTokenDispatcher):
    """All-to-all dispatcher that routes by an ``ExpertPlacement`` and can record its traffic.

    Build it like Megatron's ``MoEAlltoAllTokenDispatcher`` (same arguments), or convert one
    that Megatron built with ``adopt``. Extra state:

    Attributes:
        placement: the layer's ``ExpertPlacement`` (contiguous by default).
        recorder: a ``DispatchRecorder`` or ``None`` (recording off).
        layer_number: Megatron's layer number, for records (set by the layer that owns it).
        fuse_probs: ``FuseProbs`` mode (``set_fuse_probs``; default ``"auto"``).
        fused_dispatches: all-to-alls that carried the probs with the tokens (a count, for tests
            and benchmarks).
        count_exchange: ``CountExchange`` (``set_count_exchange``; default ``"alltoall"``).
    """

    def __init__(self, *args, placement: Optional[ExpertPlacement] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_specmoe(placement)

    @classmethod
    def adopt(
        cls, dispatcher: MoEAlltoAllTokenDispatcher, placement: Optional[ExpertPlacement] = None
    ) -> "SpecMoETokenDispatcher":
        """A ``SpecMoETokenDispatcher`` with the exact state of an existing alltoall dispatcher.

        Used by the install hook: Megatron builds its own dispatcher with every version-specific
        detail (process groups, CUDA-graph attributes, streams), and we take it over unchanged.
        """
        if type(dispatcher) is not MoEAlltoAllTokenDispatcher:
            raise TypeError(
                "SpecMoETokenDispatcher.adopt expects a MoEAlltoAllTokenDispatcher, got "
                f"{type(dispatcher).__name__}"
            )
        new = cls.__new__(cls)
        new.__dict__.update(dispatcher.__dict__)
        new._init_specmoe(placement)
        return new

    def _init_specmoe(self, placement: Optional[ExpertPlacement]) -> None:
        self.recorder: Optional[DispatchRecorder] = None
        self.layer_number = 0
        self._ep_rank = self.ep_group.rank() if self.ep_group is not None else 0
        self.replicas: Optional[ReplicatedPlacement] = None
        self._replica_slots: Optional[torch.Tensor] = None
        self.fuse_probs: FuseProbs = "auto"
        self.fused_dispatches = 0
        self.count_exchange: CountExchange = "alltoall"
        self._workspace = Workspace()  # the packed send buffer, reused (comm.workspace)
        self.set_placement(placement)

    def set_fuse_probs(self, mode: FuseProbs) -> None:
        """Send the probs in the tokens' all-to-all: ``"auto"``, ``"on"`` or ``"off"`` (module
        docstring, Probs ride with the tokens). Set it alike on every rank."""
        if mode not in get_args(FuseProbs):
            raise ValueError(f"SpecMoETokenDispatcher.set_fuse_probs: mode must be one of "
                             f"{list(get_args(FuseProbs))}, got {mode!r}")
        self.fuse_probs = mode

    def set_count_exchange(self, mode: CountExchange) -> None:
        """How the dropless dispatch learns its receive sizes (module docstring, Count exchange):
        ``"alltoall"`` (each rank gets the counts for its own experts) or ``"allgather"``
        (Megatron's: every rank gets all counts). Same values either way; set it alike on every rank."""
        if mode not in get_args(CountExchange):
            raise ValueError(f"SpecMoETokenDispatcher.set_count_exchange: mode must be one of "
                             f"{list(get_args(CountExchange))}, got {mode!r}")
        self.count_exchange = mode

    # ---- placement -------------------------------------------------------------------------------
    def set_placement(self, placement: Optional[ExpertPlacement]) -> None:
        """Route by ``placement`` from the next forward on (``None``: contiguous).

        Raises:
            ValueError: the placement does not match ``num_moe_experts`` or the EP size.
        """
        if placement is None:
            placement = ExpertPlacement.contiguous(self.num_experts, self.ep_size)
        placement.check_matches(
            num_experts=self.num_experts, ep_size=self.ep_size, where="SpecMoETokenDispatcher"
        )
        self.placement = placement
        # int64 [E]: column p of the physical routing map is logical column _columns[p].
        self._columns = (
            None
            if placement.is_contiguous
            else torch.tensor(placement.physical_to_logical, dtype=torch.long)
        )

    def set_replicas(self, replicas: Optional[ReplicatedPlacement]) -> None:
        """Route logical experts to the physical slots of ``replicas`` from the next forward on
        (module docstring, Replicas); ``None`` turns replicas off. The placement of the E + R
        physical columns becomes contiguous (the replicas' slot order is the physical order).

        Raises:
            ValueError: E + R is not this layer's ``num_moe_experts``, or the EP size differs.
        """
        if replicas is None:
            self.replicas, self._replica_slots = None, None
            return
        physical = replicas.num_experts + replicas.redundant
        if physical != self.num_experts or replicas.ep_size != self.ep_size:
            raise ValueError(
                f"SpecMoETokenDispatcher.set_replicas: the plan has E={replicas.num_experts} experts + "
                f"R={replicas.redundant} replicas on EP {replicas.ep_size}, the layer has "
                f"num_moe_experts={self.num_experts} physical slots on EP {self.ep_size}; build the layer "
                "with megatron.replicas.replicated_config (num_moe_experts = E + R)"
            )
        self.set_placement(None)
        table = torch.as_tensor(replicas.route_table()[:, self._ep_rank], dtype=torch.long)
        self.replicas, self._replica_slots = replicas, table  # int64 [E]: logical e -> physical slot

    def _to_physical(self, routing_map: torch.Tensor, probs: torch.Tensor):
        """bool [T, E] and float [T, E] logical -> [T, E + R] physical (set_replicas)."""
        if self._replica_slots.device != routing_map.device:  # once, on the first forward
            self._replica_slots = self._replica_slots.to(routing_map.device)
        if routing_map.shape[1] != self._replica_slots.numel():
            raise ValueError(
                f"SpecMoETokenDispatcher: the router emitted {routing_map.shape[1]} experts, the replica "
                f"plan has {self._replica_slots.numel()} logical experts; give the layer a router built "
                "with num_moe_experts = E (megatron.replicas.use_logical_router)"
            )
        shape = (routing_map.shape[0], self.num_experts)
        slots = self._replica_slots
        return (routing_map.new_zeros(shape).index_copy(1, slots, routing_map),
                probs.new_zeros(shape).index_copy(1, slots, probs))

    # ---- drop-and-pad (padded decode) ------------------------------------------------------------
    def padded_capacity(self, num_tokens: int) -> int:
        """Rows every physical slot receives from this rank in drop-and-pad mode (module docstring,
        Padded decode): Megatron's ``get_capacity`` on the router's logical experts, at most
        ``num_tokens``. Host arithmetic on shapes only."""
        logical = self.num_experts if self.replicas is None else self.replicas.num_experts
        capacity = get_capacity(num_tokens=num_tokens * self.config.moe_router_topk, num_experts=logical,
                                capacity_factor=self.moe_expert_capacity_factor)
        return min(int(capacity), int(num_tokens))

    def preprocess(self, routing_map: torch.Tensor) -> torch.Tensor:
        """Megatron's preprocess; in drop-and-pad mode with ``padded_capacity`` (static sizes,
        built on the host from shapes: no device data is read).

        Args:
            routing_map: bool [T, E] in physical order.

        Returns:
            int64 [n] tokens per local expert (on the host in drop-and-pad mode, as Megatron's).
        """
        if not self.drop_and_pad:
            if self._exchanges_counts():
                return self._preprocess_exchanged(routing_map)
            return super().preprocess(routing_map)
        self.capacity = self.padded_capacity(routing_map.size(0))
        self.num_out_tokens = self.capacity * self.num_experts
        # [n]: every local slot gets capacity rows from each of the tp * ep ranks.
        per_local = torch.full((self.num_local_experts,), self.capacity * self.tp_size * self.ep_size,
                               dtype=torch.long)
        # [tp * ep * n]: rows each rank sends each local slot.
        self.num_global_tokens_per_local_expert = torch.full(
            (self.num_experts * self.tp_size,), self.capacity, dtype=torch.long, device=self.permute_idx_device)
        return per_local

    def _exchanges_counts(self) -> bool:
        """True: the dropless preprocess exchanges counts by all-to-all. Needs an exchange at all
        (EP or expert-TP > 1) and Megatron's expert layout (this rank's experts are the contiguous
        block ep_rank * n ..); otherwise Megatron's own preprocess runs."""
        if self.count_exchange != "alltoall" or (self.ep_size == 1 and self.tp_size == 1):
            return False
        n, first = self.num_local_experts, self._ep_rank * self.num_local_experts
        return list(self.local_expert_indices) == list(range(first, first + n))

    def _preprocess_exchanged(self, routing_map: torch.Tensor) -> torch.Tensor:
        """Megatron's dropless preprocess (same attributes, same values, same CUDA sync points)
        with ``comm.counts.exchange_expert_counts`` in place of its all-gather of every count.

        Args:
            routing_map: bool [T, E] in physical order.

        Returns:
            int64 [n] rows per local expert, on the routing map's device.
        """
        config = self.config
        counts = routing_map.sum(dim=0).long()  # int64 [E]
        if config.moe_expert_capacity_factor is not None or config.moe_router_padding_for_quantization:
            self.num_out_tokens = counts.sum()  # dynamic: read on the host at Megatron's point
            self._maybe_update_cuda_sync_point("before_permutation_1")
        else:
            self.num_out_tokens = routing_map.size(0) * config.moe_router_topk
        self.input_splits = counts.view(self.ep_size, self.num_local_experts).sum(dim=1)  # [EP]
        per_local = exchange_expert_counts(counts, ep_size=self.ep_size, tp_size=self.tp_size,
                                           group=self.tp_ep_group)  # [TP, EP, n]
        per_rank = per_local.sum(dim=2)  # [TP, EP]
        self.output_splits = per_rank[self.tp_rank]
        self.output_splits_tp = per_rank.sum(dim=1)
        self._maybe_update_cuda_sync_point("before_ep_alltoall")
        if self.num_local_experts > 1:
            self.num_global_tokens_per_local_expert = per_local.view(-1, self.num_local_experts)
            if not config.moe_permute_fusion:
                self._maybe_update_cuda_sync_point("before_permutation_2")
        return per_local.sum(dim=(0, 1))

    # ---- phase 1 ---------------------------------------------------------------------------------
    def dispatch_preprocess(
        self, hidden_states: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor
    ):
        """Permute router columns to physical order, record, then Megatron's preprocess.

        Args:
            hidden_states: [S/TP, B, H] activations (any float dtype).
            routing_map: bool [T, E], logical experts selected per token (E logical experts;
                with replicas the layer has E + R physical columns).
            probs: float [T, E], router probabilities (zero where not selected), logical order.

        Returns:
            (permuted tokens [T*k, H], permuted probs [T*k]) as Megatron's alltoall dispatcher.
        """
        if self._replica_slots is not None:
            routing_map, probs = self._to_physical(routing_map, probs)
        if self._columns is not None:
            if self._columns.device != routing_map.device:  # once, on the first forward
                self._columns = self._columns.to(routing_map.device)
            routing_map = routing_map.index_select(1, self._columns)
            probs = probs.index_select(1, self._columns)
        if self.recorder is not None and routing_map.is_cuda and torch.cuda.is_current_stream_capturing():
            raise ValueError(
                "SpecMoETokenDispatcher: a DispatchRecorder is attached while a CUDA graph is being "
                "captured; its records are Python work that graph replays would not repeat. Detach it "
                "(dispatcher.recorder = None) before capture, or measure without CUDA graphs"
            )
        out = super().dispatch_preprocess(hidden_states, routing_map, probs)
        if self.recorder is not None:
            # After Megatron's preprocess: with moe_router_padding_for_quantization it pads the
            # routing map (self.routing_map) so that every expert gets a multiple of the
            # alignment, and those padded pairs go over the wire too.
            self.recorder.add(self._record(hidden_states, self.routing_map, probs))
        return out

    # ---- phase 2 ---------------------------------------------------------------------------------
    def token_dispatch(self, permutated_local_input_tokens: torch.Tensor, permuted_probs: torch.Tensor):
        """Megatron's dispatch all-to-all, with the probs riding in the tokens' call where
        ``fuse_probs`` allows (module docstring).

        Args:
            permutated_local_input_tokens: [N, H] tokens in expert order (dispatch_preprocess).
            permuted_probs: float [N], their routing probabilities.

        Returns:
            (tokens [M, H], probs float [M]) received from every EP rank, bit for bit Megatron's.
        """
        width = self._fused_width(permutated_local_input_tokens, permuted_probs)
        if width is None:
            return super().token_dispatch(permutated_local_input_tokens, permuted_probs)
        self.tokens_per_expert = self._maybe_dtoh_and_synchronize("before_ep_alltoall", self.tokens_per_expert)
        kwargs = {"use_nccl_stream": self.use_nccl_stream} if hasattr(self, "use_nccl_stream") else {}
        tokens = permutated_local_input_tokens
        send = self._workspace.take("dispatch_send", (tokens.shape[0], tokens.shape[1] + width), tokens.dtype,
                                    tokens.device)
        packed = all_to_all(self.ep_group, append_value_columns(tokens, permuted_probs, out=send),
                            self.output_splits, self.input_splits, **kwargs)
        tokens, probs = split_value_columns(packed, width, permuted_probs.dtype, tuple(permuted_probs.shape[1:]))
        if self.tp_size > 1 or self.num_local_experts == 1 or self.config.moe_permute_fusion:
            # The next consumer (TP all-gather, the experts, TE's fused sort) wants contiguous
            # rows; Megatron's own sort by local expert copies them anyway.
            tokens = tokens.contiguous()
        self.fused_dispatches += 1
        return tokens, probs

    def _fused_width(self, tokens: torch.Tensor, probs: Optional[torch.Tensor]) -> Optional[int]:
        """w, the token columns the probs take in a fused dispatch, or None: Megatron's two calls.
        Reads only what every EP rank shares (mode, device type, dtypes, config), never N."""
        if (self.fuse_probs == "off" or probs is None or self.ep_size == 1 or self.shared_experts is not None
                or tokens.dim() != 2):
            return None
        if torch.is_grad_enabled() and (tokens.requires_grad or probs.requires_grad):
            return None  # bits carry no gradient: training keeps Megatron's two calls
        if self.fuse_probs == "auto" and tokens.is_cuda and not self.drop_and_pad:
            return None
        return value_columns(tokens.dtype, probs.dtype, math.prod(probs.shape[1:]))

    def _record(
        self, hidden_states: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor
    ) -> DispatchRecord:
        """This rank's row of the traffic matrix. ``routing_map`` is in physical order [T, E]."""
        return record_from_routing_map(
            routing_map,
            ep_rank=self._ep_rank,
            ep_size=self.ep_size,
            layer_number=int(self.layer_number or 0),
            wire=WireFormat(
                hidden_size=int(hidden_states.shape[-1]),
                activation_bytes=hidden_states.element_size(),
                prob_bytes=probs.element_size(),
            ),
            gpus_per_node=self.recorder.gpus_per_node,
        )


def record_from_routing_map(
    routing_map: torch.Tensor,
    *,
    ep_rank: int,
    ep_size: int,
    layer_number: int,
    wire: WireFormat,
    gpus_per_node: Optional[int] = None,
) -> DispatchRecord:
    """The record of one rank's dispatch from its physical routing map.

    Args:
        routing_map: bool [T, E] in physical expert order (slot p on rank p // (E / P)); for
            Megatron's own alltoall dispatcher this is its ``routing_map`` after a forward.
        ep_rank, ep_size: this rank and P.
        layer_number: for the record.
        wire: bytes per pair.
        gpus_per_node: G, EP ranks per node (must divide P); None: no node measures.
    """
    tokens, num_experts = routing_map.shape
    hits = routing_map.view(tokens, ep_size, num_experts // ep_size).sum(dim=2)
    home = torch.full((tokens,), ep_rank, dtype=torch.long, device=hits.device)
    measures = measure_routes(hits, home)
    nodes = None
    if gpus_per_node is not None:
        check_gpus_per_node(gpus_per_node, ep_size, where="DispatchRecorder.gpus_per_node")
        nodes = measure_nodes(hits, home, gpus_per_node)
    return DispatchRecord(
        layer_number=layer_number,
        ep_rank=ep_rank,
        ep_size=ep_size,
        pairs_to_rank=measures.load_per_rank,
        wire=wire,
        measures=measures,
        nodes=nodes,
    )
