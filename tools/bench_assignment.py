"""Benchmark the balanced assignment methods: time per call, and the LAR each reaches on traces.

Part 1, time. For T tokens x P ranks (``--sizes`` x ``--ranks``) and every method of
``schedule/assignment.py``: median wall time of ``assign`` over ``--repeats`` calls on seeded
Dirichlet(0.3) rank scores (rows sum to 1, like ``rank_scores`` of a normalised predictor), on
``--device`` with ``--threads`` CPU threads, as the runtime calls it (``validate=False``); the
objective reached relative to ``optimal``; and the aten ops one call dispatches (a proxy for the
GPU kernel launches of the torch methods: launches, not arithmetic, bound them at these sizes; with
``--device cpu`` greedy and refine run their numpy fast path, which dispatches few aten ops, so take
the GPU's count from a ``--device cuda`` run or the docstring of ``schedule/assignment.py``).

Part 2, quality. On the Mixtral-8x7B MT-Bench traces (``--traces``; real routes, benchmark data,
never copied into the project): leave one category out (fit predictors on the other three,
evaluate on it), repeated routes dropped within each side first (``trace_io.cross_domain_split``),
batches of ``--batch`` tokens, contiguous expert placement at EP = ``--ep``. Predictors:
    prev     the previous layer's experts (layer 0: uniform). No fitting; a floor.
    layer    the inter-layer table with n = 2 (the paper's 2-layer table; planning/predictors).
    history  the route-history MLP (predict/history_mlp.py).
    oracle   perfect prediction (the true routes) under balance: the ceiling.
Every method is scored with every predictor; the measures are summed over the folds.

Prints the command line that made the numbers, then the tables. ``--json OUT`` writes them all.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from bench_data import MIXTRAL_TRACES  # noqa: E402 - tools/ is on sys.path when run

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from megatron_specmoe.schedule.assignment import ASSIGNMENT_METHODS, assign, planned_score  # noqa: E402
from megatron_specmoe.measure.measures import RouteMeasures  # noqa: E402
from megatron_specmoe.schedule.placement import ExpertPlacement  # noqa: E402
from megatron_specmoe.predict.base import RouteContext  # noqa: E402

CATEGORIES = ("coding", "math", "roleplay", "writing")


def log(msg: str) -> None:
    print(f"[bench_assignment] {msg}", file=sys.stderr, flush=True)


# ---- part 1: time ----------------------------------------------------------------------------


def count_ops(fn) -> int:
    """aten ops dispatched by one call of ``fn`` (TorchDispatchMode sees each one)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Counter.n += 1
            return func(*args, **(kwargs or {}))

    with Counter():
        fn()
    return Counter.n


def time_methods(sizes, ranks, methods, repeats, device) -> list[dict]:
    rows = []
    for p in ranks:
        for t in sizes:
            rng = np.random.default_rng(1000 * t + p)
            scores = torch.from_numpy(rng.dirichlet(np.full(p, 0.3), size=t).astype(np.float32)).to(device)
            best = planned_score(scores.cpu(), assign(scores, "optimal"))
            for m in methods:
                n = max(1, repeats // 5) if m == "optimal" else repeats
                plan = assign(scores, m, validate=False)  # the runtime call; warm-up
                times = []
                for _ in range(n):
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    plan = assign(scores, m, validate=False)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - start)
                ops = count_ops(lambda: assign(scores, m, validate=False)) if m != "optimal" else None
                rows.append({
                    "tokens": t, "ranks": p, "method": m, "ms": 1e3 * statistics.median(times),
                    "aten_ops": ops, "objective_vs_optimal": planned_score(scores.cpu(), plan) / best,
                })
                log(f"T={t} P={p} {m}: {rows[-1]['ms']:.3f} ms")
    return rows


# ---- part 2: quality on traces ---------------------------------------------------------------


class PreviousLayer:
    """Scores 1/k on the experts the token used at the previous layer (uniform at layer 0)."""

    kind = "prev"

    def __init__(self, num_layers: int, num_experts: int):
        self.num_layers, self.num_experts = num_layers, num_experts

    def expert_scores(self, ctx: RouteContext) -> np.ndarray:
        tokens = ctx.num_tokens
        if ctx.layer == 0 or ctx.history is None:
            return np.full((tokens, self.num_experts), 1.0 / self.num_experts, dtype=np.float32)
        prev = np.asarray(ctx.history)[:, ctx.layer - 1].astype(np.int64)
        out = np.zeros((tokens, self.num_experts), dtype=np.float32)
        np.put_along_axis(out, prev, 1.0 / prev.shape[1], axis=1)
        return out

    def memory_bytes(self) -> int:
        return 0


class Oracle:
    """The true routes of ``trace`` (the evaluator asks for the whole trace, one layer at a time)."""

    kind = "oracle"

    def __init__(self, trace):
        self.trace, self.num_layers, self.num_experts = trace, trace.num_layers, trace.num_experts

    def expert_scores(self, ctx: RouteContext) -> np.ndarray:
        true = self.trace.experts[:, ctx.layer].astype(np.int64)
        if true.shape[0] != ctx.num_tokens:
            raise ValueError("Oracle: asked for a batch that is not the whole trace")
        out = np.zeros((true.shape[0], self.num_experts), dtype=np.float32)
        np.put_along_axis(out, true, 1.0 / true.shape[1], axis=1)
        return out

    def memory_bytes(self) -> int:
        return 0


def make_predictor(name: str, fit):
    if name == "prev":
        return PreviousLayer(fit.num_layers, fit.num_experts)
    from megatron_specmoe.predict.registry import fit_predictor

    if name == "layer":
        return fit_predictor("layer", fit, n=2)
    if name == "history":
        return fit_predictor("history", fit)
    raise ValueError(f"unknown predictor {name!r}; use prev, layer, history, oracle")


def quality(trace_dir: Path, predictors, methods, ep: int, batch: int) -> dict:
    from megatron_specmoe.measure.evaluate import PredictionCounts, evaluate_trace
    from megatron_specmoe.artifacts.trace_io import cross_domain_split, read_traces

    traces = {c: read_traces(trace_dir / f"experts_{c}_mixtral.json", num_experts=8) for c in CATEGORIES}
    sums: dict = {}
    folds = []
    for held in CATEGORIES:
        split = cross_domain_split([traces[c] for c in CATEGORIES if c != held], [traces[held]])
        folds.append({"eval": held, "fit_tokens": split.fit.num_tokens,
                      "eval_tokens": split.eval.num_tokens,
                      "dropped_repeats": split.fit_duplicates + split.eval_duplicates})
        placements = [ExpertPlacement.contiguous(split.eval.num_experts, ep)] * split.eval.num_layers
        for name in predictors:
            start = time.perf_counter()
            pred = Oracle(split.eval) if name == "oracle" else make_predictor(name, split.fit)
            log(f"fold {held}: predictor {name} ready in {time.perf_counter() - start:.1f} s")
            for m in methods:
                ev = evaluate_trace(split.eval, pred, placements, batch_size=batch, method=m)
                key = (name, m)
                prev = sums.get(key)
                add = {"baseline": ev.baseline.total, "specmoe": ev.specmoe.total,
                       "oracle": ev.oracle.total, "prediction": ev.prediction}
                sums[key] = add if prev is None else {k: prev[k] + add[k] for k in add}
                log(f"fold {held}: {name} + {m}: LAR {ev.specmoe.local_activation_rate:.4f} "
                    f"(baseline {ev.baseline.local_activation_rate:.4f}, oracle "
                    f"{ev.oracle.local_activation_rate:.4f}) {ev.seconds:.1f} s")
    rows = []
    for (name, m), s in sums.items():
        spec: RouteMeasures = s["specmoe"]
        pred: PredictionCounts = s["prediction"]
        rows.append({
            "predictor": name, "method": m,
            "baseline_lar": s["baseline"].local_activation_rate,
            "lar": spec.local_activation_rate,
            "remote_pairs_per_token": spec.remote_pairs_per_token,
            "remote_ranks_per_token": spec.remote_ranks_per_token,
            "load_imbalance": spec.load_imbalance,
            "baseline_remote_pairs_per_token": s["baseline"].remote_pairs_per_token,
            "oracle_lar_same_method": s["oracle"].local_activation_rate,
            **{f"pred_{k}": v for k, v in pred.summary().items()},
        })
    return {"folds": folds, "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--traces", type=Path, default=Path(MIXTRAL_TRACES),
                    help="folder with experts_{coding,math,roleplay,writing}_mixtral.json")
    ap.add_argument("--sizes", default="512,4096,8192", help="token counts T to time")
    ap.add_argument("--ranks", default="4,8", help="rank counts P to time")
    ap.add_argument("--methods", default=",".join(ASSIGNMENT_METHODS), help="methods to run")
    ap.add_argument("--repeats", type=int, default=20, help="timed calls per point (optimal: 1/5)")
    ap.add_argument("--device", default="cpu", help="device of the scores for part 1 (cpu, cuda)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--predictors", default="prev,layer,history,oracle", help="part 2 predictors")
    ap.add_argument("--ep", type=int, default=8, help="EP size for part 2")
    ap.add_argument("--batch", type=int, default=512, help="tokens per shuffle domain for part 2")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="write every number here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in ASSIGNMENT_METHODS]
    if unknown:
        ap.error(f"--methods: unknown {unknown}; choose from {list(ASSIGNMENT_METHODS)}")

    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    print(f"command: {command}")
    print(f"torch {torch.__version__}, {args.threads} CPU thread(s), device {args.device}")
    out: dict = {"command": command}

    if not args.skip_timing:
        rows = time_methods([int(x) for x in args.sizes.split(",")], [int(x) for x in args.ranks.split(",")],
                            methods, args.repeats, torch.device(args.device))
        out["timing"] = rows
        print("\nTime per assign() call (median), aten ops per call, objective / optimal objective")
        print(f"{'T':>6s} {'P':>3s} {'method':>10s} {'ms':>9s} {'aten ops':>9s} {'obj/opt':>8s}")
        for r in rows:
            ops = "-" if r["aten_ops"] is None else str(r["aten_ops"])
            print(f"{r['tokens']:6d} {r['ranks']:3d} {r['method']:>10s} {r['ms']:9.3f} {ops:>9s} "
                  f"{r['objective_vs_optimal']:8.4f}")

    if not args.skip_quality:
        res = quality(args.traces, [p for p in args.predictors.split(",") if p], methods, args.ep, args.batch)
        out["quality"] = res
        print(f"\nMixtral-8x7B MT-Bench, leave one category out, repeats dropped, EP={args.ep}, "
              f"batch {args.batch}, contiguous experts; measures summed over folds")
        for f in res["folds"]:
            print(f"  fold eval={f['eval']}: fit {f['fit_tokens']} tokens, eval {f['eval_tokens']} tokens "
                  f"({f['dropped_repeats']} repeats dropped)")
        print(f"{'predictor':>9s} {'method':>10s} {'LAR':>7s} {'base':>6s} {'rem.pairs':>9s} "
              f"{'rem.ranks':>9s} {'imbal':>6s} {'prec':>6s} {'rank acc':>8s}")
        for r in res["rows"]:
            print(f"{r['predictor']:>9s} {r['method']:>10s} {r['lar']:7.4f} {r['baseline_lar']:6.4f} "
                  f"{r['remote_pairs_per_token']:9.4f} {r['remote_ranks_per_token']:9.4f} "
                  f"{r['load_imbalance']:6.3f} {r['pred_precision']:6.4f} {r['pred_rank_accuracy']:8.4f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
