"""Write synthetic routes like DeepEP's tests to a trace file ``specmoe simulate --traces`` reads.

Default: DeepSeek-V3's gate shape, 256 experts, top-8, uniformly random scores, group-limited to
the 4 best of 8 groups of 32 experts (at EP 64, 8 nodes, that is DeepEP's internode test: 4 of 8
nodes). See ``megatron_specmoe/sim/synthetic.py`` for the recipe.

    python tools/make_synthetic_routes.py --tokens 262144 --out T.npz
    specmoe simulate --traces T.npz --cluster h800-ib --ep 32 --tp 1 --hidden 7168 \\
        --dispatch-dtype fp8 --combine-dtype bf16 --tokens-per-rank 4096 --json OUT.json
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096 * 64,
                        help="tokens T (>= tokens per rank x the largest EP you simulate; default 4096 x 64)")
    parser.add_argument("--experts", type=int, default=256, help="experts E (default 256)")
    parser.add_argument("--topk", type=int, default=8, help="top-k (default 8)")
    parser.add_argument("--groups", type=int, default=8, help="expert groups (1: no group limit; default 8)")
    parser.add_argument("--top-groups", type=int, default=4, help="groups a token may use (default 4)")
    parser.add_argument("--layers", type=int, default=1, help="independent MoE layers (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="output trace (.npz)")
    args = parser.parse_args(argv)

    from megatron_specmoe.artifacts.trace_io import write_trace
    from megatron_specmoe.sim.synthetic import synthetic_routes

    try:
        trace = synthetic_routes(num_tokens=args.tokens, num_experts=args.experts, top_k=args.topk,
                                 num_groups=args.groups, top_groups=args.top_groups,
                                 num_layers=args.layers, seed=args.seed)
    except ValueError as exc:
        parser.error(str(exc))
    write_trace(trace, args.out)
    print(f"wrote {args.out}: {trace.source}, {trace.num_tokens} tokens, {trace.num_layers} layer(s)")
    print("command: " + " ".join([sys.executable, *sys.argv]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
