"""The specmoe layer spec without shuffling: Megatron's own GPT layer spec with ``SpecMoELayer``.

Megatron describes a layer by a spec: ``ModuleSpec(module=..., submodules=...)`` in core 0.16.x,
``functools.partial(module, submodules=...)`` in 0.19.x. ``with_specmoe`` walks either form and
replaces the MoE layer class ``MoELayer`` by ``SpecMoELayer``; everything else (attention, norms,
experts: SequentialMLP with local linears, or TEGroupedMLP where TransformerEngine is present) is
exactly Megatron's. ``megatron/specs.py`` is the public entry point; ``shuffle_specs`` builds on
``dispatcher_layer_spec`` here.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_specmoe.megatron.install import SpecMoELayer

log = logging.getLogger(__name__)

__all__ = ["with_specmoe", "dispatcher_layer_spec", "have_te"]


@functools.lru_cache(maxsize=1)
def have_te() -> bool:
    """Whether TransformerEngine imports (explicit detection; never required).

    Decided once per process and logged once: experts then run as TE grouped GEMMs
    (``TEGroupedMLP``) with TE linears, or else as ``SequentialMLP`` with Megatron's local linears.
    """
    try:
        import transformer_engine  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - the TE meta package raises RuntimeError on a CPU box
        log.info("megatron_specmoe: TransformerEngine not importable (%s: %s); experts use "
                 "SequentialMLP and local linears", type(exc).__name__, exc)
        return False
    log.info("megatron_specmoe: TransformerEngine found; experts use TEGroupedMLP (grouped GEMM) "
             "and TE linears")
    return True


def _swap_mlp(mlp: Any) -> Any:
    if isinstance(mlp, ModuleSpec) and mlp.module is MoELayer:
        return dataclasses.replace(mlp, module=SpecMoELayer)
    if isinstance(mlp, functools.partial) and mlp.func is MoELayer:
        return functools.partial(SpecMoELayer, *mlp.args, **mlp.keywords)
    return mlp


def with_specmoe(spec: Any) -> Any:
    """A copy of a layer spec (or a block spec with ``layer_specs``) whose MoE layers use the
    specmoe dispatcher. Dense layers are returned unchanged."""
    if hasattr(spec, "layer_specs"):
        return dataclasses.replace(spec, layer_specs=[with_specmoe(s) for s in spec.layer_specs])
    submodules = getattr(spec, "submodules", None)
    if isinstance(spec, functools.partial):
        submodules = spec.keywords.get("submodules")
    if submodules is None or not hasattr(submodules, "mlp"):
        return spec
    new_sub = dataclasses.replace(submodules, mlp=_swap_mlp(submodules.mlp))
    if isinstance(spec, functools.partial):
        return functools.partial(spec.func, *spec.args, **{**spec.keywords, "submodules": new_sub})
    return dataclasses.replace(spec, submodules=new_sub)


def dispatcher_layer_spec(num_experts: int, *, use_transformer_engine: bool | None = None,
                          moe_grouped_gemm: bool | None = None, **kwargs: Any):
    """Megatron's GPT layer spec with the specmoe MoE layer (no shuffling); arguments as
    ``specs.get_gpt_layer_specmoe_spec``."""
    from megatron.core.models.gpt import gpt_layer_specs

    if use_transformer_engine is None:
        use_transformer_engine = have_te()
    if moe_grouped_gemm is None:
        moe_grouped_gemm = use_transformer_engine
    if use_transformer_engine:
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=moe_grouped_gemm, **kwargs
        )
    else:
        spec = gpt_layer_specs.get_gpt_layer_local_spec(
            num_experts=num_experts, moe_grouped_gemm=moe_grouped_gemm, **kwargs
        )
    return with_specmoe(spec)
