"""``specmoe demo``: the whole workflow on local gloo ranks, on the shipped trained model.

    specmoe demo                          profile -> plan -> serve -> report (4 ranks, TP=4, EP=4)
    specmoe demo --ranks 8 --tp 4 --ep 8  another layout
    specmoe demo --model deepseek-style   the shipped DeepSeek-style model (MLA, shared expert, router groups)
    specmoe demo --checkpoint DIR --calib-text a.txt --eval-text b.txt    your model and text
    specmoe demo --synthetic              a random-weight model, alltoall vs specmoe dispatcher only
    specmoe demo --engine dynamic         the evaluation text as a request stream through Megatron-Core
                                          0.19's DynamicInferenceEngine (TP = EP = --ranks, DP 1)

Text defaults to the Python standard library of the running interpreter (the shipped model was
trained on it; calibration and evaluation are files it was not trained on). Windows of ``--seq``
tokens are cut from the token stream; the parent process tokenizes once and hands the same
windows to every rank.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HELP = "profile, plan and serve the shipped MoE model on local gloo ranks: alltoall vs specmoe"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", choices=("static", "dynamic"), default="static",
                   help="static (default): fixed windows through the model's forward; dynamic: the evaluation "
                        "text as a stream of requests of different lengths arriving over time, served by "
                        "Megatron-Core 0.19's DynamicInferenceEngine (continuous batching)")
    p.add_argument("--ranks", type=int, default=4, help="local processes (default 4)")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel size (default: --ranks, at most 4)")
    p.add_argument("--ep", type=int, default=None, help="expert-parallel size (default: --ranks)")
    p.add_argument("--model", choices=("gpt-moe", "deepseek-style"), default=None,
                   help="which shipped model: gpt-moe (default; 32 experts top-4, standard attention) or "
                        "deepseek-style (multi-latent attention, one shared expert, 64 experts top-6, "
                        "4 router groups top-2, expert-bias router)")
    p.add_argument("--checkpoint", metavar="DIR", default=None,
                   help="model folder with model.json, weights and tokenizer.json (default: the shipped model)")
    p.add_argument("--calib-text", nargs="+", metavar="FILE", help="calibration text files (default: stdlib split)")
    p.add_argument("--eval-text", nargs="+", metavar="FILE", help="evaluation text files (default: stdlib split)")
    p.add_argument("--calib-windows", type=int, default=96, help="calibration windows (default 96)")
    p.add_argument("--eval-windows", type=int, default=32,
                   help="evaluation windows (default 32); --engine dynamic: requests, one prompt cut from each")
    p.add_argument("--new-tokens", type=int, default=None,
                   help="--engine dynamic: most tokens a request generates; counts cycle over 2..N (default 32)")
    p.add_argument("--arrivals", type=int, default=None,
                   help="--engine dynamic: requests that arrive before each engine step (default 2)")
    p.add_argument("--seq", type=int, default=128, help="tokens per window (default 128, at most the model's)")
    p.add_argument("--batch", type=int, default=4, help="windows per forward per DP group (default 4)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed passes over the evaluation windows (default 2); the models take turns on every "
                        "batch and the forward time ratio is the median of the per-batch ratios; traffic counts "
                        "the first pass (static engine, not --synthetic)")
    p.add_argument("--predictor", choices=("route", "history", "pregate"), default="route",
                   help="runtime predictor: the plan's token table (route, default), the table combined with the "
                        "plan's route-history MLP on the routes carried between layers (history), or the "
                        "layer's router (pregate)")
    p.add_argument("--placement", default="search", help="expert grouping method (default search)")
    p.add_argument("--out-dir", default="specmoe-demo", help="plan, figure and JSON go here (default ./specmoe-demo)")
    p.add_argument("--json", metavar="PATH", help="write the numbers as JSON (default OUT_DIR/report.json)")
    p.add_argument("--figure", metavar="PATH", help="PNG of per-layer local activation rate (default OUT_DIR/lar.png)")
    p.add_argument("--synthetic", action="store_true",
                   help="random-weight model, random tokens, contiguous placement, no shuffle (fast check)")
    p.add_argument("--batches", type=int, default=4, help="--synthetic: forwards per dispatcher")
    p.add_argument("--experts", type=int, default=8, help="--synthetic: experts")
    p.add_argument("--topk", type=int, default=2, help="--synthetic: top-k")
    p.add_argument("--layers", type=int, default=2, help="--synthetic: layers")
    p.add_argument("--hidden", type=int, default=64, help="--synthetic: hidden size")
    p.add_argument("--seed", type=int, default=1234)


def _layout(args):
    from megatron_specmoe.artifacts.errors import SpecMoEUsageError
    from megatron_specmoe.artifacts.files import check_output_dir, check_output_file

    dynamic = args.engine == "dynamic"
    if args.repeats is not None and (dynamic or args.synthetic):
        raise SpecMoEUsageError("--repeats sets the timed passes of the static demo (profile -> plan -> serve)",
                                "leave out --repeats with --synthetic or --engine dynamic")
    if not dynamic:
        for flag in ("new_tokens", "arrivals"):
            if getattr(args, flag) is not None:
                raise SpecMoEUsageError(f"--{flag.replace('_', '-')} is a setting of the dynamic engine's request "
                                        "stream", f"add --engine dynamic or leave --{flag.replace('_', '-')} out")
    elif args.synthetic:
        raise SpecMoEUsageError("--synthetic serves random tokens with the static engine only",
                                "leave out --synthetic or --engine dynamic")
    if dynamic:
        args.new_tokens = 32 if args.new_tokens is None else args.new_tokens
        args.arrivals = 2 if args.arrivals is None else args.arrivals
    counts = ["ranks", "calib_windows", "eval_windows", "seq", "batch", "batches", "experts", "topk",
              "layers", "hidden", "new_tokens", "arrivals", "repeats"]
    for name in counts + ["tp", "ep"]:
        value = getattr(args, name)
        if value is not None and value < 1:
            flag = "--" + name.replace("_", "-")
            raise SpecMoEUsageError(f"{flag} {value}: must be >= 1", f"give a positive {flag} or leave it out")
    tp = args.tp if args.tp is not None else (1 if args.synthetic else min(args.ranks, 4))
    ep = args.ep or args.ranks
    problems = []
    if args.ranks % tp:
        problems.append(f"--tp {tp} must divide --ranks {args.ranks}")
    elif args.ranks % ep:
        problems.append(f"--ep {ep} must divide --ranks {args.ranks}")
    if not args.synthetic and ep % tp:
        problems.append(f"--ep {ep} must be a multiple of --tp {tp} (the TP group lies inside the EP group)")
    if args.synthetic and args.experts % ep:
        problems.append(f"--ep {ep} must divide --experts {args.experts} (equal experts per rank)")
    if args.synthetic and args.topk > args.experts:
        problems.append(f"--topk {args.topk} exceeds --experts {args.experts}")
    if dynamic and not problems and not tp == ep == args.ranks:
        problems.append(f"--engine dynamic runs one engine (DP = 1): --tp {tp} and --ep {ep} must equal --ranks "
                        f"{args.ranks}")
    if dynamic and not problems and tp < 2:
        problems.append("--engine dynamic compares the shuffle, which needs TP > 1 inside EP: --tp 1")
    if problems:
        raise SpecMoEUsageError("; ".join(problems), "change --ranks / --tp / --ep as said")
    # Each DP group runs whole batches of --batch windows; fewer windows than one batch per group
    # would leave a group (and the profile) empty.
    need = args.batch * (args.ranks // tp)
    for flag, value in (("--calib-windows", args.calib_windows), ("--eval-windows", args.eval_windows)):
        if not args.synthetic and value < need and not (dynamic and flag == "--eval-windows"):
            raise SpecMoEUsageError(f"{flag} {value} is fewer than one batch per DP group (--batch {args.batch} x "
                                    f"{args.ranks // tp} DP groups = {need})", f"raise {flag} to {need} or lower --batch")
    check_output_dir("--out-dir", args.out_dir)
    for flag, path in (("--json", args.json), ("--figure", args.figure)):
        if path is not None:
            check_output_file(flag, path)
    return tp, ep


def _windows(card, files, split: str, seq: int, count: int):
    """int64 [count, seq] windows from the token stream of ``files`` (or the corpus split)."""
    import numpy as np

    from megatron_specmoe.demo.corpus import CorpusFile, encode_files, load_tokenizer, read_corpus

    from megatron_specmoe.artifacts.errors import SpecMoEDataError, SpecMoEUsageError
    from megatron_specmoe.artifacts.files import check_input_file

    if not card.tokenizer_path:
        raise SpecMoEDataError(f"{card.directory}/model.json has no tokenizer_file",
                               "add the tokenizer to the checkpoint folder and name it in model.json")
    tokenizer = load_tokenizer(card.tokenizer_path)
    if files:
        docs = []
        for path in files:
            flag = "--calib-text" if split == "calibration" else "--eval-text"
            check_input_file(path, what=f"{flag} text file", fix=f"give {flag} UTF-8 text files")
            try:
                with open(path, encoding="utf-8") as f:
                    docs.append(CorpusFile(relpath=path, split=split, text=f.read()))
            except UnicodeDecodeError as exc:
                raise SpecMoEDataError(f"{flag} {path}: not UTF-8 text at byte {exc.start}",
                                       f"give {flag} UTF-8 text files") from None
    else:
        docs = list(read_corpus(splits=[split]).files)
    stream = np.concatenate([np.asarray(d, dtype=np.int64) for d in encode_files(tokenizer, docs, eot_id=max(card.eot_id, 0))])
    have = len(stream) // seq
    if have < count:
        raise SpecMoEUsageError(f"the {split} text has {len(stream)} tokens, {have} windows of {seq}; asked for {count}",
                                f"lower --{'calib' if split == 'calibration' else 'eval'}-windows or --seq")
    # Evenly spaced windows over the whole text, so that every file region is represented.
    starts = np.linspace(0, (have - 1) * seq, count).astype(np.int64) // seq * seq
    return np.stack([stream[s : s + seq] for s in starts])


def _report(result_runs, max_diff, tokens, args, extra: dict, same_tokens: bool = True) -> int:
    from megatron_specmoe.demo.report import add_paired_ratios, format_table, plot_layer_lar, run_summary

    summaries = [run_summary(r.name, r.reports, r.forward_s, tokens, r.a2a_s,
                             bytes_on_wire=r.bytes_on_wire) for r in result_runs]
    add_paired_ratios(summaries)
    print()
    dynamic = args.engine == "dynamic"
    print(format_table(summaries, max_diff, timed="engine step" if dynamic else "forward",
                       compared="generated tokens' log-probs" if dynamic else "logits"))
    command = "specmoe demo " + " ".join(sys.argv[2:])
    out = {"command": command, **extra, "lossless_max_abs_diff": max_diff,
           "dispatchers": {s["dispatcher"]: s for s in summaries}}
    os.makedirs(args.out_dir, exist_ok=True)
    json_path = args.json or os.path.join(args.out_dir, "report.json")
    fig_path = args.figure or os.path.join(args.out_dir, "lar.png")
    from megatron_specmoe.artifacts.files import atomic_file

    with atomic_file(json_path) as tmp:
        tmp.write_text(json.dumps(out, indent=2))
    plot_layer_lar(summaries, fig_path, title="Local activation rate per MoE layer (evaluation text)")
    print(f"\nwrote {json_path} and {fig_path}; command: {command}")
    # fp32: s-TS adds the residual inside the reduce-scatter, which changes the summation order.
    tol = 1e-4
    what = "generated tokens' log-probs" if dynamic else "logits"
    if max_diff > tol or not same_tokens:
        print(f"LOSSLESS CHECK FAILED: max |{what} diff| = {max_diff:.3e} (tolerance {tol})"
              + ("" if same_tokens else "; the generated tokens differ"), file=sys.stderr)
        return 1
    return 0


def _run_synthetic(args, tp, ep) -> int:
    from megatron_specmoe.testing.spawn import run_local
    from megatron_specmoe.megatron.build import MoEShape
    from megatron_specmoe.demo.serve import DemoSettings, serve_worker

    settings = DemoSettings(
        shape=MoEShape(hidden=args.hidden, ffn=args.hidden, experts=args.experts, topk=args.topk,
                       layers=args.layers, heads=4, vocab=256, seq=max(128, args.seq)),
        tp=tp, ep=ep, batches=args.batches, seq=args.seq, batch=args.batch, seed=args.seed,
    )
    print(f"[specmoe demo] synthetic model: starting {args.ranks} gloo ranks (TP={tp}, EP={ep}) ...", flush=True)
    result = run_local(serve_worker, args.ranks, settings)[0]
    extra = {"mode": "synthetic", "settings": {"ranks": args.ranks, "tp": tp, "ep": ep, "batches": args.batches,
                                               "seq": args.seq, "batch": args.batch, "experts": args.experts,
                                               "topk": args.topk, "layers": args.layers, "hidden": args.hidden}}
    return _report(result.runs, result.max_abs_diff, result.tokens, args, extra)


def run(args) -> int:
    if args.engine == "dynamic":
        from megatron_specmoe.demo.dynamic import check_engine

        check_engine()
    tp, ep = _layout(args)
    os.makedirs(args.out_dir, exist_ok=True)  # checked writable by _layout; the plan goes inside
    # The ranks import megatron before any code of ours runs in them; keep its import-time
    # warnings (no TransformerEngine, no apex: both expected here) out of the demo's output.
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    if args.synthetic:
        return _run_synthetic(args, tp, ep)
    from megatron_specmoe.testing.spawn import run_local
    from megatron_specmoe.megatron.checkpoint import read_card
    from megatron_specmoe.demo.pipeline import PipelineSettings, pipeline_worker

    start = time.perf_counter()
    from megatron_specmoe.artifacts.errors import SpecMoEDataError, SpecMoEUsageError

    if args.model is not None and args.checkpoint is not None:
        raise SpecMoEUsageError("--model and --checkpoint both given", "give --model (a shipped model) or "
                                "--checkpoint DIR, not both")
    if args.model is not None:
        from megatron_specmoe.megatron.checkpoint import demo_model_dir

        args.checkpoint = demo_model_dir(args.model)
    try:
        card = read_card(args.checkpoint)
    except SpecMoEDataError:
        raise
    except ValueError as exc:
        raise SpecMoEDataError(f"--checkpoint {args.checkpoint or '(the shipped model)'}: {exc}",
                               "point --checkpoint at a folder saved by save_checkpoint") from None
    from megatron_specmoe.megatron.checkpoint import sha256_file

    if sha256_file(card.weights_path) != card.weights_sha256:  # before any rank starts
        raise SpecMoEDataError(f"{card.weights_path}: sha256 does not match model.json field "
                               "'weights_sha256'; the weights are corrupt or belong to another card",
                               "re-save the checkpoint with save_checkpoint")
    if args.engine == "dynamic" and dict(card.config).get("multi_latent_attention"):
        raise SpecMoEUsageError(
            f"--engine dynamic with a multi-latent-attention model ({os.path.basename(card.directory)}): Megatron-Core's "
            "dynamic engine runs MLA only with its latent KV cache, which (in 0.19.2) fails with sequence "
            "parallelism at TP > 1, so the demo's alltoall reference could not run the way the shuffle does "
            "and its table would compare unlike runs",
            "use --engine static (the default) with this model")
    if card.shape.experts % ep:
        raise SpecMoEUsageError(f"--ep {ep} does not divide the model's {card.shape.experts} experts",
                                "choose an --ep that divides it")
    if card.shape.heads % tp:
        raise SpecMoEUsageError(f"--tp {tp} does not divide the model's {card.shape.heads} attention heads",
                                "choose a --tp that divides it")
    if args.seq > card.shape.seq:
        raise SpecMoEUsageError(f"--seq {args.seq} exceeds the model's sequence length {card.shape.seq}",
                                f"use --seq {card.shape.seq} or less")
    print(f"[specmoe demo] model {card.directory}: {card.shape.layers} MoE layers, {card.shape.experts} experts, "
          f"top-{card.shape.topk}, hidden {card.shape.hidden}", file=sys.stderr)
    calib = _windows(card, args.calib_text, "calibration", args.seq, args.calib_windows)
    evalu = _windows(card, args.eval_text, "evaluation", args.seq, args.eval_windows)
    if args.engine == "dynamic" and args.new_tokens > args.seq - 2:
        raise SpecMoEUsageError(f"--new-tokens {args.new_tokens} leaves no prompt in --seq {args.seq} tokens",
                                f"use --new-tokens {args.seq - 2} or less")
    # The plan folder goes inside --out-dir, which may not exist yet (its parent was checked).
    os.makedirs(args.out_dir, exist_ok=True)
    settings = PipelineSettings(
        model_dir=args.checkpoint, calib=calib, evalu=evalu, tp=tp, ep=ep, batch=args.batch,
        predictor=args.predictor, placement=args.placement,
        plan_dir=os.path.abspath(os.path.join(args.out_dir, "plan")), seed=args.seed,
        passes=2 if args.repeats is None else args.repeats,
    )
    if args.engine == "dynamic":
        return _run_dynamic(args, card, calib, evalu, settings, start)
    shared = (f"; each TP rank makes 1/{tp} of the route plans (ShuffleOptions.share_plans)"
              if args.predictor == "route" and tp > 1 else "")
    # The specmoe dispatcher's defaults on the CPU (SpecMoETokenDispatcher.set_fuse_probs,
    # set_count_exchange).
    shared += ("; specmoe's probs ride in its tokens' all-to-all (fuse_probs), its counts go by all-to-all "
               "(count_exchange)" if ep > 1 else "")
    print(f"[specmoe demo] {args.ranks} gloo ranks, TP={tp}, EP={ep}, sequence parallel{shared}; "
          f"{len(calib)} calibration and {len(evalu)} evaluation windows of {args.seq} tokens; timing: "
          f"{settings.warmup} warm-up rounds, then {settings.passes} passes, the models taking turns on each "
          "batch", file=sys.stderr)
    result = run_local(pipeline_worker, args.ranks, settings)[0]
    print(f"[specmoe demo] profile {result.profile_seconds:.1f}s ({result.profile_tokens} tokens), "
          f"plan {result.plan_seconds:.1f}s, total {time.perf_counter() - start:.1f}s", file=sys.stderr)
    extra = {"mode": "pipeline",
             "settings": {"ranks": args.ranks, "tp": tp, "ep": ep, "seq": args.seq, "batch": args.batch,
                          "calib_windows": len(calib), "eval_windows": len(evalu), "predictor": args.predictor,
                          "placement": args.placement, "checkpoint": card.directory},
             "profile": {"tokens": result.profile_tokens, "seconds": result.profile_seconds},
             "plan": {**result.plan_summary, "seconds": result.plan_seconds, "dir": settings.plan_dir},
             "timing": {"warmup_rounds": settings.warmup, "passes": settings.passes,
                        "forwards_per_dispatcher": len(result.serve.runs[0].forward_s),
                        "order": "the models take turns on each batch, the order reversed every step",
                        "ratio": "median over batches of each batch's forward time ratio to alltoall",
                        "gc": "objects existing before timing frozen (gc.freeze) while timing"}}
    return _report(result.serve.runs, result.serve.max_abs_diff, result.serve.tokens, args, extra)


def _run_dynamic(args, card, calib, evalu, settings, start) -> int:
    from megatron_specmoe.demo.dynamic import DynamicSettings, dynamic_worker, request_stream
    from megatron_specmoe.testing.spawn import run_local

    prompts, new_tokens, arrive = request_stream(evalu, requests=len(evalu),
                                                 min_prompt=min(max(2, args.seq // 16), args.seq - args.new_tokens),
                                                 max_new=args.new_tokens, per_step=args.arrivals)
    dynamic = DynamicSettings(pipeline=settings, prompts=prompts, new_tokens=new_tokens, arrive_step=arrive)
    lengths = [len(p) for p in prompts]
    print(f"[specmoe demo] {args.ranks} gloo ranks, TP=EP={settings.tp}, sequence parallel, Megatron's "
          f"DynamicInferenceEngine; {len(calib)} calibration windows of {args.seq} tokens; {len(prompts)} requests "
          f"(prompts {min(lengths)}-{max(lengths)} tokens, {min(new_tokens)}-{max(new_tokens)} new tokens, "
          f"{args.arrivals} arriving per step)", file=sys.stderr)
    result = run_local(dynamic_worker, args.ranks, dynamic)[0]
    print(f"[specmoe demo] profile {result.profile_seconds:.1f}s ({result.profile_tokens} tokens), "
          f"plan {result.plan_seconds:.1f}s, {result.steps} engine steps, total {time.perf_counter() - start:.1f}s",
          file=sys.stderr)
    extra = {"mode": "dynamic",
             "settings": {"ranks": args.ranks, "tp": settings.tp, "ep": settings.ep, "seq": args.seq,
                          "batch": args.batch, "calib_windows": len(calib), "eval_windows": len(evalu),
                          "predictor": args.predictor, "placement": args.placement, "checkpoint": card.directory,
                          "engine": "dynamic", "new_tokens": args.new_tokens, "arrivals": args.arrivals},
             "requests": {"count": result.requests, "prompt_tokens": lengths, "new_tokens": list(new_tokens),
                          "arrive_step": list(arrive), "generated_tokens": result.generated,
                          "engine_steps": result.steps},
             "lossless_same_tokens": result.same_tokens,
             "lossless_compares": "log-probs of the generated tokens, every request",
             "profile": {"tokens": result.profile_tokens, "seconds": result.profile_seconds},
             "plan": {**result.plan_summary, "seconds": result.plan_seconds, "dir": settings.plan_dir}}
    return _report(result.serve.runs, result.serve.max_abs_diff, result.serve.tokens, args, extra,
                   same_tokens=result.same_tokens)
