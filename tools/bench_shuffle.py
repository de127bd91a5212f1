"""Benchmark s-TS inside Megatron's transformer layer (CPU, gloo).

Part 1, plan overhead. The work a ShuffleTransformerLayer adds per forward on every TP rank, for
T = ``--plan-tokens`` (8192) at P = ``--plan-tp`` (8): its steps (router gating on all T rows or
on one rank's T/P rows, top-k -> rank scores, rank counts from gathered ids, the route rank-table
lookup, the history MLP, the ``refine`` assignment) and each predictor's whole plan as the layer
runs it: pregate without sequence parallelism (every rank gates all T tokens), pregate with it
(each rank gates its own rows; the ids ride along with the all-gather), route, history. Compared
with the forward time of one Megatron MoE transformer layer on the same T tokens in one process
(``--plan-hidden`` ...): the ratio to the whole layer, and to 1/P of it (a TP rank's share of the
layer's arithmetic: an estimate, labelled so). Memory: the plan's tensors, counted from their sizes.

Part 2, traffic and time on ``--ranks`` (4) gloo ranks with a small GPT (TP = EP = ranks, every
layer MoE, sequence parallel on; with ``--no-sp`` off). Three models with identical weights see
the same batches: Megatron ``alltoall`` (timed), Megatron's layers with the specmoe dispatcher and
contiguous placement (= what alltoall sends, by the dispatcher's own accounting), and the shuffle
layers with the pregate predictor (needs no fitted plan; recorded and timed). Reported: remote
(token, expert) pairs and dispatch+combine bytes per token, local activation rate, load imbalance;
MoE-layer forward time (forward hooks on the MoE layers) and whole-model forward time as ratios to
alltoall measured in the same run (median over ``--repeats`` forwards, averaged over ranks).

Prints the exact command, then the numbers; ``--json OUT`` writes them.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def log(msg: str) -> None:
    print(f"[bench_shuffle] {msg}", file=sys.stderr, flush=True)


# ---- part 1: plan overhead -------------------------------------------------------------------


def _median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def part_plan(rank: int, world_size: int, args) -> dict:
    """One process: time the run-time plan for T tokens at P ranks, per predictor, and one MoE
    layer's forward on T tokens."""
    import warnings

    warnings.filterwarnings("ignore")
    from megatron_specmoe.megatron import cpu_support
    from megatron_specmoe.megatron import parallel
    from megatron_specmoe.megatron.build import MoEShape, build_from_spec, make_config
    from megatron_specmoe.megatron.specs import get_gpt_layer_specmoe_spec
    from megatron_specmoe.schedule.assignment import assign
    from megatron_specmoe.schedule.placement import ExpertPlacement
    from megatron_specmoe.predict.history_mlp import HistoryLayerScorer
    from megatron_specmoe.predict.device import RankTable
    from megatron_specmoe.predict.pregate import expert_rank_counts, span_hosts, top_experts, topk_rank_scores

    cpu_support.enable()
    parallel.initialize(parallel.ParallelLayout(tp=1, ep=1))
    try:
        t, p, h = args.plan_tokens, args.plan_tp, args.plan_hidden
        e, k = args.plan_experts, args.plan_topk
        c = -(-t // p)
        shape = MoEShape(hidden=h, ffn=args.plan_ffn, experts=e, topk=k, heads=args.plan_heads, layers=1,
                         seq=args.plan_seq)
        config = make_config(shape, dispatcher="specmoe", sequence_parallel=False)
        layer = build_from_spec(get_gpt_layer_specmoe_spec(e, use_transformer_engine=False),
                                config=config, layer_number=1).eval()
        batch = t // args.plan_seq
        x = torch.randn(args.plan_seq, batch, h)
        mask = torch.triu(torch.ones(1, 1, args.plan_seq, args.plan_seq, dtype=torch.bool), diagonal=1)
        rank_of = torch.as_tensor(ExpertPlacement.contiguous(e, p).rank_of_logical())
        hosts = span_hosts(rank_of, ep_base=0, tp=p)  # [E, P]
        router = layer.mlp.router
        gen = torch.Generator().manual_seed(0)
        # Run-time predictors with random weights (timing only): the token table as a rank table
        # over --plan-vocab ids, the history MLP of MoE layer --plan-history-layers.
        vocab, lh, mh = args.plan_vocab, args.plan_history_layers, 128
        table = RankTable(table=torch.rand(vocab + 1, p, generator=gen), layer=0, ep_base=0, placement_key=())
        scorer = HistoryLayerScorer(layer=lh, num_experts=e, prior=torch.full((e,), 1.0 / e),
                                    w1=torch.randn(lh * e, mh, generator=gen) * 0.05, b1=torch.zeros(mh),
                                    w2=torch.randn(mh, e, generator=gen) * 0.05, b2=torch.zeros(e))
        ids = torch.randint(0, vocab, (t,), generator=gen)
        history = torch.randint(0, e, (t, lh, k), generator=gen)

        with torch.no_grad():
            ln = layer.input_layernorm(x).reshape(t, h)
            shard = ln[:c].contiguous()  # one TP rank's rows under sequence parallelism
            logits, shard_logits = router.gating(ln), router.gating(shard)
            gate_ids = top_experts(logits, k)
            scores = topk_rank_scores(logits, k=k, rank_of=rank_of, ep_base=0, tp=p)
            steps = {
                "gating_all_T": lambda: router.gating(ln),
                "gating_own_C": lambda: router.gating(shard),
                "topk_rank_scores_T": lambda: topk_rank_scores(logits, k=k, rank_of=rank_of, ep_base=0, tp=p),
                "top_experts_own_C": lambda: top_experts(shard_logits, k),
                "rank_counts_from_ids_T": lambda: expert_rank_counts(gate_ids, rank_of=rank_of, ep_base=0, tp=p),
                "route_table_lookup_T": lambda: table.lookup(ids),
                "history_scorer_T": lambda: scorer.scores(history=history) @ hosts,
                "assign_refine": lambda: assign(scores, "refine", validate=False),
            }
            # Each predictor's whole plan, as the layer runs it (no collective is timed: with
            # sequence parallelism the gate ids ride along with the all-gather the layer does anyway).
            plans = {
                "pregate, sequence parallel off (every rank gates all T)": lambda: assign(
                    topk_rank_scores(router.gating(ln), k=k, rank_of=rank_of, ep_base=0, tp=p), "refine",
                    validate=False),
                "pregate, sequence parallel on (each rank gates its T/P rows)": lambda: (
                    top_experts(router.gating(shard), k),
                    assign(expert_rank_counts(gate_ids, rank_of=rank_of, ep_base=0, tp=p), "refine", validate=False)),
                "route (token rank table)": lambda: assign(table.lookup(ids), "refine", validate=False),
                f"history (MLP over {lh} layers' routes)": lambda: assign(
                    scorer.scores(history=history) @ hosts, "refine", validate=False),
            }
            log(f"part 1: plan steps and plans for T={t}, P={p} ...")
            step_ms = {name: _median_time(fn, args.repeats) * 1e3 for name, fn in steps.items()}
            plan_ms = {name: _median_time(fn, args.repeats) * 1e3 for name, fn in plans.items()}
            log(f"part 1: layer forward on T={t} (H={h}) ...")
            layer_ms = _median_time(lambda: layer(hidden_states=x, attention_mask=mask),
                                    max(1, args.repeats // 2)) * 1e3
        n = p + (p % 2)
        # Plan tensors: scores [T, P] f32; home [T], order and inverse [T_pad] int64; the refine
        # step's extended score table [(T_pad + 1), n] f32 and its [n, C] shard / gain tables.
        plan_bytes = t * p * 4 + t * 8 + 2 * p * c * 8
        work_bytes = (p * c + 1) * n * 4 + 4 * n * c * 8 + t * e * 4
        return {
            "tokens": t, "tp": p, "hidden": h, "experts": e, "topk": k, "vocab": vocab, "history_layers": lh,
            "step_ms": step_ms, "plan_ms": plan_ms, "layer_forward_ms": layer_ms,
            "plan_over_layer": {name: ms / layer_ms for name, ms in plan_ms.items()},
            "plan_over_layer_share_est": {name: ms / (layer_ms / p) for name, ms in plan_ms.items()},
            "plan_state_bytes": plan_bytes, "plan_work_bytes": work_bytes,
            "rank_table_bytes": (vocab + 1) * p * 4,
        }
    finally:
        parallel.destroy()


# ---- part 2: traffic and time on gloo ranks --------------------------------------------------


def part_traffic(rank: int, world_size: int, args) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel

    from megatron_specmoe.megatron import cpu_support
    from megatron_specmoe.megatron import parallel
    from megatron_specmoe.megatron.build import MoEShape, make_config
    from megatron_specmoe.megatron.dispatcher import DispatchRecorder
    from megatron_specmoe.megatron.model_tools import attach_recorder, moe_sites
    from megatron_specmoe.megatron.shuffle_layer import ShuffleCarrier, ShuffleOptions
    from megatron_specmoe.testing.shuffle_lossless import ShuffleCase, _arrange
    from megatron_specmoe.megatron.shuffle_specs import (
        feed_token_ids,
        get_gpt_block_shuffle_spec,
        get_gpt_layer_shuffle_spec,
        true_order_output,
        with_tokenwise_norms,
    )
    from megatron_specmoe.megatron.specs import get_gpt_layer_specmoe_spec
    from megatron_specmoe.schedule.placement import ExpertPlacement

    sp = not args.no_sp
    tp = ep = world_size
    card = None
    gpt_kwargs: dict = {"position_embedding_type": "rope"}
    config_extra: dict = {}
    if args.demo:
        from megatron_specmoe.megatron.checkpoint import read_card

        card = read_card()
        shape = card.shape
        config_extra = dict(card.config)
        gpt = dict(card.gpt)
        gpt_kwargs = {"position_embedding_type": gpt["position_embedding_type"],
                      "rotary_base": int(gpt["rotary_base"]),
                      "share_embeddings_and_output_weights": bool(gpt["share_embeddings_and_output_weights"])}
    else:
        shape = MoEShape(hidden=args.hidden, ffn=args.ffn, experts=args.experts, topk=args.topk,
                         heads=args.heads, layers=args.layers, vocab=args.vocab, seq=args.seq)
    cpu_support.enable()
    parallel.initialize(parallel.ParallelLayout(tp=tp, ep=ep), seed=args.seed)
    try:
        cfg = {d: make_config(shape, dispatcher=d, tp=tp, ep=ep, **{**config_extra, "sequence_parallel": sp})
               for d in ("alltoall", "specmoe")}
        route = None
        if args.predictor == "route":
            from megatron_specmoe.predict.token_table import TokenTable
            from megatron_specmoe.artifacts.trace_io import read_trace

            route = TokenTable(vocab_size=shape.vocab).fit(read_trace(args.fit_trace))
        carrier = ShuffleCarrier(options=ShuffleOptions(predictor=args.predictor, method=args.method,
                                                        route_predictor=route))
        specs = {
            "alltoall": get_gpt_layer_local_spec(num_experts=shape.experts, moe_grouped_gemm=False),
            "base": get_gpt_layer_specmoe_spec(shape.experts, use_transformer_engine=False),
            "specmoe": get_gpt_layer_shuffle_spec(shape.experts, carrier=carrier, sequence_parallel_norms=sp),
        }
        models = {}
        for name, spec in specs.items():
            config = cfg["alltoall" if name == "alltoall" else "specmoe"]
            if sp:
                spec = get_gpt_block_shuffle_spec(config, spec if name == "specmoe" else with_tokenwise_norms(spec))
            models[name] = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=shape.vocab,
                                    max_sequence_length=shape.seq, **gpt_kwargs).eval()
        if sp:
            true_order_output(models["specmoe"], carrier)
        feed_token_ids(models["specmoe"], carrier)
        if card is not None:  # the trained weights, in every model
            from megatron_specmoe.megatron.checkpoint import load_state, read_weights

            weights = read_weights(card)
            for model in models.values():
                load_state(model, weights, source=card.weights_path)
        else:  # seeded weights: same dense weights, same router and experts by logical id
            state = models["alltoall"].state_dict()
            models["base"].load_state_dict(state, strict=True)
            models["specmoe"].load_state_dict(state, strict=True)
            case = ShuffleCase(shape=shape, tp=tp, ep=ep, seed=args.seed)
            contiguous = ExpertPlacement.contiguous(shape.experts, ep)
            for i, sites in enumerate(zip(*(moe_sites(m) for m in models.values()))):
                _arrange([s.layer for s in sites], case, [contiguous] * 3, i)
        recorders = {n: DispatchRecorder() for n in ("base", "specmoe")}
        for name, rec in recorders.items():
            attach_recorder(models[name], rec)

        # MoE-layer time: forward hooks on every MoE layer.
        moe_time = {n: 0.0 for n in models}
        starts = {}

        def hooks(name):
            def pre(module, _args):
                starts[id(module)] = time.perf_counter()

            def post(module, _args, _out):
                moe_time[name] += time.perf_counter() - starts.pop(id(module))

            return pre, post

        for name, model in models.items():
            pre, post = hooks(name)
            for site in moe_sites(model):
                site.layer.register_forward_pre_hook(pre)
                site.layer.register_forward_hook(post)

        mask = torch.triu(torch.ones(1, 1, args.seq, args.seq, dtype=torch.bool), diagonal=1)
        positions = torch.arange(args.seq).unsqueeze(0).expand(args.batch, -1)
        per_forward = {n: [] for n in models}
        per_moe = {n: [] for n in models}
        diff = 0.0

        windows = None
        if args.demo:  # real text: consecutive windows of the evaluation trace's token ids
            from megatron_specmoe.artifacts.trace_io import read_trace

            ids = torch.as_tensor(read_trace(args.eval_trace).token_ids.astype("int64"))
            windows = ids[: ids.shape[0] // args.seq * args.seq].view(-1, args.seq)
            if windows.shape[0] < (args.repeats + 1) * args.batch:
                raise ValueError(f"--eval-trace has {windows.shape[0]} windows of {args.seq} tokens; "
                                 f"need (repeats + 1) * batch = {(args.repeats + 1) * args.batch}")

        def batches():
            gen = torch.Generator().manual_seed(args.seed)
            for step in range(args.repeats + 1):
                if windows is not None:
                    yield windows[step * args.batch : (step + 1) * args.batch]
                else:
                    yield torch.randint(0, shape.vocab, (args.batch, args.seq), generator=gen)

        with torch.no_grad():
            # Pass 1, timed, recorders off (recording costs host work the runtime does not do).
            for name in recorders:
                attach_recorder(models[name], None)
            for step, tokens in enumerate(batches()):
                for name, model in models.items():
                    torch.distributed.barrier()
                    moe_time[name] = 0.0
                    t0 = time.perf_counter()
                    model(tokens, positions, mask)
                    elapsed = time.perf_counter() - t0
                    if step:  # the first forward warms up
                        per_forward[name].append(elapsed)
                        per_moe[name].append(moe_time[name])
                if rank == 0:
                    log(f"part 2: timed forward {step}/{args.repeats} done")
            if args.profile and rank == 0:
                from torch.profiler import ProfilerActivity, profile

                tokens = next(batches())
                for name in ("alltoall", "specmoe"):
                    with profile(activities=[ProfilerActivity.CPU]) as prof:
                        models[name](tokens, positions, mask)
                    log(f"profile of one {name} forward on rank 0:\n"
                        + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
                # Other ranks take part in the two profiled forwards' collectives.
            elif args.profile:
                tokens = next(batches())
                for name in ("alltoall", "specmoe"):
                    models[name](tokens, positions, mask)
            # Pass 2, the same batches recorded by the dispatchers' own accounting.
            for name, rec in recorders.items():
                attach_recorder(models[name], rec)
            for tokens in batches():
                outs = {name: model(tokens, positions, mask) for name, model in models.items()}
                diff = max(diff, float((outs["alltoall"] - outs["specmoe"]).abs().max()))
        summed = {}
        for name, rec in recorders.items():
            total = None
            for r in rec.records:
                total = r.measures if total is None else total + r.measures
            summed[name] = total
        return {
            "diff": diff,
            "measures": summed,
            "forward_s": {n: statistics.median(v) for n, v in per_forward.items()},
            "moe_s": {n: statistics.median(v) for n, v in per_moe.items()},
            "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
            "shape": {"layers": shape.layers, "hidden": shape.hidden, "experts": shape.experts, "topk": shape.topk},
        }
    finally:
        parallel.destroy()


def summarize_traffic(results, args) -> dict:
    out = {}
    hidden = results[0]["shape"]["hidden"]
    pair_bytes = hidden * 4 + 4 + hidden * 4  # dispatch (activation + prob) + combine
    for name in ("base", "specmoe"):
        total = None
        for r in results:
            m = r["measures"][name]
            total = m if total is None else total + m
        load = total.load_per_rank
        out[name] = {
            "tokens": total.tokens,
            "remote_pairs_per_token": total.remote_pairs / total.tokens,
            "remote_bytes_per_token": total.remote_pairs * pair_bytes / total.tokens,
            "lar": total.local_activation_rate,
            "load_imbalance": max(load) / (sum(load) / len(load)) if sum(load) else 0.0,
        }
    for kind in ("forward_s", "moe_s"):
        mean = {n: statistics.mean(r[kind][n] for r in results) for n in ("alltoall", "base", "specmoe")}
        out[kind] = mean
        out[kind + "_ratio_specmoe_over_alltoall"] = mean["specmoe"] / mean["alltoall"]
    out["max_logit_diff"] = max(r["diff"] for r in results)
    out["shape"] = results[0]["shape"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("plan", "traffic", "both"), default="both")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--plan-tokens", type=int, default=8192)
    ap.add_argument("--plan-tp", type=int, default=8)
    ap.add_argument("--plan-hidden", type=int, default=1024)
    ap.add_argument("--plan-ffn", type=int, default=1792)
    ap.add_argument("--plan-heads", type=int, default=16)
    ap.add_argument("--plan-experts", type=int, default=8)
    ap.add_argument("--plan-topk", type=int, default=2)
    ap.add_argument("--plan-seq", type=int, default=512, help="sequence length; batch = tokens / seq")
    ap.add_argument("--plan-vocab", type=int, default=32000, help="token ids of the route rank table (Mixtral: 32000)")
    ap.add_argument("--plan-history-layers", type=int, default=16, help="MoE layers of route history the MLP reads")
    ap.add_argument("--plan-threads", type=int, default=1,
                    help="torch threads in part 1 (more than the free cores makes torch ops stall)")
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--no-sp", action="store_true", help="sequence parallel off in part 2")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--ffn", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--method", default="refine")
    ap.add_argument("--predictor", choices=("pregate", "route"), default="pregate",
                    help="route: a token table fitted on --fit-trace (separate data), on token ids")
    ap.add_argument("--demo", action="store_true",
                    help="part 2 on the shipped trained demo model (megatron_specmoe/data), batches "
                         "from --eval-trace; --hidden etc. are then ignored")
    data = REPO / "megatron_specmoe" / "data" / "traces"
    ap.add_argument("--fit-trace", type=Path, default=data / "demo-calibration.npz")
    ap.add_argument("--eval-trace", type=Path, default=data / "demo-evaluation.npz")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="part 2: torch profiler table of one forward (rank 0)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from megatron_specmoe.testing.spawn import run_local

    print("command:", shlex.join([sys.executable, "tools/bench_shuffle.py", *(argv if argv is not None else sys.argv[1:])]))
    report = {}
    if args.part in ("plan", "both"):
        r = run_local(part_plan, 1, args, threads=args.plan_threads, timeout_s=3600)[0]
        report["plan"] = r
        print(f"\n[plan overhead] T={r['tokens']} tokens, TP={r['tp']}, H={r['hidden']}, E={r['experts']}, "
              f"k={r['topk']}, {args.plan_threads} threads")
        print("  steps (median ms):")
        for name, ms in r["step_ms"].items():
            print(f"    {name:<28} {ms:8.2f}")
        print(f"  one MoE transformer layer forward on all T tokens (1 process): {r['layer_forward_ms']:.1f} ms")
        print(f"  {'plan, per predictor':<62} {'ms':>7} {'/ layer':>8} {'/ layer/TP (est.)':>18}")
        for name, ms in r["plan_ms"].items():
            print(f"  {name:<62} {ms:7.2f} {100 * r['plan_over_layer'][name]:7.2f}% "
                  f"{100 * r['plan_over_layer_share_est'][name]:17.2f}%")
        print(f"  plan memory: {r['plan_state_bytes'] / 1024:.0f} KiB kept (scores, home, order, inverse), "
              f"~{r['plan_work_bytes'] / 1024:.0f} KiB transient (refine tables, logits); route rank table "
              f"{r['rank_table_bytes'] / 2**20:.2f} MiB per layer (V = {r['vocab']})")
    if args.part in ("traffic", "both"):
        log(f"part 2: {args.ranks} gloo ranks, TP = EP = {args.ranks}, sequence parallel "
            f"{'off' if args.no_sp else 'on'}")
        results = run_local(part_traffic, args.ranks, args, timeout_s=3600)
        s = summarize_traffic(results, args)
        report["traffic"] = s
        t = args.seq * args.batch
        print(f"\n[traffic] {args.ranks} gloo ranks, TP=EP={args.ranks}, SP {'off' if args.no_sp else 'on'}, "
              f"{'trained demo GPT' if args.demo else 'seeded GPT'} L={s['shape']['layers']} H={s['shape']['hidden']} "
              f"E={s['shape']['experts']} k={s['shape']['topk']}, T={t} tokens per forward, "
              f"{args.repeats} forwards (+1 warm-up), predictor {args.predictor} ({args.method}), "
              + ("token table fitted on " + args.fit_trace.name if args.predictor == "route" else "no fitted plan needed"))
        print(f"  {'dispatcher':<22}{'remote pairs/tok':>17}{'remote bytes/tok':>17}{'LAR':>8}{'imbalance':>11}")
        for name, label in (("base", "alltoall (recorded)"), ("specmoe", "specmoe + s-TS")):
            m = s[name]
            print(f"  {label:<22}{m['remote_pairs_per_token']:>17.3f}{m['remote_bytes_per_token']:>17.1f}"
                  f"{m['lar']:>8.3f}{m['load_imbalance']:>11.3f}")
        print(f"  MoE-layer forward time per model forward (mean over ranks of the median): alltoall "
              f"{1e3 * s['moe_s']['alltoall']:.2f} ms, specmoe dispatcher unshuffled "
              f"{1e3 * s['moe_s']['base']:.2f} ms, specmoe+s-TS {1e3 * s['moe_s']['specmoe']:.2f} ms, "
              f"ratio s-TS/alltoall {s['moe_s_ratio_specmoe_over_alltoall']:.3f}")
        print(f"  whole-model forward: alltoall {1e3 * s['forward_s']['alltoall']:.2f} ms, unshuffled "
              f"{1e3 * s['forward_s']['base']:.2f} ms, specmoe+s-TS {1e3 * s['forward_s']['specmoe']:.2f} ms, "
              f"ratio s-TS/alltoall {s['forward_s_ratio_specmoe_over_alltoall']:.3f}")
        print(f"  max |logits specmoe - alltoall| = {s['max_logit_diff']:.2e}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
