"""Triton kernels of ``fast_assign``'s "prices" method: the plan in 3 + 2 * iterations launches.

Notation as in ``fast_assign`` (T, P, C, T_pad, s_ext, lam, BIG); BP: P rounded up to a power of
two (<= 64); BT: rows per block.

Launches (iterations = 2: 7), each one a torch custom op (``specmoe::*``), so that a
``TorchDispatchMode`` sees it as one launch (``measure.launches``):
    ``specmoe::prices_margins`` x iterations   grid over row blocks: lam = lam_prev + damp * q_prev
        (0 at the first), red = s_ext - lam, the margins e [T_pad, P]; block 0 stores lam.
    ``aten::kthvalue`` x iterations             q = the C-th largest margin per rank.
    ``specmoe::prices_asks``                    the final lam, each row's first best rank and the sort
        key (asked rank << 32 | falling reduced score).
    ``aten::sort``                              stable sort of the keys.
    ``specmoe::prices_place``                   one program: group bounds, keep / fill (step 2), then
        the home ranks' counting sort into ``order`` and ``inverse`` (step 3).
Pad rows are made inside the kernels (no concatenation). The results equal ``fast_assign``'s torch
reference bit for bit (same float operations in the same order; tests compare them under
``TRITON_INTERPRET=1``).

Imported only when the Triton backend is used (``fast_assign.prices_plan``); registering the
custom ops is this module's import-time work.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["prices_plan_triton"]

_BT = 64  # rows per block


@triton.jit
def _scores_block(s_ptr, rows, cols, T, P, C, PAD0, BIG, TIE):
    """float32 [BT, BP]: s_ext rows ``rows`` (tie-break added, pad rows made here), -inf in
    columns >= P."""
    in_cols = cols[None, :] < P
    real = (rows[:, None] < T) & in_cols
    s = tl.load(s_ptr + rows[:, None] * P + cols[None, :], mask=real, other=0.0)
    full = PAD0 * C  # the first PAD0 = P - pads ranks hold C real rows, the others C - 1
    shard = tl.where(rows < full, rows // C, PAD0 + (rows - full) // tl.maximum(C - 1, 1))
    dist = (cols[None, :] - shard[:, None] + P) % P
    s = s + TIE * (1.0 - dist.to(tl.float32) / P)
    own = (PAD0 + rows[:, None] - T) == cols[None, :]
    pad = tl.where(own, BIG, -BIG)
    s = tl.where(rows[:, None] < T, s, pad)
    return tl.where(in_cols, s, float("-inf"))


@triton.jit
def _prices(lam_prev_ptr, q_prev_ptr, cols, P, damp, UPDATE: tl.constexpr, BP: tl.constexpr):
    """float32 [BP]: this iteration's prices, lam_prev + damp * q_prev (0 at the first): the one
    price update both kernels make."""
    if UPDATE:
        lam = tl.load(lam_prev_ptr + cols, mask=cols < P, other=0.0) + damp * tl.load(
            q_prev_ptr + cols, mask=cols < P, other=0.0)
    else:
        lam = tl.zeros([BP], dtype=tl.float32)
    return lam


@triton.jit
def _margins_kernel(s_ptr, lam_prev_ptr, q_prev_ptr, lam_ptr, e_ptr, T, T_PAD, P, PAD0, damp, BIG, TIE,
                    UPDATE: tl.constexpr, BT: tl.constexpr, BP: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BT + tl.arange(0, BT)
    cols = tl.arange(0, BP)
    lam = _prices(lam_prev_ptr, q_prev_ptr, cols, P, damp, UPDATE, BP)
    if pid == 0:
        tl.store(lam_ptr + cols, lam, mask=cols < P)
    red = _scores_block(s_ptr, rows, cols, T, P, T_PAD // P, PAD0, BIG, TIE) - lam[None, :]
    v0 = tl.max(red, axis=1)
    first = tl.min(tl.where(red == v0[:, None], cols[None, :], BP), axis=1)
    v1 = tl.max(tl.where(cols[None, :] == first[:, None], float("-inf"), red), axis=1)
    other = tl.where(red == v0[:, None], v1[:, None], v0[:, None])
    mask = (rows[:, None] < T_PAD) & (cols[None, :] < P)
    tl.store(e_ptr + rows[:, None] * P + cols[None, :], red - other, mask=mask)


@triton.jit
def _asks_kernel(s_ptr, lam_prev_ptr, q_prev_ptr, key_ptr, T, T_PAD, P, PAD0, damp, BIG, TIE,
                 UPDATE: tl.constexpr, BT: tl.constexpr, BP: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BT + tl.arange(0, BT)
    cols = tl.arange(0, BP)
    lam = _prices(lam_prev_ptr, q_prev_ptr, cols, P, damp, UPDATE, BP)
    red = _scores_block(s_ptr, rows, cols, T, P, T_PAD // P, PAD0, BIG, TIE) - lam[None, :]
    v0 = tl.max(red, axis=1)
    ask = tl.min(tl.where(red == v0[:, None], cols[None, :], BP), axis=1).to(tl.int64)
    bits = (v0 + 0.0).to(tl.int32, bitcast=True)
    rising = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    falling = 0x7FFFFFFF - rising.to(tl.int64)
    tl.store(key_ptr + rows, (ask << 32) + falling, mask=rows < T_PAD)


@triton.jit
def _place_kernel(key_ptr, idx_ptr, home_ptr, order_ptr, inverse_ptr, T_PAD, P, C,
                  BT: tl.constexpr, BP: tl.constexpr):
    cols = tl.arange(0, BP)
    # Step 2a: rows per asked rank (the sorted keys' groups).
    counts = tl.zeros([BP], dtype=tl.int64)
    for start in range(0, T_PAD, BT):
        rows = start + tl.arange(0, BT)
        ask = tl.load(key_ptr + rows, mask=rows < T_PAD, other=0) >> 32
        hit = (ask[:, None] == cols[None, :]) & (rows[:, None] < T_PAD)
        counts += tl.sum(hit.to(tl.int64), axis=0)
    starts = tl.cumsum(counts, axis=0) - counts
    free = tl.where(cols < P, C - tl.minimum(counts, C), 0)
    cum_free = tl.cumsum(free, axis=0)
    # Step 2b: keep the first C of each group; the rejected fill the free rows in sorted order.
    rejected = 0
    for start in range(0, T_PAD, BT):
        rows = start + tl.arange(0, BT)
        valid = rows < T_PAD
        ask = tl.load(key_ptr + rows, mask=valid, other=0) >> 32
        hit = ask[:, None] == cols[None, :]
        group_start = tl.sum(tl.where(hit, starts[None, :], 0), axis=1)
        accept = (rows - group_start) < C
        rej = (~accept & valid).to(tl.int64)
        nth = rejected + tl.cumsum(rej, axis=0) - 1
        fill = tl.sum(((nth[:, None] >= cum_free[None, :]) & (cols[None, :] < P)).to(tl.int64), axis=1)
        fill = tl.minimum(fill, P - 1)
        dest = tl.where(accept, ask, fill)
        idx = tl.load(idx_ptr + rows, mask=valid, other=0)
        tl.store(home_ptr + idx, dest, mask=valid)
        rejected += tl.sum(rej, axis=0)
    tl.debug_barrier()
    # Step 3: counting sort of the home ranks (rows by index within a rank) and the inverse.
    seen = tl.zeros([BP], dtype=tl.int64)
    for start in range(0, T_PAD, BT):
        rows = start + tl.arange(0, BT)
        valid = rows < T_PAD
        home = tl.load(home_ptr + rows, mask=valid, other=0)
        hit = ((home[:, None] == cols[None, :]) & valid[:, None]).to(tl.int64)
        before = tl.cumsum(hit, axis=0) - hit + seen[None, :]
        pos = home * C + tl.sum(before * hit, axis=1)
        tl.store(order_ptr + pos, rows.to(tl.int64), mask=valid)
        tl.store(inverse_ptr + rows, pos, mask=valid)
        seen += tl.sum(hit, axis=0)


def _shape(scores: torch.Tensor):
    t, p = scores.shape
    c = -(-t // p)
    return t, p, c, p * c, p - (p * c - t), triton.next_power_of_2(p)


@torch.library.custom_op("specmoe::prices_margins", mutates_args=())
def prices_margins(scores: torch.Tensor, lam_prev: torch.Tensor, q_prev: torch.Tensor, update: bool,
                   damp: float, big: float, tie: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(lam float32 [P], e float32 [T_pad, P]) for ``scores`` float32 [T, P] contiguous."""
    t, p, c, t_pad, pad0, bp = _shape(scores)
    lam = torch.empty(p, dtype=torch.float32, device=scores.device)
    e = torch.empty(t_pad, p, dtype=torch.float32, device=scores.device)
    _margins_kernel[(triton.cdiv(t_pad, _BT),)](scores, lam_prev, q_prev, lam, e, t, t_pad, p, pad0, damp, big, tie,
                                                UPDATE=update, BT=_BT, BP=bp)
    return lam, e


@prices_margins.register_fake
def _(scores, lam_prev, q_prev, update, damp, big, tie):
    t, p, c, t_pad, _, _ = _shape(scores)
    return scores.new_empty(p), scores.new_empty(t_pad, p)


@torch.library.custom_op("specmoe::prices_asks", mutates_args=())
def prices_asks(scores: torch.Tensor, lam_prev: torch.Tensor, q_prev: torch.Tensor, update: bool,
                damp: float, big: float, tie: float) -> torch.Tensor:
    """int64 [T_pad] sort keys (asked rank << 32 | falling reduced score)."""
    t, p, c, t_pad, pad0, bp = _shape(scores)
    key = torch.empty(t_pad, dtype=torch.int64, device=scores.device)
    _asks_kernel[(triton.cdiv(t_pad, _BT),)](scores, lam_prev, q_prev, key, t, t_pad, p, pad0, damp, big, tie,
                                             UPDATE=update, BT=_BT, BP=bp)
    return key


@prices_asks.register_fake
def _(scores, lam_prev, q_prev, update, damp, big, tie):
    t, p, c, t_pad, _, _ = _shape(scores)
    return scores.new_empty(t_pad, dtype=torch.int64)


@torch.library.custom_op("specmoe::prices_place", mutates_args=())
def prices_place(key: torch.Tensor, idx: torch.Tensor, ranks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(home_ext, order, inverse), int64 [T_pad] each, from the sorted keys and their rows."""
    t_pad = key.shape[0]
    home = torch.empty_like(idx)
    order = torch.empty_like(idx)
    inverse = torch.empty_like(idx)
    _place_kernel[(1,)](key, idx, home, order, inverse, t_pad, ranks, t_pad // ranks,
                        BT=_BT, BP=triton.next_power_of_2(ranks))
    return home, order, inverse


@prices_place.register_fake
def _(key, idx, ranks):
    return idx.new_empty(idx.shape), idx.new_empty(idx.shape), idx.new_empty(idx.shape)


def prices_plan_triton(scores: torch.Tensor, iterations: int, damp: float, big: float, tie: float):
    """(home_ext, order, inverse) int64 [T_pad] for ``scores`` float32 [T, P] contiguous, 2 <= P <= 64."""
    t, p, c, t_pad, _, _ = _shape(scores)
    lam = q = scores  # placeholders, never read while update is False
    update = False
    for _ in range(iterations):
        lam, e = torch.ops.specmoe.prices_margins(scores, lam, q, update, damp, big, tie)
        q = e.kthvalue(t_pad - c + 1, dim=0).values
        update = True
    key = torch.ops.specmoe.prices_asks(scores, lam, q, update, damp, big, tie)
    sorted_key, idx = torch.sort(key, stable=True)
    home, order, inverse = torch.ops.specmoe.prices_place(sorted_key, idx, p)
    return home, order, inverse
