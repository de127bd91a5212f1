"""``specmoe demo``: start W gloo ranks on this machine and serve the same batches with
``alltoall`` and ``specmoe``; print the table, optionally write JSON and a PNG figure."""

from __future__ import annotations

import argparse
import json
import sys
import time

HELP = "run a small Megatron MoE model on local gloo ranks with alltoall and specmoe, and compare"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ranks", type=int, default=4, help="number of local processes (default 4)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    p.add_argument("--ep", type=int, default=None, help="expert-parallel size (default: --ranks)")
    p.add_argument("--batches", type=int, default=4, help="forwards per dispatcher (default 4)")
    p.add_argument("--seq", type=int, default=64, help="sequence length (default 64)")
    p.add_argument("--batch", type=int, default=4, help="sequences per rank per forward (default 4)")
    p.add_argument("--experts", type=int, default=8, help="routed experts per layer (default 8)")
    p.add_argument("--topk", type=int, default=2, help="experts per token (default 2)")
    p.add_argument("--layers", type=int, default=2, help="transformer layers, all MoE (default 2)")
    p.add_argument("--hidden", type=int, default=64, help="hidden size (default 64)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json", metavar="PATH", help="write the numbers as JSON")
    p.add_argument("--figure", metavar="PATH", help="write a PNG of per-layer local activation rate")


def _check(args) -> None:
    ep = args.ep or args.ranks
    problems = []
    if args.ranks < 1:
        problems.append(f"--ranks must be >= 1, got {args.ranks}")
    if args.ranks % args.tp:
        problems.append(f"--tp {args.tp} must divide --ranks {args.ranks}")
    if args.ranks % ep:
        problems.append(f"--ep {ep} must divide --ranks {args.ranks}")
    if args.experts % ep:
        problems.append(f"--ep {ep} must divide --experts {args.experts} (equal experts per rank)")
    if not 1 <= args.topk <= args.experts:
        problems.append(f"--topk must be in 1..--experts, got {args.topk}")
    if problems:
        raise SystemExit("specmoe demo: " + "; ".join(problems))


def run(args) -> int:
    _check(args)
    from megatron_specmoe.comm.spawn import run_local
    from megatron_specmoe.glue.build import MoEShape
    from megatron_specmoe.glue.demo import DemoSettings, serve_worker
    from megatron_specmoe.report import format_table, plot_layer_lar, run_summary

    ep = args.ep or args.ranks
    settings = DemoSettings(
        shape=MoEShape(hidden=args.hidden, ffn=args.hidden, experts=args.experts, topk=args.topk,
                       layers=args.layers, heads=4, vocab=256, seq=max(128, args.seq)),
        tp=args.tp, ep=ep, batches=args.batches, seq=args.seq, batch=args.batch, seed=args.seed,
    )
    print(f"[specmoe demo] starting {args.ranks} gloo ranks (TP={args.tp}, EP={ep}) ...", flush=True)
    start = time.perf_counter()
    result = run_local(serve_worker, args.ranks, settings)[0]
    summaries = [run_summary(r.name, r.reports, r.forward_s, result.tokens) for r in result.runs]
    print()
    print(format_table(summaries, result.max_abs_diff))
    print(f"\n{result.tokens} tokens per dispatcher in {time.perf_counter() - start:.1f}s; "
          f"command: specmoe demo {' '.join(sys.argv[2:])}")
    out = {
        "command": "specmoe demo " + " ".join(sys.argv[2:]),
        "settings": {"ranks": args.ranks, "tp": args.tp, "ep": ep, "batches": args.batches, "seq": args.seq,
                     "batch": args.batch, "experts": args.experts, "topk": args.topk, "layers": args.layers,
                     "hidden": args.hidden},
        "lossless_max_abs_diff": result.max_abs_diff,
        "dispatchers": {s["dispatcher"]: s for s in summaries},
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.json}")
    if args.figure:
        plot_layer_lar(summaries, args.figure)
        print(f"wrote {args.figure}")
    if result.max_abs_diff > 1e-5:
        print(f"LOSSLESS CHECK FAILED: max |diff| = {result.max_abs_diff:.3e}", file=sys.stderr)
        return 1
    return 0
