"""``ShuffleTransformerLayer``: speculative token shuffling (s-TS) inside Megatron's transformer layer.

Notation
    S: sequence length.   B: micro-batch.   T = S * B tokens of one TP group, row t = s * B + b.
    H: hidden size.   P: attention TP size.   C = ceil(T / P) rows per rank.   E: experts, k: top-k.

Glossary
    TP rank r        this rank's index in the attention TP group.
    EP rank          its index in the expert-parallel group. Under MoE parallel folding (expert
                     TP = 1, TP group inside the EP group) TP rank r is EP rank ``ep_base + r``
                     (checked at the first forward): the tokens TP rank r holds when the MoE layer
                     starts have home EP rank ``ep_base + r``.
    plan             ``schedule.assignment.ShufflePlan`` over the T tokens and the P TP ranks.
    carrier          ``ShuffleCarrier``: the explicit object through which one layer hands the
                     residual stream's order (its plan) to the next (sequence parallel only).

What one layer does (Megatron's TransformerLayer does the same arithmetic; only where the two TP
collectives sit and which rows they carry changes):

Sequence parallel on (input: this rank's C residual rows in the previous layer's shuffled order;
the first layer's input is Megatron's contiguous shard, i.e. the contiguous plan):
  1. input layernorm on the shard, then the all-gather that sequence parallelism performs anyway,
     followed by the inverse of the previous plan: attention sees [S, B, H] in true order. k
     expert ids per row may ride along in k extra columns (``comm.shuffle.append_route_columns``):
     with "pregate", this rank's gate on its own rows (each rank gates 1/P of the tokens); with
     "history", the previous layer's real routes.
  2. attention with linears that do not communicate (``NoComm*ParallelLinear``): qkv gets the
     gathered input, the output projection returns its partial sum.
  3. predict each token's EP rank from data every TP rank holds identically (``ShufflePredictor``:
     "pregate" = this layer's router on the normalised layer input; "route" = a fitted
     RoutePredictor on token ids; "history" = on the carried routes) and compute the balanced plan
     (``schedule.assignment.assign``; deterministic, so identical on every rank).
  4. fold: each rank adds the residual rows it holds (+ the projection bias) into its partial sum,
     permute by the plan, reduce-scatter (``comm.shuffle.shuffled_reduce_scatter``): TP rank r
     receives the tokens predicted for its experts, already with attention + residual + bias.
  5. pre-MLP layernorm and the MoE layer on the real rows of the shard (the specmoe dispatcher
     finds most (token, expert) pairs local), plus the residual. Output: [C, 1, H] in the new
     shuffled order; the plan goes to the carrier for the next layer.
Sequence parallel off (inference): every rank holds [S, B, H] in true order; 1 is the layernorm
alone; 2-5 as above (the shuffled reduce-scatter replaces the output projection's all-reduce, and
each rank folds the residual rows of its own new shard); then
  6. the deferred all-gather (``comm.shuffle.deferred_all_gather``) returns [S, B, H] in true
     order. A reduce-scatter plus an all-gather move the bytes of the all-reduce they replace.

Lossless: the real router still runs on every token after the shuffle; a wrong prediction only
makes a pair remote. Forward only (inference, ``model.eval()`` under no_grad).

With sequence parallelism the model's output must be brought back to true order:
``shuffle_specs.true_order_output`` makes a GPTModel's output layer do it inside its own
all-gather; layer stacks call ``restore_true_order``. Layers refuse to run until one is declared
(``carrier.output_consumer``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, get_args

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_specmoe.comm.shuffle import (
    CollectiveCounter,
    append_route_columns,
    deferred_all_gather,
    shuffled_reduce_scatter,
    split_route_columns,
)
from megatron_specmoe.schedule.assignment import (
    AssignmentMethod,
    ShufflePlan,
    assign,
    real_capacities,
)
from megatron_specmoe.predict.pregate import expert_rank_counts, span_hosts, top_experts, topk_rank_scores

__all__ = [
    "ShufflePredictor",
    "ShuffleOptions",
    "ShuffleState",
    "ShuffleCarrier",
    "RouteHistory",
    "NoCommColumnParallelLinear",
    "NoCommRowParallelLinear",
    "ShuffleTransformerLayer",
    "restore_true_order",
]

ShufflePredictor = Literal["pregate", "route", "history", "contiguous", "random", "adversarial"]
"""How a layer scores tokens x TP ranks before its gate (all from data every TP rank holds):
    pregate      this layer's router logits on the gathered, normalised layer input; score of
                 rank r = how many of the token's predicted top-k experts it hosts.
    route        a fitted ``RoutePredictor`` (``options.route_predictor``, e.g. the plan's token
                 table) on the batch's token ids (``carrier.token_ids``, fed by
                 ``shuffle_specs.feed_token_ids``); scores summed per EP rank of the TP span,
                 precomputed for every id into a device table (``RankTable``): one gather per
                 forward, no host synchronisation.
                 The MoE-layer index comes from ``config.moe_layer_freq`` (dense layers skipped).
    history      a fitted ``HistoryMLP``, or a ``Combined`` of the token table and it
                 (``options.route_predictor``), on the real routes of the earlier MoE layers
                 (``RouteHistory``) and, for the token member, the token ids; scored on the device
                 (``predict.device_scorer``). Each layer's routes ride along with the all-gather
                 that follows it (``comm.shuffle.append_route_columns``: k ids per token, e.g. 4
                 bytes next to 2H bytes of hidden state), so every TP rank holds the same history
                 in true order. The first MoE layer has no history (the history member scores the
                 prior there, so a combined predictor leans on the token table). Needs the MoE
                 layers to be consecutive shuffle layers.
    contiguous   no prediction: Megatron's contiguous shards (the baseline order).
    random       scores from a generator seeded by (options.seed, layer, call): for tests.
    adversarial  minus the pregate score: tokens go where their predicted experts are *not*
                 (lossless still, only slower): for tests."""


@dataclass(frozen=True, kw_only=True)
class ShuffleOptions:
    """Attributes: predictor (``ShufflePredictor``), method (``assignment.AssignmentMethod``;
    "refine" is the runtime one), seed (for the "random" predictor), keep_plans (carrier keeps
    every plan it sees, for tests and benchmarks), route_predictor (a fitted
    ``predict.base.RoutePredictor``, for predictor="route"; called with token ids only
    and compiled per layer into a device table, ``predict.rank_table``),
    route_vocab_size (V of that table; None: the predictor's own vocab_size or fitted id bound)."""

    predictor: ShufflePredictor = "pregate"
    method: AssignmentMethod = "refine"
    seed: int = 0
    keep_plans: bool = False
    route_predictor: Optional[Any] = None
    route_vocab_size: Optional[int] = None

    def __post_init__(self) -> None:
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
    """

    options: ShuffleOptions = field(default_factory=ShuffleOptions)
    state: Optional[ShuffleState] = None
    counter: Optional[CollectiveCounter] = None
    plans: list = field(default_factory=list)
    calls: int = 0
    output_consumer: Optional[Literal["output_layer", "restore_true_order"]] = None
    token_ids: Optional[torch.Tensor] = None
    routes: Optional[RouteHistory] = None

    def reset(self) -> None:
        """Forget the residual order, the route history and kept plans (start of a new forward)."""
        self.state = None
        self.routes = None
        self.plans.clear()


class NoCommColumnParallelLinear(ColumnParallelLinear):
    """Megatron's ColumnParallelLinear whose forward never communicates: the caller hands it the
    already gathered input (Megatron's own "caller communicates" switch, ``explicit_expert_comm``)."""

    specmoe_no_comm = True  # checked by ShuffleTransformerLayer (the TE versions set it too)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.explicit_expert_comm = True


class NoCommRowParallelLinear(RowParallelLinear):
    """Megatron's RowParallelLinear that returns its partial sum (no all-reduce or reduce-scatter)
    and its bias separately; the shuffle layer reduces it. Needs ``skip_bias_add=True`` (as
    attention's output projection is built)."""

    specmoe_no_comm = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not self.skip_bias_add:
            raise ValueError(
                "NoCommRowParallelLinear needs skip_bias_add=True (the shuffle layer folds the "
                "bias into the reduce-scatter); use it only as attention's linear_proj"
            )
        self.explicit_expert_comm = True


def _is_static(inference_context) -> bool:
    """True for Megatron's static inference context (and for contexts that predate the method)."""
    check = getattr(inference_context, "is_static_batching", None)
    return True if check is None else bool(check())


def _group_rank(group) -> int:
    return dist.get_group_rank(group, dist.get_rank())


class ShuffleTransformerLayer(TransformerLayer):
    """A TransformerLayer that performs s-TS around attention's TP collectives (see module doc).

    Built from ``megatron.shuffle_specs.get_gpt_layer_shuffle_spec``; takes Megatron's arguments plus
    ``carrier`` (the model's ShuffleCarrier).

    Raises:
        ValueError: settings the shuffle does not support (named, with the fix).
    """

    def __init__(self, config, submodules, *args, carrier: Optional[ShuffleCarrier] = None, **kwargs) -> None:
        if carrier is None:
            raise ValueError(
                "ShuffleTransformerLayer needs carrier=ShuffleCarrier(...) (get_gpt_layer_shuffle_spec "
                "makes one per model)"
            )
        _check_config(config)
        super().__init__(config, submodules, *args, **kwargs)
        self.carrier = carrier
        self._check_modules()
        self._ep_base: Optional[int] = None
        # (placement, RankTable) for predictor="route", built on first use (``_rank_table``).
        self._route_table: Optional[tuple] = None
        self._rank_of_cache: Optional[tuple] = None  # (placement, int64 [E]) for "pregate"
        # predictor "history": (device, scorer) for this layer (built on first use) and the router's last
        # top-k ids, kept by a forward hook on the router.
        self._history_scorer = None
        self._last_routes: Optional[torch.Tensor] = None
        self._moe_index: Optional[int] = None
        if carrier.options.predictor == "history":
            if config.num_moe_experts > 32768:
                raise ValueError("ShuffleTransformerLayer: predictor='history' carries expert ids in "
                                 "2-byte columns; num_moe_experts must be <= 32768")
            self.mlp.router.register_forward_hook(self._keep_routes)

    # ---- checks ----------------------------------------------------------------------------------
    def _check_modules(self) -> None:
        from megatron.core.transformer.moe.moe_layer import MoELayer

        from megatron_specmoe.megatron.dispatcher import SpecMoETokenDispatcher

        attn = self.self_attention
        if not all(
            getattr(type(getattr(attn, name, None)), "specmoe_no_comm", False) for name in ("linear_qkv", "linear_proj")
        ):
            raise ValueError(
                "ShuffleTransformerLayer: self_attention must use non-communicating linears "
                "(NoCommColumnParallelLinear / NoCommRowParallelLinear, or their TE versions in "
                "megatron.te_shuffle) as linear_qkv / linear_proj; build the layer from get_gpt_layer_shuffle_spec"
            )
        if not isinstance(self.cross_attention, IdentityOp):
            raise ValueError("ShuffleTransformerLayer: cross attention is not supported; use a decoder-only spec")
        if not isinstance(self.mlp, MoELayer) or not isinstance(
            getattr(self.mlp, "token_dispatcher", None), SpecMoETokenDispatcher
        ):
            raise ValueError(
                "ShuffleTransformerLayer: the MLP must be a MoE layer with the specmoe dispatcher "
                "(moe_token_dispatcher_type='specmoe'); dense layers keep Megatron's TransformerLayer"
            )
        if getattr(self.mlp, "use_shared_expert", False) and self.tp_group.size() > 1:
            raise ValueError(
                "ShuffleTransformerLayer: shared experts with TP > 1 are not supported (their TP "
                "linears expect every rank to hold the same tokens); set "
                "moe_shared_expert_intermediate_size=None or TP=1"
            )

    def _ep_span(self) -> int:
        """EP rank of TP rank 0 of this group; checks that TP rank r is EP rank ep_base + r."""
        if self._ep_base is None:
            dispatcher = self.mlp.token_dispatcher
            tp = self.tp_group.size()
            ep = dispatcher.ep_size
            if ep % tp:
                raise ValueError(
                    f"ShuffleTransformerLayer: EP size {ep} is not a multiple of TP size {tp}; the "
                    "attention TP group must lie inside the EP group (MoE parallel folding)"
                )
            ep_rank = dispatcher.ep_group.rank() if ep > 1 else 0
            ranks = [None] * tp
            dist.all_gather_object(ranks, ep_rank, group=self.tp_group)
            base = ranks[0]
            if ranks != list(range(base, base + tp)):
                raise ValueError(
                    f"ShuffleTransformerLayer: the TP group's EP ranks are {ranks}, not consecutive from "
                    f"{base}; the TP group must lie inside one EP group in TP-rank order "
                    "(Megatron's default order with expert_tensor_parallel_size=1)"
                )
            self._ep_base = base
        return self._ep_base

    # ---- prediction ------------------------------------------------------------------------------
    @property
    def moe_index(self) -> int:
        """This layer's index among the model's MoE layers (0-based), from ``config.moe_layer_freq``
        and the global ``layer_number``: the layer index of routing traces and plans."""
        if self._moe_index is None:
            from megatron_specmoe.megatron_lm.runtime import moe_layer_numbers

            numbers = moe_layer_numbers(self.config)
            if self.layer_number not in numbers:
                raise ValueError(
                    f"ShuffleTransformerLayer: layer {self.layer_number} is not an MoE layer by "
                    f"config.moe_layer_freq={getattr(self.config, 'moe_layer_freq', 1)!r}; the config "
                    "and the layer specs disagree"
                )
            self._moe_index = numbers.index(self.layer_number)
        return self._moe_index

    def _keep_routes(self, _router, _args, output) -> None:
        from megatron_specmoe.megatron.route_recorder import _topk_from_output

        self._last_routes = _topk_from_output(output, self.config.moe_router_topk)[0]

    @torch.no_grad()
    def rank_scores(self, ln_full: torch.Tensor, history: Optional[torch.Tensor] = None,
                    gate_experts: Optional[torch.Tensor] = None) -> torch.Tensor:
        """float32 [T, P]: how well each TP rank suits each token, from ``ln_full`` [S, B, H] (the
        gathered, normalised layer input, identical on every TP rank) and, for predictor
        "history", ``history`` int64 [T, l, k] (earlier MoE layers' routes, true order); for
        "pregate" / "adversarial" with sequence parallelism, ``gate_experts`` int64 [T, k] (each
        token's top-k by this layer's router, computed by the rank that held it and gathered)."""
        opts = self.carrier.options
        tp = self.tp_group.size()
        t = ln_full.shape[0] * ln_full.shape[1]
        if opts.predictor == "contiguous":
            return torch.zeros(t, tp, dtype=torch.float32, device=ln_full.device)
        if opts.predictor == "random":
            gen = torch.Generator().manual_seed(
                opts.seed * 1_000_003 + self.layer_number * 7919 + self.carrier.calls
            )
            return torch.rand(t, tp, generator=gen).to(ln_full.device)
        if opts.predictor == "route":
            return self._route_scores(t, tp).to(ln_full.device)
        if opts.predictor == "history":
            return self._history_scores(history, tp)
        # pregate: the router's own gating on the layer input; top-k experts -> hosting EP rank.
        rank_of = self._rank_of(ln_full.device)
        if gate_experts is not None:  # sequence parallel: gated shard by shard, then gathered
            scores = expert_rank_counts(gate_experts, rank_of=rank_of, ep_base=self._ep_span(), tp=tp)
        else:
            logits = self.mlp.router.gating(ln_full.reshape(t, -1))
            scores = topk_rank_scores(logits, k=self.config.moe_router_topk, rank_of=rank_of,
                                      ep_base=self._ep_span(), tp=tp)
        return -scores if opts.predictor == "adversarial" else scores

    def _rank_of(self, device: torch.device) -> torch.Tensor:
        """int64 [E] EP rank of each logical expert, kept on ``device`` until the dispatcher's
        placement object changes (no host -> device copy per forward)."""
        placement = self.mlp.token_dispatcher.placement
        cached = self._rank_of_cache
        if cached is None or cached[0] is not placement or cached[1].device != device:
            cached = (placement, torch.as_tensor(placement.rank_of_logical(), device=device))
            self._rank_of_cache = cached
        return cached[1]

    def _history_scores(self, history: Optional[torch.Tensor], tp: int) -> torch.Tensor:
        """float32 [T, P] from the history (or combined) predictor on the carried routes and the
        token ids, all on the history's device."""
        index = self.moe_index
        if history is None or history.shape[1] != index:
            raise ValueError(
                f"ShuffleTransformerLayer: predictor='history' at MoE layer {index} received the routes of "
                f"{None if history is None else history.shape[1]} earlier layers; every MoE layer must be "
                "a ShuffleTransformerLayer and the MoE layers consecutive (no dense layer between them)"
            )
        from megatron_specmoe.predict.device_scorer import layer_device_scorer

        opts = self.carrier.options
        cached = self._history_scorer
        if cached is None or cached[0] != history.device:
            scorer = layer_device_scorer(opts.route_predictor, layer=index, device=history.device,
                                         vocab_size=opts.route_vocab_size)
            cached = (history.device, scorer)
            self._history_scorer = cached
        ids = self.carrier.token_ids
        if ids is not None and ids.shape != (history.shape[0],):
            raise ValueError(
                f"ShuffleTransformerLayer: carrier.token_ids has shape {tuple(ids.shape)}, this forward has "
                f"{history.shape[0]} tokens; feed_token_ids(model, carrier) must see this forward's input_ids"
            )
        expert_scores = cached[1].scores(token_ids=ids, history=history)  # [T, E]
        # Sum over the experts each TP rank of the span hosts.
        return expert_scores @ span_hosts(self._rank_of(history.device), ep_base=self._ep_span(), tp=tp)

    def _route_scores(self, t: int, tp: int) -> torch.Tensor:
        """float32 [T, P] from the fitted RoutePredictor on the carrier's token ids: one gather
        from the layer's ``RankTable`` (compiled on first use and whenever the dispatcher's
        placement changes), on the ids' device, with no host synchronisation."""
        ids = self.carrier.token_ids
        if ids is None or ids.shape != (t,):
            raise ValueError(
                f"ShuffleTransformerLayer: predictor='route' needs carrier.token_ids of shape ({t},), got "
                f"{None if ids is None else tuple(ids.shape)}; attach shuffle_specs.feed_token_ids(model, carrier)"
            )
        return self._rank_table(tp, ids.device).lookup(ids)

    def _rank_table(self, tp: int, device: torch.device):
        """This layer's ``predict.rank_table.RankTable`` for the current placement."""
        from megatron_specmoe.predict.rank_table import compile_rank_table

        placement = self.mlp.token_dispatcher.placement
        cached = self._route_table
        if cached is not None and cached[0] is placement and cached[1].table.device == device:
            return cached[1]
        key = tuple(int(r) for r in placement.rank_of_logical())
        if cached is not None and cached[1].placement_key == key and cached[1].table.device == device:
            table = cached[1]
        else:
            table = compile_rank_table(
                self.carrier.options.route_predictor, layer=self.moe_index, placement=placement,
                ep_base=self._ep_span(), tp=tp, vocab_size=self.carrier.options.route_vocab_size,
                device=device,
            )
        self._route_table = (placement, table)
        return table

    def shuffle_plan(self, ln_full: torch.Tensor, history: Optional[torch.Tensor] = None,
                     gate_experts: Optional[torch.Tensor] = None) -> ShufflePlan:
        """The balanced plan for this layer (identical on every TP rank)."""
        return assign(self.rank_scores(ln_full, history, gate_experts), self.carrier.options.method,
                      validate=False)

    # ---- route history ---------------------------------------------------------------------------
    @property
    def _carries_routes(self) -> bool:
        return self.carrier.options.predictor == "history"

    @property
    def _gates_shards(self) -> bool:
        """pregate / adversarial with sequence parallelism: gate this rank's rows before the
        all-gather and gather the ids (the gathered rows are the same bytes either way)."""
        return self.config.sequence_parallel and self.carrier.options.predictor in ("pregate", "adversarial")

    def _incoming_routes(self, hidden_states: torch.Tensor) -> Optional[RouteHistory]:
        routes = self.carrier.routes
        return routes if routes is not None and routes.tensor is hidden_states else None

    def _shard_routes(self, real: int, capacity: int) -> torch.Tensor:
        """int64 [C, k]: this layer's routes of the shard's real rows, then 0 for the pad row."""
        mine = self._last_routes
        k = self.config.moe_router_topk
        if mine is None:
            raise ValueError("ShuffleTransformerLayer: the router hook recorded no routes this forward")
        mine = mine[:real]
        if real < capacity:
            mine = torch.cat([mine, mine.new_zeros(capacity - real, k)], dim=0)
        return mine

    # ---- forward ---------------------------------------------------------------------------------
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        context: Optional[torch.Tensor] = None,
        context_mask: Optional[torch.Tensor] = None,
        rotary_pos_emb: Optional[torch.Tensor] = None,
        rotary_pos_cos: Optional[torch.Tensor] = None,
        rotary_pos_sin: Optional[torch.Tensor] = None,
        rotary_pos_cos_sin: Optional[torch.Tensor] = None,
        attention_bias: Optional[torch.Tensor] = None,
        inference_context: Optional[Any] = None,
        packed_seq_params: Optional[Any] = None,
        sequence_len_offset: Optional[torch.Tensor] = None,
        padding_mask: Optional[torch.Tensor] = None,
        *,
        inference_params: Optional[Any] = None,
        **unsupported: Any,
    ):
        """Megatron's TransformerLayer arguments; returns (hidden_states, context).

        Sequence parallel on: ``hidden_states`` is this rank's shard ([S/P, B, H] contiguous from
        the embedding, or [C, 1, H] from the previous shuffle layer) and so is the output.
        Off: [S, B, H] in true order in and out.
        """
        if self.training:
            raise ValueError("ShuffleTransformerLayer is for inference; call model.eval()")
        if context is not None or packed_seq_params is not None or padding_mask is not None or unsupported:
            raise ValueError(
                "ShuffleTransformerLayer does not support cross-attention context, packed sequences "
                f"or padding_mask (got extra {sorted(unsupported)}); pass None"
            )
        inference_context = inference_context if inference_context is not None else inference_params
        gate_experts: Optional[torch.Tensor] = None
        if inference_context is not None and not _is_static(inference_context):
            raise ValueError(
                "ShuffleTransformerLayer: Megatron's dynamic inference context (continuous batching of "
                "packed requests) is not supported yet; serve with the static context "
                "(StaticInferenceContext, Megatron's static batching engine) or build the model without "
                "the shuffle spec (the specmoe dispatcher alone works with either)"
            )
        group = self.tp_group
        tp = group.size()
        rank = _group_rank(group)
        counter = self.carrier.counter
        sp = self.config.sequence_parallel
        h = hidden_states.shape[-1]

        # Step 1: the layer input in true order ([S, B, H]) and this rank's residual rows.
        ln = self.input_layernorm(hidden_states)
        if sp:
            if self.carrier.output_consumer is None:
                raise ValueError(
                    "ShuffleTransformerLayer with sequence_parallel=True leaves tokens in shuffled order; "
                    "call shuffle_specs.true_order_output(model, carrier) for a GPTModel, or set "
                    "carrier.output_consumer='restore_true_order' and pass the last output to "
                    "restore_true_order()"
                )
            prev = self._previous_state(hidden_states, tp)
            seq, batch = prev.seq, prev.batch
            incoming = self._incoming_routes(hidden_states) if self._carries_routes else None
            history = None if incoming is None else incoming.history
            # k expert ids per row ride along with this all-gather: the previous layer's routes
            # ("history"), or this layer's gate on this rank's own rows ("pregate": each rank
            # gates 1/P of the tokens instead of all of them).
            ids = incoming.pending if incoming is not None else None
            if ids is None and self._gates_shards:
                ids = top_experts(self.mlp.router.gating(ln.reshape(-1, h)), self.config.moe_router_topk)
            if ids is not None:
                packed = deferred_all_gather(append_route_columns(ln.reshape(-1, h), ids),
                                             prev.plan, group, counter=counter)
                ln_flat, gathered = split_route_columns(packed, self.config.moe_router_topk)
                ln_full = ln_flat.contiguous().view(seq, batch, h)
                if self._gates_shards:
                    gate_experts = gathered
                else:
                    history = torch.cat([history, gathered.unsqueeze(1)], dim=1)
            else:
                ln_full = deferred_all_gather(ln.reshape(-1, h), prev.plan, group, counter=counter)
                ln_full = ln_full.view(seq, batch, h)
            # A shard holds its real tokens first, then its pad row (if any).
            prev_real = real_capacities(prev.plan.num_tokens, tp)[rank]
            start = rank * prev.plan.capacity
            residual_rows = prev.plan.order[start : start + prev_real]
            residual = hidden_states.reshape(-1, h)[:prev_real]
        else:
            seq, batch = hidden_states.shape[0], hidden_states.shape[1]
            ln_full = ln
            incoming = self._incoming_routes(hidden_states) if self._carries_routes else None
            history = None if incoming is None else incoming.history
        num_tokens = seq * batch
        if self._carries_routes and history is None:  # the first MoE layer of this forward
            history = torch.zeros(num_tokens, 0, self.config.moe_router_topk, dtype=torch.long,
                                  device=hidden_states.device)

        # Step 2: attention on true order; linear_proj returns the partial sum and its bias.
        partial, proj_bias = self.self_attention(
            ln_full,
            attention_mask=attention_mask,
            inference_context=inference_context,
            rotary_pos_emb=rotary_pos_emb,
            rotary_pos_cos=rotary_pos_cos,
            rotary_pos_sin=rotary_pos_sin,
            rotary_pos_cos_sin=rotary_pos_cos_sin,
            attention_bias=attention_bias,
            packed_seq_params=None,
            sequence_len_offset=sequence_len_offset,
        )

        # Step 3: the balanced plan, identical on every TP rank.
        plan = self.shuffle_plan(ln_full, history, gate_experts)
        if self.carrier.options.keep_plans:
            self.carrier.plans.append((self.layer_number, plan))

        # Step 4: fold residual (+ bias) rows this rank holds, permute, reduce-scatter.
        real = real_capacities(num_tokens, tp)[rank]
        if not sp:
            residual_rows = plan.order[rank * plan.capacity : rank * plan.capacity + real]
            residual = hidden_states.reshape(num_tokens, h).index_select(0, residual_rows)
        fold = residual if proj_bias is None else residual + proj_bias
        shard = shuffled_reduce_scatter(
            partial.reshape(num_tokens, h), plan, group,
            fold_rows=residual_rows, fold=fold, counter=counter,
        )

        # Step 5: MoE on the real rows of the shard (pad rows never reach the router). A rank
        # with no real token (T < P, e.g. a decode step) still takes part in the EP collectives:
        # it routes its one zero pad row, whose output is dropped (it shows in the accounting).
        rows = max(real, 1)
        x = shard[:rows].view(rows, 1, h)
        mlp_out, mlp_bias = self.mlp(self.pre_mlp_layernorm(x))
        out = x + mlp_out if mlp_bias is None else x + mlp_out + mlp_bias
        if real < plan.capacity:
            out = torch.cat([out[:real], out.new_zeros(plan.capacity - real, 1, h)], dim=0)
        self.carrier.calls += 1

        if sp:
            self.carrier.state = ShuffleState(plan=plan, seq=seq, batch=batch, tensor=out)
            if self._carries_routes:
                self.carrier.routes = RouteHistory(tensor=out, history=history,
                                                   pending=self._shard_routes(real, plan.capacity))
            return out, context
        # Step 6: the deferred all-gather back to true order (with this layer's routes for
        # predictor "history").
        if self._carries_routes:
            packed = deferred_all_gather(
                append_route_columns(out.view(plan.capacity, h), self._shard_routes(real, plan.capacity)),
                plan, group, counter=counter,
            )
            full, new = split_route_columns(packed, self.config.moe_router_topk)
            result = full.contiguous().view(seq, batch, h)
            self.carrier.routes = RouteHistory(tensor=result, history=torch.cat([history, new.unsqueeze(1)], dim=1))
            return result, context
        full = deferred_all_gather(out.view(plan.capacity, h), plan, group, counter=counter)
        return full.view(seq, batch, h), context

    def _previous_state(self, hidden_states: torch.Tensor, tp: int) -> ShuffleState:
        state = self.carrier.state
        if state is not None and state.tensor is hidden_states:
            return state
        # Megatron's contiguous sequence-parallel shard [S/P, B, H]: the contiguous plan.
        seq, batch = hidden_states.shape[0] * tp, hidden_states.shape[1]
        t = seq * batch
        plan = assign(torch.zeros(t, tp), "contiguous", validate=False)
        return ShuffleState(plan=plan, seq=seq, batch=batch, tensor=hidden_states)


def restore_true_order(shard: torch.Tensor, carrier: ShuffleCarrier, group, *, counter=None) -> torch.Tensor:
    """Turn the last shuffle layer's output shard back into Megatron's contiguous sequence-parallel
    shard [S/P, B, H] (true order). Costs one all-gather of the hidden states; a model whose
    output layer all-gathers anyway can use ``deferred_all_gather`` there instead.

    Args:
        shard: float [C, 1, H], the output of the last ShuffleTransformerLayer on this rank.
        carrier: the model's ShuffleCarrier (its state must describe ``shard``).
        group: the TP group.
    """
    state = carrier.state
    if state is None or state.tensor is not shard:
        raise ValueError("restore_true_order: the carrier's state does not describe this tensor")
    h = shard.shape[-1]
    full = deferred_all_gather(shard.reshape(-1, h), state.plan, group, counter=counter)
    tp = group.size()
    if state.seq % tp:
        raise ValueError(f"restore_true_order: S={state.seq} is not a multiple of TP={tp}")
    rank = _group_rank(group)
    per = state.seq // tp
    return full.view(state.seq, state.batch, h)[rank * per : (rank + 1) * per]


def _check_config(config) -> None:
    """Refuse settings the shuffle layer does not support, naming the field and the fix."""
    problems = []
    if getattr(config, "expert_tensor_parallel_size", 1) not in (1, None):
        problems.append("expert_tensor_parallel_size must be 1 (MoE parallel folding)")
    if getattr(config, "context_parallel_size", 1) != 1:
        problems.append("context_parallel_size must be 1")
    if getattr(config, "recompute_granularity", None) is not None:
        problems.append("recompute_granularity must be None (inference)")
    if getattr(config, "inference_fuse_tp_communication", False):
        problems.append("inference_fuse_tp_communication must be False (the shuffle owns those collectives)")
    if getattr(config, "moe_pad_expert_input_to_capacity", False):
        problems.append("moe_pad_expert_input_to_capacity must be False (dropless routing)")
    if getattr(config, "moe_token_dispatcher_type", None) != "specmoe":
        problems.append("moe_token_dispatcher_type must be 'specmoe'")
    if getattr(config, "sequence_parallel", False) and getattr(config, "pipeline_model_parallel_size", 1) > 1:
        problems.append(
            "pipeline_model_parallel_size must be 1 with sequence_parallel=True (the residual order "
            "does not cross pipeline stages); turn sequence parallelism off for pipelined inference"
        )
    if getattr(config, "tp_comm_overlap", False):
        problems.append("tp_comm_overlap must be False (the shuffle owns attention's TP collectives)")
    if getattr(config, "cuda_graph_impl", "none") not in ("none", None):
        problems.append("cuda_graph_impl must be 'none'")
    if problems:
        raise ValueError("ShuffleTransformerLayer: " + "; ".join(problems))
