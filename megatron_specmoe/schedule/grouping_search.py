"""Search engines behind expert grouping: swap-based local search on two objectives.

Notation
    T: tokens.   U: distinct routes (expert sets) of one layer, U <= T.   k: top-k.
    E: experts.  P: EP ranks.   n = E // P experts per rank.
    rank_of: int64 [E], the EP rank hosting each logical expert (every rank hosts exactly n).

Objective (docs/method.md, s-EG), per layer, smaller is better:
    theta * load_imbalance + (1 - theta) * remote_share
    load_imbalance = max over ranks / mean over ranks of pairs computed (independent of homes)
    remote_share   = (token, expert) pairs off the token's home rank / all pairs
Two ways to know the home rank:
    co-location (homes unknown): the token shuffle runs after placement and sends each token to
        the rank holding most of its experts, so local pairs = sum_t max_r hits[t, r].
    fixed homes (given): local pairs = sum_e C[e, rank_of[e]] with C[e, r] = tokens homed on r
        that use e; linear in the placement.

Every state below keeps, for the current placement, the change of the local-pair count that each
swap of two experts on different ranks would make (an [E, E] gain matrix), so a best-improvement
step costs one argmin. ``reference_*`` functions recompute from scratch; tests compare the two.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "LayerRoutes",
    "compress_routes",
    "co_location_local_pairs",
    "fixed_home_local_pairs",
    "CoLocationState",
    "FixedHomeState",
    "PairwiseState",
    "local_search",
    "balanced_homes",
    "hottest_first",
    "eplb_packing",
    "objective_value",
]


@dataclass(frozen=True, kw_only=True)
class LayerRoutes:
    """One layer's routes with repeated expert sets merged.

    Attributes:
        sets: int64 [U, k], each distinct expert set once, ascending within a row.
        weights: int64 [U], tokens that used each set.
        loads: int64 [E], pairs per expert (tokens that selected it).
        num_experts: E.
    """

    sets: np.ndarray
    weights: np.ndarray
    loads: np.ndarray
    num_experts: int

    @property
    def pairs(self) -> int:
        return int(self.loads.sum())


def compress_routes(experts_Tk: np.ndarray, num_experts: int, *, where: str = "routes") -> LayerRoutes:
    """Merge repeated expert sets.

    Args:
        experts_Tk: int [T, k], logical experts of each token at one layer, all in 0..E-1 and
            distinct within a row.
        num_experts: E.
    """
    ex = np.asarray(experts_Tk)
    if ex.ndim != 2 or ex.shape[0] == 0:
        raise ValueError(f"{where}: expected a non-empty int array [T, k], got shape {ex.shape}")
    srt = np.sort(ex.astype(np.int64), axis=1)
    if srt.shape[1] > 1:
        dup = np.nonzero((srt[:, 1:] == srt[:, :-1]).any(axis=1))[0]
        if dup.size:
            raise ValueError(
                f"{where}: token {int(dup[0])} selects the same expert twice ({ex[dup[0]].tolist()}); "
                "a top-k route must name k distinct experts"
            )
    if srt.min() < 0 or srt.max() >= num_experts:
        raise ValueError(f"{where}: expert ids must lie in 0..{num_experts - 1}")
    k = srt.shape[1]
    if num_experts ** k < 2**62:  # one int64 key per row: a 1-D unique is ~10x faster
        radix = num_experts ** np.arange(k - 1, -1, -1, dtype=np.int64)
        keys, weights = np.unique(srt @ radix, return_counts=True)
        sets = (keys[:, None] // radix[None, :]) % num_experts
    else:
        sets, weights = np.unique(srt, axis=0, return_counts=True)
    loads = np.bincount(srt.ravel(), minlength=num_experts).astype(np.int64)
    return LayerRoutes(sets=sets, weights=weights.astype(np.int64), loads=loads, num_experts=num_experts)


# ---- reference objective (from scratch) ---------------------------------------------------------
def _hits(rank_of: np.ndarray, sets: np.ndarray, num_ranks: int) -> np.ndarray:
    """int32 [U, P]: experts of each set on each rank."""
    r = rank_of[sets]
    out = np.zeros((sets.shape[0], num_ranks), dtype=np.int32)
    for j in range(sets.shape[1]):
        out[np.arange(sets.shape[0]), r[:, j]] += 1
    return out


def co_location_local_pairs(routes: LayerRoutes, rank_of: np.ndarray, num_ranks: int) -> int:
    """Local pairs when each token sits on the rank holding most of its experts."""
    return int((_hits(rank_of, routes.sets, num_ranks).max(axis=1) * routes.weights).sum())


def fixed_home_local_pairs(home_counts_EP: np.ndarray, rank_of: np.ndarray) -> int:
    """Local pairs for fixed homes; ``home_counts_EP`` int [E, P] (tokens homed on r using e)."""
    return int(home_counts_EP[np.arange(rank_of.shape[0]), rank_of].sum())


def objective_value(*, local_pairs: int, rank_loads: np.ndarray, pairs: int, theta: float) -> float:
    """theta * load_imbalance + (1 - theta) * remote_share (see the module docstring)."""
    imbalance = float(rank_loads.max()) * rank_loads.shape[0] / pairs
    return theta * imbalance + (1.0 - theta) * (pairs - local_pairs) / pairs


# ---- states with swap gains ---------------------------------------------------------------------
class _SwapState:
    """Shared bookkeeping: placement, rank loads and the load half of a swap's cost."""

    def __init__(self, rank_of: np.ndarray, loads: np.ndarray, num_ranks: int, theta: float) -> None:
        self.rank = np.asarray(rank_of, dtype=np.int64).copy()
        self.loads = np.asarray(loads, dtype=np.int64)
        self.num_ranks = num_ranks
        self.theta = float(theta)
        self.pairs = max(int(self.loads.sum()), 1)
        self.rank_loads = np.bincount(self.rank, weights=self.loads, minlength=num_ranks).astype(np.int64)
        self.local = 0  # set by subclasses
        # Optional bool [E, E]: swaps allowed (router groups confine experts to rank domains).
        self.allowed: np.ndarray | None = None

    def gains(self) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _move(self, a: int, b: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def objective(self) -> float:
        return objective_value(
            local_pairs=self.local, rank_loads=self.rank_loads, pairs=self.pairs, theta=self.theta
        )

    def swap_costs(self) -> np.ndarray:
        """float64 [E, E]: change of the objective if experts a and b swap ranks; +inf where
        they share a rank, or where ``allowed`` (bool [E, E], optional) forbids the swap."""
        r = self.rank
        num_ranks = self.num_ranks
        cost = -(1.0 - self.theta) * self.gains() / self.pairs
        if self.theta > 0.0:
            # Largest rank load among the ranks other than (ra, rb), for every rank pair.
            R = self.rank_loads.astype(np.float64)
            other = _max_excluding_two(R)
            d = self.loads[None, :] - self.loads[:, None]  # l_b - l_a
            new_a = R[r][:, None] + d  # rank of a after the swap
            new_b = R[r][None, :] - d
            new_max = np.maximum(np.maximum(other[r[:, None], r[None, :]], new_a), new_b)
            cost = cost + self.theta * (new_max - R.max()) * num_ranks / self.pairs
        cost = np.where(r[:, None] == r[None, :], np.inf, cost)
        if self.allowed is not None:
            cost = np.where(self.allowed, cost, np.inf)
        return cost

    def apply_swap(self, a: int, b: int) -> None:
        ra, rb = int(self.rank[a]), int(self.rank[b])
        self._move(a, b)
        self.rank[a], self.rank[b] = rb, ra
        d = int(self.loads[b] - self.loads[a])
        self.rank_loads[ra] += d
        self.rank_loads[rb] -= d


def _max_excluding_two(values: np.ndarray) -> np.ndarray:
    """float64 [P, P]: ``out[x, y]`` = max of ``values`` (float [P]) over indices other than x
    and y (0 when nothing is left)."""
    P = values.shape[0]
    top = np.argsort(-values, kind="stable")[:3]
    out = np.zeros((P, P))
    done = np.zeros((P, P), dtype=bool)
    x, y = np.arange(P)[:, None], np.arange(P)[None, :]
    for i in top:  # the largest value whose index is neither x nor y
        take = ~done & (x != i) & (y != i)
        out[take] = values[i]
        done |= take
    return out


class FixedHomeState(_SwapState):
    """Homes known in advance: local pairs are linear in the placement.

    Args:
        home_counts_EP: int64 [E, P], tokens homed on rank r that use expert e.
    """

    def __init__(self, home_counts_EP, loads, rank_of, theta) -> None:
        super().__init__(rank_of, loads, home_counts_EP.shape[1], theta)
        self.C = np.asarray(home_counts_EP, dtype=np.int64)
        self.local = fixed_home_local_pairs(self.C, self.rank)

    def gains(self) -> np.ndarray:
        r = self.rank
        own = self.C[np.arange(r.shape[0]), r]
        cross = self.C[:, r]  # cross[a, b] = C[a, rank b]
        return cross + cross.T - own[:, None] - own[None, :]

    def _move(self, a: int, b: int) -> None:
        ra, rb = self.rank[a], self.rank[b]
        self.local += int(self.C[a, rb] + self.C[b, ra] - self.C[a, ra] - self.C[b, rb])


class PairwiseState(_SwapState):
    """Balanced partition of the co-activation graph: W[a, b] = tokens using both a and b;
    "local" counts co-activated expert pairs on one rank (equals co-located tokens for k = 2)."""

    def __init__(self, routes: LayerRoutes, rank_of, num_ranks, theta) -> None:
        super().__init__(rank_of, routes.loads, num_ranks, theta)
        E = routes.num_experts
        W = np.zeros((E, E), dtype=np.int64)
        k = routes.sets.shape[1]
        for i in range(k):
            for j in range(k):
                if i != j:
                    np.add.at(W, (routes.sets[:, i], routes.sets[:, j]), routes.weights)
        self.W = W
        self.S = np.stack([W[:, self.rank == q].sum(axis=1) for q in range(num_ranks)], axis=1)
        self.local = int(self.S[np.arange(E), self.rank].sum()) // 2

    def gains(self) -> np.ndarray:
        r = self.rank
        own = self.S[np.arange(r.shape[0]), r]
        cross = self.S[:, r]
        return cross + cross.T - own[:, None] - own[None, :] - 2 * self.W

    def _move(self, a: int, b: int) -> None:
        ra, rb = self.rank[a], self.rank[b]
        self.local += int(self.gains()[a, b])
        self.S[:, ra] += self.W[:, b] - self.W[:, a]
        self.S[:, rb] += self.W[:, a] - self.W[:, b]


class CoLocationState(_SwapState):
    """Exact co-location objective with incremental swap gains.

    For every (route u, member x) "slot" we keep ``contrib[s, q]``: the change of route u's best
    rank count if x alone moved to rank q. Then
        gain(a <-> b) = Dmove[a, rank b] + Dmove[b, rank a] - Corr[a, b] - Corr[b, a]
    where Dmove sums contrib over a's routes and Corr[a, b] sums, over routes holding both, the
    contrib of moving a to b's rank (in those routes the swap changes nothing). A swap touches
    only routes that hold a or b, so only their slots are recomputed.
    """

    def __init__(self, routes: LayerRoutes, rank_of, num_ranks, theta) -> None:
        super().__init__(rank_of, routes.loads, num_ranks, theta)
        self.routes = routes
        U, k = routes.sets.shape
        E = routes.num_experts
        self.k = k
        self.slot_expert = routes.sets.ravel()  # slot s = u * k + j
        self.slot_route = np.repeat(np.arange(U), k)
        # Ordered slot pairs (s, t) inside one route, s != t, grouped by route.
        ii, jj = np.nonzero(~np.eye(k, dtype=bool))
        self.pair_i = ii  # [k(k-1)]
        self.pair_j = jj
        # Routes of each expert (CSR over slots, sorted by expert).
        order = np.argsort(self.slot_expert, kind="stable")
        self.routes_of_sorted = self.slot_route[order]
        self.routes_of_start = np.searchsorted(self.slot_expert[order], np.arange(E + 1))
        self.H = _hits(self.rank, routes.sets, num_ranks)
        self.Dmove = np.zeros(E * num_ranks, dtype=np.int64)
        self.Corr = np.zeros(E * E, dtype=np.int64)
        self._accumulate(np.arange(U), +1)
        self.local = int((self.H.max(axis=1) * routes.weights).sum())

    def _accumulate(self, route_idx: np.ndarray, sign: int) -> None:
        """Add (sign=+1) or remove (-1) the contributions of ``route_idx`` (int64 [u])."""
        k, P, E = self.k, self.num_ranks, self.routes.num_experts
        if route_idx.size == 0:
            return
        H = self.H[route_idx]  # int32 [u, P]
        w = self.routes.weights[route_idx].astype(np.int32)
        best = H.max(axis=1)
        members = self.routes.sets[route_idx]  # [u, k]
        rk = self.rank[members]  # [u, k]
        Hm = np.repeat(H[:, None, :], k, axis=1)  # [u, k, P]
        Hm[np.arange(len(route_idx))[:, None], np.arange(k)[None, :], rk] -= 1  # (u, j) unique
        new = np.maximum(Hm.max(axis=2, keepdims=True), Hm + 1)
        contrib = (new - best[:, None, None]) * w[:, None, None]  # [u, k, P]
        flat = (members[:, :, None] * P + np.arange(P)[None, None, :]).ravel()
        self.Dmove += sign * np.bincount(flat, weights=contrib.ravel(), minlength=E * P).astype(np.int64)
        if k > 1:
            a = members[:, self.pair_i]  # [u, k(k-1)]
            b = members[:, self.pair_j]
            c = np.take_along_axis(
                contrib.reshape(len(route_idx), k * P),
                self.pair_i[None, :] * P + rk[:, self.pair_j],
                axis=1,
            )
            self.Corr += sign * np.bincount(
                (a * E + b).ravel(), weights=c.ravel(), minlength=E * E
            ).astype(np.int64)

    def gains(self) -> np.ndarray:
        E, P = self.routes.num_experts, self.num_ranks
        D = self.Dmove.reshape(E, P)[:, self.rank]  # D[a, b] = Dmove[a, rank b]
        C = self.Corr.reshape(E, E)
        return D + D.T - C - C.T

    def _touched(self, a: int, b: int) -> np.ndarray:
        s = self.routes_of_start
        return np.union1d(self.routes_of_sorted[s[a] : s[a + 1]], self.routes_of_sorted[s[b] : s[b + 1]])

    def _move(self, a: int, b: int) -> None:
        touched = self._touched(a, b)
        w = self.routes.weights[touched]
        before = int((self.H[touched].max(axis=1) * w).sum())
        self._accumulate(touched, -1)
        ra, rb = int(self.rank[a]), int(self.rank[b])
        self.rank[a], self.rank[b] = rb, ra
        self.H[touched] = _hits(self.rank, self.routes.sets[touched], self.num_ranks)
        self._accumulate(touched, +1)
        self.rank[a], self.rank[b] = ra, rb  # apply_swap sets it again
        self.local += int((self.H[touched].max(axis=1) * w).sum()) - before


def local_search(state: _SwapState, *, max_swaps: int = 100_000) -> _SwapState:
    """Best-improvement pairwise swaps until no swap lowers the objective."""
    for _ in range(max_swaps):
        cost = state.swap_costs()
        flat = int(np.argmin(cost))
        if not cost.flat[flat] < -1e-12:
            break
        a, b = divmod(flat, cost.shape[1])
        state.apply_swap(a, b)
    return state


# ---- constructive steps -------------------------------------------------------------------------
def eplb_packing(loads: np.ndarray, num_ranks: int) -> np.ndarray:
    """Balanced packing (EPLB-style, no replicas): heaviest expert first into the lightest rank
    that still has room for it. Returns rank_of int64 [E]."""
    E = loads.shape[0]
    n = E // num_ranks
    rank_of = np.empty(E, dtype=np.int64)
    rank_load = np.zeros(num_ranks, dtype=np.int64)
    room = np.full(num_ranks, n)
    for e in np.argsort(-loads, kind="stable"):
        open_ranks = np.nonzero(room > 0)[0]
        r = int(open_ranks[np.argmin(rank_load[open_ranks])])
        rank_of[e] = r
        rank_load[r] += loads[e]
        room[r] -= 1
    return rank_of


def hottest_first(home_counts_EP: np.ndarray, loads: np.ndarray, theta: float) -> np.ndarray:
    """The paper's placement step: experts in falling load order, each to the rank with room
    that best trades its local pairs there against the resulting peak rank load."""
    E, P = home_counts_EP.shape
    n = E // P
    pairs = max(int(loads.sum()), 1)
    rank_of = np.empty(E, dtype=np.int64)
    rank_load = np.zeros(P, dtype=np.int64)
    room = np.full(P, n)
    for e in np.argsort(-loads, kind="stable"):
        peak = np.maximum(rank_load + loads[e], rank_load.max())
        score = theta * peak * P / pairs - (1.0 - theta) * home_counts_EP[e] / pairs
        score = np.where(room > 0, score, np.inf)
        r = int(np.argmin(score))
        rank_of[e] = r
        rank_load[r] += loads[e]
        room[r] -= 1
    return rank_of


def balanced_homes(hits_TP: np.ndarray, capacity: int) -> np.ndarray:
    """Send each token to the rank holding most of its experts, at most ``capacity`` tokens per
    rank (greedy rounds: every unplaced token asks its j-th best rank; ranks take the tokens with
    the most experts there first). Needs capacity * P >= T.

    Args:
        hits_TP: int [T, P] experts of token t on rank r.
    Returns:
        int64 [T] home rank.
    """
    T, P = hits_TP.shape
    if capacity * P < T:
        raise ValueError(f"balanced_homes: capacity {capacity} x {P} ranks < {T} tokens")
    prefs = np.argsort(-hits_TP, axis=1, kind="stable")  # [T, P]
    home = np.full(T, -1, dtype=np.int64)
    room = np.full(P, capacity, dtype=np.int64)
    for j in range(P):
        todo = np.nonzero(home < 0)[0]
        if todo.size == 0:
            break
        want = prefs[todo, j]
        value = hits_TP[todo, want]
        order = np.lexsort((todo, -value, want))  # by rank, then more hits first, then token
        todo, want = todo[order], want[order]
        starts = np.searchsorted(want, np.arange(P))
        pos = np.arange(todo.size) - starts[want]
        ok = pos < room[want]
        home[todo[ok]] = want[ok]
        room -= np.bincount(want[ok], minlength=P)
    return home
