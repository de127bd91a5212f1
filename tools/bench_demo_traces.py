"""Benchmark the route predictors and expert grouping on the demo model's own routing traces.

Usage:
    python tools/bench_demo_traces.py [--fit FIT.npz] [--eval EVAL.npz] [--ep 4 8] [--json OUT.json]

Data: the traces of the package's trained demo GPT-MoE (4 MoE layers, E = 32 experts, top-4), real
routing with token ids, read with ``trace_io.read_trace``. Defaults are the package-data traces
``megatron_specmoe/data/traces/demo-{calibration,evaluation}.npz`` (98,304-token subsets of the
full traces that ``tools/make_demo_traces.py`` writes). Calibration and evaluation come from
different source files of the corpus (their ``.files.json`` lists them), so every number below is
held out: predictors and placements are fitted on ``--fit`` and measured on ``--eval``.

Notation
    T: evaluation tokens.   L: MoE layers.   k: top-k.   E: experts.   P: EP ranks.
    B: tokens per shuffle domain (``--batch``, 512), cut from the trace in order.

Table A - predictors (``predict.registry.fit_predictor``), contiguous expert placement, scored by
``evaluate.evaluate_trace`` (assignment "refine"):
    precision / recall / F1   predicted top-k set vs true set, per (token, layer).
    rank acc @P               the predicted home rank hosts at least one true expert.
    LAR @P                    local activation rate: baseline (contiguous token shards), specmoe
                              (tokens placed by the predictor's rank scores, balanced), oracle (placed
                              by the true routes, balanced: the ceiling at that placement).
    fit s / memory            wall time of ``fit`` on one core; ``predictor.memory_bytes()``.
Table B - expert grouping (``grouping.group_experts``, placements fitted on --fit, homes unknown),
measured on --eval with the same ``evaluate_trace`` and a token-table predictor fitted on --fit:
    all k on 1 rank           share of (token, layer) whose k experts sit on one rank (placement
                              alone, whatever the token's home).
    mean max/rank             mean over (token, layer) of the most of a token's k experts on one rank.
    LAR contiguous            placement alone, tokens in contiguous shards (``placement_only`` side).
    LAR token-table shuffle   tokens placed by the token table's rank scores (``specmoe`` side).
    LAR oracle shuffle        tokens placed by the true routes (``oracle`` side).
    imbalance                 max / mean pairs per rank over all evaluation tokens, per layer, mean
                              over layers (expert compute load; it does not depend on the homes).

The pre-attention gate ("pregate") needs the model's weights, not only traces; it is measured by
``specmoe demo --predictor pregate``. BLAS / OpenMP / torch use one thread, so times mean one core.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one core, before numpy/torch load

import argparse  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DATA = REPO / "megatron_specmoe" / "data" / "traces"
GROUPING_DEFAULT = ("contiguous", "eplb", "alternating", "search")


@dataclass(frozen=True, kw_only=True)
class PredictorSpec:
    """One row of table A: a label, the registry kind and its constructor options."""

    label: str
    kind: str
    options: dict


PREDICTOR_SPECS = (
    PredictorSpec(label="token", kind="token", options={}),
    PredictorSpec(label="layer", kind="layer", options={}),
    PredictorSpec(label="history", kind="history", options={}),
    PredictorSpec(label="combined (token+layer)", kind="combined", options={"members": ("token", "layer")}),
    PredictorSpec(label="combined (token+history)", kind="combined", options={"members": ("token", "history")}),
)


def _log(msg: str) -> None:
    print(f"[bench_demo_traces] {msg}", file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fit", type=Path, default=DATA / "demo-calibration.npz",
                    help="trace to fit predictors and placements on (specmoe-npz with token ids)")
    ap.add_argument("--eval", type=Path, default=DATA / "demo-evaluation.npz",
                    help="held-out trace to measure on (same model)")
    ap.add_argument("--ep", type=int, nargs="+", default=[4, 8], help="EP sizes (must divide E)")
    ap.add_argument("--batch", type=int, default=512, help="B, tokens per shuffle domain")
    ap.add_argument("--assignment", default="refine", help="balanced assignment method (evaluate_trace)")
    ap.add_argument("--methods", nargs="+", default=list(GROUPING_DEFAULT),
                    help="grouping methods for table B (grouping.GroupingMethod)")
    ap.add_argument("--theta", type=float, default=0.1, help="GroupingOptions.theta")
    ap.add_argument("--seed", type=int, default=0, help="GroupingOptions.seed")
    ap.add_argument("--parts", default="AB", help="which tables: A, B or AB")
    ap.add_argument("--json", type=Path, default=None, help="write every number (and per layer) here")
    return ap.parse_args(argv)


def _check_options(args) -> None:
    """Fail before any work on a bad --parts, --assignment or --methods."""
    from typing import get_args

    from megatron_specmoe.schedule.assignment import AssignmentMethod
    from megatron_specmoe.schedule.grouping import GroupingOptions

    if not args.parts or set(args.parts) - set("AB"):
        raise ValueError(f"--parts {args.parts!r}: use A, B or AB")
    if args.assignment not in get_args(AssignmentMethod):
        raise ValueError(f"--assignment {args.assignment!r} is unknown; choose one of "
                         f"{list(get_args(AssignmentMethod))}")
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    for method in args.methods:
        GroupingOptions(method=method, theta=args.theta, seed=args.seed)  # raises naming the method


def _load(args):
    from megatron_specmoe.artifacts.trace_io import read_trace

    fit, ev = read_trace(args.fit), read_trace(args.eval)
    for name, tr in (("--fit", fit), ("--eval", ev)):
        if tr.token_ids is None:
            raise ValueError(f"{name} {tr.source}: the trace has no token_ids; the token table needs "
                             "them (export the trace with token ids, e.g. tools/make_demo_traces.py)")
    fit_shape = (fit.num_layers, fit.num_experts, fit.topk)
    ev_shape = (ev.num_layers, ev.num_experts, ev.topk)
    if fit_shape != ev_shape:
        raise ValueError(f"--fit {fit.source} has (L, E, k)={fit_shape} but --eval {ev.source} has "
                         f"{ev_shape}; give two traces of the same model")
    for p in args.ep:
        if p < 1 or fit.num_experts % p:
            raise ValueError(f"--ep {p} does not divide E={fit.num_experts}; choose divisors of E")
    return fit, ev


def _fit(spec: PredictorSpec, trace):
    from megatron_specmoe.predict.registry import fit_predictor

    start = time.perf_counter()
    pred = fit_predictor(spec.kind, trace, **spec.options)
    return pred, time.perf_counter() - start


def table_a(args, fit, ev, fitted: dict) -> list[dict]:
    """One row per predictor: prediction metrics, LAR per EP size, fit time and memory."""
    from megatron_specmoe.measure.evaluate import evaluate_trace
    from megatron_specmoe.schedule.placement import ExpertPlacement

    rows = []
    for spec in PREDICTOR_SPECS:
        _log(f"A: fitting {spec.label} on {fit.num_tokens} tokens ...")
        pred, secs = _fit(spec, fit)
        fitted[spec.label] = pred
        row: dict[str, Any] = {"predictor": spec.label, "kind": spec.kind,
                               "options": {k: list(v) if isinstance(v, tuple) else v
                                           for k, v in spec.options.items()},
                               "fit_s": secs, "memory_bytes": int(pred.memory_bytes()), "ep": {}}
        for p in args.ep:
            placements = [ExpertPlacement.contiguous(ev.num_experts, p)] * ev.num_layers
            e = evaluate_trace(ev, pred, placements, batch_size=args.batch, method=args.assignment)
            row["ep"][p] = {
                "rank_accuracy": e.prediction.rank_accuracy,
                "lar_baseline": e.baseline.local_activation_rate,
                "lar_specmoe": e.specmoe.local_activation_rate,
                "lar_oracle": e.oracle.local_activation_rate,
                "evaluation": e.to_json(),
            }
            # precision / recall / F1 do not depend on the placement (same for every EP size).
            row.update(precision=e.prediction.precision, recall=e.prediction.recall, f1=e.prediction.f1)
            _log(f"A: {spec.label} EP={p}: F1 {e.prediction.f1:.3f}, LAR baseline "
                 f"{e.baseline.local_activation_rate:.3f} specmoe {e.specmoe.local_activation_rate:.3f} "
                 f"oracle {e.oracle.local_activation_rate:.3f} ({e.seconds:.1f} s)")
        rows.append(row)
    return rows


def _co_location(ev, placements) -> tuple[float, float]:
    """(share of (token, layer) with all k experts on one rank, mean max experts on one rank)."""
    import torch

    from megatron_specmoe.measure.measures import rank_hits

    k, full, total, count = ev.topk, 0, 0, 0
    for layer, pl in enumerate(placements):
        rank_of = torch.from_numpy(pl.rank_of_logical())
        ex = torch.from_numpy(ev.experts[:, layer].astype("int64"))
        most = rank_hits(rank_of[ex], pl.ep_size).max(dim=1).values  # int64 [T]
        full += int((most == k).sum())
        total += int(most.sum())
        count += most.numel()
    return full / count, total / count


def table_b(args, fit, ev, token_table) -> list[dict]:
    """One row per (grouping method, EP size), measured on the evaluation trace."""
    from megatron_specmoe.measure.evaluate import evaluate_trace
    from megatron_specmoe.schedule.grouping import GroupingOptions, group_experts

    rows = []
    for p in args.ep:
        for method in args.methods:
            options = GroupingOptions(method=method, theta=args.theta, seed=args.seed)
            start = time.perf_counter()
            placements = group_experts(fit, ep_size=p, options=options)
            group_s = time.perf_counter() - start
            e = evaluate_trace(ev, token_table, placements, batch_size=args.batch, method=args.assignment)
            all_one, mean_max = _co_location(ev, placements)
            imbalance = [m.load_imbalance for m in e.placement_only.per_layer]
            row = {
                "method": method, "ep": p, "group_s": group_s,
                "all_k_on_one_rank": all_one, "mean_max_experts_on_one_rank": mean_max,
                "lar_contiguous": e.placement_only.local_activation_rate,
                "lar_token_shuffle": e.specmoe.local_activation_rate,
                "lar_oracle_shuffle": e.oracle.local_activation_rate,
                "load_imbalance": sum(imbalance) / len(imbalance),
                "load_imbalance_per_layer": imbalance,
                "placements": [pl.to_json()["physical_to_logical"] for pl in placements],
                "evaluation": e.to_json(),
            }
            rows.append(row)
            _log(f"B: {method} EP={p}: grouped in {group_s:.1f} s; LAR contiguous "
                 f"{row['lar_contiguous']:.3f} token {row['lar_token_shuffle']:.3f} oracle "
                 f"{row['lar_oracle_shuffle']:.3f}, imbalance {row['load_imbalance']:.3f}")
    return rows


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def format_a(rows: list[dict], eps: list[int]) -> str:
    head = ["predictor", "precision", "recall", "F1"]
    for p in eps:
        head += [f"rank acc @{p}", f"LAR specmoe / baseline / oracle @{p}"]
    head += ["fit s", "memory"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["predictor"], f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['f1']:.3f}"]
        for p in eps:
            m = r["ep"][p]
            cells += [f"{m['rank_accuracy']:.3f}",
                      f"{m['lar_specmoe']:.3f} / {m['lar_baseline']:.3f} / {m['lar_oracle']:.3f}"]
        cells += [f"{r['fit_s']:.2f}", _mib(r["memory_bytes"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_b(rows: list[dict], k: int) -> str:
    head = ["EP", "grouping", f"all {k} on 1 rank", "mean max/rank", "LAR contiguous",
            "LAR token-table shuffle", "LAR oracle shuffle", "imbalance", "group s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["ep"]), r["method"], f"{r['all_k_on_one_rank']:.3f}",
                 f"{r['mean_max_experts_on_one_rank']:.2f}", f"{r['lar_contiguous']:.3f}",
                 f"{r['lar_token_shuffle']:.3f}", f"{r['lar_oracle_shuffle']:.3f}",
                 f"{r['load_imbalance']:.3f}", f"{r['group_s']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(1)
    _check_options(args)
    command = shlex.join(["python", "tools/bench_demo_traces.py",
                          *(argv if argv is not None else sys.argv[1:])])
    start = time.perf_counter()
    fit, ev = _load(args)
    _log(f"fit {fit.source}: {fit.num_tokens} tokens; eval {ev.source}: {ev.num_tokens} tokens; "
         f"L={ev.num_layers}, E={ev.num_experts}, k={ev.topk}")
    setup = (f"fit {fit.num_tokens} tokens ({args.fit.name}), evaluate {ev.num_tokens} tokens "
             f"({args.eval.name}); L={ev.num_layers} MoE layers, E={ev.num_experts}, top-{ev.topk}; "
             f"B={args.batch}, assignment {args.assignment}")
    report: dict[str, Any] = {"command": command, "setup": setup, "fit": str(args.fit),
                              "eval": str(args.eval), "ep": args.ep, "batch": args.batch,
                              "assignment": args.assignment}
    fitted: dict = {}
    if "A" in args.parts:
        rows = table_a(args, fit, ev, fitted)
        report["A"] = rows
        print(f"\nA. Predictors, contiguous expert placement ({setup})\n\n    {command}\n")
        print(format_a(rows, args.ep))
    if "B" in args.parts:
        token_table = fitted.get("token")
        if token_table is None:
            _log("B: fitting the token table ...")
            token_table, _ = _fit(PREDICTOR_SPECS[0], fit)
        rows = table_b(args, fit, ev, token_table)
        report["B"] = rows
        print(f"\nB. Expert grouping, placements fitted on {args.fit.name} (theta={args.theta}), "
              f"measured on {args.eval.name} ({setup})\n\n    {command}\n")
        print(format_b(rows, ev.topk))
    report["seconds"] = time.perf_counter() - start
    print(f"\n(total {report['seconds']:.1f} s on one core)")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1))
        _log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
