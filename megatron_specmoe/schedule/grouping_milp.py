"""Exact expert grouping for small layers: the 0-1 program, solved by HiGHS (scipy ``milp``).

Notation
    E experts, P ranks, n = E // P, U distinct routes (expert sets) with token counts w_u,
    S_u the set of route u, k its size, l_e the load (pairs) of expert e, N = sum_e l_e pairs.

Variables
    x[e, r] in {0, 1}   expert e on rank r
    y[u, r] in {0, 1}   route u's tokens are homed on rank r (only when homes are unknown)
    z[u, r] >= 0        local pairs of route u on rank r (only when homes are unknown)
    m >= 0              the largest rank load

Program (homes unknown, co-location)
    min  theta * P * m / N + (1 - theta) * (1 - sum_{u,r} w_u z[u, r] / N)
    s.t. sum_r x[e, r] = 1;  sum_e x[e, r] = n;  sum_e l_e x[e, r] <= m
         z[u, r] <= sum_{e in S_u} x[e, r];  z[u, r] <= k y[u, r];  sum_r y[u, r] = 1
For k = 2 a tighter form without y: local pairs of route {a, b} are 1 + sum_r z[u, r] with
z[u, r] <= x[a, r], z[u, r] <= x[b, r], z <= 1.
Symmetry (ranks are interchangeable when homes are unknown): ranks are labelled in the order of
their smallest expert, so x[e, r] = 0 for r > e and x[e, r] <= sum_{f < e} x[f, r - 1].
With known homes the local pairs are sum_{e, r} C[e, r] x[e, r] (C = tokens homed on r using e),
so y and z vanish and no symmetry is broken.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from megatron_specmoe.schedule import grouping_search as gs
from megatron_specmoe.schedule.placement import ExpertPlacement

__all__ = ["ExactSolution", "solve_exact", "MAX_EXACT_VARIABLES"]

MAX_EXACT_VARIABLES = 20_000


@dataclass(frozen=True, kw_only=True)
class ExactSolution:
    """Result of the exact solve.

    Attributes:
        placement: the best placement found.
        objective: its objective (theta * load_imbalance + (1 - theta) * remote_share).
        optimal: True when HiGHS proved optimality (False: time limit hit, best found so far).
        bound: HiGHS's lower bound on the objective.
    """

    placement: ExpertPlacement
    objective: float
    optimal: bool
    bound: float


def solve_exact(
    experts_Tk: np.ndarray,
    *,
    num_experts: int,
    ep_size: int,
    theta: float,
    home_rank: Optional[np.ndarray] = None,
    time_limit_s: float = 60.0,
) -> ExactSolution:
    """Solve one layer exactly.

    Args:
        experts_Tk: int [T, k] logical experts per token.
        num_experts: E.  ep_size: P (must divide E).
        theta: in [0, 1].
        home_rank: optional int64 [T] fixed homes.
        time_limit_s: HiGHS time limit.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    if ep_size < 1 or num_experts % ep_size != 0:
        raise ValueError(
            f"solve_exact: ep_size={ep_size} does not divide num_experts={num_experts}"
        )
    if not (0.0 <= float(theta) <= 1.0):
        raise ValueError(f"solve_exact: theta={theta} must lie in [0, 1]")
    routes = gs.compress_routes(np.asarray(experts_Tk), num_experts, where="solve_exact")
    E, P, n = num_experts, ep_size, num_experts // ep_size
    U, k = routes.sets.shape
    N = float(routes.pairs)
    known = home_rank is not None
    pairwise = k == 2
    nx = E * P
    ny = 0 if known else U * P
    nvar = nx + 2 * ny + 1
    if nvar > MAX_EXACT_VARIABLES:
        raise ValueError(
            f"solve_exact: the program would have {nvar} variables (E={E}, P={P}, {U} distinct "
            f"routes); the limit is {MAX_EXACT_VARIABLES}. Use method 'search' for this size, or "
            "fewer tokens/experts"
        )
    X = lambda e, r: e * P + r  # noqa: E731
    Y = lambda u, r: nx + u * P + r  # noqa: E731
    Z = lambda u, r: nx + ny + u * P + r  # noqa: E731
    M = nvar - 1

    c = np.zeros(nvar)
    c[M] = theta * P / N
    if known:
        h = np.asarray(home_rank, dtype=np.int64)
        ex = np.asarray(experts_Tk, dtype=np.int64)
        C = np.bincount(ex.ravel() * P + np.repeat(h, ex.shape[1]), minlength=E * P).reshape(E, P)
        c[:nx] = -(1.0 - theta) * C.ravel() / N
    else:
        for u in range(U):
            for r in range(P):
                c[Z(u, r)] = -(1.0 - theta) * routes.weights[u] / N
    const = (1.0 - theta) * (1.0 - routes.weights.sum() / N if pairwise and not known else 1.0)

    rows, cols, vals, lo, hi = [], [], [], [], []

    def add(entries: list[tuple[int, float]], lb: float, ub: float) -> None:
        i = len(lo)
        for j, v in entries:
            rows.append(i)
            cols.append(j)
            vals.append(v)
        lo.append(lb)
        hi.append(ub)

    for e in range(E):
        add([(X(e, r), 1.0) for r in range(P)], 1, 1)
    for r in range(P):
        add([(X(e, r), 1.0) for e in range(E)], n, n)
        add([(X(e, r), float(routes.loads[e])) for e in range(E)] + [(M, -1.0)], -np.inf, 0)
    if not known and pairwise:
        # k = 2: a route's local pairs are 1 + [both experts on one rank]; z[u, r] <= x[a, r],
        # z[u, r] <= x[b, r] says "both on r" without any y.
        for u in range(U):
            a, b = (int(e) for e in routes.sets[u])
            for r in range(P):
                add([(Z(u, r), 1.0), (X(a, r), -1.0)], -np.inf, 0)
                add([(Z(u, r), 1.0), (X(b, r), -1.0)], -np.inf, 0)
    elif not known:
        for u in range(U):
            add([(Y(u, r), 1.0) for r in range(P)], 1, 1)
            for r in range(P):
                add([(Z(u, r), 1.0)] + [(X(int(e), r), -1.0) for e in routes.sets[u]], -np.inf, 0)
                add([(Z(u, r), 1.0), (Y(u, r), -float(k))], -np.inf, 0)
    if not known:
        # Symmetry: label ranks by their smallest expert, so expert e sits on a rank <= e, and on
        # rank r >= 1 only if rank r - 1 holds a smaller expert.
        for e in range(E):
            for r in range(1, P):
                if r <= e:
                    add([(X(e, r), 1.0)] + [(X(f, r - 1), -1.0) for f in range(e)], -np.inf, 0)
    A = coo_matrix((vals, (rows, cols)), shape=(len(lo), nvar)).tocsr()

    lb = np.zeros(nvar)
    ub = np.ones(nvar)
    ub[nx + ny : nx + 2 * ny] = 1 if pairwise else k
    ub[M] = np.inf
    if not known:
        for e in range(E):
            ub[X(e, e + 1) : X(e, P)] = 0.0  # expert e on a rank <= e (empty slice once e >= P-1)
    integrality = np.zeros(nvar)
    integrality[:nx] = 1
    if pairwise:
        ub[nx : nx + ny] = 0.0  # y is not used by the k = 2 form
    else:
        integrality[nx : nx + ny] = 1
    res = milp(
        c,
        constraints=LinearConstraint(A, lo, hi),
        integrality=integrality,
        bounds=Bounds(lb, ub),
        options={"time_limit": float(time_limit_s)},
    )
    if res.x is None:
        raise ValueError(f"solve_exact: HiGHS found no solution ({res.message}); raise time_limit_s")
    x = np.rint(res.x[:nx]).reshape(E, P)
    rank_of = np.argmax(x, axis=1)
    placement = ExpertPlacement.from_rank_groups([np.nonzero(rank_of == r)[0].tolist() for r in range(P)])
    bound = getattr(res, "mip_dual_bound", None)
    return ExactSolution(
        placement=placement,
        objective=float(res.fun) + const,
        optimal=bool(res.status == 0),
        bound=float(bound) + const if bound is not None else float("nan"),
    )
