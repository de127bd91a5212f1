"""The demo's work on each rank: serve the same batches with ``alltoall`` and ``specmoe``.

Notation: W ranks, TP / EP sizes, S sequence length, B micro-batch, V vocabulary, L MoE layers.

Both models are built from the same weights (state dict copy). Each batch goes through both,
interleaved, in inference mode; the logits are compared (lossless check), the traffic of each is
taken from the dispatchers themselves (``alltoall``: Megatron's own routing map and split sizes
after the forward; ``specmoe``: its recorder), and forward times are the slowest rank's, measured
with barriers around each forward.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_specmoe.megatron import cpu_support
from megatron_specmoe.megatron import parallel
from megatron_specmoe.megatron.build import MoEShape, build_gpt_model, make_config
from megatron_specmoe.megatron.dispatcher import DispatchRecorder, record_from_routing_map
from megatron_specmoe.megatron.model_tools import attach_recorder, moe_sites, set_placements
from megatron_specmoe.measure.accounting import DispatchRecord, TrafficReport
from megatron_specmoe.measure.measures import WireFormat
from megatron_specmoe.schedule.placement import ExpertPlacement

__all__ = ["DemoSettings", "DispatcherRun", "DemoResult", "PhaseTimer", "serve_worker"]


@dataclass(frozen=True, kw_only=True)
class DemoSettings:
    """Attributes: shape, tp, ep, batches (number of forwards), seq (S), batch (B), seed;
    placements: per-MoE-layer physical_to_logical for specmoe (None: contiguous)."""

    shape: MoEShape = field(default_factory=lambda: MoEShape(hidden=64, ffn=64, experts=8, topk=2, layers=2, vocab=256, seq=128))
    tp: int = 1
    ep: int = 4
    batches: int = 4
    seq: int = 64
    batch: int = 4
    seed: int = 1234
    placements: Optional[tuple[tuple[int, ...], ...]] = None


@dataclass(frozen=True, kw_only=True)
class DispatcherRun:
    """One dispatcher's results over all batches.

    Attributes:
        name: "alltoall", "allgather" or "specmoe".
        reports: per MoE layer, the traffic summed over batches (whole EP group).
        forward_s: per batch, the slowest rank's forward time in seconds.
        a2a_s: per batch, the slowest rank's time inside the EP communication phases
            (``token_dispatch`` + ``token_combine``, all MoE layers); empty when not measured.
        bytes_on_wire: for a dispatcher that does not send (token, expert) pairs (allgather: every
            token to every rank of the TP x EP group, then a reduce-scatter), the bytes its
            collectives moved, counted (``CollectiveBytes``), all ranks, all batches; None: the
            reports' pair bytes.
    """

    name: str
    reports: tuple[TrafficReport, ...]
    forward_s: tuple[float, ...]
    a2a_s: tuple[float, ...] = ()
    bytes_on_wire: Optional[int] = None


class PhaseTimer:
    """Accumulates the time a model's dispatchers spend in their communication phases
    (``token_dispatch`` and ``token_combine``: the EP all-to-alls). Wraps the methods on the
    dispatcher *instances* of one model (the demo's own measurement; nothing global) and
    ``remove()`` restores them."""

    def __init__(self, model) -> None:
        self.seconds = 0.0
        self._wrapped = []
        for site in moe_sites(model):
            d = site.dispatcher
            for name in ("token_dispatch", "token_combine"):
                inner = getattr(d, name)

                def timed(*args, _inner=inner, **kwargs):
                    start = time.perf_counter()
                    try:
                        return _inner(*args, **kwargs)
                    finally:
                        self.seconds += time.perf_counter() - start

                setattr(d, name, timed)
                self._wrapped.append((d, name))

    def take(self) -> float:
        """The slowest rank's accumulated seconds since the last ``take`` (collective)."""
        value = torch.tensor([self.seconds], dtype=torch.float64)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        self.seconds = 0.0
        return float(value)

    def remove(self) -> None:
        for d, name in self._wrapped:
            delattr(d, name)  # back to the class's method
        self._wrapped.clear()


class CollectiveBytes:
    """Counts the bytes one model's dispatchers move in their collectives on their TP x EP group
    (``tp_ep_group``; the allgather dispatcher's all-gathers and reduce-scatter): wraps
    ``token_dispatch`` / ``token_combine`` on the dispatcher *instances* with
    ``shuffle_lossless.count_tp_collectives`` (nothing global); ``remove()`` restores them. Bytes
    are what a rank sends in a ring implementation (every algorithm moves that much in total)."""

    def __init__(self, model) -> None:
        from megatron_specmoe.comm.shuffle import CollectiveCounter
        from megatron_specmoe.testing.shuffle_lossless import count_tp_collectives

        self.counter = CollectiveCounter()
        self._wrapped = []
        for site in moe_sites(model):
            d = site.dispatcher
            for name in ("token_dispatch", "token_combine"):
                inner = getattr(d, name)

                def counted(*args, _inner=inner, _group=d.tp_ep_group, **kwargs):
                    with count_tp_collectives(_group, self.counter):
                        return _inner(*args, **kwargs)

                setattr(d, name, counted)
                self._wrapped.append((d, name))

    def take(self) -> int:
        """All ranks' bytes since the last ``take`` (collective: every rank calls it)."""
        value = torch.tensor([sum(self.counter.sent_bytes.values())], dtype=torch.float64)
        dist.all_reduce(value)
        self.counter.calls.clear()
        self.counter.payload_bytes.clear()
        self.counter.sent_bytes.clear()
        return int(value)

    def remove(self) -> None:
        for d, name in self._wrapped:
            delattr(d, name)
        self._wrapped.clear()


@dataclass(frozen=True, kw_only=True)
class DemoResult:
    """Attributes: runs (alltoall first), max_abs_diff (largest |logits difference| against
    alltoall, over the other dispatchers and all batches and ranks), tokens (tokens served per
    dispatcher, whole job)."""

    runs: tuple[DispatcherRun, ...]
    max_abs_diff: float
    tokens: int


def _alltoall_records(model, ep_rank: int, ep_size: int, hidden: int) -> list[DispatchRecord]:
    """Megatron's alltoall dispatchers, and the specmoe dispatcher built on them, keep the last
    forward's routing map (physical expert order, after any padding): measure it. The same record
    ``DispatchRecorder`` makes inside the forward, made after it."""
    out = []
    for site in moe_sites(model):
        d = site.dispatcher
        activation_bytes = torch.finfo(site.layer.config.params_dtype).bits // 8
        wire = WireFormat(hidden_size=hidden, activation_bytes=activation_bytes, prob_bytes=d.probs.element_size())
        out.append(record_from_routing_map(d.routing_map, ep_rank=ep_rank, ep_size=ep_size,
                                           layer_number=site.layer_number, wire=wire))
    return out


def _timed(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
    dist.barrier()
    start = time.perf_counter()
    out = fn()
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return out, float(elapsed)


def _sum_reports(per_batch: Sequence[Sequence[TrafficReport]]) -> tuple[TrafficReport, ...]:
    from megatron_specmoe.comm.stats import summarize_by_layer

    flat = [r for batch in per_batch for r in batch]
    by_layer = summarize_by_layer(flat)
    return tuple(by_layer[k] for k in sorted(by_layer))


def serve_worker(rank: int, world_size: int, settings: DemoSettings, progress: bool = True) -> Optional[DemoResult]:
    """Run on every rank; rank 0 returns the result, the others ``None``."""
    from megatron.core import parallel_state

    from megatron_specmoe.comm.stats import gather_reports

    warnings.filterwarnings("ignore")
    logging.getLogger("megatron").setLevel(logging.ERROR)
    cpu_support.enable()
    parallel.initialize(parallel.ParallelLayout(tp=settings.tp, ep=settings.ep), seed=settings.seed)
    try:
        shape = settings.shape
        cfgs = [make_config(shape, dispatcher=d, tp=settings.tp, ep=settings.ep, sequence_parallel=False)
                for d in ("alltoall", "specmoe")]
        ref = build_gpt_model(cfgs[0], shape, specmoe=False).eval()
        spec = build_gpt_model(cfgs[1], shape, specmoe=True).eval()
        spec.load_state_dict(ref.state_dict(), strict=True)
        if settings.placements is not None:
            set_placements(spec, [ExpertPlacement(physical_to_logical=p, ep_size=settings.ep) for p in settings.placements])
        recorder = DispatchRecorder()
        attach_recorder(spec, recorder)
        ep_group = parallel_state.get_expert_model_parallel_group()
        ep_rank = parallel_state.get_expert_model_parallel_rank()
        dp_rank = parallel_state.get_data_parallel_rank()

        mask = torch.triu(torch.ones(1, 1, settings.seq, settings.seq, dtype=torch.bool), diagonal=1)
        positions = torch.arange(settings.seq).unsqueeze(0).expand(settings.batch, -1)
        a2a_reports, spec_reports, times = [], [], {"alltoall": [], "specmoe": []}
        max_diff = 0.0
        with torch.no_grad():
            # One untimed forward each: first-call allocations would otherwise favour the second.
            warm = torch.zeros(settings.batch, settings.seq, dtype=torch.long)
            ref(warm, positions, mask)
            spec(warm, positions, mask)
            recorder.clear()
            for b in range(settings.batches):
                gen = torch.Generator().manual_seed(settings.seed * 1009 + b * 97 + dp_rank)
                tokens = torch.randint(0, shape.vocab, (settings.batch, settings.seq), generator=gen)
                ref_out, t_ref = _timed(lambda: ref(tokens, positions, mask))
                a2a_reports.append(gather_reports(_alltoall_records(ref, ep_rank, settings.ep, shape.hidden), ep_group))
                recorder.clear()
                spec_out, t_spec = _timed(lambda: spec(tokens, positions, mask))
                spec_reports.append(gather_reports(recorder.records, ep_group))
                times["alltoall"].append(t_ref)
                times["specmoe"].append(t_spec)
                diff = torch.tensor([float((ref_out - spec_out).abs().max())], dtype=torch.float64)
                dist.all_reduce(diff, op=dist.ReduceOp.MAX)
                max_diff = max(max_diff, float(diff))
                if progress and rank == 0:
                    print(f"[specmoe demo] serve: batch {b + 1}/{settings.batches}", flush=True)
        if rank != 0:
            return None
        # With TP > 1 and no sequence parallelism every TP rank routes its own full copy of the
        # tokens (Megatron does the same), so the job served W / TP distinct sequences per batch.
        tokens_total = settings.batches * settings.batch * settings.seq * (world_size // settings.tp)
        return DemoResult(
            runs=(
                DispatcherRun(name="alltoall", reports=_sum_reports(a2a_reports), forward_s=tuple(times["alltoall"])),
                DispatcherRun(name="specmoe", reports=_sum_reports(spec_reports), forward_s=tuple(times["specmoe"])),
            ),
            max_abs_diff=max_diff,
            tokens=tokens_total,
        )
    finally:
        parallel.destroy()
