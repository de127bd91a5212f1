"""Measure gloo all_to_all_single latency and bandwidth on this machine (loopback).

Spawns P processes (torch.multiprocessing, a free TCP port), times ``all_to_all_single`` for a few
message sizes (bytes per (source, destination) pair), and fits

    time = alpha * (P - 1) + bytes_out / bw          (bytes_out = (P - 1) * message bytes)

by least squares over the median time of each size. gloo issues its messages one after another, so
in the simulator's model (sim/links.py) alpha is the per-message issue cost and there is no fixed
cost; bw is both links' bandwidth. Prints alpha, bw, the raw medians and the exact command. The
constants of the ``gloo-loopback`` preset in megatron_specmoe/sim/cluster.py come from this tool.

    /work/venvs/mc016/bin/python tools/calibrate_gloo.py --procs 4
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, sizes: list[int], repeats: int, out_path: str) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        results = []
        for size in sizes:
            elems = max(1, size // 4)
            send = torch.ones(world * elems, dtype=torch.float32)
            recv = torch.empty_like(send)
            for _ in range(2):  # warm-up
                dist.all_to_all_single(recv, send)
            times = []
            for _ in range(repeats):
                dist.barrier()
                t0 = time.perf_counter()
                dist.all_to_all_single(recv, send)
                times.append(time.perf_counter() - t0)
            # The collective ends when its slowest rank ends: reduce the max over ranks.
            t = torch.tensor(times, dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            results.append((elems * 4, sorted(t.tolist())[len(times) // 2]))
        if rank == 0:
            with open(out_path, "w") as f:
                for size, med in results:
                    f.write(f"{size} {med}\n")
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, default=4, help="gloo processes (ranks), default 4")
    parser.add_argument(
        "--sizes",
        default="1024,16384,131072,524288,2097152",
        help="bytes per (source, destination) message, comma-separated",
    )
    parser.add_argument("--repeats", type=int, default=15, help="timed repeats per size")
    args = parser.parse_args(argv)
    if args.procs < 2:
        parser.error("--procs must be >= 2 (an all-to-all needs two ranks)")
    sizes = [int(x) for x in args.sizes.split(",")]

    import tempfile

    import numpy as np
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "medians.txt")
        print(f"calibrate_gloo: {args.procs} ranks, sizes {sizes}", file=sys.stderr)
        mp.spawn(
            _worker,
            args=(args.procs, _free_port(), sizes, args.repeats, out_path),
            nprocs=args.procs,
            join=True,
        )
        rows = [tuple(float(v) for v in line.split()) for line in open(out_path)]

    peers = args.procs - 1
    x = np.array([peers * size for size, _ in rows])  # bytes out per rank
    y = np.array([med for _, med in rows])
    design = np.stack([np.full_like(x, peers), x], axis=1)
    (alpha, inv_bw), *_ = np.linalg.lstsq(design, y, rcond=None)
    print("message_bytes  bytes_out_per_rank  median_s")
    for (size, med), out in zip(rows, x):
        print(f"{int(size):>13d}  {int(out):>18d}  {med:.6e}")
    print(f"alpha_s_per_message = {alpha:.3e}")
    print(f"bw_bytes_per_s      = {1.0 / inv_bw:.3e}")
    print("command: " + " ".join([sys.executable, "tools/calibrate_gloo.py", *sys.argv[1:]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
