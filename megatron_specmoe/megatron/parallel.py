"""Megatron's parallel state for a run: initialise and tear down explicitly.

Notation: TP tensor-parallel size, EP expert-parallel size, ETP expert tensor-parallel size,
PP pipeline size. The world size must be a multiple of TP*PP and of ETP*EP*PP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ParallelLayout", "initialize", "destroy"]


@dataclass(frozen=True, kw_only=True)
class ParallelLayout:
    """Attributes: tp, ep, etp (expert tensor parallel, 1 = MoE parallel folding), pp."""

    tp: int = 1
    ep: int = 1
    etp: int = 1
    pp: int = 1

    def check(self, world_size: int) -> None:
        for name in ("tp", "ep", "etp", "pp"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"ParallelLayout.{name} must be >= 1, got {value}")
        if world_size % (self.tp * self.pp):
            raise ValueError(
                f"ParallelLayout: world size {world_size} is not a multiple of tp*pp="
                f"{self.tp * self.pp}; change tp/pp or the number of ranks"
            )
        if world_size % (self.etp * self.ep * self.pp):
            raise ValueError(
                f"ParallelLayout: world size {world_size} is not a multiple of etp*ep*pp="
                f"{self.etp * self.ep * self.pp}; change ep/etp or the number of ranks"
            )


def initialize(layout: ParallelLayout, *, seed: int = 1234) -> None:
    """``parallel_state.initialize_model_parallel`` for ``layout`` on the already-initialised
    default process group, then Megatron's model-parallel RNG seeding."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    layout.check(torch.distributed.get_world_size())
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
