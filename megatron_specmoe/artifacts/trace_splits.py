"""Deduplicate routing traces and split them by file for cross-domain checks.

Notation
    T: tokens.   L: MoE layers.   k: top-k.   W: key width (L * k, + 1 with token ids).

Predictors are measured cross-domain: fitted on some workloads (files) and scored on others, with
repeated routes dropped within each side first and, on request, routes seen in the fit dropped from
the evaluation side (``cross_domain_split``, ``leave_one_out_splits``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from megatron_specmoe.artifacts.traces import RoutingTrace

__all__ = ["dedup_routes", "TraceSplit", "cross_domain_split", "leave_one_out_splits"]


def _route_keys(trace: RoutingTrace) -> np.ndarray:
    """A [T, W] integer matrix whose rows are equal iff routes (and token ids, if any) are."""
    keys = trace.experts.reshape(trace.num_tokens, -1).astype(np.int64)
    if trace.token_ids is not None:
        keys = np.concatenate([keys, trace.token_ids[:, None].astype(np.int64)], axis=1)
    return keys


def dedup_routes(trace: RoutingTrace) -> tuple[RoutingTrace, np.ndarray]:
    """Drop tokens whose full route repeats an earlier token's, keeping the first occurrence.

    The key is the whole route experts[t] ([L, k], in router order) plus the token id when the
    trace has token ids (two different tokens with the same route are both kept).

    Returns:
        (deduplicated trace, kept) where kept is int64 [T'], ascending indices into ``trace``.
    """
    if trace.num_tokens == 0:
        return trace, np.zeros(0, dtype=np.int64)
    _, first = np.unique(_route_keys(trace), axis=0, return_index=True)
    kept = np.sort(first).astype(np.int64)
    return trace.select(kept), kept


@dataclass(frozen=True, kw_only=True)
class TraceSplit:
    """Tokens to fit a plan on and tokens from other files to evaluate it on.

    Attributes:
        fit, eval: the two traces (deduplicated when asked).
        fit_sources, eval_sources: the ``source`` of each input trace on either side.
        fit_duplicates, eval_duplicates: tokens dropped as repeated routes within a side.
        eval_seen_in_fit: eval tokens whose route (and token id) also occurs in ``fit`` and that
            were dropped (0 when ``drop_seen_in_fit`` was False).
    """

    fit: RoutingTrace
    eval: RoutingTrace
    fit_sources: tuple[str, ...]
    eval_sources: tuple[str, ...]
    fit_duplicates: int
    eval_duplicates: int
    eval_seen_in_fit: int


def cross_domain_split(
    fit: Sequence[RoutingTrace],
    eval: Sequence[RoutingTrace],
    *,
    dedup: bool = True,
    drop_seen_in_fit: bool = False,
) -> TraceSplit:
    """Fit on some files (workloads) and evaluate on others.

    Args:
        fit, eval: traces, typically one per file (read with ``read_traces(path)``).
        dedup: drop repeated routes within each side (keep first), as ``dedup_routes``.
        drop_seen_in_fit: also drop eval tokens whose exact route occurs in the fit side.
    """
    if not fit or not eval:
        raise ValueError("cross_domain_split: need at least one fit trace and one eval trace")
    fit_tr, eval_tr = RoutingTrace.concat(list(fit)), RoutingTrace.concat(list(eval))
    fit_dup = eval_dup = seen = 0
    if dedup:
        n = fit_tr.num_tokens
        fit_tr, _ = dedup_routes(fit_tr)
        fit_dup = n - fit_tr.num_tokens
        n = eval_tr.num_tokens
        eval_tr, _ = dedup_routes(eval_tr)
        eval_dup = n - eval_tr.num_tokens
    if drop_seen_in_fit and eval_tr.num_tokens and fit_tr.num_tokens:
        fk, ek = _route_keys(fit_tr), _route_keys(eval_tr)
        if fk.shape[1] != ek.shape[1]:
            raise ValueError("cross_domain_split: one side has token ids and the other not; "
                             "cannot compare routes")
        fit_set = {row.tobytes() for row in fk}
        keep = np.array([row.tobytes() not in fit_set for row in ek])
        seen = int((~keep).sum())
        eval_tr = eval_tr.select(np.flatnonzero(keep))
    return TraceSplit(
        fit=fit_tr,
        eval=eval_tr,
        fit_sources=tuple(t.source for t in fit),
        eval_sources=tuple(t.source for t in eval),
        fit_duplicates=fit_dup,
        eval_duplicates=eval_dup,
        eval_seen_in_fit=seen,
    )


def leave_one_out_splits(
    traces: Sequence[RoutingTrace], *, dedup: bool = True, drop_seen_in_fit: bool = False
) -> list[TraceSplit]:
    """One split per trace: evaluate on it, fit on all the others (in their given order)."""
    if len(traces) < 2:
        raise ValueError(f"leave_one_out_splits: need at least 2 traces (files), got {len(traces)}")
    return [
        cross_domain_split([t for j, t in enumerate(traces) if j != i], [traces[i]],
                           dedup=dedup, drop_seen_in_fit=drop_seen_in_fit)
        for i in range(len(traces))
    ]
