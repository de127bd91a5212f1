"""DeepSeek-style parts in the shuffle layer: multi-latent attention (MLA) and shared experts at TP > 1.

Notation: S sequence length, B micro-batch, T = S * B tokens of one TP group, P TP size,
C = ceil(T / P) rows per TP rank after the shuffle, H hidden size.

Multi-latent attention. The shuffle layer hands attention the gathered, true-order input
[S, B, H] on every TP rank and wants back the output projection's partial sum (stage 2 of
``megatron/shuffle_layer.py``). Megatron's ``MLASelfAttention`` reads ``config.sequence_parallel``
inside its forward (it scatters the kv latent to the sequence shard and gathers the RoPE keys
back) and its column linears all-gather their input under sequence parallelism.
``ShuffleMLASelfAttention`` is Megatron's MLA built from a copy of the config with
``sequence_parallel=False``: its column linears then take the full input without communicating
(Megatron's forward for tensor parallelism without sequence parallelism), its one collective is
Megatron's own (the TP all-gather of the kv down-projection's columns, kv_lora_rank +
qk_pos_emb_head_dim values per token, which every MLA layer at TP > 1 performs), and its
``linear_proj`` is ``NoCommRowParallelLinear`` (the partial sum goes to the shuffled
reduce-scatter). ``mla_shuffle_attention`` makes that attention spec from Megatron's MLA spec
(with ``megatron.local_mla``'s core attention where the local spec has the one that cannot run
MLA).

Shared experts. Every token runs the shared experts once. After the shuffle each TP rank holds a
different shard of C rows, so Megatron's shared-expert MLP (column-parallel fc1, row-parallel
fc2 over the TP group) must run in its sequence-parallel form: fc1 all-gathers the P shards
(P * C rows, in rank order), each rank computes its ffn columns for all of them, fc2
reduce-scatters the partial sums back so that rank r gets the rows of its own shard. That is
correct for any order of rows and needs equal shards, so the shuffle layer (stage 5) runs the
shared experts on all C rows of its shard (the pad row included, dropped afterwards) and the MoE
layer on the real rows, and adds the two: the same join as Megatron's ``MoELayer``, whose
output is routed + shared before the residual. ``shard_shared_experts`` switches a built
MoE layer to that: its shared-expert linears become sequence parallel (with or without sequence
parallelism in the rest of the model) and the MoE layer no longer calls them itself
(``use_shared_expert = False``; the module stays where it is, so checkpoints keep their keys).
The bytes are those of Megatron's sequence-parallel shared expert: one all-gather and one
reduce-scatter of C * H values per rank.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.multi_latent_attention import MLASelfAttention

from megatron_specmoe.megatron.shuffle_linears import NoCommRowParallelLinear

__all__ = ["ShuffleMLASelfAttention", "is_mla_spec", "mla_shuffle_attention", "shard_shared_experts",
           "runs_shared_experts"]


class ShuffleMLASelfAttention(MLASelfAttention):
    """Megatron's ``MLASelfAttention`` on the shuffle layer's gathered, true-order input: built
    from a copy of ``config`` with ``sequence_parallel=False`` (module docstring)."""

    specmoe_shuffle_attention = True  # checked by ShuffleTransformerLayer

    def __init__(self, config, *args: Any, **kwargs: Any) -> None:
        cfg = copy.copy(config)
        cfg.sequence_parallel = False
        super().__init__(cfg, *args, **kwargs)


def is_mla_spec(attention_spec: Any) -> bool:
    """Whether a self-attention ModuleSpec builds multi-latent attention."""
    sub = getattr(attention_spec, "submodules", None)
    return sub is not None and hasattr(sub, "linear_kv_down_proj")


def mla_shuffle_attention(attention_spec: Any) -> Any:
    """The shuffle version of Megatron's local MLA self-attention spec: ``ShuffleMLASelfAttention``
    with a non-communicating ``linear_proj`` (and the local MLA core attention)."""
    sub = attention_spec.submodules
    proj = sub.linear_proj
    if proj not in (RowParallelLinear, NoCommRowParallelLinear):
        raise ValueError(
            f"shuffle layer: MLA's linear_proj is {getattr(proj, '__name__', proj)}; the shuffle layer "
            "supports MLA with Megatron's local linears (TransformerEngine MLA awaits the GPU check)"
        )
    for name in ("linear_q_proj", "linear_q_down_proj", "linear_q_up_proj", "linear_kv_down_proj",
                 "linear_kv_up_proj"):
        cls = getattr(sub, name, None)
        if cls is not None and cls is not ColumnParallelLinear:
            raise ValueError(
                f"shuffle layer: MLA's {name} is {getattr(cls, '__name__', cls)}; the shuffle layer "
                "supports MLA with Megatron's local ColumnParallelLinear only"
            )
    spec = dataclasses.replace(attention_spec, module=ShuffleMLASelfAttention,
                               submodules=dataclasses.replace(sub, linear_proj=NoCommRowParallelLinear))
    return _local_core(spec)


def _local_core(attention_spec: Any) -> Any:
    """``megatron.local_mla``'s core attention in place of the local DotProductAttention."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_specmoe.megatron.local_mla import LocalMLAAttention

    sub = attention_spec.submodules
    if sub.core_attention is DotProductAttention:
        return dataclasses.replace(attention_spec, submodules=dataclasses.replace(sub, core_attention=LocalMLAAttention))
    return attention_spec


def runs_shared_experts(mlp: Any) -> bool:
    """Whether ``shard_shared_experts`` took over this MoE layer's shared experts."""
    return bool(getattr(mlp, "specmoe_shard_shared_experts", False))


def shard_shared_experts(mlp: Any, tp: int) -> bool:
    """With ``tp`` > 1, switch a built MoE layer's shared experts to the sequence-parallel form and
    take them out of the MoE layer's own forward (module docstring). Returns whether the shuffle
    layer now runs them (False: no shared experts, or TP = 1, where every rank holds whole shared
    experts and the MoE layer runs them on its real rows as usual).

    Raises:
        ValueError: shared experts overlapped with the dispatcher, or linears other than
            Megatron's local column / row parallel ones (named).
    """
    shared = getattr(mlp, "shared_experts", None)
    if shared is None or tp == 1 or not getattr(mlp, "use_shared_expert", False):
        return runs_shared_experts(mlp)
    if getattr(mlp, "shared_expert_overlap", False):
        raise ValueError("ShuffleTransformerLayer: moe_shared_expert_overlap must be False (the shuffle "
                         "layer runs the shared experts itself, on its shard)")
    fc1, fc2 = shared.linear_fc1, shared.linear_fc2
    if type(fc1) is not ColumnParallelLinear or type(fc2) is not RowParallelLinear:
        raise ValueError(
            f"ShuffleTransformerLayer: shared experts with {type(fc1).__name__} / {type(fc2).__name__}; the "
            "shuffle layer runs shared experts with Megatron's local linears (TransformerEngine shared "
            "experts await the GPU check)"
        )
    cfg = copy.copy(shared.config)
    cfg.sequence_parallel = True
    shared.config = cfg
    fc1.sequence_parallel = True
    fc2.sequence_parallel = True
    mlp.use_shared_expert = False
    mlp.specmoe_shard_shared_experts = True
    return True
