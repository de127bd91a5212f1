"""Group-limited routing (DeepSeek-V3's node bound) and the expert placements that respect it.

Notation
    E: routed experts.   P: EP ranks.   n = E // P experts per rank.   k: top-k.   T: tokens.
    G: router groups (``moe_router_num_groups``); group g = logical experts g*E/G .. (g+1)*E/G - 1.
    M: groups a token may use (``moe_router_group_topk``).
    R: EP ranks per node; EP rank r lives on node r // R.
    D: ranks per *domain*, a block of consecutive EP ranks that must host whole router groups.

Group-limited routing is defined on logical expert ids: the router picks its top M groups first,
then the top-k experts inside them. DeepSeek-V3 makes its 8 groups its 8 nodes, so that a token's
experts lie on at most M = 4 nodes. A placement that moves experts across groups' ranks affects
the two ways of applying it (``megatron.apply_plan``) differently:
    dispatcher mode  the router keeps its logical ids, so the model's function is kept, but a
                     group's experts may now sit on several nodes and the node bound breaks;
    router mode      the router's rows are permuted, so physical slots p*E/G .. form the router's
                     group p: unless every such block of slots holds one whole logical group, the
                     groups (and so the model's function) change. ``check_router_permutation``
                     refuses those placements.

Domains. ``RouterGroups.domain`` says where each group may live when the plan is made:
    "rank"  D = max(1, P / G): group g lives on its own D ranks (G <= P), or each rank hosts G / P
            whole groups (G > P). Every placement made this way keeps groups intact, so it is
            allowed in router mode too. (With G >= P every expert stays on its rank: no freedom.)
    "node"  D = max(R, P / G): the experts of a node's groups may move between that node's ranks
            (dispatcher mode only, unless D = P / G): the node bound holds, router mode may refuse.
    "none"  no constraint (D = P): the grouping may break the node bound (dispatcher mode only).
Domain d hosts the experts d*D*n .. (d+1)*D*n - 1 (the groups Megatron's contiguous layout puts
there), which must be whole groups: D*n must be a multiple of E/G.

Redundant experts (``schedule/replicas.py``): ``RouterGroups.replica_ranks`` puts every copy of an
expert in its own group's domain, so the route table (local copy, else the least-loaded copy) only
ever sends a pair to a rank of that domain and the bound stays the base placement's;
``check_replica_domains`` refuses replicas that leave it.

The bound's measure is ``max_nodes_per_token`` of ``measure/nodes.py`` (``specmoe evaluate
--gpus-per-node R``): the most nodes hosting any one token's experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, get_args

import numpy as np

from megatron_specmoe.schedule.placement import ExpertPlacement

__all__ = [
    "GroupDomain",
    "RouterGroups",
    "check_router_permutation",
    "check_domains",
    "check_replica_domains",
]

GroupDomain = Literal["rank", "node", "none"]


@dataclass(frozen=True, kw_only=True)
class RouterGroups:
    """Group-limited routing of a model and where its groups may live.

    Attributes:
        num_groups: G, ``moe_router_num_groups`` (1: no group-limited routing).
        group_topk: M, ``moe_router_group_topk`` (0 when unknown; only recorded and reported).
        domain: ``GroupDomain``, see the module docstring.
        ranks_per_node: R, EP ranks per node (used by domain "node" and by ``node_reach``).
    """

    num_groups: int = 1
    group_topk: int = 0
    domain: GroupDomain = "rank"
    ranks_per_node: int = 8

    def __post_init__(self) -> None:
        if self.domain not in get_args(GroupDomain):
            raise ValueError(f"RouterGroups.domain={self.domain!r}; choose one of {list(get_args(GroupDomain))}")
        for name in ("num_groups", "ranks_per_node"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"RouterGroups.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.group_topk, (int, np.integer)) or not 0 <= self.group_topk <= self.num_groups:
            raise ValueError(f"RouterGroups.group_topk={self.group_topk!r} must lie in 0..num_groups="
                             f"{self.num_groups} (0: unknown)")

    @property
    def active(self) -> bool:
        """Whether group-limited routing is on (G > 1)."""
        return self.num_groups > 1

    def domain_ranks(self, num_experts: int, ep_size: int) -> int:
        """D, the ranks of one domain, for E experts over P ranks (checked; see the module docstring)."""
        G, E, P = self.num_groups, num_experts, ep_size
        if E % G:
            raise ValueError(f"RouterGroups.num_groups={G} does not divide num_experts={E}; "
                             "moe_router_num_groups must divide the routed experts")
        if P < 1 or E % P:
            raise ValueError(f"ep_size={P} does not divide num_experts={E}")
        if self.domain == "none" or not self.active:
            return P
        if G <= P and P % G:
            raise ValueError(f"ep_size={P} is not a multiple of moe_router_num_groups={G}: a group "
                             "cannot have its own ranks; choose an EP size that G divides (or G that "
                             "divides the EP size), or domain 'none'")
        if G > P and G % P:
            raise ValueError(f"moe_router_num_groups={G} is not a multiple of ep_size={P}: ranks cannot "
                             "host whole groups; choose an EP size that divides G, or domain 'none'")
        d = max(1, P // G)
        if self.domain == "node":
            d = max(d, min(self.ranks_per_node, P))
            if P % d or (d * (E // P)) % (E // G):
                raise ValueError(f"ranks_per_node={self.ranks_per_node}: nodes of {d} ranks over EP "
                                 f"size {P} do not hold whole router groups of {E // G} experts; "
                                 "choose ranks_per_node dividing the EP size, or domain 'rank'")
        return d

    def expert_domain(self, num_experts: int, ep_size: int) -> np.ndarray:
        """int64 [E]: the domain each logical expert must stay in."""
        d = self.domain_ranks(num_experts, ep_size)
        return np.arange(num_experts, dtype=np.int64) // (d * (num_experts // ep_size))

    def rank_domain(self, num_experts: int, ep_size: int) -> np.ndarray:
        """int64 [P]: the domain of each EP rank."""
        return np.arange(ep_size, dtype=np.int64) // self.domain_ranks(num_experts, ep_size)

    def replica_ranks(self, num_experts: int, ep_size: int) -> np.ndarray:
        """bool [E, P]: where a redundant copy of each logical expert may go (``schedule/replicas.py``):
        the ranks of its own domain, so the route table never leaves it; every rank for domain
        "none" or without groups."""
        if not self.active or self.domain == "none":
            return np.ones((num_experts, ep_size), dtype=bool)
        want = self.expert_domain(num_experts, ep_size)
        return want[:, None] == self.rank_domain(num_experts, ep_size)[None, :]

    def to_json(self) -> dict:
        return {"num_groups": int(self.num_groups), "group_topk": int(self.group_topk),
                "domain": self.domain, "ranks_per_node": int(self.ranks_per_node)}

    @classmethod
    def from_json(cls, obj: Optional[dict]) -> "RouterGroups":
        if not obj:
            return cls()
        unknown = sorted(set(obj) - {"num_groups", "group_topk", "domain", "ranks_per_node"})
        if unknown:
            raise ValueError(f"RouterGroups JSON has unknown fields {unknown}")
        return cls(**obj)


def check_domains(placement: ExpertPlacement, groups: RouterGroups, *, where: str = "placement") -> None:
    """Raise a ValueError when ``placement`` puts an expert outside its group's domain."""
    if not groups.active or groups.domain == "none":
        return
    want = groups.expert_domain(placement.num_experts, placement.ep_size)
    have = groups.rank_domain(placement.num_experts, placement.ep_size)[placement.rank_of_logical()]
    bad = np.nonzero(want != have)[0]
    if bad.size:
        e = int(bad[0])
        raise ValueError(f"{where}: logical expert {e} (router group {e // (placement.num_experts // groups.num_groups)}) "
                         f"sits in rank domain {int(have[e])}, not {int(want[e])}: the placement does not "
                         f"keep router groups on their own {groups.domain}s")


def check_replica_domains(replicated, groups: RouterGroups, *, where: str = "replicas") -> None:
    """Raise a ValueError when a ``schedule.replicas.ReplicatedPlacement`` (its base or a copy) puts an
    expert outside its group's domain."""
    check_domains(replicated.base, groups, where=f"{where} (base placement)")
    allowed = groups.replica_ranks(replicated.num_experts, replicated.ep_size)
    bad = np.argwhere(replicated.rank_mask() & ~allowed)
    if bad.size:
        e, q = (int(x) for x in bad[0])
        raise ValueError(f"{where}: a copy of logical expert {e} (router group "
                         f"{e // (replicated.num_experts // groups.num_groups)}) sits on rank {q}, outside its "
                         f"group's {groups.domain} domain: the route table could send its pairs there and "
                         "break the node bound; re-plan with `specmoe plan --router-groups G --redundant-experts R`")


def check_router_permutation(placement: ExpertPlacement, num_groups: int, *, where: str = "placement") -> None:
    """Refuse a placement that router mode (permuted router rows) cannot apply without changing
    which experts form a router group.

    In router mode physical slots g*E/G .. (g+1)*E/G - 1 become the router's group g, so each such
    block must hold exactly the experts of one logical group (in any order; groups may trade
    blocks, since group-limited top-k does not depend on group labels)."""
    E = placement.num_experts
    if num_groups <= 1:
        return
    if E % num_groups:
        raise ValueError(f"{where}: moe_router_num_groups={num_groups} does not divide the {E} experts")
    size = E // num_groups
    logical_group = np.asarray(placement.physical_to_logical, dtype=np.int64).reshape(num_groups, size) // size
    for block, row in enumerate(logical_group):
        mixed = np.unique(row)
        if mixed.size > 1:
            raise ValueError(
                f"{where}: router mode would make physical slots {block * size}..{(block + 1) * size - 1} "
                f"router group {block}, but they hold experts of router groups {mixed.tolist()} "
                f"(moe_router_num_groups={num_groups}): that changes which experts form a group, and "
                "so the model's function. Make the plan with router groups in 'rank' domain "
                "(`specmoe plan --router-groups G`), or apply it with mode='dispatcher'"
            )
