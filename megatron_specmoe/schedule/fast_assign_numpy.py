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

Cheap per call. What depends only on (T, P) (the tie-break and pad rows of s_ext, the row
indices) is made once per shape and kept read-only (``_constants``, a bounded memo of a pure
function: nothing a caller can observe or change); a call then performs some 30 numpy operations.
"best of the other ranks" is the top-2 of torch's code as selections over the P ranks (the maximum,
and the maximum of the others, which is the maximum again where two ranks tie for it).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

__all__ = ["prices_plan_numpy"]


@lru_cache(maxsize=64)
def _constants(t: int, p: int, big: float, tie_break: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(template float32 [P, T_pad], rows int64 [T_pad], bounds int64 [P + 1]), read-only.

    template: s_ext minus the scores, ranks along rows: ``fast_assign._extended``'s tie-break on the
    T real columns, the pad rows' +-BIG on the others (s_ext.T = template + scores.T on the real
    columns, the template itself on the pad columns). rows: 0 .. T_pad - 1. bounds: 0 .. P.
    """
    c = -(-t // p)
    pads = p * c - t
    full = (p - pads) * c
    row = np.arange(t, dtype=np.int64)
    shard = np.where(row < full, row // c, (p - pads) + (row - full) // max(c - 1, 1))
    dist = (np.arange(p, dtype=np.int64)[None, :] - shard[:, None] + p) % p
    # The tie-break takes P distinct values: the torch code's float32 steps, done on those P.
    bonus = np.float32(tie_break) * (np.float32(1.0) - np.arange(p, dtype=np.float32) / np.float32(p))
    template = np.empty((p, p * c), dtype=np.float32)
    template[:, :t] = bonus[dist].T
    if pads:
        block = np.full((pads, p), -big, dtype=np.float32)
        block[np.arange(pads), np.arange(p - pads, p)] = big
        template[:, t:] = block.T
    rows = np.arange(p * c, dtype=np.int64)
    bounds = np.arange(p + 1, dtype=np.int64)
    for a in (template, rows, bounds):
        a.setflags(write=False)
    return template, rows, bounds


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
    scores = np.asarray(scores, dtype=np.float32)
    t, p = scores.shape
    c = -(-t // p)
    t_pad = p * c
    if p == 1:
        rows = np.arange(t_pad, dtype=np.int64)
        return np.zeros(t_pad, dtype=np.int64), rows, rows.copy()
    template, rows, bounds = _constants(t, p, float(big), float(tie_break))
    # s_ext with ranks along rows ([P, T_pad]): the reductions over ranks and the selection over
    # rows then run along contiguous memory.
    ext_t = template.copy()
    np.add(scores.T, template[:, :t], out=ext_t[:, :t])
    lam = np.zeros((p, 1), dtype=np.float32)
    step = np.float32(damp)
    kth = t_pad - c
    for _ in range(iterations):
        red = ext_t - lam
        # The best of the other ranks, max over q != r of red[q]: torch's where(red == top1, top2,
        # top1), top2 being top1 again where two ranks tie for it (selections: exact).
        top1 = red.max(axis=0)
        is_top = red == top1
        top2 = np.where(is_top, -np.inf, red).max(axis=0)
        top2 = np.where(is_top.sum(axis=0) > 1, top1, top2)
        margin = np.subtract(red, np.where(is_top, top2, top1), out=red)
        lam = lam + step * np.partition(margin, kth, axis=1)[:, kth : kth + 1]  # (T_pad - C + 1)-th smallest
    red = ext_t - lam
    ask = red.argmax(axis=0)  # first maximum
    key = (ask << 32) + _falling(red.max(axis=0))
    idx = np.argsort(key, kind="stable")
    s_ask = key[idx] >> 32
    starts = np.searchsorted(s_ask, bounds)
    accept = rows - starts[s_ask] < c
    rejected_nth = np.cumsum(~accept) - 1
    free = c - np.minimum(np.diff(starts), c)
    fill = np.minimum(np.searchsorted(np.cumsum(free), rejected_nth, side="right"), p - 1)
    home_ext = np.empty(t_pad, dtype=np.int64)
    home_ext[idx] = np.where(accept, s_ask, fill)
    small = np.int8 if p <= 127 else np.int16 if p <= 32767 else np.int64
    order = np.argsort(home_ext.astype(small), kind="stable")
    inverse = np.empty(t_pad, dtype=np.int64)
    inverse[order] = rows
    return home_ext, order, inverse
