"""Where the demo's forward time goes, stage by stage, alltoall vs specmoe (CPU, gloo ranks).

    python tools/profile_demo_stages.py --plan specmoe-demo/plan [--passes 2] [--json] [--free-plans]
        [--unfused-probs] [--allgather-counts]

Runs the serve step of ``specmoe demo`` (4 ranks, TP = EP = 4, sequence parallel, the shipped
model, its evaluation windows) on the plan a demo run wrote (``OUT_DIR/plan``), the two models
taking turns on every batch after one warm-up round. ``--free-plans`` (a timing experiment, not a
serving mode): every shuffle layer reuses the plan of its first forward, so the specmoe forward
shows what it costs without its plans. ``--unfused-probs`` (an ablation): specmoe's dispatcher
sends the probs in an all-to-all of their own, as Megatron's does (``set_fuse_probs("off")``).
``--allgather-counts`` (an ablation): its count exchange is Megatron's all-gather of every count
(``set_count_exchange("allgather")``).
Per forward and rank it accumulates, for every named stage, the wall time (perf_counter: includes
waiting for the other ranks in a collective and for a core) and the CPU time of the calling thread
(thread_time: the work itself; gloo's own threads are not in it):

    specmoe    the shuffle layer's stages (gather_input, attention, plan and inside it rank_scores,
               shuffled_reduce_scatter, moe, hand_on) and the model's embedding and output layer;
    alltoall   Megatron's layer parts (input_layernorm, self_attention with its sequence-parallel
               all-gather and reduce-scatter, pre_mlp_layernorm, mlp) and the same model parts;
    both       inside the MoE layer: router, the dispatcher's six phases, experts.

Stage times are instance-method wrappers on this run's models (nothing global); the collector's
existing objects are frozen while timing, as in the demo. Prints the command, the median
whole-forward time (slowest rank) and process CPU (all threads) per rank, and a table of stage times
in ms per forward (median over forwards, max over ranks), or JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SPEC_STAGES = ("gather_input", "attention", "plan", "rank_scores", "shuffled_reduce_scatter", "moe", "hand_on")
A2A_PARTS = ("input_layernorm", "self_attention", "pre_mlp_layernorm", "mlp")
DISPATCHER_PHASES = ("dispatch_preprocess", "token_dispatch", "dispatch_postprocess", "combine_preprocess",
                     "token_combine", "combine_postprocess")


def _wrap(obj, attr: str, label: str, sink: dict) -> None:
    """Time ``obj.attr`` (a method, or a submodule's forward) into ``sink[label]`` = [wall, cpu]."""
    import torch

    inner = getattr(obj, attr)
    if isinstance(inner, torch.nn.Module):
        obj, attr, inner = inner, "forward", inner.forward

    def timed(*args, **kwargs):
        w, c = time.perf_counter(), time.thread_time()
        try:
            return inner(*args, **kwargs)
        finally:
            acc = sink[label]
            acc[0] += time.perf_counter() - w
            acc[1] += time.thread_time() - c

    setattr(obj, attr, timed)


def _reuse_first_plans(model) -> None:
    """``--free-plans``: every shuffle layer of ``model`` makes its plan once and reuses it (any
    balanced plan is lossless; the forward then shows what it costs without the plan)."""
    import dataclasses

    for layer in model.decoder.layers:
        carrier = layer.carrier
        carrier.options = dataclasses.replace(carrier.options, share_plans="off")
        made, first = layer.plan, []

        def plan(x, made=made, first=first):
            if not first:
                first.append(made(x))
            return first[0]

        layer.plan = plan


def _worker(rank: int, world: int, plan_dir: str, passes: int, free_plans: bool = False,
            unfused_probs: bool = False, allgather_counts: bool = False):
    import gc
    import logging
    import warnings

    import numpy as np
    import torch
    import torch.distributed as dist

    from megatron_specmoe.artifacts.plan_folder import load_plan
    from megatron_specmoe.demo.command import _windows
    from megatron_specmoe.demo.pipeline import PipelineSettings, _serve_models, _windows_for
    from megatron_specmoe.megatron import cpu_support, parallel
    from megatron_specmoe.megatron.checkpoint import read_card

    warnings.filterwarnings("ignore")
    logging.getLogger("megatron").setLevel(logging.ERROR)
    cpu_support.enable()
    parallel.initialize(parallel.ParallelLayout(tp=4, ep=4))
    try:
        card = read_card(None)
        evalu = _windows(card, None, "evaluation", 128, 32)
        settings = PipelineSettings(model_dir=None, calib=evalu, evalu=evalu, tp=4, ep=4, batch=4, predictor="route",
                                    placement="search", plan_dir=plan_dir)
        names = ("alltoall", "specmoe")
        models, _ = _serve_models(card, settings, load_plan(plan_dir), names=names)
        if free_plans:
            _reuse_first_plans(models["specmoe"])
        for layer in models["specmoe"].decoder.layers:  # the ablations: Megatron's dispatch calls
            if unfused_probs:
                layer.mlp.token_dispatcher.set_fuse_probs("off")
            if allgather_counts:
                layer.mlp.token_dispatcher.set_count_exchange("allgather")
        sinks = {n: defaultdict(lambda: [0.0, 0.0]) for n in names}
        for name, model in models.items():
            sink = sinks[name]
            for layer in model.decoder.layers:
                for part in (SPEC_STAGES if name == "specmoe" else A2A_PARTS):
                    _wrap(layer, part, part, sink)
                _wrap(layer.mlp, "router", "moe.router", sink)
                _wrap(layer.mlp, "experts", "moe.experts", sink)
                for phase in DISPATCHER_PHASES:
                    _wrap(layer.mlp.token_dispatcher, phase, "moe." + phase, sink)
            _wrap(model, "embedding", "embedding", sink)
            _wrap(model, "output_layer", "output_layer", sink)
        batches = _windows_for(evalu, 0, 1, 4)
        positions = torch.arange(128).unsqueeze(0).expand(4, -1)
        mask = torch.triu(torch.ones(1, 1, 128, 128, dtype=torch.bool), diagonal=1)
        wall = {n: [] for n in names}
        cpu = {n: [] for n in names}
        per_forward = {n: defaultdict(list) for n in names}  # stage -> [(wall, cpu) of each forward]
        with torch.no_grad():
            for name in names:
                models[name](batches[0], positions, mask)
            gc.collect()
            gc.freeze()  # as the demo: no full collection of the models' objects inside a forward
            try:
                for step in range(passes * len(batches)):
                    for name in (names if step % 2 == 0 else names[::-1]):  # taking turns, as the demo
                        sinks[name].clear()
                        dist.barrier()
                        c0, w0 = time.process_time(), time.perf_counter()
                        models[name](batches[step % len(batches)], positions, mask)
                        elapsed = torch.tensor([time.perf_counter() - w0])
                        cpu[name].append(time.process_time() - c0)
                        for k, v in sinks[name].items():
                            per_forward[name][k].append(tuple(v))
                        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                        wall[name].append(float(elapsed))
            finally:
                gc.unfreeze()
        mine = {n: {"wall_ms": 1e3 * float(np.median(wall[n])), "process_cpu_ms": 1e3 * float(np.median(cpu[n])),
                    "stages": {k: [1e3 * float(np.median([x[0] for x in v])), 1e3 * float(np.median([x[1] for x in v]))]
                               for k, v in per_forward[n].items()}}
                for n in names}
        everyone = [None] * world
        dist.all_gather_object(everyone, mine)
        return everyone if rank == 0 else None
    finally:
        parallel.destroy()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plan", default="specmoe-demo/plan", help="plan folder a demo run wrote (default specmoe-demo/plan)")
    p.add_argument("--passes", type=int, default=2, help="timed passes over the 8 evaluation batches (default 2)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--free-plans", action="store_true",
                   help="timing experiment: each shuffle layer reuses its first plan (no plan cost per forward)")
    p.add_argument("--unfused-probs", action="store_true",
                   help="ablation: specmoe's dispatcher sends the probs in an all-to-all of their own, "
                        "as Megatron's (set_fuse_probs('off'))")
    p.add_argument("--allgather-counts", action="store_true",
                   help="ablation: specmoe's dispatcher all-gathers every count, as Megatron's "
                        "(set_count_exchange('allgather'))")
    args = p.parse_args(argv)
    if not (Path(args.plan) / "plan.json").is_file():
        print(f"profile_demo_stages: --plan {args.plan} has no plan.json; run `specmoe demo --out-dir DIR` first "
              "and pass DIR/plan", file=sys.stderr)
        return 2
    if args.passes < 1:
        print(f"profile_demo_stages: --passes {args.passes}: must be >= 1", file=sys.stderr)
        return 2
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    from megatron_specmoe.testing.spawn import run_local

    command = "python tools/profile_demo_stages.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    print(command, flush=True)
    ranks = run_local(_worker, 4, os.path.abspath(args.plan), args.passes, args.free_plans,
                      args.unfused_probs, args.allgather_counts)[0]
    names = list(ranks[0])
    out = {"command": command, "ranks": ranks}
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    for n in names:
        print(f"{n:<9} forward {ranks[0][n]['wall_ms']:.1f} ms (median, slowest rank); process CPU per rank "
              + " ".join(f"{r[n]['process_cpu_ms']:.1f}" for r in ranks) + " ms")
    print(f"forward specmoe / alltoall: {ranks[0]['specmoe']['wall_ms'] / ranks[0]['alltoall']['wall_ms']:.3f}x"
          + (" (--free-plans: no plan cost)" if args.free_plans else "")
          + (" (--unfused-probs: probs in an all-to-all of their own)" if args.unfused_probs else "")
          + (" (--allgather-counts: Megatron's count exchange)" if args.allgather_counts else ""))
    stages = sorted({k for r in ranks for n in names for k in r[n]["stages"]})
    print(f"\n{'stage (ms per forward: median, max over ranks)':<40} " + " ".join(f"{n + ' wall':>13} {n + ' cpu':>12}" for n in names))
    for k in stages:
        cells = []
        for n in names:
            vals = [r[n]["stages"].get(k) for r in ranks]
            vals = [v for v in vals if v is not None]
            cells.append(f"{max(v[0] for v in vals):>13.2f} {max(v[1] for v in vals):>12.2f}" if vals else f"{'-':>13} {'-':>12}")
        print(f"{k:<40} " + " ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
