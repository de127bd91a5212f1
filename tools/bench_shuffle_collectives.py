"""CPU cost of one shuffle layer's two TP collectives against Megatron's, on local gloo ranks.

    python tools/bench_shuffle_collectives.py [--ranks 4] [--tokens 512] [--hidden 128] [--repeats 60] [--json]

Per rank, the median CPU time of each call (process_time: every thread of the rank, gloo's own
included) after a barrier, 10 warm-up calls dropped:
    all-gather      Megatron's sequence-parallel input all-gather of [T/P, H] shards into a new [T, H];
    + inverse       ``comm.shuffle.deferred_all_gather``: the same, then the rows back to true order;
    reduce-scatter  Megatron's [T, H] -> [T/P, H], plus the residual added to the shard;
    + fold          ``comm.shuffle.shuffled_reduce_scatter``: the rows in the plan's order, this
                    rank's residual rows folded in, then the reduce-scatter;
    all-to-all      ``all_to_all_single`` of R rows of H per peer, at R = T/P and R = T/(2P): what
                    halving the remote pairs changes on this transport.
The plan is ``prices`` on random scores. Prints the command, a table (ms; median over ranks of
each rank's median) and the ratios measured in the same run, or JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _worker(rank: int, world: int, tokens: int, hidden: int, repeats: int) -> dict:
    import numpy as np
    import torch
    import torch.distributed as dist

    from megatron_specmoe.comm.shuffle import deferred_all_gather, shuffled_reduce_scatter
    from megatron_specmoe.schedule.assignment import assign

    torch.set_num_threads(1)
    group = dist.new_group(list(range(world)))
    c = tokens // world
    plan = assign(torch.rand(tokens, world, generator=torch.Generator().manual_seed(0)), "prices", validate=False)
    shard, full, residual = torch.randn(c, hidden), torch.randn(tokens, hidden), torch.randn(c, hidden)
    fold_rows = plan.order[rank * c : (rank + 1) * c]
    out = {}

    def bench(name, fn):
        times = []
        for _ in range(repeats + 10):
            dist.barrier(group)
            start = time.process_time()
            fn()
            times.append(time.process_time() - start)
        out[name] = 1e3 * float(np.median(times[10:]))

    def megatron_reduce_scatter():
        shard_out = torch.empty(c, hidden)
        dist.reduce_scatter_tensor(shard_out, full, group=group)
        return shard_out + residual

    bench("all-gather", lambda: dist.all_gather_into_tensor(torch.empty(tokens, hidden), shard, group=group))
    bench("all-gather + inverse", lambda: deferred_all_gather(shard, plan, group))
    bench("reduce-scatter + residual", megatron_reduce_scatter)
    bench("reduce-scatter + fold", lambda: shuffled_reduce_scatter(full, plan, group, fold_rows=fold_rows,
                                                                   fold=residual))
    for rows in (c, max(c // 2, 1)):
        send = torch.randn(rows * world, hidden)
        bench(f"all-to-all {rows} rows/peer", lambda: dist.all_to_all_single(torch.empty_like(send), send, group=group))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=4, help="gloo ranks (default 4)")
    p.add_argument("--tokens", type=int, default=512, help="T, tokens of the TP group (default 512, the demo's)")
    p.add_argument("--hidden", type=int, default=128, help="H (default 128, the shipped model's)")
    p.add_argument("--repeats", type=int, default=60, help="timed calls per collective (default 60)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = p.parse_args(argv)
    for flag in ("ranks", "tokens", "hidden", "repeats"):
        if getattr(args, flag) < 1:
            print(f"bench_shuffle_collectives: --{flag} {getattr(args, flag)}: must be >= 1", file=sys.stderr)
            return 2
    if args.ranks < 2 or args.tokens % args.ranks:
        print(f"bench_shuffle_collectives: --ranks {args.ranks} must be >= 2 and divide --tokens {args.tokens}",
              file=sys.stderr)
        return 2
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    from megatron_specmoe.testing.spawn import run_local

    import numpy as np

    command = " ".join(["python tools/bench_shuffle_collectives.py"] + [shlex.quote(a) for a in (argv or sys.argv[1:])])
    print(command, flush=True)
    ranks = run_local(_worker, args.ranks, args.tokens, args.hidden, args.repeats)
    median = {k: float(np.median([r[k] for r in ranks])) for k in ranks[0]}
    c = args.tokens // args.ranks
    ratios = {
        "all-gather: shuffle / Megatron": median["all-gather + inverse"] / median["all-gather"],
        "reduce-scatter: shuffle / Megatron": median["reduce-scatter + fold"] / median["reduce-scatter + residual"],
        "all-to-all: half the rows / all": median[f"all-to-all {max(c // 2, 1)} rows/peer"]
        / median[f"all-to-all {c} rows/peer"],
    }
    if args.json:
        print(json.dumps({"command": command, "ms": median, "per_rank_ms": ranks, "ratios": ratios}, indent=1))
        return 0
    print(f"\nCPU ms per call (median over {args.ranks} ranks of each rank's median of {args.repeats}), "
          f"T = {args.tokens}, H = {args.hidden}")
    for k, v in median.items():
        print(f"  {k:<28} {v:7.3f}")
    print("ratios, same run:")
    for k, v in ratios.items():
        print(f"  {k:<36} {v:5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
