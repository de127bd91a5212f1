"""The plan's own cost per MoE layer, and the attention time that can hide it (a stated roofline).

Notation
    T_r: tokens per GPU.   p: attention TP size.   H: hidden size.   h, h_kv: query / KV heads.
    d: head dim.   C: context (KV length a decode token attends to; a prefill sequence's length).
    K: kernels the plan launches per MoE layer.

Plan charge (``PlanCharge``, ``plan_time``)
    plan time = K x launch cost, launch cost = ``ComputeRates.launch_graph_s`` (a kernel inside a
    replayed CUDA graph) or ``launch_eager_s`` (eager PyTorch); sources in ``cluster.py``.
    K defaults to ``DEFAULT_PLAN_KERNELS`` = 16, the most any run-time predictor's plan launches per
    MoE layer on the Triton path (``PLAN_KERNELS``: route 10, pregate 11, history 16, combined
    token + history 14, counted by ``measure/launches.LaunchCounter`` in ``tools/bench_plan.py``;
    ``tests/test_launches.py`` checks that these constants are what the counter counts). ``--plan-kernels`` overrides it.
    exposed = max(0, plan - attention) with CUDA graphs when the plan runs on a side stream beside
    attention (it needs only token ids, earlier routes or the gathered layer input); the whole plan
    otherwise. Eager launches are charged in full even with overlap: the host issues them one
    after another, and small decode steps are host-bound, so they add to the step.

Attention roofline (``attention_roofline``), per GPU, per layer, BF16 weights and KV cache
    GQA shape from H: h = H / 128, d = 128, h_kv = max(1, h / 4) (Mixtral-8x7B: 32 / 8 heads).
    FLOPs  = 2 T_r H (h d + 2 h_kv d) + 2 T_r h d H          (QKV and output projections)
           + 4 T_r A h d                                    (scores and values; A = C for decode,
                                                              C / 2 for causal prefill)
    bytes  = 2 (H (h d + 2 h_kv d) + h d H) / p              (weights, split over TP)
           + decode: 2 T_r C 2 h_kv d                        (each token reads its KV cache)
             prefill: 2 T_r 2 h_kv d                          (K and V written once)
           + 2 T_r H x 2                                     (input and output rows)
    time = max(FLOPs / achieved FLOP/s, bytes / achieved HBM bytes/s) (``ComputeRates``).
    With TP, a GPU works on T_r x p tokens over h / p heads: the same FLOPs and KV bytes as T_r
    tokens with all heads. MLA models (DeepSeek-V3) differ: read this as an order of magnitude.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from megatron_specmoe.sim.cluster import ClusterSpec

__all__ = ["PlanLaunch", "Phase", "PLAN_KERNELS", "DEFAULT_PLAN_KERNELS", "PlanCharge", "AttentionRoofline",
           "attention_roofline", "plan_time"]

PlanLaunch = Literal["graph", "eager"]
Phase = Literal["prefill", "decode"]

# Launches per MoE layer of the whole plan (scores -> prices assignment -> permutation), Triton path,
# as measure/launches.LaunchCounter counts them (tools/bench_plan.py; checked by tests/test_launches.py).
PLAN_KERNELS: dict[str, int] = {"route": 10, "pregate": 11, "history": 16, "combined": 14}
DEFAULT_PLAN_KERNELS = max(PLAN_KERNELS.values())


@dataclass(frozen=True, kw_only=True)
class PlanCharge:
    """How the plan is charged.

    Attributes:
        kernels: K, kernels per MoE layer (>= 0).
        launch: "graph" or "eager".
        overlap: the plan runs on a side stream beside attention.
        phase: "prefill" or "decode" (for the attention roofline).
        context: C, tokens of context (>= 1).
    """

    kernels: int = DEFAULT_PLAN_KERNELS
    launch: str = "graph"
    overlap: bool = True
    phase: str = "decode"
    context: int = 4096

    def __post_init__(self) -> None:
        if not isinstance(self.kernels, int) or isinstance(self.kernels, bool) or self.kernels < 0:
            raise ValueError(f"--plan-kernels must be an int >= 0, got {self.kernels!r}")
        if self.launch not in get_args(PlanLaunch):
            raise ValueError(f"--plan-launch must be one of {', '.join(get_args(PlanLaunch))}, got {self.launch!r}")
        if self.phase not in get_args(Phase):
            raise ValueError(f"--phase must be one of {', '.join(get_args(Phase))}, got {self.phase!r}")
        if not isinstance(self.context, int) or self.context < 1:
            raise ValueError(f"--context must be a positive int, got {self.context!r}")


@dataclass(frozen=True, kw_only=True)
class AttentionRoofline:
    """One GPU's attention of one layer.

    Attributes:
        flops: FLOPs.
        bytes: HBM bytes.
        time_s: max(FLOPs / FLOP/s, bytes / bytes/s).
        bound: "compute" or "memory".
    """

    flops: float
    bytes: float
    time_s: float
    bound: str


def attention_roofline(*, hidden_size: int, tokens_per_rank: int, tp: int, cluster: ClusterSpec,
                       phase: str, context: int) -> AttentionRoofline:
    """The stated roofline of the module docstring."""
    heads = max(1, hidden_size // 128)
    head_dim = 128
    kv_heads = max(1, heads // 4)
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    t = float(tokens_per_rank)
    attended = context if phase == "decode" else context / 2
    flops = 2 * t * hidden_size * (q_dim + 2 * kv_dim) + 2 * t * q_dim * hidden_size + 4 * t * attended * q_dim
    weights = 2.0 * (hidden_size * (q_dim + 2 * kv_dim) + q_dim * hidden_size) / tp
    kv = 2 * t * context * 2 * kv_dim if phase == "decode" else 2 * t * 2 * kv_dim
    nbytes = weights + kv + 2 * t * hidden_size * 2
    compute_s = flops / cluster.compute.dense_flops
    memory_s = nbytes / cluster.compute.hbm_bw
    return AttentionRoofline(flops=flops, bytes=nbytes, time_s=max(compute_s, memory_s),
                             bound="compute" if compute_s >= memory_s else "memory")


def plan_time(charge: PlanCharge, cluster: ClusterSpec, attention_s: float) -> tuple[float, float]:
    """(plan time, exposed plan time) per MoE layer, seconds (module docstring)."""
    per = cluster.compute.launch_graph_s if charge.launch == "graph" else cluster.compute.launch_eager_s
    total = charge.kernels * per
    if charge.overlap and charge.launch == "graph":
        return total, max(0.0, total - attention_s)
    return total, total
