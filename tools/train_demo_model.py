"""Train the shipped demo model from scratch: tokenizer, GPT-MoE (Megatron-Core, CPU, 1 process).

    python tools/train_demo_model.py --out megatron_specmoe/data
    python tools/train_demo_model.py --preset deepseek-style --tokenizer megatron_specmoe/data/tokenizer.json \
        --out megatron_specmoe/data/deepseek-style

Presets (``--preset``; any flag given explicitly wins):
    gpt-moe         the first demo model: standard attention, LayerNorm, 32 experts top-4, softmax
                    router with Megatron's load-balancing aux loss.
    deepseek-style  DeepSeek-V3's layer shape in small: multi-latent attention (no query
                    compression, kv_lora_rank 64, RoPE head dims 32 + 16), RMSNorm, one shared
                    expert, 64 fine-grained routed experts top-6, group-limited routing (4 groups,
                    top-2 groups), sigmoid scores with an expert bias updated after every step
                    (aux-loss-free balancing, Megatron's own update) plus a small sequence aux loss.

Steps
    1. corpus: the running interpreter's stdlib .py files, split by file (megatron_specmoe.demo.corpus);
    2. tokenizer: byte-level BPE (``tokenizers``) trained on the fit split, saved as tokenizer.json;
    3. data: fit files encoded and concatenated (end-of-text between files); training samples
       random windows of S + 1 tokens; validation uses fixed windows of the evaluation split;
    4. baseline: a unigram model (add-one smoothed counts of the fit split) scored on the same
       validation targets;
    5. model: Megatron ``GPTModel`` (every layer MoE, alltoall dispatcher, world size 1 on gloo),
       AdamW, warm-up + cosine learning rate, a load-balancing aux loss (Megatron's own);
    6. save: weights rounded to float16, validation loss measured again on the rounded weights,
       model.pt + model.json (megatron_specmoe.megatron.checkpoint).
Progress lines go to stderr; the final summary (and the command) to stdout.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import platform
import sys
import time
import warnings

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from megatron_specmoe.demo import corpus as corpus_mod  # noqa: E402
from megatron_specmoe.megatron.build import MoEShape  # noqa: E402

EOT = "<|endoftext|>"


def log(msg: str) -> None:
    print(f"[train {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="gpt-moe", help="architecture (module docstring)")
    p.add_argument("--out", default=None, help="model folder (default: megatron_specmoe/data, or "
                                                 "megatron_specmoe/data/deepseek-style for that preset)")
    p.add_argument("--tokenizer", default=None, metavar="FILE",
                   help="copy this tokenizer.json instead of training one (the same corpus split gives the same one)")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--experts", type=int, default=None, help="routed experts (preset)")
    p.add_argument("--topk", type=int, default=None, help="top-k (preset)")
    p.add_argument("--ffn", type=int, default=None, help="expert FFN size (preset)")
    p.add_argument("--shared-ffn", type=int, default=None, help="shared-expert FFN size, 0: none (preset)")
    p.add_argument("--groups", type=int, default=None, help="moe_router_num_groups, 1: none (preset)")
    p.add_argument("--group-topk", type=int, default=None, help="moe_router_group_topk (preset)")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--aux-loss", type=float, default=None, help="moe_aux_loss_coeff (preset)")
    p.add_argument("--max-minutes", type=float, default=25.0,
                   help="wall-time budget of the training loop: the learning-rate schedule runs on "
                        "max(step / steps, elapsed / budget), and training stops when either ends "
                        "(0: no budget, exactly --steps steps, bit-reproducible)")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--val-windows", type=int, default=256, help="final validation windows of S tokens")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    for name, value in preset["args"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.out is None:
        args.out = os.path.join(REPO, "megatron_specmoe", "data", *preset["subdir"])
    return args


PRESETS = {
    "gpt-moe": {
        "subdir": (),
        "args": {"experts": 32, "topk": 4, "ffn": 64, "shared_ffn": 0, "groups": 1, "group_topk": 0,
                 "aux_loss": 1e-2},
        "config": {"moe_router_load_balancing_type": "aux_loss", "init_method_std": 0.02},
    },
    "deepseek-style": {
        "subdir": ("deepseek-style",),
        "args": {"experts": 64, "topk": 6, "ffn": 16, "shared_ffn": 64, "groups": 4, "group_topk": 2,
                 "aux_loss": 1e-3},
        "config": {"init_method_std": 0.02, "normalization": "RMSNorm",
                   "multi_latent_attention": True, "q_lora_rank": None, "kv_lora_rank": 64,
                   "qk_head_dim": 32, "qk_pos_emb_head_dim": 16, "v_head_dim": 32, "rope_type": "rope",
                   "moe_router_score_function": "sigmoid", "moe_router_enable_expert_bias": True,
                   "moe_router_bias_update_rate": 1e-3, "moe_router_topk_scaling_factor": 2.5,
                   "moe_router_load_balancing_type": "seq_aux_loss"},
    },
}


def model_config(args) -> dict:
    """The card's extra TransformerConfig fields for ``args`` (preset plus router groups)."""
    config = dict(PRESETS[args.preset]["config"])
    if args.groups > 1:
        config.update(moe_router_num_groups=args.groups, moe_router_group_topk=args.group_topk)
    return config


# ---- 2. tokenizer ---------------------------------------------------------------------------------
def train_tokenizer(files, vocab: int, path: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((f.text for f in files), trainer=trainer, length=len(files))
    tok.save(path)
    return tok


# ---- 3. data --------------------------------------------------------------------------------------
def stream(tok, files, eot_id: int) -> np.ndarray:
    ids = corpus_mod.encode_files(tok, files, eot_id=eot_id)
    return np.concatenate([np.asarray(x, dtype=np.int64) for x in ids])


def val_windows(tokens: np.ndarray, seq: int, count: int) -> torch.Tensor:
    """``count`` windows of seq + 1 tokens, evenly spaced over the stream: int64 [count, seq + 1]."""
    starts = np.linspace(0, len(tokens) - seq - 2, count).astype(np.int64)
    return torch.from_numpy(np.stack([tokens[s: s + seq + 1] for s in starts]))


def unigram_ce(fit: np.ndarray, windows: torch.Tensor, vocab: int) -> float:
    counts = np.bincount(fit, minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[windows[:, 1:].numpy()].mean())


# ---- 5. model -------------------------------------------------------------------------------------
def init_single_process():
    import torch.distributed as dist

    from megatron_specmoe.testing.spawn import free_port
    from megatron_specmoe.megatron import cpu_support
    from megatron_specmoe.megatron import parallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    cpu_support.enable()
    parallel.initialize(parallel.ParallelLayout())


def causal_mask(seq: int) -> torch.Tensor:
    return torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool), diagonal=1)


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, seq: int, batch: int) -> float:
    model.eval()
    pos = torch.arange(seq).unsqueeze(0)
    mask = causal_mask(seq)
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        w = windows[i: i + batch]
        loss = model(w[:, :-1], pos.expand(len(w), -1), mask, labels=w[:, 1:])
        total += float(loss.sum())
        count += loss.numel()
    model.train()
    return total / count


@torch.no_grad()
def expert_load(model, windows: torch.Tensor, seq: int, batch: int, experts: int) -> list[list[int]]:
    """Tokens routed to each expert, per MoE layer, on ``windows`` (int [L][E])."""
    from megatron_specmoe.megatron.route_recorder import RouteRecorder

    model.eval()
    rec = RouteRecorder.attach(model)
    try:
        pos = torch.arange(seq).unsqueeze(0)
        for i in range(0, len(windows), batch):
            w = windows[i: i + batch]
            model(w[:, :-1], pos.expand(len(w), -1), causal_mask(seq))
        routes = rec.routes()  # [L, T, k]
    finally:
        rec.detach()
    model.train()
    return [np.bincount(routes[layer].reshape(-1), minlength=experts).tolist()
            for layer in range(routes.shape[0])]


def update_expert_bias(model) -> None:
    """Megatron's aux-loss-free bias update (what its finalize_model_grads does after a step):
    each router's expert bias moves by the update rate towards less-loaded experts, from the
    tokens it counted since the last update."""
    from megatron.core.distributed.finalize_model_grads import _update_router_expert_bias

    _update_router_expert_bias([model], model.config)


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.time()
    os.makedirs(args.out, exist_ok=True)

    # 1. corpus
    corp = corpus_mod.read_corpus(splits=("fit", "evaluation"))
    fit_files, eval_files = corp.of("fit"), corp.of("evaluation")
    log(f"corpus {corp.root}: fit {len(fit_files)} files {corp.num_bytes('fit') / 1e6:.1f} MB, "
        f"evaluation {len(eval_files)} files {corp.num_bytes('evaluation') / 1e6:.1f} MB, "
        f"{len(corp.skipped)} non-UTF-8 files skipped")

    # 2. tokenizer
    tok_path = os.path.join(args.out, "tokenizer.json")
    if args.tokenizer:
        import shutil

        from tokenizers import Tokenizer

        if os.path.abspath(args.tokenizer) != os.path.abspath(tok_path):
            shutil.copyfile(args.tokenizer, tok_path)
        tok = Tokenizer.from_file(tok_path)
        log(f"tokenizer copied from {args.tokenizer}")
    else:
        tok = train_tokenizer(fit_files, args.vocab, tok_path)
    eot_id = tok.token_to_id(EOT)
    vocab = tok.get_vocab_size()
    log(f"tokenizer: {vocab} tokens, end-of-text id {eot_id}, {time.time() - t_start:.0f}s")

    # 3. data
    fit = stream(tok, fit_files, eot_id)
    ev = stream(tok, eval_files, eot_id)
    log(f"tokens: fit {len(fit):,}  evaluation {len(ev):,} "
        f"({corp.num_bytes('fit') / len(fit):.2f} bytes/token), {time.time() - t_start:.0f}s")
    seq = args.seq
    val_small = val_windows(ev, seq, 48)
    val_full = val_windows(ev, seq, args.val_windows)

    # 4. unigram baseline
    uni = unigram_ce(fit, val_full, vocab)
    log(f"unigram cross-entropy on the validation windows: {uni:.4f} nats/token")

    # 5. model
    from megatron_specmoe.megatron import checkpoint
    from megatron_specmoe.megatron import parallel

    init_single_process()
    shape = MoEShape(hidden=args.hidden, ffn=args.ffn, experts=args.experts, topk=args.topk,
                     heads=args.heads, layers=args.layers, vocab=vocab, seq=seq, shared_ffn=args.shared_ffn)
    config = model_config(args)
    card = checkpoint.ModelCard(directory=args.out, shape=shape, config=config,
                                gpt=dict(checkpoint._GPT_DEFAULTS), weights_file="model.pt",
                                weights_dtype=args.dtype, weights_sha256="",
                                tokenizer_file="tokenizer.json", eot_id=eot_id)
    model = checkpoint.build_model(card, parallel_output=True, moe_aux_loss_coeff=args.aux_loss)
    nparams = sum(p.numel() for p in model.parameters())
    log(f"model: {shape}, {nparams:,} parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)

    budget_s = args.max_minutes * 60.0

    def progress(step: int) -> float:
        """Fraction of training done: by steps, or by wall time when a budget is set."""
        by_time = (time.time() - t_train) / budget_s if budget_s > 0 else 0.0
        return max(step / args.steps, by_time)

    def lr_at(step: int, frac: float) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))

    gen = torch.Generator().manual_seed(args.seed)
    fit_t = torch.from_numpy(fit)
    offsets = torch.arange(seq + 1)
    pos = torch.arange(seq).unsqueeze(0).expand(args.batch, -1)
    mask = causal_mask(seq)
    history = []
    t_train = time.time()
    model.train()
    step = 0
    stopped_early = False
    running = collections.deque(maxlen=50)
    for step in range(args.steps):
        frac = progress(step)
        if frac >= 1.0:
            stopped_early = True
            log(f"stopping at step {step}: the --max-minutes {args.max_minutes} budget is spent")
            break
        for g in opt.param_groups:
            g["lr"] = lr = lr_at(step, frac)
        starts = torch.randint(0, len(fit) - seq - 1, (args.batch,), generator=gen)
        w = fit_t[starts[:, None] + offsets]
        loss = model(w[:, :-1], pos, mask, labels=w[:, 1:]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if config.get("moe_router_enable_expert_bias"):
            update_expert_bias(model)
        running.append(float(loss))
        if (step + 1) % 25 == 0:
            el = time.time() - t_train
            log(f"step {step + 1}/{args.steps} loss {np.mean(running):.3f} lr {lr:.2e} "
                f"{el / (step + 1):.2f}s/step, {el / 60:.1f} min")
        if (step + 1) % args.eval_every == 0:
            vl = evaluate(model, val_small, seq, args.batch)
            history.append({"step": step + 1, "train_loss": float(np.mean(running)), "val_loss": vl})
            log(f"step {step + 1}: validation loss {vl:.4f} (unigram {uni:.4f})")
    steps_done = step + (0 if stopped_early else 1)
    train_s = time.time() - t_train

    # 6. round to the stored dtype, evaluate what ships, save
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(checkpoint._DTYPES[args.dtype]).float())
    val = evaluate(model, val_full, seq, args.batch)
    load = expert_load(model, val_full[:64], seq, args.batch, args.experts)
    log(f"final validation loss {val:.4f} nats/token (unigram {uni:.4f}) on {len(val_full) * seq:,} tokens")
    training = {
        "command": "python " + " ".join([os.path.relpath(__file__, REPO)] + (argv if argv is not None else sys.argv[1:])),
        "preset": args.preset, "tokenizer": "copied from " + os.path.relpath(args.tokenizer, REPO) if args.tokenizer else "trained",
        "steps": steps_done, "stopped_early": stopped_early, "batch": args.batch, "lr": args.lr,
        "warmup": args.warmup, "max_minutes": args.max_minutes, "aux_loss_coeff": args.aux_loss, "seed": args.seed,
        "optimizer": "torch.optim.AdamW(betas=(0.9, 0.95), weight_decay=0.1), grad clip 1.0, "
                     "linear warm-up, cosine to 0.1 lr over max(step/steps, elapsed/budget)"
                     + (", expert bias updated after every step (Megatron's _update_router_expert_bias)"
                        if config.get("moe_router_enable_expert_bias") else ""),
        "train_seconds": round(train_s, 1), "total_seconds": round(time.time() - t_start, 1),
        "threads": args.threads, "parameters": nparams,
        "val_loss": round(val, 4), "unigram_ce": round(uni, 4), "val_tokens": len(val_full) * seq,
        "val_loss_measured_on": f"{args.dtype}-rounded weights",
        "history": history,
        "expert_tokens_per_layer_on_8192_val_tokens": load,
        "corpus": {"python": platform.python_version(), "root": "sysconfig stdlib",
                   "fit_files": len(fit_files), "evaluation_files": len(eval_files),
                   "fit_tokens": int(len(fit)), "evaluation_tokens": int(len(ev)),
                   "skipped_non_utf8": len(corp.skipped)},
        "versions": {"torch": torch.__version__, "megatron_core": _megatron_version(),
                     "tokenizers": _version("tokenizers")},
    }
    card = checkpoint.dataclasses.replace(card, training=training)
    card = checkpoint.save_checkpoint(model, card, dtype=args.dtype)
    size = os.path.getsize(card.weights_path)
    parallel.destroy()
    import torch.distributed as dist

    dist.destroy_process_group()
    summary = {"train_minutes": round(train_s / 60, 2), "steps": steps_done, "val_loss": round(val, 4),
               "unigram_ce": round(uni, 4), "weights_bytes": size, "out": args.out}
    print(json.dumps(summary))
    print("command:", training["command"])
    return 0


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


def _megatron_version() -> str:
    return _version("megatron-core")


if __name__ == "__main__":
    raise SystemExit(main())
