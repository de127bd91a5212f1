"""GPU check: lossless on NCCL, timings with CUDA events, the TransformerEngine path. Writes JSON.

    python tools/gpu_check.py --out gpu_check.json          (or: bash tools/gpu_check.sh OUT_DIR)

Needs a Python whose torch has CUDA, and megatron-core (0.16.x-0.19.x) importable; installs nothing.
Each step is independent: a failing step is recorded in the JSON with its traceback and the next
one runs. Steps:
1. environment (torch, CUDA, GPU, megatron-core, TransformerEngine);
2. lossless, specmoe vs alltoall, on NCCL: world 1 (EP=1) and, with 2+ GPUs visible, world 2
   (EP=2, permuted placement), MoE layer and GPT model, fp32, |diff| <= 1e-6 / 1e-5;
3. timings with CUDA events (median of 20 after 5 warm-ups) for T = 4k .. 64k tokens:
   the runtime shuffle plan (``assign(..., "refine", validate=False)``, P = 8) and the dispatcher's
   column permutation plus Megatron's permute (E = 64, top-8);
4. with TransformerEngine: the TE spec's MoE layer (TEGroupedMLP) with specmoe equals alltoall.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _step(results: dict, name: str, fn) -> None:
    start = time.perf_counter()
    print(f"[gpu_check] {name} ...", flush=True)
    try:
        results[name] = {"ok": True, "result": fn()}
    except Exception:  # noqa: BLE001 - recorded, the next step still runs
        results[name] = {"ok": False, "error": traceback.format_exc()}
    results[name]["seconds"] = round(time.perf_counter() - start, 2)
    print(f"[gpu_check] {name}: {'ok' if results[name]['ok'] else 'FAILED'} ({results[name]['seconds']}s)", flush=True)


def environment() -> dict:
    import torch

    from megatron_specmoe.glue.specs import have_te
    import megatron.core

    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "megatron_core": megatron.core.__version__,
        "transformer_engine": have_te(),
    }


def lossless() -> dict:
    import torch

    from megatron_specmoe.comm.spawn import run_local
    from megatron_specmoe.glue.build import MoEShape
    from megatron_specmoe.glue.lossless import LosslessCase, run_cases

    out = {}
    cases = [("layer", LosslessCase(ep=1, device="cuda")), ("gpt", LosslessCase(ep=1, seq=16, device="cuda"))]
    res = run_local(run_cases, 1, cases, backend="nccl")
    out["world1"] = [{"kind": k, "out": r.max_out_diff, "grad": r.max_grad_diff} for (k, _), r in zip(cases, res[0])]
    if torch.cuda.device_count() >= 2:
        perm = (5, 2, 7, 0, 1, 6, 3, 4)
        cases = [("layer", LosslessCase(ep=2, placement=perm, device="cuda")),
                 ("gpt", LosslessCase(ep=2, seq=16, shape=MoEShape(layers=2), placement=perm, device="cuda"))]
        res = run_local(run_cases, 2, cases, backend="nccl")
        out["world2"] = [{"kind": k, "out": r.max_out_diff, "grad": r.max_grad_diff} for (k, _), r in zip(cases, res[0])]
    worst = max(max(d["out"], d["grad"]) for v in out.values() for d in v)
    if worst > 1e-5:
        raise AssertionError(f"lossless check failed: max |diff| {worst:.3e}: {out}")
    return out


def _cuda_time(fn, repeats: int = 20, warmup: int = 5) -> float:
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def timings() -> list[dict]:
    import torch
    from megatron.core.transformer.moe.moe_utils import permute

    from megatron_specmoe.planning.assignment import assign

    rows = []
    experts, topk, ranks, hidden = 64, 8, 8, 4096
    for tokens in (4096, 8192, 16384, 32768, 65536):
        gen = torch.Generator(device="cuda").manual_seed(tokens)
        scores = torch.rand(tokens, ranks, device="cuda", generator=gen)
        logits = torch.rand(tokens, experts, device="cuda", generator=gen)
        top = logits.topk(topk, dim=1).indices
        routing_map = torch.zeros(tokens, experts, dtype=torch.bool, device="cuda").scatter_(1, top, True)
        probs = torch.where(routing_map, logits, torch.zeros_like(logits))
        hidden_states = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
        columns = torch.randperm(experts, device="cuda", generator=gen)

        def dispatch_permute():
            rm = routing_map.index_select(1, columns)
            pr = probs.index_select(1, columns)
            return permute(hidden_states, rm, probs=pr, num_out_tokens=tokens * topk, fused=False)

        rows.append({
            "tokens": tokens,
            "shuffle_plan_refine_ms": _cuda_time(lambda: assign(scores, "refine", validate=False)),
            "dispatch_permute_ms": _cuda_time(dispatch_permute),
        })
        print(f"[gpu_check]   T={tokens}: {rows[-1]}", flush=True)
    return rows


def _te_worker(rank, world):
    import torch

    from megatron_specmoe.glue import parallel
    from megatron_specmoe.glue.build import MoEShape, build_from_spec, make_config
    from megatron_specmoe.glue.specs import get_gpt_layer_specmoe_spec
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    torch.cuda.set_device(rank)
    parallel.initialize(parallel.ParallelLayout())
    try:
        shape = MoEShape(hidden=128, ffn=256, experts=8, topk=2)
        layers = []
        for d, spec in (("alltoall", get_gpt_layer_with_transformer_engine_spec(num_experts=8, moe_grouped_gemm=True)),
                        ("specmoe", get_gpt_layer_specmoe_spec(8, use_transformer_engine=True))):
            cfg = make_config(shape, dispatcher=d, moe_grouped_gemm=True, use_cpu_initialization=False)
            layers.append(build_from_spec(spec.submodules.mlp if hasattr(spec, "submodules") else spec, config=cfg).cuda())
        layers[1].load_state_dict(layers[0].state_dict())
        x = torch.randn(64, 2, shape.hidden, device="cuda")
        outs = [layer(x)[0] for layer in layers]
        return {"experts_module": type(layers[1].experts).__name__,
                "dispatcher": type(layers[1].token_dispatcher).__name__,
                "max_abs_diff": float((outs[0] - outs[1]).abs().max())}
    finally:
        parallel.destroy()


def transformer_engine() -> dict:
    from megatron_specmoe.comm.spawn import run_local
    from megatron_specmoe.glue.specs import have_te

    if not have_te():
        return {"skipped": "TransformerEngine is not importable in this Python"}
    res = run_local(_te_worker, 1, backend="nccl")[0]
    if res["max_abs_diff"] > 1e-5:
        raise AssertionError(f"TE path not lossless: {res}")
    return res


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_check.json")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: torch.cuda.is_available() is False; run this on a machine with an NVIDIA GPU",
              file=sys.stderr)
        return 2
    results = {"command": " ".join([sys.executable] + sys.argv)}
    for name, fn in (("environment", environment), ("lossless", lossless), ("timings", timings),
                     ("transformer_engine", transformer_engine)):
        _step(results, name, fn)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"[gpu_check] wrote {args.out}")
    return 0 if all(v["ok"] for k, v in results.items() if isinstance(v, dict)) else 1


if __name__ == "__main__":
    sys.exit(main())
