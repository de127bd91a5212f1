"""GPU check: lossless on NCCL, timings with CUDA events, the TransformerEngine path. Writes JSON.

    python tools/gpu_check.py --out gpu_check.json          (or: bash tools/gpu_check.sh OUT_DIR)

Needs a Python whose torch has CUDA, and megatron-core (0.16.x-0.19.x) importable; installs nothing.
Each step is independent: a failing step is recorded in the JSON with its traceback and the next
one runs. Steps:
1. environment (torch, CUDA, GPU, megatron-core, TransformerEngine);
2. lossless, specmoe vs alltoall, on NCCL: world 1 (EP=1) and, with 2+ GPUs visible, world 2
   (EP=2, permuted placement), MoE layer and GPT model, fp32, |diff| <= 1e-6 / 1e-5;
3. timings with CUDA events (median of 20 after 5 warm-ups) for T = 4k .. 64k tokens:
   the shuffle plan (``assign(..., "refine", validate=False)``, P = 8; the run-time "prices" in 3b), the run-time
   predictors that feed it (token rank-table lookup, V = 129k; history MLP at MoE layer 16;
   pregate gating H = 4096 + rank scores), all with random weights, and the dispatcher's column
   permutation plus Megatron's permute (E = 64, top-8);
3b. the run-time plan (route table -> "prices" -> permutation) captured in a CUDA graph and
   replayed (equal to eager), and timed against an attention stand-in alone and overlapped on a
   side stream (``plan_graph``; its code also runs on the CPU in tests/test_gpu_check.py);
3c. the shuffle layer's decode-shaped step (one token per sequence, no KV cache) in Megatron's padded
   decode (drop-and-pad at capacity factor E / k, as ``moe_pad_experts_for_cuda_graph_inference``
   switches it on) captured in a CUDA graph and replayed on fresh inputs == eager, and eager ==
   Megatron's layer with alltoall in the same mode (``shuffle_decode_graph``; its worker runs on
   the CPU with gloo in tests/test_gpu_check.py, without the capture);
4. with TransformerEngine: the TE spec's MoE layer (TEGroupedMLP) with specmoe equals alltoall;
5. s-TS on NCCL with local linears: a GPT model whose MoE layers are ``ShuffleTransformerLayer``
   against Megatron's local spec with alltoall, same weights, TP = EP = min(GPUs, 4), sequence
   parallel off and on, predictors pregate / route / history, fp32 logits |diff| <= 1e-5 (with one
   GPU TP = 1: the predictors' and the assignment's CUDA paths run, the shuffle is the identity);
6. with TransformerEngine: the same with TE linears (``megatron/te_shuffle.py``) against Megatron's TE
   spec: the TE no-communication linears, the spec and the weight names.
The GPT worker also runs on the CPU with gloo (tests/test_gpu_check.py), so its code is checked
where no GPU is.
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

    from megatron_specmoe.megatron.specs import have_te
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

    from megatron_specmoe.testing.spawn import run_local
    from megatron_specmoe.megatron.build import MoEShape
    from megatron_specmoe.testing.lossless import LosslessCase, run_cases

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


def _cuda_time(fn, repeats: int = 20, warmup: int = 5, device: str = "cuda") -> float:
    """Median milliseconds of ``fn``: CUDA events on a GPU, the host clock on "cpu" (the CPU smoke
    run of ``timings`` in tests/test_gpu_check.py)."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    if device == "cpu":
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        times.sort()
        return times[len(times) // 2]
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def timings(device: str = "cuda", token_counts=(4096, 8192, 16384, 32768, 65536), *,
            experts: int = 64, topk: int = 8, ranks: int = 8, hidden: int = 4096, vocab: int = 129280,
            history_layers: int = 16, mlp_hidden: int = 128, repeats: int = 20) -> list[dict]:
    import torch
    from megatron.core.transformer.moe.moe_utils import permute

    from megatron_specmoe.schedule.assignment import assign
    from megatron_specmoe.predict.history_mlp import HistoryLayerScorer
    from megatron_specmoe.predict.pregate import topk_rank_scores
    from megatron_specmoe.predict.device import RankTable

    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    dev = {"device": device}
    # Run-time predictors at DeepSeek-like sizes, random weights (timing only): the token table as
    # a rank table, the history MLP of MoE layer 16, the pregate's router weights.
    table = RankTable(table=torch.rand(vocab + 1, ranks, generator=gen, **dev), layer=0,
                      ep_base=0, placement_key=())
    scorer = HistoryLayerScorer(
        layer=history_layers, num_experts=experts, prior=torch.full((experts,), 1.0 / experts, **dev),
        w1=torch.randn(history_layers * experts, mlp_hidden, generator=gen, **dev) * 0.05,
        b1=torch.zeros(mlp_hidden, **dev),
        w2=torch.randn(mlp_hidden, experts, generator=gen, **dev) * 0.05,
        b2=torch.zeros(experts, **dev))
    router = torch.randn(experts, hidden, **dev, dtype=torch.bfloat16, generator=gen)
    rank_of = torch.arange(experts, **dev) // (experts // ranks)
    for tokens in token_counts:
        gen = torch.Generator(device=device).manual_seed(tokens)
        scores = torch.rand(tokens, ranks, generator=gen, **dev)
        logits = torch.rand(tokens, experts, generator=gen, **dev)
        top = logits.topk(topk, dim=1).indices
        routing_map = torch.zeros(tokens, experts, dtype=torch.bool, **dev).scatter_(1, top, True)
        probs = torch.where(routing_map, logits, torch.zeros_like(logits))
        hidden_states = torch.randn(tokens, hidden, **dev, dtype=torch.bfloat16)
        columns = torch.randperm(experts, generator=gen, **dev)

        def dispatch_permute():
            rm = routing_map.index_select(1, columns)
            pr = probs.index_select(1, columns)
            return permute(hidden_states, rm, probs=pr, num_out_tokens=tokens * topk, fused=False)

        ids = torch.randint(0, vocab, (tokens,), generator=gen, **dev)
        history = torch.randint(0, experts, (tokens, history_layers, topk), generator=gen, **dev)

        def pregate():
            logits = torch.nn.functional.linear(hidden_states, router).float()
            return topk_rank_scores(logits, k=topk, rank_of=rank_of, ep_base=0, tp=ranks)

        rows.append({
            "tokens": tokens,
            "shuffle_plan_refine_ms": _cuda_time(lambda: assign(scores, "refine", validate=False), repeats, device=device),
            "route_table_lookup_ms": _cuda_time(lambda: table.lookup(ids), repeats, device=device),
            "history_scorer_ms": _cuda_time(lambda: scorer.scores(history=history), repeats, device=device),
            "pregate_scores_ms": _cuda_time(pregate, repeats, device=device),
            "dispatch_permute_ms": _cuda_time(dispatch_permute, repeats, device=device),
        })
        print(f"[gpu_check]   T={tokens}: {rows[-1]}", flush=True)
    return rows


def plan_graph(device: str = "cuda", token_counts=(64, 512, 4096, 16384), *, ranks: int = 8, vocab: int = 32000,
               heads: int = 32, head_dim: int = 128, repeats: int = 20) -> list[dict]:
    """The run-time plan (route rank table -> "prices" -> permutation) in a CUDA graph, and
    overlapped with attention on a side stream, for T tokens at P = ``ranks``.

    Per T: ``graph_equal`` (the replayed plan equals the eager one; on the CPU "skipped: no CUDA
    graphs"), and median milliseconds of the plan eager, the plan replayed from its graph, an
    attention stand-in alone (``scaled_dot_product_attention`` over one sequence of T tokens,
    ``heads`` x ``head_dim``), and attention with the plan on a side stream joined by one event
    (``overlapped_ms``; on the CPU the two run in order). ``overlap_saving_ms`` = attention + plan -
    overlapped."""
    import torch

    from megatron_specmoe.predict.device import RankTable
    from megatron_specmoe.schedule.fast_assign import prices_plan

    dev = {"device": device}
    gen = torch.Generator(device=device).manual_seed(0)
    table = RankTable(table=torch.rand(vocab + 1, ranks, generator=gen, **dev), layer=0, ep_base=0,
                      placement_key=())
    rows = []
    for tokens in token_counts:
        ids = torch.randint(0, vocab, (tokens,), generator=gen, **dev)
        q = torch.randn(1, heads, tokens, head_dim, generator=gen, **dev)

        def plan():
            return prices_plan(table.lookup(ids))

        def attention():
            return torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)

        eager = plan()
        row = {"tokens": tokens, "ranks": ranks, "plan_ms": _cuda_time(plan, repeats, device=device),
               "attention_ms": _cuda_time(attention, repeats, device=device)}
        if device == "cuda":
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up off the default stream, as capture wants
                for _ in range(3):
                    plan()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured = plan()
            graph.replay()
            torch.cuda.synchronize()
            row["graph_equal"] = all(torch.equal(getattr(captured, f), getattr(eager, f))
                                     for f in ("home_ext", "order", "inverse"))
            row["plan_graph_ms"] = _cuda_time(graph.replay, repeats, device=device)

            def overlapped():
                main = torch.cuda.current_stream()
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    plan()
                    done = torch.cuda.Event()
                    done.record(side)
                out = attention()
                main.wait_event(done)
                return out
        else:
            row["graph_equal"] = "skipped: no CUDA graphs on the CPU"

            def overlapped():
                plan()
                return attention()
        row["overlapped_ms"] = _cuda_time(overlapped, repeats, device=device)
        row["overlap_saving_ms"] = row["attention_ms"] + row["plan_ms"] - row["overlapped_ms"]
        rows.append(row)
        print(f"[gpu_check]   plan T={tokens}: {row}", flush=True)
    if device == "cuda" and not all(r["graph_equal"] is True for r in rows):
        raise AssertionError(f"the plan replayed from a CUDA graph differs from the eager plan: {rows}")
    return rows


def _start_rank(rank: int, world: int, device: str) -> None:
    """This rank's device (CUDA: its GPU; CPU: Megatron's CPU support for gloo), then Megatron's
    parallel state at TP = EP = world. The caller tears it down with ``parallel.destroy()``."""
    import torch

    from megatron_specmoe.megatron import cpu_support, parallel

    if device == "cuda":
        torch.cuda.set_device(rank)
    else:
        cpu_support.enable()
    parallel.initialize(parallel.ParallelLayout(tp=world, ep=world))


def _decode_graph_worker(rank, world, device="cuda", batch=4, replays=3):
    """The shuffle layer's decode-shaped step (S = 1 new token for each of ``batch`` sequences,
    no KV cache) in Megatron's padded decode, against Megatron's layer with alltoall in the same
    mode (same weights, TP = EP = world, sequence parallel off, predictor pregate, fp32); on CUDA
    the step captured in a CUDA graph and replayed on fresh inputs copied into the captured one.

    Returns ``eager_max_abs_diff`` (shuffle vs Megatron, eager), ``graph_max_abs_diff`` (each
    replay vs the eager shuffle step on the same input; on the CPU "skipped: no CUDA graphs on
    the CPU"), and the dispatcher's (drop_and_pad, capacity)."""
    import torch
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_specmoe.megatron import parallel
    from megatron_specmoe.megatron.build import MoEShape, build_from_spec, make_config
    from megatron_specmoe.megatron.shuffle_layer import ShuffleCarrier, ShuffleOptions
    from megatron_specmoe.megatron.shuffle_specs import get_gpt_layer_shuffle_spec
    from megatron_specmoe.schedule.placement import ExpertPlacement
    from megatron_specmoe.testing.lossless import arrange_layers
    from megatron_specmoe.testing.padded_decode import set_padded_decode

    _start_rank(rank, world, device)
    try:
        shape = MoEShape(hidden=64, ffn=128, experts=8, topk=2, heads=4, layers=1, vocab=64, seq=16)
        carrier = ShuffleCarrier(options=ShuffleOptions(predictor="pregate"))
        layers = {}
        for name, dispatcher in (("ref", "alltoall"), ("shuffle", "specmoe")):
            cfg = make_config(shape, dispatcher=dispatcher, tp=world, ep=world, sequence_parallel=False)
            spec = (get_gpt_layer_local_spec(num_experts=8, moe_grouped_gemm=False) if name == "ref"
                    else get_gpt_layer_shuffle_spec(8, carrier=carrier))
            torch.manual_seed(3)
            layers[name] = build_from_spec(spec, config=cfg, layer_number=1).eval()
        ref, shuffle = layers["ref"], layers["shuffle"]
        shuffle.load_state_dict(ref.state_dict(), strict=True)
        contiguous = ExpertPlacement.contiguous(8, world)
        arrange_layers([ref.mlp, shuffle.mlp], [contiguous, contiguous], seed=3, layer_index=0)
        ref.to(device)
        shuffle.to(device)
        for layer in (ref, shuffle):
            set_padded_decode(layer, True)
        gen = torch.Generator().manual_seed(5)  # the same inputs on every rank (TP ranks hold all tokens)
        inputs = [torch.randn(1, batch, shape.hidden, generator=gen).to(device) for _ in range(replays + 1)]

        def step(layer, x):
            return layer(hidden_states=x, attention_mask=None)[0]

        with torch.no_grad():
            eager = [step(shuffle, x) for x in inputs]
            diff = max(float((step(ref, x) - e).abs().max()) for x, e in zip(inputs, eager))
            graph_diff = "skipped: no CUDA graphs on the CPU"
            if device == "cuda":
                static = inputs[0].clone()
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # warm-up off the default stream, as capture wants
                    for _ in range(3):
                        step(shuffle, static)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    captured = step(shuffle, static)
                graph_diff = 0.0
                for x, e in zip(inputs[1:], eager[1:]):
                    static.copy_(x)
                    graph.replay()
                    torch.cuda.synchronize()
                    graph_diff = max(graph_diff, float((captured - e).abs().max()))
        d = shuffle.mlp.token_dispatcher
        return {"world": world, "tokens": batch, "eager_max_abs_diff": diff, "graph_max_abs_diff": graph_diff,
                "padding": [bool(d.drop_and_pad), d.capacity]}
    finally:
        parallel.destroy()


def shuffle_decode_graph() -> dict:
    """3c. The shuffle layer's decode-shaped step in padded decode, captured in a CUDA graph and
    replayed == eager, and eager == Megatron's layer (``_decode_graph_worker``), TP = EP =
    min(GPUs, 4); with one GPU TP = 1 (the plan, the padded dispatcher and the capture run)."""
    import torch

    from megatron_specmoe.testing.spawn import run_local

    world = min(torch.cuda.device_count(), 4)
    res = run_local(_decode_graph_worker, world, backend="nccl")[0]
    if res["eager_max_abs_diff"] > 1e-5 or res["graph_max_abs_diff"] > 1e-6:
        raise AssertionError(f"padded decode step: shuffle vs Megatron or replay vs eager differ: {res}")
    return res


def _te_worker(rank, world):
    import torch

    from megatron_specmoe.megatron import parallel
    from megatron_specmoe.megatron.build import MoEShape, build_from_spec, make_config
    from megatron_specmoe.megatron.specs import get_gpt_layer_specmoe_spec
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
    from megatron_specmoe.testing.spawn import run_local
    from megatron_specmoe.megatron.specs import have_te

    if not have_te():
        return {"skipped": "TransformerEngine is not importable in this Python"}
    res = run_local(_te_worker, 1, backend="nccl")[0]
    if res["max_abs_diff"] > 1e-5:
        raise AssertionError(f"TE path not lossless: {res}")
    return res


def _gpt_shuffle_worker(rank, world, cases):
    """Per case: a GPT model whose MoE layers are ShuffleTransformerLayer against Megatron's own
    layers with alltoall, same weights, TP = EP = world, fp32: the largest |logits difference|.

    ``cases``: dicts with device ("cuda": rank r on GPU r, NCCL; "cpu": gloo, for the CPU smoke test),
    te (TE linears and TEGroupedMLP experts; else local linears and SequentialMLP), sp (sequence
    parallel, world > 1 only), predictor ("pregate", "route" with a stand-in token map, "history"
    with a fitted token table + history MLP)."""
    results = []
    for case in cases:
        results.append(_gpt_shuffle_case(rank, world, case))
    return results


def _gpt_shuffle_case(rank, world, case):
    import torch

    from megatron.core import parallel_state
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.models.gpt.gpt_model import GPTModel

    from megatron_specmoe.megatron import parallel
    from megatron_specmoe.megatron.build import MoEShape, make_config
    from megatron_specmoe.megatron.shuffle_layer import ShuffleCarrier, ShuffleOptions
    from megatron_specmoe.testing.shuffle_lossless import TokenModuloPredictor, toy_history_predictor
    from megatron_specmoe.megatron.shuffle_specs import (
        feed_token_ids,
        get_gpt_block_shuffle_spec,
        get_gpt_layer_shuffle_spec,
        shuffle_state_dict_from_fused,
        true_order_output,
        with_tokenwise_norms,
    )

    device, te, predictor = case["device"], case["te"], case["predictor"]
    _start_rank(rank, world, device)
    try:
        shape = MoEShape(hidden=128, ffn=256, experts=8, topk=2, heads=4, layers=2, vocab=256, seq=64)
        sp = case["sp"] and world > 1
        route = {"route": lambda: TokenModuloPredictor(num_experts=8, num_layers=2),
                 "history": lambda: toy_history_predictor(shape)}.get(predictor, lambda: None)()
        carrier = ShuffleCarrier(options=ShuffleOptions(
            predictor=predictor, keep_plans=True, route_predictor=route,
            route_vocab_size=shape.vocab if predictor == "route" else None))
        final_norm = None
        if te:
            from megatron.core.extensions.transformer_engine import TENorm

            final_norm = TENorm
        models = {}
        for name, dispatcher in (("ref", "alltoall"), ("shuffle", "specmoe")):
            cfg = make_config(shape, dispatcher=dispatcher, tp=world, ep=world, sequence_parallel=sp,
                              moe_grouped_gemm=te, use_cpu_initialization=not te)
            if name == "ref":
                spec = (gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(num_experts=8, moe_grouped_gemm=True)
                        if te else gpt_layer_specs.get_gpt_layer_local_spec(num_experts=8, moe_grouped_gemm=False))
                if sp:
                    spec = get_gpt_block_shuffle_spec(cfg, spec if te else with_tokenwise_norms(spec),
                                                      final_norm=final_norm)
            else:
                spec = get_gpt_layer_shuffle_spec(8, carrier=carrier, use_transformer_engine=te,
                                                  sequence_parallel_norms=sp and not te)
                if sp:
                    spec = get_gpt_block_shuffle_spec(cfg, spec, final_norm=final_norm)
            models[name] = GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=shape.vocab,
                                    max_sequence_length=shape.seq, position_embedding_type="rope").to(device).eval()
        ref, shuffle = models["ref"], models["shuffle"]
        state = shuffle_state_dict_from_fused(ref.state_dict()) if te else ref.state_dict()
        missing, unexpected = shuffle.load_state_dict(state, strict=False)
        bad = [k for k in list(missing) + list(unexpected) if not k.endswith("_extra_state")]
        if bad:
            raise AssertionError(f"weights do not map from the reference spec to the shuffle spec: {bad}")
        if sp:
            true_order_output(shuffle, carrier)
        feed_token_ids(shuffle, carrier)
        gen = torch.Generator().manual_seed(11 + parallel_state.get_data_parallel_rank())
        tokens = torch.randint(0, shape.vocab, (2, shape.seq), generator=gen).to(device)
        positions = torch.arange(shape.seq).unsqueeze(0).expand(2, -1).to(device)
        mask = torch.triu(torch.ones(1, 1, shape.seq, shape.seq, dtype=torch.bool), diagonal=1).to(device)
        with torch.no_grad():
            outs = [m(tokens, positions, mask) for m in (ref, shuffle)]
        layer = shuffle.decoder.layers[0]
        return {"world": world, "sequence_parallel": sp, "predictor": predictor,
                "linear_qkv": type(layer.self_attention.linear_qkv).__name__,
                "linear_proj": type(layer.self_attention.linear_proj).__name__,
                "experts_module": type(layer.mlp.experts).__name__,
                "plans": len(carrier.plans),
                "max_abs_diff": float((outs[0] - outs[1]).abs().max())}
    finally:
        parallel.destroy()


def _shuffle_cases(te: bool, world: int, device: str = "cuda") -> list[dict]:
    predictors = ("pregate",) if te else ("pregate", "route", "history")
    sps = (False, True) if world > 1 else (False,)
    return [{"device": device, "te": te, "sp": sp, "predictor": p} for p in predictors for sp in sps]


def _run_shuffle_cases(te: bool) -> dict:
    import torch

    from megatron_specmoe.testing.spawn import run_local

    world = min(torch.cuda.device_count(), 4)
    cases = _shuffle_cases(te, world)
    results = run_local(_gpt_shuffle_worker, world, cases, backend="nccl")[0]
    out = {f"{c['predictor']}_sp_{c['sp']}": r for c, r in zip(cases, results)}
    worst = max(r["max_abs_diff"] for r in out.values())
    if worst > 1e-5:
        raise AssertionError(f"shuffle layer not lossless ({'TE' if te else 'local'} linears): "
                             f"max |diff| {worst:.3e}: {out}")
    return out


def shuffle_nccl() -> dict:
    """s-TS with local linears on NCCL, every predictor (with one GPU: TP = 1, the CUDA paths of
    the predictors and the assignment run, the shuffle itself is the identity)."""
    return _run_shuffle_cases(te=False)


def te_shuffle() -> dict:
    from megatron_specmoe.megatron.specs import have_te

    if not have_te():
        return {"skipped": "TransformerEngine is not importable in this Python"}
    return _run_shuffle_cases(te=True)


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
                     ("plan_graph", plan_graph), ("shuffle_decode_graph", shuffle_decode_graph),
                     ("transformer_engine", transformer_engine), ("shuffle_nccl", shuffle_nccl),
                     ("te_shuffle", te_shuffle)):
        _step(results, name, fn)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"[gpu_check] wrote {args.out}")
    return 0 if all(v["ok"] for k, v in results.items() if isinstance(v, dict)) else 1


if __name__ == "__main__":
    sys.exit(main())
