"""The model presets the recipes are made for: each model's Megatron-LM flags and its parallel layout
per node count (``recipes.py`` turns them into calibrate -> plan -> serve commands).

Glossary
    preset: a model's Megatron-LM flags (shape, attention, tokenizer) and the parallel layout to use
        for each node count (8 GPUs per node).
    layout: a ``schedule.layout.ParallelLayout``; every preset serves with DP attention (TP = 1), so
        that the serve step places requests (see ``recipes.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Literal, Optional, Union, get_args

from megatron_specmoe.schedule.layout import ParallelLayout

__all__ = ["ModelName", "ModelPreset", "PRESETS", "preset", "layout_flags", "layout_problems_on"]

ModelName = Literal["mixtral-8x7b", "deepseek-v2-lite", "qwen3-30b-a3b"]


def layout_flags(layout: ParallelLayout) -> tuple[str, ...]:
    """Megatron-LM's parallel-size flags for ``layout``."""
    out = (
        "--tensor-model-parallel-size", str(layout.tp),
        "--expert-model-parallel-size", str(layout.ep),
        "--expert-tensor-parallel-size", str(layout.etp),
        "--pipeline-model-parallel-size", str(layout.pp),
    )
    # Megatron-LM requires sequence parallelism for MoE with TP > 1.
    return out + (("--sequence-parallel",) if layout.tp > 1 else ())


def layout_problems_on(layout: ParallelLayout, world_size: int) -> list[str]:
    """Why ``layout`` cannot run on ``world_size`` GPUs, or cannot benefit (empty: fine)."""
    from megatron_specmoe.megatron_lm.args import layout_problems  # imports no megatron

    return layout.world_problems(world_size) + layout_problems(SimpleNamespace(
        tensor_model_parallel_size=layout.tp, expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp))


@dataclass(frozen=True, kw_only=True)
class ModelPreset:
    """One model's Megatron-LM flags (from its Hugging Face config) and layouts.

    Attributes:
        name: the preset name (a ModelName).
        title: the model's usual name, for comments.
        hf_id: Hugging Face id: the tokenizer to load and where the shape comes from.
        num_layers, hidden_size, num_attention_heads: transformer shape.
        ffn_hidden_size: dense MLP width (dense layers; also Megatron's default expert width).
        moe_ffn_hidden_size: routed expert width, or None for ffn_hidden_size.
        num_experts, topk: routed experts and experts per token.
        shared_expert_intermediate_size: total width of the shared experts, or None.
        moe_layer_freq: Megatron's --moe-layer-freq (int N, or a Python list expression).
        vocab_size: tokenizer vocabulary (before Megatron's padding).
        seq_length, max_position_embeddings: sequence lengths.
        attention_flags: GQA / MLA / positional-embedding flags.
        extra_flags: anything else the model needs (norm, activation, biases).
        layouts: (nodes, ParallelLayout) pairs, 8 GPUs per node.
    """

    name: str
    title: str
    hf_id: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    moe_ffn_hidden_size: Optional[int]
    num_experts: int
    topk: int
    shared_expert_intermediate_size: Optional[int]
    moe_layer_freq: Union[int, str]
    vocab_size: int
    seq_length: int
    max_position_embeddings: int
    attention_flags: tuple[str, ...]
    extra_flags: tuple[str, ...]
    layouts: tuple[tuple[int, ParallelLayout], ...]

    @property
    def num_moe_layers(self) -> int:
        if isinstance(self.moe_layer_freq, int):
            return len(range(0, self.num_layers, self.moe_layer_freq))
        pattern = eval(self.moe_layer_freq, {"__builtins__": {}})  # our own constant list expression
        return int(sum(1 for x in pattern if x))

    def layout_for(self, nodes: int) -> ParallelLayout:
        for n, layout in self.layouts:
            if n == nodes:
                return layout
        known = ", ".join(str(n) for n, _ in self.layouts)
        raise ValueError(f"preset {self.name} has no layout for {nodes} node(s); it has {known}")

    def model_flags(self) -> tuple[str, ...]:
        out = [
            "--num-layers", str(self.num_layers),
            "--hidden-size", str(self.hidden_size),
            "--ffn-hidden-size", str(self.ffn_hidden_size),
            "--num-attention-heads", str(self.num_attention_heads),
            *self.attention_flags,
            "--seq-length", str(self.seq_length),
            "--max-position-embeddings", str(self.max_position_embeddings),
            "--num-experts", str(self.num_experts),
            "--moe-router-topk", str(self.topk),
        ]
        if self.moe_ffn_hidden_size is not None:
            out += ["--moe-ffn-hidden-size", str(self.moe_ffn_hidden_size)]
        if self.shared_expert_intermediate_size is not None:
            out += ["--moe-shared-expert-intermediate-size",
                    str(self.shared_expert_intermediate_size)]
        if self.moe_layer_freq != 1:
            out += ["--moe-layer-freq", str(self.moe_layer_freq)]
        out += [
            *self.extra_flags,
            "--tokenizer-type", "HuggingFaceTokenizer",
            "--tokenizer-model", self.hf_id,
        ]
        return tuple(out)


_COMMON_FLAGS = ("--normalization", "RMSNorm", "--swiglu", "--untie-embeddings-and-output-weights",
                 "--disable-bias-linear")

# Shapes from each model's Hugging Face config.json.
PRESETS: dict[str, ModelPreset] = {
    "mixtral-8x7b": ModelPreset(
        name="mixtral-8x7b", title="Mixtral-8x7B", hf_id="mistralai/Mixtral-8x7B-v0.1",
        num_layers=32, hidden_size=4096, num_attention_heads=32, ffn_hidden_size=14336,
        moe_ffn_hidden_size=None, num_experts=8, topk=2, shared_expert_intermediate_size=None,
        moe_layer_freq=1, vocab_size=32000, seq_length=4096, max_position_embeddings=32768,
        attention_flags=("--group-query-attention", "--num-query-groups", "8",
                         "--position-embedding-type", "rope", "--rotary-base", "1000000"),
        extra_flags=(*_COMMON_FLAGS, "--norm-epsilon", "1e-5"),
        # 8 experts: EP stops at 8, so 2 nodes are two EP=8 replicas and the expert all-to-all
        # stays on NVLink inside each node. DP attention: ~15 GB per GPU in bf16.
        layouts=((1, ParallelLayout(tp=1, ep=8)), (2, ParallelLayout(tp=1, ep=8))),
    ),
    "deepseek-v2-lite": ModelPreset(
        name="deepseek-v2-lite", title="DeepSeek-V2-Lite", hf_id="deepseek-ai/DeepSeek-V2-Lite",
        num_layers=27, hidden_size=2048, num_attention_heads=16, ffn_hidden_size=10944,
        moe_ffn_hidden_size=1408, num_experts=64, topk=6,
        shared_expert_intermediate_size=2 * 1408, moe_layer_freq="([0]+[1]*26)",
        vocab_size=102400, seq_length=4096, max_position_embeddings=163840,
        attention_flags=("--multi-latent-attention", "--kv-lora-rank", "512",
                         "--qk-head-dim", "128", "--qk-pos-emb-head-dim", "64",
                         "--v-head-dim", "128", "--qk-layernorm",
                         "--position-embedding-type", "yarn", "--rotary-base", "10000",
                         "--rotary-scaling-factor", "40", "--mscale", "0.707",
                         "--mscale-all-dim", "0.707",
                         "--yarn-original-max-position-embeddings", "4096"),
        extra_flags=(*_COMMON_FLAGS, "--norm-epsilon", "1e-6"),
        # 2 nodes: EP=16 spans both nodes, the case where the all-to-all crosses InfiniBand.
        layouts=((1, ParallelLayout(tp=1, ep=8)), (2, ParallelLayout(tp=1, ep=16))),
    ),
    "qwen3-30b-a3b": ModelPreset(
        name="qwen3-30b-a3b", title="Qwen3-30B-A3B", hf_id="Qwen/Qwen3-30B-A3B",
        num_layers=48, hidden_size=2048, num_attention_heads=32, ffn_hidden_size=6144,
        moe_ffn_hidden_size=768, num_experts=128, topk=8, shared_expert_intermediate_size=None,
        moe_layer_freq=1, vocab_size=151936, seq_length=4096, max_position_embeddings=40960,
        attention_flags=("--group-query-attention", "--num-query-groups", "4",
                         "--kv-channels", "128", "--qk-layernorm",
                         "--position-embedding-type", "rope", "--rotary-base", "1000000"),
        extra_flags=(*_COMMON_FLAGS, "--norm-epsilon", "1e-6"),
        layouts=((1, ParallelLayout(tp=1, ep=8)), (2, ParallelLayout(tp=1, ep=16))),
    ),
}
assert set(PRESETS) == set(get_args(ModelName)), "PRESETS must match ModelName"


def preset(name: str) -> ModelPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
