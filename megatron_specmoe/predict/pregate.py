"""Rank scores from router logits (the ``pregate`` predictor's step between the gate and the plan).

Notation
    T: tokens.   E: routed experts (logical).   k: top-k.   P: TP ranks of the shuffle domain.

``topk_rank_scores`` counts, per token, how many of its top-k experts each TP rank hosts: the rank
scores ``assignment.assign`` balances (the shuffle layer's "pregate" predictor). Ties between equal
logits go to the lower expert index on every device (``torch.topk`` leaves the choice open), and on
the CPU it runs in numpy on the transposed [E, T] logits, where a maximum over experts is an elementwise
maximum of E rows instead of a reduction over E columns of every row (T = 8192, E = 8, k = 2 on
one thread: about 0.15 ms, torch.topk and scatter_add about 0.55 ms).

With sequence parallelism the shuffle layer splits the work: each TP rank takes ``top_experts``
of its own shard's rows (1/P of the gating), the k ids ride along with the all-gather the layer
performs anyway, and every rank turns the gathered ids into rank scores with
``expert_rank_counts`` (identical bytes in, identical scores out on every rank).

Method: k rounds; in each, every token takes its largest logit among the experts not yet taken
(the first such expert on ties), then each TP rank's score is the number of taken experts it hosts.
Torch, any device; numpy on the CPU with the same result (tests compare them). Fixed shapes, no
host synchronisation on a GPU.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["topk_rank_scores", "top_experts", "expert_rank_counts", "span_hosts", "rank_scores_from_logits",
           "rank_scores_from_experts"]


def topk_rank_scores(
    logits: torch.Tensor,
    *,
    k: int,
    rank_of: torch.Tensor,
    ep_base: int,
    tp: int,
    numpy_on_cpu: bool = True,
) -> torch.Tensor:
    """How many of each token's top-k experts each TP rank hosts.

    Args:
        logits: float [T, E], router logits (logical experts), on any device; finite.
        k: top-k, 1 .. E.
        rank_of: int64 [E], EP rank hosting each logical expert (``placement.rank_of_logical()``).
        ep_base: EP rank of TP rank 0 (the TP group spans EP ranks ep_base .. ep_base + tp - 1).
        tp: P.
        numpy_on_cpu: on the CPU, run the numpy version (same result); False: the torch one.

    Returns:
        float32 [T, P] on the device of ``logits``; experts outside the TP group's span count
        nowhere. Equal logits: the lower expert index is taken first.

    Raises:
        ValueError: ``logits`` not 2-D, ``k`` outside 1 .. E, ``rank_of`` not of shape [E], or
            ``tp`` < 1.
    """
    if logits.dim() != 2:
        raise ValueError(f"topk_rank_scores: logits must be [T, E], got shape {tuple(logits.shape)}")
    t, e = logits.shape
    if not 1 <= k <= e:
        raise ValueError(f"topk_rank_scores: k={k} must be in 1 .. E={e} (the router's top-k)")
    if tuple(rank_of.shape) != (e,):
        raise ValueError(
            f"topk_rank_scores: rank_of must have shape ({e},) (one EP rank per logical expert), "
            f"got {tuple(rank_of.shape)}"
        )
    if tp < 1:
        raise ValueError(f"topk_rank_scores: tp must be >= 1, got {tp}")
    device = logits.device
    if numpy_on_cpu and device.type == "cpu":
        local = rank_of.detach().cpu().numpy().astype(np.int64) - ep_base
        inside = ((local >= 0) & (local < tp)).astype(np.float32)
        local = local.clip(0, tp - 1)
        out = np.zeros(t * tp, dtype=np.float32)  # [T, P], flat
        row = np.arange(t, dtype=np.int64) * tp
        for pick in _picks_numpy(logits.detach().float().numpy(), k):
            out[row + local[pick]] += inside[pick]  # one pick per token: no repeated index
        return torch.from_numpy(out.reshape(t, tp))
    hosts = span_hosts(rank_of.to(device), ep_base=ep_base, tp=tp)
    # Torch: taken[t, x] after k rounds of the first maximum among the experts not yet taken.
    values = logits.float()
    taken = torch.zeros(t, e, dtype=torch.bool, device=device)
    weight = torch.arange(e - 1, -1, -1, device=device)  # larger for lower experts
    for _ in range(k):
        cand = values.masked_fill(taken, float("-inf"))
        best = cand.max(dim=1, keepdim=True).values
        first = (((cand == best) & ~taken) * weight).max(dim=1, keepdim=True).values
        taken = taken | (weight == first)
    return taken.float() @ hosts


def _picks_numpy(logits: np.ndarray, k: int) -> np.ndarray:
    """int64 [k, T]: the expert each token takes in each round (``logits`` float32 [T, E]).

    Taken experts are set to NaN, which ``fmax`` skips and ``==`` never matches, so an untaken
    expert at -inf can still be taken."""
    t, e = logits.shape
    cand = np.array(logits.T, order="C")  # [E, T] copy: maxima over experts run along rows
    weight = np.arange(e - 1, -1, -1, dtype=np.uint8 if e <= 256 else np.int64)[:, None]
    picks = np.empty((k, t), dtype=np.int64)
    tok = np.arange(t)
    for i in range(k):
        best = np.fmax.reduce(cand, axis=0)
        picks[i] = (e - 1) - ((cand == best) * weight).max(axis=0).astype(np.int64)  # first maximum
        cand[picks[i], tok] = np.nan
    return picks


def span_hosts(rank_of: torch.Tensor, *, ep_base: int, tp: int) -> torch.Tensor:
    """float32 [E, P] on ``rank_of``'s device: 1 where TP rank r of the span ep_base .. ep_base +
    tp - 1 hosts logical expert x (``rank_of`` int64 [E]); rows of experts outside the span are 0.
    ``expert_scores @ span_hosts(...)`` sums expert scores [T, E] per TP rank."""
    local = rank_of.to(torch.int64) - ep_base
    return (local.view(-1, 1) == torch.arange(tp, device=rank_of.device).view(1, -1)).float()


def top_experts(logits: torch.Tensor, k: int, *, numpy_on_cpu: bool = True) -> torch.Tensor:
    """int64 [T, k]: each token's k largest logits' experts, in the order taken (ties: the lower
    expert index first), on the device of ``logits`` float [T, E]; numpy on the CPU unless
    ``numpy_on_cpu`` is False (same result)."""
    if logits.dim() != 2 or not 1 <= k <= logits.shape[1]:
        raise ValueError(f"top_experts: logits must be [T, E] with 1 <= k <= E, got {tuple(logits.shape)} and k={k}")
    if numpy_on_cpu and logits.device.type == "cpu":
        return torch.from_numpy(np.ascontiguousarray(_picks_numpy(logits.detach().float().numpy(), k).T))
    values = logits.float()
    t, e = values.shape
    weight = torch.arange(e - 1, -1, -1, device=values.device)
    taken = torch.zeros(t, e, dtype=torch.bool, device=values.device)
    picks = []
    for _ in range(k):
        cand = values.masked_fill(taken, float("-inf"))
        best = cand.max(dim=1, keepdim=True).values
        first = (((cand == best) & ~taken) * weight).max(dim=1).values  # [T]
        picks.append((e - 1) - first)
        taken = taken | (weight.view(1, -1) == first.view(-1, 1))
    return torch.stack(picks, dim=1)


def expert_rank_counts(experts: torch.Tensor, *, rank_of: torch.Tensor, ep_base: int, tp: int) -> torch.Tensor:
    """float32 [T, P]: how many of each token's experts (``experts`` int [T, k], logical ids) each
    TP rank of the span ep_base .. ep_base + tp - 1 hosts; experts outside the span count nowhere.
    ``expert_rank_counts(top_experts(logits, k), ...) == topk_rank_scores(logits, k=k, ...)``."""
    local = rank_of.to(device=experts.device, dtype=torch.int64)[experts.long()] - ep_base  # [T, k]
    inside = (local >= 0) & (local < tp)
    out = torch.zeros(experts.shape[0], tp, dtype=torch.float32, device=experts.device)
    out.scatter_add_(1, local.clamp(0, tp - 1), inside.float())
    return out


def rank_scores_from_logits(logits: torch.Tensor, *, k: int, hosts: torch.Tensor) -> torch.Tensor:
    """``topk_rank_scores`` in three device launches for the run-time plan: a stable descending
    sort of each row (equal logits: the lower expert first, the same experts as the k rounds), a
    gather of the k experts' rows of ``hosts`` and their sum.

    Args:
        logits: float [T, E] router logits on any device.   k: top-k, 1 .. E.
        hosts: float32 [E, P], ``span_hosts(rank_of, ep_base=..., tp=P)`` (made once per placement).

    Returns:
        float32 [T, P], equal to ``topk_rank_scores(logits, k=k, rank_of=..., ep_base=..., tp=P)``.
    """
    if logits.dim() != 2 or not 1 <= k <= logits.shape[1] or hosts.shape[0] != logits.shape[1]:
        raise ValueError(f"rank_scores_from_logits: logits [T, E] with 1 <= k <= E and hosts [E, P] needed, got "
                         f"{tuple(logits.shape)}, k={k}, hosts {tuple(hosts.shape)}")
    experts = torch.sort(logits, dim=1, descending=True, stable=True).indices[:, :k]
    return hosts[experts].sum(dim=1)


def rank_scores_from_experts(experts: torch.Tensor, *, hosts: torch.Tensor) -> torch.Tensor:
    """``expert_rank_counts`` in two device launches: float32 [T, P] from ``experts`` int [T, k]
    (logical ids) and ``hosts`` float32 [E, P] (``span_hosts``)."""
    return hosts[experts].sum(dim=1)
