"""Cost and quality of the per-layer shuffle plan: launches, host syncs, CPU time, local activation rate.

    python tools/bench_plan.py --json            (TRITON_INTERPRET=1 to count the Triton path on a CPU)

One row per (predictor, tokens, ranks), tokens in --tokens (64, 512, 4096, 16384), ranks in --ranks
(4, 8, 16), predictors pregate (router gating, H = 1024, + rank scores), pregate_sp (each rank
sorts its own rows' logits; the ids ride along with the all-gather; rank counts from the
gathered ids), route (token rank table, V = 32000), history (history MLP over 4 MoE layers,
128 hidden units), combined (a token table's expert scores and that history MLP, "mixture"
rule: one Triton kernel after the MLP, ``predict/combined_triton.py``); random weights (the
counts and times do not depend on them). E = 8 experts, top-2 (2 * ranks experts where
ranks > 8). Keys:
    kernels     launches per MoE layer of predictor + "prices" assignment + permutation, counted
                with ``measure.launches.LaunchCounter`` on the path a GPU runs: the Triton kernels
                (``path`` "triton", where triton can run: a CUDA device, or TRITON_INTERPRET=1; the
                ops are dispatched on fake tensors, so nothing is computed) or the plain torch ops
                (``path`` "torch"); numpy twins are never on it.
    kernels_torch  the same on the plain torch path (where triton is absent).
    host_syncs  host synchronisations among them (0 expected).
    cpu_ms      median wall time of the whole plan on this CPU (torch path, 1 thread).
    lar, lar_refine  local activation rate of "prices" and of "refine" on the same scores, batches
                of ``tokens`` tokens, contiguous (balanced) expert placement at EP = ranks: with
                ``routes`` "mixtral-history-mlp" the history MLP's scores of the shared Mixtral
                traces (leave one category out, repeated routes dropped, all 32 layers; a batch
                larger than a category's tokens takes the whole category); with ``routes``
                "synthetic" (ranks > 8: Mixtral has 8 experts) seeded routes of 2 * ranks experts,
                top-2, scores half the true share and half Dirichlet(0.5) noise.
Prints the command, then the table (or the JSON list with --json).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from bench_data import MIXTRAL_TRACES  # noqa: E402 - tools/ is on sys.path when run

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from megatron_specmoe.measure.launches import LaunchCounter  # noqa: E402
from megatron_specmoe.predict.history_mlp import HistoryLayerScorer  # noqa: E402
from megatron_specmoe.predict.pregate import rank_scores_from_experts, rank_scores_from_logits, span_hosts  # noqa: E402
from megatron_specmoe.predict.device import CombinedScorer, ExpertTable, RankTable  # noqa: E402
from megatron_specmoe.schedule.assignment import assign  # noqa: E402
from megatron_specmoe.schedule.fast_assign import prices_plan, triton_usable  # noqa: E402

CATEGORIES = ("coding", "math", "roleplay", "writing")
PREDICTORS = ("pregate", "pregate_sp", "route", "history", "combined")


def log(msg: str) -> None:
    print(f"[bench_plan] {msg}", file=sys.stderr, flush=True)


def _paths(t: int, p: int, backend: str, convert=lambda x: x) -> tuple[dict, Callable]:
    """(each run-time path's predictor scores (with any other run-time work) as a closure, the
    plan function: scores -> prices -> permutation, on ``backend``); ``convert`` maps every input
    tensor (e.g. to a fake tensor)."""
    e = 8 if p <= 8 else 2 * p
    k, hidden, vocab, layers = 2, 1024, 32000, 4
    gen = torch.Generator().manual_seed(t * 131 + p)
    rank_of = torch.arange(e) * p // e
    hosts = span_hosts(rank_of, ep_base=0, tp=p)
    hosts_sum = torch.cat([hosts, torch.ones(e, 1)], dim=1)
    router = torch.randn(e, hidden, generator=gen) * 0.05
    x = torch.randn(t, hidden, generator=gen)
    own = x[: -(-t // p)]
    gathered = torch.randint(0, e, (t, k), generator=gen)
    table = RankTable(table=torch.rand(vocab + 1, p, generator=gen), layer=0, ep_base=0, placement_key=())
    ids = torch.randint(0, vocab, (t,), generator=gen)
    scorer = HistoryLayerScorer(layer=layers, num_experts=e, prior=torch.full((e,), 1.0 / e),
                                w1=torch.randn(layers * e, 128, generator=gen) * 0.05, b1=torch.zeros(128),
                                w2=torch.randn(128, e, generator=gen) * 0.05, b2=torch.zeros(e))
    offsets = (torch.arange(layers) * e).view(1, -1, 1)
    history = torch.randint(0, e, (t, layers, k), generator=gen)
    floor = torch.cat([torch.zeros(p), torch.full((1,), 1e-12)])
    scores = torch.rand(t, p, generator=gen)
    experts = torch.softmax(torch.randn(vocab + 1, e, generator=gen), dim=1)
    # Constants made once per placement, outside the counted plan (on real tensors, then converted).
    consts = CombinedScorer(members=(ExpertTable(table=experts), scorer), rule="mixture").fused_consts(hosts)
    consts = tuple(map(convert, consts))
    (hosts, hosts_sum, router, x, own, gathered, ids, offsets, history, floor, scores, experts) = map(
        convert, (hosts, hosts_sum, router, x, own, gathered, ids, offsets, history, floor, scores, experts))
    table = RankTable(table=convert(table.table), layer=0, ep_base=0, placement_key=())
    scorer = HistoryLayerScorer(layer=layers, num_experts=e, prior=convert(scorer.prior), w1=convert(scorer.w1),
                                b1=convert(scorer.b1), w2=convert(scorer.w2), b2=convert(scorer.b2))
    combined = CombinedScorer(members=(ExpertTable(table=experts), scorer), rule="mixture")
    combined_backend = "torch" if backend == "torch" else "auto"

    def plan(s):
        return prices_plan(s, backend=backend)

    # Each path: (its scores, and any other run-time work, as a closure) -> the plan of those scores.
    return {
        "assignment": lambda: scores,
        "pregate": lambda: rank_scores_from_logits(torch.nn.functional.linear(x, router), k=k, hosts=hosts),
        "pregate_sp": lambda: (torch.sort(torch.nn.functional.linear(own, router), dim=1, descending=True,
                                          stable=True).indices[:, :k],
                               rank_scores_from_experts(gathered, hosts=hosts))[1],
        "route": lambda: table.lookup(ids),
        "history": lambda: scorer.rank_scores(history=history, hosts_sum=hosts_sum, offsets=offsets, floor=floor),
        "combined": lambda: combined.rank_scores(token_ids=ids, history=history, hosts=hosts, consts=consts,
                                                 backend=combined_backend),
    }, plan


def count_paths(sizes, *, check_equal: bool = False, backend: str = "auto") -> list[dict]:
    """Launch counts of every run-time path at each (T, P) of ``sizes``: on the Triton path where
    triton can run (``backend`` "auto"; a CUDA device or TRITON_INTERPRET=1), else torch. With
    ``check_equal`` the kernels run (in the interpreter on a CPU) and each plan is compared with
    the torch one; without, the ops are dispatched on fake tensors (shapes only: the same ops,
    nothing computed, so T = 16384 counts in moments)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if backend == "auto":
        backend = "triton" if triton_usable(torch.device("cpu")) else "torch"
    rows = []
    for t, p in sizes:
        ref = _paths(t, p, "torch")[0] if check_equal else None
        fake = None if check_equal else FakeTensorMode(allow_non_fake_inputs=False)
        paths, plan = _paths(t, p, backend, convert=(lambda v: v) if fake is None else fake.from_tensor)
        for name, fn in paths.items():
            if fake is None:
                with LaunchCounter() as counter:
                    scores = fn()
                    got = plan(scores)
            else:
                with fake, LaunchCounter() as counter:
                    got = plan(fn())
            c = counter.result()
            row = {"predictor": name, "tokens": t, "ranks": p, "path": backend, "kernels": c.kernels,
                   "triton": c.triton, "host_syncs": c.host_syncs, "by_op": c.by_op}
            if check_equal:
                # The plan equals the torch plan of the same scores, bit for bit; the scores equal
                # the torch path's (up to float rounding for the combined kernel).
                want_scores = ref[name]()
                want = prices_plan(scores, backend="torch")
                row["equal_to_torch"] = all(torch.equal(getattr(got, f), getattr(want, f))
                                            for f in ("home_ext", "order", "inverse"))
                row["scores_close"] = bool(torch.allclose(scores, want_scores, rtol=1e-5, atol=1e-6))
            rows.append(row)
    return rows


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _lar(scores_hits, batch: int) -> tuple[float, float]:
    """(prices, refine) local activation rates over (rank scores [T, P], hosts [T, k]) pairs."""
    local = {"prices": 0, "refine": 0}
    pairs = 0
    for scores, hosts in scores_hits:
        for lo in range(0, len(hosts), batch):
            s = torch.from_numpy(np.ascontiguousarray(scores[lo : lo + batch]))
            h = hosts[lo : lo + batch]
            for m in local:
                # prices on the torch path: the Triton kernels give the same plan (tests), and the
                # interpreter (TRITON_INTERPRET=1, for the counts) would take hours here.
                home = (prices_plan(s, backend="torch").home_ext[: len(h)] if m == "prices"
                        else assign(s, m, validate=False).home_rank).numpy()
                local[m] += int((h == home[:, None]).sum())
            pairs += h.size
    return local["prices"] / pairs, local["refine"] / pairs


def mixtral_scores(trace_dir: Path) -> list:
    """Per held-out category: (expert scores float32 [T, L, E], experts int64 [T, L, k])."""
    from megatron_specmoe.artifacts.trace_io import read_traces
    from megatron_specmoe.artifacts.trace_splits import cross_domain_split
    from megatron_specmoe.predict.base import RouteContext
    from megatron_specmoe.predict.registry import fit_predictor

    traces = {c: read_traces(trace_dir / f"experts_{c}_mixtral.json", num_experts=8) for c in CATEGORIES}
    out = []
    for held in CATEGORIES:
        split = cross_domain_split([traces[c] for c in CATEGORIES if c != held], [traces[held]])
        log(f"fitting the history MLP without {held} ...")
        pred = fit_predictor("history", split.fit)
        ev = split.eval
        scores = np.stack([pred.expert_scores(RouteContext(layer=l, history=ev.experts[:, :l]))
                           for l in range(ev.num_layers)], axis=1).astype(np.float32)
        out.append((scores, ev.experts.astype(np.int64)))
    return out


def quality(tokens, ranks, trace_dir: Path) -> dict:
    """(tokens, ranks) -> (lar, lar_refine, routes)."""
    res = {}
    mixtral = mixtral_scores(trace_dir) if trace_dir.is_dir() and any(p <= 8 for p in ranks) else None
    for p in ranks:
        if mixtral is not None and p <= 8:
            e = mixtral[0][0].shape[2]
            rank_of = np.arange(e) // (e // p)
            pairs = [(np.stack([sc[:, l, rank_of == r].sum(1) for r in range(p)], axis=1), rank_of[ex[:, l]])
                     for sc, ex in mixtral for l in range(sc.shape[1])]
            source = "mixtral-history-mlp"
        else:
            rng = np.random.default_rng(p)
            e, n = 2 * p, 16384
            rank_of = np.arange(e) // 2
            pairs = []
            for _ in range(4):
                experts = np.stack([rng.choice(e, 2, replace=False, p=rng.dirichlet(np.full(e, 0.3)))
                                    for _ in range(n // 64)] * 64)  # 256 route kinds, repeated
                hosts = rank_of[experts]
                share = np.zeros((n, p), np.float32)
                for j in range(2):
                    np.add.at(share, (np.arange(n), hosts[:, j]), 0.5)
                scores = 0.5 * share + 0.5 * rng.dirichlet(np.full(p, 0.5), n)
                pairs.append((scores.astype(np.float32), hosts))
            source = "synthetic"
        for t in tokens:
            log(f"LAR at tokens={t}, ranks={p} ({source}) ...")
            res[(t, p)] = (*_lar(pairs, t), source)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="64,512,4096,16384")
    ap.add_argument("--ranks", default="4,8,16")
    ap.add_argument("--traces", type=Path, default=Path(MIXTRAL_TRACES))
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per row")
    ap.add_argument("--json", action="store_true", help="print the rows as one JSON list")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    tokens = [int(x) for x in args.tokens.split(",")]
    ranks = [int(x) for x in args.ranks.split(",")]
    env = "TRITON_INTERPRET=1 " if os.environ.get("TRITON_INTERPRET") == "1" else ""
    command = env + "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    print(f"command: {command}", file=sys.stderr if args.json else sys.stdout)
    sizes = [(t, p) for p in ranks for t in tokens]
    counts = {(r["predictor"], r["tokens"], r["ranks"]): r for r in count_paths(sizes)}
    torch_counts = {(r["predictor"], r["tokens"], r["ranks"]): r for r in count_paths(sizes, backend="torch")}
    lar = quality(tokens, ranks, args.traces)
    rows = []
    for p in ranks:
        for t in tokens:
            timed = _paths(t, p, "torch")[0]
            for name in PREDICTORS:
                c = counts[(name, t, p)]
                rows.append({"predictor": name, "tokens": t, "ranks": p, "kernels": c["kernels"],
                             "host_syncs": c["host_syncs"], "path": c["path"],
                             "kernels_torch": torch_counts[(name, t, p)]["kernels"],
                             "cpu_ms": round(_median_ms(lambda f=timed[name]: prices_plan(f(), backend="torch"),
                                                        args.repeats), 3),
                             "lar": round(lar[(t, p)][0], 4), "lar_refine": round(lar[(t, p)][1], 4),
                             "routes": lar[(t, p)][2]})
            log(f"tokens={t} ranks={p}: {[(r['predictor'], r['kernels'], r['cpu_ms']) for r in rows[-len(PREDICTORS):]]}")
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'predictor':>10s} {'T':>6s} {'P':>3s} {'kernels':>7s} {'path':>6s} {'torch':>5s} {'syncs':>5s} "
          f"{'cpu ms':>8s} {'LAR':>7s} {'refine':>7s} routes")
    for r in rows:
        print(f"{r['predictor']:>10s} {r['tokens']:6d} {r['ranks']:3d} {r['kernels']:7d} {r['path']:>6s} "
              f"{r['kernels_torch']:5d} {r['host_syncs']:5d} {r['cpu_ms']:8.3f} {r['lar']:7.4f} {r['lar_refine']:7.4f} "
              f"{r['routes']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
