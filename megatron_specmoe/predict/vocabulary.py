"""The one vocabulary for predictor choices, from the plan folder to the shuffle layer.

Two questions have names, and each name answers exactly one of them:

    PredictorKind     which *fitted* predictor a plan folder holds (``specmoe plan``):
                      "token"     TokenTable: token id -> experts, per layer.
                      "layer"     LayerTable: previous n layers' expert sets -> this layer's experts.
                      "history"   HistoryMLP: small MLP per layer over all earlier layers' experts.
                      "combined"  Combined: per-token arbitration between members (MemberKind).
    ShufflePredictor  what a shuffle layer scores tokens x TP ranks with at run time:
                      "pregate"   this layer's router on the gathered layer input (no plan).
                      "route"     the plan's "token" predictor on the batch's token ids.
                      "history"   the plan's "history" (or "combined" of token + history) on the
                                  carried real routes of the earlier MoE layers.
                      "contiguous", "random", "adversarial": baselines for tests and benchmarks.
    RuntimePredictor  the ShufflePredictors a user selects (the first three).

``PLAN_KINDS[p]`` lists the fitted kinds run-time predictor ``p`` can use (empty: needs no plan).
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = ["MemberKind", "PredictorKind", "RuntimePredictor", "ShufflePredictor", "PLAN_KINDS"]

MemberKind = Literal["token", "layer", "history"]
PredictorKind = Literal["token", "layer", "history", "combined"]
RuntimePredictor = Literal["pregate", "route", "history"]
ShufflePredictor = Literal["pregate", "route", "history", "contiguous", "random", "adversarial"]

PLAN_KINDS: dict[str, tuple[str, ...]] = {"pregate": (), "route": ("token",), "history": ("combined", "history")}


def _check() -> None:
    """The Literals nest as documented (called by the tests, not at import)."""
    assert set(get_args(MemberKind)) < set(get_args(PredictorKind))
    assert set(get_args(RuntimePredictor)) < set(get_args(ShufflePredictor))
    assert set(PLAN_KINDS) == set(get_args(RuntimePredictor))
    assert all(set(v) <= set(get_args(PredictorKind)) for v in PLAN_KINDS.values())
