"""Logical -> physical expert placement for one MoE layer.

Notation
    E: number of (routed) experts in the layer.
    P: expert-parallel (EP) size, the number of EP ranks.
    n: experts per EP rank, n = E // P.

Glossary
    logical expert:  the expert id the router emits (a column of the router's output).
    physical slot:   a position in Megatron's contiguous expert layout; EP rank r owns slots
                     r*n .. r*n + n - 1, and local expert i of rank r is slot r*n + i.
    placement:       which logical expert sits in which physical slot. Megatron's default is the
                     identity ("contiguous"): logical expert e on rank e // n.

The placement is pure data: it never moves weights. The dispatcher routes by it (it maps router
columns to physical slots) and ``megatron/apply_plan.py`` moves expert weights so that slot p holds
``physical_to_logical[p]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["ExpertPlacement"]


@dataclass(frozen=True, kw_only=True)
class ExpertPlacement:
    """Which logical expert lives in which physical slot, for one layer.

    Attributes:
        physical_to_logical: length-E tuple; entry ``p`` is the logical expert held by physical
            slot ``p``. Must be a permutation of ``0 .. E-1``.
        ep_size: P, the number of EP ranks; must divide E.
    """

    physical_to_logical: tuple[int, ...]
    ep_size: int

    def __post_init__(self) -> None:
        # Integers only: int(0.9) would silently be expert 0, int(True) expert 1, int("3") 3.
        raw = tuple(self.physical_to_logical)
        bad = [x for x in raw if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer))]
        if bad:
            raise ValueError(
                f"ExpertPlacement.physical_to_logical must hold integer expert ids, got "
                f"{bad[0]!r} ({type(bad[0]).__name__}); write the placement with whole numbers 0..E-1"
            )
        p2l = tuple(int(x) for x in raw)
        object.__setattr__(self, "physical_to_logical", p2l)
        num_experts = len(p2l)
        if (isinstance(self.ep_size, (bool, np.bool_)) or not isinstance(self.ep_size, (int, np.integer))
                or self.ep_size < 1):
            raise ValueError(
                f"ExpertPlacement.ep_size must be a positive integer, got {self.ep_size!r}"
            )
        if num_experts == 0:
            raise ValueError("ExpertPlacement.physical_to_logical is empty; expected E >= 1 entries")
        if num_experts % self.ep_size != 0:
            raise ValueError(
                f"ExpertPlacement: ep_size={self.ep_size} does not divide the number of experts "
                f"E={num_experts} (len(physical_to_logical)); every EP rank must host E/P experts"
            )
        seen = sorted(p2l)
        if seen != list(range(num_experts)):
            missing = sorted(set(range(num_experts)) - set(p2l))
            dupes = sorted({x for x in p2l if p2l.count(x) > 1})
            out_of_range = sorted({x for x in p2l if not 0 <= x < num_experts})
            raise ValueError(
                "ExpertPlacement.physical_to_logical must be a permutation of 0.."
                f"{num_experts - 1}: missing {missing}, repeated {dupes}, out of range "
                f"{out_of_range}"
            )

    # ---- constructors -------------------------------------------------------------------------
    @classmethod
    def contiguous(cls, num_experts: int, ep_size: int) -> "ExpertPlacement":
        """Megatron's default: logical expert e in slot e (rank e // n)."""
        return cls(physical_to_logical=tuple(range(num_experts)), ep_size=ep_size)

    @classmethod
    def from_rank_groups(cls, groups: Sequence[Sequence[int]]) -> "ExpertPlacement":
        """Build from the experts each rank hosts: ``groups[r]`` lists rank r's logical experts
        in local order. All groups must have the same length."""
        sizes = {len(g) for g in groups}
        if len(sizes) != 1:
            raise ValueError(
                "ExpertPlacement.from_rank_groups: every rank must host the same number of "
                f"experts, got group sizes {[len(g) for g in groups]}"
            )
        flat = tuple(int(e) for g in groups for e in g)
        return cls(physical_to_logical=flat, ep_size=len(groups))

    # ---- derived views --------------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        return len(self.physical_to_logical)

    @property
    def experts_per_rank(self) -> int:
        return self.num_experts // self.ep_size

    @property
    def is_contiguous(self) -> bool:
        return self.physical_to_logical == tuple(range(self.num_experts))

    def logical_to_physical(self) -> np.ndarray:
        """int64 [E]: slot of each logical expert."""
        inv = np.empty(self.num_experts, dtype=np.int64)
        inv[np.asarray(self.physical_to_logical, dtype=np.int64)] = np.arange(self.num_experts)
        return inv

    def rank_of_logical(self) -> np.ndarray:
        """int64 [E]: EP rank that hosts each logical expert."""
        return self.logical_to_physical() // self.experts_per_rank

    def rank_groups(self) -> list[list[int]]:
        """Logical experts hosted by each rank, in local (slot) order."""
        n = self.experts_per_rank
        return [list(self.physical_to_logical[r * n : (r + 1) * n]) for r in range(self.ep_size)]

    def check_matches(self, *, num_experts: int, ep_size: int, where: str = "placement") -> None:
        """Raise a ValueError naming the field when this placement does not fit a layer."""
        if self.num_experts != num_experts:
            raise ValueError(
                f"{where}: placement has {self.num_experts} experts but the model layer has "
                f"num_moe_experts={num_experts}; make the plan for this model"
            )
        if self.ep_size != ep_size:
            raise ValueError(
                f"{where}: placement was made for ep_size={self.ep_size} but the run has "
                f"expert_model_parallel_size={ep_size}; make the plan for this EP size"
            )

    def to_json(self) -> dict:
        return {"physical_to_logical": list(self.physical_to_logical), "ep_size": self.ep_size}

    @classmethod
    def from_json(cls, obj: dict) -> "ExpertPlacement":
        try:
            return cls(physical_to_logical=tuple(obj["physical_to_logical"]), ep_size=obj["ep_size"])
        except KeyError as exc:
            raise ValueError(f"ExpertPlacement JSON lacks the field {exc.args[0]!r}") from None
        except TypeError:
            raise ValueError("ExpertPlacement JSON: physical_to_logical must be a list of expert "
                             "ids") from None
