"""Balanced token -> EP rank assignment: the permutation behind speculative token shuffling (s-TS).

Notation
    T: real tokens in the batch (one shuffle domain, a TP group).
    P: ranks sharing the batch (TP ranks of the shuffle domain = EP ranks hosting the experts).
    C: capacity, rows per rank, C = ceil(T / P).
    T_pad: padded rows, T_pad = P * C (= T when P divides T).

Glossary
    home rank   the rank that holds a token when the MoE layer starts (docs/method.md, "Measures").
    rank score  ``scores[t, r]``: the expected number of token t's (token, expert) pairs that would be
                local if t were placed on rank r (``predict.base.rank_scores``).
    shard       the C rows rank r holds after the shuffle: ``order[r*C:(r+1)*C]``.

The problem: place every token on exactly one rank, each rank holding exactly C rows (the shards of
a reduce-scatter must have equal size), so as to maximise the sum of ``scores[t, home_rank[t]]``
(predicted local activations).

Padding (P does not divide T). The batch is padded to T_pad = P*C rows, as a padded sequence is: the
pad rows are rows T .. T_pad-1, appended at the end. There are T_pad - T < P of them and the plan puts
exactly one on each of the *last* T_pad - T ranks, as the last row of that shard; so the first
T - P*(C-1) ranks hold C real tokens and the last ones hold C-1 real tokens and one pad row. Pad rows
never move between ranks and never count in any measure. ``order`` and ``inverse`` cover all T_pad
rows (entries >= T are pad rows); ``home_rank`` covers the T real tokens only.

Methods (``AssignmentMethod``). All are deterministic, so that every TP rank computes the identical
permutation from identical inputs: the torch methods use stable sorts (equal scores: lower token
index first) and first-maximum argmax (lower rank first); ``optimal`` moves the highest token index
to the highest rank among equal moves. With scores that carry no information (all equal) every
method returns the contiguous shards.
    contiguous  Megatron's sequence-parallel shards: tokens in order, C per rank (C-1 on the padded
                ranks). The baseline.
    argsort     the paper's: sort tokens by predicted rank (argmax score; within a rank by falling
                confidence), then cut the sorted list into shards. Overflow spills into the next
                rank's shard. Two stable sorts.
    greedy      proposal rounds: every unplaced token asks for its best rank that still has room;
                each rank takes its highest-scoring asks up to its room. P rounds always suffice
                (each round places every ask or fills a rank) and are run as exactly P rounds, so
                that nothing depends on the data; with fewer rounds the tokens still unplaced fill
                the free rows in index order. One stable sort per round for float32 scores (of the
                asked rank and the falling score packed in an int64, ``_falling``), two for other
                dtypes. Torch, any device (float32 on the CPU: numpy, see below).
    refine      greedy (2 rounds), then pairwise exchange sweeps (2): for each pair of ranks (a, b)
                swap the tokens on a that gain most by moving to b with those on b that gain most
                by moving to a, while the swap raises the objective. The pairs of a sweep follow a
                round-robin tournament, so each step works on P/2 disjoint pairs at once. Within
                0.5% of the optimum on the Mixtral traces, fixed shapes; 271 launches at P = 8 on the
                torch path (``tools/bench_plan.py``): the reference the run-time ``prices`` is tested
                against.
    refine_spread  refine, then a spreading pass for shuffle domains smaller than the EP group (TP =
                one node, EP over several nodes): a token's predicted *off-domain* pairs (``off_domain``,
                e.g. 1 - the sum of its in-domain rank scores) leave through the node's NICs whatever
                rank inside the domain holds it, so s-TS cannot lower the node's inter-node bytes, but
                refine places the tokens that score low everywhere (mostly off-domain experts) where
                room is left, piling them on a few ranks; the busiest GPU's inter-node bytes set the
                time. The pass runs ``sweeps`` (2) round-robin tournaments over rank pairs (a, b) with
                off-domain loads L_a > L_b: a's eligible tokens by falling weight are paired with b's
                by rising weight and the prefix of swaps is taken that keeps the moved weight D below
                (L_a - L_b) / 2 before its last swap and below L_a - L_b after it, so max(L_a, L_b)
                falls and the maximum over ranks never rises. A token is eligible if moving it to the
                partner lowers its score by at most ``spread_tol`` (so each swap costs the objective
                at most 2 * spread_tol; with 0 the objective never falls). Torch, fixed shapes.
    prices      the run-time method (``schedule.fast_assign``): 2 price updates (each rank's price
                moves half way to the C-th largest margin of the rows for it), then one greedy round
                on the reduced scores; within 0.004 of refine's LAR on the Mixtral traces (tied: up to
                0.025 below), 7 launches on the Triton path (64 torch), no host sync, fixed shapes.
    optimal     exact: a min-cost flow (successive shortest paths over the P-node graph of ranks,
                with one lazy heap per ordered rank pair). Start from every token on its best rank
                (optimal without capacities), then move one token at a time along the cheapest
                path from an overfull to an underfull rank. Cost O(X * (P^3 + P log T)) for X
                overflowing tokens, a few ms for T=512, P=8 on one CPU core
                (tools/bench_assignment.py). Host code: for planning and evaluation only.

CPU fast path: for float32 scores on the CPU ``greedy`` and refine's sweeps run as numpy twins
(``schedule/assignment_numpy.py``, same results; the torch code stays the reference and the GPU
path); ``plan_from_home`` sorts with numpy's stable radix sort there.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Callable, Literal, get_args

import numpy as np
import torch

from megatron_specmoe.schedule.assignment_numpy import SWAP_EPS
from megatron_specmoe.schedule.assignment_numpy import greedy_numpy as _greedy_numpy
from megatron_specmoe.schedule.assignment_numpy import sweeps_numpy as _sweeps_numpy
from megatron_specmoe.schedule.fast_assign import prices_plan

__all__ = [
    "AssignmentMethod",
    "ShufflePlan",
    "ASSIGNMENT_METHODS",
    "assign",
    "capacity_of",
    "real_capacities",
    "plan_from_home",
    "planned_score",
    "SPREAD_TOL",
]

AssignmentMethod = Literal["contiguous", "argsort", "greedy", "refine", "refine_spread", "prices", "optimal"]

# refine_spread: the most score a token may lose by moving in the spreading pass (scores are shares
# of a token's activations, rows summing to at most 1). See the module docstring.
SPREAD_TOL = 0.0

# Swaps must raise the objective by more than this (float32 scores), so that exchange sweeps never
# flip-flop on rounding noise.
_SWAP_EPS = SWAP_EPS

# refine on the CPU: each exchange step first sorts only max(_TOP_MIN, C / _TOP_DIV) movers of each
# rank (``_sweeps_numpy``; the result is the same as with all C).
_TOP_MIN = 64
_TOP_DIV = 4


@dataclass(frozen=True, kw_only=True)
class ShufflePlan:
    """Where every token of one batch goes, and the permutation that puts it there.

    Attributes:
        home_rank: int64 [T], the rank each real token is placed on.
        order: int64 [T_pad], a permutation of 0 .. T_pad-1: row i of the shuffled batch is row
            ``order[i]`` of the original (padded) batch; rank r holds ``order[r*C:(r+1)*C]``, real
            tokens in increasing index, then its pad row if it has one (entries >= T are pad rows).
        inverse: int64 [T_pad], the inverse permutation: ``inverse[order[i]] == i``; original row j
            is at shuffled row ``inverse[j]`` (the deferred all-gather uses it).
        capacity: C, rows per rank.
        num_tokens: T, real tokens.
        num_ranks: P.
    """

    home_rank: torch.Tensor
    order: torch.Tensor
    inverse: torch.Tensor
    capacity: int
    num_tokens: int
    num_ranks: int

    @property
    def padded_tokens(self) -> int:
        """T_pad = P * C."""
        return self.capacity * self.num_ranks

    def shards(self) -> torch.Tensor:
        """int64 [P, C]: the original row index of each row each rank holds."""
        return self.order.view(self.num_ranks, self.capacity)

    def check(self) -> None:
        """Raise a ValueError if the plan breaks a rule (every token once, capacity, padding)."""
        t, p, c = self.num_tokens, self.num_ranks, self.capacity
        if c != capacity_of(t, p):
            raise ValueError(f"ShufflePlan.capacity={c}, expected ceil(T/P)=ceil({t}/{p})")
        if self.home_rank.shape != (t,) or self.order.shape != (p * c,) or self.inverse.shape != (p * c,):
            raise ValueError(
                f"ShufflePlan shapes: home_rank {tuple(self.home_rank.shape)} (want ({t},)), order "
                f"{tuple(self.order.shape)} and inverse {tuple(self.inverse.shape)} (want ({p * c},))"
            )
        order = self.order.cpu()
        if not torch.equal(torch.sort(order).values, torch.arange(p * c)):
            raise ValueError("ShufflePlan.order is not a permutation of 0..T_pad-1")
        if not torch.equal(self.inverse.cpu()[order], torch.arange(p * c)):
            raise ValueError("ShufflePlan.inverse is not the inverse of ShufflePlan.order")
        want = torch.tensor(real_capacities(t, p))
        got = torch.bincount(self.home_rank.cpu(), minlength=p) if t else torch.zeros(p, dtype=torch.int64)
        if not torch.equal(got, want):
            raise ValueError(f"ShufflePlan: real tokens per rank {got.tolist()}, expected {want.tolist()}")
        slot_rank = torch.arange(p * c) // c
        home = self.home_rank.cpu()
        real = order < t
        if not torch.equal(home[order[real]], slot_rank[real]):
            raise ValueError("ShufflePlan: home_rank disagrees with the shard that holds the token")


def capacity_of(num_tokens: int, num_ranks: int) -> int:
    """C = ceil(T / P)."""
    return -(-num_tokens // num_ranks)


def real_capacities(num_tokens: int, num_ranks: int) -> list[int]:
    """Real tokens per rank: C on the first ranks, C - 1 on the last T_pad - T ranks (see Padding)."""
    c = capacity_of(num_tokens, num_ranks)
    return [c - int(r >= num_tokens - (c - 1) * num_ranks) for r in range(num_ranks)]


def plan_from_home(home_rank: torch.Tensor, num_ranks: int) -> ShufflePlan:
    """Build the plan (order, inverse) from a balanced home rank per token.

    Args:
        home_rank: int64 [T], values in 0 .. P-1, with exactly ``real_capacities(T, P)[r]`` tokens on
            rank r (not checked here, for speed; ``ShufflePlan.check`` does).
        num_ranks: P.

    Returns: the ShufflePlan, on the device of ``home_rank``.
    """
    device = home_rank.device
    t = int(home_rank.shape[0])
    c = capacity_of(t, num_ranks)
    t_pad = num_ranks * c
    pads = t_pad - t
    # A stable sort by home rank orders rows by (home rank, row index): real tokens keep their
    # relative order, each pad row (index >= T) comes last on its rank. On the CPU numpy's stable
    # sort of 8- or 16-bit keys (a radix sort), the same result in a handful of numpy calls.
    if device.type == "cpu" and num_ranks < 2**15:
        full_home = np.empty(t_pad, dtype=np.int8 if num_ranks < 2**7 else np.int16)
        full_home[:t] = home_rank.numpy()
        full_home[t:] = np.arange(num_ranks - pads, num_ranks)
        order_np = np.argsort(full_home, kind="stable")
        inverse_np = np.empty(t_pad, dtype=np.int64)
        inverse_np[order_np] = np.arange(t_pad)
        order, inverse = torch.from_numpy(order_np), torch.from_numpy(inverse_np)
    else:
        pad_home = torch.arange(num_ranks - pads, num_ranks, device=device, dtype=torch.int64)
        order = torch.sort(torch.cat([home_rank.long(), pad_home]), stable=True).indices
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(t_pad, device=device))
    return ShufflePlan(
        home_rank=home_rank.long(), order=order, inverse=inverse, capacity=c, num_tokens=t,
        num_ranks=num_ranks,
    )


def planned_score(scores: torch.Tensor | np.ndarray, plan: ShufflePlan) -> float:
    """Sum over real tokens of ``scores[t, home_rank[t]]``: the objective the methods maximise."""
    s = torch.as_tensor(scores)
    return float(s.gather(1, plan.home_rank.to(s.device).view(-1, 1)).sum())


# ---- methods: scores float32 [T, P], room int64 [P] (real capacities) -> home int64 [T] ----------


def _contiguous(scores: torch.Tensor, room: torch.Tensor) -> torch.Tensor:
    bounds = torch.cumsum(room, 0)
    return torch.bucketize(torch.arange(scores.shape[0], device=scores.device), bounds, right=True)


def _argsort(scores: torch.Tensor, room: torch.Tensor) -> torch.Tensor:
    conf, pred = scores.max(dim=1)  # max: ties go to the lower rank on CPU and CUDA
    # Step 1: order by falling confidence (stable: ties by token index), then by predicted rank.
    by_conf = torch.sort(-conf, stable=True).indices
    sorted_idx = by_conf[torch.sort(pred[by_conf], stable=True).indices]
    # Step 2: cut the sorted list into shards; position i of the list goes to rank of slot i.
    home = torch.empty_like(pred)
    home[sorted_idx] = _contiguous(scores, room)
    return home


def _greedy(
    scores: torch.Tensor, room: torch.Tensor, rounds: int | None = None, numpy_on_cpu: bool = True
) -> torch.Tensor:
    t, p = scores.shape
    rounds = p if rounds is None else rounds
    device = scores.device
    if (numpy_on_cpu and device.type == "cpu" and scores.dtype == torch.float32
            and p.bit_length() + 32 + max(1, (t - 1).bit_length()) <= 63):
        return torch.from_numpy(_greedy_numpy(scores.detach().numpy(), room.numpy(), rounds))
    home = torch.full((t,), p, dtype=torch.int64, device=device)  # p: not placed yet
    arange = torch.arange(t, device=device)
    zero = room.new_zeros(1)
    for i in range(rounds):
        # Step 1: every unplaced token asks for its best rank that still has room. In round 0
        # nobody is placed, and every rank has room when T >= P (known from the shapes).
        if i == 0 and t >= p:
            ask_score, ask = scores.max(dim=1)
        else:
            closed = torch.where(room > 0, 0.0, float("-inf")).to(scores.dtype)
            ask_score, ask = (scores + closed).max(dim=1)
            ask = torch.where(home == p, ask, p)  # placed tokens ask nobody (p)
        # Step 2: group the asks by rank, best score first (stable: ties by token index). float32
        # scores: one sort of (rank, falling score) packed in an int64; else two stable sorts.
        if scores.dtype == torch.float32:
            packed, sorted_idx = torch.sort((ask << 32) + _falling(ask_score), stable=True)
            sorted_ask = packed >> 32
        else:
            by_score = torch.sort(ask_score, descending=True, stable=True).indices
            sorted_ask, by_rank = torch.sort(ask[by_score], stable=True)
            sorted_idx = by_score[by_rank]
        # Step 3: each rank takes as many as it has room for: the asks at sorted positions below
        # (first ask of the rank) + room. Rank p has no room.
        counts = torch.bincount(sorted_ask, minlength=p + 1)
        limit = torch.cumsum(counts, 0) - counts + torch.cat([room, zero])
        take = arange < limit[sorted_ask]
        home = home.scatter(0, sorted_idx, torch.where(take, sorted_ask, home[sorted_idx]))
        room = (room - counts[:p]).clamp_(min=0)  # a rank takes min(asks, room)
    # Step 4 (only when rounds < P left tokens unplaced): the rest fill the free rows in index
    # order, rank by rank.
    unplaced = home == p
    nth = torch.cumsum(unplaced.long(), 0) - 1
    fill = torch.bucketize(nth, torch.cumsum(room, 0), right=True).clamp_(max=p - 1)
    return torch.where(unplaced, fill, home)


def _round_robin(num_ranks: int, device: torch.device) -> torch.Tensor:
    """Rounds of disjoint rank pairs covering every pair once (circle method), built on ``device``
    by arithmetic (no host copy).

    Returns:
        int64 [R, n]: ``partner[i, r]`` is rank r's partner in round i (an involution); n = P
        rounded up to even, R = n - 1; for odd P, rank P is a dummy that never swaps. Round i pairs
        n-1 with i, and (i + j) mod (n-1) with (i - j) mod (n-1) for j = 1 .. n/2 - 1.
    """
    n = num_ranks + (num_ranks % 2)
    i = torch.arange(n - 1, device=device).view(-1, 1)
    j = torch.arange(1, n // 2, device=device).view(1, -1)
    a = torch.cat([torch.full_like(i, n - 1), (i + j) % (n - 1)], dim=1)
    b = torch.cat([i, (i - j) % (n - 1)], dim=1)
    partner = torch.empty(n - 1, n, dtype=torch.int64, device=device)
    partner.scatter_(1, a, b)
    partner.scatter_(1, b, a)
    return partner


def _extended(scores: torch.Tensor, home: torch.Tensor, big: torch.Tensor):
    """The tables both exchange passes work on.

    Returns (shards int64 [n, C], s_ext float [T_pad + 1, n]): the plan's shards (plus, for odd
    P, a dummy rank n-1 holding only the sentinel row T_pad) and the extended score table, where
    pad rows and the sentinel score 0 on their own rank and -big elsewhere, and real tokens score
    -big on the dummy rank, so that any move involving them costs more than any gain.
    """
    t, p = scores.shape
    device = scores.device
    c = capacity_of(t, p)
    n = p + (p % 2)
    shards = plan_from_home(home, p).order.view(p, c)
    s_ext = (-big).expand(p * c + 1, n).clone()
    s_ext[:t, :p] = scores
    pad_rows = torch.arange(t, p * c + 1, device=device)
    pad_rank = torch.cat([torch.arange(p - (p * c - t), p, device=device),
                          torch.full((1,), n - 1, device=device)])
    s_ext[pad_rows, pad_rank] = 0.0
    if n > p:
        shards = torch.cat([shards, shards.new_full((1, c), p * c)])
    return shards, s_ext


def _home_from_shards(shards: torch.Tensor, num_tokens: int, num_ranks: int) -> torch.Tensor:
    """int64 [T]: the rank whose shard holds each real token (drops the dummy rank and pads)."""
    c = shards.shape[1]
    slot_rank = torch.arange(num_ranks, device=shards.device).repeat_interleave(c)
    # Every row, pads included, gets its rank; rows >= T are cut off (no mask, no host sync).
    home = torch.empty(num_ranks * c, dtype=torch.int64, device=shards.device)
    home.scatter_(0, shards[:num_ranks].reshape(-1), slot_rank)
    return home[:num_tokens]


def _falling(x: torch.Tensor) -> torch.Tensor:
    """int64, same shape as ``x`` (float32, no NaN), in 0 .. 2^32 - 1: smaller for larger x,
    equal for equal x. The float's bits read as an int32 have the float's order once all but the
    sign bit are flipped on negative floats (-0.0 is first made +0.0, which compares equal)."""
    bits = (x + 0.0).view(torch.int32)
    rising = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return 0x7FFFFFFF - rising.long()


def _refine(
    scores: torch.Tensor, room: torch.Tensor, rounds: int = 2, sweeps: int = 2, numpy_on_cpu: bool = True
) -> torch.Tensor:
    t, p = scores.shape
    device = scores.device
    home = _greedy(scores, room, rounds, numpy_on_cpu)
    if p < 2 or t == 0:
        return home
    n = p + (p % 2)
    # Step 1: the plan's shards and the extended score table (``_extended``): pad rows and the
    # odd-P dummy rank never move.
    shards, s_ext = _extended(scores, home, 4.0 * (scores.abs().max() + 1.0))
    s_flat = s_ext.view(-1)
    own_rank = torch.arange(n, device=device).view(-1, 1)
    partner_of = _round_robin(p, device)
    # The sweeps carry each slot's flat index into s_ext at its own rank's column, so that one
    # take reads both the partner's and the own score: ``at[r][0]`` offsets each rank's slots to
    # its partner's column in round r, ``at[r][1]`` is zero.
    to_partner = (partner_of - own_rank.view(1, -1)).unsqueeze(-1)  # [R, n, 1]
    slot = shards * n + own_rank  # [n, C]
    if numpy_on_cpu and device.type == "cpu" and s_ext.dtype == torch.float32:
        c = shards.shape[1]
        slot = torch.from_numpy(_sweeps_numpy(
            slot.numpy(), s_flat.detach().numpy(), to_partner.squeeze(-1).numpy(), partner_of.numpy(), sweeps,
            top=min(c, max(_TOP_MIN, -(-c // _TOP_DIV))),
        ))
        return _home_from_shards(torch.div(slot, n, rounding_mode="floor"), t, p)
    at = torch.stack([to_partner, torch.zeros_like(to_partner)], dim=1).unbind(0)  # R x [2, n, 1]
    to_partner, partners = to_partner.unbind(0), partner_of.unbind(0)  # per-round views, cut once
    for _ in range(sweeps):
        for r in range(n - 1):
            # Step 2: gain of moving each token to its rank's partner this round.
            to_score, own_score = s_flat.take(slot + at[r]).unbind(0)  # [n, C] each
            gain = to_score - own_score
            # Step 3: pair the i-th best mover of a rank with the i-th best of its partner; the
            # joint gain falls with i, so the swaps that pay form a prefix. A token moving from
            # rank b to a = partners[r][b] has flat index slot + to_partner[r][b] there.
            g, idx = torch.sort(gain, dim=1, descending=True, stable=True)
            swap = (g + g.index_select(0, partners[r])) > _SWAP_EPS
            movers = slot.gather(1, idx)
            arrivals = (movers + to_partner[r]).index_select(0, partners[r])
            slot = slot.scatter(1, idx, torch.where(swap, arrivals, movers))
    return _home_from_shards(torch.div(slot, n, rounding_mode="floor"), t, p)


def _refine_spread(
    scores: torch.Tensor,
    room: torch.Tensor,
    off_domain: torch.Tensor | None = None,
    spread_tol: float = SPREAD_TOL,
    sweeps: int = 2,
) -> torch.Tensor:
    """refine, then the spreading pass (module docstring); ``off_domain`` float [T] on the scores'
    device, the weight each token adds to its rank's off-domain load (None: 1 - row sum, >= 0)."""
    if off_domain is None:
        # Rank scores are shares of a token's activations (rows of expert scores sum to 1): what
        # the domain's ranks do not hold is off-domain.
        off_domain = (1.0 - scores.sum(1)).clamp(min=0.0)
    t, p = scores.shape
    device = scores.device
    home = _refine(scores, room)
    if p < 2 or t == 0:
        return home
    c = capacity_of(t, p)
    n = p + (p % 2)
    # Step 1: tables as in _refine (big > spread_tol, so pad rows and the sentinel are never
    # eligible); pad rows weigh 0.
    shards, s_ext = _extended(scores, home, 4.0 * (scores.abs().max() + 1.0) + spread_tol)
    w_ext = scores.new_zeros(p * c + 1)
    w_ext[:t] = off_domain.to(scores.dtype)
    s_flat = s_ext.view(-1)
    own_rank = torch.arange(n, device=device).view(-1, 1)
    partner_of = _round_robin(p, device)
    inf = scores.new_full((), float("inf"))
    for _ in range(sweeps):
        for r in range(n - 1):
            partner = partner_of[r]  # [n]
            w = w_ext[shards]  # [n, C]
            load = w.sum(1)  # [n]
            delta = (load - load[partner]).view(-1, 1)  # > 0 on the heavier rank of each pair
            heavy = delta > _SWAP_EPS
            # Step 2: eligible movers (score loss <= tol), heavy side by falling weight, light
            # side by rising weight; ineligible ones last (stable: ties by shard position).
            base = shards * n
            cost = s_flat[base + own_rank] - s_flat[base + partner.view(-1, 1)]  # [n, C]
            elig = cost <= spread_tol
            key = torch.where(elig, torch.where(heavy, -w, w), inf)
            idx = torch.sort(key, dim=1, stable=True).indices
            movers = shards.gather(1, idx)
            w_s, elig_s = w.gather(1, idx), elig.gather(1, idx)
            # Step 3: the i-th heavy mover swaps with the partner's i-th light mover; the moved
            # weight d falls with i, so the useful swaps form a prefix; stop before the pair's
            # loads cross over.
            d = w_s - w_s[partner]
            valid = elig_s & elig_s[partner] & (d > _SWAP_EPS) & heavy
            valid = torch.cumprod(valid.long(), dim=1).bool()
            dv = torch.where(valid, d, torch.zeros_like(d))
            moved = torch.cumsum(dv, dim=1)
            take = valid & (moved - dv < delta / 2) & (moved < delta - _SWAP_EPS)
            take = take | take[partner]  # the light rank swaps the same positions
            shards = shards.scatter(1, idx, torch.where(take, movers[partner], movers))
    return _home_from_shards(shards, t, p)


def _optimal(scores: torch.Tensor, room: torch.Tensor) -> torch.Tensor:
    s = scores.detach().to("cpu", torch.float64).numpy()
    cap = room.cpu().numpy().astype(np.int64)
    t, p = s.shape
    # Step 1: every token on its best rank (ties: lower rank): optimal without capacities, so no
    # negative cycle exists in the rank graph below.
    home = np.argmax(s, axis=1)
    load = np.bincount(home, minlength=p)
    # heaps[a][b]: (cost of moving a token from a to b, -token); stale once the token moves.
    heaps: list[list[list[tuple[float, int]]]] = [[[] for _ in range(p)] for _ in range(p)]
    for a in range(p):
        toks = np.flatnonzero(home == a)
        for b in range(p):
            if a != b:
                h = list(zip((s[toks, a] - s[toks, b]).tolist(), (-toks).tolist()))
                heapq.heapify(h)
                heaps[a][b] = h
    inf = float("inf")
    while True:
        excess = load - cap
        if not (excess > 0).any():
            break
        # Step 2: cheapest move per rank pair (drop stale heap tops).
        w = np.full((p, p), inf)
        for a in range(p):
            for b in range(p):
                h = heaps[a][b]
                while h and home[-h[0][1]] != a:
                    heapq.heappop(h)
                if h:
                    w[a, b] = h[0][0]
        # Step 3: shortest path from any overfull rank (Bellman-Ford; no negative cycles).
        dist = np.where(excess > 0, 0.0, inf)
        parent = np.full(p, -1)
        for _ in range(p - 1):
            cand = dist[:, None] + w
            best_from = np.argmin(cand, axis=0)
            best = cand[best_from, np.arange(p)]
            better = best < dist - 1e-12
            if not better.any():
                break
            dist = np.where(better, best, dist)
            parent = np.where(better, best_from, parent)
        # Step 4: the nearest underfull rank, one token along each hop. Ties move the highest
        # token index to the highest rank, so that uninformative scores give contiguous shards.
        under = np.flatnonzero(excess < 0)[::-1]
        dst = int(under[np.argmin(dist[under])])
        if not np.isfinite(dist[dst]):
            raise ValueError("assign(method='optimal'): no feasible move; scores contain NaN?")
        hops = []
        node = dst
        while parent[node] >= 0:  # back to a source (parent -1: an overfull rank at distance 0)
            hops.append((int(parent[node]), node))
            node = int(parent[node])
        for a, b in reversed(hops):
            _, neg_tok = heapq.heappop(heaps[a][b])
            tok = -neg_tok
            home[tok] = b
            for c in range(p):
                if c != b:
                    heapq.heappush(heaps[b][c], (s[tok, b] - s[tok, c], neg_tok))
        load[node] -= 1
        load[dst] += 1
    return torch.as_tensor(home, dtype=torch.int64).to(scores.device)


ASSIGNMENT_METHODS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "contiguous": _contiguous,
    "argsort": _argsort,
    "greedy": _greedy,
    "refine": _refine,
    "refine_spread": _refine_spread,
    "prices": lambda scores, room: prices_plan(scores).home_ext[: scores.shape[0]],
    "optimal": _optimal,
}
assert set(ASSIGNMENT_METHODS) == set(get_args(AssignmentMethod))


def assign(
    scores: torch.Tensor | np.ndarray,
    method: AssignmentMethod = "refine",
    *,
    validate: bool = True,
    off_domain: torch.Tensor | np.ndarray | None = None,
    spread_tol: float = SPREAD_TOL,
) -> ShufflePlan:
    """Balanced assignment of T tokens to P ranks, maximising predicted local activations.

    Args:
        scores: float32 [T, P] rank scores (``predict.base.rank_scores``); a numpy array or a
            torch tensor on any device (the plan lives on the same device). Must be finite.
        method: one of ``AssignmentMethod`` (see the module docstring).
        validate: check that the scores (and ``off_domain``) are finite. The check reads a flag
            back to the host; the runtime passes False so that the torch methods never synchronise.
        off_domain: float [T], ``refine_spread`` only (refused by the other methods): each
            token's predicted off-domain weight, its share of activations on experts outside the
            domain's P ranks. None: ``max(0, 1 - scores.sum(1))``, right when the scores are the
            shares of ``rank_scores`` restricted to the domain's ranks.
        spread_tol: ``refine_spread`` only: the most score one token may lose when it moves (>= 0).

    Returns: ShufflePlan with capacity C = ceil(T/P) per rank.
    """
    if method not in ASSIGNMENT_METHODS:
        raise ValueError(
            f"assign: unknown method {method!r}; choose one of {sorted(ASSIGNMENT_METHODS)}"
        )
    s = torch.as_tensor(scores)
    if s.dim() != 2 or s.shape[1] < 1:
        raise ValueError(f"assign: scores must be [T, P] with P >= 1, got shape {tuple(s.shape)}")
    if not s.is_floating_point():
        s = s.float()
    if validate and not bool(torch.isfinite(s).all()):
        raise ValueError("assign: scores contain NaN or inf; rank scores must be finite")
    t, p = s.shape
    extra = {}
    if method == "refine_spread":
        w = (1.0 - s.sum(1)).clamp(min=0.0) if off_domain is None else torch.as_tensor(off_domain, device=s.device)
        if w.shape != (t,):
            raise ValueError(f"assign: off_domain must have shape ({t},) (one weight per token), got {tuple(w.shape)}")
        if validate and not bool(torch.isfinite(w).all()):
            raise ValueError("assign: off_domain contains NaN or inf; weights must be finite")
        if not spread_tol >= 0:
            raise ValueError(f"assign: spread_tol must be >= 0 (score a moved token may lose), got {spread_tol!r}")
        extra = {"off_domain": w.to(s.dtype), "spread_tol": float(spread_tol)}
    elif off_domain is not None:
        raise ValueError(
            f"assign: off_domain is used by method='refine_spread' only, not {method!r}; drop it or "
            "choose refine_spread"
        )
    c = capacity_of(t, p)
    if method == "prices" and t:
        fast = prices_plan(s)  # the plan's permutation comes with it (no second sort)
        return ShufflePlan(home_rank=fast.home_ext[:t], order=fast.order, inverse=fast.inverse, capacity=c,
                           num_tokens=t, num_ranks=p)
    # real_capacities(t, p), computed on the device (no host copy): C, less one on the last ranks.
    room = c - (torch.arange(p, device=s.device) >= p - (p * c - t)).long()
    home = ASSIGNMENT_METHODS[method](s, room, **extra) if t else torch.zeros(0, dtype=torch.int64, device=s.device)
    return plan_from_home(home, p)
