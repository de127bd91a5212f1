"""One Triton kernel for a combined (token table + history MLP) predictor's rank scores.

Notation
    T: tokens.   E: experts.   P: ranks of the TP span.   V: ids the token table covers (row V:
    every other id).   BT: tokens per block.   BE, BP: E and P rounded up to a power of two, at
    least 16 (the block matrix product needs 16).

What it computes, per token t (``device.CombinedScorer.rank_scores`` is the torch form and the
reference): the token member's scores a = table[r(t)] (r: the id, or V outside 0 .. V-1) with its
confidence ca = max(a) (made once per table, ``tconf``); the history member's scores from its MLP's
output logits z: p = max(sigmoid(z), 1e-12), ph = p / sum(p), ch = max(ph); then the combination
rule ("mixture": (ca a + ch ph) normalised; "max_confidence": the member with the larger
confidence, ties to the first member); then the sum over the experts each TP rank of the span
hosts (``rank_of`` [E]: the expert's rank in the span, -1 outside it), as one block matrix
product with a 0/1 host matrix made in the kernel. Replaces the table gather, the member
normalisation, the rule and the host product (25 launches on the torch path) with one.

Equal to the torch form up to float rounding (the sums run in another order); the tests compare
them under ``TRITON_INTERPRET=1``. Imported only when the Triton path is used; registering the
custom op (``specmoe::combined_rank_scores``, one launch to a ``TorchDispatchMode``) is this
module's import-time work.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["combined_rank_scores_triton"]

_BT = 32  # tokens per block


@triton.jit
def _combined_kernel(table_ptr, tconf_ptr, ids_ptr, z_ptr, rank_ptr, out_ptr, T, E, P, V,
                     MIXTURE: tl.constexpr, TOKEN_FIRST: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr,
                     BP: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BT + tl.arange(0, BT)
    ecol = tl.arange(0, BE)
    pcol = tl.arange(0, BP)
    live = rows < T
    cell = live[:, None] & (ecol[None, :] < E)
    ids = tl.load(ids_ptr + rows, mask=live, other=0)
    r = tl.where((ids >= 0) & (ids < V), ids, V)
    a = tl.load(table_ptr + r[:, None] * E + ecol[None, :], mask=cell, other=0.0)
    ca = tl.load(tconf_ptr + r, mask=live, other=0.0)
    z = tl.load(z_ptr + rows[:, None] * E + ecol[None, :], mask=cell, other=0.0)
    p = tl.where(cell, tl.maximum(1.0 / (1.0 + tl.exp(-z)), 1e-12), 0.0)
    ph = p / tl.maximum(tl.sum(p, axis=1), 1e-30)[:, None]
    ch = tl.max(ph, axis=1)
    if MIXTURE:
        mixed = ca[:, None] * a + ch[:, None] * ph
        out = mixed / tl.maximum(tl.sum(mixed, axis=1), 1e-30)[:, None]
    else:
        if TOKEN_FIRST:
            pick = ca >= ch
        else:
            pick = ca > ch
        out = tl.where(pick[:, None], a, ph)
    host = tl.load(rank_ptr + ecol, mask=ecol < E, other=-1)
    onehot = (host[:, None] == pcol[None, :]).to(tl.float32)  # [BE, BP]
    res = tl.dot(out, onehot, input_precision="ieee")
    tl.store(out_ptr + rows[:, None] * P + pcol[None, :], res, mask=live[:, None] & (pcol[None, :] < P))


@torch.library.custom_op("specmoe::combined_rank_scores", mutates_args=())
def combined_rank_scores_triton(table: torch.Tensor, tconf: torch.Tensor, ids: torch.Tensor, logits: torch.Tensor,
                                rank_of: torch.Tensor, ranks: int, mixture: bool, token_first: bool) -> torch.Tensor:
    """float32 [T, P] (module docstring).

    Args:
        table: float32 [V + 1, E] contiguous, the token member's expert scores per id.
        tconf: float32 [V + 1], each row's maximum.
        ids: int64 [T] token ids.
        logits: float32 [T, E] contiguous, the history MLP's output before its sigmoid.
        rank_of: int32 [E], each expert's rank in the TP span, -1 outside it.
        ranks: P.   mixture: the rule is "mixture" (else "max_confidence").
        token_first: the token table is the first member (ties under "max_confidence").
    """
    t, e = logits.shape
    out = torch.empty(t, ranks, dtype=torch.float32, device=logits.device)
    if t:
        _combined_kernel[(triton.cdiv(t, _BT),)](
            table, tconf, ids, logits, rank_of, out, t, e, ranks, table.shape[0] - 1, MIXTURE=mixture,
            TOKEN_FIRST=token_first, BT=_BT, BE=max(16, triton.next_power_of_2(e)),
            BP=max(16, triton.next_power_of_2(ranks)))
    return out


@combined_rank_scores_triton.register_fake
def _(table, tconf, ids, logits, rank_of, ranks, mixture, token_first):
    return logits.new_empty(logits.shape[0], ranks)
