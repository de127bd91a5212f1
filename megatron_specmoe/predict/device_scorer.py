"""Route predictors in device form: expert scores from token ids and route history as torch tensors.

Notation
    T: tokens.   E: experts.   l: the MoE layer (0-based among MoE layers).   k: top-k.
    V: token ids a table covers (others score the prior row V).

The shuffle layer scores tokens on the device that holds them, once per layer and forward, so a
fitted predictor is handed over per layer as tensors (``layer_device_scorer``), with one method
``scores(token_ids=..., history=...) -> float32 [T, E]`` (rows sum to 1) that equals the host
predictor's ``expert_scores`` for the same inputs and never copies to the host:
    "token"     ``ExpertTable``: every id's scores computed once into float32 [V + 1, E], then one
                gather per forward (``rank_table`` keeps rank sums instead when only ranks matter).
    "history"   ``history_mlp.HistoryLayerScorer`` (embedding-bag + one small matmul).
    "combined"  ``CombinedScorer``: the members' device forms, combined by the same rule
                (``combined.combine_scores_torch``).
"layer" (hashed n-gram tables) has no device form yet and is refused by name.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from megatron_specmoe.predict.base import RouteContext

__all__ = ["ExpertTable", "CombinedScorer", "layer_device_scorer", "per_id_scores", "DEVICE_KINDS"]

DEVICE_KINDS = ("token", "history", "combined")


def per_id_scores(predictor: Any, *, layer: int, vocab_size: int, reduce=None, chunk: int = 16384) -> np.ndarray:
    """float32 [V + 1, X]: ``reduce(expert_scores)`` for token ids 0 .. V-1, then for id -1 (the
    row every id outside the table takes), scored ``chunk`` ids at a time.

    Args:
        predictor: a fitted predictor scored on token ids alone (no history).
        reduce: maps float32 [n, E] to [n, X] (e.g. sums per rank); None keeps the E columns.
    """
    if vocab_size < 0:
        raise ValueError(f"per_id_scores: vocab_size must be >= 0, got {vocab_size}")
    if chunk < 1:
        raise ValueError(f"per_id_scores: chunk must be >= 1, got {chunk}")
    ids = np.concatenate([np.arange(vocab_size, dtype=np.int64), np.array([-1], dtype=np.int64)])
    parts = []
    for start in range(0, vocab_size + 1, chunk):
        scores = predictor.expert_scores(RouteContext(layer=layer, token_ids=ids[start : start + chunk]))
        parts.append(np.asarray(scores if reduce is None else reduce(scores), dtype=np.float32))
        if vocab_size > 8 * chunk and len(parts) % 8 == 0:
            print(f"[device table] layer {layer}: {start + chunk}/{vocab_size + 1} ids", file=sys.stderr)
    return np.concatenate(parts, axis=0)


@dataclass(frozen=True, kw_only=True)
class ExpertTable:
    """A token-id predictor's expert scores for every id. Attributes: table float32 [V + 1, E] on
    the run-time device (row V: ids outside 0 .. V-1)."""

    table: torch.Tensor

    def scores(self, *, token_ids: Optional[torch.Tensor], history: Optional[torch.Tensor] = None) -> torch.Tensor:
        """float32 [T, E] for ``token_ids`` int [T] (``history`` unused)."""
        if token_ids is None:
            raise ValueError("ExpertTable.scores: the token predictor needs token_ids")
        ids = token_ids.reshape(-1).long()
        v = self.table.shape[0] - 1
        return self.table.index_select(0, torch.where((ids >= 0) & (ids < v), ids, torch.full_like(ids, v)))


@dataclass(frozen=True, kw_only=True)
class CombinedScorer:
    """Members' device scorers combined per token. Attributes: members (tuple of scorers), rule
    (``combined.CombineRule``)."""

    members: tuple
    rule: str

    def scores(self, *, token_ids: Optional[torch.Tensor], history: Optional[torch.Tensor]) -> torch.Tensor:
        from megatron_specmoe.predict.combined import combine_scores_torch

        return combine_scores_torch([m.scores(token_ids=token_ids, history=history) for m in self.members], self.rule)


def layer_device_scorer(predictor: Any, *, layer: int, device: Any = "cpu", vocab_size: Optional[int] = None):
    """The device form of ``predictor`` for MoE layer ``layer`` (module docstring).

    Args:
        predictor: a fitted "token", "history" or "combined" (of those) predictor.
        vocab_size: V for token tables; None: ``rank_table.token_id_bound(member)``.

    Raises:
        ValueError: a kind without a device form (named).
    """
    kind = getattr(predictor, "kind", type(predictor).__name__)
    if kind == "token":
        from megatron_specmoe.predict.rank_table import token_id_bound

        v = token_id_bound(predictor) if vocab_size is None else int(vocab_size)
        return ExpertTable(table=torch.from_numpy(per_id_scores(predictor, layer=layer, vocab_size=v)).to(device))
    if kind == "history":
        return predictor.layer_scorer(layer, device=device)
    if kind == "combined":
        members = tuple(layer_device_scorer(p, layer=layer, device=device, vocab_size=vocab_size)
                        for p in predictor.predictors)
        return CombinedScorer(members=members, rule=predictor.rule)
    raise ValueError(
        f"layer_device_scorer: the {kind!r} predictor has no device form; use one of {DEVICE_KINDS} "
        "(a 'combined' of 'token' and 'history' for token ids plus route history)"
    )
