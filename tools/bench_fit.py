"""Fit time of the route predictors against tokens, the accuracy cost of the history MLP's and
the layer table's caps, and the issue-15 budget case (1M tokens x 60 layers x 256 experts).

Usage:
    python tools/bench_fit.py --part scaling     # CPU s vs tokens, plot docs/figures/fit_time.png
    python tools/bench_fit.py --part accuracy    # history MLP: held-out top-1 with and without caps
    python tools/bench_fit.py --part layer       # layer table: the same, capped vs uncapped search
    nice -n 10 python tools/bench_fit.py --part big   # the budget case, once
                                                      # (--big-layers N: time N layers, extrapolate)

Data. ``scaling`` and ``big`` use synthetic routes (``artifacts/synthetic.py``: E = 256, top-8,
planted topics; no real trace of a 256-expert model is available here). ``accuracy`` uses the real
Mixtral-8x7B MT-Bench traces (one leave-one-workload-out fold per file, repeated routes dropped,
``trace_io.leave_one_out_splits``) and a synthetic trace with a held-out tail.

Timing. The machine is shared, so times are CPU seconds of this process (``time.process_time``)
with BLAS / OpenMP / torch on one thread: what one core spends, not wall time under contention.
Wall time is printed beside. Extrapolation is used nowhere except where a line says "extrapolated".
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from bench_data import mixtral_folds  # noqa: E402 - tools/ is on sys.path when run

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_specmoe.artifacts.synthetic import SyntheticSpec, synthetic_trace  # noqa: E402
from megatron_specmoe.artifacts.traces import RoutingTrace  # noqa: E402
from megatron_specmoe.predict.base import RouteContext, top_experts  # noqa: E402
from megatron_specmoe.predict.registry import make  # noqa: E402

LAYER_NO_CAPS = {"max_search_tokens": None, "max_val_tokens": None, "max_fit_tokens": None}
FIGURE = Path(__file__).resolve().parents[1] / "docs" / "figures" / "fit_time.png"


def timed(fn):
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - c0, time.perf_counter() - w0


def top1(predictor, trace: RoutingTrace) -> float:
    """Share of (token, layer >= 1) whose top predicted expert is one of the true ones."""
    hits = total = 0
    for layer in range(1, trace.num_layers):
        ctx = RouteContext(layer=layer, token_ids=trace.token_ids, history=trace.experts[:, :layer])
        first = top_experts(predictor.expert_scores(ctx), 1)[:, 0]
        hits += int((trace.experts[:, layer] == first[:, None]).any(axis=1).sum())
        total += trace.num_tokens
    return hits / total


def part_scaling(args) -> None:
    sizes = [int(x) for x in args.tokens.split(",")]
    L, E, k = args.layers, 256, 8
    print(f"## Fit CPU time vs tokens: synthetic, L={L}, E={E}, top-{k}, one thread")
    print()
    print("| predictor | " + " | ".join(f"T={t}" for t in sizes) + " |")
    print("| --- | " + " | ".join("---" for _ in sizes) + " |")
    configs = {
        "history (caps: default)": ("history", {}),
        "history (no caps)": ("history", {"max_fit_tokens": None, "max_val_tokens": None}),
        "layer table (caps: default)": ("layer", {}),
        "layer table (no caps)": ("layer", LAYER_NO_CAPS),
        "token table": ("token", {}),
    }
    results: dict[str, list[float]] = {}
    failures: list[str] = []
    for name, (kind, opts) in configs.items():
        row = []
        for tokens in sizes:
            if name.endswith("(no caps)") and tokens > args.no_cap_max:
                row.append(float("nan"))
                continue
            trace = synthetic_trace(SyntheticSpec(tokens=tokens, layers=L, num_experts=E, topk=k, seed=1))
            predictor = make(kind, **opts)
            try:
                _, cpu, wall = timed(lambda: predictor.fit(trace))
            except ValueError as exc:  # e.g. the layer table's hash-collision guard
                print(f"[bench_fit] {name} T={tokens}: refused: {exc}", file=sys.stderr, flush=True)
                failures.append(f"{name} at T={tokens}: {exc}")
                row.append(float("nan"))
                continue
            row.append(cpu)
            print(f"[bench_fit] {name} T={tokens}: {cpu:.1f} CPU s ({wall:.1f} s wall)", file=sys.stderr, flush=True)
        results[name] = row
        print(f"| {name} | " + " | ".join("-" if np.isnan(v) else f"{v:.1f}" for v in row) + " |")
    print()
    print(f"CPU seconds for {L} layers. 'no caps': history = the fit before issue 15 (every token, every "
          "epoch); layer table = today's search and tables with the caps off (every token); "
          f"skipped above T={args.no_cap_max}. '-': skipped or refused:")
    for line in failures:
        print(f"- refused: {line}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, row in results.items():
        xs = [t for t, v in zip(sizes, row) if not np.isnan(v)]
        ax.plot(xs, [v for v in row if not np.isnan(v)], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("fitting tokens")
    ax.set_ylabel(f"fit CPU seconds ({L} layers, one core)")
    ax.set_title(f"Predictor fit time, synthetic E={E} top-{k}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURE, dpi=120)
    print(f"plot: {FIGURE.relative_to(FIGURE.parents[2])}")


def part_accuracy(args) -> None:
    caps = [None] + [int(x) for x in args.caps.split(",")]
    print("## History MLP: held-out top-1 by fitting-token cap (layers >= 1)")
    print()
    print("| data | fitting tokens | " + " | ".join("all" if c is None else f"cap {c}" for c in caps) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in caps) + " |")
    for path, split in mixtral_folds():
        fit, held = split.fit, split.eval
        row = []
        for cap in caps:
            if cap is not None and cap >= fit.num_tokens:
                row.append("= all (cap above the fitting tokens)")
                continue
            model = make("history", max_fit_tokens=cap, max_val_tokens=None if cap is None else max(1024, cap // 4))
            _, cpu, _ = timed(lambda: model.fit(fit))
            row.append(f"{top1(model, held):.4f} ({cpu:.0f} s)")
        print(f"| Mixtral, held out {Path(path).stem} | {fit.num_tokens} | " + " | ".join(row) + " |", flush=True)
    T = args.synthetic_tokens
    trace = synthetic_trace(SyntheticSpec(tokens=T, layers=args.layers, num_experts=256, topk=8, seed=2))
    cut = T - T // 8
    fit, held = trace.select(np.arange(cut)), trace.select(np.arange(cut, T))
    row = []
    for cap in caps:
        model = make("history", max_fit_tokens=cap, max_val_tokens=None if cap is None else max(1024, cap // 4))
        _, cpu, _ = timed(lambda: model.fit(fit))
        row.append(f"{top1(model, held):.4f} ({cpu:.0f} s)")
    print(f"| synthetic E=256 top-8, L={args.layers} | {fit.num_tokens} | " + " | ".join(row) + " |")
    print()
    print("Cells: held-out top-1, and fit CPU seconds in brackets.")


def _layer_cell(opts: dict, fit: RoutingTrace, held: RoutingTrace) -> tuple[str, float]:
    model = make("layer", **opts)
    _, cpu, _ = timed(lambda: model.fit(fit))
    acc = top1(model, held)
    ch = model.chosen
    return f"{acc:.4f} ({cpu:.1f} s; n={ch['n']} mc={ch['min_count']} a={ch['alpha']})", acc


def part_layer(args) -> None:
    """Held-out top-1 of the layer table with the default caps, smaller caps and none, same run."""
    small = {"max_search_tokens": args.layer_small_cap, "max_val_tokens": max(1024, args.layer_small_cap // 4),
             "max_fit_tokens": args.layer_small_cap}
    search_only = dict(small, max_fit_tokens=None)
    configs = {"no caps": LAYER_NO_CAPS, "default caps": {}, f"caps {args.layer_small_cap}": small,
               f"search caps {args.layer_small_cap} only": search_only}
    print("## Layer table: held-out top-1 by caps (layers >= 1)")
    print()
    print("| data | fitting tokens | " + " | ".join(configs) + " | default / none |")
    print("| --- | --- | " + " | ".join("---" for _ in configs) + " | --- |")
    data = []
    for path, split in mixtral_folds():
        data.append((f"Mixtral, held out {Path(path).stem}", split.fit, split.eval))
    for tokens in [int(x) for x in args.layer_tokens.split(",") if x.strip()]:
        trace = synthetic_trace(SyntheticSpec(tokens=tokens, layers=args.layers, num_experts=256, topk=8, seed=2))
        cut = tokens - tokens // 8
        data.append((f"synthetic E=256 top-8, L={args.layers}", trace.select(np.arange(cut)),
                     trace.select(np.arange(cut, tokens))))
    for label, fit, held in data:
        cells, accs = [], {}
        for name, opts in configs.items():
            cell, acc = _layer_cell(opts, fit, held)
            cells.append(cell)
            accs[name] = acc
            print(f"[bench_fit] layer {label} {name}: {cell}", file=sys.stderr, flush=True)
        ratio = accs["default caps"] / accs["no caps"] if accs["no caps"] else float("nan")
        print(f"| {label} | {fit.num_tokens} | " + " | ".join(cells) + f" | {ratio:.4f}x |", flush=True)
    print()
    print("Cells: held-out top-1 (the last 1/8 of a synthetic trace; the held-out workload of a Mixtral fold), "
          "fit CPU seconds and the chosen n / min_count / alpha. The caps bind only above their sizes "
          "(default: search 65536 + 16384 held-out tokens, final tables 131072); 'caps N' caps the search "
          "at N fitting + N/4 held-out tokens and the final tables at N, 'search caps N only' the search alone.")


def part_big(args) -> None:
    T, L, E, k = args.big_tokens, 60, 256, 8
    trace, cpu, wall = timed(lambda: synthetic_trace(SyntheticSpec(tokens=T, layers=L, num_experts=E, topk=k, seed=3)))
    print(f"## Budget case: synthetic T={T}, L={L}, E={E}, top-{k} (generated in {wall:.0f} s)")
    print()
    if not args.skip_history:
        model = make("history")
        estimate, cpu_e, _ = timed(lambda: model.estimate_fit_seconds(trace))
        print(f"history estimate before fitting: at most {estimate:.0f} s (probe took {cpu_e:.1f} CPU s)")
        _, cpu, wall = timed(lambda: model.fit(trace))
        epochs = [r["epoch"] for r in model.fit_log]
        print(f"history fit: {cpu:.0f} CPU s, {wall:.0f} s wall; best epochs min/median/max "
              f"{min(epochs)}/{int(np.median(epochs))}/{max(epochs)}; held-out top-1 (fit log, mean) "
              f"{np.mean([r['val_top1'] for r in model.fit_log]):.4f}")
    layers = L if args.big_layers is None else args.big_layers
    part = trace if layers == L else RoutingTrace(experts=trace.experts[:, :layers], num_experts=E,
                                                    token_ids=trace.token_ids, request_ids=trace.request_ids,
                                                    source=f"{trace.source} (first {layers} layers)")
    scale = (L - 1) / (layers - 1)
    for kind in args.big_tables.split(",") if args.big_tables else []:
        table = make(kind)
        est = None
        if hasattr(table, "estimate_fit_seconds"):
            est, cpu_e, _ = timed(lambda: table.estimate_fit_seconds(part))
        _, cpu, wall = timed(lambda: table.fit(part))
        line = f"{kind} table fit on {layers} of {L} layers: {cpu:.0f} CPU s, {wall:.0f} s wall"
        if est is not None:
            line += f" (estimate before fitting {est:.0f} s wall, probe {cpu_e:.1f} CPU s)"
        if layers != L:
            line += (f"; extrapolated to {L} layers (x{scale:.2f}, per predicted layer, linear): "
                     f"{cpu * scale:.0f} CPU s")
        if hasattr(table, "memory_bytes"):
            mem = table.memory_bytes()
            line += f"; tables {mem / 1e6:.0f} MB" + (f" (x{scale:.2f} = {mem * scale / 1e9:.1f} GB at {L} layers)"
                                                     if layers != L else "")
        print(line, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("scaling", "accuracy", "layer", "big"), required=True)
    ap.add_argument("--tokens", default="8192,32768,131072,524288", help="scaling: token counts")
    ap.add_argument("--layers", type=int, default=6, help="scaling/accuracy: MoE layers of the synthetic traces")
    ap.add_argument("--no-cap-max", type=int, default=131072, help="scaling: largest T fitted without caps")
    ap.add_argument("--caps", default="4096,16384", help="accuracy: max_fit_tokens values")
    ap.add_argument("--synthetic-tokens", type=int, default=147456, help="accuracy: synthetic tokens")
    ap.add_argument("--big-tokens", type=int, default=1_000_000)
    ap.add_argument("--big-tables", default="", help="big: table predictors to time too (comma list)")
    ap.add_argument("--big-layers", type=int, default=None,
                    help="big: fit the tables on the first N of the 60 layers and extrapolate (N >= 2)")
    ap.add_argument("--skip-history", action="store_true", help="big: time the tables only")
    ap.add_argument("--layer-tokens", default="65536,262144", help="layer: synthetic token counts")
    ap.add_argument("--layer-small-cap", type=int, default=16384, help="layer: the small caps' size")
    args = ap.parse_args(argv)
    print("command: python " + " ".join(shlex.quote(a) for a in [sys.argv[0]] + (argv if argv is not None else sys.argv[1:])))
    print()
    if args.big_layers is not None and not 2 <= args.big_layers <= 60:
        ap.error(f"--big-layers {args.big_layers}: must be in 2..60")
    {"scaling": part_scaling, "accuracy": part_accuracy, "layer": part_layer, "big": part_big}[args.part](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
