"""Which part of the method a Megatron-LM command line gets, and the checks that need no GPU.

Glossary
    layout: the parallel sizes TP (attention tensor parallel), EP (expert parallel), ETP (expert
        tensor parallel).
    method: what ``--moe-token-dispatcher-type specmoe`` turns on (``Method``), from the layout:
        "shuffle"   TP > 1 with the TP group inside one EP group (EP a multiple of TP, ETP = 1):
                    speculative token shuffling (``megatron/shuffle_layer.py``) moves each token to
                    the TP rank hosting its predicted experts inside attention's own collectives;
        "requests"  TP = 1 (DP attention): Megatron's DP inference coordinator places whole
                    requests on the DP rank whose experts their prompts are predicted to use
                    (``megatron_lm/dp_coordinator.py``).
        A layout with neither (EP = 1, ETP > 1, TP not inside EP) is refused, or falls back to
        alltoall with ``--specmoe-fallback-alltoall``; a layout whose method cannot run with the
        other settings (TE linears, ...) is refused with the
        setting and the change that makes it work. ``--specmoe-shuffle`` and
        ``--specmoe-request-placement`` only assert the method (an error when the layout selects
        the other one).
    predictor: ``--specmoe-predictor`` (``PredictorName``), what the method predicts with:
        shuffle: "pregate" (the layer's router on its input, no plan), "token" (the plan's token
        table on the token ids), "combined" (the plan's combined predictor; its members need a
        device form: token, history) or "history" (the plan's route-history MLP); requests:
        "token" (the plan's token table on the prompt). "layer" (hashed n-gram tables) has no
        run-time form and is refused by name. Unset: the plan's first predictor kind, or "pregate"
        without a plan (shuffle only; request placement needs a plan).

Nothing runs at import time; only ``check_request_placement`` imports megatron (to find core
0.19's DP coordinator). ``megatron_lm/args.py`` calls these from ``validate_specmoe_args`` and
re-exports the public names.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Literal, Optional, get_args

from megatron_specmoe.artifacts.errors import SpecMoEArgumentError
from megatron_specmoe.megatron.shuffle_refusals import graph_predictor_problem, launcher_refusals, launcher_sentences
from megatron_specmoe.megatron.shuffle_refusals import moe_layer_pattern as _moe_layer_pattern
from megatron_specmoe.megatron.shuffle_refusals import shuffle_dense_layer_problem
from megatron_specmoe.predict.vocabulary import PLAN_KINDS, RuntimePredictor

__all__ = [
    "DISPATCHER",
    "DISPATCHER_FLAG",
    "Method",
    "PredictorName",
    "PREDICTORS_WITHOUT_PLAN",
    "RuntimePredictor",
    "RUNTIME_PREDICTOR_OF",
    "PLAN_KINDS",
    "SpecMoEArgumentError",
    "num_moe_layers",
    "moe_layer_pattern",
    "shuffle_dense_layer_problem",
    "layout_problems",
    "layout_method",
    "te_refusal",
    "read_plan",
    "resolve_predictor",
    "check_shuffle",
    "check_request_placement",
    "check_replicas",
]

DISPATCHER = "specmoe"
DISPATCHER_FLAG = "--moe-token-dispatcher-type"

Method = Literal["shuffle", "requests"]
PredictorName = Literal["token", "layer", "history", "combined", "pregate"]
# The pre-attention gate reuses the model's own router weights: it needs no calibration, so no plan.
PREDICTORS_WITHOUT_PLAN: frozenset[str] = frozenset({"pregate"})
# The shuffle layer's run-time predictor (predict/vocabulary.RuntimePredictor) for each value of
# --specmoe-predictor it serves; "combined" and "history" both ride on the carried route history.
# predict/vocabulary.PLAN_KINDS says which plan kinds each run-time predictor can use.
RUNTIME_PREDICTOR_OF: dict[str, RuntimePredictor] = {"pregate": "pregate", "token": "route",
                                                     "combined": "history", "history": "history"}
# Predictor kinds with a device form (predict/device_scorer.DEVICE_KINDS), for combined members.
_DEVICE_KINDS = ("token", "history", "combined")
_WHY_TP1 = ("with --tensor-model-parallel-size 1 (DP attention) the specmoe dispatcher places whole "
            "requests instead")


# --------------------------------------------------------------------------- layer layout


def num_moe_layers(args: argparse.Namespace) -> Optional[int]:
    """MoE layers in the whole model from ``--num-layers`` and ``--moe-layer-freq`` (an int N:
    layers 0, N, 2N, ... are MoE; or a 0/1 list), or None when ``--num-layers`` is unknown."""
    num_layers = getattr(args, "num_layers", None)
    if num_layers is None:
        return None
    return sum(moe_layer_pattern(int(num_layers), getattr(args, "moe_layer_freq", 1)))


def moe_layer_pattern(num_layers: int, freq: Any, *,
                      names: tuple[str, str] = ("--moe-layer-freq", "--num-layers")) -> list[int]:
    """``shuffle_refusals.moe_layer_pattern`` with its error as a SpecMoEArgumentError (flag names)."""
    try:
        return _moe_layer_pattern(num_layers, freq, names=names)
    except ValueError as exc:
        raise SpecMoEArgumentError(str(exc)) from None


# --------------------------------------------------------------------------- parallel layout


def _sizes(args: argparse.Namespace) -> tuple[int, int, int]:
    tp = int(getattr(args, "tensor_model_parallel_size", 1) or 1)
    ep = int(getattr(args, "expert_model_parallel_size", 1) or 1)
    etp = getattr(args, "expert_tensor_parallel_size", None)
    return tp, ep, tp if etp is None else int(etp)


def layout_problems(args: argparse.Namespace) -> list[str]:
    """Why the specmoe dispatcher can do nothing on this parallel layout (empty when it can:
    TP > 1 shuffles, TP = 1 places requests). ETP unset means ETP = TP, Megatron-LM's default."""
    tp, ep, etp = _sizes(args)
    problems = []
    if ep == 1:
        problems.append(
            "--expert-model-parallel-size is 1: every rank holds every expert, there is no "
            "expert all-to-all to shrink"
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


def layout_method(args: argparse.Namespace) -> Method:
    """The method a sound layout gets: "shuffle" for TP > 1, "requests" for TP = 1."""
    return "shuffle" if _sizes(args)[0] > 1 else "requests"


def te_refusal(what: str) -> str:
    """Why the shuffle layer refuses TransformerEngine linears, and what lifts it."""
    if importlib.util.find_spec("transformer_engine") is not None:
        return (
            f"{what}: the shuffle layer's TransformerEngine linears (megatron/te_shuffle.py) stay refused "
            "until tools/gpu_check.sh has verified them on a GPU (run it on the GPU machine; its TE "
            "shuffle case checks them lossless against alltoall). Pass --transformer-impl local"
        )
    return (f"{what}: TransformerEngine is not installed here, and the shuffle layer runs with "
            "Megatron's local linears. Pass --transformer-impl local")


# --------------------------------------------------------------------------- the plan


def read_plan(args: argparse.Namespace, plan_dir: Path):
    """The plan in ``plan_dir`` (``artifacts/plan_folder.load_plan`` checks its format and
    checksum), compared with the command line: MoE layers, experts, top-k, EP size, and vocabulary
    / hidden size when both sides know them (the padded vocabulary is known only after the
    tokenizer is built)."""
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
    return plan


def check_replicas(args: argparse.Namespace, method: str, plan: Any, plan_dir: Optional[Path]) -> int:
    """A plan with redundant experts (``specmoe plan --redundant-experts R``): the launcher builds
    every MoE layer with E + R slots (``megatron_lm/runtime.py``). Refuses what those layers cannot
    serve; returns R (0 without replicas)."""
    extra = plan.arrays.get("replicas/extra") if plan is not None else None
    if extra is None:
        return 0
    redundant = int(extra.shape[1] * extra.shape[2])
    flag = f"--specmoe-plan {plan_dir} (made with --redundant-experts {redundant})"
    if method == "shuffle":
        raise SpecMoEArgumentError(
            f"{flag}: token shuffling (TP > 1) does not serve redundant experts yet; serve the replicas "
            "with --tensor-model-parallel-size 1 (DP attention), or re-plan without --redundant-experts")
    if getattr(args, "moe_grouped_gemm", False):
        raise SpecMoEArgumentError(
            f"{flag}: --moe-grouped-gemm keeps all local experts in one grouped module, so replica slots "
            "cannot be added to it; drop --moe-grouped-gemm (SequentialMLP experts), or re-plan without "
            "--redundant-experts")
    return redundant


def _kinds(plan: Any) -> tuple[str, ...]:
    return tuple(plan.header.predictor_kinds) if plan is not None else ()


def resolve_predictor(args: argparse.Namespace, method: Method, plan: Any, plan_dir: Optional[Path]) -> str:
    """``--specmoe-predictor``, or its default for ``method`` (module docstring), checked against
    the plan."""
    given = getattr(args, "specmoe_predictor", None)
    kinds = _kinds(plan)
    if given is None:
        if method == "requests":
            if plan is None:
                return "token"  # check_request_placement names the missing plan
            given = "token" if "token" in kinds or not kinds else kinds[0]
        else:
            given = kinds[0] if kinds else "pregate"
    if given not in get_args(PredictorName):
        raise SpecMoEArgumentError(f"--specmoe-predictor {given}: choose one of {get_args(PredictorName)}")
    if given == "layer":
        raise SpecMoEArgumentError(
            "--specmoe-predictor layer: the n-gram layer table has no run-time form (neither the "
            "shuffle layer nor request placement can score with it). Use token, combined (members "
            "token and history), history or pregate, and plan with it (`specmoe plan --predictor token`)"
        )
    if given not in PREDICTORS_WITHOUT_PLAN:
        if plan is None:
            raise SpecMoEArgumentError(
                f"--specmoe-predictor {given} needs --specmoe-plan DIR (made by `specmoe plan` from a "
                "calibration run); without a plan only --specmoe-predictor pregate works"
                + (" (and only with TP > 1)" if method == "requests" else "")
            )
        if given not in kinds:
            raise SpecMoEArgumentError(
                f"--specmoe-predictor {given}: the plan {plan_dir} holds no such predictor (it has "
                f"{', '.join(kinds) if kinds else 'none'}); choose one of those, or re-run `specmoe "
                f"plan` with --predictor {given}"
            )
    if given == "combined":
        members = [m.get("kind") for m in plan.predictor_state["combined"]["config"].get("members", ())]
        bad = [m for m in members if m not in _DEVICE_KINDS]
        if bad and method == "shuffle":
            raise SpecMoEArgumentError(
                f"--specmoe-predictor combined: the plan {plan_dir}'s combined predictor has member(s) "
                f"{bad} with no run-time form; re-plan with `specmoe plan --predictor combined --members "
                "token,history`, or use --specmoe-predictor token"
            )
    return given


# --------------------------------------------------------------------------- shuffle

def check_shuffle(args: argparse.Namespace, predictor: str) -> str:
    """The token-shuffling checks that need no GPU (the dispatcher is specmoe, the layout sound and
    TP > 1 by now); returns the shuffle layer's run-time predictor (``RuntimePredictor``)."""
    tp = int(getattr(args, "tensor_model_parallel_size", 1) or 1)
    why = (f"(the specmoe dispatcher shuffles tokens at --tensor-model-parallel-size {tp}; "
           f"{_WHY_TP1})")
    if predictor not in RUNTIME_PREDICTOR_OF:
        raise SpecMoEArgumentError(f"--specmoe-predictor {predictor}: token shuffling predicts with one of "
                                   f"{tuple(RUNTIME_PREDICTOR_OF)} {why}")
    shuffle_predictor = RUNTIME_PREDICTOR_OF[predictor]
    impl = getattr(args, "transformer_impl", "local")
    if impl != "local":
        raise SpecMoEArgumentError(te_refusal(
            f"token shuffling {why} with --transformer-impl {impl} (Megatron-LM's default is "
            "transformer_engine)"))
    graph_problem = graph_predictor_problem(
        args, shuffle_predictor, name=f"--specmoe-predictor {predictor} (the shuffle's '{shuffle_predictor}' predictor)")
    if graph_problem:
        raise SpecMoEArgumentError(f"token shuffling {why}: {graph_problem}")
    sentences = launcher_sentences(args)  # megatron/shuffle_refusals.py: the one refusal table
    if sentences:
        raise SpecMoEArgumentError(f"token shuffling {why}: {sentences[0]}")
    bad = launcher_refusals(args)
    if bad:
        raise SpecMoEArgumentError(
            f"token shuffling {why} does not support " + "; ".join(bad) + ". Drop these flags, or "
            "serve with --tensor-model-parallel-size 1"
        )
    if getattr(args, "specmoe_record_routes", None):
        raise SpecMoEArgumentError(
            f"--specmoe-record-routes {args.specmoe_record_routes} with token shuffling {why}: each "
            "rank routes the tokens the shuffle moved to it, so the recorded routes would not line up "
            "with the batch's token ids. Record routes with --moe-token-dispatcher-type alltoall "
            "(calibration needs no shuffling)"
        )
    sp = bool(getattr(args, "sequence_parallel", False))
    num_layers = getattr(args, "num_layers", None)
    if num_layers is not None:
        problem = shuffle_dense_layer_problem(
            moe_layer_pattern(int(num_layers), getattr(args, "moe_layer_freq", 1)),
            sequence_parallel=sp, predictor=shuffle_predictor)
        if problem:
            raise SpecMoEArgumentError(problem)
    return shuffle_predictor


# --------------------------------------------------------------------------- request placement


def check_request_placement(args: argparse.Namespace, predictor: str, plan: Any, plan_dir: Optional[Path]) -> None:
    """Request placement (TP = 1 by now): a plan holding a token table, ``--specmoe-predictor
    token``, a weight in [0, 1], and a Megatron-Core whose DP coordinator takes a per-request
    routing decision (0.19)."""
    why = "(the specmoe dispatcher places requests at --tensor-model-parallel-size 1, DP attention)"
    weight = getattr(args, "specmoe_request_weight", 0.5)
    if not 0.0 <= float(weight) <= 1.0:
        raise SpecMoEArgumentError(f"--specmoe-request-weight {weight}: must be in [0, 1] (0 = least-loaded)")
    if plan is None:
        raise SpecMoEArgumentError(
            f"request placement {why} needs --specmoe-plan DIR with a 'token' predictor (made by "
            "`specmoe plan --predictor token`): a request's experts are predicted from its prompt"
        )
    if predictor != "token":
        raise SpecMoEArgumentError(
            f"--specmoe-predictor {predictor}: request placement {why} predicts from the prompt's token "
            "ids alone; use --specmoe-predictor token (with the plan's token table), or shuffle "
            "tokens with --tensor-model-parallel-size > 1"
        )
    try:
        from megatron_specmoe.megatron_lm.dp_coordinator import _coordinator_class

        _coordinator_class()
    except ImportError as exc:
        raise SpecMoEArgumentError(f"request placement {why}: {exc}") from None


def rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def warn(text: str) -> None:
    """One line on stderr, from rank 0 only."""
    if rank0():
        print(f"specmoe: {text}", file=sys.stderr)
