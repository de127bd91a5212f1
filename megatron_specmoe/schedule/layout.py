"""The one parallel-layout type: where tokens and experts live across ranks.

Notation
    TP: attention tensor-parallel size.   EP: expert-parallel size (P in the measures).
    ETP: expert tensor-parallel size (1 = whole experts per rank, MoE parallel folding).
    PP: pipeline size.   DP: replicas of the whole EP group (the simulator's world = EP * DP).

Glossary
    TP group    TP consecutive EP ranks under MoE parallel folding: one shuffle domain (s-TS can
                move a token only inside its TP group).
    folding     the attention TP group lies inside the EP group (EP a multiple of TP, ETP = 1),
                the layout speculative shuffling needs.

The same type serves Megatron's parallel state (``megatron/parallel.initialize``), the cluster
simulator (``sim/``) and the recipes (``megatron_lm/recipes.py``), so the world-size rules are
written once, here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ParallelLayout"]


@dataclass(frozen=True, kw_only=True)
class ParallelLayout:
    """Attributes: tp, ep, etp, pp, dp (positive ints; see the module notation)."""

    tp: int = 1
    ep: int = 1
    etp: int = 1
    pp: int = 1
    dp: int = 1

    def __post_init__(self) -> None:
        for name in ("tp", "ep", "etp", "pp", "dp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"ParallelLayout.{name} must be a positive int, got {value!r}")

    def world_problems(self, world_size: int) -> list[str]:
        """Why this layout cannot run on ``world_size`` ranks (empty: it can)."""
        out = []
        if world_size % (self.tp * self.pp):
            out.append(f"world size {world_size} is not a multiple of TP*PP = {self.tp * self.pp}; change "
                       "tp/pp or the number of ranks")
        if world_size % (self.etp * self.ep * self.pp):
            out.append(f"world size {world_size} is not a multiple of ETP*EP*PP = {self.etp * self.ep * self.pp}; "
                       "change ep/etp or the number of ranks")
        return out

    def check(self, world_size: int) -> None:
        """Raise a ValueError naming the rule when the layout cannot run on ``world_size`` ranks."""
        problems = self.world_problems(world_size)
        if problems:
            raise ValueError("ParallelLayout: " + "; ".join(problems))

    def require_folding(self) -> "ParallelLayout":
        """``self`` if the TP group lies inside the EP group (``ep % tp == 0``), else a ValueError."""
        if self.ep % self.tp:
            raise ValueError(
                f"ParallelLayout: tp={self.tp} must divide ep={self.ep} (the attention TP group "
                "lies inside the EP group)"
            )
        return self

    @property
    def tp_groups(self) -> int:
        """TP groups (shuffle domains) inside one EP group."""
        return self.ep // self.tp

    @property
    def world_size(self) -> int:
        """Ranks of the simulated job: EP * DP."""
        return self.ep * self.dp
