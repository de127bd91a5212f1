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
collectives sit and which rows they carry changes). ``forward`` reads as these stages, each a
method: ``gather_input`` (1), ``attention`` (2), ``plan`` (3), ``shuffled_reduce_scatter`` (4),
``moe`` (5) and ``hand_on`` (6, or the carrier's state with sequence parallelism).

Sequence parallel on (input: this rank's C residual rows in the previous layer's shuffled order;
the first layer's input is Megatron's contiguous shard, i.e. the contiguous plan):
  1. input layernorm on the shard, then the all-gather that sequence parallelism performs anyway,
     followed by the inverse of the previous plan: attention sees [S, B, H] in true order. k
     expert ids per row may ride along in k extra columns (``comm.shuffle.append_route_columns``):
     with "pregate", this rank's gate on its own rows (each rank gates 1/P of the tokens); with
     "history", the previous layer's real routes.
  2. attention with linears that do not communicate (``NoComm*ParallelLinear``): qkv gets the
     gathered input, the output projection returns its partial sum (multi-latent attention:
     Megatron's MLA without sequence parallelism inside, ``megatron/shuffle_deepseek.py``).
  3. predict each token's EP rank from data every TP rank holds identically (one ``RankScorer``
     per layer, ``predict/rank_scorers.py``: "pregate" = this layer's router on the normalised
     layer input; "route" = a fitted predictor on token ids; "history" = on the carried routes)
     and compute the balanced plan (``schedule.assignment.assign``; deterministic, so identical
     on every rank).
  4. fold: each rank adds the residual rows it holds (+ the projection bias) into its partial sum,
     permute by the plan, reduce-scatter (``comm.shuffle.shuffled_reduce_scatter``): TP rank r
     receives the tokens predicted for its experts, already with attention + residual + bias.
  5. pre-MLP layernorm and the MoE layer on the real rows of the shard (the specmoe dispatcher
     finds most (token, expert) pairs local), plus the residual. Shared experts at TP > 1 run
     once per token in their sequence-parallel form on the whole shard and join the routed output
     before the residual, as in Megatron's MoELayer (``megatron/shuffle_deepseek.py``). Output: [C, 1, H] in the new
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

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.moe.moe_utils import get_capacity
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_specmoe.comm.shuffle import (
    append_route_columns,
    deferred_all_gather,
    shuffled_reduce_scatter,
    split_route_columns,
)
from megatron_specmoe.megatron.shared_plans import gather_sharing_plans, shared_plan, shares_plans
from megatron_specmoe.megatron.shuffle_deepseek import shard_shared_experts
from megatron_specmoe.megatron.shuffle_linears import NoCommColumnParallelLinear, NoCommRowParallelLinear
from megatron_specmoe.megatron.shuffle_refusals import graph_predictor_problem, layer_refusals, moe_layer_numbers
from megatron_specmoe.megatron.shuffle_state import RouteHistory, ShuffleCarrier, ShuffleOptions, ShuffleState
from megatron_specmoe.predict.pregate import top_experts
from megatron_specmoe.predict.rank_scorers import ScoreInputs, make_rank_scorer
from megatron_specmoe.predict.vocabulary import ShufflePredictor
from megatron_specmoe.schedule.assignment import ShufflePlan, assign, real_capacities

__all__ = [
    "ShufflePredictor",
    "ShuffleOptions",
    "ShuffleState",
    "ShuffleCarrier",
    "RouteHistory",
    "NoCommColumnParallelLinear",
    "NoCommRowParallelLinear",
    "LayerInput",
    "ShuffleTransformerLayer",
    "restore_true_order",
]


def _group_rank(group) -> int:
    """This process's rank in ``group`` (a ProcessGroup it belongs to): the group's own answer, a
    C++ attribute read, not ``dist.get_group_rank``'s Python-side table lookups (several per layer
    per forward)."""
    return group.rank()


@dataclass(frozen=True, kw_only=True)
class LayerInput:
    """Stage 1's result: the layer input in true order and what this rank folds in stage 4.

    Attributes:
        ln_full: float [S, B, H], the normalised layer input in true order (every TP rank).
        seq, batch: S and B.
        residual_rows: int64 [R] or None: with sequence parallelism, the true-order rows of the
            residual rows this rank holds (the previous plan's shard); None: chosen in stage 4.
        residual: float [R, H] or None: those residual rows.
        history: int64 [T, l, k] or None: the earlier MoE layers' routes (predictor "history").
        gate_experts: int64 [T, k] or None: this layer's gate on every token, gated shard by shard
            and gathered (pregate with sequence parallelism).
    """

    ln_full: torch.Tensor
    seq: int
    batch: int
    residual_rows: Optional[torch.Tensor] = None
    residual: Optional[torch.Tensor] = None
    history: Optional[torch.Tensor] = None
    gate_experts: Optional[torch.Tensor] = None

    @property
    def num_tokens(self) -> int:
        return self.seq * self.batch


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
        problem = graph_predictor_problem(config, carrier.options.predictor)
        if problem:
            raise ValueError("ShuffleTransformerLayer: " + problem)
        super().__init__(config, submodules, *args, **kwargs)
        self.carrier = carrier
        self._check_modules()
        # Shared experts at TP > 1 run here, on the whole shard (megatron.shuffle_deepseek).
        self._runs_shared_experts = shard_shared_experts(self.mlp, self.tp_group.size())
        self._ep_base: Optional[int] = None
        self._moe_index: Optional[int] = None
        self._rank_of_cache: Optional[tuple] = None  # (placement, int64 [E])
        self._contiguous_cache: Optional[tuple] = None  # ((T, P, device), the contiguous ShufflePlan)
        self.scorer = make_rank_scorer(carrier.options)
        self._side_stream = None  # the CUDA stream stage 3 runs on (``_plan_on_side_stream``)
        # predictor "history": the router's last top-k ids, kept by a forward hook on the router.
        self._last_routes: Optional[torch.Tensor] = None
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
        names = ("linear_proj",) if getattr(attn, "specmoe_shuffle_attention", False) else ("linear_qkv", "linear_proj")
        if not all(getattr(type(getattr(attn, name, None)), "specmoe_no_comm", False) for name in names):
            raise ValueError(
                "ShuffleTransformerLayer: self_attention must use non-communicating linears "
                "(NoCommColumnParallelLinear / NoCommRowParallelLinear, or their TE versions in "
                "megatron.te_shuffle) as linear_qkv / linear_proj (multi-latent attention: "
                "megatron.shuffle_deepseek.ShuffleMLASelfAttention); build the layer from get_gpt_layer_shuffle_spec"
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

    @property
    def moe_index(self) -> int:
        """This layer's index among the model's MoE layers (0-based), from ``config.moe_layer_freq``
        and the global ``layer_number``: the layer index of routing traces and plans."""
        if self._moe_index is None:
            numbers = moe_layer_numbers(self.config)
            if self.layer_number not in numbers:
                raise ValueError(
                    f"ShuffleTransformerLayer: layer {self.layer_number} is not an MoE layer by "
                    f"config.moe_layer_freq={getattr(self.config, 'moe_layer_freq', 1)!r}; the config "
                    "and the layer specs disagree"
                )
            self._moe_index = numbers.index(self.layer_number)
        return self._moe_index

    def _rank_of(self, device: torch.device) -> torch.Tensor:
        """int64 [E] EP rank of each logical expert, kept on ``device`` until the dispatcher's
        placement object changes (no host -> device copy per forward)."""
        placement = self.mlp.token_dispatcher.placement
        cached = self._rank_of_cache
        if cached is None or cached[0] is not placement or cached[1].device != device:
            cached = (placement, torch.as_tensor(placement.rank_of_logical(), device=device))
            self._rank_of_cache = cached
        return cached[1]

    # ---- route history ---------------------------------------------------------------------------
    @property
    def _carries_routes(self) -> bool:
        return self.carrier.options.predictor == "history"

    @property
    def _gates_shards(self) -> bool:
        """pregate / adversarial with sequence parallelism: gate this rank's rows before the
        all-gather and gather the ids (the gathered rows are the same bytes either way)."""
        return self.config.sequence_parallel and self.carrier.options.predictor in ("pregate", "adversarial")

    def _keep_routes(self, _router, _args, output) -> None:
        from megatron_specmoe.megatron.route_recorder import _topk_from_output

        if self.mlp.token_dispatcher.drop_and_pad:
            # Padded decode: the router's map marks every expert (capacity = T); the chosen ones are
            # those with a nonzero probability.
            probs = output[0]
            output = (probs, probs > 0)
        self._last_routes = _topk_from_output(output, self.config.moe_router_topk)[0]

    def _incoming_routes(self, hidden_states: torch.Tensor) -> Optional[RouteHistory]:
        routes = self.carrier.routes
        if not self._carries_routes or routes is None or routes.tensor is not hidden_states:
            return None
        return routes

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

    # ---- the stages --------------------------------------------------------------------------------
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
        x = self.gather_input(hidden_states)
        # Stage 3 needs only stage 1's output: on CUDA it runs on a side stream while attention
        # runs, joined by one event wait before the shuffled reduce-scatter; on the CPU in order.
        pending = self._plan_on_side_stream(x) if hidden_states.is_cuda and self.carrier.options.overlap_plan else None
        partial, proj_bias = self.attention(
            x.ln_full,
            attention_mask=attention_mask,
            inference_context=inference_context,
            rotary_pos_emb=rotary_pos_emb,
            rotary_pos_cos=rotary_pos_cos,
            rotary_pos_sin=rotary_pos_sin,
            rotary_pos_cos_sin=rotary_pos_cos_sin,
            attention_bias=attention_bias,
            sequence_len_offset=sequence_len_offset,
        )
        if pending is None:
            plan = self.plan(x)
        else:
            plan, done = pending
            torch.cuda.current_stream(hidden_states.device).wait_event(done)
        shard = self.shuffled_reduce_scatter(x, hidden_states, partial, proj_bias, plan)
        out, real = self.moe(shard, plan)
        return self.hand_on(out, real, plan, x), context

    def gather_input(self, hidden_states: torch.Tensor) -> LayerInput:
        """Stage 1: the normalised layer input in true order on every TP rank; with sequence
        parallelism the all-gather (carrying k route columns where the predictor needs them)
        and the inverse of the previous layer's plan."""
        incoming = self._incoming_routes(hidden_states)
        history = None if incoming is None else incoming.history
        ln = self.input_layernorm(hidden_states)
        if not self.config.sequence_parallel:
            x = LayerInput(ln_full=ln, seq=hidden_states.shape[0], batch=hidden_states.shape[1], history=history)
            return self._with_empty_history(x, hidden_states.device)
        if self.carrier.output_consumer is None:
            raise ValueError(
                "ShuffleTransformerLayer with sequence_parallel=True leaves tokens in shuffled order; "
                "call shuffle_specs.true_order_output(model, carrier) for a GPTModel, or set "
                "carrier.output_consumer='restore_true_order' and pass the last output to "
                "restore_true_order()"
            )
        group, counter = self.tp_group, self.carrier.counter
        tp, rank, h, k = group.size(), _group_rank(group), hidden_states.shape[-1], self.config.moe_router_topk
        prev = self._previous_state(hidden_states, tp)
        # k expert ids per row ride along with this all-gather: the previous layer's routes
        # ("history"), or this layer's gate on this rank's own rows ("pregate": each rank gates
        # 1/P of the tokens instead of all of them).
        ids = incoming.pending if incoming is not None else None
        if ids is None and self._gates_shards:
            ids = top_experts(self.mlp.router.gating(ln.reshape(-1, h)), k)
        gate_experts = None
        if ids is None and shares_plans(self, hidden_states, self._is_fresh(hidden_states)):
            ln_full = gather_sharing_plans(self, ln.reshape(-1, h), prev)
        elif ids is not None:
            packed = deferred_all_gather(append_route_columns(ln.reshape(-1, h), ids), prev.plan, group,
                                         counter=counter)
            ln_flat, gathered = split_route_columns(packed, k)
            ln_full = ln_flat.contiguous().view(prev.seq, prev.batch, h)
            if self._gates_shards:
                gate_experts = gathered
            else:
                history = torch.cat([history, gathered.unsqueeze(1)], dim=1)
        else:  # ln_full dies inside this layer: the carrier's workspace holds it
            ln_full = deferred_all_gather(ln.reshape(-1, h), prev.plan, group, counter=counter,
                                          workspace=self.carrier.workspace)
            ln_full = ln_full.view(prev.seq, prev.batch, h)
        # A shard holds its real tokens first, then its pad row (if any).
        prev_real = real_capacities(prev.plan.num_tokens, tp)[rank]
        start = rank * prev.plan.capacity
        x = LayerInput(ln_full=ln_full, seq=prev.seq, batch=prev.batch,
                       residual_rows=prev.plan.order[start : start + prev_real],
                       residual=hidden_states.reshape(-1, h)[:prev_real],
                       history=history, gate_experts=gate_experts)
        return self._with_empty_history(x, hidden_states.device)

    def _with_empty_history(self, x: LayerInput, device: torch.device) -> LayerInput:
        """The first MoE layer of a forward starts an empty history (predictor "history")."""
        if not self._carries_routes or x.history is not None:
            return x
        empty = torch.zeros(x.num_tokens, 0, self.config.moe_router_topk, dtype=torch.long, device=device)
        return LayerInput(**{**x.__dict__, "history": empty})

    def attention(self, ln_full: torch.Tensor, **kwargs: Any):
        """Stage 2: Megatron's self-attention on the true-order input; its output projection does
        not communicate and returns (partial sum float [S, B, H], bias or None)."""
        return self.self_attention(ln_full, packed_seq_params=None, **kwargs)

    @torch.no_grad()
    def rank_scores(self, x: Optional[LayerInput], num_tokens: int = 0) -> torch.Tensor:
        """float32 [T, P]: how well each TP rank suits each token, from this layer's scorer. x None:
        from token ids alone, ahead of this layer (predictor "route", ``shared_plans``), T = num_tokens."""
        t = num_tokens if x is None else x.num_tokens
        ln_flat = None if x is None else x.ln_full.reshape(t, -1)
        return self.scorer(ScoreInputs(
            num_tokens=t, tp=self.tp_group.size(), ep_base=self._ep_span(),
            moe_index=self.moe_index if self.carrier.options.predictor in ("route", "history") else -1,
            layer_number=self.layer_number, call=self.carrier.calls, placement=self.mlp.token_dispatcher.placement,
            rank_of=self._rank_of(self.carrier.token_ids.device if x is None else ln_flat.device),
            layer_input=ln_flat, gate=self.mlp.router.gating, topk=self.config.moe_router_topk,
            gate_experts=None if x is None else x.gate_experts, token_ids=self.carrier.token_ids,
            history=None if x is None else x.history,
        ))

    def assign_plan(self, scores: torch.Tensor) -> ShufflePlan:
        """The balanced plan for float32 [T, P] ``scores`` (counted in ``carrier.plans_made``)."""
        self.carrier.plans_made += 1
        return assign(scores, self.carrier.options.method, validate=False)

    def plan(self, x: LayerInput) -> ShufflePlan:
        """Stage 3: the balanced plan over the T tokens and the P TP ranks (identical on every TP
        rank: the scores are, and the assignment is deterministic), or this forward's shared plan."""
        plan = shared_plan(self) or self.assign_plan(self.rank_scores(x))
        if self.carrier.options.keep_plans and plan.order.is_cuda and torch.cuda.is_current_stream_capturing():
            raise ValueError("ShuffleTransformerLayer: ShuffleOptions.keep_plans=True under CUDA-graph capture "
                             "(a replay would not append its plan); turn keep_plans off for graphed decode")
        if self.carrier.options.keep_plans:
            self.carrier.plans.append((self.layer_number, plan))
        return plan

    def _plan_on_side_stream(self, x: LayerInput):
        """Stage 3 on this layer's side CUDA stream: (plan, event recorded when it is done). The
        side stream first waits for the main stream (stage 1's tensors); the plan's tensors are
        marked as used by the main stream and stage 1's as used by the side stream, so that the
        caching allocator reuses neither too early. Capturable in a CUDA graph (fork and join by
        events)."""
        device = x.ln_full.device
        main = torch.cuda.current_stream(device)
        if self._side_stream is None or self._side_stream.device != device:
            self._side_stream = torch.cuda.Stream(device=device)
        side = self._side_stream
        side.wait_stream(main)
        with torch.cuda.stream(side):
            plan = self.plan(x)
            done = torch.cuda.Event()
            done.record(side)
        for t in (x.ln_full, x.history, x.gate_experts):
            if t is not None:
                t.record_stream(side)
        for t in (plan.home_rank, plan.order, plan.inverse):
            t.record_stream(main)
        return plan, done

    def shuffled_reduce_scatter(self, x: LayerInput, hidden_states: torch.Tensor, partial: torch.Tensor,
                                proj_bias: Optional[torch.Tensor], plan: ShufflePlan) -> torch.Tensor:
        """Stage 4: fold the residual (+ bias) rows this rank holds into its partial sum, permute
        by the plan, reduce-scatter: float [C, H], this rank's predicted tokens."""
        group = self.tp_group
        tp, rank, h = group.size(), _group_rank(group), hidden_states.shape[-1]
        residual_rows, residual = x.residual_rows, x.residual
        if residual_rows is None:  # sequence parallel off: fold the rows of this rank's new shard
            real = real_capacities(x.num_tokens, tp)[rank]
            residual_rows = plan.order[rank * plan.capacity : rank * plan.capacity + real]
            residual = hidden_states.reshape(x.num_tokens, h).index_select(0, residual_rows)
        fold = residual if proj_bias is None else residual + proj_bias
        return shuffled_reduce_scatter(partial.reshape(x.num_tokens, h), plan, group,
                                       fold_rows=residual_rows, fold=fold, counter=self.carrier.counter,
                                       workspace=self.carrier.workspace)

    def moe(self, shard: torch.Tensor, plan: ShufflePlan) -> tuple[torch.Tensor, int]:
        """Stage 5: pre-MLP norm and the MoE layer on the shard's real rows, plus the residual
        (shared experts at TP > 1: on every row of the shard, added to the routed output).
        Returns (float [C, 1, H] with zero pad rows, real rows). A rank with no real token (T < P,
        e.g. a decode step) still takes part in the EP collectives: it routes its one zero pad
        row, whose output is dropped (it shows in the accounting). In Megatron's padded decode
        (the dispatcher's ``drop_and_pad``) every rank routes all C rows, so that every EP rank
        sends the same static capacity (``_padded_rows``)."""
        h = shard.shape[-1]
        real = real_capacities(plan.num_tokens, self.tp_group.size())[_group_rank(self.tp_group)]
        rows = self._padded_rows(plan.capacity) if self.mlp.token_dispatcher.drop_and_pad else max(real, 1)
        x = shard[:rows].view(rows, 1, h)
        if self._runs_shared_experts:
            # Shared experts on all C rows (their TP all-gather / reduce-scatter need equal shards,
            # megatron.shuffle_deepseek), routed experts on the real rows; joined as MoELayer does.
            normed = self.pre_mlp_layernorm(shard.view(shard.shape[0], 1, h))
            shared = self.mlp.shared_experts(normed)[:rows]
            mlp_out, mlp_bias = self.mlp(normed[:rows])
            mlp_out = mlp_out + shared
        else:
            mlp_out, mlp_bias = self.mlp(self.pre_mlp_layernorm(x))
        out = x + mlp_out if mlp_bias is None else x + mlp_out + mlp_bias
        if real < plan.capacity:
            out = torch.cat([out[:real], out.new_zeros(plan.capacity - real, 1, h)], dim=0)
        self.carrier.calls += 1
        return out, real

    def _padded_rows(self, capacity: int) -> int:
        """Rows the MoE layer routes in drop-and-pad mode: all C rows of the shard (equal on every
        rank, so the all-to-all's equal splits line up), refused where the dispatcher's capacity
        would drop a pair: the shuffle moves tokens between ranks, so a drop would fall on other
        tokens than Megatron's. Host arithmetic on shapes only."""
        dispatcher = self.mlp.token_dispatcher
        factor = getattr(dispatcher, "moe_expert_capacity_factor", None)
        if factor is None or dispatcher.padded_capacity(capacity) < capacity or get_capacity(
                num_tokens=capacity * self.config.moe_router_topk, num_experts=self.mlp.router.weight.shape[0],
                capacity_factor=factor) < capacity:
            raise ValueError(
                f"ShuffleTransformerLayer: the dispatcher pads to capacity (drop_and_pad) with "
                f"moe_expert_capacity_factor={factor!r}, which drops tokens at {capacity} rows per rank; the "
                "shuffle is lossless only when nothing is dropped: use num_moe_experts / moe_router_topk, "
                "the factor Megatron's padded decode sets (--moe-pad-experts-for-cuda-graph-inference)"
            )
        return capacity

    def hand_on(self, out: torch.Tensor, real: int, plan: ShufflePlan, x: LayerInput) -> torch.Tensor:
        """Stage 6: what the next layer receives. Sequence parallel on: this shard, with the plan
        (and this layer's routes, for "history") in the carrier. Off: the deferred all-gather back
        to true order [S, B, H] (carrying this layer's routes for "history")."""
        group, counter, h = self.tp_group, self.carrier.counter, out.shape[-1]
        if self.config.sequence_parallel:
            self.carrier.state = ShuffleState(plan=plan, seq=x.seq, batch=x.batch, tensor=out)
            if self._carries_routes:
                self.carrier.routes = RouteHistory(tensor=out, history=x.history,
                                                   pending=self._shard_routes(real, plan.capacity))
            return out
        if self._carries_routes:
            packed = deferred_all_gather(
                append_route_columns(out.view(plan.capacity, h), self._shard_routes(real, plan.capacity)),
                plan, group, counter=counter,
            )
            full, new = split_route_columns(packed, self.config.moe_router_topk)
            result = full.contiguous().view(x.seq, x.batch, h)
            self.carrier.routes = RouteHistory(tensor=result, history=torch.cat([x.history, new.unsqueeze(1)], dim=1))
            return result
        full = deferred_all_gather(out.view(plan.capacity, h), plan, group, counter=counter)
        return full.view(x.seq, x.batch, h)

    def _is_fresh(self, hidden_states: torch.Tensor) -> bool:
        """True when the input is not the shard the previous shuffle layer handed on."""
        return self.carrier.state is None or self.carrier.state.tensor is not hidden_states

    def _previous_state(self, hidden_states: torch.Tensor, tp: int) -> ShuffleState:
        state = self.carrier.state
        if state is not None and state.tensor is hidden_states:
            return state
        # Megatron's contiguous sequence-parallel shard [S/P, B, H]: the contiguous plan, which
        # depends on (T, P) only: made once per shape, not once per forward.
        seq, batch = hidden_states.shape[0] * tp, hidden_states.shape[1]
        key = (seq * batch, tp, hidden_states.device)
        cached = self._contiguous_cache
        if cached is None or cached[0] != key:
            plan = assign(torch.zeros(seq * batch, tp, device=hidden_states.device), "contiguous", validate=False)
            cached = (key, plan)
            self._contiguous_cache = cached
        return ShuffleState(plan=cached[1], seq=seq, batch=batch, tensor=hidden_states)


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
    """Refuse settings the shuffle layer does not support (``shuffle_refusals``: the one table the
    launcher reads too), naming the field and the fix."""
    problems = layer_refusals(config)
    if problems:
        raise ValueError("ShuffleTransformerLayer: " + "; ".join(problems))
