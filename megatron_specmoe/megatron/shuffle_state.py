"""The explicit state of speculative token shuffling: a model's options and the carrier that
hands the residual order and the route history from one shuffle layer to the next.

Notation
    T: tokens of one TP group (S * B), in (s, b) order.   C: rows per TP rank.   k: top-k.
    l: MoE layers before the current one.   P: attention TP size.

Nothing here communicates or imports megatron; ``megatron/shuffle_layer.py`` reads and writes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, get_args

import torch

from megatron_specmoe.comm.shuffle import CollectiveCounter
from megatron_specmoe.comm.workspace import Workspace
from megatron_specmoe.predict.vocabulary import ShufflePredictor
from megatron_specmoe.schedule.assignment import AssignmentMethod, ShufflePlan

__all__ = ["SharePlans", "ShuffleOptions", "ShuffleState", "RouteHistory", "SharedPlans", "ShuffleCarrier"]

# Who makes a forward's plans (``megatron/shared_plans.py``): "off", every TP rank makes every
# layer's plan; "on", each TP rank makes 1/P of them and the first shuffle layer's all-gather hands
# them to all (predictor "route" with sequence parallelism only); "auto", "on" where the plans are
# made on the CPU (there every rank pays for each plan in CPU time), else "off".
SharePlans = Literal["auto", "on", "off"]


@dataclass(frozen=True, kw_only=True)
class ShuffleOptions:
    """Attributes: predictor (``ShufflePredictor``), method (``assignment.AssignmentMethod``;
    "prices" is the runtime one: 7 launches on the Triton path, no host synchronisation; "refine"
    stays selectable, some 300 launches), seed (for the "random" predictor), keep_plans (carrier keeps
    every plan it sees, for tests and benchmarks), route_predictor (a fitted
    ``predict.base.RoutePredictor``, for predictor="route"; called with token ids only
    and compiled per layer into a device table, ``predict.rank_table``),
    route_vocab_size (V of that table; None: the predictor's own vocab_size or fitted id bound),
    overlap_plan (on CUDA, compute each layer's plan on a side stream while its attention runs;
    False: in order, as on the CPU), share_plans (``SharePlans``: whether each TP rank makes only
    1/P of a forward's plans, ``megatron/shared_plans.py``)."""

    predictor: ShufflePredictor = "pregate"
    method: AssignmentMethod = "prices"
    seed: int = 0
    keep_plans: bool = False
    route_predictor: Optional[Any] = None
    route_vocab_size: Optional[int] = None
    overlap_plan: bool = True
    share_plans: SharePlans = "auto"

    def __post_init__(self) -> None:
        if self.share_plans not in get_args(SharePlans):
            raise ValueError(f"ShuffleOptions.share_plans={self.share_plans!r}; choose one of {get_args(SharePlans)}")
        if self.share_plans == "on" and self.predictor != "route":
            raise ValueError(
                f"ShuffleOptions.share_plans='on' needs predictor='route' (scores from token ids alone, known "
                f"before the first layer), got predictor={self.predictor!r}; use share_plans='auto' or 'off'"
            )
        if self.predictor not in get_args(ShufflePredictor):
            raise ValueError(
                f"ShuffleOptions.predictor={self.predictor!r}; choose one of {get_args(ShufflePredictor)}"
            )
        if self.predictor == "route" and self.route_predictor is None:
            raise ValueError(
                "ShuffleOptions.predictor='route' needs route_predictor= a fitted RoutePredictor "
                "(e.g. from the plan: artifacts.plan_folder.load_plan)"
            )
        if self.predictor == "history" and getattr(self.route_predictor, "kind", None) not in ("history", "combined"):
            raise ValueError(
                "ShuffleOptions.predictor='history' needs route_predictor= a fitted 'history' predictor "
                "(HistoryMLP) or a 'combined' of 'token' and 'history' (from the plan), got "
                f"{getattr(self.route_predictor, 'kind', type(self.route_predictor).__name__)!r}"
            )
        if self.route_vocab_size is not None and self.route_vocab_size < 0:
            raise ValueError(f"ShuffleOptions.route_vocab_size must be >= 0 or None, got {self.route_vocab_size}")
        if self.method not in get_args(AssignmentMethod):
            raise ValueError(
                f"ShuffleOptions.method={self.method!r}; choose one of {get_args(AssignmentMethod)}"
            )


@dataclass(frozen=True, kw_only=True)
class ShuffleState:
    """The order of the residual stream between two layers (sequence parallel on).

    Attributes:
        plan: the ShufflePlan whose shards the ranks hold.
        seq, batch: S and B of the true-order tensor.
        tensor: the layer output this state describes (a later input that is not this tensor is
            taken to be Megatron's contiguous shard).
    """

    plan: ShufflePlan
    seq: int
    batch: int
    tensor: torch.Tensor


@dataclass(frozen=True, kw_only=True)
class RouteHistory:
    """The real routes of the earlier MoE layers of this forward (predictor "history").

    Attributes:
        tensor: the layer output this describes (a later input that is not this tensor starts a
            new history: the first MoE layer of a forward).
        history: int64 [T, l, k], the experts of the l MoE layers before the next one, true order,
            identical on every TP rank.
        pending: int64 [C, k] or None: with sequence parallelism, the producing layer's routes of
            this rank's shard rows (shuffled order, pad rows 0); the next layer's all-gather
            brings them into ``history``. Without it, already in ``history``.
    """

    tensor: torch.Tensor
    history: torch.Tensor
    pending: Optional[torch.Tensor] = None


@dataclass(frozen=True, kw_only=True)
class SharedPlans:
    """The plans of one forward, made 1/P per TP rank and gathered by the first shuffle layer.

    Attributes:
        token_ids: the ``ShuffleCarrier.token_ids`` tensor of the forward they belong to (its
            identity marks them as this forward's; a later forward feeds a new tensor).
        plans: layer_number -> ShufflePlan, every shuffle layer of the model on this rank (this
            rank made ceil(L / P) or fewer of them; ``ShuffleCarrier.plans_made`` counts them).
    """

    token_ids: torch.Tensor
    plans: dict


@dataclass(kw_only=True)
class ShuffleCarrier:
    """Per-model, explicit s-TS state shared by the layers of one model (built by the spec).

    Attributes:
        options: ShuffleOptions.
        state: the residual stream's current order (sequence parallel on), or None.
        counter: CollectiveCounter for the TP collectives the layers issue, or None.
        plans: (layer_number, plan) for every layer forward when ``options.keep_plans``.
        calls: forwards seen (seeds the "random" predictor).
        output_consumer: with sequence parallelism the last layer's output is in shuffled order;
            who restores true order: "output_layer" (set by ``shuffle_specs.true_order_output``) or
            "restore_true_order" (set by the caller who calls it). Layers refuse to run with
            sequence parallelism while it is None, rather than hand shuffled rows to code that
            expects Megatron's contiguous shards.
        token_ids: int64 [T] token ids of the current forward in (s, b) order (predictor "route";
            set by ``shuffle_specs.feed_token_ids``).
        routes: the RouteHistory handed from layer to layer (predictor "history").
        route_layers: the model's ShuffleTransformerLayers in layer order (set by
            ``shuffle_specs.feed_token_ids``): the layers whose plans the first one shares.
        shared: the current forward's SharedPlans, or None.
        plans_made: assignments this rank has made (every plan it computed; with shared plans
            ceil(L / P) per forward instead of L).
        workspace: the buffers the layers reuse for rows that die inside a layer (the gathered
            input, it in true order, the partial sums in shuffled order; ``comm.workspace``).
    """

    options: ShuffleOptions = field(default_factory=ShuffleOptions)
    state: Optional[ShuffleState] = None
    counter: Optional[CollectiveCounter] = None
    plans: list = field(default_factory=list)
    calls: int = 0
    output_consumer: Optional[Literal["output_layer", "restore_true_order"]] = None
    token_ids: Optional[torch.Tensor] = None
    routes: Optional[RouteHistory] = None
    route_layers: tuple = ()
    shared: Optional[SharedPlans] = None
    plans_made: int = 0
    workspace: Workspace = field(default_factory=Workspace)

    def reset(self) -> None:
        """Forget the residual order, the route history, shared and kept plans (start of a new
        forward)."""
        self.state = None
        self.routes = None
        self.shared = None
        self.plans.clear()
