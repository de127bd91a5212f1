"""Megatron's parallel state for a run: initialise and tear down explicitly.

Notation: TP tensor-parallel size, EP expert-parallel size, ETP expert tensor-parallel size,
PP pipeline size; the layout type and its world-size rules are ``schedule/layout.py``.
"""

from __future__ import annotations

import torch

from megatron_specmoe.schedule.layout import ParallelLayout

__all__ = ["ParallelLayout", "initialize", "destroy"]


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
