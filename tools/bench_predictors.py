"""Benchmark the route predictors cross-domain on real routing traces.

Usage:
    python tools/bench_predictors.py [TRACE_DIR_OR_FILES ...] [--num-experts E] [--hidden H] ...

Default data: /work/shared/traces/mixtral-mtbench (Mixtral-8x7B, 32 MoE layers, E = 8, top-2,
one MT-Bench category per file). Each file is one workload. For every file in turn the
predictors are fitted on the other files and scored on it (leave-one-workload-out); the table
shows the mean over folds. By default (--dedup full) exact repeated routes are dropped within
each side, and evaluation tokens whose route also occurs on the fitting side are dropped too (the
README of the traces: otherwise the score measures memory, not prediction).

Measures (per token and layer, pooled over the layers of a fold, then averaged over folds)
    top1         the predictor's first expert is one of the true experts (layers >= 1; at layer 0
                 every predictor here scores the same frequency prior, shown as top1(all) with it).
    P / R / F1   predicted top-k set vs true top-k set (|predicted| = |true| = k, so P = R = F1
                 unless the router repeated an expert).
    rank@EP      with contiguous placement over EP ranks, the predicted home rank (highest summed
                 score) hosts at least one true expert; EP = 4 and 8 (EP = E: equals top1).
    fit s        wall time to fit on one fold's fitting side (combined: its members' sum).
    layer[n=2]   the paper's 2-layer table (n fixed, min_count and alpha still chosen), shown
                 when the choice on fitting data picked another n.
    ms/4096      time of one ``expert_scores`` call for 4096 tokens at the last layer (longest
                 history); best of ``--repeats`` calls, with the median in the JSON output.

BLAS / OpenMP use one thread (set below, before numpy loads) so that timings mean "one core".
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from bench_data import MIXTRAL_TRACES  # noqa: E402 - tools/ is on sys.path when run

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_specmoe.schedule.placement import ExpertPlacement  # noqa: E402
from megatron_specmoe.predict.base import RouteContext, predicted_ranks, top_experts  # noqa: E402
from megatron_specmoe.predict.combined import Combined  # noqa: E402
from megatron_specmoe.predict.registry import make  # noqa: E402
from megatron_specmoe.predict.token_table import TokenTable  # noqa: E402
from megatron_specmoe.artifacts.trace_io import leave_one_out_splits, read_traces  # noqa: E402
from megatron_specmoe.artifacts.traces import RoutingTrace  # noqa: E402

DEFAULT_DIR = MIXTRAL_TRACES


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("traces", nargs="*", default=[DEFAULT_DIR],
                    help=f"trace files, or folders of *.json traces (default {DEFAULT_DIR})")
    ap.add_argument("--num-experts", type=int, default=8, help="E (default 8: Mixtral-8x7B; JSON traces do not record it)")
    ap.add_argument("--hidden", type=int, default=128, help="history MLP hidden units")
    ap.add_argument("--epochs", type=int, default=12, help="history MLP most epochs per layer")
    ap.add_argument("--layer-n", type=int, default=None,
                    help="fix the layer table's context length (default: chosen on fitting data)")
    ap.add_argument("--folds", type=int, default=None, help="only the first N leave-one-out folds")
    ap.add_argument("--dedup", choices=("full", "within", "none"), default="full",
                    help="full (default): drop repeated routes within each side and eval routes seen in "
                         "fitting; within: only within each side; none: keep all (inflates every score; "
                         "only to compare with numbers measured that way)")
    ap.add_argument("--batch", type=int, default=4096, help="tokens per timed expert_scores call")
    ap.add_argument("--repeats", type=int, default=30, help="timed calls per predictor")
    ap.add_argument("--json", default=None, metavar="FILE", help="also write all numbers as JSON")
    return ap.parse_args(argv)


def trace_files(paths: list[str]) -> list[str]:
    out: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(glob.glob(os.path.join(p, "*.json")))
            if not found:
                raise ValueError(f"{p}: no *.json trace files in this folder")
            out.extend(found)
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise ValueError(f"{p}: no such file or folder; pass trace files or a folder of them")
    if len(out) < 2:
        raise ValueError(f"need at least 2 trace files (workloads) for cross-domain folds, got {out}")
    return out


def workload_name(path: str) -> str:
    stem = Path(path).stem
    return stem.removeprefix("experts_").removesuffix("_mixtral")


# ---- measures -----------------------------------------------------------------------------------
class Tally:
    """Pooled counts over token-layers of one predictor and fold."""

    def __init__(self, ep_sizes: tuple[int, ...]):
        self.ep_sizes = ep_sizes
        self.tokens = self.top1 = self.tokens0 = self.top1_0 = 0
        self.predicted = self.true = self.overlap = 0
        self.rank_hits = {p: 0 for p in ep_sizes}

    def add(self, scores: np.ndarray, truth: np.ndarray, layer: int, placements: dict) -> None:
        """scores float32 [T, E]; truth int [T, k]."""
        t, k = truth.shape
        first = scores.argmax(axis=1)
        hit1 = int((truth == first[:, None]).any(axis=1).sum())
        if layer == 0:
            self.tokens0 += t
            self.top1_0 += hit1
        else:
            self.tokens += t
            self.top1 += hit1
        pred = top_experts(scores, k)
        e = scores.shape[1]
        pm = np.zeros((t, e), dtype=bool)
        tm = np.zeros((t, e), dtype=bool)
        np.put_along_axis(pm, pred, True, axis=1)
        np.put_along_axis(tm, truth.astype(np.int64), True, axis=1)
        self.predicted += int(pm.sum())
        self.true += int(tm.sum())
        self.overlap += int((pm & tm).sum())
        for p, pl in placements.items():
            home = predicted_ranks(scores, pl)
            true_ranks = pl.rank_of_logical()[truth.astype(np.int64)]
            self.rank_hits[p] += int((true_ranks == home[:, None]).any(axis=1).sum())

    def summary(self) -> dict:
        all_tokens = self.tokens + self.tokens0
        prec = self.overlap / self.predicted
        rec = self.overlap / self.true
        out = {
            "top1": self.top1 / self.tokens if self.tokens else float("nan"),
            "top1_all": (self.top1 + self.top1_0) / all_tokens,
            "precision": prec,
            "recall": rec,
            "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0,
        }
        for p in self.ep_sizes:
            out[f"rank@{p}"] = self.rank_hits[p] / all_tokens
        return out


def evaluate(predictor, trace: RoutingTrace, placements: dict) -> dict:
    tally = Tally(tuple(placements))
    for layer in range(trace.num_layers):
        ctx = RouteContext(layer=layer, token_ids=trace.token_ids, history=trace.experts[:, :layer])
        tally.add(predictor.expert_scores(ctx), trace.experts[:, layer], layer, placements)
    return tally.summary()


def time_scores(predictor, trace: RoutingTrace, batch: int, repeats: int) -> tuple[float, float]:
    """(best, median) milliseconds of one expert_scores call for ``batch`` tokens, last layer."""
    reps = -(-batch // trace.num_tokens)
    idx = np.tile(np.arange(trace.num_tokens), reps)[:batch]
    layer = trace.num_layers - 1
    ctx = RouteContext(
        layer=layer,
        token_ids=None if trace.token_ids is None else trace.token_ids[idx],
        history=np.ascontiguousarray(trace.experts[idx, :layer]),
    )
    predictor.expert_scores(ctx)  # warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        predictor.expert_scores(ctx)
        times.append(time.perf_counter() - start)
    return 1e3 * min(times), 1e3 * float(np.median(times))


def synthetic_token_timing(num_layers: int, num_experts: int, topk: int, batch: int, repeats: int) -> dict:
    """The token table cannot be fitted on traces without token ids; time its lookup on a synthetic
    trace (Zipf-like ids over a 32k vocabulary, random routes) of the same shape instead."""
    rng = np.random.default_rng(0)
    tokens, vocab = 60_000, 32_000
    ids = np.minimum(rng.zipf(1.2, size=tokens) - 1, vocab - 1)
    ex = np.argsort(rng.random((tokens, num_layers, num_experts), dtype=np.float32), axis=2)[:, :, :topk]
    trace = RoutingTrace(experts=ex.astype(np.int32), num_experts=num_experts, token_ids=ids)
    start = time.perf_counter()
    table = TokenTable(vocab_size=vocab).fit(trace)
    fit_s = time.perf_counter() - start
    best, median = time_scores(table, trace, batch, repeats)
    return {"fit_s": fit_s, "ms_best": best, "ms_median": median, "memory_bytes": table.memory_bytes(),
            "seen_ids": int(table.to_state()["arrays"]["ids"].size)}


# ---- main -----------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python tools/bench_predictors.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    files = trace_files(args.traces)
    print(f"command: {command}", file=sys.stderr)
    traces = [read_traces(f, num_experts=args.num_experts) for f in files]
    names = [workload_name(f) for f in files]
    e = max(t.num_experts for t in traces)
    traces = [t if t.num_experts == e else RoutingTrace(experts=t.experts, num_experts=e, source=t.source)
              for t in traces]
    k, layers = traces[0].topk, traces[0].num_layers
    splits = leave_one_out_splits(traces, dedup=args.dedup != "none", drop_seen_in_fit=args.dedup == "full")
    if args.folds is not None:
        splits, names = splits[: args.folds], names[: args.folds]
    placements = {p: ExpertPlacement.contiguous(e, p) for p in (4, 8) if e % p == 0}
    has_ids = all(t.token_ids is not None for t in traces)

    rows: dict[str, list[dict]] = {}
    folds_info = []
    started = time.perf_counter()
    for name, split in zip(names, splits):
        print(f"[bench] fold: evaluate on {name} ({split.eval.num_tokens} tokens, "
              f"{split.eval_duplicates} repeats + {split.eval_seen_in_fit} seen-in-fit dropped), fit on "
              f"{split.fit.num_tokens} tokens ({split.fit_duplicates} repeats dropped)", file=sys.stderr)
        fitted, fit_s = {}, {}
        kinds = (["token"] if has_ids else []) + ["layer", "history"]
        options = {
            "token": {},
            "layer": {} if args.layer_n is None else {"n": args.layer_n},
            "history": {"hidden": args.hidden, "epochs": args.epochs},
        }
        for kind in kinds:
            t0 = time.perf_counter()
            fitted[kind] = make(kind, **options[kind]).fit(split.fit)
            fit_s[kind] = time.perf_counter() - t0
        if fitted["layer"].chosen["n"] != 2:  # also the paper's 2-layer table
            t0 = time.perf_counter()
            fitted["layer[n=2]"] = make("layer", n=2).fit(split.fit)
            fit_s["layer[n=2]"] = time.perf_counter() - t0
        members = [fitted[x] for x in (["token"] if has_ids else []) + ["layer", "history"]]
        for rule in ("max_confidence", "mixture"):
            fitted[f"combined[{rule}]"] = Combined.of(members, rule=rule)
            fit_s[f"combined[{rule}]"] = sum(fit_s[m.kind] for m in members)
        if has_ids:  # the paper's pair: token table + 2-layer table
            for rule in ("max_confidence", "mixture"):
                fitted[f"token+layer[{rule}]"] = Combined.of([fitted["token"], fitted["layer"]], rule=rule)
                fit_s[f"token+layer[{rule}]"] = fit_s["token"] + fit_s["layer"]
        folds_info.append({"eval": name, "eval_tokens": split.eval.num_tokens,
                           "fit_tokens": split.fit.num_tokens, "layer_chosen": fitted["layer"].chosen})
        for label, predictor in fitted.items():
            res = evaluate(predictor, split.eval, placements)
            best, median = time_scores(predictor, split.eval, args.batch, args.repeats)
            res.update({"fit_s": fit_s[label], "ms_best": best, "ms_median": median,
                        "memory_bytes": predictor.memory_bytes(), "fold": name})
            rows.setdefault(label, []).append(res)
            print(f"[bench]   {label:26s} top1 {res['top1']:.4f}  ({time.perf_counter() - started:.0f}s)",
                  file=sys.stderr)

    token_timing = None if has_ids else synthetic_token_timing(layers, e, k, args.batch, args.repeats)

    # ---- report -----------------------------------------------------------------------------
    cols = ["top1", "top1_all", "precision", "recall", "f1"] + [f"rank@{p}" for p in placements]
    header = (f"{'predictor':26s} " + " ".join(f"{c:>9s}" for c in cols)
              + f" {'fit s':>7s} {'ms/' + str(args.batch):>8s} {'memory':>10s}")
    print(f"\nRoute predictors, leave-one-workload-out over {', '.join(names)} "
          f"(E={e}, top-{k}, {layers} layers; mean over {len(names)} folds; "
          f"dedup={args.dedup})")
    print(header)
    print("-" * len(header))
    summary = {}
    for label, res in rows.items():
        keys = cols + ["fit_s", "ms_best", "ms_median", "memory_bytes"]
        mean = {c: float(np.mean([r[c] for r in res])) for c in keys}
        summary[label] = mean
        print(f"{label:26s} " + " ".join(f"{mean[c]:9.4f}" for c in cols)
              + f" {mean['fit_s']:7.1f} {mean['ms_best']:8.2f} {mean['memory_bytes'] / 1e6:8.2f}MB")
    print("\nper-fold top1 (layers >= 1):")
    print(f"{'predictor':26s} " + " ".join(f"{n:>10s}" for n in names))
    for label, res in rows.items():
        print(f"{label:26s} " + " ".join(f"{r['top1']:10.4f}" for r in res))
    print("\nlayer table hyper-parameters chosen on fitting data: "
          + "; ".join(f"{f['eval']}: {f['layer_chosen']}" for f in folds_info))
    if token_timing is not None:
        print(f"token table: these traces have no token ids, so it is not scored; on a synthetic trace "
              f"of the same shape ({token_timing['seen_ids']} distinct ids) it fits in "
              f"{token_timing['fit_s']:.1f}s, holds {token_timing['memory_bytes'] / 1e6:.1f}MB and scores "
              f"{args.batch} tokens in {token_timing['ms_best']:.3f} ms "
              f"(median {token_timing['ms_median']:.3f})")
    print(f"\ntotal {time.perf_counter() - started:.0f}s; timings best of {args.repeats} calls, one thread")
    print(f"command: {command}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": command, "folds": folds_info, "summary": summary, "per_fold": rows,
                       "token_synthetic_timing": token_timing}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
