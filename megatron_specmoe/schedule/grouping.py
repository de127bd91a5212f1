"""Speculative expert grouping (s-EG): which experts each EP rank hosts, per MoE layer.

Notation
    T: traced tokens.   L: MoE layers.   k: top-k.   E: experts.   P: EP ranks.
    n = E // P: experts per rank (exactly n on every rank).
    theta in [0, 1]: weight of load balance against remote activations.

Glossary
    home rank:   the EP rank holding a token when the MoE layer starts. With speculative token
                 shuffling it is chosen after placement, as the rank holding most of the token's
                 (predicted) experts; callers who already know the shuffle pass it as home ranks.
    co-location: with unknown homes, a token's local pairs are max over ranks of its experts on
                 that rank (the token goes where most of its experts are).

Objective per layer (docs/method.md, s-EG; smaller is better):
    theta * load_imbalance + (1 - theta) * remote_share
where load_imbalance is max/mean pairs per rank and remote_share is remote pairs / all pairs, both
as ``measures.measure_routes`` defines them (``grouping_cost`` computes them that way).

Methods (``GroupingMethod``):
    contiguous   Megatron's default, expert e on rank e // n.
    random       a seeded random balanced placement.
    eplb         load only: heaviest expert first into the lightest rank with room (DeepSeek
                 EPLB's balanced packing, no replicas).
    graph        balanced partition of the co-activation graph (pairwise swaps, Kernighan-Lin
                 style, from several starts); homes must be unknown.
    alternating  the paper's heuristic: homes -> hottest-first placement by score -> pairwise
                 swaps -> re-assign tokens (balanced) -> repeat; keep the best.
    search       local search with restarts on the exact objective, started from the graph,
                 eplb, contiguous and random placements. The strongest heuristic here.
    milp         the exact 0-1 program (``grouping_milp``); small instances only.

Router groups (``GroupingOptions.router_groups``, ``schedule.router_groups``): with group-limited
routing each expert may only move inside its group's rank domain (its own ranks, or its node).
Every method then builds its starts per domain (contiguous, random and EPLB packing inside each
domain, hottest-first inside each domain) and its swaps only pair experts of one domain, so every
placement it returns keeps the groups where the domain says (checked before returning). ``milp``
refuses router groups.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable, Literal, Optional, get_args

import numpy as np

from megatron_specmoe.schedule import grouping_search as gs
from megatron_specmoe.artifacts.traces import RoutingTrace
from megatron_specmoe.schedule.placement import ExpertPlacement
from megatron_specmoe.schedule.router_groups import RouterGroups, check_domains

__all__ = [
    "GroupingMethod",
    "GroupingOptions",
    "GroupingCost",
    "group_layer",
    "group_experts",
    "grouping_cost",
    "placement_from_ranks",
]

GroupingMethod = Literal["contiguous", "random", "eplb", "graph", "alternating", "search", "milp"]


@dataclass(frozen=True, kw_only=True)
class GroupingOptions:
    """How to group.

    Attributes:
        method: one of ``GroupingMethod``.
        theta: weight of load imbalance in the objective, in [0, 1].
        seed: seeds every random choice (per layer: ``[seed, layer]``).
        restarts: random starts for ``graph`` and ``search`` (besides the fixed ones).
        iterations: rounds of the alternating heuristic.
        exact_starts: ``search`` refines this many of its best distinct starts on the exact
            objective (the costly step).
        milp_time_limit_s: time limit of one exact solve.
        router_groups: the model's group-limited routing and where groups may live
            (``schedule.router_groups.RouterGroups``); None: no groups (any placement).
    """

    method: GroupingMethod = "search"
    theta: float = 0.1
    seed: int = 0
    restarts: int = 4
    iterations: int = 6
    exact_starts: int = 2
    milp_time_limit_s: float = 60.0
    router_groups: Optional[RouterGroups] = None

    def __post_init__(self) -> None:
        if self.router_groups is not None and not isinstance(self.router_groups, RouterGroups):
            raise ValueError(f"GroupingOptions.router_groups must be a RouterGroups or None, got "
                             f"{type(self.router_groups).__name__}")
        if self.method == "milp" and self.constrained:
            raise ValueError("GroupingOptions: method 'milp' cannot keep router groups in their domains; "
                             "use 'search' (or router groups in domain 'none')")
        if self.method not in get_args(GroupingMethod):
            raise ValueError(
                f"GroupingOptions.method={self.method!r} is unknown; choose one of "
                f"{list(get_args(GroupingMethod))}"
            )
        if not (0.0 <= float(self.theta) <= 1.0):
            raise ValueError(f"GroupingOptions.theta={self.theta} must lie in [0, 1]")
        if self.restarts < 0 or self.iterations < 1 or self.exact_starts < 1:
            raise ValueError(
                f"GroupingOptions: restarts={self.restarts} must be >= 0, "
                f"iterations={self.iterations} >= 1 and exact_starts={self.exact_starts} >= 1"
            )

    @property
    def constrained(self) -> bool:
        """Whether router groups confine experts to rank domains."""
        g = self.router_groups
        return g is not None and g.active and g.domain != "none"


@dataclass(frozen=True, kw_only=True)
class GroupingCost:
    """The objective's parts for one layer (computed with ``measures.py``).

    Attributes:
        load_imbalance: max / mean pairs per rank.
        remote_share: remote pairs / pairs (1 - local activation rate).
        co_located_share: share of tokens whose experts all sit on their home rank.
        objective: theta * load_imbalance + (1 - theta) * remote_share.
    """

    load_imbalance: float
    remote_share: float
    co_located_share: float
    objective: float


def placement_from_ranks(rank_of: np.ndarray, ep_size: int) -> ExpertPlacement:
    """ExpertPlacement from rank_of int [E] (experts ascending within each rank)."""
    rank_of = np.asarray(rank_of)
    return ExpertPlacement.from_rank_groups(
        [np.nonzero(rank_of == r)[0].tolist() for r in range(ep_size)]
    )


def _check_shape(num_experts: int, ep_size: int) -> None:
    if ep_size < 1 or num_experts % ep_size != 0:
        raise ValueError(
            f"grouping: ep_size={ep_size} does not divide num_experts={num_experts}; every EP rank "
            "must host E/P experts (choose an EP size that divides E)"
        )


def _check_home(home_rank: Optional[np.ndarray], tokens: int, ep_size: int, where: str) -> Optional[np.ndarray]:
    if home_rank is None:
        return None
    h = np.asarray(home_rank)
    if h.shape != (tokens,) or not np.issubdtype(h.dtype, np.integer):
        raise ValueError(f"{where}: home ranks must be int [T]=({tokens},), got {h.dtype} {h.shape}")
    if h.min() < 0 or h.max() >= ep_size:
        raise ValueError(f"{where}: home ranks must lie in 0..{ep_size - 1}, found {int(h.min())}..{int(h.max())}")
    return h.astype(np.int64)


def grouping_cost(
    experts_Tk: np.ndarray,
    placement: ExpertPlacement,
    *,
    theta: float,
    home_rank: Optional[np.ndarray] = None,
) -> GroupingCost:
    """Objective of ``placement`` on one layer's routes.

    Args:
        experts_Tk: int [T, k] logical experts per token.
        placement: the layer's placement.
        theta: weight in [0, 1].
        home_rank: optional int64 [T]; without it each token's home is the rank holding most of
            its experts (lowest rank on ties).
    """
    import torch

    from megatron_specmoe.measure.measures import measure_routes, rank_hits

    if not (0.0 <= float(theta) <= 1.0):
        raise ValueError(f"grouping_cost: theta={theta} must lie in [0, 1]")
    ex = np.asarray(experts_Tk)
    rank_of = placement.rank_of_logical()
    hits = rank_hits(torch.from_numpy(rank_of[ex].astype(np.int64)), placement.ep_size)
    h = _check_home(home_rank, ex.shape[0], placement.ep_size, "grouping_cost")
    home = hits.argmax(dim=1) if h is None else torch.from_numpy(h)
    m = measure_routes(hits, home)
    remote = 1.0 - m.local_activation_rate
    full = float((hits.gather(1, home.view(-1, 1)).view(-1) == ex.shape[1]).double().mean())
    return GroupingCost(
        load_imbalance=m.load_imbalance,
        remote_share=remote,
        co_located_share=full,
        objective=float(theta) * m.load_imbalance + (1.0 - float(theta)) * remote,
    )


# ---- methods --------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class _LayerProblem:
    experts_Tk: np.ndarray  # int64 [T, k]
    routes: gs.LayerRoutes
    num_experts: int
    ep_size: int
    home_rank: Optional[np.ndarray]  # int64 [T] or None
    options: GroupingOptions
    rng: np.random.Generator
    expert_domain: Optional[np.ndarray] = None  # int64 [E] (router groups), or None
    domain_ranks: int = 0  # D, ranks per domain (router groups)

    def domains(self) -> list[tuple[np.ndarray, int]]:
        """(experts int64 [E_d], first rank) of each domain; one domain of all when unconstrained."""
        if self.expert_domain is None:
            return [(np.arange(self.num_experts), 0)]
        return [(np.nonzero(self.expert_domain == d)[0], d * self.domain_ranks)
                for d in range(self.ep_size // self.domain_ranks)]

    def domain_ep(self) -> int:
        return self.ep_size if self.expert_domain is None else self.domain_ranks

    def allowed(self) -> Optional[np.ndarray]:
        """bool [E, E]: swaps inside one domain (None: all)."""
        if self.expert_domain is None:
            return None
        return self.expert_domain[:, None] == self.expert_domain[None, :]

    def search(self, state: "gs._SwapState") -> np.ndarray:
        """Local search from ``state`` with swaps restricted to domains; rank_of int64 [E]."""
        state.allowed = self.allowed()
        return gs.local_search(state).rank.copy()

    def eplb(self) -> np.ndarray:
        """EPLB packing inside each domain."""
        out = np.empty(self.num_experts, dtype=np.int64)
        for experts, first in self.domains():
            out[experts] = first + gs.eplb_packing(self.routes.loads[experts], self.domain_ep())
        return out

    def hottest(self, counts: np.ndarray) -> np.ndarray:
        """Hottest-first placement inside each domain (counts int64 [E, P])."""
        out = np.empty(self.num_experts, dtype=np.int64)
        D = self.domain_ep()
        for experts, first in self.domains():
            out[experts] = first + gs.hottest_first(counts[experts][:, first:first + D],
                                                    self.routes.loads[experts], self.options.theta)
        return out

    def home_counts(self, home: np.ndarray) -> np.ndarray:
        """int64 [E, P]: tokens homed on r that use e."""
        k = self.experts_Tk.shape[1]
        idx = self.experts_Tk.ravel() * self.ep_size + np.repeat(home, k)
        return np.bincount(idx, minlength=self.num_experts * self.ep_size).reshape(
            self.num_experts, self.ep_size
        )

    def exact_state(self, rank_of: np.ndarray) -> "gs._SwapState":
        theta = self.options.theta
        if self.home_rank is None:
            return gs.CoLocationState(self.routes, rank_of, self.ep_size, theta)
        return gs.FixedHomeState(self.home_counts(self.home_rank), self.routes.loads, rank_of, theta)

    def objective(self, rank_of: np.ndarray) -> float:
        """The exact objective (fast path; ``grouping_cost`` is the reference)."""
        r = np.asarray(rank_of)
        if self.home_rank is None:
            local = gs.co_location_local_pairs(self.routes, r, self.ep_size)
        else:
            local = gs.fixed_home_local_pairs(self.home_counts(self.home_rank), r)
        loads = np.bincount(r, weights=self.routes.loads, minlength=self.ep_size)
        return gs.objective_value(
            local_pairs=local, rank_loads=loads, pairs=self.routes.pairs, theta=self.options.theta
        )

    def contiguous(self) -> np.ndarray:
        return np.arange(self.num_experts) // (self.num_experts // self.ep_size)

    def random(self) -> np.ndarray:
        out = self.contiguous()
        for experts, _ in self.domains():
            out[experts] = out[experts][self.rng.permutation(experts.size)]
        return out


def _contiguous(pb: _LayerProblem) -> np.ndarray:
    return pb.contiguous()


def _random(pb: _LayerProblem) -> np.ndarray:
    return pb.random()


def _eplb(pb: _LayerProblem) -> np.ndarray:
    return pb.eplb()


def _graph_starts(pb: _LayerProblem) -> list[np.ndarray]:
    starts = [pb.eplb(), pb.contiguous()]
    starts += [pb.random() for _ in range(pb.options.restarts)]
    return [pb.search(gs.PairwiseState(pb.routes, s, pb.ep_size, pb.options.theta)) for s in starts]


def _best(pb: _LayerProblem, candidates: list[np.ndarray]) -> np.ndarray:
    scores = [pb.objective(c) for c in candidates]
    return candidates[int(np.argmin(scores))]


def _graph(pb: _LayerProblem) -> np.ndarray:
    if pb.home_rank is not None:
        raise ValueError(
            "grouping method 'graph' plans from co-activation only and cannot use home ranks; "
            "pass no home ranks, or use 'search' or 'alternating'"
        )
    return _best(pb, _graph_starts(pb))


def _canonical(rank_of: np.ndarray) -> tuple:
    """The partition without its rank labels (ranks renumbered by first expert), so starts that
    differ only by relabelled ranks are searched once (with unknown homes ranks are
    interchangeable)."""
    _, first = np.unique(rank_of, return_index=True)
    relabel = np.empty(first.shape[0], dtype=np.int64)
    relabel[rank_of[np.sort(first)]] = np.arange(first.shape[0])
    return tuple(relabel[rank_of].tolist())


def _search(pb: _LayerProblem) -> np.ndarray:
    # Step 1: starts - graph partitions (only meaningful without homes), eplb, contiguous, random.
    if pb.home_rank is None:
        starts = _graph_starts(pb)
    else:
        starts = [pb.eplb(), pb.contiguous()]
        starts.append(pb.hottest(pb.home_counts(pb.home_rank)))
        starts += [pb.random() for _ in range(pb.options.restarts)]
    # Step 2: exact-objective swaps from the ``exact_starts`` best distinct starts; keep the best.
    seen: set[tuple] = set()
    distinct = []
    for s in starts:
        key = _canonical(s) if pb.home_rank is None else tuple(s.tolist())
        if key not in seen:
            seen.add(key)
            distinct.append(s)
    distinct.sort(key=pb.objective)
    found = [pb.search(pb.exact_state(s)) for s in distinct[: pb.options.exact_starts]]
    return _best(pb, found)


def _alternating(pb: _LayerProblem) -> np.ndarray:
    T = pb.experts_Tk.shape[0]
    capacity = -(-T // pb.ep_size)
    theta = pb.options.theta

    def shuffle(rank_of: np.ndarray) -> np.ndarray:
        flat = (np.arange(T)[:, None] * pb.ep_size + rank_of[pb.experts_Tk]).ravel()
        hits = np.bincount(flat, minlength=T * pb.ep_size).reshape(T, pb.ep_size)
        return gs.balanced_homes(hits, capacity)

    # Step 1: initial homes - the given shuffle; else the balanced shuffles of the contiguous,
    # eplb and ``restarts`` random placements (the alternation only finds a local optimum).
    if pb.home_rank is not None:
        first_homes = [pb.home_rank]
    else:
        seeds = [pb.contiguous(), pb.eplb()]
        seeds += [pb.random() for _ in range(pb.options.restarts)]
        first_homes = [shuffle(s) for s in seeds]
    best, best_score = None, np.inf
    for home in first_homes:
        for _ in range(pb.options.iterations):
            # Step 2: hottest-first placement by score, then pairwise swaps (homes fixed).
            counts = pb.home_counts(home)
            start = pb.hottest(counts)
            rank_of = pb.search(gs.FixedHomeState(counts, pb.routes.loads, start, theta))
            # Step 3: keep the best placement under the real objective.
            score = pb.objective(rank_of)
            if score < best_score - 1e-12:
                best, best_score = rank_of, score
            # Step 4: re-assign tokens to the new placement (given homes stay fixed).
            if pb.home_rank is not None:
                break
            new_home = shuffle(rank_of)
            if np.array_equal(new_home, home):
                break
            home = new_home
    return best


def _milp(pb: _LayerProblem) -> np.ndarray:
    from megatron_specmoe.schedule.grouping_milp import solve_exact

    sol = solve_exact(
        pb.experts_Tk,
        num_experts=pb.num_experts,
        ep_size=pb.ep_size,
        theta=pb.options.theta,
        home_rank=pb.home_rank,
        time_limit_s=pb.options.milp_time_limit_s,
    )
    return sol.placement.rank_of_logical()


_METHODS: dict[str, Callable[[_LayerProblem], np.ndarray]] = {
    "contiguous": _contiguous,
    "random": _random,
    "eplb": _eplb,
    "graph": _graph,
    "alternating": _alternating,
    "search": _search,
    "milp": _milp,
}
assert set(_METHODS) == set(get_args(GroupingMethod))


def group_layer(
    experts_Tk: np.ndarray,
    *,
    num_experts: int,
    ep_size: int,
    options: GroupingOptions,
    home_rank: Optional[np.ndarray] = None,
    layer: int = 0,
) -> ExpertPlacement:
    """Placement of one layer.

    Args:
        experts_Tk: int [T, k], the logical experts each token selected at this layer.
        num_experts: E.   ep_size: P (must divide E).
        options: method, theta, seed, ...
        home_rank: optional int64 [T], each token's home rank under the predictor's shuffle.
        layer: the layer index, only to seed (``[seed, layer]``) and to name errors.
    """
    _check_shape(num_experts, ep_size)
    ex = np.asarray(experts_Tk).astype(np.int64)
    where = f"grouping layer {layer}"
    routes = gs.compress_routes(ex, num_experts, where=where)
    pb = _LayerProblem(
        experts_Tk=ex,
        routes=routes,
        num_experts=num_experts,
        ep_size=ep_size,
        home_rank=_check_home(home_rank, ex.shape[0], ep_size, where),
        options=options,
        rng=np.random.default_rng([options.seed, layer]),
        **_domains(options, num_experts, ep_size),
    )
    placement = placement_from_ranks(_METHODS[options.method](pb), ep_size)
    if options.constrained:
        check_domains(placement, options.router_groups, where=where)
    return placement


def _domains(options: GroupingOptions, num_experts: int, ep_size: int) -> dict:
    if not options.constrained:
        return {}
    groups = options.router_groups
    return {"expert_domain": groups.expert_domain(num_experts, ep_size),
            "domain_ranks": groups.domain_ranks(num_experts, ep_size)}


def group_experts(
    trace: RoutingTrace,
    *,
    ep_size: int,
    options: GroupingOptions,
    home_ranks: Optional[np.ndarray] = None,
    progress: bool = False,
    on_layer: Optional[Callable[[int, int], None]] = None,
) -> list[ExpertPlacement]:
    """One placement per MoE layer of ``trace``.

    Args:
        trace: routes, experts int32 [T, L, k].
        ep_size: P; must divide ``trace.num_experts``.
        options: see ``GroupingOptions``.
        home_ranks: optional int64 [T] (same home at every layer) or [T, L], the home rank of
            each token under the shuffle the predictor would make.
        progress: print one line per layer to stderr.
        on_layer: called as ``on_layer(done, L)`` after each layer (a progress bar's update).
    """
    _check_shape(trace.num_experts, ep_size)
    T, L = trace.num_tokens, trace.num_layers
    if home_ranks is not None:
        h = np.asarray(home_ranks)
        if h.shape not in ((T,), (T, L)):
            raise ValueError(
                f"group_experts: home_ranks must be int [T]=({T},) or [T, L]=({T}, {L}), got {h.shape}"
            )
        if h.ndim == 1:
            h = np.repeat(h[:, None], L, axis=1)
    out = []
    t0 = time.perf_counter()
    for layer in range(L):
        out.append(
            group_layer(
                trace.experts[:, layer],
                num_experts=trace.num_experts,
                ep_size=ep_size,
                options=options,
                home_rank=None if home_ranks is None else h[:, layer],
                layer=layer,
            )
        )
        if on_layer is not None:
            on_layer(layer + 1, L)
        if progress:
            print(
                f"[group] {options.method}: layer {layer + 1}/{L} done ({time.perf_counter() - t0:.1f} s)",
                file=sys.stderr,
            )
    return out
