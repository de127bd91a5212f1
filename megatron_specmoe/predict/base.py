"""The interface every route predictor implements, and the helpers built on it.

Notation
    T: tokens in a batch.   l: the MoE layer being predicted (0-based).   k: top-k.
    E: routed experts.      P: EP ranks.

A predictor turns a ``RouteContext`` (what every TP rank holds before layer l's gate: token ids,
and the experts each token actually used at layers 0 .. l-1) into expert scores. "Which experts"
and "which EP rank" both derive from the scores, for any placement, by the helpers below, so a
new predictor only writes ``expert_scores``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, runtime_checkable

import numpy as np

from megatron_specmoe.schedule.placement import ExpertPlacement

__all__ = ["RouteContext", "RoutePredictor", "top_experts", "rank_scores", "predicted_ranks"]


@dataclass(frozen=True, kw_only=True)
class RouteContext:
    """What is known about a batch of tokens before layer ``layer``'s gate.

    Attributes:
        layer: l, the MoE layer to predict (0-based among MoE layers).
        token_ids: optional int64 [T].
        history: optional int32 [T, l, k]: the experts each token used at MoE layers 0 .. l-1
            (the real routes, carried along with the hidden states). ``None`` or l = 0 means no
            history.
    """

    layer: int
    token_ids: Optional[np.ndarray] = None
    history: Optional[np.ndarray] = None

    @property
    def num_tokens(self) -> int:
        if self.token_ids is not None:
            return int(self.token_ids.shape[0])
        if self.history is not None:
            return int(self.history.shape[0])
        raise ValueError("RouteContext: neither token_ids nor history is given; cannot size the batch")


@runtime_checkable
class RoutePredictor(Protocol):
    """A fitted predictor for every MoE layer of one model.

    Attributes:
        kind: the registry name (e.g. "token", "layer", "history", "combined").
        num_experts: E.
        num_layers: L.
    """

    kind: str
    num_experts: int
    num_layers: int

    def expert_scores(self, ctx: RouteContext) -> np.ndarray:
        """float32 [T, E]: a non-negative score per expert; rows sum to 1 (a distribution over
        experts, so that the top share is a confidence comparable across predictors)."""
        ...

    def memory_bytes(self) -> int:
        """Bytes the fitted predictor holds (tables, weights)."""
        ...


def top_experts(scores: np.ndarray, k: int) -> np.ndarray:
    """int64 [T, k]: the k highest-scoring experts per token, best first (ties: lower id)."""
    order = np.argsort(-scores, axis=1, kind="stable")
    return order[:, :k]


def rank_scores(scores: np.ndarray, placement: ExpertPlacement) -> np.ndarray:
    """float32 [T, P]: expert scores summed per EP rank under ``placement`` (the expected share of
    a token's activations that rank r would serve locally)."""
    ranks = placement.rank_of_logical()
    out = np.zeros((scores.shape[0], placement.ep_size), dtype=np.float32)
    np.add.at(out.T, ranks, scores.T)
    return out


def predicted_ranks(scores: np.ndarray, placement: ExpertPlacement) -> np.ndarray:
    """int64 [T]: the EP rank with the highest rank score (the predicted home rank)."""
    return np.argmax(rank_scores(scores, placement), axis=1)
