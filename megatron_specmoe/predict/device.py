"""Route predictors in device form: one compile step (every token id's scores, computed once),
then one gather per forward; no host copy and no synchronisation on the run-time path.

Notation
    T: tokens in a batch.   E: experts.   P: ranks of the TP span (the shuffle domain).
    V: ids a table covers, 0 .. V-1; every other id (negative, or >= V) takes the prior row V.
    l: the MoE layer (0-based among MoE layers).   k: top-k.

Why. The shuffle layer needs, per forward and per layer, float32 [T, P] rank scores for the
batch's token ids. Calling a fitted ``RoutePredictor`` (numpy) means a device -> host copy of the
ids and a host -> device copy of the scores: a synchronisation per layer on a GPU. A predictor
whose scores depend on the token id alone gives the same row for the same id every time, so its
scores for *every* id are computed once (``per_id_scores``), when the layer first runs or the
placement changes, and looked up on the device with one gather. Two forms of that one table:
    ``RankTable``    float32 [V + 1, P]: the expert scores summed per EP rank of the TP span
                     ("route": only ranks matter). Memory (V + 1) * P * 4 bytes per MoE layer:
                     Mixtral (V = 32000) at P = 8: 1.0 MB per layer.
    ``ExpertTable``  float32 [V + 1, E]: the expert scores themselves, for a token table that is a
                     member of a combined predictor (the combination rule works on experts).
``layer_device_scorer`` hands a fitted predictor over per layer, with one method
``scores(token_ids=..., history=...) -> float32 [T, E]`` (rows sum to 1) equal to the host
predictor's ``expert_scores`` for the same inputs:
    "token"     ``ExpertTable``.
    "history"   ``history_mlp.HistoryLayerScorer`` (embedding-bag + one small matmul).
    "combined"  ``CombinedScorer``: the members' device forms, combined by the same rule
                (``combined.combine_scores_torch``). For the run-time plan its ``rank_scores``
                gives float32 [T, P] directly: a token table with a fitted history MLP takes one
                Triton kernel after the MLP (``predict/combined_triton.py``) where Triton runs.
"layer" (hashed n-gram tables) has no device form yet and is refused by name.

Exactness: ``RankTable.lookup(ids)`` equals ``rank_scores(predictor.expert_scores(RouteContext(
layer=l, token_ids=ids)), placement)[:, ep_base : ep_base + P]`` row for row, for ids inside
0 .. V-1, and for ids outside when the predictor scores every id outside 0 .. V-1 by one prior row
(true of the token table with V >= its largest fitted id + 1; ``token_id_bound`` gives that).
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from megatron_specmoe.predict.base import RouteContext, rank_scores
from megatron_specmoe.schedule.placement import ExpertPlacement

__all__ = ["RankTable", "compile_rank_table", "token_id_bound", "ExpertTable", "CombinedScorer",
           "layer_device_scorer", "per_id_scores", "DEVICE_KINDS"]

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

    def fused_members(self) -> Optional[tuple]:
        """(token table, history scorer, token table first) where this combination has the one-kernel
        form (``predict/combined_triton.py``: a token table and a fitted history MLP), else None."""
        from megatron_specmoe.predict.history_mlp import HistoryLayerScorer

        if len(self.members) != 2:
            return None
        a, b = self.members
        for table, hist, first in ((a, b, True), (b, a, False)):
            if isinstance(table, ExpertTable) and isinstance(hist, HistoryLayerScorer) and hist.w1 is not None:
                return table, hist, first
        return None

    def rank_scores(self, *, token_ids: torch.Tensor, history: torch.Tensor, hosts: torch.Tensor,
                    consts: Optional[tuple] = None, backend: str = "auto") -> torch.Tensor:
        """float32 [T, P]: ``scores(...) @ hosts``; on the Triton path (``fast_assign.triton_usable``)
        for a fused pair (``fused_members``) in seven launches: the history MLP's logits (six, the
        embedding-bag's offsets among them) and one kernel for the rest (equal up to float rounding).

        Args:
            token_ids: int [T].   history: int64 [T, l, k].
            hosts: float32 [E, P], ``pregate.span_hosts(...)``.
            consts: ``fused_consts(hosts)``, made once per placement by the caller; None: made here.
            backend: "auto" (the kernel where it can run), "torch" (the torch form: the reference).
        """
        from megatron_specmoe.schedule.fast_assign import triton_usable

        if backend not in ("auto", "torch"):
            raise ValueError(f"CombinedScorer.rank_scores: backend must be 'auto' or 'torch', got {backend!r}")
        fused = self.fused_members()
        if backend == "torch" or fused is None or not triton_usable(history.device):
            return self.scores(token_ids=token_ids, history=history) @ hosts
        importlib.import_module("megatron_specmoe.predict.combined_triton")  # registers specmoe::combined_rank_scores

        table, hist, first = fused
        tconf, rank_span, offsets = self.fused_consts(hosts) if consts is None else consts
        return torch.ops.specmoe.combined_rank_scores(
            table.table, tconf, token_ids.reshape(-1).long(), hist.logits(history=history, offsets=offsets),
            rank_span, int(hosts.shape[1]), self.rule == "mixture", first)

    def fused_consts(self, hosts: torch.Tensor) -> tuple:
        """(float32 [V + 1] each table row's maximum, int32 [E] each expert's span rank or -1, the
        MLP's row offsets) for ``rank_scores``; a few launches, once per placement."""
        table, hist, _ = self.fused_members()
        rank_span = torch.where(hosts.sum(dim=1) > 0, hosts.argmax(dim=1), torch.full_like(hosts[:, 0], -1).long())
        return (table.table.amax(dim=1).contiguous(), rank_span.to(torch.int32).contiguous(),
                hist.logit_offsets(hosts.device))


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
        # Ids below 0 clamp to -1 and ids above V to V; -1 mod (V + 1) is V: the prior row. Three
        # launches on a device (clamp, remainder, gather).
        return self.table.index_select(0, ids.clamp(-1, v).remainder(v + 1))


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
