"""Trace-level evaluation of speculative token shuffling (s-TS), as docs/method.md "Measures" defines it.

Notation
    T: tokens in the trace.   B: batch size (tokens per shuffle domain), 512 unless stated.
    L: MoE layers.   k: top-k.   E: experts.   P: EP ranks (= ranks of the shuffle domain).

What is simulated. The trace is cut into batches of B consecutive tokens (trace order; the last
batch may be shorter and is padded as ``assignment`` documents). For every batch and every MoE
layer l, four sides place the batch's tokens and count where their true experts live:

    baseline        contiguous shards of B/P tokens, contiguous expert placement (expert e on rank
                    e // (E/P)): Megatron's sequence-parallel layout.
    placement_only  contiguous shards, the plan's expert placement for layer l (s-EG alone).
    specmoe         the plan's placement, and tokens placed by ``assignment.assign(method)`` from
                    the predictor's rank scores (``predict.base.rank_scores``).
    oracle          the plan's placement, tokens placed by the same method from the *true* hits:
                    perfect prediction under balance, the ceiling of s-TS for that placement.

The predictor sees, for layer l, ``RouteContext(layer=l, token_ids, history=experts[:, :l])``: the
trace's true experts at layers < l, as the runtime carries them with the hidden states. Predictions
are per token, so the predictor is called once per layer for the whole trace and the scores are cut
into batches afterwards.

Every count comes from ``measures.rank_hits`` and ``measures.measure_routes``, the functions the
dispatcher's accounting uses, so the numbers agree with it by construction.

Replicas (``schedule/replicas.py``): given one ``ReplicatedPlacement`` per layer, two more sides,
``specmoe_replicas`` and ``oracle_replicas``: the same assignment from scores of ranks holding any
copy of an expert (``replica_routes``), each pair counted on the rank the route table sends it to.
``oracle`` (the base placement, no replicas) is the ceiling they are compared with.

Request placement (DP attention, TP = 1): given every token's request home (``request_home``, from
``schedule.request_placement.trace_request_homes``), the side ``requests`` measures the plan's
placement with tokens where their request was placed (no token shuffle).

Node measures (``measure/nodes.py``): with ``gpus_per_node`` G, every side also counts remote nodes
and remote-node pairs per token (EP rank r on node r // G), the most nodes any token's experts span
(``max_nodes_per_token``, the bound of group-limited routing), and with a ``WireFormat`` the
inter-node bytes per token of the per-node de-duplicating and the per-pair transports.

Prediction metrics (per token, summed over tokens and layers, then divided): the predicted set is
the top-k experts by score (``predict.base.top_experts``), the true set the token's distinct
experts at that layer. precision = |pred & true| / |pred|, recall = |pred & true| / |true|,
F1 = their harmonic mean; rank accuracy = share of tokens whose predicted home rank (the rank with
the highest rank score under the plan's placement, before balancing) hosts at least one of the
token's experts.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from megatron_specmoe.schedule.assignment import AssignmentMethod, assign
from megatron_specmoe.measure.measures import RouteMeasures, WireFormat, measure_routes, rank_hits
from megatron_specmoe.measure.nodes import NodeMeasures, check_gpus_per_node, measure_nodes
from megatron_specmoe.measure.replica_routes import replica_hits, replica_rank_scores, routed_rank_hits
from megatron_specmoe.schedule.placement import ExpertPlacement
from megatron_specmoe.predict.base import (
    RouteContext,
    RoutePredictor,
    predicted_ranks,
    rank_scores,
    top_experts,
)
from megatron_specmoe.artifacts.traces import RoutingTrace

__all__ = ["PredictionCounts", "SideResult", "Evaluation", "evaluate_trace", "SIDES", "REPLICA_SIDES"]

SIDES = ("baseline", "placement_only", "specmoe", "oracle")
REPLICA_SIDES = ("specmoe_replicas", "oracle_replicas")


@dataclass(frozen=True, kw_only=True)
class PredictionCounts:
    """Counts behind the prediction metrics; add two to merge layers or batches.

    Attributes:
        tokens: token-layer predictions counted.
        predicted: sum of |predicted set| (k per token).
        true: sum of |true set| (distinct experts the router chose).
        overlap: sum of |predicted set & true set|.
        rank_hits: tokens whose predicted home rank hosts at least one of their true experts.
    """

    tokens: int = 0
    predicted: int = 0
    true: int = 0
    overlap: int = 0
    rank_hits: int = 0

    @property
    def precision(self) -> float:
        return self.overlap / self.predicted if self.predicted else 0.0

    @property
    def recall(self) -> float:
        return self.overlap / self.true if self.true else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    @property
    def rank_accuracy(self) -> float:
        return self.rank_hits / self.tokens if self.tokens else 0.0

    def __add__(self, other: "PredictionCounts") -> "PredictionCounts":
        return PredictionCounts(
            tokens=self.tokens + other.tokens,
            predicted=self.predicted + other.predicted,
            true=self.true + other.true,
            overlap=self.overlap + other.overlap,
            rank_hits=self.rank_hits + other.rank_hits,
        )

    def summary(self) -> dict:
        return {
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "rank_accuracy": self.rank_accuracy,
        }


@dataclass(frozen=True, kw_only=True)
class SideResult:
    """The measures of one side (baseline, specmoe, ...), over all layers and per layer.

    Attributes:
        total: RouteMeasures summed over every batch and layer.
        per_layer: one RouteMeasures per MoE layer (length L), summed over batches.
        nodes: NodeMeasures over every batch and layer (None without ``gpus_per_node``).
        nodes_per_layer: one NodeMeasures per layer (empty without ``gpus_per_node``).
        wire: bytes per pair for the inter-node bytes (None: bytes not reported).
    """

    total: RouteMeasures
    per_layer: tuple[RouteMeasures, ...]
    nodes: Optional[NodeMeasures] = None
    nodes_per_layer: tuple[NodeMeasures, ...] = ()
    wire: Optional[WireFormat] = None

    @property
    def local_activation_rate(self) -> float:
        return self.total.local_activation_rate

    @property
    def remote_pairs_per_token(self) -> float:
        """Per token and layer (each layer's dispatch is one all-to-all)."""
        return self.total.remote_pairs_per_token

    @property
    def remote_ranks_per_token(self) -> float:
        return self.total.remote_ranks_per_token

    @property
    def load_imbalance(self) -> float:
        """Of the per-rank load summed over batches and layers (see ``per_layer_load_imbalance``)."""
        return self.total.load_imbalance

    def summary(self) -> dict:
        keys = ("local_activation_rate", "remote_pairs_per_token", "remote_ranks_per_token",
                "load_imbalance")
        out = {key: getattr(self, key) for key in keys}
        out["per_layer"] = {key: [getattr(m, key) for m in self.per_layer] for key in keys}
        if self.nodes is not None:
            out["remote_nodes_per_token"] = self.nodes.remote_nodes_per_token
            out["remote_node_pairs_per_token"] = self.nodes.remote_node_pairs_per_token
            out["max_nodes_per_token"] = self.nodes.max_nodes
            out["internode_bytes_per_token"] = (
                None if self.wire is None else self.nodes.internode_bytes_per_token(self.wire))
            out["per_layer"]["remote_nodes_per_token"] = [
                m.remote_nodes_per_token for m in self.nodes_per_layer]
        return out


@dataclass(frozen=True, kw_only=True)
class Evaluation:
    """Result of ``evaluate_trace``.

    Attributes:
        baseline, placement_only, specmoe, oracle: SideResult of each side (module docstring).
        prediction: PredictionCounts over every layer.
        prediction_per_layer: one PredictionCounts per layer.
        batch_size: B.   method: the assignment method.   num_ranks: P.
        num_tokens: T.   num_batches: ceil(T / B).   predictor_kind: ``predictor.kind``.
        seconds: wall time of the evaluation.
        gpus_per_node: G of the node measures (None: not measured).   wire: their bytes per pair.
    """

    baseline: SideResult
    placement_only: SideResult
    specmoe: SideResult
    oracle: SideResult
    prediction: PredictionCounts
    prediction_per_layer: tuple[PredictionCounts, ...]
    batch_size: int
    method: str
    num_ranks: int
    num_tokens: int
    num_batches: int
    predictor_kind: str
    seconds: float
    gpus_per_node: Optional[int] = None
    wire: Optional[WireFormat] = None
    replicas: Optional[dict] = None  # side name -> SideResult, for REPLICA_SIDES; None without
    redundant_experts: int = 0
    requests: Optional[SideResult] = None  # the "requests" side; None without request homes

    def to_json(self) -> dict:
        """JSON-ready dict: each side's measures; ``prediction`` at the top and inside ``specmoe``
        (the baseline predicts nothing: its ``prediction`` is null). Per-token measures are per
        token and MoE layer (each layer dispatches once)."""
        pred = self.prediction.summary()
        pred["per_layer"] = {key: [getattr(c, key) for c in self.prediction_per_layer]
                             for key in ("precision", "recall", "f1", "rank_accuracy")}
        out = {
            "config": {
                "batch_size": self.batch_size,
                "assignment": self.method,
                "ep_size": self.num_ranks,
                "tokens": self.num_tokens,
                "batches": self.num_batches,
                "layers": len(self.baseline.per_layer),
                "predictor": self.predictor_kind,
                "seconds": round(self.seconds, 3),
                "per_token_means": "per token and MoE layer",
                "gpus_per_node": self.gpus_per_node,
                "hidden_size": None if self.wire is None else self.wire.hidden_size,
                "activation_bytes": None if self.wire is None else self.wire.activation_bytes,
                "internode_transports": "per_node: one row per (token, remote node) each way + one "
                                        "prob per remote-node pair; per_pair: one row per remote-node "
                                        "pair each way + its prob",
            },
        }
        for side in SIDES:
            out[side] = getattr(self, side).summary()
        out["config"]["redundant_experts"] = self.redundant_experts
        if self.requests is not None:
            out["requests"] = self.requests.summary()
        if self.replicas is not None:
            for side in REPLICA_SIDES:
                out[side] = self.replicas[side].summary()
        out["baseline"]["prediction"] = None
        out["specmoe"]["prediction"] = pred
        out["prediction"] = pred
        return out


def _prediction_counts(
    scores: np.ndarray, true: np.ndarray, hits: torch.Tensor, placement: ExpertPlacement, k: int
) -> PredictionCounts:
    """Counts for one layer: scores float32 [T, E], true int [T, k], hits int64 [T, P]."""
    t, e = scores.shape
    pred = top_experts(scores, k)
    pred_mask = np.zeros((t, e), dtype=bool)
    np.put_along_axis(pred_mask, pred, True, axis=1)
    true_mask = np.zeros((t, e), dtype=bool)
    np.put_along_axis(true_mask, true.astype(np.int64), True, axis=1)
    home = torch.from_numpy(predicted_ranks(scores, placement)).view(-1, 1)
    return PredictionCounts(
        tokens=t,
        predicted=int(pred_mask.sum()),
        true=int(true_mask.sum()),
        overlap=int((pred_mask & true_mask).sum()),
        rank_hits=int((hits.gather(1, home) > 0).sum()),
    )


def evaluate_trace(
    trace: RoutingTrace,
    predictor: RoutePredictor,
    placements: Sequence[ExpertPlacement],
    *,
    batch_size: int = 512,
    method: AssignmentMethod = "refine",
    progress: bool = False,
    progress_every_s: float = 5.0,
    gpus_per_node: Optional[int] = None,
    wire: Optional[WireFormat] = None,
    replicas: Optional[Sequence] = None,
    request_home: Optional[np.ndarray] = None,
) -> Evaluation:
    """Simulate s-TS on ``trace`` (see the module docstring).

    Args:
        trace: the routes; ``experts`` int32 [T, L, k] (deduplicate first if it repeats prompts).
        predictor: a fitted RoutePredictor for the trace's L layers and E experts.
        placements: one ExpertPlacement per layer (length L): the plan's expert placement.
        batch_size: B, tokens per shuffle domain.
        method: the balanced assignment method (``assignment.AssignmentMethod``); default the
            runtime's, "refine". Pass "optimal" for the exact ceiling of the oracle side.
        progress: print one line per layer to stderr, and one every ``progress_every_s``
            seconds within a layer (small batches: --batch 1 makes T batches per layer).
        gpus_per_node: G; when given (it must divide P), every side also gets node measures.
        wire: bytes per pair, for the inter-node bytes (needs ``gpus_per_node``).
        replicas: one ``schedule.replicas.ReplicatedPlacement`` per layer whose base is that
            layer's placement; adds the sides ``REPLICA_SIDES``.
        request_home: int [T], each token's DP rank under request placement; adds ``requests``.

    Returns:
        Evaluation.
    """
    num_layers, k, num_experts = trace.num_layers, trace.topk, trace.num_experts
    if len(placements) != num_layers:
        raise ValueError(
            f"evaluate_trace: {len(placements)} placements for a trace with L={num_layers} MoE "
            f"layers ({trace.source}); give one ExpertPlacement per layer"
        )
    ep_size = placements[0].ep_size
    for layer, pl in enumerate(placements):
        pl.check_matches(num_experts=num_experts, ep_size=ep_size,
                         where=f"evaluate_trace: placements[{layer}] for trace {trace.source}")
    if (predictor.num_layers, predictor.num_experts) != (num_layers, num_experts):
        raise ValueError(
            f"evaluate_trace: predictor {predictor.kind!r} was fitted for L={predictor.num_layers}, "
            f"E={predictor.num_experts} but trace {trace.source} has L={num_layers}, "
            f"E={num_experts}; fit the predictor on traces of this model"
        )
    if batch_size < 1:
        raise ValueError(f"evaluate_trace: batch_size must be >= 1, got {batch_size}")
    if trace.num_tokens == 0:
        raise ValueError(f"evaluate_trace: trace {trace.source} has no tokens")
    if replicas is not None:
        if len(replicas) != num_layers:
            raise ValueError(f"evaluate_trace: {len(replicas)} replicated placements for L={num_layers} layers")
        for layer, (rp, pl) in enumerate(zip(replicas, placements)):
            if rp.base != pl:
                raise ValueError(f"evaluate_trace: replicas[{layer}] is built on another base placement "
                                 f"than placements[{layer}]")
    if request_home is not None:
        request_home = np.asarray(request_home)
        if request_home.shape != (trace.num_tokens,) or request_home.min() < 0 or request_home.max() >= ep_size:
            raise ValueError(f"evaluate_trace: request_home must be int [T]=({trace.num_tokens},) in 0..{ep_size - 1}")
        request_home_t = torch.from_numpy(request_home.astype(np.int64))
    if gpus_per_node is not None:
        check_gpus_per_node(gpus_per_node, ep_size, where="evaluate_trace: gpus_per_node")
    elif wire is not None:
        raise ValueError("evaluate_trace: wire gives inter-node bytes and needs gpus_per_node")

    start = time.perf_counter()
    tokens = trace.num_tokens
    bounds = [(b, min(b + batch_size, tokens)) for b in range(0, tokens, batch_size)]
    contiguous_home = {n: assign(np.zeros((n, ep_size), np.float32), "contiguous").home_rank
                       for n in {hi - lo for lo, hi in bounds}}
    contiguous_rank = torch.from_numpy(ExpertPlacement.contiguous(num_experts, ep_size).rank_of_logical())
    experts = torch.from_numpy(trace.experts.astype(np.int64))
    all_sides = SIDES + (REPLICA_SIDES if replicas is not None else ()) + (
        ("requests",) if request_home is not None else ())
    sides = {side: [RouteMeasures.empty(ep_size) for _ in range(num_layers)] for side in all_sides}
    if progress:
        print(f"[evaluate] {tokens} tokens in {len(bounds)} batch(es) of {batch_size} x "
              f"{num_layers} layers, assignment {method}", file=sys.stderr, flush=True)
    last_note = time.perf_counter()
    nodes = {side: [NodeMeasures.empty(gpus_per_node=gpus_per_node, num_nodes=ep_size // gpus_per_node)
                    for _ in range(num_layers)] for side in all_sides} if gpus_per_node else None

    def count(side: str, layer: int, hits: torch.Tensor, home: torch.Tensor) -> None:
        sides[side][layer] += measure_routes(hits, home)
        if nodes is not None:
            nodes[side][layer] += measure_nodes(hits, home, gpus_per_node)
    prediction: list[PredictionCounts] = []
    for layer in range(num_layers):
        # Step 1: the predictor's scores for every token at this layer (per-token, so one call).
        ctx = RouteContext(layer=layer, token_ids=trace.token_ids, history=trace.experts[:, :layer])
        scores = np.asarray(predictor.expert_scores(ctx), dtype=np.float32)
        if scores.shape != (tokens, num_experts):
            raise ValueError(
                f"evaluate_trace: predictor {predictor.kind!r} returned scores of shape "
                f"{scores.shape} at layer {layer}; expected [T, E]=({tokens}, {num_experts})"
            )
        placement = placements[layer]
        rank_of = torch.from_numpy(placement.rank_of_logical())
        hits_plan = rank_hits(rank_of[experts[:, layer]], ep_size)  # int64 [T, P]
        hits_base = rank_hits(contiguous_rank[experts[:, layer]], ep_size)
        predicted = torch.from_numpy(rank_scores(scores, placement))  # float32 [T, P]
        prediction.append(_prediction_counts(scores, trace.experts[:, layer], hits_plan, placement, k))
        if replicas is not None:
            rep = replicas[layer]
            mask_np = rep.rank_mask()
            mask = torch.from_numpy(mask_np)
            table = torch.from_numpy(rep.route_table())
            slots = rep.slots_per_rank
            pred_rep = torch.from_numpy(replica_rank_scores(scores, mask_np))
        # Step 2: per batch, place the tokens on each side and count.
        acc = sides
        for b, (lo, hi) in enumerate(bounds):
            if progress and time.perf_counter() - last_note >= progress_every_s:
                last_note = time.perf_counter()
                done = (layer * len(bounds) + b) / (num_layers * len(bounds))
                spent = last_note - start
                print(f"[evaluate] layer {layer + 1}/{num_layers}, batch {b}/{len(bounds)}: "
                      f"{100 * done:.1f}% in {spent:.0f} s, about {spent / max(done, 1e-9) - spent:.0f} s "
                      "left", file=sys.stderr, flush=True)
            home_c = contiguous_home[hi - lo]
            h_plan = hits_plan[lo:hi]
            count("baseline", layer, hits_base[lo:hi], home_c)
            count("placement_only", layer, h_plan, home_c)
            count("specmoe", layer, h_plan, assign(predicted[lo:hi], method).home_rank)
            count("oracle", layer, h_plan, assign(h_plan.float(), method).home_rank)
            if request_home is not None:
                count("requests", layer, h_plan, request_home_t[lo:hi])
            if replicas is not None:
                ex_b = experts[lo:hi, layer]
                for side, rank_score in (("specmoe_replicas", pred_rep[lo:hi]),
                                         ("oracle_replicas", replica_hits(ex_b, mask).float())):
                    home = assign(rank_score, method).home_rank
                    count(side, layer, routed_rank_hits(ex_b, home, table, slots, ep_size), home)
        if progress:
            print(
                f"[evaluate] layer {layer + 1}/{num_layers}: LAR baseline "
                f"{acc['baseline'][layer].local_activation_rate:.3f} specmoe "
                f"{acc['specmoe'][layer].local_activation_rate:.3f} oracle "
                f"{acc['oracle'][layer].local_activation_rate:.3f} "
                f"({time.perf_counter() - start:.1f} s)",
                file=sys.stderr,
            )

    def side(name: str) -> SideResult:
        per_layer = tuple(sides[name])
        total = RouteMeasures.empty(ep_size)
        for m in per_layer:
            total = total + m
        if nodes is None:
            return SideResult(total=total, per_layer=per_layer)
        node_total = nodes[name][0]
        for m in nodes[name][1:]:
            node_total = node_total + m
        return SideResult(total=total, per_layer=per_layer, nodes=node_total,
                          nodes_per_layer=tuple(nodes[name]), wire=wire)

    total_pred = PredictionCounts()
    for c in prediction:
        total_pred = total_pred + c
    return Evaluation(
        baseline=side("baseline"),
        placement_only=side("placement_only"),
        specmoe=side("specmoe"),
        oracle=side("oracle"),
        prediction=total_pred,
        prediction_per_layer=tuple(prediction),
        batch_size=batch_size,
        method=method,
        num_ranks=ep_size,
        num_tokens=tokens,
        num_batches=len(bounds),
        predictor_kind=str(getattr(predictor, "kind", type(predictor).__name__)),
        seconds=time.perf_counter() - start,
        gpus_per_node=gpus_per_node,
        wire=wire,
        replicas=None if replicas is None else {name: side(name) for name in REPLICA_SIDES},
        redundant_experts=0 if replicas is None else replicas[0].redundant,
        requests=None if request_home is None else side("requests"),
    )
