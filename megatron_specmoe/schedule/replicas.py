"""Redundant experts: extra physical slots that replicate hot experts (EPLB's redundant experts).

Notation
    T: tokens.   k: top-k.   E: logical experts.   P: EP ranks.   n = E / P: base slots per rank.
    R: redundant experts (extra slots in all), r = R / P extra slots per rank; s = n + r slots per
    rank, P * s physical slots in all.   mask: bool [E, P], expert e has a copy on rank q.

Layout. A ``ReplicatedPlacement`` is a base ``ExpertPlacement`` (a permutation: every expert once)
plus, on every rank, r extra slots holding copies of experts that live elsewhere. Rank q's physical
slots are q*s .. q*s + s - 1: its n base experts first (the base placement's order), then its r
replicas. No rank holds two copies of one expert.

Which copy a pair uses (``route_table``; the dispatcher and every measure use this one table):
    the copy on the token's home rank if there is one (the pair stays local); else the copy on the
    rank with the least planned load (``planned_load``, fixed in the plan, ties to the lower rank).
The table is static (int64 [E, P], indexed by (expert, home rank)), so routing needs no host sync
and is deterministic; "least loaded" means by the plan's calibration load, not this batch's.
``planned_load[q]`` = sum over rank q's slots of load(e) / copies(e): each expert's calibration
pairs shared evenly among its copies.

Where copies may go (``allowed``, bool [E, P], default everywhere): a copy of e only on a rank q
with allowed[e, q]. With group-limited routing (``schedule/router_groups.py``) ``RouterGroups.
replica_ranks`` allows exactly the ranks of e's group's domain (its own ranks, or its node; every
rank for domain "none"), so every copy of e, and so every rank the route table can send a pair of
e to, lies in the domain the base placement keeps e in: a token that uses M groups still reaches at
most M domains (``measure/nodes.py``'s ``max_nodes_per_token`` keeps the base placement's bound).

Policies (``ReplicaPolicy``), greedy over the allowed (expert, rank) pairs, ties to the lower expert / rank:
    "load"          EPLB: R times, copy the expert with the highest load per copy onto the rank with
                    the least planned load among ranks with a free slot and without that expert.
    "coactivation"  R times, copy the (expert e, rank q) with the most calibration tokens homed on q
                    (co-location home under the base placement: the rank holding most of its
                    experts) that use e, e not yet on q: the pairs that a copy there makes local.
    "both"          the first R // 2 copies by "load", the rest by "coactivation".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence, get_args

import numpy as np

from megatron_specmoe.schedule.placement import ExpertPlacement

__all__ = ["ReplicaPolicy", "REPLICA_POLICIES", "ReplicatedPlacement", "replicate", "replicate_layers",
           "replicas_to_arrays", "replicas_from_arrays"]

ReplicaPolicy = Literal["load", "coactivation", "both"]
REPLICA_POLICIES: tuple[str, ...] = get_args(ReplicaPolicy)


@dataclass(frozen=True, kw_only=True)
class ReplicatedPlacement:
    """A base placement plus r replica slots per rank (module docstring).

    Attributes:
        base: the base ``ExpertPlacement`` (E experts, P ranks).
        extra: P tuples of r logical experts each: rank q's replica slots, in slot order.
        planned_load: length P, each rank's planned pairs (module docstring), for the route table.
        policy: the ``ReplicaPolicy`` that chose the replicas.
    """

    base: ExpertPlacement
    extra: tuple[tuple[int, ...], ...]
    planned_load: tuple[float, ...]
    policy: str

    def __post_init__(self) -> None:
        extra = tuple(tuple(int(e) for e in row) for row in self.extra)
        object.__setattr__(self, "extra", extra)
        object.__setattr__(self, "planned_load", tuple(float(x) for x in self.planned_load))
        p, e = self.base.ep_size, self.base.num_experts
        if self.policy not in REPLICA_POLICIES:
            raise ValueError(f"ReplicatedPlacement.policy={self.policy!r}; choose one of {list(REPLICA_POLICIES)}")
        if len(extra) != p or len({len(row) for row in extra}) > 1:
            raise ValueError(
                f"ReplicatedPlacement.extra must give every one of the {p} ranks the same number of "
                f"replica slots, got lengths {[len(row) for row in extra]}"
            )
        if len(self.planned_load) != p:
            raise ValueError(f"ReplicatedPlacement.planned_load must have P={p} entries, got {len(self.planned_load)}")
        groups = self.base.rank_groups()
        for q, row in enumerate(extra):
            bad = [x for x in row if not 0 <= x < e]
            if bad:
                raise ValueError(f"ReplicatedPlacement.extra[{q}] holds expert ids {bad} outside 0..{e - 1}")
            held = groups[q] + list(row)
            if len(set(held)) != len(held):
                dupes = sorted({x for x in held if held.count(x) > 1})
                raise ValueError(f"ReplicatedPlacement: rank {q} would hold experts {dupes} twice; a replica "
                                 "must go to a rank without that expert")

    # ---- views ------------------------------------------------------------------------------
    @property
    def ep_size(self) -> int:
        return self.base.ep_size

    @property
    def num_experts(self) -> int:
        return self.base.num_experts

    @property
    def redundant(self) -> int:
        """R, replica slots in all."""
        return sum(len(row) for row in self.extra)

    @property
    def slots_per_rank(self) -> int:
        return self.base.experts_per_rank + (len(self.extra[0]) if self.extra else 0)

    @property
    def physical_to_logical(self) -> tuple[int, ...]:
        """Length P * s: the logical expert in each physical slot."""
        return tuple(x for g, row in zip(self.base.rank_groups(), self.extra) for x in list(g) + list(row))

    def rank_mask(self) -> np.ndarray:
        """bool [E, P]: expert e has a copy on rank q."""
        mask = np.zeros((self.num_experts, self.ep_size), dtype=bool)
        mask[np.arange(self.num_experts), self.base.rank_of_logical()] = True
        for q, row in enumerate(self.extra):
            mask[list(row), q] = True
        return mask

    def copies(self) -> np.ndarray:
        """int64 [E]: copies of each expert (1 + its replicas)."""
        return self.rank_mask().sum(axis=1).astype(np.int64)

    def route_table(self) -> np.ndarray:
        """int64 [E, P]: the physical slot a pair of expert e from home rank q goes to (module
        docstring: the local copy, else the copy on the least planned-load rank)."""
        s = self.slots_per_rank
        p2l = np.asarray(self.physical_to_logical, dtype=np.int64)
        slot_of = {}  # (expert, rank) -> slot
        for slot, e in enumerate(p2l.tolist()):
            slot_of[(e, slot // s)] = slot
        load = np.asarray(self.planned_load)
        table = np.empty((self.num_experts, self.ep_size), dtype=np.int64)
        mask = self.rank_mask()
        for e in range(self.num_experts):
            ranks = np.nonzero(mask[e])[0]
            remote = int(ranks[np.lexsort((ranks, load[ranks]))[0]])  # least load, then lower rank
            for q in range(self.ep_size):
                table[e, q] = slot_of[(e, q)] if mask[e, q] else slot_of[(e, remote)]
        return table

    def to_json(self) -> dict:
        return {"base": self.base.to_json(), "extra": [list(r) for r in self.extra],
                "planned_load": list(self.planned_load), "policy": self.policy}


def _planned_load(mask: np.ndarray, loads: np.ndarray) -> np.ndarray:
    share = loads / np.maximum(mask.sum(axis=1), 1)
    return (mask * share[:, None]).sum(axis=0)


def _by_load(mask: np.ndarray, free: np.ndarray, loads: np.ndarray, allowed: np.ndarray) -> Optional[tuple[int, int]]:
    per_copy = loads / mask.sum(axis=1)
    rank_load = _planned_load(mask, loads)
    for e in np.lexsort((np.arange(loads.shape[0]), -per_copy)):
        ok = np.nonzero((free > 0) & ~mask[e] & allowed[e])[0]
        if ok.size:
            return int(e), int(ok[np.lexsort((ok, rank_load[ok]))[0]])
    return None


def _by_coactivation(mask: np.ndarray, free: np.ndarray, gain: np.ndarray, allowed: np.ndarray) -> Optional[tuple[int, int]]:
    g = np.where(~mask.T & allowed.T & (free[:, None] > 0), gain, -1)  # [P, E]
    if g.max() < 0:
        return None
    q, e = np.unravel_index(int(np.argmax(g)), g.shape)  # first maximum: lower rank, then expert
    return int(e), int(q)


def replicate(
    base: ExpertPlacement, experts_Tk: np.ndarray, *, redundant: int, policy: ReplicaPolicy = "load",
    allowed: Optional[np.ndarray] = None,
) -> ReplicatedPlacement:
    """Add ``redundant`` replica slots (R, a multiple of P) to ``base`` from one layer's routes.

    Args:
        base: the layer's base placement.
        experts_Tk: int [T, k], the calibration routes of this layer (logical experts).
        redundant: R >= 0, a multiple of P.
        policy: one of ``ReplicaPolicy``.
        allowed: bool [E, P], where a copy of each expert may go (module docstring); None: anywhere.
    """
    p, e = base.ep_size, base.num_experts
    if policy not in REPLICA_POLICIES:
        raise ValueError(f"replicate: policy={policy!r}; choose one of {list(REPLICA_POLICIES)}")
    if redundant < 0 or redundant % p:
        raise ValueError(
            f"--redundant-experts {redundant} must be a non-negative multiple of the EP size {p} (every "
            "rank gains the same number of slots)"
        )
    if redundant // p > e - base.experts_per_rank:
        raise ValueError(f"--redundant-experts {redundant}: a rank can hold at most {e - base.experts_per_rank} "
                         "replicas (one copy of each expert it lacks)")
    mask = np.zeros((e, p), dtype=bool)
    mask[np.arange(e), base.rank_of_logical()] = True
    allowed = np.ones((e, p), dtype=bool) if allowed is None else np.asarray(allowed, dtype=bool)
    if allowed.shape != (e, p):
        raise ValueError(f"replicate: allowed must be bool [E, P]=({e}, {p}), got shape {allowed.shape}")
    room = (allowed & ~mask).sum(axis=0)  # [P]: experts each rank may still take a copy of
    if redundant and room.min() < redundant // p:
        q = int(np.argmin(room))
        raise ValueError(
            f"--redundant-experts {redundant}: rank {q} may hold copies of only {int(room[q])} expert(s) it "
            f"lacks ({redundant // p} replica slots per rank asked); with router groups a copy stays in its "
            "group's domain (a domain of one rank allows none): choose fewer redundant experts, or a wider "
            "--group-domain (node, none)")
    ex = np.asarray(experts_Tk).astype(np.int64)
    loads = np.bincount(ex.ravel(), minlength=e).astype(np.float64)
    free = np.full(p, redundant // p, dtype=np.int64)
    # gain[q, e]: calibration tokens homed on q (co-location under the base placement) using e.
    rank_of = base.rank_of_logical()
    hits = np.zeros((ex.shape[0], p), dtype=np.int64)
    np.add.at(hits, (np.repeat(np.arange(ex.shape[0]), ex.shape[1]), rank_of[ex].ravel()), 1)
    home = hits.argmax(axis=1)
    gain = np.zeros((p, e), dtype=np.int64)
    np.add.at(gain, (np.repeat(home, ex.shape[1]), ex.ravel()), 1)
    extra: list[list[int]] = [[] for _ in range(p)]
    for i in range(redundant):
        use_load = policy == "load" or (policy == "both" and i < redundant // 2)
        pick = _by_load(mask, free, loads, allowed) if use_load else _by_coactivation(mask, free, gain, allowed)
        if pick is None:  # every free slot's rank already holds every expert it could take
            pick = _by_load(mask, free, loads, allowed)
        if pick is None:  # unreachable after the room check above; kept as a named failure
            raise ValueError(f"replicate: no allowed rank has a free slot for copy {i + 1} of {redundant}")
        expert, rank = pick
        mask[expert, rank] = True
        free[rank] -= 1
        extra[rank].append(expert)
    return ReplicatedPlacement(base=base, extra=tuple(tuple(r) for r in extra),
                               planned_load=tuple(_planned_load(mask, loads)), policy=policy)


def replicate_layers(
    placements: Sequence[ExpertPlacement], experts_TLk: np.ndarray, *, redundant: int, policy: ReplicaPolicy,
    allowed: Optional[np.ndarray] = None,
) -> list[ReplicatedPlacement]:
    """``replicate`` for every layer: ``experts_TLk`` int [T, L, k]; ``allowed`` bool [E, P] (every
    layer alike) or None."""
    return [replicate(pl, experts_TLk[:, layer], redundant=redundant, policy=policy, allowed=allowed)
            for layer, pl in enumerate(placements)]


def replicas_to_arrays(replicas: Sequence[ReplicatedPlacement]) -> dict[str, np.ndarray]:
    """Plan arrays: ``replicas/extra`` int64 [L, P, r] and ``replicas/planned_load`` float64 [L, P]."""
    return {
        "replicas/extra": np.asarray([r.extra for r in replicas], dtype=np.int64),
        "replicas/planned_load": np.asarray([r.planned_load for r in replicas], dtype=np.float64),
    }


def replicas_from_arrays(placements: Sequence[ExpertPlacement], arrays: dict, policy: str) -> Optional[list[ReplicatedPlacement]]:
    """The plan's replicas (``replicas_to_arrays``'s arrays over ``placements``), or None without."""
    if "replicas/extra" not in arrays:
        return None
    extra, load = np.asarray(arrays["replicas/extra"]), np.asarray(arrays["replicas/planned_load"])
    if extra.ndim != 3 or extra.shape[0] != len(placements) or load.shape != extra.shape[:2]:
        raise ValueError(f"plan arrays replicas/extra {extra.shape} and replicas/planned_load {load.shape} "
                         f"do not match {len(placements)} layers; re-run `specmoe plan`")
    return [ReplicatedPlacement(base=pl, extra=tuple(map(tuple, extra[l].tolist())),
                                planned_load=tuple(load[l].tolist()), policy=policy)
            for l, pl in enumerate(placements)]
