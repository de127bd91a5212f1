"""TransformerEngine linears for ``ShuffleTransformerLayer`` (GPU machines with TE only).

Importing this module raises ImportError where TransformerEngine is not importable (Megatron's TE
wrappers are then placeholders, and classes derived from them would be too); callers import it
only on the TE path (``shuffle_specs.get_gpt_layer_shuffle_spec(use_transformer_engine=True)``).

Why separate linears. The shuffle layer owns attention's two TP collectives: it all-gathers the
normalised layer input itself (followed by the inverse of the previous plan) and reduce-scatters
the output projection's partial sum itself (permuted by the new plan, residual and bias folded
in). Megatron's TE spec puts both collectives inside TE:
    linear_qkv  ``TELayerNormColumnParallelLinear``: layernorm + all-gather (sequence parallel)
                + GEMM in one TE module;
    linear_proj ``TERowParallelLinear``: GEMM + reduce-scatter (sequence parallel) or all-reduce.
The shuffle spec on TE therefore uses:
    input_layernorm  ``TENorm`` (the norm runs before the shuffle's all-gather, as in the local
                spec; pregate needs the normalised input). Its weights keep the fused module's
                checkpoint names: the layer's ``sharded_state_dict_keys_map`` maps
                ``input_layernorm.`` to ``self_attention.linear_qkv.layer_norm_`` (as Megatron's
                local spec does).
    linear_qkv  ``NoCommTEColumnParallelLinear``: Megatron's ``TEColumnParallelLinear`` built from a
                copy of the config with ``sequence_parallel=False``. A column-parallel TE linear
                without sequence parallelism does no forward communication (its only collective is
                the backward all-reduce of the input gradient; the layer is forward-only).
    linear_proj ``NoCommTERowParallelLinear``: Megatron's ``TERowParallelLinear`` built with
                ``is_expert=True`` and the attention TP group: Megatron's TE wrapper then takes the
                "explicit communication" path it uses for experts (weight [H, H_q / P], TE
                ``parallel_mode=None``, no collective), and returns the partial sum and the bias
                separately (``skip_bias_add=True``). Checkpoint sharding stays the row-parallel one
                (weight split on axis 1 over the TP group), so Megatron checkpoints load unchanged.
                The expert flag also selects the expert RNG tracker at initialisation and marks
                the parameters as expert parameters for gradient reduction: irrelevant for
                inference, which is all the shuffle layer does.
Both classes check after construction that TE will not communicate and carry the class attribute
``specmoe_no_comm = True`` that ``ShuffleTransformerLayer`` checks.

Verified only on a GPU with TE (``tools/gpu_check.sh`` runs the TE shuffle lossless case when TE
imports); on the CPU machines TE cannot be installed, and the tests check the refusal.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from megatron.core.extensions import transformer_engine as _te_ext

if not getattr(_te_ext, "HAVE_TE", False):
    raise ImportError(
        "megatron_specmoe.megatron.te_shuffle needs TransformerEngine (Megatron's TE wrappers report "
        "HAVE_TE=False); build the shuffle spec with use_transformer_engine=False"
    )

from megatron.core.extensions.transformer_engine import (  # noqa: E402
    TEColumnParallelLinear,
    TENorm,
    TERowParallelLinear,
)

__all__ = ["NoCommTEColumnParallelLinear", "NoCommTERowParallelLinear", "TENorm", "te_shuffle_changes"]


class NoCommTEColumnParallelLinear(TEColumnParallelLinear):
    """``TEColumnParallelLinear`` that never communicates in forward (module docstring): the caller
    hands it the already gathered, normalised input [S, B, H]; returns [S, B, out / P]."""

    specmoe_no_comm = True

    def __init__(self, input_size: int, output_size: int, *, config, **kwargs: Any) -> None:
        local = copy.copy(config)
        local.sequence_parallel = False
        super().__init__(input_size, output_size, config=local, **kwargs)
        if getattr(self, "sequence_parallel", False):
            raise RuntimeError(
                "NoCommTEColumnParallelLinear: TE kept sequence_parallel=True and would all-gather "
                "inside the GEMM; this TE version is not supported by the shuffle layer"
            )


class NoCommTERowParallelLinear(TERowParallelLinear):
    """``TERowParallelLinear`` that returns its partial sum [S, B, H] and its bias separately, with
    no reduce (module docstring). Needs ``skip_bias_add=True`` (as attention's linear_proj is
    built) and an explicit ``tp_group`` (Megatron's attention passes its TP group)."""

    specmoe_no_comm = True

    def __init__(self, input_size: int, output_size: int, *, skip_bias_add: bool,
                 is_expert: bool = False, tp_group=None, **kwargs: Any) -> None:
        if not skip_bias_add:
            raise ValueError(
                "NoCommTERowParallelLinear needs skip_bias_add=True (the shuffle layer folds the bias "
                "into the reduce-scatter); use it only as attention's linear_proj"
            )
        if tp_group is None:
            raise ValueError(
                "NoCommTERowParallelLinear needs tp_group= the attention TP group (with is_expert=True "
                "Megatron would otherwise pick the expert TP group)"
            )
        super().__init__(input_size, output_size, skip_bias_add=skip_bias_add, is_expert=True,
                         tp_group=tp_group, **kwargs)
        if tp_group.size() > 1 and getattr(self, "parallel_mode", None) is not None:
            raise RuntimeError(
                f"NoCommTERowParallelLinear: TE kept parallel_mode={self.parallel_mode!r} and would "
                "reduce inside the GEMM; this Megatron/TE version is not supported by the shuffle layer"
            )


def te_shuffle_changes(layer_submodules: Any) -> dict[str, Any]:
    """The submodule replacements that make a Megatron TE MoE layer spec's attention shuffle-ready:
    ``{"input_layernorm", "self_attention", "sharded_state_dict_keys_map"}`` for
    ``dataclasses.replace(layer_submodules, **changes)``.

    Args:
        layer_submodules: the ``TransformerLayerSubmodules`` of a spec from Megatron's
            ``get_gpt_layer_with_transformer_engine_spec(num_experts=...)`` (fused
            layernorm-linear qkv, ``IdentityOp`` input norm).
    """
    attention = layer_submodules.self_attention
    attention = dataclasses.replace(
        attention,
        submodules=dataclasses.replace(
            attention.submodules,
            linear_qkv=NoCommTEColumnParallelLinear,
            linear_proj=NoCommTERowParallelLinear,
        ),
    )
    keys = dict(getattr(layer_submodules, "sharded_state_dict_keys_map", None) or {})
    keys["input_layernorm."] = "self_attention.linear_qkv.layer_norm_"
    return {"input_layernorm": TENorm, "self_attention": attention, "sharded_state_dict_keys_map": keys}
