"""Synthetic routes as in DeepEP's tests: uniformly random top-k, optionally group-limited.

Notation
    T: tokens.   E: experts.   k: top-k.   g: expert groups (E / g consecutive experts each).
    m: groups a token may use (DeepSeek-V3's "top-4 groups").

Recipe (deepseek-ai/DeepEP tests/legacy/test_internode.py and test_low_latency.py, re-expressed)
    scores = iid random for every (token, expert);
    with groups: a group's score is its best expert's score; keep the m best groups, mask the rest;
    the token's experts are the k best remaining scores.
    DeepEP draws |normal| + 1; only the order of the scores decides the selection, so any iid
    continuous distribution selects with the same law. We draw uniforms (13x faster here).
DeepEP's internode test uses g = nodes and m = min(nodes, 4); its intranode and low-latency tests
use no groups. ``specmoe simulate``'s interface example (256 experts, top-8, 8 groups, top-4
groups) is DeepSeek-V3's gate, which equals DeepEP's test at EP 64 (8 nodes).
"""

from __future__ import annotations

import numpy as np

from megatron_specmoe.artifacts.traces import RoutingTrace

__all__ = ["synthetic_routes"]


def synthetic_routes(
    *,
    num_tokens: int,
    num_experts: int = 256,
    top_k: int = 8,
    num_groups: int = 1,
    top_groups: int = 1,
    num_layers: int = 1,
    seed: int = 0,
    chunk: int = 65536,
) -> RoutingTrace:
    """A ``RoutingTrace`` of ``num_tokens`` tokens, ``experts`` int32 [T, L, k] (module docstring).

    Args:
        num_tokens: T.
        num_experts: E.
        top_k: k.
        num_groups: g (1: no group limit); must divide E.
        top_groups: m, 1 <= m <= g; m x E / g must be >= k.
        num_layers: independent layers drawn.
        seed: numpy seed.
        chunk: tokens drawn at a time (memory).
    """
    for name, value in (("num_tokens", num_tokens), ("num_experts", num_experts), ("top_k", top_k),
                        ("num_groups", num_groups), ("top_groups", top_groups), ("num_layers", num_layers)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"synthetic_routes: {name} must be a positive int, got {value!r}")
    if num_experts % num_groups:
        raise ValueError(f"synthetic_routes: num_groups={num_groups} must divide num_experts={num_experts}")
    if top_groups > num_groups:
        raise ValueError(f"synthetic_routes: top_groups={top_groups} exceeds num_groups={num_groups}")
    per_group = num_experts // num_groups
    if top_groups * per_group < top_k:
        raise ValueError(
            f"synthetic_routes: top_groups={top_groups} groups of {per_group} experts hold fewer than "
            f"top_k={top_k} experts"
        )
    rng = np.random.default_rng(seed)
    out = np.empty((num_tokens, num_layers, top_k), dtype=np.int32)
    for layer in range(num_layers):
        for start in range(0, num_tokens, chunk):
            n = min(chunk, num_tokens - start)
            scores = rng.random((n, num_experts), dtype=np.float32)  # in [0, 1)
            if top_groups < num_groups:
                best = scores.reshape(n, num_groups, per_group).max(-1)  # [n, g]
                keep = np.argpartition(best, num_groups - top_groups, axis=-1)[:, num_groups - top_groups:]
                mask = np.zeros((n, num_groups), dtype=bool)
                np.put_along_axis(mask, keep, True, axis=-1)
                scores = np.where(np.repeat(mask, per_group, axis=-1), scores, np.float32(-1.0))
            out[start:start + n, layer] = np.argpartition(scores, num_experts - top_k, axis=-1)[:, num_experts - top_k:]
    return RoutingTrace(
        experts=out, num_experts=num_experts,
        source=f"synthetic: {num_experts} experts, top-{top_k}, top-{top_groups} of {num_groups} groups, seed {seed}",
    )
