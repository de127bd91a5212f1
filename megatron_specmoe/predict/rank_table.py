"""A route predictor compiled to a dense device table: token id -> rank scores of one TP span.

Notation
    T: tokens in a batch.   E: experts.   P: ranks of the TP span (the shuffle domain).
    V: ids the table covers, 0 .. V-1; every other id (negative, or >= V) takes the prior row V.
    l: the MoE layer (0-based among MoE layers).

Why. The shuffle layer needs, per forward and per layer, float32 [T, P] rank scores for the
batch's token ids. Calling a fitted ``RoutePredictor`` (numpy) means a device -> host copy of the
ids and a host -> device copy of the scores: a synchronisation per layer on a GPU. A predictor
whose scores depend on the token id alone (the "token" table; any predictor called without route
history, as the shuffle layer calls it) gives the same row for the same id every time, so its rank
scores for *every* id can be computed once, when the layer first runs or the placement changes,
and looked up on the device with one gather: no host work and no synchronisation per forward.

Memory: (V + 1) * P * 4 bytes per MoE layer (float32): Mixtral (V = 32000) at P = 8: 1.0 MB per
layer, 33 MB for 32 layers; a 129k vocabulary at P = 8: 4.1 MB per layer. Building it calls the
predictor on all V ids in chunks of ``chunk`` (host memory chunk * E * 4 bytes at a time).

Exactness: ``RankTable.lookup(ids)`` equals ``rank_scores(predictor.expert_scores(RouteContext(
layer=l, token_ids=ids)), placement)[:, ep_base : ep_base + P]`` row for row, for ids inside
0 .. V-1, and for ids outside when the predictor scores every id outside 0 .. V-1 by one prior row
(true of the token table with V >= its largest fitted id + 1; ``token_id_bound`` gives that).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from megatron_specmoe.schedule.placement import ExpertPlacement
from megatron_specmoe.predict.base import rank_scores

__all__ = ["RankTable", "compile_rank_table", "token_id_bound"]


@dataclass(frozen=True, kw_only=True)
class RankTable:
    """Dense rank scores per token id for one MoE layer and one TP span.

    Attributes:
        table: float32 [V + 1, P] on the run-time device; row V scores ids outside 0 .. V-1.
        layer: l.
        ep_base: EP rank of the span's first rank.
        placement_key: the placement's ``rank_of_logical()`` as a tuple (the layer rebuilds the
            table when its dispatcher's placement no longer matches).
    """

    table: torch.Tensor
    layer: int
    ep_base: int
    placement_key: tuple

    @property
    def vocab_size(self) -> int:
        """V."""
        return int(self.table.shape[0]) - 1

    def lookup(self, token_ids: torch.Tensor) -> torch.Tensor:
        """float32 [T, P] rank scores of ``token_ids`` (int [T], on the table's device); one
        gather, no host synchronisation."""
        ids = token_ids.reshape(-1).long()
        v = self.vocab_size
        rows = torch.where((ids >= 0) & (ids < v), ids, torch.full_like(ids, v))
        return self.table.index_select(0, rows)


def token_id_bound(predictor: Any) -> int:
    """V for a predictor: its ``vocab_size`` when set, else one past the largest token id it was
    fitted on (a ``TokenTable`` scores every other id by the layer prior).

    Raises:
        ValueError: the predictor states neither (name the fix: pass vocab_size).
    """
    vocab = getattr(predictor, "vocab_size", None)
    if vocab is not None:
        return int(vocab)
    bound = getattr(predictor, "fitted_id_bound", None)
    if callable(bound):
        return int(bound())
    raise ValueError(
        f"compile_rank_table: the {getattr(predictor, 'kind', type(predictor).__name__)!r} predictor "
        "states no vocabulary size; pass vocab_size= (the model's padded vocabulary)"
    )


def compile_rank_table(
    predictor: Any,
    *,
    layer: int,
    placement: ExpertPlacement,
    ep_base: int,
    tp: int,
    vocab_size: int | None = None,
    device: torch.device | str = "cpu",
    chunk: int = 16384,
) -> RankTable:
    """Score every token id once and keep the TP span's rank scores as a device table.

    Args:
        predictor: a fitted ``RoutePredictor``; called with token ids only (no route history).
        layer: l.
        placement: the layer's ``ExpertPlacement`` (logical expert -> EP rank).
        ep_base: EP rank of TP rank 0; the span is EP ranks ep_base .. ep_base + tp - 1.
        tp: P.
        vocab_size: V; None: ``token_id_bound(predictor)``.
        device: where the table lives (the model's device).
        chunk: ids scored per predictor call.
    """
    v = token_id_bound(predictor) if vocab_size is None else int(vocab_size)
    if v < 0:
        raise ValueError(f"compile_rank_table: vocab_size must be >= 0, got {v}")
    if tp < 1 or ep_base < 0 or ep_base + tp > placement.ep_size:
        raise ValueError(
            f"compile_rank_table: the span ep_base={ep_base} .. {ep_base + tp - 1} (tp={tp}) lies "
            f"outside the placement's {placement.ep_size} EP ranks"
        )
    from megatron_specmoe.predict.device_scorer import per_id_scores

    # Ids 0 .. V-1, then -1 for the prior row (an id no table holds), summed per rank of the span.
    out = per_id_scores(
        predictor, layer=layer, vocab_size=v, chunk=chunk,
        reduce=lambda scores: rank_scores(scores, placement)[:, ep_base : ep_base + tp],
    )
    return RankTable(
        table=torch.from_numpy(out).to(device),
        layer=layer,
        ep_base=ep_base,
        placement_key=tuple(int(r) for r in placement.rank_of_logical()),
    )
