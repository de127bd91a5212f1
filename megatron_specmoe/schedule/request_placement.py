"""Request placement for data-parallel attention (TP = 1): s-TS one level up.

With DP attention a token cannot leave its rank (its KV cache lives there), so instead of
shuffling tokens we choose, when a request arrives, which DP rank serves it: the rank whose experts
its tokens are predicted to use, under a balance constraint. With DP attention the attention DP
ranks are the EP ranks, so a request placed on rank r has home rank r for all its tokens.

Notation
    R: requests in the window being placed.   P: DP (= EP) ranks.   E: experts.
    affinity: float32 [R, P], the predicted number of the request's (token, expert) pairs that
              rank r hosts (``request_affinity``).
    lengths:  int64 [R], tokens per request (prompt length, or expected total).

Methods (``RequestMethod``)
    "round_robin"  what every server does without prediction: request i to rank i mod P.
    "group_mask"   the paper's: requests are taken in arrival order in groups of P; within a group
                   each rank receives exactly one request (the round-robin mask keeps the request
                   counts balanced), and the one-to-one matching maximises the group's predicted
                   local pairs (an exact P x P assignment).
    "balanced"     token-balanced greedy: longest requests first, each to the rank with the highest
                   affinity per token among ranks whose token load stays within
                   ``(1 + slack) * mean``; for mixed prompt lengths, where equal counts are not equal
                   work.

Deterministic: ties go to the lower rank, then the earlier request.

How a front end calls it: every ``window`` new requests (or every scheduling tick), tokenize the
prompts, compute ``request_affinity`` with the plan's token predictor and placements, call
``place_requests``, and enqueue request i on DP rank ``placement.rank[i]`` (for Megatron's
inference engine: submit it to the engine process of that DP rank).

A coordinator that routes requests one at a time as they arrive (Megatron's
``DataParallelInferenceCoordinator``; ``megatron_lm/dp_coordinator.py`` plugs this in) uses
``online_rank``: each rank scores ``weight * share + (1 - weight) * free``, where share is the
request's predicted share of pairs on that rank (affinity / its row sum) and free the rank's free
request slots as a fraction of ``max_requests`` (Megatron's own load term); highest score wins,
ties to the lower rank. weight = 0 is Megatron's least-loaded routing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence, get_args

import numpy as np

from megatron_specmoe.schedule.placement import ExpertPlacement
from megatron_specmoe.predict.base import RouteContext, rank_scores

__all__ = ["RequestMethod", "RequestPlacement", "request_affinity", "place_requests", "online_rank",
           "TraceRequestMethod", "trace_request_homes", "trace_request_homes_from_scores"]

RequestMethod = Literal["round_robin", "group_mask", "balanced"]
# How ``trace_request_homes`` places a trace's requests (see its docstring).
TraceRequestMethod = Literal["round_robin", "least_loaded", "affinity", "group_mask"]


@dataclass(frozen=True, kw_only=True)
class RequestPlacement:
    """Attributes:
    rank: int64 [R], the DP rank of each request.
    tokens_per_rank: int64 [P], tokens placed on each rank.
    predicted_local_pairs: sum of affinity[i, rank[i]] (predicted local (token, expert) pairs).
    """

    rank: np.ndarray
    tokens_per_rank: np.ndarray
    predicted_local_pairs: float

    @property
    def token_imbalance(self) -> float:
        total = self.tokens_per_rank.sum()
        return float(self.tokens_per_rank.max() * len(self.tokens_per_rank) / total) if total else 1.0


def request_affinity(
    predictor, prompts: Sequence[np.ndarray], placements: Sequence[ExpertPlacement]
) -> np.ndarray:
    """float32 [R, P]: predicted pairs each rank would serve locally, summed over the request's
    tokens and all MoE layers, from a predictor that needs only token ids (e.g. the token table).

    Args:
        predictor: a fitted ``RoutePredictor`` answering ``RouteContext(layer, token_ids)``.
        prompts: R arrays of int64 token ids.
        placements: one ``ExpertPlacement`` per MoE layer (same EP size).
    """
    if not prompts:
        return np.zeros((0, placements[0].ep_size if placements else 1), dtype=np.float32)
    lengths = [len(p) for p in prompts]
    ids = np.concatenate([np.asarray(p, dtype=np.int64) for p in prompts])
    owner = np.repeat(np.arange(len(prompts)), lengths)
    out = np.zeros((len(prompts), placements[0].ep_size), dtype=np.float32)
    for layer, placement in enumerate(placements):
        scores = predictor.expert_scores(RouteContext(layer=layer, token_ids=ids))
        np.add.at(out, owner, rank_scores(scores, placement))
    return out


def _group_mask(affinity: np.ndarray) -> np.ndarray:
    from scipy.optimize import linear_sum_assignment

    r, p = affinity.shape
    rank = np.empty(r, dtype=np.int64)
    for start in range(0, r, p):
        block = affinity[start : start + p]
        rows, cols = linear_sum_assignment(-block.astype(np.float64))
        rank[start + rows] = cols
    return rank


def _balanced(affinity: np.ndarray, lengths: np.ndarray, slack: float) -> np.ndarray:
    r, p = affinity.shape
    cap = (1.0 + slack) * lengths.sum() / p
    load = np.zeros(p, dtype=np.int64)
    rank = np.empty(r, dtype=np.int64)
    per_token = affinity / np.maximum(lengths, 1)[:, None]
    for i in np.argsort(-lengths, kind="stable"):
        fits = load + lengths[i] <= cap
        if not fits.any():  # nothing fits: the least loaded rank (bounded overshoot)
            choice = int(np.argmin(load))
        else:
            choice = int(np.argmax(np.where(fits, per_token[i], -np.inf)))
        rank[i] = choice
        load[choice] += lengths[i]
    return rank


def place_requests(
    affinity: np.ndarray, lengths: np.ndarray, *, method: RequestMethod = "group_mask", slack: float = 0.05
) -> RequestPlacement:
    """Place R requests on P DP ranks (see the module docstring for the methods).

    Args:
        affinity: float32 [R, P] from ``request_affinity`` (or any predicted local-pairs matrix).
        lengths: int64 [R] tokens per request.
        method: one of ``RequestMethod``.
        slack: "balanced" only: allowed token overload per rank over the mean (0.05 = 5%).
    """
    if method not in get_args(RequestMethod):
        raise ValueError(f"place_requests: method={method!r}; choose one of {list(get_args(RequestMethod))}")
    aff = np.asarray(affinity, dtype=np.float32)
    lens = np.asarray(lengths, dtype=np.int64)
    if aff.ndim != 2 or lens.shape != (aff.shape[0],):
        raise ValueError(
            f"place_requests: affinity must be [R, P] and lengths [R]; got {aff.shape} and {lens.shape}"
        )
    if (lens < 0).any():
        raise ValueError("place_requests: lengths must be >= 0")
    if slack < 0:
        raise ValueError(f"place_requests: slack={slack} must be >= 0")
    r, p = aff.shape
    if method == "round_robin":
        rank = np.arange(r, dtype=np.int64) % p
    elif method == "group_mask":
        rank = _group_mask(aff)
    else:
        rank = _balanced(aff, lens, slack)
    tokens = np.bincount(rank, weights=lens, minlength=p).astype(np.int64)
    local = float(aff[np.arange(r), rank].sum()) if r else 0.0
    return RequestPlacement(rank=rank, tokens_per_rank=tokens, predicted_local_pairs=local)


def online_rank(affinity: np.ndarray, pending: np.ndarray, *, max_requests: int, weight: float = 0.5) -> int:
    """The rank for one arriving request (module docstring, "online").

    Args:
        affinity: float [P], the request's predicted local pairs per rank (a row of
            ``request_affinity``, mapped to the coordinator's rank order).
        pending: int [P], requests in flight per rank.
        max_requests: the most requests a rank holds at once (> 0).
        weight: in [0, 1], the share of the score given to affinity.
    """
    aff = np.asarray(affinity, dtype=np.float64)
    load = np.asarray(pending, dtype=np.float64)
    if aff.ndim != 1 or load.shape != aff.shape or aff.shape[0] < 1:
        raise ValueError(f"online_rank: affinity and pending must both be [P], got {aff.shape} and {load.shape}")
    if max_requests < 1:
        raise ValueError(f"online_rank: max_requests must be >= 1, got {max_requests}")
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"online_rank: weight must be in [0, 1], got {weight}")
    total = aff.sum()
    share = aff / total if total > 0 else np.zeros_like(aff)
    free = np.maximum(0.0, max_requests - load) / max_requests
    return int(np.argmax(weight * share + (1.0 - weight) * free))  # first maximum: the lower rank


def _request_bounds(request_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) int64 [R] of the requests of a trace (each request's tokens consecutive)."""
    rid = np.asarray(request_ids)
    if rid.ndim != 1 or rid.shape[0] == 0:
        raise ValueError("request placement needs request ids int [T] (traces with request ids)")
    starts = np.flatnonzero(np.r_[True, rid[1:] != rid[:-1]])
    if np.unique(rid[starts]).shape[0] != starts.shape[0]:
        raise ValueError("request placement needs each request's tokens to be consecutive in the trace")
    return starts, np.r_[starts[1:], rid.shape[0]]


def _place_trace_requests(affinity: Optional[np.ndarray], lengths: np.ndarray, num_ranks: int, method: str,
                          slots: int, weight: float) -> np.ndarray:
    """int64 [R]: each request's rank (``trace_request_homes``' methods); affinity float [R, P]."""
    n = lengths.shape[0]
    if method == "round_robin":
        return np.arange(n, dtype=np.int64) % num_ranks
    if method == "group_mask":
        return place_requests(affinity, lengths, method="group_mask").rank
    w = 0.0 if method == "least_loaded" else weight
    rank = np.empty(n, dtype=np.int64)
    pending = np.zeros(num_ranks, dtype=np.int64)
    for i in range(n):
        if i % (slots * num_ranks) == 0:
            pending[:] = 0
        rank[i] = online_rank(affinity[i], pending, max_requests=slots, weight=w)
        pending[rank[i]] += 1
    return rank


def _check_method(method: str) -> None:
    if method not in get_args(TraceRequestMethod):
        raise ValueError(f"request placement method {method!r}; choose one of {list(get_args(TraceRequestMethod))}")


def trace_request_homes(
    request_ids: np.ndarray,
    token_ids: Optional[np.ndarray],
    *,
    predictor,
    placements: Sequence[ExpertPlacement],
    method: str,
    prompt_share: float = 0.5,
    slots: int = 4,
    weight: float = 0.5,
) -> np.ndarray:
    """int64 [T]: the DP rank of every token when a trace's requests are placed whole, in arrival
    order (the order of their first tokens), for measuring request placement on routing traces.

    Methods (``TraceRequestMethod``):
        round_robin    request i on rank i mod P.
        least_loaded   Megatron's choice: ``online_rank`` with weight 0 (most free slots).
        affinity       ``online_rank`` with ``weight``, affinity from the request's first
                       ``prompt_share`` of tokens (its prompt) through ``request_affinity``.
        group_mask     ``place_requests(method="group_mask")`` on the same affinity.
    The online methods see requests in rounds of ``slots * P`` concurrent ones (every rank has
    ``slots`` request slots; a round starts with all of them free).

    Args:
        request_ids: int [T]; a request's tokens are consecutive.
        token_ids: int [T], needed by every method but round_robin.
        predictor: answers ``RouteContext(layer, token_ids)`` (e.g. the token table).
        placements: one ExpertPlacement per MoE layer (P from them).
    """
    _check_method(method)
    starts, ends = _request_bounds(request_ids)
    p = placements[0].ep_size
    aff = None
    if method not in ("round_robin", "least_loaded"):
        if token_ids is None:
            raise ValueError(f"request placement {method!r} predicts from token ids, and the trace has none; "
                             "use round_robin")
        prompts = [np.asarray(token_ids[s : s + max(1, int((e - s) * prompt_share))]) for s, e in zip(starts, ends)]
        aff = request_affinity(predictor, prompts, placements)
    elif method == "least_loaded":
        aff = np.zeros((starts.shape[0], p), dtype=np.float32)  # weight 0: affinity is not read
    rank = _place_trace_requests(aff, ends - starts, p, method, slots, weight)
    return np.repeat(rank, ends - starts)


def trace_request_homes_from_scores(
    request_ids: np.ndarray,
    token_rank_scores: np.ndarray,
    *,
    method: str,
    prompt_share: float = 0.5,
    slots: int = 4,
    weight: float = 0.5,
) -> np.ndarray:
    """int64 [T]: ``trace_request_homes`` with the affinity summed from given per-token rank
    scores (a request's affinity: the sum of its first ``prompt_share`` tokens' rows), for callers
    that already hold scores (the simulator: its ``--predictor``'s scores summed over layers).

    Args:
        request_ids: int [T]; a request's tokens are consecutive.
        token_rank_scores: float [T, P], each token's predicted pairs on each rank, all layers.
    """
    _check_method(method)
    starts, ends = _request_bounds(request_ids)
    scores = np.asarray(token_rank_scores, dtype=np.float32)
    if scores.ndim != 2 or scores.shape[0] != np.asarray(request_ids).shape[0]:
        raise ValueError(f"trace_request_homes_from_scores: token_rank_scores must be [T, P] with "
                         f"T={np.asarray(request_ids).shape[0]}, got {scores.shape}")
    prompt_ends = starts + np.maximum(1, ((ends - starts) * prompt_share).astype(np.int64))
    cum = np.concatenate([np.zeros((1, scores.shape[1]), np.float64), np.cumsum(scores, axis=0, dtype=np.float64)])
    aff = (cum[prompt_ends] - cum[starts]).astype(np.float32)
    rank = _place_trace_requests(aff, ends - starts, scores.shape[1], method, slots, weight)
    return np.repeat(rank, ends - starts)
