"""``specmoe demo --engine dynamic``: the evaluation text as requests through Megatron's dynamic engine.

The request stream goes through Megatron-Core 0.19's ``DynamicInferenceEngine`` (continuous
batching), once with alltoall and once with specmoe.

Notation: P ranks (TP = EP = P, DP = 1), R requests, T tokens of one engine step (a flat batch
mixing prefill chunks and decode tokens of every active request, as the engine pads it), L MoE
layers.

On every rank:

1. profile + plan  as the static demo (``pipeline._profile`` / ``pipeline._plan``): the alltoall
                   model runs the calibration windows, rank 0 fits the plan's token table and expert
                   grouping and writes the plan folder.
2. serve           two models with the same trained weights, each with its own dynamic engine and
                   context: ``alltoall`` (Megatron's local spec and dispatcher) and ``specmoe``
                   (``ShuffleTransformerLayer``: TP > 1 inside EP, the plan's predictor and
                   grouping). Both get the same request stream: request r (a prompt cut from an
                   evaluation window, ``prompt_lengths[r]`` tokens, ``new_tokens[r]`` greedy tokens
                   to generate) is added before engine step ``arrive_step[r]``. The two engines are
                   stepped alternately (the same step index on both), so time ratios come from the
                   same run, interleaved.

Measured: each request's generated tokens and their log-probs on both (lossless: the same tokens,
log-probs within fp32 rounding); the traffic of every MoE forward the engine made (alltoall:
Megatron's routing map after each model forward; specmoe: its dispatch recorder), summed over
steps; per step, the slowest rank's engine-step time and its time in the EP communication phases.
Tokens per step include the engine's padding, on both models alike.

``megatron/cpu_dynamic.py`` supplies the CPU references for the engine's CUDA-only pieces;
``inference_moe_token_dispatcher_type='nccl'`` because the default ('nvls') allocates
symmetric-memory buffers (Hopper GPUs on NVLink) for EP > 1 whatever the model's dispatcher.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np

__all__ = ["DynamicSettings", "DynamicResult", "dynamic_worker", "request_stream", "check_engine"]

MIN_CORE = (0, 19)


def check_engine() -> None:
    """Refuse ``--engine dynamic`` where megatron-core is older than 0.19 (no ``InferenceConfig``;
    the dynamic context this demo drives is 0.19's)."""
    from importlib.metadata import PackageNotFoundError, version

    from megatron_specmoe.artifacts.errors import SpecMoEEnvironmentError

    try:
        found = version("megatron-core")
    except PackageNotFoundError:
        found = "not installed"
    parts = tuple(int(p) for p in found.split(".")[:2] if p.isdigit()) if found[0].isdigit() else ()
    if len(parts) < 2 or parts < MIN_CORE:
        raise SpecMoEEnvironmentError(
            f"--engine dynamic needs megatron-core 0.19 or newer (found {found}): the demo drives 0.19's "
            "DynamicInferenceEngine and InferenceConfig",
            "use --engine static (the default), or install megatron-core 0.19 (tools/setup_env.sh)")


def request_stream(windows: np.ndarray, *, requests: int, min_prompt: int, max_new: int, per_step: int):
    """Deterministic request stream cut from evaluation windows.

    Args:
        windows: int64 [N, S] evaluation token windows, N >= ``requests``.
        requests: R.
        min_prompt: shortest prompt; prompt lengths cycle from it up to S - ``max_new``.
        max_new: most tokens one request generates; counts cycle over 2..max_new.
        per_step: requests added before each engine step (0, 1, 2, ... in order).
    Returns: (prompts: tuple of R int tuples, new_tokens: R ints, arrive_step: R ints).
    """
    seq = windows.shape[1]
    top = seq - max_new
    lengths = np.linspace(min_prompt, top, num=max(requests, 2)).astype(int)[:requests]
    order = np.random.default_rng(0).permutation(requests)  # lengths mixed over arrival order
    prompts = tuple(tuple(int(t) for t in windows[r, : lengths[order[r]]]) for r in range(requests))
    span = max(max_new - 1, 1)
    new_tokens = tuple(2 + (7919 * r) % span for r in range(requests))  # 7919: prime, so all counts occur
    arrive = tuple(r // per_step for r in range(requests))
    return prompts, new_tokens, arrive


@dataclass(frozen=True, kw_only=True)
class DynamicSettings:
    """Attributes:
    pipeline: ``PipelineSettings`` for the profile and plan (calibration windows, layout, predictor,
        placement, plan folder; its ``evalu`` is unused here).
    prompts: R prompts (token ids), new_tokens: R counts, arrive_step: R step indices (ascending).
    max_requests: the engine's concurrent-request limit.
    """

    pipeline: object
    prompts: tuple
    new_tokens: tuple
    arrive_step: tuple
    max_requests: int = 8


@dataclass(frozen=True, kw_only=True)
class DynamicResult:
    """Attributes: serve (``serve.DemoResult``: runs, max_abs_diff = largest |log-prob difference| of
    the generated tokens, tokens = MoE tokens per model over all steps, padding included),
    same_tokens (every request generated the same tokens on both), requests, generated (tokens
    generated per model), steps (engine steps per model), profile_tokens, profile_seconds,
    plan_seconds, plan_summary."""

    serve: object
    same_tokens: bool
    requests: int
    generated: int
    steps: int
    profile_tokens: int
    profile_seconds: float
    plan_seconds: float
    plan_summary: Optional[dict]


class _Tokenizer:
    """What the text generation controller reads from a tokenizer (eod, vocab_size, detokenize)."""

    def __init__(self, eod: int, vocab_size: int) -> None:
        self.eod, self.vocab_size = eod, vocab_size

    def detokenize(self, tokens, **kwargs) -> str:
        return " ".join(map(str, tokens))


def _engine(model, config, card, settings: DynamicSettings):
    from megatron.core.inference.config import InferenceConfig
    from megatron.core.inference.contexts.dynamic_context import DynamicInferenceContext
    from megatron.core.inference.engines.dynamic_engine import DynamicInferenceEngine
    from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
    from megatron.core.inference.text_generation_controllers.text_generation_controller import (
        TextGenerationController,
    )

    longest = max(len(p) + n for p, n in zip(settings.prompts, settings.new_tokens))
    inference = InferenceConfig(block_size_tokens=16, buffer_size_gb=0.05, max_requests=settings.max_requests,
                                max_tokens=max(256, longest * 2), max_sequence_length=card.shape.seq,
                                num_cuda_graphs=None)
    context = DynamicInferenceContext(config, inference)
    controller = TextGenerationController(inference_wrapped_model=GPTInferenceWrapper(model, context),
                                          tokenizer=_Tokenizer(max(card.eot_id, 0), card.shape.vocab))
    return DynamicInferenceEngine(controller, context)


def _serve(card, settings: DynamicSettings, plan, rank: int):
    import torch
    from megatron.core import parallel_state
    from megatron.core.inference.sampling_params import SamplingParams

    from megatron_specmoe.comm.stats import gather_reports
    from megatron_specmoe.demo.pipeline import _bar, _serve_models
    from megatron_specmoe.demo.serve import DemoResult, DispatcherRun, PhaseTimer, _alltoall_records, _sum_reports, _timed
    from megatron_specmoe.megatron.dispatcher import DispatchRecorder
    from megatron_specmoe.megatron.model_tools import attach_recorder

    ps = settings.pipeline
    names = ("alltoall", "specmoe")
    models, _ = _serve_models(card, ps, plan, names=names, inference_moe_token_dispatcher_type="nccl")
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    ep_group = parallel_state.get_expert_model_parallel_group()
    records = {"alltoall": [], "specmoe": None}
    models["alltoall"].register_forward_hook(  # after every forward: the routing map it left
        lambda *_: records["alltoall"].extend(_alltoall_records(models["alltoall"], ep_rank, ps.ep, card.shape.hidden)))
    recorder = DispatchRecorder()
    attach_recorder(models["specmoe"], recorder)
    engines = {n: _engine(models[n], models[n].config, card, settings) for n in names}
    timers = {n: PhaseTimer(models[n]) for n in names}
    for n in names:
        timers[n].take()  # the engines' construction made no MoE forward; start from zero
    records["alltoall"].clear()
    recorder.clear()
    out = {n: {} for n in names}
    times = {n: [] for n in names}
    a2a = {n: [] for n in names}
    total = len(settings.prompts)
    step, added, start = 0, 0, time.perf_counter()
    with torch.no_grad():
        while (added < total or any(e.has_unfinished_requests() for e in engines.values())) and step < 10_000:
            while added < total and settings.arrive_step[added] <= step:
                for n in names:
                    engines[n].add_request(added, list(settings.prompts[added]), SamplingParams(
                        num_tokens_to_generate=settings.new_tokens[added], top_k=1, termination_id=-1,
                        return_log_probs=True, skip_prompt_log_probs=True))
                added += 1
            for n in names:
                result, elapsed = _timed(lambda e=engines[n]: e.step_modern())
                times[n].append(elapsed)
                a2a[n].append(timers[n].take())
                for record in result["finished_request_records"]:
                    request = record.merge()
                    out[n][request.request_id] = (list(request.generated_tokens),
                                                  [float(x) for x in request.generated_log_probs])
            step += 1
            if rank == 0:
                _bar(len(out["specmoe"]), total, "serve  ", start)
    if sorted(out["alltoall"]) != list(range(total)) or sorted(out["specmoe"]) != list(range(total)):
        raise RuntimeError(f"dynamic demo: requests unfinished after {step} steps "
                           f"(alltoall {len(out['alltoall'])}, specmoe {len(out['specmoe'])} of {total})")
    reports = {"alltoall": gather_reports(records["alltoall"], ep_group),
               "specmoe": gather_reports(recorder.records, ep_group)}
    same = all(out["alltoall"][r][0] == out["specmoe"][r][0] for r in range(total))
    diff = max((abs(a - b) for r in range(total) for a, b in zip(out["alltoall"][r][1], out["specmoe"][r][1])),
               default=0.0)
    if rank != 0:
        return None
    layers = card.shape.layers
    tokens = {n: sum(r.measures.tokens for r in reports[n]) // layers for n in names}
    if tokens["alltoall"] != tokens["specmoe"]:
        raise RuntimeError(f"dynamic demo: the engines served different token counts {tokens}")
    serve = DemoResult(
        runs=tuple(DispatcherRun(name=n, reports=_sum_reports([reports[n]]), forward_s=tuple(times[n]),
                                 a2a_s=tuple(a2a[n])) for n in names),
        max_abs_diff=float(diff), tokens=tokens["alltoall"])
    generated = sum(len(out["alltoall"][r][0]) for r in range(total))
    return serve, same, generated, step


def dynamic_worker(rank: int, world_size: int, settings: DynamicSettings) -> Optional[DynamicResult]:
    """Run on every rank; rank 0 returns the result, the others ``None``."""
    import sys

    import torch.distributed as dist

    from megatron_specmoe.artifacts.plan_folder import load_plan
    from megatron_specmoe.demo.pipeline import _plan, _profile
    from megatron_specmoe.megatron import cpu_dynamic, cpu_support, parallel
    from megatron_specmoe.megatron.checkpoint import read_card

    warnings.filterwarnings("ignore")
    logging.getLogger("megatron").setLevel(logging.ERROR)
    ps = settings.pipeline
    cpu_support.enable()
    cpu_dynamic.enable()
    parallel.initialize(parallel.ParallelLayout(tp=ps.tp, ep=ps.ep))
    try:
        card = read_card(ps.model_dir)
        t0 = time.perf_counter()
        trace = _profile(card, ps, rank)
        t1 = time.perf_counter()
        summary = _plan(trace, card, ps) if rank == 0 else None
        if rank == 0:
            print(f"[specmoe demo] plan: {trace.num_tokens} profiled tokens, '{ps.placement}' grouping; wrote "
                  f"{ps.plan_dir}", file=sys.stderr, flush=True)
        t2 = time.perf_counter()
        dist.barrier()
        plan = load_plan(ps.plan_dir)
        plan.check_compatible(num_layers=card.shape.layers, num_experts=card.shape.experts,
                              topk=card.shape.topk, ep_size=ps.ep, vocab_size=card.shape.vocab)
        served = _serve(card, settings, plan, rank)
        if rank != 0:
            return None
        serve, same, generated, steps = served
        return DynamicResult(serve=serve, same_tokens=same, requests=len(settings.prompts), generated=generated,
                             steps=steps, profile_tokens=trace.num_tokens, profile_seconds=t1 - t0,
                             plan_seconds=t2 - t1, plan_summary=summary)
    finally:
        cpu_dynamic.disable()
        parallel.destroy()
