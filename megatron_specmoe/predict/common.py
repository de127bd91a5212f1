"""Helpers shared by the fitted predictors (token, layer, history, combined).

Notation
    T: tokens.   L: MoE layers.   l: the layer being predicted.   k: top-k.   E: experts.

Every predictor's scores mean the same thing: ``scores[t, e]`` is the expected share of token t's
k selections at layer l that go to expert e (a distribution over experts; a perfectly certain
predictor puts 1/k on each of k experts). The *frequency prior* of a layer is that distribution
over all fitting tokens, add-one smoothed so that no expert has zero score; every predictor falls
back to it when it knows nothing about a token (layer 0 without token ids, unseen contexts).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np

from megatron_specmoe.predict.base import RouteContext
from megatron_specmoe.artifacts.traces import RoutingTrace

__all__ = [
    "frequency_prior",
    "multi_hot",
    "normalise_rows",
    "check_history",
    "check_state",
    "validation_split",
    "NotFittedError",
    "FittedTables",
]


class NotFittedError(ValueError, AttributeError):
    """A predictor was used before ``fit`` (or ``from_state``). Also an AttributeError, so that
    ``hasattr(p, "num_experts")`` (and ``isinstance(p, RoutePredictor)``) is False, not an error,
    for an unfitted predictor."""


class FittedTables:
    """Mixin for predictors that keep their fitted state in ``self._fitted`` (a dict with at
    least ``num_experts`` and ``num_layers``): the not-fitted error and the two shape properties
    of the ``RoutePredictor`` protocol, written once."""

    _fitted: Optional[dict[str, Any]]

    def _state(self) -> dict[str, Any]:
        if self._fitted is None:
            name = type(self).__name__
            raise NotFittedError(f"{name} is not fitted; call fit(trace) or {name}.from_state()")
        return self._fitted

    @property
    def num_experts(self) -> int:
        return int(self._state()["num_experts"])

    @property
    def num_layers(self) -> int:
        return int(self._state()["num_layers"])


def frequency_prior(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """float32 [L, E]: per layer, the add-one smoothed share of selections that went to each expert.

    Args:
        experts: int [T, L, k], logical expert ids in 0 .. E-1.
        num_experts: E.
    """
    tokens, layers, _ = experts.shape
    counts = np.zeros((layers, num_experts), dtype=np.float64)
    layer_idx = np.broadcast_to(np.arange(layers)[None, :, None], experts.shape)
    np.add.at(counts, (layer_idx.ravel(), experts.ravel().astype(np.int64)), 1.0)
    counts += 1.0
    return (counts / counts.sum(axis=1, keepdims=True)).astype(np.float32)


def multi_hot(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """float32 [T, n*E]: the multi-hot of the experts at n layers, layer-major.

    Args:
        experts: int [T, n, k].
        num_experts: E.
    """
    tokens, layers, _ = experts.shape
    width = layers * num_experts
    out = np.zeros(tokens * width, dtype=np.float32)
    base = np.arange(tokens, dtype=np.int64)[:, None, None] * width
    base = base + (np.arange(layers, dtype=np.int64) * num_experts)[None, :, None]
    out[(base + experts).ravel()] = 1.0  # one flat scatter: cheaper than put_along_axis
    return out.reshape(tokens, width)


def normalise_rows(scores: np.ndarray) -> np.ndarray:
    """float32 [T, E]: ``scores`` divided by its row sums (rows must have a positive sum)."""
    scores = np.asarray(scores, dtype=np.float32)
    return scores / scores.sum(axis=1, keepdims=True)


def check_history(
    ctx: RouteContext, *, num_layers: int, num_experts: int, topk: int, who: str, last: Optional[int] = None
):
    """Validate ``ctx`` for a history-based predictor.

    The shape is always checked; the expert ids only in the ``last`` layers of the history that
    the predictor reads (all of them when ``last`` is None), to keep the check off the hot path.

    Returns:
        the history int [T, l, k] (not copied), or ``None`` when the context carries none (``ctx.history`` is
        ``None`` or l = 0), in which case the caller falls back to the frequency prior.
    """
    if not 0 <= ctx.layer < num_layers:
        raise ValueError(
            f"{who}: RouteContext.layer={ctx.layer} is outside the fitted layers 0..{num_layers - 1}"
        )
    if ctx.history is None or ctx.layer == 0:
        return None
    hist = np.asarray(ctx.history)
    if hist.ndim != 3 or hist.shape[1] != ctx.layer or hist.shape[2] != topk:
        raise ValueError(
            f"{who}: RouteContext.history must be [T, l={ctx.layer}, k={topk}] (the experts of "
            f"layers 0..{ctx.layer - 1}), got shape {hist.shape}; pass history[:, :layer]"
        )
    if not np.issubdtype(hist.dtype, np.integer):
        raise ValueError(f"{who}: RouteContext.history must hold integer expert ids, got {hist.dtype}")
    used = hist if last is None else hist[:, max(0, ctx.layer - last) :]
    if used.size and (used.min() < 0 or used.max() >= num_experts):
        raise ValueError(
            f"{who}: RouteContext.history holds expert ids outside 0..{num_experts - 1} "
            f"(min {int(used.min())}, max {int(used.max())})"
        )
    return hist


def check_state(state: Mapping[str, Any], *, kind: str, arrays: tuple[str, ...]) -> None:
    """Raise a ValueError naming what is missing when ``state`` is not a ``kind`` predictor state."""
    if not isinstance(state, Mapping) or "config" not in state or "arrays" not in state:
        raise ValueError(
            f"{kind} predictor state must be a dict with 'config' and 'arrays' (from to_state()), "
            f"got {type(state).__name__} with keys {sorted(state) if isinstance(state, Mapping) else '-'}"
        )
    got = state["config"].get("kind")
    if got != kind:
        raise ValueError(f"predictor state has config['kind']={got!r}, expected {kind!r}")
    missing = [name for name in arrays if name not in state["arrays"]]
    if missing:
        raise ValueError(f"{kind} predictor state lacks the arrays {missing}; re-save it with to_state()")


def validation_split(trace: RoutingTrace, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices (fit, validation) for choosing hyper-parameters on fitting data only.

    The validation part is the last ``fraction`` of the tokens in trace order (whole requests when
    ``request_ids`` is present), not a random sample: neighbouring tokens share prompts, so a
    random split would reward memorising them.
    """
    tokens = trace.num_tokens
    cut = int(round(tokens * (1.0 - fraction)))
    if trace.request_ids is not None and tokens:
        # Move the cut to the start of the request that straddles it.
        rid = trace.request_ids
        while 0 < cut < tokens and rid[cut] == rid[cut - 1]:
            cut -= 1
    if cut <= 0 or cut >= tokens:
        raise ValueError(
            f"cannot split {tokens} tokens of {trace.source} into a fitting and a validation part "
            f"(fraction={fraction}); give more tokens or fix the hyper-parameters explicitly"
        )
    idx = np.arange(tokens)
    return idx[:cut], idx[cut:]
