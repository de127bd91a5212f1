"""Megatron-LM's command line: ``--moe-token-dispatcher-type specmoe``, our flags, early checks.

Glossary
    provider: an ``extra_args_provider``, the ``f(parser) -> parser`` that Megatron-LM's
        ``parse_args`` calls after it has added its own arguments.
    layout, method, predictor: see ``megatron_lm/checks.py``. In short: the specmoe dispatcher
        shuffles tokens with TP > 1 inside EP (ETP = 1), places requests with DP attention (TP = 1),
        and refuses, before any GPU work, a command line where the method its layout selects
        cannot run, naming the setting and the change that makes it work.

Three ways in, from the least to the most invasive:

1. ``add_specmoe_args`` as the script's ``extra_args_provider`` (or ``compose(theirs)`` when the
   script already has one). It adds the ``specmoe`` argument group and adds ``'specmoe'`` to the
   choices of the existing ``--moe-token-dispatcher-type`` action. That action has a literal
   ``choices=[...]`` up to core 0.15 and a tuple generated from ``TransformerConfig``'s ``Literal``
   from core 0.16; both are widened the same way, on the parser only.
2. ``install_args_hook()`` (what ``specmoe-launch`` does): wraps Megatron-LM's ``parse_args`` so
   that every provider is composed with ours, and ``validate_args`` so that
   ``validate_specmoe_args`` runs right after Megatron's own checks (after
   ``--use-checkpoint-args`` has filled in the model shape, before any GPU work).
   ``uninstall_args_hook()`` restores both.
3. ``widen_dispatcher_literal()``: widens ``TransformerConfig.moe_token_dispatcher_type``'s
   ``Literal`` itself, for code that builds its parser from the dataclass before a provider can
   run. ``narrow_dispatcher_literal()`` reverts it.

All of them are idempotent. Nothing here runs at import time.

What ``validate_specmoe_args`` writes back into the args namespace, so that the model builder
(``megatron_lm/shuffle_hook.py``) and the runtime (``megatron_lm/runtime.py``) read one decision:
``specmoe_shuffle`` / ``specmoe_request_placement`` (the method) and ``specmoe_predictor`` (its
default filled in). Token shuffling needs Megatron's local linears (``--transformer-impl local``;
it runs under both Megatron inference contexts, static and dynamic), and none of ``--spec`` / MTP / context
parallelism / CUDA graphs / recomputation / ``--specmoe-record-routes`` / shared experts overlapped
with the dispatcher / pipeline stages with sequence parallelism (``checks.check_shuffle``). Request placement needs a
plan with a token table and megatron-core 0.19's DP coordinator (``checks.check_request_placement``).
A plan with redundant experts is served by DP attention only, without ``--moe-grouped-gemm``
(``checks.check_replicas``); the runtime builds the E + R-slot layers.
The shuffle layer is forward-only (it raises in training mode); a training script cannot be told
apart from an inference script here, so that is left to the layer.
"""

from __future__ import annotations

import argparse
import os
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional, get_args

__all__ = [
    "DISPATCHER",
    "PredictorName",
    "PREDICTORS_WITHOUT_PLAN",
    "SPECMOE_OPTION_STRINGS",
    "SpecMoEArgumentError",
    "SpecMoEArgsCheck",
    "add_specmoe_args",
    "compose",
    "validate_specmoe_args",
    "layout_problems",
    "num_moe_layers",
    "moe_layer_pattern",
    "shuffle_dense_layer_problem",
    "RUNTIME_PREDICTOR_OF",
    "Method",
    "layout_method",
    "widen_dispatcher_literal",
    "narrow_dispatcher_literal",
    "install_args_hook",
    "uninstall_args_hook",
    "is_args_hook_installed",
]

from megatron_specmoe.megatron_lm.checks import (
    DISPATCHER,
    DISPATCHER_FLAG,
    PREDICTORS_WITHOUT_PLAN,
    PLAN_KINDS,
    RUNTIME_PREDICTOR_OF,
    Method,
    PredictorName,
    RuntimePredictor,
    SpecMoEArgumentError,
    check_replicas,
    check_request_placement,
    check_shuffle,
    layout_method,
    layout_problems,
    moe_layer_pattern,
    num_moe_layers,
    read_plan,
    resolve_predictor,
    shuffle_dense_layer_problem,
    warn,
)

SPECMOE_OPTION_STRINGS: tuple[str, ...] = (
    "--specmoe-plan",
    "--specmoe-predictor",
    "--specmoe-record-routes",
    "--specmoe-record-every",
    "--specmoe-stats",
    "--specmoe-fallback-alltoall",
    "--specmoe-shuffle",
    "--specmoe-request-placement",
    "--specmoe-request-weight",
)

# (args attribute, Megatron flag, why the specmoe dispatcher cannot honour it)
_UNSUPPORTED: tuple[tuple[str, str, str], ...] = (
    (
        "moe_shared_expert_overlap",
        "--moe-shared-expert-overlap",
        "it overlaps the shared expert with the alltoall dispatcher's own communication "
        "schedule, which the specmoe dispatcher does not have",
    ),
    (
        "overlap_moe_expert_parallel_comm",
        "--overlap-moe-expert-parallel-comm",
        "its batch-level overlap schedule is written for the alltoall/flex dispatchers only",
    ),
    (
        "moe_pad_expert_input_to_capacity",
        "--moe-pad-expert-input-to-capacity",
        "padding every expert to capacity sends the padding over the all-to-all, which "
        "defeats keeping tokens local; for CUDA-graph decode use --moe-pad-experts-for-cuda-graph-inference, "
        "which pads only the graphed decode steps",
    ),
)


@dataclass(frozen=True, kw_only=True)
class SpecMoEArgsCheck:
    """What ``validate_specmoe_args`` decided.

    Attributes:
        active: the specmoe dispatcher will be built (``args.moe_token_dispatcher_type`` is
            ``'specmoe'``).
        fallback_reason: set when ``--specmoe-fallback-alltoall`` turned specmoe into ``alltoall``
            because the layout cannot benefit; the text says why.
        method: what the dispatcher turns on (``checks.Method``: "shuffle" or "requests"), or
            None when not active.
        predictor: ``--specmoe-predictor`` as resolved (its default filled in), or None when not
            active.
        plan: the plan directory, or None.
        shuffle: the shuffle layers' own predictor name ("pregate", "route", "history") when the
            method is "shuffle", else None.
    """

    active: bool
    fallback_reason: Optional[str] = None
    method: Optional[Method] = None
    predictor: Optional[str] = None
    plan: Optional[Path] = None
    shuffle: Optional[str] = None


# --------------------------------------------------------------------------- parser


def _dispatcher_action(parser: argparse.ArgumentParser) -> argparse.Action:
    action = parser._option_string_actions.get(DISPATCHER_FLAG)
    if action is None:
        raise ValueError(
            f"add_specmoe_args: the parser has no {DISPATCHER_FLAG}; it must run as Megatron-LM's "
            "extra_args_provider, after Megatron's own arguments were added"
        )
    return action


def _widen_choices(action: argparse.Action) -> None:
    """Add 'specmoe' to the action's choices: a list up to core 0.15, a tuple from 0.16."""
    if action.choices is None or DISPATCHER in action.choices:
        return
    if isinstance(action.choices, tuple):
        action.choices = tuple(action.choices) + (DISPATCHER,)
    else:
        action.choices = list(action.choices) + [DISPATCHER]


def add_specmoe_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM ``extra_args_provider``: the ``specmoe`` argument group plus ``'specmoe'`` as a
    choice of ``--moe-token-dispatcher-type``. Idempotent; returns ``parser``."""
    _widen_choices(_dispatcher_action(parser))
    if SPECMOE_OPTION_STRINGS[0] in parser._option_string_actions:
        return parser
    group = parser.add_argument_group(
        title="specmoe",
        description="Speculative MoE (megatron_specmoe). Active with "
        "--moe-token-dispatcher-type specmoe; --specmoe-record-routes works with any dispatcher.",
    )
    group.add_argument(
        "--specmoe-plan",
        type=str,
        default=None,
        metavar="DIR",
        help="Plan directory written by `specmoe plan` (expert placement and fitted predictors). "
        "Needed by every predictor except 'pregate'.",
    )
    group.add_argument(
        "--specmoe-predictor",
        type=str,
        choices=get_args(PredictorName),
        default=None,
        help="What the method predicts each token's experts with: 'token' (the plan's token-id "
        "table), 'combined' (the plan's combined predictor, members token and history), 'history' "
        "(the plan's classifier over the earlier layers' routes; token shuffling only), 'pregate' "
        "(the layer's router on its input; needs no plan; token shuffling only). 'layer' has no "
        "run-time form and is refused. Request placement (TP = 1) takes 'token'. Default: the "
        "plan's first predictor, or 'pregate' without a plan.",
    )
    group.add_argument(
        "--specmoe-record-routes",
        type=str,
        default=None,
        metavar="DIR",
        help="Calibration: write every MoE layer's routes (top-k experts per token, with token "
        "ids) to DIR, one file per rank, for `specmoe plan`. Works with any dispatcher.",
    )
    group.add_argument(
        "--specmoe-record-every",
        type=int,
        default=0,
        metavar="N",
        help="With --specmoe-record-routes: write a trace part every N model forwards (bounds "
        "the memory of long runs); 0 (default) writes once at exit.",
    )
    group.add_argument(
        "--specmoe-stats",
        type=str,
        default=None,
        metavar="PATH",
        help="Write per-layer measures (local activation rate, remote pairs per token, "
        "prediction accuracy) as JSON lines to PATH at exit; '{rank}' in PATH is replaced by "
        "the global rank.",
    )
    group.add_argument(
        "--specmoe-fallback-alltoall",
        action="store_true",
        default=False,
        help="If the parallel layout gives the specmoe dispatcher nothing to do (EP = 1, ETP > 1, "
        "or the TP group not inside one EP group), run the plain alltoall dispatcher with a "
        "warning instead of stopping with an error.",
    )
    group.add_argument(
        "--specmoe-shuffle",
        action="store_true",
        default=False,
        help="Assert speculative token shuffling, which the specmoe dispatcher turns on by itself "
        "with TP > 1 inside EP: the MoE transformer layers become ShuffleTransformerLayer (tokens "
        "move to the TP rank hosting their predicted experts inside attention's own TP "
        "collectives). With it, a layout that would place requests instead (TP = 1) is an error. "
        "Inference only; needs --transformer-impl local.",
    )
    group.add_argument(
        "--specmoe-request-placement",
        action="store_true",
        default=False,
        help="Assert request placement, which the specmoe dispatcher turns on by itself with DP "
        "attention (TP = 1) under Megatron's dynamic engine (core >= 0.19): its data-parallel "
        "coordinator places each request on the DP rank whose experts the prompt is predicted to "
        "use, weighed against free request slots (megatron_lm/dp_coordinator.py). Needs "
        "--specmoe-plan with a 'token' predictor. With it, TP > 1 is an error.",
    )
    group.add_argument(
        "--specmoe-request-weight",
        type=float,
        default=0.5,
        help="Request placement: share of the score given to expert affinity, in "
        "[0, 1] (0 = Megatron's least-loaded routing; default 0.5).",
    )
    return parser


def compose(
    existing: Optional[Callable[[argparse.ArgumentParser], Any]] = None,
) -> Callable[[argparse.ArgumentParser], argparse.ArgumentParser]:
    """An ``extra_args_provider`` that runs ``existing`` (the script's own, if any) and then
    ``add_specmoe_args``. Composing an already composed provider returns it unchanged."""
    if existing is None or existing is add_specmoe_args:
        return add_specmoe_args
    if getattr(existing, "__specmoe_composed__", False):
        return existing

    def provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        out = existing(parser)
        return add_specmoe_args(parser if out is None else out)

    provider.__specmoe_composed__ = True
    provider.__wrapped__ = existing
    provider.__name__ = f"specmoe_compose({getattr(existing, '__name__', 'provider')})"
    return provider

# --------------------------------------------------------------------------- checks


def validate_specmoe_args(args: argparse.Namespace) -> SpecMoEArgsCheck:
    """Check a parsed Megatron-LM command line before any GPU work and decide the method.

    Raises ``SpecMoEArgumentError`` (a ValueError) naming the flag and the fix. When the layout
    gives the dispatcher nothing to do and ``--specmoe-fallback-alltoall`` is set, sets
    ``args.moe_token_dispatcher_type = 'alltoall'`` and ``args.specmoe_fallback_reason``, and
    warns on stderr (rank 0). Otherwise sets ``args.specmoe_shuffle``,
    ``args.specmoe_request_placement`` and ``args.specmoe_predictor`` to the decision (module
    docstring). Calling it again on the same args gives the same answer.
    """
    dispatcher = getattr(args, "moe_token_dispatcher_type", None)
    plan = getattr(args, "specmoe_plan", None)
    stats = getattr(args, "specmoe_stats", None)
    previous_fallback = getattr(args, "specmoe_fallback_reason", None)
    if not hasattr(args, "specmoe_plan"):
        raise SpecMoEArgumentError(
            "the command line was parsed without the specmoe flags: pass "
            "megatron_specmoe.megatron_lm.args.add_specmoe_args as extra_args_provider (or "
            "compose(yours)), or start the script with specmoe-launch"
        )
    every = getattr(args, "specmoe_record_every", 0) or 0
    if every < 0 or (every and not getattr(args, "specmoe_record_routes", None)):
        raise SpecMoEArgumentError(
            f"--specmoe-record-every {every}: must be >= 0 and needs --specmoe-record-routes DIR "
            "(it says how often to write the recorded routes)"
        )
    shuffle = bool(getattr(args, "specmoe_shuffle", False))
    requests = bool(getattr(args, "specmoe_request_placement", False))
    if shuffle and requests:
        raise SpecMoEArgumentError(
            "--specmoe-shuffle and --specmoe-request-placement: the layout selects one (TP > 1 "
            "shuffles tokens, TP = 1 places requests); drop the one that does not match"
        )

    if dispatcher != DISPATCHER:
        if previous_fallback is not None:
            return SpecMoEArgsCheck(active=False, fallback_reason=previous_fallback)
        given = [f for f, v in (("--specmoe-plan", plan), ("--specmoe-stats", stats),
                                ("--specmoe-shuffle", shuffle), ("--specmoe-request-placement", requests),
                                ("--specmoe-predictor", getattr(args, "specmoe_predictor", None))) if v]
        if given:
            raise SpecMoEArgumentError(
                f"{' and '.join(given)} only apply to the specmoe dispatcher, but "
                f"{DISPATCHER_FLAG} is {dispatcher!r}: add {DISPATCHER_FLAG} {DISPATCHER} or "
                "drop them (for calibration runs use --specmoe-record-routes alone)"
            )
        return SpecMoEArgsCheck(active=False)

    # 1. An MoE model at all.
    if getattr(args, "num_experts", None) is None:
        raise SpecMoEArgumentError(
            f"{DISPATCHER_FLAG} {DISPATCHER} needs an MoE model, but --num-experts is not set"
        )

    # 2. Settings the specmoe dispatcher does not implement: always an error (the user chose them).
    bad = [f"{flag}: {why}" for attr, flag, why in _UNSUPPORTED if getattr(args, attr, False)]
    if bad:
        raise SpecMoEArgumentError(
            f"{DISPATCHER_FLAG} {DISPATCHER} does not support " + "; ".join(bad)
            + ". Drop these flags, or use the alltoall dispatcher."
        )

    # 3. Layouts that give the dispatcher nothing to do: error, or alltoall if the user asked for it.
    problems = layout_problems(args)
    if problems:
        reason = "the specmoe dispatcher can do nothing on this layout: " + "; ".join(problems)
        if not getattr(args, "specmoe_fallback_alltoall", False) or shuffle or requests:
            asked = [f for f, v in (("--specmoe-shuffle", shuffle), ("--specmoe-request-placement", requests)) if v]
            raise SpecMoEArgumentError(
                reason + (f". Fix the layout ({asked[0]} asks for the method, so "
                          "--specmoe-fallback-alltoall does not apply)" if asked else
                          ". Fix the layout, or pass --specmoe-fallback-alltoall to run the plain "
                          "alltoall dispatcher instead.")
            )
        args.moe_token_dispatcher_type = "alltoall"
        args.specmoe_fallback_reason = reason
        warn(f"falling back to alltoall: {reason}")
        return SpecMoEArgsCheck(active=False, fallback_reason=reason)

    # 4. The method the layout selects, and the flags that assert one.
    method = layout_method(args)
    tp = int(getattr(args, "tensor_model_parallel_size", 1) or 1)
    if requests and method == "shuffle":
        raise SpecMoEArgumentError(
            f"--specmoe-request-placement places whole requests for DP attention (--tensor-model-parallel-size "
            f"1), but TP is {tp}; with TP > 1 the specmoe dispatcher shuffles tokens inside the TP group "
            "instead: drop --specmoe-request-placement, or use --tensor-model-parallel-size 1"
        )
    if shuffle and method == "requests":
        raise SpecMoEArgumentError(
            "--specmoe-shuffle with --tensor-model-parallel-size 1: tokens can only be shuffled inside "
            "an attention tensor-parallel group, and a group of one rank cannot move them. Use TP > 1 "
            "(a divisor of EP), or drop --specmoe-shuffle: with DP attention the specmoe dispatcher "
            "places requests instead"
        )

    # 5. The plan (made for this model and layout) and the predictor.
    plan_dir = Path(plan) if plan else None
    plan_obj = read_plan(args, plan_dir) if plan_dir is not None else None
    check_replicas(args, method, plan_obj, plan_dir)
    predictor = resolve_predictor(args, method, plan_obj, plan_dir)

    # 6. The method's own checks; then the decision goes back into args.
    shuffle_predictor = None
    if method == "shuffle":
        shuffle_predictor = check_shuffle(args, predictor)
    else:
        check_request_placement(args, predictor, plan_obj, plan_dir)
    args.specmoe_predictor = predictor
    args.specmoe_shuffle = method == "shuffle"
    args.specmoe_request_placement = method == "requests"
    return SpecMoEArgsCheck(active=True, method=method, predictor=predictor, plan=plan_dir,
                            shuffle=shuffle_predictor)


# --------------------------------------------------------------------------- config Literal


def _transformer_config() -> type:
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig


def _set_literal(config_cls: type, values: tuple[str, ...]) -> None:
    field = config_cls.__dataclass_fields__["moe_token_dispatcher_type"]
    new_type = Literal[values]  # type: ignore[valid-type]
    field.type = new_type
    for cls in config_cls.__mro__:
        if "moe_token_dispatcher_type" in cls.__dict__.get("__annotations__", {}):
            cls.__annotations__["moe_token_dispatcher_type"] = new_type


def _literal_values(config_cls: type) -> tuple[str, ...]:
    field = config_cls.__dataclass_fields__["moe_token_dispatcher_type"]
    if typing.get_origin(field.type) is not Literal:
        raise ValueError(
            f"{config_cls.__name__}.moe_token_dispatcher_type is typed {field.type!r}, not a "
            "Literal: this megatron-core needs no widening (its parser has literal choices)"
        )
    return tuple(get_args(field.type))


def widen_dispatcher_literal(config_cls: Optional[type] = None) -> bool:
    """Add 'specmoe' to ``TransformerConfig.moe_token_dispatcher_type``'s ``Literal`` (core 0.16+,
    where Megatron-LM generates the argparse choices from it). Subclasses share the field.
    Returns True if it changed anything."""
    config_cls = config_cls or _transformer_config()
    values = _literal_values(config_cls)
    if DISPATCHER in values:
        return False
    _set_literal(config_cls, values + (DISPATCHER,))
    return True


def narrow_dispatcher_literal(config_cls: Optional[type] = None) -> bool:
    """Undo ``widen_dispatcher_literal``. Returns True if it changed anything."""
    config_cls = config_cls or _transformer_config()
    values = _literal_values(config_cls)
    if DISPATCHER not in values:
        return False
    _set_literal(config_cls, tuple(v for v in values if v != DISPATCHER))
    return True


# --------------------------------------------------------------------------- parse_args hook

# The record lives on megatron.training.arguments itself (no global state here):
# {"functions": {name: (original, wrapped)}, "patched": ["module.name", ...]}.
_HOOK_RECORD = "__specmoe_args_hook__"


def _arguments_module():
    try:
        import megatron.training.arguments as arguments
    except ImportError as exc:
        raise ImportError(
            f"megatron.training is not importable ({exc}). It ships in the megatron-core wheel "
            "from 0.19 (older wheels have only megatron.core): run from a Megatron-LM checkout "
            "or put its root on PYTHONPATH."
        ) from exc
    return arguments


def _hooked_parse_args(original: Callable) -> Callable:
    def parse_args(*pargs, **kwargs):
        if pargs:
            pargs = (compose(pargs[0]),) + tuple(pargs[1:])
        else:
            kwargs["extra_args_provider"] = compose(kwargs.get("extra_args_provider"))
        return original(*pargs, **kwargs)

    parse_args.__wrapped__ = original
    parse_args.__doc__ = original.__doc__
    return parse_args


def _hooked_validate_args(original: Callable) -> Callable:
    def validate_args(args, *pargs, **kwargs):
        out = original(args, *pargs, **kwargs)
        validate_specmoe_args(args)
        return out

    validate_args.__wrapped__ = original
    validate_args.__doc__ = original.__doc__
    return validate_args


def install_args_hook() -> list[str]:
    """Wrap Megatron-LM's ``parse_args`` (every provider gets composed with ours) and
    ``validate_args`` (``validate_specmoe_args`` runs after Megatron's checks), in
    ``megatron.training.arguments`` and in every loaded megatron module that imported them by
    name (e.g. ``initialize.py`` up to core 0.15). Modules imported later import the wrapped
    functions. Idempotent. Returns the patched ``module.attribute`` names."""
    arguments = _arguments_module()
    record = arguments.__dict__.get(_HOOK_RECORD)
    if record is not None:
        return sorted(record["patched"])
    record = {"functions": {}, "patched": []}
    for name, make in (("parse_args", _hooked_parse_args), ("validate_args", _hooked_validate_args)):
        original = getattr(arguments, name)
        wrapped = make(original)
        record["functions"][name] = (original, wrapped)
        for modname, module in list(sys.modules.items()):
            if module is None or not (modname == "megatron" or modname.startswith("megatron.")):
                continue
            if getattr(module, "__dict__", {}).get(name) is original:
                setattr(module, name, wrapped)
                record["patched"].append(f"{modname}.{name}")
    setattr(arguments, _HOOK_RECORD, record)
    return sorted(record["patched"])


def uninstall_args_hook() -> None:
    """Restore what ``install_args_hook`` replaced, also in modules (scripts included) that
    imported the wrapped functions after it was installed. Idempotent."""
    arguments = sys.modules.get("megatron.training.arguments")
    record = None if arguments is None else arguments.__dict__.get(_HOOK_RECORD)
    if record is None:
        return
    for name, (original, wrapped) in record["functions"].items():
        for module in list(sys.modules.values()):
            namespace = getattr(module, "__dict__", None)
            if namespace is not None and namespace.get(name) is wrapped:
                setattr(module, name, original)
    delattr(arguments, _HOOK_RECORD)


def is_args_hook_installed() -> bool:
    """Whether ``install_args_hook`` is in effect (False when megatron.training is not loaded)."""
    arguments = sys.modules.get("megatron.training.arguments")
    return arguments is not None and _HOOK_RECORD in arguments.__dict__
