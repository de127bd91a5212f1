"""The CPU twins of the balanced assignment's two hot loops, in numpy.

Notation (as ``schedule/assignment.py``)
    T: real tokens.   P: ranks.   C: capacity, rows per rank.   n: P rounded up to even.

On the CPU torch's per-op overhead and its stable float sort dominate, so for float32 scores
``assignment.assign`` runs greedy's proposal rounds and refine's exchange sweeps here, with the same
results as the torch code (tests compare them). The torch code stays the reference and the GPU path;
nothing here runs on a GPU, and launch counts of the plan never count these functions.
"""

from __future__ import annotations

import numpy as np

__all__ = ["greedy_numpy", "sweeps_numpy", "SWAP_EPS"]

# Swaps must raise the objective by more than this (float32 scores), so that exchange sweeps never
# flip-flop on rounding noise (the torch sweeps use the same bound).
SWAP_EPS = 1e-6


def greedy_numpy(scores: np.ndarray, room: np.ndarray, rounds: int) -> np.ndarray:
    """``assignment._greedy`` on the CPU in numpy, with the torch version's result (tests compare them).

    Args:
        scores: float32 [T, P]; room: int64 [P]; rounds: proposal rounds.

    Returns:
        int64 [T], the home rank of every token.
    """
    t, p = scores.shape
    ranks_t = np.ascontiguousarray(scores.T)  # [P, T]: the max over ranks runs along rows
    home = np.full(t, p, dtype=np.int64)  # p: not placed yet
    room = room.astype(np.int64)
    tok_bits = max(1, (t - 1).bit_length())
    tok = np.arange(t, dtype=np.int64)
    first_weight = np.arange(p - 1, -1, -1, dtype=np.uint8 if p <= 256 else np.int64)[:, None]
    for i in range(rounds):
        # Step 1: every unplaced token asks for its best open rank (ties: the lower rank).
        if i == 0 and t >= p:
            open_scores = ranks_t
        else:
            open_scores = ranks_t + np.where(room > 0, 0.0, -np.inf).astype(np.float32)[:, None]
        ask_score = open_scores.max(axis=0)
        # The first maximum: the largest weight (P - 1 - rank) among the ranks at the maximum.
        ask = (p - 1) - ((open_scores == ask_score) * first_weight).max(axis=0).astype(np.int64)
        if not (i == 0 and t >= p):
            ask = np.where(home == p, ask, p)  # placed tokens ask nobody (p)
        # Step 2: one sort of (asked rank, falling score, token) packed in a distinct int64: the
        # order of the torch version's stable sort.
        bits = (ask_score + np.float32(0.0)).view(np.int32)
        falling = 0x7FFFFFFF - (bits ^ ((bits >> 31) & 0x7FFFFFFF)).astype(np.int64)
        packed = np.sort((ask << (32 + tok_bits)) | (falling << tok_bits) | tok)
        sorted_idx, sorted_ask = packed & ((1 << tok_bits) - 1), packed >> (32 + tok_bits)
        # Step 3: each rank takes as many as it has room for.
        counts = np.bincount(sorted_ask, minlength=p + 1)
        limit = np.cumsum(counts) - counts + np.append(room, 0)
        take = tok < limit[sorted_ask]
        home[sorted_idx] = np.where(take, sorted_ask, home[sorted_idx])
        room = np.maximum(room - counts[:p], 0)
    # Step 4: the tokens still unplaced fill the free rows in index order.
    unplaced = home == p
    nth = np.cumsum(unplaced) - 1
    fill = np.minimum(np.searchsorted(np.cumsum(room), nth, side="right"), p - 1)
    return np.where(unplaced, fill, home)


def sweeps_numpy(
    slot: np.ndarray, s_flat: np.ndarray, to_partner: np.ndarray, partners: np.ndarray, sweeps: int, top: int
) -> np.ndarray:
    """The exchange sweeps of ``assignment._refine`` on the CPU in numpy, with the torch loop's result (tests
    compare them): numpy's ops cost a few times less overhead there, and it sorts int64 keys (a
    vectorised sort) several times faster than torch sorts float32 stably.

    The sort key is distinct and has the stable descending sort's order: the gain's float32 bits
    made monotone, above the bits of C - 1 - position (which give the position back). A step sorts
    only each rank's first ``top`` movers (``np.partition``) and the work after the sort shrinks
    with them; when some pair would swap all ``top``, the step is redone with all C, so the result
    never depends on ``top``.

    Args:
        slot: int64 [n, C], each slot's flat index into the extended score table at its own rank.
        s_flat: float32 [(T_pad + 1) * n], the extended score table, flat.
        to_partner: int64 [R, n], the offset from a rank's column to its partner's in round r.
        partners: int64 [R, n], each rank's partner in round r.
        sweeps: tournaments to run.
        top: movers sorted per rank and step first, 1 .. C.

    Returns:
        int64 [n, C], the new slot table.
    """
    n, c = slot.shape
    slot = slot.copy()
    row_base = (np.arange(n, dtype=np.int64) * c)[:, None]
    shift = max(1, (c - 1).bit_length())
    low = (1 << shift) - 1
    tie = c - 1 - np.arange(c, dtype=np.int64)  # among equal gains, lower position first
    eps = np.float32(SWAP_EPS)
    for _ in range(sweeps):
        for q, d in zip(partners, to_partner):
            d = d[:, None]
            # Step 2 of assignment._refine: the gains (-0.0 made 0.0) and their keys, negated so that an
            # ascending sort puts the largest gain first.
            gain = (np.take(s_flat, slot + d) - np.take(s_flat, slot)) + np.float32(0.0)
            bits = gain.view(np.int32)
            neg = -(((bits ^ ((bits >> 31) & 0x7FFFFFFF)).astype(np.int64) << shift) + tie)
            # Step 3: the first k movers by falling gain (k = top, or C when a pair would swap
            # all top), the i-th of a rank paired with the i-th of its partner.
            for k in ((top, c) if top < c else (c,)):
                first = np.sort(np.partition(neg, k - 1, axis=1)[:, :k] if k < c else neg, axis=1)
                flat = (c - 1 - ((-first) & low)) + row_base  # [n, k] flat positions
                g = np.take(gain, flat)
                swap = (g + g[q]) > eps
                if k == c or not swap[:, -1].any():
                    break
            movers = np.take(slot, flat)
            slot.put(flat, np.where(swap, (movers + d)[q], movers))
    return slot
