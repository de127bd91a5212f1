"""A two-rank check that Megatron's dispatchers run with expert tensor parallelism (ETP = 2) on
the CPU patches of ``megatron/cpu_support.py`` (issue 18 finding 7), used by tests/test_install.py.

Notation: T tokens (S * B), H hidden size, E experts; ETP = 2, EP = 1, TP = 1 on two gloo ranks.
"""

from __future__ import annotations

import torch

__all__ = ["etp_forward"]


def etp_forward(rank: int, world_size: int, seed: int) -> dict:
    """Forward one batch through an alltoall and a specmoe MoE layer built from the same seed.

    Returns {"alltoall": float32 [S, B, H] output as a list, "max_diff": float}."""
    from megatron_specmoe.megatron import cpu_support, parallel
    from megatron_specmoe.megatron.build import MoEShape, build_moe_layer, make_config
    from megatron_specmoe.schedule.layout import ParallelLayout

    cpu_support.enable()
    parallel.initialize(ParallelLayout(tp=1, ep=1, etp=2, dp=world_size), seed=seed)
    shape = MoEShape()
    outs = {}
    for name in ("alltoall", "specmoe"):
        torch.manual_seed(seed)
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)
        layer = build_moe_layer(make_config(shape, dispatcher=name, etp=2), shape, specmoe=name == "specmoe")
        torch.manual_seed(seed + 1)
        x = torch.randn(4, 2, shape.hidden)
        with torch.no_grad():
            outs[name] = layer(x)[0]
    return {"alltoall": outs["alltoall"].tolist(),
            "max_diff": float((outs["alltoall"] - outs["specmoe"]).abs().max())}
