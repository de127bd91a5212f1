"""Megatron-LM's command line: ``--moe-token-dispatcher-type specmoe``, our flags, early checks.

Glossary
    provider: an ``extra_args_provider``, the ``f(parser) -> parser`` that Megatron-LM's
        ``parse_args`` calls after it has added its own arguments.
    layout: the parallel sizes TP (attention tensor parallel), EP (expert parallel), ETP (expert
        tensor parallel). Token shuffling needs the attention TP group inside one EP group with
        ETP = 1 (MoE parallel folding), e.g. TP = EP = 8 on one node, or TP = 4, EP = 8.

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

``--specmoe-shuffle`` (speculative token shuffling, ``megatron/shuffle_layer.py``; the model side is
``megatron_lm/shuffle_hook.py``) is checked here too, before any GPU work, because the shuffle layer
would otherwise refuse only once the model is built (or, for some settings, at its first forward):
it needs the specmoe dispatcher on a layout where shuffling helps, Megatron's local linears
(``--transformer-impl local``: Megatron-LM's default ``transformer_engine`` is refused), no
``--spec`` / MTP / multi-latent attention / context parallelism / CUDA graphs / recomputation /
``--specmoe-record-routes`` (routes would not line up with token ids) /
``--inference-dynamic-batching`` (the layer runs on the static inference context only; without
``--use-legacy-static-engine`` core 0.19's static engine uses the dynamic context too, which stderr
warns about), no pipeline stages with
sequence parallelism, no shared experts with TP > 1, and, with sequence
parallelism or the "history" predictor, no dense layer after an MoE layer
(``shuffle_dense_layer_problem``). The predictors ``route`` and ``history`` need ``--specmoe-plan``
with a token table, resp. a combined (token + history) or history predictor.

``--specmoe-request-placement`` (DP attention, TP = 1; ``megatron_lm/dp_coordinator.py``) needs the
specmoe dispatcher, ``--specmoe-plan`` with a token table and megatron-core 0.19's DP coordinator;
with it, TP = 1 is not a layout problem. The layer is forward-only (it raises in
training mode); a training script cannot be told apart from an inference script here, so that is
left to the layer.
"""

from __future__ import annotations

import argparse
import os
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional, get_args

from megatron_specmoe.artifacts.errors import SpecMoEArgumentError
from megatron_specmoe.predict.vocabulary import PLAN_KINDS, RuntimePredictor
from megatron_specmoe.megatron.shuffle_refusals import (
    launcher_refusals,
    launcher_sentences,
    moe_layer_pattern as _moe_layer_pattern,
    shuffle_dense_layer_problem,
)

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
    "widen_dispatcher_literal",
    "narrow_dispatcher_literal",
    "install_args_hook",
    "uninstall_args_hook",
    "is_args_hook_installed",
]

DISPATCHER = "specmoe"
DISPATCHER_FLAG = "--moe-token-dispatcher-type"

PredictorName = Literal["token", "layer", "history", "combined", "pregate"]
# The pre-attention gate reuses the model's own router weights: it needs no calibration, so no plan.
PREDICTORS_WITHOUT_PLAN: frozenset[str] = frozenset({"pregate"})
DEFAULT_PREDICTOR: PredictorName = "combined"
# What the shuffle layers predict with (--specmoe-shuffle-predictor): the layer's own router on its
# input, the plan's token table on the token ids ("route" needs the plan's "token" predictor), or
# the plan's token table combined with its route-history MLP on the routes carried between layers
# ("history" needs a "combined" (token + history) or a "history" predictor).
# --specmoe-shuffle-predictor takes predict.vocabulary.RuntimePredictor; the plan kinds each needs
# are predict.vocabulary.PLAN_KINDS (empty for pregate).

SPECMOE_OPTION_STRINGS: tuple[str, ...] = (
    "--specmoe-plan",
    "--specmoe-predictor",
    "--specmoe-record-routes",
    "--specmoe-record-every",
    "--specmoe-stats",
    "--specmoe-fallback-alltoall",
    "--specmoe-shuffle",
    "--specmoe-shuffle-predictor",
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
        "defeats keeping tokens local",
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
        predictor: the predictor name, or None when not active.
        plan: the plan directory, or None.
        shuffle: the shuffle layers' predictor (``--specmoe-shuffle-predictor``) when
            ``--specmoe-shuffle`` is on, else None.
    """

    active: bool
    fallback_reason: Optional[str] = None
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
        default=DEFAULT_PREDICTOR,
        help="How a token's experts are guessed before the gate: 'token' (token-id table), "
        "'layer' (table over the previous layers' routes), 'history' (classifier over all "
        "previous layers' routes), 'combined' (the more confident of token and history), "
        f"'pregate' (the layer's router on its input; needs no plan). Default: {DEFAULT_PREDICTOR}.",
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
        help="If the parallel layout cannot benefit from token shuffling (EP = 1, TP = 1, ETP > 1, "
        "or the TP group not inside one EP group), run the plain alltoall dispatcher with a "
        "warning instead of stopping with an error. Does not apply to --specmoe-shuffle.",
    )
    group.add_argument(
        "--specmoe-shuffle",
        action="store_true",
        default=False,
        help="Speculative token shuffling: the MoE transformer layers become ShuffleTransformerLayer "
        "(tokens are moved to the TP rank hosting their predicted experts inside attention's own "
        "TP collectives, so the expert all-to-all carries mostly mispredictions). Inference only "
        "(forward-only; the layer raises in training mode). Needs --moe-token-dispatcher-type "
        "specmoe and --transformer-impl local.",
    )
    group.add_argument(
        "--specmoe-shuffle-predictor",
        type=str,
        choices=get_args(RuntimePredictor),
        default="pregate",
        help="With --specmoe-shuffle: 'pregate' (default; the layer's router on its input, no "
        "plan needed), 'route' (the plan's token table on the token ids; needs --specmoe-plan "
        "with a 'token' predictor) or 'history' (the plan's token table combined with its "
        "route-history MLP on the routes carried between layers; needs --specmoe-plan with a "
        "'combined' or 'history' predictor). With --specmoe-shuffle, --specmoe-predictor is not used.",
    )
    group.add_argument(
        "--specmoe-request-placement",
        action="store_true",
        default=False,
        help="DP attention (TP = 1) serving with Megatron's dynamic engine (core >= 0.19): its data-"
        "parallel coordinator places each request on the DP rank whose experts the prompt is "
        "predicted to use, weighed against free request slots (megatron_lm/dp_coordinator.py). Needs "
        "--specmoe-plan with a 'token' predictor.",
    )
    group.add_argument(
        "--specmoe-request-weight",
        type=float,
        default=0.5,
        help="With --specmoe-request-placement: share of the score given to expert affinity, in "
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


def num_moe_layers(args: argparse.Namespace) -> Optional[int]:
    """MoE layers in the whole model from ``--num-layers`` and ``--moe-layer-freq`` (an int N:
    layers 0, N, 2N, ... are MoE; or a 0/1 list), or None when ``--num-layers`` is unknown."""
    num_layers = getattr(args, "num_layers", None)
    if num_layers is None:
        return None
    freq = getattr(args, "moe_layer_freq", 1)
    if freq is None:
        freq = 1
    if isinstance(freq, int):
        return len(range(0, num_layers, freq))
    pattern = list(freq)
    if len(pattern) != num_layers:
        raise SpecMoEArgumentError(
            f"--moe-layer-freq lists {len(pattern)} layers but --num-layers is {num_layers}"
        )
    return int(sum(1 for x in pattern if x))


def moe_layer_pattern(num_layers: int, freq: Any, *,
                      names: tuple[str, str] = ("--moe-layer-freq", "--num-layers")) -> list[int]:
    """``model_tools.moe_layer_pattern`` with its error as a SpecMoEArgumentError (flag names)."""
    try:
        return _moe_layer_pattern(num_layers, freq, names=names)
    except ValueError as exc:
        raise SpecMoEArgumentError(str(exc)) from None




def layout_problems(args: argparse.Namespace) -> list[str]:
    """Why token shuffling cannot help this parallel layout (empty when it can).

    ETP unset means ETP = TP, Megatron-LM's default."""
    tp = int(getattr(args, "tensor_model_parallel_size", 1) or 1)
    ep = int(getattr(args, "expert_model_parallel_size", 1) or 1)
    etp = getattr(args, "expert_tensor_parallel_size", None)
    etp = tp if etp is None else int(etp)
    problems = []
    if ep == 1:
        problems.append(
            "--expert-model-parallel-size is 1: every rank holds every expert, there is no "
            "expert all-to-all to shrink"
        )
    # TP = 1 is DP attention: tokens cannot move, but --specmoe-request-placement places whole
    # requests on the DP (= EP) rank whose experts they are predicted to use.
    if tp == 1 and not getattr(args, "specmoe_request_placement", False):
        problems.append(
            "--tensor-model-parallel-size is 1: tokens can only be shuffled inside an attention "
            "tensor-parallel group, and a group of one rank cannot move them (for DP attention use "
            "--specmoe-request-placement, which places whole requests instead)"
        )
    if etp != 1:
        problems.append(
            f"expert tensor parallel size is {etp} (Megatron-LM uses TP when "
            "--expert-tensor-parallel-size is not given): the specmoe dispatcher needs whole "
            "experts per rank; pass --expert-tensor-parallel-size 1"
        )
    if tp > 1 and ep > 1 and ep % tp != 0:
        problems.append(
            f"the attention TP group ({tp} ranks) is not inside one EP group ({ep} ranks): a token "
            "shuffled to another TP rank would land in another EP group; make EP a multiple of TP "
            "(e.g. TP=4, EP=8)"
        )
    return problems


def _check_plan(args: argparse.Namespace, plan_dir: Path, predictor: str,
                flag: Optional[str] = None, any_of: tuple[str, ...] = ()) -> None:
    """Read the plan (artifacts/plan_folder.py checks its format and checksum) and compare its shape with
    the command line: MoE layers, experts, top-k, EP size, and vocabulary / hidden size when both
    sides know them (the padded vocabulary is known only after the tokenizer is built)."""
    if not plan_dir.is_dir():
        raise SpecMoEArgumentError(
            f"--specmoe-plan {plan_dir}: no such directory; write it with `specmoe plan` "
            "(see recipes/README.md)"
        )
    from megatron_specmoe.artifacts.plan_folder import load_plan  # pure numpy, cheap

    try:
        plan = load_plan(plan_dir)
        plan.check_compatible(
            num_layers=num_moe_layers(args),
            num_experts=getattr(args, "num_experts", None),
            topk=getattr(args, "moe_router_topk", None),
            ep_size=getattr(args, "expert_model_parallel_size", None),
            vocab_size=getattr(args, "padded_vocab_size", None),
            hidden_size=getattr(args, "hidden_size", None),
        )
    except ValueError as exc:
        raise SpecMoEArgumentError(f"--specmoe-plan {plan_dir}: {exc}") from exc
    kinds = tuple(plan.header.predictor_kinds)
    wanted = any_of or (predictor,)
    if flag is not None and not set(wanted) & set(kinds):
        raise SpecMoEArgumentError(
            f"{flag}: the plan {plan_dir} holds no {' or '.join(repr(k) for k in wanted)} predictor "
            f"(it has {', '.join(kinds) if kinds else 'none'}); re-run `specmoe plan` with predictor "
            f"{wanted[0]}" + (", or use --specmoe-shuffle-predictor pregate" if "shuffle" in flag else "")
        )
    if flag is not None:
        return
    if predictor not in PREDICTORS_WITHOUT_PLAN and predictor not in kinds:
        raise SpecMoEArgumentError(
            f"--specmoe-predictor {predictor}: the plan {plan_dir} holds no such predictor (it has "
            f"{', '.join(kinds) if kinds else 'none'}); choose one of those, or re-run `specmoe "
            f"plan` with predictor {predictor}"
        )


def _check_shuffle(args: argparse.Namespace, plan: Optional[str]) -> str:
    """The ``--specmoe-shuffle`` checks that need no GPU (the dispatcher is specmoe and the layout
    sound by now); returns the shuffle predictor. See the module docstring."""
    predictor = getattr(args, "specmoe_shuffle_predictor", None) or "pregate"
    if predictor not in get_args(RuntimePredictor):
        raise SpecMoEArgumentError(
            f"--specmoe-shuffle-predictor {predictor}: choose one of {get_args(RuntimePredictor)}"
        )
    impl = getattr(args, "transformer_impl", "local")
    if impl != "local":
        raise SpecMoEArgumentError(
            f"--specmoe-shuffle with --transformer-impl {impl} (Megatron-LM's default is "
            "transformer_engine): the shuffle layer's TransformerEngine linears (megatron/te_shuffle.py) "
            "have not been verified on a GPU yet (tools/gpu_check.sh does that), so the launcher does "
            "not build them. Pass --transformer-impl local"
        )
    sentences = launcher_sentences(args)
    if sentences:
        raise SpecMoEArgumentError(sentences[0])
    bad = launcher_refusals(args)
    if bad:
        raise SpecMoEArgumentError(
            "--specmoe-shuffle does not support " + "; ".join(bad) + ". Drop these flags, or drop "
            "--specmoe-shuffle"
        )
    if getattr(args, "specmoe_record_routes", None):
        raise SpecMoEArgumentError(
            f"--specmoe-record-routes {args.specmoe_record_routes} with --specmoe-shuffle: each rank "
            "routes the tokens the shuffle moved to it, so the recorded routes would not line up with "
            "the batch's token ids. Record routes in a run without --specmoe-shuffle (calibration "
            "needs no shuffling)"
        )
    sp = bool(getattr(args, "sequence_parallel", False))
    num_layers = getattr(args, "num_layers", None)
    if num_layers is not None:
        problem = shuffle_dense_layer_problem(
            moe_layer_pattern(int(num_layers), getattr(args, "moe_layer_freq", 1)),
            sequence_parallel=sp, predictor=predictor)
        if problem:
            raise SpecMoEArgumentError(problem)
    if hasattr(args, "use_legacy_static_engine") and not args.use_legacy_static_engine and _rank0():
        print("specmoe: --specmoe-shuffle: Megatron-LM's inference engines (core 0.19) run on the "
              "dynamic inference context unless --use-legacy-static-engine is given, and the shuffle "
              "layer refuses that context at its first forward; pass --use-legacy-static-engine to "
              "scripts that build a StaticInferenceEngine", file=sys.stderr)
    if PLAN_KINDS[predictor] and plan is None:
        raise SpecMoEArgumentError(
            f"--specmoe-shuffle-predictor {predictor} needs --specmoe-plan DIR with a "
            f"{' or '.join(repr(k) for k in PLAN_KINDS[predictor])} predictor (made by `specmoe "
            "plan`); without a plan use --specmoe-shuffle-predictor pregate"
        )
    return predictor


def _check_request_placement(args: argparse.Namespace, dispatcher: Optional[str], plan: Optional[str]) -> None:
    """``--specmoe-request-placement``: DP attention (TP = 1) with the specmoe dispatcher, a plan
    holding a token table, a weight in [0, 1], and a Megatron-Core whose DP coordinator takes a
    per-request routing decision (0.19)."""
    flag = "--specmoe-request-placement"
    weight = getattr(args, "specmoe_request_weight", 0.5)
    if not 0.0 <= float(weight) <= 1.0:
        raise SpecMoEArgumentError(f"--specmoe-request-weight {weight}: must be in [0, 1] (0 = least-loaded)")
    if dispatcher != DISPATCHER:
        raise SpecMoEArgumentError(
            f"{flag} needs {DISPATCHER_FLAG} {DISPATCHER} (the plan's expert placement must be applied "
            "for the predicted affinities to hold)"
        )
    tp = int(getattr(args, "tensor_model_parallel_size", 1) or 1)
    if tp != 1:
        raise SpecMoEArgumentError(
            f"{flag} places whole requests for DP attention (--tensor-model-parallel-size 1), but TP is "
            f"{tp}; with TP > 1 tokens move inside the TP group instead: use --specmoe-shuffle"
        )
    if plan is None:
        raise SpecMoEArgumentError(f"{flag} needs --specmoe-plan DIR with a 'token' predictor (made by `specmoe plan`)")
    try:
        from megatron_specmoe.megatron_lm.dp_coordinator import _coordinator_class

        _coordinator_class()
    except ImportError as exc:
        raise SpecMoEArgumentError(f"{flag}: {exc}") from None
    plan_dir = Path(plan)
    _check_plan(args, plan_dir, "token", flag=flag, any_of=("token",))


def _rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def validate_specmoe_args(args: argparse.Namespace) -> SpecMoEArgsCheck:
    """Check a parsed Megatron-LM command line before any GPU work.

    Raises ``SpecMoEArgumentError`` (a ValueError) naming the flag and the fix. When the layout
    cannot benefit and ``--specmoe-fallback-alltoall`` is set, sets
    ``args.moe_token_dispatcher_type = 'alltoall'`` and ``args.specmoe_fallback_reason``, and
    warns on stderr (rank 0). Calling it again on the same args gives the same answer.
    """
    dispatcher = getattr(args, "moe_token_dispatcher_type", None)
    plan = getattr(args, "specmoe_plan", None)
    stats = getattr(args, "specmoe_stats", None)
    predictor = getattr(args, "specmoe_predictor", DEFAULT_PREDICTOR)
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
    if shuffle and dispatcher != DISPATCHER:
        raise SpecMoEArgumentError(
            f"--specmoe-shuffle needs the specmoe dispatcher, but {DISPATCHER_FLAG} is "
            f"{dispatcher!r}: add {DISPATCHER_FLAG} {DISPATCHER}"
            + (f" (it fell back to alltoall: {previous_fallback})" if previous_fallback else "")
        )

    if getattr(args, "specmoe_request_placement", False):
        _check_request_placement(args, dispatcher, plan)

    if dispatcher != DISPATCHER:
        if previous_fallback is not None:
            return SpecMoEArgsCheck(active=False, fallback_reason=previous_fallback)
        given = [f for f, v in (("--specmoe-plan", plan), ("--specmoe-stats", stats)) if v]
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

    # 3. Layouts where shuffling cannot help: error, or alltoall if the user asked for it.
    problems = layout_problems(args)
    if problems and shuffle:
        raise SpecMoEArgumentError(
            "--specmoe-shuffle cannot shuffle tokens on this layout: " + "; ".join(problems)
            + ". Fix the layout (--specmoe-fallback-alltoall does not apply to --specmoe-shuffle)"
        )
    if problems:
        reason = "token shuffling cannot help this layout: " + "; ".join(problems)
        if not getattr(args, "specmoe_fallback_alltoall", False):
            raise SpecMoEArgumentError(
                reason + ". Pass --specmoe-fallback-alltoall to run the plain alltoall "
                "dispatcher instead."
            )
        args.moe_token_dispatcher_type = "alltoall"
        args.specmoe_fallback_reason = reason
        if _rank0():
            print(f"specmoe: falling back to alltoall: {reason}", file=sys.stderr)
        return SpecMoEArgsCheck(active=False, fallback_reason=reason)

    # 4. Speculative token shuffling: its own predictor replaces --specmoe-predictor.
    if shuffle:
        shuffle_predictor = _check_shuffle(args, plan)
        if plan is None:
            return SpecMoEArgsCheck(active=True, predictor=None, shuffle=shuffle_predictor)
        plan_dir = Path(plan)
        kinds = PLAN_KINDS.get(shuffle_predictor, ())
        _check_plan(args, plan_dir, kinds[0] if kinds else "pregate",
                    flag=f"--specmoe-shuffle-predictor {shuffle_predictor}" if kinds else None, any_of=kinds)
        return SpecMoEArgsCheck(active=True, predictor=None, plan=plan_dir, shuffle=shuffle_predictor)

    # 5. The plan: present when the predictor needs one, and made for this model and layout.
    if plan is None:
        if predictor not in PREDICTORS_WITHOUT_PLAN:
            raise SpecMoEArgumentError(
                f"--specmoe-predictor {predictor} needs --specmoe-plan DIR (made by `specmoe "
                "plan` from a calibration run); without a plan only --specmoe-predictor pregate "
                "works"
            )
        return SpecMoEArgsCheck(active=True, predictor=predictor)
    plan_dir = Path(plan)
    _check_plan(args, plan_dir, predictor)
    return SpecMoEArgsCheck(active=True, predictor=predictor, plan=plan_dir)


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
