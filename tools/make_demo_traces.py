"""Routing traces of the demo model on real text, with token ids: benchmark input for predictors
and expert grouping.

    python tools/make_demo_traces.py --out /work/demo_traces

Steps (single process, world size 1 on gloo, the model at TP = EP = 1)
    1. load the checkpoint (megatron_specmoe.megatron.checkpoint.load_model) and its tokenizer;
    2. per split (calibration, evaluation): encode the split's files (end-of-text after each),
       cut every file into requests of at most S tokens (positions restart at 0 per request);
       with --max-tokens, whole files in a fixed hash order until the budget is met;
    3. run the requests through the model in batches (short ones padded at the end with
       end-of-text; causal attention keeps the padding from affecting real tokens, and padded
       positions are dropped), recording routes with ``RouteRecorder``;
    4. write ``demo-{split}.npz`` (specmoe-npz via ``trace_io.write_trace``: experts [T, L, k],
       token_ids, positions, request_ids, optionally probs) and ``demo-{split}.files.json``
       (which requests came from which stdlib file).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import warnings

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from megatron_specmoe.demo import corpus as corpus_mod  # noqa: E402


def log(msg: str) -> None:
    print(f"[traces {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory (default: the shipped demo model)")
    p.add_argument("--out", default="/work/demo_traces")
    p.add_argument("--splits", nargs="+", default=["calibration", "evaluation"],
                   choices=["fit", "calibration", "evaluation"])
    p.add_argument("--max-tokens", type=int, default=0, help="per split (0: the whole split)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--probs", action="store_true", help="also store router probabilities")
    p.add_argument("--prefix", default="demo", help="file names: {prefix}-{split}.npz")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def _file_order(relpath: str) -> bytes:
    return hashlib.sha256(("order:" + relpath).encode("utf-8")).digest()


def requests_of(tok, files, *, seq: int, eot_id: int, max_tokens: int):
    """Cut files into requests. Returns (requests: list of int64 arrays of 1..seq tokens,
    per-file records {relpath, first_request, requests})."""
    if max_tokens:
        files = sorted(files, key=lambda f: _file_order(f.relpath))
    encoded = corpus_mod.encode_files(tok, files, eot_id=eot_id)
    requests, records, total = [], [], 0
    for f, ids in zip(files, encoded):
        if max_tokens and total >= max_tokens:
            break
        ids = np.asarray(ids, dtype=np.int64)
        if max_tokens:
            ids = ids[: max_tokens - total]
        chunks = [ids[i: i + seq] for i in range(0, len(ids), seq)]
        records.append({"relpath": f.relpath, "first_request": len(requests), "requests": len(chunks)})
        requests.extend(chunks)
        total += len(ids)
    return requests, records


def run_split(model, requests, *, seq: int, eot_id: int, batch: int, probs: bool, source: str):
    from megatron_specmoe.megatron.route_recorder import RouteRecorder

    token_ids, positions, request_ids, keep = [], [], [], []
    pos = torch.arange(seq).unsqueeze(0)
    mask = torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool), diagonal=1)
    rec = RouteRecorder.attach(model)
    t0 = time.time()
    try:
        with torch.no_grad():
            for start in range(0, len(requests), batch):
                group = requests[start: start + batch]
                tokens = np.full((len(group), seq), eot_id, dtype=np.int64)
                valid = np.zeros((len(group), seq), dtype=bool)
                for j, r in enumerate(group):
                    tokens[j, : len(r)] = r
                    valid[j, : len(r)] = True
                model(torch.from_numpy(tokens), pos.expand(len(group), -1), mask)
                token_ids.append(tokens.reshape(-1))
                positions.append(np.tile(np.arange(seq), len(group)))
                request_ids.append(np.repeat(np.arange(start, start + len(group)), seq))
                keep.append(valid.reshape(-1))
                done = start + len(group)
                if (start // batch) % 20 == 0 or done == len(requests):
                    log(f"{source}: {done}/{len(requests)} requests, {time.time() - t0:.0f}s")
        trace = rec.trace(token_ids=np.concatenate(token_ids), positions=np.concatenate(positions),
                          request_ids=np.concatenate(request_ids), keep=np.concatenate(keep),
                          with_probs=probs, source=source)
    finally:
        rec.detach()
    return trace


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    import torch.distributed as dist

    from megatron_specmoe.testing.spawn import free_port
    from megatron_specmoe.megatron import checkpoint
    from megatron_specmoe.megatron import cpu_support
    from megatron_specmoe.megatron import parallel
    from megatron_specmoe.artifacts.trace_io import write_trace

    os.makedirs(args.out, exist_ok=True)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    cpu_support.enable()
    parallel.initialize(parallel.ParallelLayout())
    written = []
    try:
        # 1. model and tokenizer
        card = checkpoint.read_card(args.model)
        model = checkpoint.load_model(args.model)
        tok = corpus_mod.load_tokenizer(card.tokenizer_path)
        seq = card.shape.seq
        log(f"model {card.directory}: {card.shape}")
        corp = corpus_mod.read_corpus(splits=tuple(args.splits))
        for split in args.splits:
            # 2. requests
            requests, records = requests_of(tok, corp.of(split), seq=seq, eot_id=card.eot_id,
                                            max_tokens=args.max_tokens)
            log(f"{split}: {len(records)} files, {len(requests)} requests, "
                f"{sum(len(r) for r in requests):,} tokens")
            # 3. routes
            trace = run_split(model, requests, seq=seq, eot_id=card.eot_id, batch=args.batch,
                              probs=args.probs, source=f"{args.prefix}-{split}")
            # 4. files
            path = os.path.join(args.out, f"{args.prefix}-{split}.npz")
            write_trace(trace, path)
            with open(os.path.join(args.out, f"{args.prefix}-{split}.files.json"), "w") as f:
                json.dump({"model_weights_sha256": card.weights_sha256, "split": split,
                           "corpus_root": corp.root, "seq": seq, "files": records}, f, indent=0)
            written.append({"split": split, "path": path, "tokens": trace.num_tokens,
                            "layers": trace.num_layers, "topk": trace.topk,
                            "experts": trace.num_experts, "bytes": os.path.getsize(path)})
            log(f"wrote {path}: {trace.num_tokens:,} tokens, {os.path.getsize(path) / 1e6:.2f} MB")
    finally:
        parallel.destroy()
        dist.destroy_process_group()
    for w in written:
        print(json.dumps(w))
    print("command: python " + " ".join([os.path.relpath(__file__, REPO)] +
                                        (argv if argv is not None else sys.argv[1:])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
