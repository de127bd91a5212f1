"""The registry of pure route predictors: name -> class, checked against ``PredictorKind``.

Kinds
    "token"     TokenTable: token id -> experts, per layer (needs token ids in the trace).
    "layer"     LayerTable: previous n layers' expert sets -> this layer's experts (n-gram).
    "history"   HistoryMLP: small MLP per layer over the experts of all previous layers.
    "combined"  Combined: per-token arbitration between members (default token + layer).

The pre-attention gate ("pregate": layer l's router applied to the layer's input hidden state)
needs the model's weights, so it is built by the shuffle layer (``predict/rank_scorers.py``) and is not in this pure registry.

Every class has keyword-only hyper-parameters in its constructor, ``fit(trace) -> self``,
``expert_scores(ctx)``, ``memory_bytes()``, ``to_state()`` and the class method ``from_state``.
"""

from __future__ import annotations

from typing import Any, Mapping, get_args

from megatron_specmoe.artifacts.traces import RoutingTrace
from megatron_specmoe.predict.combined import Combined
from megatron_specmoe.predict.members import MEMBERS
from megatron_specmoe.predict.vocabulary import PredictorKind

__all__ = [
    "PredictorKind",
    "PREDICTORS",
    "check_kind",
    "estimate_fit_seconds",
    "make",
    "fit_predictor",
    "load_predictor",
    "predictor_from_state",
]

PREDICTORS: dict[str, type] = {**MEMBERS, "combined": Combined}


def check_kind(kind: str) -> str:
    """Return ``kind`` if it names a registered predictor, else raise a ValueError listing them."""
    allowed = list(get_args(PredictorKind))
    if kind not in allowed or kind not in PREDICTORS:
        hint = " ('pregate' needs the model and is built by the shuffle layer)" if kind == "pregate" else ""
        raise ValueError(f"unknown predictor kind {kind!r}; allowed: {', '.join(allowed)}{hint}")
    return kind


def make(kind: str, **options: Any):
    """An unfitted predictor of ``kind`` with constructor ``options`` (call ``.fit(trace)``)."""
    return PREDICTORS[check_kind(kind)](**options)


def fit_predictor(kind: str, trace: RoutingTrace, **options: Any):
    """``make(kind, **options).fit(trace)``: a fitted predictor."""
    return make(kind, **options).fit(trace)


def estimate_fit_seconds(kind: str, trace: RoutingTrace, *, sample_tokens: int = 8192, **options: Any) -> float:
    """Seconds ``fit_predictor(kind, trace, **options)`` should take, measured before it starts.

    history: ``HistoryMLP.estimate_fit_seconds`` (a few timed steps; an upper bound at most
    ``epochs`` epochs). layer: ``LayerTable.estimate_fit_seconds`` (search and final tables timed
    on ``sample_tokens`` tokens, each scaled to its capped tokens). token: one fit on the first
    ``sample_tokens`` tokens, scaled by T / sample (its fit is linear in T). combined: the sum over
    its members.
    """
    import time

    import numpy as np

    check_kind(kind)
    if kind == "combined":
        members = options.get("members", PREDICTORS["combined"]().members)
        member_options = options.get("member_options", {})
        return float(sum(estimate_fit_seconds(m, trace, sample_tokens=sample_tokens, **member_options.get(m, {}))
                         for m in members))
    predictor = make(kind, **options)
    if kind == "history":
        return predictor.estimate_fit_seconds(trace)
    if kind == "layer":
        return predictor.estimate_fit_seconds(trace, sample_tokens=sample_tokens)
    n = min(trace.num_tokens, sample_tokens)
    sample = trace.select(np.arange(n))
    start = time.perf_counter()
    predictor.fit(sample)
    return (time.perf_counter() - start) * trace.num_tokens / n


def load_predictor(state: Mapping[str, Any]):
    """Rebuild a fitted predictor from ``to_state()`` output (its kind is in state["config"])."""
    try:
        kind = state["config"]["kind"]
    except (KeyError, TypeError):
        raise ValueError(
            "load_predictor: state must be {'config': {'kind': ...}, 'arrays': {...}} from to_state()"
        ) from None
    return PREDICTORS[check_kind(kind)].from_state(state)


def predictor_from_state(kind: str, state: Mapping[str, Any]):
    """``load_predictor(state)``, checking that the state is of ``kind`` (a plan stores states by
    kind; this catches a state filed under the wrong name)."""
    check_kind(kind)
    stored = state.get("config", {}).get("kind") if isinstance(state, Mapping) else None
    if stored != kind:
        raise ValueError(f"predictor state filed as {kind!r} has config['kind']={stored!r}")
    return load_predictor(state)
