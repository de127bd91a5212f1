"""Layer and block specs that put ``ShuffleTransformerLayer`` (s-TS) into a Megatron model.

``get_gpt_layer_shuffle_spec`` starts from the specmoe layer spec (``megatron.moe_specs``) and replaces:
the layer class by ``ShuffleTransformerLayer`` (with the model's ``ShuffleCarrier`` as a build
parameter), attention's linear_qkv / linear_proj by their non-communicating variants, and, with
sequence parallelism on a machine without TransformerEngine, the torch norms by ``TokenwiseNorm``
(Megatron's ``WrappedTorchNorm`` refuses ``sequence_parallel=True`` because its weight gradients
would need a TP all-reduce; a norm is per token, so its forward is exact on a shard, and the
shuffle layer is forward-only).

``shuffle_layer_spec_from`` does the same to a layer spec Megatron already made (its local MoE
spec, e.g. from ``get_gpt_decoder_block_spec``); ``megatron_lm.shuffle_hook`` uses it to turn the
specs Megatron-LM's model builder asks for into shuffle specs.

TransformerEngine: ``use_transformer_engine=True`` (or a TE layer spec given to
``shuffle_layer_spec_from``) starts from Megatron's TE MoE spec and swaps in the TE linears of
``megatron.te_shuffle`` (``TENorm`` before the shuffle's all-gather, TE column / row linears that do
not communicate; experts stay ``TEGroupedMLP``). Megatron's fused layernorm-linear keeps its
checkpoint names through the layer's ``sharded_state_dict_keys_map``; for a plain ``state_dict``
from a TE-spec model use ``shuffle_state_dict_from_fused``. Where TE is not importable this is
refused with a clear error; the TE path is verified by ``tools/gpu_check.sh`` on a GPU.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any, Optional

from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_specmoe.megatron.shuffle_deepseek import is_mla_spec, mla_shuffle_attention

from megatron_specmoe.megatron.shuffle_layer import (
    NoCommColumnParallelLinear,
    NoCommRowParallelLinear,
    ShuffleCarrier,
    ShuffleOptions,
    ShuffleTransformerLayer,
)

__all__ = [
    "TokenwiseNorm",
    "with_tokenwise_norms",
    "get_gpt_layer_shuffle_spec",
    "get_gpt_block_shuffle_spec",
    "is_moe_layer_spec",
    "shuffle_layer_spec_from",
    "carrier_of",
    "true_order_output",
    "feed_token_ids",
    "shuffle_state_dict_from_fused",
]


class TokenwiseNorm:
    """Megatron's ``WrappedTorchNorm`` (LayerNorm / RMSNorm per ``config.normalization``) built
    from a copy of ``config`` with ``sequence_parallel=False`` (forward-exact on a shard). A class
    (Megatron's ``build_module`` returns plain functions unbuilt) whose construction returns the
    torch norm module, as ``WrappedTorchNorm`` itself does."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5):
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        cfg = copy.copy(config)
        cfg.sequence_parallel = False
        return WrappedTorchNorm(config=cfg, hidden_size=hidden_size, eps=eps)


def _replace(spec: Any, **changes: Any) -> Any:
    """dataclasses.replace for a ModuleSpec's submodules (both core versions use ModuleSpec at the
    layer and attention level)."""
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, **changes))


def with_tokenwise_norms(spec: ModuleSpec) -> ModuleSpec:
    """A copy of a layer spec whose input and pre-MLP norms are ``TokenwiseNorm`` (so that
    Megatron's own layers build with sequence parallelism and no TE, e.g. as a reference)."""
    return _replace(spec, input_layernorm=TokenwiseNorm, pre_mlp_layernorm=TokenwiseNorm)


def get_gpt_layer_shuffle_spec(
    num_experts: int,
    *,
    carrier: Optional[ShuffleCarrier] = None,
    options: Optional[ShuffleOptions] = None,
    sequence_parallel_norms: bool = False,
    **kwargs: Any,
) -> ModuleSpec:
    """Megatron's local GPT layer spec with the specmoe MoE layer and s-TS around attention.

    Args:
        num_experts: routed experts per layer (every layer is MoE).
        carrier: the ShuffleCarrier shared by the model's layers; a new one (with ``options``) if
            None. Read it back from the spec's ``params["carrier"]`` or any layer's ``.carrier``.
        options: ShuffleOptions for a new carrier (ignored when ``carrier`` is given).
        sequence_parallel_norms: use ``TokenwiseNorm`` for the layer norms (needed with
            ``sequence_parallel=True`` without TransformerEngine; ignored with TE, whose norms
            accept it).
        kwargs: passed to Megatron's spec builder (qk_layernorm, ...); ``use_transformer_engine``
            (default False) selects the TE spec and ``megatron.te_shuffle``'s linears.
    """
    from megatron_specmoe.megatron.moe_specs import dispatcher_layer_spec, have_te

    use_te = bool(kwargs.pop("use_transformer_engine", False))
    if use_te and not have_te():
        raise ValueError(
            "get_gpt_layer_shuffle_spec: use_transformer_engine=True needs TransformerEngine, which is "
            "not importable in this Python; pass use_transformer_engine=False (local linears)"
        )
    if carrier is None:
        carrier = ShuffleCarrier(options=options or ShuffleOptions())
    base = dispatcher_layer_spec(num_experts, use_transformer_engine=use_te, **kwargs)
    return shuffle_layer_spec_from(base, carrier=carrier, sequence_parallel_norms=sequence_parallel_norms)


def _spec_class(spec: Any) -> Any:
    """The class a ModuleSpec or functools.partial builds (None for anything else)."""
    if isinstance(spec, ModuleSpec):
        return spec.module
    if isinstance(spec, functools.partial):
        return spec.func
    return None


def is_moe_layer_spec(spec: Any) -> bool:
    """Whether a transformer layer spec builds an MoE MLP (``MoELayer`` or a subclass); dense
    layers (``MLP``) give False."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    mlp = getattr(getattr(spec, "submodules", None), "mlp", None)
    cls = _spec_class(mlp)
    return isinstance(cls, type) and issubclass(cls, MoELayer)


def shuffle_layer_spec_from(
    spec: ModuleSpec, *, carrier: ShuffleCarrier, sequence_parallel_norms: bool = False
) -> ModuleSpec:
    """The shuffle version of a Megatron MoE layer spec (as
    ``gpt_layer_specs.get_gpt_layer_local_spec(num_experts=...)`` or, with TE,
    ``get_gpt_layer_with_transformer_engine_spec`` returns it): layer class
    ``ShuffleTransformerLayer`` with ``carrier``, non-communicating attention linears (local, or
    ``megatron.te_shuffle``'s for a TE spec), the specmoe MoE layer, and ``TokenwiseNorm`` norms when
    ``sequence_parallel_norms`` (local spec only). A spec that already is a shuffle spec only gets
    the new carrier (and norms), so converting twice is harmless.

    Raises:
        ValueError: a dense layer, or attention linears of another kind (named; multi-latent
            attention with Megatron's local linears is supported, ``megatron.shuffle_deepseek``).
    """
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from megatron_specmoe.megatron.moe_specs import with_specmoe

    if not isinstance(spec, ModuleSpec) or not (
        isinstance(spec.module, type) and issubclass(spec.module, TransformerLayer)
    ):
        raise ValueError(
            f"shuffle_layer_spec_from: expected a TransformerLayer ModuleSpec, got {spec!r}"
        )
    if not is_moe_layer_spec(spec):
        raise ValueError(
            "shuffle_layer_spec_from: the layer is dense (its MLP is not an MoELayer); dense layers "
            "keep Megatron's TransformerLayer"
        )
    attention = getattr(spec.submodules.self_attention, "submodules", None)
    qkv, proj = getattr(attention, "linear_qkv", None), getattr(attention, "linear_proj", None)
    if is_mla_spec(spec.submodules.self_attention):
        # Multi-latent attention (megatron.shuffle_deepseek): Megatron's MLA without sequence
        # parallelism inside, its output projection returning the partial sum.
        changes = {"self_attention": mla_shuffle_attention(spec.submodules.self_attention)}
        if sequence_parallel_norms:
            changes.update(input_layernorm=TokenwiseNorm, pre_mlp_layernorm=TokenwiseNorm)
    elif qkv is None or proj is None:
        raise ValueError(
            "shuffle_layer_spec_from: the attention has no linear_qkv/linear_proj and is not "
            "multi-latent attention; the shuffle layer supports standard self-attention and MLA"
        )
    elif _is_te_linear(qkv) and _is_te_linear(proj):
        from megatron_specmoe.megatron.te_shuffle import te_shuffle_changes  # needs TE; raises otherwise

        changes: dict[str, Any] = te_shuffle_changes(spec.submodules)
    elif qkv in (ColumnParallelLinear, NoCommColumnParallelLinear) and proj in (
        RowParallelLinear, NoCommRowParallelLinear
    ):
        attention_spec = _replace(
            spec.submodules.self_attention,
            linear_qkv=NoCommColumnParallelLinear,
            linear_proj=NoCommRowParallelLinear,
        )
        changes = {"self_attention": attention_spec}
        if sequence_parallel_norms:
            changes.update(input_layernorm=TokenwiseNorm, pre_mlp_layernorm=TokenwiseNorm)
    else:
        raise ValueError(
            f"shuffle_layer_spec_from: attention linears are {getattr(qkv, '__name__', qkv)} / "
            f"{getattr(proj, '__name__', proj)}; the shuffle layer needs Megatron's local linears or "
            "its TransformerEngine linears (TE(LayerNorm)ColumnParallelLinear / TERowParallelLinear)"
        )
    out = _replace(with_specmoe(spec), **changes)
    return dataclasses.replace(out, module=ShuffleTransformerLayer, params={**out.params, "carrier": carrier})


_TE_MODULE = "megatron.core.extensions.transformer_engine"


def _is_te_linear(cls: Any) -> bool:
    """Megatron's TE linear wrappers, or megatron.te_shuffle's no-communication versions of them."""
    return isinstance(cls, type) and (
        cls.__module__ == _TE_MODULE or cls.__module__ == "megatron_specmoe.megatron.te_shuffle"
    )


def shuffle_state_dict_from_fused(state_dict: dict) -> dict:
    """A copy of a TE-spec model's ``state_dict`` with the keys a TE shuffle spec uses: the fused
    layernorm-linear's ``self_attention.linear_qkv.layer_norm_{weight,bias}`` become
    ``input_layernorm.{weight,bias}`` (the shuffle layer runs that norm before its all-gather);
    every other key and every tensor is unchanged (tensors are not copied)."""
    out = {}
    fused = "self_attention.linear_qkv.layer_norm_"
    for key, value in state_dict.items():
        head, sep, tail = key.rpartition(fused)
        if sep and tail in ("weight", "bias"):
            key = f"{head}input_layernorm.{tail}"
        out[key] = value
    return out


def get_gpt_block_shuffle_spec(config, layer_spec: ModuleSpec, *, final_norm: Any = None):
    """A TransformerBlockSubmodules with ``config.num_layers`` copies of ``layer_spec`` and a final
    norm (``TokenwiseNorm`` by default, so that a sequence-parallel model builds without TE)."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    return TransformerBlockSubmodules(
        layer_specs=[layer_spec] * config.num_layers,
        layer_norm=final_norm if final_norm is not None else TokenwiseNorm,
    )


def carrier_of(spec: Any) -> ShuffleCarrier:
    """The ShuffleCarrier a shuffle layer spec builds its layers with."""
    if isinstance(spec, functools.partial):
        return spec.keywords["carrier"]
    return spec.params["carrier"]


class _OutputHandle:
    """Undo for ``true_order_output``: ``remove()`` restores the output layer and the decoder."""

    def __init__(self, layer, hooks, saved_flag, carrier) -> None:
        self._layer, self._hooks, self._saved, self._carrier = layer, hooks, saved_flag, carrier

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._layer.explicit_expert_comm = self._saved
        self._carrier.output_consumer = None


def _gathers_before_output_layer(inference_context) -> bool:
    """Whether GPTModel all-gathers the sequence-parallel hidden states itself before its output
    layer (core 0.19's dynamic context with ``materialize_only_last_token_logits``: it slices the
    last token of each request from the full view, then runs the output layer without sequence
    parallelism)."""
    if inference_context is None:
        return False
    static = getattr(inference_context, "is_static_batching", None)
    if static is None or static():
        return False
    config = getattr(inference_context, "config", None)
    return bool(getattr(config, "materialize_only_last_token_logits", False))


def true_order_output(model, carrier: ShuffleCarrier) -> _OutputHandle:
    """Make a sequence-parallel GPTModel with shuffle layers return its logits in true order at no
    extra communication: the output layer's own sequence-parallel all-gather becomes the deferred
    all-gather of the last layer's plan (followed by the inverse permutation).

    Explicit and reversible: returns a handle whose ``remove()`` restores the output layer.

    Args:
        model: a GPTModel built with ``get_gpt_block_shuffle_spec`` / ``get_gpt_layer_shuffle_spec``
            and ``sequence_parallel=True``.
        carrier: the model's ShuffleCarrier.
    """
    from megatron_specmoe.comm.shuffle import deferred_all_gather

    layer = getattr(model, "output_layer", None)
    if layer is None or not getattr(layer, "sequence_parallel", False):
        raise ValueError(
            "true_order_output: the model has no sequence-parallel output_layer; without sequence "
            "parallelism the shuffle layers already return true order"
        )
    group = layer.tp_group

    def gather_true_order(_module, args, kwargs):
        if not layer.sequence_parallel:  # GPTModel gathered itself (dynamic context, see below)
            return None
        state = carrier.state
        hidden = args[0]
        if state is None or hidden.shape[0] != state.plan.capacity:
            raise ValueError(
                "true_order_output: the output layer's input is not the last shuffle layer's shard "
                f"(rows {hidden.shape[0]}, plan capacity {None if state is None else state.plan.capacity})"
            )
        h = hidden.shape[-1]
        # The gathered input dies inside the output layer (the logits are new tensors): the
        # carrier's workspace holds it, as it holds each layer's gathered input.
        full = deferred_all_gather(hidden.reshape(-1, h), state.plan, group, counter=carrier.counter,
                                   workspace=carrier.workspace)
        carrier.state = None
        return (full.view(state.seq, state.batch, h),) + tuple(args[1:]), kwargs

    def contiguous_for_dynamic(_module, _args, kwargs, output):
        # Core 0.19's dynamic context: GPTModel all-gathers the decoder output in Megatron's
        # contiguous shard order before its output layer, so the last layer's shuffled shard is
        # turned back into this rank's contiguous shard here (one extra all-gather of the hidden
        # states; the static context keeps the free path above).
        if not _gathers_before_output_layer(kwargs.get("inference_context")):
            return None
        state = carrier.state
        if state is None or output.shape[0] != state.plan.capacity:
            raise ValueError(
                "true_order_output: the decoder's output is not the last shuffle layer's shard "
                f"(rows {output.shape[0]}, plan capacity {None if state is None else state.plan.capacity})"
            )
        h = output.shape[-1]
        full = deferred_all_gather(output.reshape(-1, h), state.plan, group, counter=carrier.counter)
        carrier.state = None
        tp = group.size()
        per = state.seq // tp
        rank = group.rank()
        return full.view(state.seq, state.batch, h)[rank * per:(rank + 1) * per]

    saved = layer.explicit_expert_comm
    carrier.output_consumer = "output_layer"
    hooks = [layer.register_forward_pre_hook(gather_true_order, with_kwargs=True)]
    decoder = getattr(model, "decoder", None)
    if decoder is not None:
        hooks.append(decoder.register_forward_hook(contiguous_for_dynamic, with_kwargs=True))
    layer.explicit_expert_comm = True  # the hook gathers; the linear itself must not
    return _OutputHandle(layer, hooks, saved, carrier)


def feed_token_ids(model, carrier: ShuffleCarrier):
    """Hand every forward's token ids to the shuffle layers (for ``ShuffleOptions(predictor=
    "route")``): a forward pre-hook on the GPTModel stores ``input_ids`` [B, S] as
    ``carrier.token_ids`` [S * B] in (s, b) order, and the model's shuffle layers as
    ``carrier.route_layers`` (whose plans ``megatron/shared_plans.py`` makes ahead). Returns the
    hook handle (``remove()`` undoes)."""
    layers = tuple(m for m in model.modules() if isinstance(m, ShuffleTransformerLayer) and m.carrier is carrier)

    def store(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise ValueError("feed_token_ids: the model was called without input_ids")
        carrier.token_ids = ids.transpose(0, 1).reshape(-1)
        carrier.route_layers = layers
        return None

    return model.register_forward_pre_hook(store, with_kwargs=True)
