"""Token table ("token"): per layer, token id -> how often each expert served that token.

Notation
    T: tokens.   L: MoE layers.   k: top-k.   E: experts.
    V: distinct token ids seen while fitting.   m: experts kept per (token, layer), m <= E.

Scores. For a seen token v at layer l with n occurrences, let d[e] be the share of its n*k
selections that went to expert e (only the m most frequent experts are stored; the rest of the
mass is spread over the other experts in proportion to the layer's frequency prior q). Then

    scores[e] = (n*k * d[e] + alpha * q[e]) / (n*k + alpha)

so rare tokens lean on the prior and frequent tokens on their own counts. A token id never seen
while fitting, or outside ``0 .. vocab_size-1`` when ``vocab_size`` is set, scores the prior q
itself. (The paper maps unseen tokens to their nearest neighbour in embedding space; that needs
the model's embeddings and is not done here.) Confidence = the top share, ``scores.max(1)``.

Storage is sparse in the vocabulary: only seen ids, as a sorted id array, so a lookup is one
``searchsorted``. Per (token, layer) the m best experts are stored as 1-byte ids and 2-byte
fixed-point shares. ``token_table_bytes`` gives the size; for a 100k-token vocabulary, all of it
seen, 60 layers and E = 64 experts:

    keep m = 64 (exact, every expert)   1,153,215,360 B ~ 1.15 GB
    keep m = 12 (2k for k = 6)            217,215,360 B ~ 217 MB
    keep m = 8                            145,215,360 B ~ 145 MB

(numbers from ``token_table_bytes(vocab=100_000, layers=60, experts=64, keep=m)``; the default
keep is min(E, 2k)).
"""

from __future__ import annotations

import sys
from typing import Any, Optional

import numpy as np

from megatron_specmoe.predict.common import (
    FittedTables,
    NotFittedError,
    check_state,
    frequency_prior,
)
from megatron_specmoe.predict.base import RouteContext
from megatron_specmoe.artifacts.traces import RoutingTrace

__all__ = ["TokenTable", "token_table_bytes"]

_SHARE_SCALE = 65535.0  # shares are stored as uint16 fixed point: share * 65535


def _id_dtype(num_experts: int) -> np.dtype:
    return np.dtype(np.uint8) if num_experts <= 256 else np.dtype(np.int32)


def token_table_bytes(*, vocab: int, layers: int, experts: int, keep: int) -> int:
    """Bytes a fitted ``TokenTable`` holds when ``vocab`` distinct ids were seen.

    ids int64 [V] + occurrences int32 [V] + expert ids [V, L, m] (1 byte if E <= 256, else 4)
    + shares uint16 [V, L, m] + prior float32 [L, E]; Python object overhead is not counted.
    """
    id_bytes = _id_dtype(experts).itemsize
    return vocab * (8 + 4) + vocab * layers * keep * (id_bytes + 2) + layers * experts * 4


class TokenTable(FittedTables):
    """Per-layer token id -> expert distribution, fitted from traces that carry token ids.

    Args:
        alpha: prior strength in pseudo-selections (see the module docstring); >= 0.
        keep: experts stored per (token, layer), m; ``None`` means min(E, 2k).
        vocab_size: ids at or above it (and negative ids) score the prior; ``None``: no bound.
    """

    kind = "token"

    def __init__(self, *, alpha: float = 1.0, keep: Optional[int] = None, vocab_size: Optional[int] = None):
        if alpha < 0:
            raise ValueError(f"TokenTable: alpha must be >= 0, got {alpha}")
        if keep is not None and keep < 1:
            raise ValueError(f"TokenTable: keep must be >= 1 (experts stored per token), got {keep}")
        if vocab_size is not None and vocab_size < 1:
            raise ValueError(f"TokenTable: vocab_size must be >= 1 or None, got {vocab_size}")
        self.alpha = float(alpha)
        self.keep = keep
        self.vocab_size = vocab_size
        self._fitted: Optional[dict[str, Any]] = None

    # ---- fitting ----------------------------------------------------------------------------
    def fit(self, trace: RoutingTrace) -> "TokenTable":
        """Count, per layer, the experts each token id was routed to. Returns ``self``."""
        if trace.token_ids is None:
            raise ValueError(
                f"TokenTable.fit: the trace from {trace.source} has no token_ids; a token table "
                "needs them (use the 'layer' or 'history' predictor for traces without ids)"
            )
        tids = trace.token_ids
        if tids.size and tids.min() < 0:
            raise ValueError(f"TokenTable.fit: {trace.source} has negative token ids (min {int(tids.min())})")
        if self.vocab_size is not None and tids.size and tids.max() >= self.vocab_size:
            raise ValueError(
                f"TokenTable.fit: {trace.source} has token id {int(tids.max())} >= "
                f"vocab_size={self.vocab_size}; pass the model's vocabulary size"
            )
        num_experts, layers, topk = trace.num_experts, trace.num_layers, trace.topk
        keep = min(num_experts, 2 * topk) if self.keep is None else min(self.keep, num_experts)
        ids, inverse, occurrences = np.unique(tids, return_inverse=True, return_counts=True)
        vocab = ids.shape[0]
        top_ids = np.zeros((vocab, layers, keep), dtype=_id_dtype(num_experts))
        top_share = np.zeros((vocab, layers, keep), dtype=np.uint16)
        selections = (occurrences * topk).astype(np.float64)[:, None]
        for layer in range(layers):
            # Step 1: counts [V, E] of this layer (one layer at a time keeps memory at V*E).
            counts = np.zeros((vocab, num_experts), dtype=np.float64)
            ex = trace.experts[:, layer, :].astype(np.int64)
            np.add.at(counts, (np.repeat(inverse, topk), ex.ravel()), 1.0)
            # Step 2: keep the m most frequent experts, ties to the lower id.
            order = np.argsort(-counts, axis=1, kind="stable")[:, :keep]
            share = np.take_along_axis(counts, order, axis=1) / selections
            top_ids[:, layer] = order
            top_share[:, layer] = np.round(share * _SHARE_SCALE).astype(np.uint16)
            if layers >= 8 and (layer + 1) % max(1, layers // 4) == 0:
                print(f"[token] fitted layer {layer + 1}/{layers} ({vocab} ids)", file=sys.stderr)
        self._fitted = {
            "num_experts": num_experts,
            "num_layers": layers,
            "topk": topk,
            "keep": keep,
            "ids": ids.astype(np.int64),
            "occurrences": occurrences.astype(np.int32),
            "top_ids": top_ids,
            "top_share": top_share,
            "prior": frequency_prior(trace.experts, num_experts),
        }
        return self

    # ---- protocol -----------------------------------------------------------------------------
    def expert_scores(self, ctx: RouteContext) -> np.ndarray:
        """float32 [T, E] (module docstring); needs ``ctx.token_ids`` int64 [T]."""
        st = self._state()
        if not 0 <= ctx.layer < st["num_layers"]:
            raise ValueError(
                f"TokenTable: RouteContext.layer={ctx.layer} is outside the fitted layers "
                f"0..{st['num_layers'] - 1}"
            )
        if ctx.token_ids is None:
            raise ValueError(
                "TokenTable.expert_scores: RouteContext.token_ids is None; the token table needs ids"
            )
        tids = np.asarray(ctx.token_ids).astype(np.int64, copy=False).reshape(-1)
        prior = st["prior"][ctx.layer]
        scores = np.broadcast_to(prior, (tids.shape[0], prior.shape[0])).copy()
        ids = st["ids"]
        if ids.shape[0] == 0 or tids.shape[0] == 0:
            return scores
        # Step 1: find each token's row (sorted ids -> one searchsorted); out-of-vocab -> miss.
        pos = np.minimum(np.searchsorted(ids, tids), ids.shape[0] - 1)
        seen = ids[pos] == tids
        if self.vocab_size is not None:
            seen &= (tids >= 0) & (tids < self.vocab_size)
        rows = pos[seen]
        if rows.size == 0:
            return scores
        # Step 2: kept shares, and the dropped mass spread over the other experts by the prior.
        kept = np.zeros((rows.size, prior.shape[0]), dtype=np.float32)
        share = st["top_share"][rows, ctx.layer].astype(np.float32) / _SHARE_SCALE
        np.put_along_axis(kept, st["top_ids"][rows, ctx.layer].astype(np.int64), share, axis=1)
        rest = np.where(kept > 0, 0.0, prior[None, :]).astype(np.float32)
        dropped = np.clip(1.0 - kept.sum(axis=1, keepdims=True), 0.0, 1.0)
        rest_sum = rest.sum(axis=1, keepdims=True)
        dist = kept + np.where(rest_sum > 0, dropped * rest / np.maximum(rest_sum, 1e-30), 0.0)
        dist /= dist.sum(axis=1, keepdims=True)
        # Step 3: blend with the prior by the token's number of selections.
        n = (st["occurrences"][rows].astype(np.float32) * st["topk"])[:, None]
        blended = (n * dist + self.alpha * prior[None, :]) / (n + self.alpha)
        scores[seen] = blended / blended.sum(axis=1, keepdims=True)
        return scores.astype(np.float32, copy=False)

    def fitted_id_bound(self) -> int:
        """One past the largest token id seen while fitting (0 if none): every id at or above it
        scores the layer prior (``rank_table.token_id_bound``)."""
        ids = self._state()["ids"]
        return int(ids[-1]) + 1 if ids.shape[0] else 0

    def memory_bytes(self) -> int:
        st = self._state()
        return int(sum(st[name].nbytes for name in ("ids", "occurrences", "top_ids", "top_share", "prior")))

    # ---- plan artifact ------------------------------------------------------------------------
    def to_state(self) -> dict[str, Any]:
        st = self._state()
        return {
            "config": {
                "kind": self.kind,
                "alpha": self.alpha,
                "keep": st["keep"],
                "vocab_size": self.vocab_size,
                "num_experts": st["num_experts"],
                "num_layers": st["num_layers"],
                "topk": st["topk"],
            },
            "arrays": {name: st[name] for name in ("ids", "occurrences", "top_ids", "top_share", "prior")},
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "TokenTable":
        check_state(state, kind=cls.kind, arrays=("ids", "occurrences", "top_ids", "top_share", "prior"))
        cfg, arr = state["config"], state["arrays"]
        out = cls(alpha=cfg["alpha"], keep=cfg["keep"], vocab_size=cfg["vocab_size"])
        out._fitted = {
            "num_experts": int(cfg["num_experts"]),
            "num_layers": int(cfg["num_layers"]),
            "topk": int(cfg["topk"]),
            "keep": int(cfg["keep"]),
            "ids": np.asarray(arr["ids"], dtype=np.int64),
            "occurrences": np.asarray(arr["occurrences"], dtype=np.int32),
            "top_ids": np.asarray(arr["top_ids"]),
            "top_share": np.asarray(arr["top_share"], dtype=np.uint16),
            "prior": np.asarray(arr["prior"], dtype=np.float32),
        }
        return out
