"""Run-time rank scorers: how a shuffle layer scores tokens x TP ranks before its gate.

Notation
    T: tokens of one TP group (S * B), in (s, b) order.   H: hidden size.   E: experts.   k: top-k.
    P: attention TP size (the shuffle domain).   l: MoE layers before this one.
    ep_base: EP rank of TP rank 0 (TP rank r is EP rank ep_base + r under MoE parallel folding).

One interface. A scorer is built once per layer from the model's ``ShuffleOptions``
(``make_rank_scorer``) and called every forward with the data every TP rank holds identically
(``ScoreInputs``); it returns float32 [T, P], higher = better suited. It keeps its own device
caches (rebuilt when the placement object changes) and never copies to the host, so every TP rank
computes the same scores and the plan after it is identical on all of them.

    pregate      this layer's router on the gathered, normalised layer input; score of rank r =
                 how many of the token's predicted top-k experts it hosts. With sequence
                 parallelism the layer gates each rank's own rows before the all-gather and hands
                 the gathered ids in ``gate_experts``.
    route        a fitted token predictor compiled to a ``RankTable`` (one gather per forward).
    history      a fitted history (or combined) predictor on the carried routes, on the device.
    contiguous   zeros: Megatron's contiguous shards (the baseline order).
    random       from a generator seeded by (seed, layer number, call): for tests.
    adversarial  minus the pregate score (lossless still, only slower): for tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, get_args

import torch

from megatron_specmoe.predict.device import CombinedScorer, compile_rank_table, layer_device_scorer
from megatron_specmoe.predict.history_mlp import HistoryLayerScorer
from megatron_specmoe.predict.pregate import rank_scores_from_experts, rank_scores_from_logits, span_hosts
from megatron_specmoe.predict.vocabulary import ShufflePredictor

__all__ = ["ScoreInputs", "RankScorer", "RANK_SCORERS", "make_rank_scorer"]


@dataclass(frozen=True, kw_only=True)
class ScoreInputs:
    """What a layer hands its scorer each forward (all identical on every TP rank).

    Attributes:
        num_tokens: T.
        tp: P.
        ep_base: EP rank of TP rank 0.
        moe_index: this layer's index among the model's MoE layers (plans are per MoE layer).
        layer_number: Megatron's 1-based layer number (seeds "random").
        call: forwards seen by the model's carrier (seeds "random").
        placement: the dispatcher's ``ExpertPlacement`` (its identity keys the caches).
        rank_of: int64 [E], EP rank of each logical expert, on the run-time device.
        layer_input: float [T, H], the gathered, normalised layer input; None when a route
            scorer is called ahead of its layer (``megatron/shared_plans.py``: token ids only).
        gate: the router's gating function, float [T, H] -> float32 [T, E] logits.
        topk: k.
        gate_experts: int64 [T, k] or None: each token's top-k by this layer's router, gated by
            the rank that held it and gathered (pregate with sequence parallelism).
        token_ids: int64 [T] or None: the batch's token ids (route, history's token member).
        history: int64 [T, l, k] or None: the earlier MoE layers' real routes, true order.
    """

    num_tokens: int
    tp: int
    ep_base: int
    moe_index: int
    layer_number: int
    call: int
    placement: Any
    rank_of: torch.Tensor
    layer_input: Optional[torch.Tensor]
    gate: Callable[[torch.Tensor], torch.Tensor]
    topk: int
    gate_experts: Optional[torch.Tensor] = None
    token_ids: Optional[torch.Tensor] = None
    history: Optional[torch.Tensor] = None


class RankScorer(Protocol):
    """``scorer(inputs) -> float32 [T, P]`` (see the module docstring)."""

    def __call__(self, x: ScoreInputs) -> torch.Tensor: ...


class ContiguousScorer:
    """Zeros: every assignment ties, so the plan keeps Megatron's contiguous shards."""

    def __call__(self, x: ScoreInputs) -> torch.Tensor:
        return torch.zeros(x.num_tokens, x.tp, dtype=torch.float32, device=x.layer_input.device)


@dataclass(frozen=True, kw_only=True)
class RandomScorer:
    """Uniform scores from a generator seeded by (seed, layer number, call). Attributes: seed."""

    seed: int = 0

    def __call__(self, x: ScoreInputs) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + x.layer_number * 7919 + x.call)
        return torch.rand(x.num_tokens, x.tp, generator=gen).to(x.layer_input.device)


@dataclass(frozen=True, kw_only=True)
class PregateScorer:
    """The router's own gating on the layer input; top-k experts -> hosting EP rank of the span.
    Attributes: sign (+1, or -1 for the adversarial baseline)."""

    sign: float = 1.0
    _hosts: dict = field(default_factory=dict, compare=False, repr=False)  # (rank_of id, ep_base, tp) -> [E, P]

    def __call__(self, x: ScoreInputs) -> torch.Tensor:
        # The expert -> TP rank matrix is made once per rank_of tensor (the layer keeps one per
        # placement), so a forward costs the sort, a gather and a sum (``pregate``'s device forms).
        key = (id(x.rank_of), x.ep_base, x.tp)
        cached = self._hosts.get("hosts")
        if cached is None or cached[0] != key or cached[1] is not x.rank_of:
            cached = (key, x.rank_of, span_hosts(x.rank_of, ep_base=x.ep_base, tp=x.tp))
            self._hosts["hosts"] = cached
        hosts = cached[2]
        if x.gate_experts is not None:  # sequence parallel: gated shard by shard, then gathered
            scores = rank_scores_from_experts(x.gate_experts, hosts=hosts)
        else:
            scores = rank_scores_from_logits(x.gate(x.layer_input), k=x.topk, hosts=hosts)
        return -scores if self.sign < 0 else scores


class RouteScorer:
    """A fitted token predictor on the batch's token ids: one gather from this layer's
    ``RankTable``, compiled on first use and again whenever the placement changes."""

    def __init__(self, predictor: Any, vocab_size: Optional[int]) -> None:
        self.predictor = predictor
        self.vocab_size = vocab_size
        self._cache: Optional[tuple] = None  # (placement, RankTable)

    def __call__(self, x: ScoreInputs) -> torch.Tensor:
        ids = x.token_ids
        if ids is None or ids.shape != (x.num_tokens,):
            raise ValueError(
                f"ShuffleTransformerLayer: predictor='route' needs carrier.token_ids of shape ({x.num_tokens},), "
                f"got {None if ids is None else tuple(ids.shape)}; attach shuffle_specs.feed_token_ids(model, carrier)"
            )
        scores = self._table(x, ids.device).lookup(ids)
        return scores if x.layer_input is None else scores.to(x.layer_input.device)

    def _table(self, x: ScoreInputs, device: torch.device):
        cached = self._cache
        if cached is not None and cached[0] is x.placement and cached[1].table.device == device:
            return cached[1]
        key = tuple(int(r) for r in x.placement.rank_of_logical())
        if cached is not None and cached[1].placement_key == key and cached[1].table.device == device:
            table = cached[1]
        else:
            table = compile_rank_table(self.predictor, layer=x.moe_index, placement=x.placement,
                                       ep_base=x.ep_base, tp=x.tp, vocab_size=self.vocab_size, device=device)
        self._cache = (x.placement, table)
        return table


class HistoryScorer:
    """A fitted history (or combined) predictor on the carried routes and the token ids, on the
    history's device; expert scores summed over the experts each TP rank of the span hosts."""

    def __init__(self, predictor: Any, vocab_size: Optional[int]) -> None:
        self.predictor = predictor
        self.vocab_size = vocab_size
        self._cache: Optional[tuple] = None  # (device, device scorer)
        self._consts: Optional[tuple] = None  # (key, rank_of, this placement's constants): _constants

    def __call__(self, x: ScoreInputs) -> torch.Tensor:
        history = x.history
        if history is None or history.shape[1] != x.moe_index:
            raise ValueError(
                f"ShuffleTransformerLayer: predictor='history' at MoE layer {x.moe_index} received the routes "
                f"of {None if history is None else history.shape[1]} earlier layers; every MoE layer must be "
                "a ShuffleTransformerLayer and the MoE layers consecutive (no dense layer between them)"
            )
        ids = x.token_ids
        if ids is not None and ids.shape != (history.shape[0],):
            raise ValueError(
                f"ShuffleTransformerLayer: carrier.token_ids has shape {tuple(ids.shape)}, this forward has "
                f"{history.shape[0]} tokens; feed_token_ids(model, carrier) must see this forward's input_ids"
            )
        cached = self._cache
        if cached is None or cached[0] != history.device:
            scorer = layer_device_scorer(self.predictor, layer=x.moe_index, device=history.device,
                                         vocab_size=self.vocab_size)
            cached = (history.device, scorer)
            self._cache = cached
        scorer = cached[1]
        device = history.device
        if isinstance(scorer, HistoryLayerScorer) and scorer.w1 is not None:
            # The history MLP alone: its fused rank scores (8 launches).
            hosts_sum, offsets, floor = self._constants(x, device, lambda hosts: (
                torch.cat([hosts, hosts.new_ones(hosts.shape[0], 1)], dim=1), scorer.logit_offsets(device),
                torch.cat([hosts.new_zeros(x.tp), hosts.new_full((1,), 1e-12)])))
            return scorer.rank_scores(history=history, hosts_sum=hosts_sum, offsets=offsets, floor=floor)
        if isinstance(scorer, CombinedScorer):
            # Token table + history MLP: one kernel after the MLP on the Triton path.
            hosts, fused = self._constants(x, device, lambda hosts: (
                hosts, scorer.fused_consts(hosts) if scorer.fused_members() is not None else None))
            return scorer.rank_scores(token_ids=ids, history=history, hosts=hosts, consts=fused)
        expert_scores = scorer.scores(token_ids=ids, history=history)  # [T, E]
        return expert_scores @ self._constants(x, device, lambda hosts: hosts)

    def _constants(self, x: ScoreInputs, device: torch.device, make: Callable[[torch.Tensor], Any]) -> Any:
        """``make(hosts)``, hosts = ``span_hosts(...)`` float32 [E, P] of the current placement, made
        once per (rank_of, ep_base, tp, device) and kept: the scores' constants for this layer."""
        key = (id(x.rank_of), x.ep_base, x.tp, device)
        cached = self._consts
        if cached is None or cached[0] != key or cached[1] is not x.rank_of:
            cached = (key, x.rank_of, make(span_hosts(x.rank_of.to(device), ep_base=x.ep_base, tp=x.tp)))
            self._consts = cached
        return cached[2]


RANK_SCORERS: dict[str, Callable[[Any], RankScorer]] = {
    "pregate": lambda o: PregateScorer(),
    "route": lambda o: RouteScorer(o.route_predictor, o.route_vocab_size),
    "history": lambda o: HistoryScorer(o.route_predictor, o.route_vocab_size),
    "contiguous": lambda o: ContiguousScorer(),
    "random": lambda o: RandomScorer(seed=o.seed),
    "adversarial": lambda o: PregateScorer(sign=-1.0),
}


def make_rank_scorer(options: Any) -> RankScorer:
    """The scorer for ``options.predictor`` (a ``ShuffleOptions``; its route_predictor,
    route_vocab_size and seed configure it)."""
    name = options.predictor
    if name not in get_args(ShufflePredictor) or name not in RANK_SCORERS:
        raise ValueError(f"unknown shuffle predictor {name!r}; choose one of {get_args(ShufflePredictor)}")
    return RANK_SCORERS[name](options)
