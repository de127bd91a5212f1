"""The run-time balanced assignment in a fixed, small number of device steps: method ``"prices"``.

Notation
    T: real tokens of the shuffle domain.   P: ranks (2 .. 64 on the Triton path).
    C: rows per rank, C = ceil(T / P).   T_pad = P * C.   pads = T_pad - T (< P).
    s: float32 [T, P] rank scores (``predict.base.rank_scores``); |s| < 2^40.
    s_ext: float32 [T_pad, P]: s, then one row per pad: pad row T + i sits on rank P - pads + i
        (``assignment``'s padding rule), scoring +BIG there and -BIG elsewhere (BIG = 2^64), so
        that it never moves and takes one of its rank's C rows.
    lam: float32 [P], one price per rank (the dual variables of the capacity constraints).

Why. ``assignment``'s ``refine`` is within 0.5% of the optimum but issues some 300 aten ops per
call on a device (P = 8); the plan then costs more launches than the collectives it trims. This
method reaches nearly the same local activation rate (within 0.004 with the history MLP's scores of
the Mixtral traces at EP 4 and 8, ``tools/bench_plan.py``; up to 0.025 below with tied scores such
as pregate's counts, where refine's exchange sweeps untie better) with a number of steps that depends on nothing but the ``iterations``
argument: 7 kernel launches on the Triton path for any T and P (``fast_assign_triton``), 64
aten kernels on the plain torch path (the reference, used on a device where triton is
absent; the CPU runs its numpy twin, ``fast_assign_numpy``). No host
synchronisation, no data-dependent shape: CUDA-graph capturable.

Method ("prices": price iterations, then one greedy round).
    Step 0, the tie-break: row t gains TIE_BREAK * (1 - ((r - c_t) mod P) / P) on rank r, c_t the rank
        of t's contiguous shard (``assignment``'s "contiguous"; TIE_BREAK = 1e-4): c_t most, then the next ranks cyclically). Scores that tie (pregate's
        counts, equal shares) then differ a little, so that prices can split the rows between the
        tied ranks instead of every row asking for the lower one; equal scores give the contiguous
        shards. A plan loses at most 1e-4 per row of the objective to it.
    Step 1, ``iterations`` (2) price updates, lam starting at 0: with red = s_ext - lam, each row's
        margin for rank r is e[t, r] = red[t, r] - max over q != r of red[t, q] (> 0 only on the
        row's unique best rank). q_r = the C-th largest e[:, r] over all T_pad rows: positive when
        more than C rows prefer r (r is over-asked: raise its price), negative when fewer do.
        lam += damp * q (damp 0.5: every rank moves at once, a full step overshoots).
    Step 2, one greedy round on red = s_ext - lam: every row asks for its best rank (first
        maximum: ties go to the lower rank); rows are sorted by (asked rank, falling reduced
        score, row index) and each rank keeps the first C rows of its group (its pad row first).
        The rejected rows, in that sorted order, fill the free rows, rank by rank.
    Step 3, the permutation: ``order`` lists each rank's rows by increasing index (a stable sort of
        the home ranks: real tokens in index order, then the pad row, >= T), ``inverse`` its inverse.
Uninformative scores (all equal) give the contiguous shards; every step is deterministic on a
given device (first-maximum argmax, stable sorts, exact selections), so every TP rank computes the
same permutation from the same scores.

Backends (``Backend``): "torch" (any device; the reference), "triton" (``fast_assign_triton``:
a CUDA tensor, or any tensor under ``TRITON_INTERPRET=1``), "numpy" (``fast_assign_numpy``: a CPU
tensor; the same steps without torch's per-op dispatch, several times faster at run-time sizes),
"auto" (triton where it can run, else numpy on the CPU, else torch). All give identical plans
(tests compare them, triton in the interpreter).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Literal, get_args

import torch

__all__ = ["Backend", "FastPlan", "prices_plan", "triton_usable", "PRICE_ITERATIONS", "PRICE_DAMP"]

Backend = Literal["auto", "torch", "triton", "numpy"]

PRICE_ITERATIONS = 2
PRICE_DAMP = 0.5
# The pad rows' score on their own rank (minus elsewhere): larger than any |s| + |lam| so that a
# pad row never moves, small enough that BIG - lam stays exact to the last bits that matter.
BIG = float(2.0**64)
# Step 0's tie-break: row t gains TIE_BREAK * (1 - ((r - c_t) mod P) / P) on rank r.
TIE_BREAK = 1e-4


@dataclass(frozen=True, kw_only=True)
class FastPlan:
    """The tensors of one plan (``assignment.ShufflePlan`` wraps them).

    Attributes:
        home_ext: int64 [T_pad], the rank of every row, pad rows (>= T) included.
        order: int64 [T_pad], rank r holds rows ``order[r*C:(r+1)*C]`` (real rows by index, then
            its pad row).
        inverse: int64 [T_pad], ``inverse[order[i]] == i``.
        capacity: C.
    """

    home_ext: torch.Tensor
    order: torch.Tensor
    inverse: torch.Tensor
    capacity: int


def triton_usable(device: torch.device) -> bool:
    """True when the Triton kernels can run on ``device``: triton importable and a CUDA device, or
    any device with ``TRITON_INTERPRET=1`` (Triton's interpreter, for tests on the CPU)."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    # find_spec, not import: importing triton fixes its interpreter switch for the process.
    return importlib.util.find_spec("triton") is not None


def prices_plan(
    scores: torch.Tensor,
    *,
    iterations: int = PRICE_ITERATIONS,
    damp: float = PRICE_DAMP,
    backend: Backend = "auto",
) -> FastPlan:
    """The balanced plan by price iterations and one greedy round (module docstring).

    Args:
        scores: float32 [T, P] rank scores on any device, finite, |s| < 2^40; T >= 1, P >= 1.
        iterations: price updates (>= 0); 2 reaches ``refine``'s rate on the Mixtral traces.
        damp: step size of a price update, in (0, 1].
        backend: "auto", "torch", "triton" (refused where triton cannot run) or "numpy" (refused
            for a tensor that is not on the CPU).

    Returns:
        FastPlan on the device of ``scores``.
    """
    if backend not in get_args(Backend):
        raise ValueError(f"prices_plan: backend={backend!r}; choose one of {get_args(Backend)}")
    if scores.dim() != 2 or scores.shape[0] < 1 or scores.shape[1] < 1:
        raise ValueError(f"prices_plan: scores must be [T, P] with T, P >= 1, got {tuple(scores.shape)}")
    if iterations < 0 or not 0.0 < damp <= 1.0:
        raise ValueError(f"prices_plan: iterations must be >= 0 and damp in (0, 1], got {iterations}, {damp}")
    t, p = scores.shape
    use_triton = backend == "triton" or (backend == "auto" and triton_usable(scores.device))
    if use_triton:
        if not triton_usable(scores.device):
            raise ValueError(
                "prices_plan: backend='triton' needs triton and a CUDA tensor (or TRITON_INTERPRET=1); "
                "use backend='torch' or 'auto'"
            )
        if not 2 <= p <= 64:
            raise ValueError(f"prices_plan: the Triton kernels take 2 <= P <= 64 ranks, got P={p}; use backend='torch'")
        from megatron_specmoe.schedule.fast_assign_triton import prices_plan_triton

        home_ext, order, inverse = prices_plan_triton(scores.float().contiguous(), iterations, damp, BIG, TIE_BREAK)
        return FastPlan(home_ext=home_ext, order=order, inverse=inverse, capacity=-(-t // p))
    if backend == "numpy" or (backend == "auto" and scores.device.type == "cpu"):
        if scores.device.type != "cpu":
            raise ValueError(f"prices_plan: backend='numpy' needs a CPU tensor, got {scores.device}; "
                             "use backend='auto' or 'torch'")
        from megatron_specmoe.schedule.fast_assign_numpy import prices_plan_numpy

        home_ext, order, inverse = prices_plan_numpy(scores.detach().float().numpy(), iterations, damp, BIG, TIE_BREAK)
        return FastPlan(home_ext=torch.from_numpy(home_ext), order=torch.from_numpy(order),
                        inverse=torch.from_numpy(inverse), capacity=-(-t // p))
    return _prices_plan_torch(scores.float(), iterations, damp)


def _extended(scores: torch.Tensor) -> torch.Tensor:
    """s_ext float32 [T_pad, P] (notation): the scores plus the tie-break, then the pad rows."""
    t, p = scores.shape
    c = -(-t // p)
    pads = p * c - t
    # The contiguous shards' rank of each row: C real rows on the first P - pads ranks, C - 1 after.
    full = (p - pads) * c
    row = torch.arange(t, device=scores.device).view(-1, 1)
    shard = torch.where(row < full, row // c, (p - pads) + (row - full) // max(c - 1, 1))
    dist = (torch.arange(p, device=scores.device).view(1, -1) - shard + p) % p
    scores = scores + TIE_BREAK * (1.0 - dist.float() / p)
    if not pads:
        return scores
    own = torch.arange(p - pads, p, device=scores.device).view(-1, 1)
    block = torch.where(own == torch.arange(p, device=scores.device).view(1, -1), BIG, -BIG).float()
    return torch.cat([scores, block])


def _falling(x: torch.Tensor) -> torch.Tensor:
    """int64 in 0 .. 2^32 - 1, smaller for larger float32 ``x`` (no NaN), equal for equal x: the
    float's bits made monotone (-0.0 first made +0.0)."""
    bits = (x + 0.0).view(torch.int32)
    rising = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return 0x7FFFFFFF - rising.long()


def _prices_plan_torch(scores: torch.Tensor, iterations: int, damp: float) -> FastPlan:
    """The reference: plain torch ops, any device, fixed shapes, no host synchronisation."""
    t, p = scores.shape
    c = -(-t // p)
    t_pad = p * c
    device = scores.device
    s_ext = _extended(scores)
    rows = torch.arange(t_pad, device=device)
    if p == 1:
        home_ext = torch.zeros(t_pad, dtype=torch.int64, device=device)
        return FastPlan(home_ext=home_ext, order=rows, inverse=rows.clone(), capacity=c)
    # Step 1: price updates (lam += damp * q, q = the C-th largest margin of each rank).
    lam = torch.zeros(p, device=device)
    for _ in range(iterations):
        red = s_ext - lam
        top = red.topk(2, dim=1).values
        other = torch.where(red == top[:, :1], top[:, 1:], top[:, :1])  # best of the other ranks
        q = (red - other).kthvalue(t_pad - c + 1, dim=0).values
        lam = lam + damp * q
    # Step 2: one greedy round: sort by (asked rank, falling reduced score, row); each rank keeps
    # the first C of its group, the rejected rows fill the free rows in that order.
    score, ask = (s_ext - lam).max(dim=1)
    key, idx = torch.sort((ask << 32) + _falling(score), stable=True)
    s_ask = key >> 32
    starts = torch.searchsorted(s_ask, torch.arange(p + 1, device=device))  # [P + 1] group bounds
    accept = rows - starts[s_ask] < c
    rejected_nth = torch.cumsum(~accept, 0) - 1
    free = c - (starts[1:] - starts[:-1]).clamp(max=c)
    fill = torch.searchsorted(torch.cumsum(free, 0), rejected_nth, right=True).clamp(max=p - 1)
    home_ext = torch.empty_like(idx).scatter_(0, idx, torch.where(accept, s_ask, fill))
    # Step 3: the permutation and its inverse.
    order = torch.sort(home_ext, stable=True).indices
    inverse = torch.empty_like(order).scatter_(0, order, rows)
    return FastPlan(home_ext=home_ext, order=order, inverse=inverse, capacity=c)
