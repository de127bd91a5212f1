"""The run-time half of Megatron-LM's ``--specmoe-*`` flags: apply the plan, record routes, write stats.

Glossary
    chunk: one model as Megatron-LM's ``get_model`` returns it, usually wrapped (DDP,
        ``Float16Module``: the wrapped module is ``.module``); a list of chunks with virtual
        pipeline stages. ``unwrap_chunks`` reaches the ``GPTModel`` of each.
    settings: what the command line asked for (``RuntimeSettings.from_args``).
    runtime: what ``setup_specmoe_runtime`` attached to one model (``SpecMoERuntime``); it is kept
        on the first unwrapped chunk (attribute ``_specmoe_runtime``), so a second call finds it.

What each flag does here (``megatron_lm/args.py`` parses and checks them before any GPU work):

``--moe-token-dispatcher-type specmoe --specmoe-plan DIR``
    ``load_plan(DIR)``, ``check_compatible`` against the built model (MoE layers, experts, top-k,
    EP size, hidden size; vocabulary when ``args.padded_vocab_size`` is known), then
    ``apply_plan.apply_placements(..., mode="dispatcher")``: expert weights move between EP ranks
    and each ``SpecMoETokenDispatcher`` routes by the placement. With pipeline parallelism each
    stage takes the placements of its own MoE layers (by Megatron's global layer number).
    After a checkpoint load the experts are in Megatron's contiguous order again, so the plan is
    applied from there; called without a load, the move starts from the placement the dispatchers
    hold now (applying the same plan twice moves nothing).
    A plan with redundant experts (``specmoe plan --redundant-experts R``): every MoE layer is
    swapped for its E + R-slot twin (``megatron/replicas.replicate_layers``: the plain layer's
    router, shared experts and base experts, plus r new replica experts per rank), then
    ``apply_plan.apply_replicas`` moves the base experts and copies the replicas in, and the
    dispatchers route by the plan's route table. Before Megatron-LM's ``load_checkpoint`` runs, the
    hook swaps the plain layers back (``prepare_specmoe_load``), so the checkpoint loads into the
    model it was saved from; afterwards the twins come back and are filled again. Refused (by
    ``megatron_lm/checks.check_replicas``, before any GPU work): token shuffling (TP > 1) and
    ``--moe-grouped-gemm``; twins raise in training mode.
``--specmoe-record-routes DIR``  (any dispatcher)
    A ``RouteRecorder`` on every router plus a pre-hook on the first chunk that keeps the
    ``input_ids`` of each forward. Written with ``trace_io.write_trace`` as
    ``DIR/routes-rank{global rank:05d}-part{n:04d}.npz`` at exit, or every N model forwards with
    ``--specmoe-record-every N``; ``specmoe plan --traces DIR`` reads the folder (every ``*.npz``
    in it). Token ids are stored when each forward's ``input_ids`` line up with the routed tokens
    (also for a sequence-parallel shard); otherwise the trace is written without them and stderr
    says why. With TP > 1 and no sequence parallelism all TP ranks route the same tokens, so only
    TP rank 0 writes. Pipeline parallelism is refused (each stage sees other layers).
``--specmoe-shuffle``  (specmoe dispatcher; the layer specs were made shuffle specs by
    ``megatron_lm.shuffle_hook.install_shuffle_hook`` while the model was built)
    ``megatron_shuffle.attach_shuffle_outputs`` on the unwrapped chunks: with sequence parallelism
    the output layer restores true order inside its own all-gather; with
    ``--specmoe-predictor token`` (or combined) each forward's token ids reach the layers. A chunk whose
    MoE layers are not shuffle layers is refused (the script built its spec some other way).
``--specmoe-request-placement``  (specmoe dispatcher, a plan with a token table, TP = 1)
    ``dp_coordinator.install_request_routing(plan, weight=--specmoe-request-weight)``: the
    dynamic engine started later in this process spawns ``SpecMoECoordinator``, which places each
    request on the DP rank whose experts its prompt is predicted to use (within its free slots).
    ``close()`` uninstalls it.
``--save`` with ``--specmoe-plan`` is refused: a checkpoint saved after the move would store
    experts under the wrong names.
``--specmoe-stats PATH``  (specmoe dispatcher)
    A ``DispatchRecorder`` on every specmoe dispatcher; at exit one JSON line per MoE layer:
    ``rank, ep_rank, ep_size, layer_number, forwards, measures`` (``RouteMeasures.summary()`` of
    all forwards summed), ``pairs_to_rank``, ``dispatch_bytes_to_rank``,
    ``combine_bytes_from_rank``. ``{rank}`` in PATH is replaced by the global rank; without it and
    with more than one rank, ``.rank{R}`` goes before the suffix (stderr says so).

Ways in:
1. ``install_runtime_hook()`` (``specmoe-launch`` does it): wraps Megatron-LM's
   ``megatron.training.checkpointing.load_checkpoint`` (the model is its first argument) and
   ``megatron.training.training.get_model`` (the model is its result), in those modules and in
   every loaded module that imported them by name; afterwards ``setup_specmoe_runtime(model,
   get_args(), after_load=True)`` runs. ``uninstall_runtime_hook()`` reverts (``megatron/patching``).
   Both are idempotent.
2. ``setup_specmoe_runtime(model, args)`` by hand, for scripts that build the model otherwise.

Writing happens at interpreter exit (``atexit``) or by ``SpecMoERuntime.close()``; no collective
communication is needed then. Hooks do not fire inside captured CUDA graphs: record routes and
stats without ``--cuda-graph-impl``/``--enable-cuda-graph``. Nothing here runs at import time.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from megatron_specmoe.megatron.shuffle_refusals import moe_layer_numbers

__all__ = [
    "RuntimeSettings",
    "SpecMoERuntime",
    "unwrap_chunks",
    "moe_layer_numbers",
    "apply_specmoe_plan",
    "prepare_specmoe_load",
    "setup_specmoe_runtime",
    "stats_path_for_rank",
]

DISPATCHER = "specmoe"
_RUNTIME_ATTR = "_specmoe_runtime"


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True, kw_only=True)
class RuntimeSettings:
    """What the command line asks of the running model.

    Attributes:
        dispatcher: ``args.moe_token_dispatcher_type``.
        plan: plan folder, applied only with the specmoe dispatcher; or None.
        record_routes: folder for route traces; or None.
        record_every: write a trace part every this many model forwards (0: at exit only).
        stats: stats path (may hold ``{rank}``); or None.
        shuffle: ``--specmoe-shuffle`` (shuffle layers need their output / token-id hooks).
        request_weight: ``--specmoe-request-weight`` when ``--specmoe-request-placement`` is on,
            else None.
    """

    dispatcher: str
    plan: Optional[Path] = None
    record_routes: Optional[Path] = None
    record_every: int = 0
    stats: Optional[str] = None
    shuffle: bool = False
    request_weight: Optional[float] = None

    @classmethod
    def from_args(cls, args: Any) -> "RuntimeSettings":
        every = int(getattr(args, "specmoe_record_every", 0) or 0)
        if every < 0:
            raise ValueError(f"--specmoe-record-every {every}: must be >= 0 (0: write at exit only)")
        plan = getattr(args, "specmoe_plan", None)
        routes = getattr(args, "specmoe_record_routes", None)
        return cls(
            dispatcher=str(getattr(args, "moe_token_dispatcher_type", "alltoall")),
            plan=Path(plan) if plan else None,
            record_routes=Path(routes) if routes else None,
            record_every=every,
            stats=getattr(args, "specmoe_stats", None) or None,
            shuffle=bool(getattr(args, "specmoe_shuffle", False)),
            request_weight=(float(getattr(args, "specmoe_request_weight", 0.5))
                            if getattr(args, "specmoe_request_placement", False) else None),
        )

    @property
    def applies_plan(self) -> bool:
        return self.dispatcher == DISPATCHER and self.plan is not None

    @property
    def active(self) -> bool:
        return self.applies_plan or self.record_routes is not None or (
            self.dispatcher == DISPATCHER and (self.stats is not None or self.shuffle)) or (
            self.places_requests)

    @property
    def places_requests(self) -> bool:
        return self.request_weight is not None and self.dispatcher == DISPATCHER and self.plan is not None


# --------------------------------------------------------------------------- model helpers


def unwrap_chunks(model: Any) -> list[torch.nn.Module]:
    """The innermost modules of ``model`` (a module or a list of chunks), following ``.module``
    through Megatron's wrappers (DDP, Float16Module)."""
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    if not chunks:
        raise ValueError("specmoe runtime: the model is an empty list of chunks")
    out = []
    for i, chunk in enumerate(chunks):
        seen = 0
        while isinstance(getattr(chunk, "module", None), torch.nn.Module) and seen < 16:
            chunk, seen = chunk.module, seen + 1
        if not isinstance(chunk, torch.nn.Module):
            raise ValueError(f"specmoe runtime: model chunk {i} is a {type(chunk).__name__}, not a "
                             "torch.nn.Module")
        out.append(chunk)
    return out


def _container(chunks: Sequence[torch.nn.Module]) -> torch.nn.Module:
    """One module whose ``modules()`` walks every chunk in order (the chunks are not copied)."""
    return chunks[0] if len(chunks) == 1 else torch.nn.ModuleList(chunks)




def _dist_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


# --------------------------------------------------------------------------- plan


def apply_specmoe_plan(model: Any, plan_dir: Path, *, after_load: bool,
                       vocab_size: Optional[int] = None):
    """Load the plan in ``plan_dir``, check it against ``model`` and apply its placements to this
    stage's MoE layers (mode "dispatcher"). Call on every rank. Returns ``apply_plan.ApplyReport``.

    Args:
        model: a module or list of chunks, wrapped or not; built with the specmoe dispatcher.
        after_load: the experts are in Megatron's contiguous order (just built or just loaded
            from a checkpoint); otherwise they are where the dispatchers' placements say.
        vocab_size: the padded vocabulary, compared with the plan's when both are known.
    """
    from megatron_specmoe.megatron.apply_plan import apply_placements
    from megatron_specmoe.megatron.model_tools import moe_sites
    from megatron_specmoe.megatron.replicas import logical_config
    from megatron_specmoe.artifacts.plan_folder import load_plan

    container = _container(unwrap_chunks(model))
    sites = moe_sites(container)
    if not sites:
        raise ValueError(f"--specmoe-plan {plan_dir}: the model has no MoE layers on this rank")
    config = logical_config(sites[0].layer)
    numbers = moe_layer_numbers(config)
    try:
        plan = load_plan(plan_dir)
        plan.check_compatible(
            num_layers=len(numbers),
            num_experts=int(config.num_moe_experts),
            topk=int(config.moe_router_topk),
            ep_size=int(sites[0].dispatcher.ep_size),
            vocab_size=vocab_size,
            hidden_size=int(config.hidden_size),
        )
    except ValueError as exc:
        raise ValueError(f"--specmoe-plan {plan_dir}: {exc}") from exc
    index = {number: i for i, number in enumerate(numbers)}
    missing = [s.layer_number for s in sites if s.layer_number not in index]
    if missing:
        raise ValueError(f"--specmoe-plan {plan_dir}: MoE layer number(s) {missing} are not MoE "
                         f"layers by num_layers/moe_layer_freq (MoE layers {numbers}); the model "
                         "and its config disagree")
    placements = [plan.placements[index[s.layer_number]] for s in sites]
    replicas = _plan_replicas(plan, plan_dir)
    if replicas is not None:
        return _apply_replicas(container, sites, [replicas[index[s.layer_number]] for s in sites],
                               after_load=after_load)
    current = None
    if not after_load:
        current = [getattr(s.dispatcher, "placement", None) for s in sites]
        if any(p is None for p in current):
            current = None  # not specmoe dispatchers: apply_placements names the problem
    return apply_placements(container, placements, mode="dispatcher", current=current)


def _plan_replicas(plan, plan_dir: Path):
    """The plan's ``ReplicatedPlacement`` per MoE layer, or None without replicas."""
    from megatron_specmoe.schedule.replicas import replicas_from_arrays

    try:
        return replicas_from_arrays(plan.placements, plan.arrays, plan.header.notes.get("replica_policy", "load"))
    except ValueError as exc:
        raise ValueError(f"--specmoe-plan {plan_dir}: {exc}") from exc


def _apply_replicas(container, sites, replicas, *, after_load: bool):
    """Twins for the plain layers, then every slot filled (module docstring, --specmoe-plan)."""
    from megatron_specmoe.megatron.apply_plan import apply_replicas, base_slots
    from megatron_specmoe.megatron.replicas import is_twin, replicate_layers

    wrong = [s.layer_number for s in sites if not hasattr(s.dispatcher, "set_replicas")]
    if wrong:  # before any layer is swapped
        raise ValueError(f"MoE layer(s) {wrong} use {type(sites[0].dispatcher).__name__}; a plan with redundant "
                         "experts needs --moe-token-dispatcher-type specmoe")
    current = []
    for site, rep in zip(sites, replicas):
        held = getattr(site.dispatcher, "replicas", None)
        if is_twin(site.layer) and not after_load and held is not None:
            current.append(held.physical_to_logical)  # already served: applying again moves nothing
        else:  # base slots as loaded (contiguous), replica slots not yet filled
            current.append(base_slots(rep.num_experts, rep.ep_size, rep.slots_per_rank))
    replicate_layers(container, replicas[0].redundant)
    return apply_replicas(container, replicas, current=current)


def prepare_specmoe_load(model: Any) -> int:
    """Before a checkpoint load: swap replicated layers back to the plain layers the checkpoint
    was saved from (``replicas.plain_layers``); the hook re-applies the plan afterwards. Returns
    the number of layers swapped (0 for a model without replicas)."""
    from megatron_specmoe.megatron.replicas import plain_layers

    if model is None or (isinstance(model, (list, tuple)) and not model):
        return 0
    return plain_layers(_container(unwrap_chunks(model)))


# --------------------------------------------------------------------------- stats


def stats_path_for_rank(path: str, rank: int, world_size: int) -> Path:
    """``path`` with ``{rank}`` replaced; without it and with several ranks, ``.rank{R}`` is
    put before the suffix (``stats.jsonl`` -> ``stats.rank3.jsonl``)."""
    if "{rank}" in path:
        return Path(path.replace("{rank}", str(rank)))
    if world_size == 1:
        return Path(path)
    p = Path(path)
    return p.with_name(f"{p.stem}.rank{rank}{p.suffix}")


def _stats_lines(records: Sequence[Any], rank: int) -> list[dict]:
    """One dict per MoE layer (by layer number): the records of all forwards summed."""
    by_layer: dict[int, list] = {}
    for record in records:
        by_layer.setdefault(record.layer_number, []).append(record)
    lines = []
    for layer_number in sorted(by_layer):
        recs = by_layer[layer_number]
        measures = recs[0].measures
        for r in recs[1:]:
            measures = measures + r.measures

        def summed(field: str) -> list[int]:
            return [int(sum(col)) for col in zip(*(getattr(r, field) for r in recs))]

        lines.append({
            "rank": rank,
            "ep_rank": recs[0].ep_rank,
            "ep_size": recs[0].ep_size,
            "layer_number": layer_number,
            "forwards": len(recs),
            "measures": measures.summary(),
            "pairs_to_rank": summed("pairs_to_rank"),
            "dispatch_bytes_to_rank": summed("dispatch_bytes_to_rank"),
            "combine_bytes_from_rank": summed("combine_bytes_from_rank"),
        })
    return lines


# --------------------------------------------------------------------------- the runtime


class SpecMoERuntime:
    """What ``setup_specmoe_runtime`` attached to one model on this rank.

    Attributes:
        settings: the ``RuntimeSettings``.
        rank: global rank (file names).
        last_apply: the ``ApplyReport`` of the latest plan application, or None.
        route_recorder: ``RouteRecorder`` or None.
        dispatch_recorder: ``DispatchRecorder`` or None.
        writes_routes: False on TP ranks > 0 without sequence parallelism (duplicates).
        parts_written: paths of the trace parts written so far.
        shuffle_handles: what ``attach_shuffle_outputs`` attached (``--specmoe-shuffle``).
    """

    def __init__(self, settings: RuntimeSettings, chunks: Sequence[torch.nn.Module]) -> None:
        self.settings = settings
        self.rank = _dist_rank()
        self.world_size = _world_size()
        self.last_apply = None
        self.route_recorder = None
        self.dispatch_recorder = None
        self.writes_routes = True
        self.parts_written: list[Path] = []
        self.shuffle_handles: list = []
        self.routes_requests = False
        self._chunks = list(chunks)
        self._handles: list = []
        self._input_ids: list[Optional[torch.Tensor]] = []
        self._forwards = 0
        self._tp_rank, self._tp_size, self._sequence_parallel = 0, 1, False
        self._closed = False

    # ---- attach ------------------------------------------------------------------------------
    def _attach_routes(self, folder: Path) -> None:
        from megatron_specmoe.megatron.route_recorder import RouteRecorder

        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            pp = parallel_state.get_pipeline_model_parallel_world_size()
            if pp > 1:
                raise ValueError(f"--specmoe-record-routes {folder}: pipeline parallel size is {pp}; "
                                 "each stage sees only its own MoE layers. Record routes with "
                                 "--pipeline-model-parallel-size 1")
            self._tp_rank = parallel_state.get_tensor_model_parallel_rank()
            self._tp_size = parallel_state.get_tensor_model_parallel_world_size()
        container = _container(self._chunks)
        self.route_recorder = RouteRecorder.attach(container)
        from megatron_specmoe.megatron.model_tools import moe_sites

        self._sequence_parallel = bool(getattr(moe_sites(container)[0].layer.config,
                                               "sequence_parallel", False))
        self.writes_routes = self._tp_rank == 0 or self._sequence_parallel
        folder.mkdir(parents=True, exist_ok=True)
        first = self._chunks[0]
        self._handles.append(first.register_forward_pre_hook(self._keep_input_ids, with_kwargs=True))
        self._handles.append(first.register_forward_hook(self._after_forward))

    def _keep_input_ids(self, _module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._input_ids.append(ids.detach().cpu() if isinstance(ids, torch.Tensor) else None)

    def _after_forward(self, _module, _args, _output):
        self._forwards += 1
        every = self.settings.record_every
        if every and self._forwards % every == 0:
            self.flush_routes()

    def _attach_stats(self) -> None:
        from megatron_specmoe.megatron.dispatcher import DispatchRecorder
        from megatron_specmoe.megatron.model_tools import attach_recorder

        self.dispatch_recorder = DispatchRecorder()
        attach_recorder(_container(self._chunks), self.dispatch_recorder)

    # ---- routes ------------------------------------------------------------------------------
    def _token_ids(self, counts: list[int]) -> tuple[Optional[np.ndarray], str]:
        """int64 [T] token ids lined up with the recorded tokens, or (None, why not)."""
        if len(self._input_ids) != len(counts):
            return None, (f"{len(self._input_ids)} model forwards but {len(counts)} router calls "
                          "per layer (forwards outside the model, or MTP)")
        parts = []
        for f, (ids, n) in enumerate(zip(self._input_ids, counts)):
            if ids is None:
                return None, f"forward {f} had no input_ids tensor"
            if ids.numel() == n:
                parts.append(ids.reshape(-1))
            elif (self._sequence_parallel and ids.dim() == 2 and ids.numel() == n * self._tp_size
                  and ids.shape[1] % self._tp_size == 0):
                s = ids.shape[1] // self._tp_size
                parts.append(ids[:, self._tp_rank * s:(self._tp_rank + 1) * s].reshape(-1))
            else:
                return None, (f"forward {f}: input_ids has shape {tuple(ids.shape)} but the routers "
                              f"saw {n} tokens")
        return torch.cat(parts).numpy().astype(np.int64), ""

    def flush_routes(self) -> Optional[Path]:
        """Write the routes recorded since the last flush as one trace part (none if empty)."""
        rec = self.route_recorder
        if rec is None or rec.num_tokens == 0:
            return None
        from megatron_specmoe.artifacts.trace_io import write_trace

        counts = [int(c.experts.shape[0]) for c in rec._calls[0]]
        token_ids, why = self._token_ids(counts)
        path = None
        if self.writes_routes:
            folder = self.settings.record_routes
            path = folder / f"routes-rank{self.rank:05d}-part{len(self.parts_written):04d}.npz"
            if token_ids is None:
                print(f"specmoe: rank {self.rank}: {path} is written without token ids: {why}",
                      file=sys.stderr)
            write_trace(rec.trace(token_ids=token_ids, source=str(path)), path)
            self.parts_written.append(path)
        rec.clear()
        self._input_ids.clear()
        return path

    # ---- stats -------------------------------------------------------------------------------
    def write_stats(self) -> Optional[Path]:
        """Write the per-layer stats JSON lines (see the module docstring); None when off."""
        if self.dispatch_recorder is None:
            return None
        path = stats_path_for_rank(self.settings.stats, self.rank, self.world_size)
        if "{rank}" not in self.settings.stats and self.world_size > 1 and self.rank == 0:
            print(f"specmoe: --specmoe-stats {self.settings.stats} has no '{{rank}}'; each rank "
                  f"writes {path.with_name(path.name.replace('.rank0', '.rank<R>'))}", file=sys.stderr)
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = _stats_lines(self.dispatch_recorder.records, self.rank)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(line, sort_keys=True) + "\n" for line in lines))
        os.replace(tmp, path)
        return path

    # ---- end ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Write what is pending (routes, stats), remove every hook. Idempotent; also runs at exit."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        try:
            self.flush_routes()
            self.write_stats()
        finally:
            for h in self._handles:
                h.remove()
            self._handles = []
            if self.route_recorder is not None:
                self.route_recorder.detach()
            if self.dispatch_recorder is not None:
                from megatron_specmoe.megatron.model_tools import attach_recorder

                attach_recorder(_container(self._chunks), None)
            if self.routes_requests:
                from megatron_specmoe.megatron_lm.dp_coordinator import uninstall_request_routing

                uninstall_request_routing()
                self.routes_requests = False
            if self._chunks[0].__dict__.get(_RUNTIME_ATTR) is self:
                del self._chunks[0].__dict__[_RUNTIME_ATTR]


def setup_specmoe_runtime(model: Any, args: Any = None, *, after_load: bool = False
                          ) -> Optional[SpecMoERuntime]:
    """Do what ``args`` asks of ``model`` (see the module docstring). Call on every rank.

    Args:
        model: a module or list of chunks, wrapped or not.
        args: Megatron-LM's args namespace (default: ``megatron.training.get_args()``).
        after_load: the experts were just loaded / built in Megatron's contiguous order (the
            hooks pass True); False when calling by hand on a model this module may already
            have rearranged.

    Returns:
        The model's ``SpecMoERuntime`` (the same object on later calls), or None when no
        ``--specmoe-*`` flag asks for anything.
    """
    if args is None:
        from megatron.training.global_vars import get_args as megatron_get_args

        args = megatron_get_args()
    settings = RuntimeSettings.from_args(args)
    if not settings.active:
        return None
    if settings.applies_plan and getattr(args, "save", None):
        raise ValueError(
            f"--specmoe-plan {settings.plan} with --save {args.save}: the plan moves expert weights "
            "between EP ranks while their checkpoint names stay Megatron's contiguous ones, so a "
            "saved checkpoint would hold experts in the wrong places. Drop --save (the specmoe "
            "dispatcher is for inference), or save without --specmoe-plan"
        )
    chunks = unwrap_chunks(model)
    runtime = chunks[0].__dict__.get(_RUNTIME_ATTR)
    if runtime is not None and runtime.settings != settings:
        raise ValueError("setup_specmoe_runtime: this model already runs with other --specmoe-* "
                         f"settings ({runtime.settings} vs {settings}); close() the old runtime first")
    new = runtime is None
    if new:
        runtime = SpecMoERuntime(settings, chunks)
    if settings.applies_plan:
        report = apply_specmoe_plan(chunks, settings.plan, after_load=after_load,
                                    vocab_size=getattr(args, "padded_vocab_size", None))
        runtime.last_apply = report
        if runtime.rank == 0:
            print(f"specmoe: plan {settings.plan} applied to {report.layers} MoE layer(s) "
                  f"({report.transfers} expert transfers on rank 0)", file=sys.stderr)
            if getattr(report, "redundant", 0):
                print(f"specmoe: {report.redundant} redundant experts per MoE layer (replica slots filled "
                      "from the plan; the checkpoint keeps each expert once)", file=sys.stderr)
    if new:
        try:
            if settings.record_routes is not None:
                runtime._attach_routes(settings.record_routes)
            if settings.stats is not None and settings.dispatcher == DISPATCHER:
                runtime._attach_stats()
            if settings.shuffle and settings.dispatcher == DISPATCHER:
                from megatron_specmoe.megatron_lm.shuffle_hook import attach_shuffle_outputs

                runtime.shuffle_handles = attach_shuffle_outputs(chunks)
                runtime._handles.extend(runtime.shuffle_handles)
            if settings.places_requests:
                from megatron_specmoe.megatron_lm.dp_coordinator import install_request_routing

                install_request_routing(settings.plan, weight=settings.request_weight)
                runtime.routes_requests = True
                if runtime.rank == 0:
                    print(f"specmoe: requests placed by expert affinity (plan {settings.plan}, weight "
                          f"{settings.request_weight})", file=sys.stderr)
                    if runtime.last_apply is not None and runtime.last_apply.redundant:
                        print("specmoe: request affinity counts each expert on its base rank only (its "
                              "replicas serve pairs, but do not steer requests)", file=sys.stderr)
        except BaseException:
            runtime._closed = True
            for h in runtime._handles:
                h.remove()
            if runtime.route_recorder is not None:
                runtime.route_recorder.detach()
            raise
        chunks[0].__dict__[_RUNTIME_ATTR] = runtime
        atexit.register(runtime.close)
    return runtime
