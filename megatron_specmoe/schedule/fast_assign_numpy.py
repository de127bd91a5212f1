"""The CPU twin of the ``prices`` assignment (``schedule/fast_assign.py``), in numpy.

Notation (as ``fast_assign``)
    T: real tokens.   P: ranks.   C = ceil(T / P).   T_pad = P * C.   pads = T_pad - T.
    s: float32 [T, P] rank scores.   s_ext: float32 [T_pad, P], the scores with the tie-break and
    the pad rows.   lam: float32 [P], the ranks' prices.

Why. On the CPU each of the torch reference's some 30 op calls costs tens of microseconds of
dispatch, several times the arithmetic at the sizes a shuffle layer plans (T = 512, P = 4 in the
demo: about 0.5 ms per MoE layer on one core, the largest cost specmoe adds to a forward there).
This function performs the same float32 steps with numpy and returns the same plan, bit for bit
(``tests/test_fast_assign.py`` compares them on random, tied and padded scores). The torch code
stays the reference and the device path; nothing here runs on a GPU, and launch counts never count
this function (``prices_plan(backend="torch")`` is what they count).

Same steps, same numbers: every float is float32 and every float operation is the torch code's
(elementwise add / subtract / multiply / divide are correctly rounded in both); the selections
(k-th smallest, top-2, first maximum) pick values or first indices, so they agree exactly; sorts
are stable on the same integer keys.
"""

from __future__ import annotations

import numpy as np

__all__ = ["prices_plan_numpy"]


def _extended(scores: np.ndarray, big: float, tie_break: float) -> np.ndarray:
    """s_ext float32 [T_pad, P]: ``fast_assign._extended`` in numpy."""
    t, p = scores.shape
    c = -(-t // p)
    pads = p * c - t
    full = (p - pads) * c
    row = np.arange(t, dtype=np.int64)
    shard = np.where(row < full, row // c, (p - pads) + (row - full) // max(c - 1, 1))
    dist = (np.arange(p, dtype=np.int64)[None, :] - shard[:, None] + p) % p
    # The tie-break takes P distinct values: the torch code's float32 steps, done on those P.
    bonus = np.float32(tie_break) * (np.float32(1.0) - np.arange(p, dtype=np.float32) / np.float32(p))
    out = np.empty((p * c, p), dtype=np.float32)
    np.add(scores, bonus[dist], out=out[:t])
    if pads:
        block = np.full((pads, p), -big, dtype=np.float32)
        block[np.arange(pads), np.arange(p - pads, p)] = big
        out[t:] = block
    return out


def _falling(x: np.ndarray) -> np.ndarray:
    """``fast_assign._falling``: int64, smaller for larger float32 x, equal for equal x."""
    bits = (x + np.float32(0.0)).view(np.int32)
    rising = bits ^ ((bits >> 31) & np.int32(0x7FFFFFFF))
    return np.int64(0x7FFFFFFF) - rising.astype(np.int64)


def prices_plan_numpy(
    scores: np.ndarray, iterations: int, damp: float, big: float, tie_break: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``fast_assign._prices_plan_torch`` on the CPU.

    Args:
        scores: float32 [T, P], T >= 1, P >= 1 (finite, |s| < 2^40; not checked here).
        iterations, damp: the price updates (``prices_plan``'s arguments, already checked).
        big, tie_break: ``fast_assign.BIG`` and ``fast_assign.TIE_BREAK``.

    Returns:
        (home_ext, order, inverse), int64 [T_pad] each (``fast_assign.FastPlan``'s fields).
    """
    scores = np.ascontiguousarray(scores, dtype=np.float32)
    t, p = scores.shape
    c = -(-t // p)
    t_pad = p * c
    rows = np.arange(t_pad, dtype=np.int64)
    if p == 1:
        return np.zeros(t_pad, dtype=np.int64), rows, rows.copy()
    # Ranks along rows ([P, T_pad]): the reductions over ranks and the selection over rows then
    # run along contiguous memory.
    ext_t = np.ascontiguousarray(_extended(scores, big, tie_break).T)
    lam = np.zeros((p, 1), dtype=np.float32)
    step = np.float32(damp)
    cols = np.arange(t_pad, dtype=np.int64)
    for _ in range(iterations):
        red = ext_t - lam
        # topk(2)'s values: the best, and the best after removing the first best (ties kept).
        best = red.max(axis=0)
        rest = red.copy()
        rest[red.argmax(axis=0), cols] = -np.inf
        second = rest.max(axis=0)
        other = np.where(red == best, second, best)
        q = np.partition(red - other, t_pad - c, axis=1)[:, t_pad - c : t_pad - c + 1]  # (T_pad - C + 1)-th smallest
        lam = lam + step * q
    red = ext_t - lam
    ask = red.argmax(axis=0)  # first maximum
    score = red[ask, cols]
    key = (ask.astype(np.int64) << 32) + _falling(score)
    idx = np.argsort(key, kind="stable")
    s_ask = key[idx] >> 32
    starts = np.searchsorted(s_ask, np.arange(p + 1, dtype=np.int64))
    accept = rows - starts[s_ask] < c
    rejected_nth = np.cumsum(~accept) - 1
    free = c - np.minimum(starts[1:] - starts[:-1], c)
    fill = np.minimum(np.searchsorted(np.cumsum(free), rejected_nth, side="right"), p - 1)
    home_ext = np.empty(t_pad, dtype=np.int64)
    home_ext[idx] = np.where(accept, s_ask, fill)
    small = np.int8 if p <= 127 else np.int16 if p <= 32767 else np.int64
    order = np.argsort(home_ext.astype(small), kind="stable").astype(np.int64)
    inverse = np.empty(t_pad, dtype=np.int64)
    inverse[order] = rows
    return home_ext, order, inverse
