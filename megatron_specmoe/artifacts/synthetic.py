"""Synthetic routing traces with planted structure, for models we hold no real trace of.

Notation
    T: tokens.   L: MoE layers.   k: top-k.   E: experts.   C: topics.   m: experts per topic set.
    R: requests (runs of ``request_length`` consecutive tokens).   G: router groups (optional).

Why. The real traces here are Mixtral-8x7B (E = 8): too few experts for EP 16-64. The planners,
predictors and measures at cluster scale (E = 64-256, as DeepSeek-V3 or Qwen3-235B) are exercised
on these instead. They are benchmark inputs, not evidence about any real model; results on them are
stated as such.

Generative model (all draws from one ``numpy`` generator seeded by ``seed``):
    - each request draws a topic from a skewed distribution (weight 1/sqrt(c+1)); each of its
      tokens keeps the request's topic with probability ``stickiness``, else draws a fresh one;
    - per layer l, each topic c owns a preferred set S[l, c] of m experts (uniform, without
      repeats), and the layer has an expert popularity q_l (weight rank^-0.3, ranks a random
      permutation per layer);
    - each of a token's k selections comes from S[l, topic] (uniformly) with probability
      ``p_topic``, else from q_l; repeated experts within a token are redrawn from q_l;
    - with ``router_groups`` G and ``topk_groups`` g (DeepSeek's group-limited routing: experts
      e*G//E form G groups of E/G), every (layer, topic) owns g groups and all of a token's
      selections stay inside its topic's groups (S inside them, the rest uniform within them);
    - token ids: with probability ``p_topic_token`` a token's id lies in its topic's slice of the
      vocabulary, else anywhere, so a token-id predictor can learn the topic.
The topic ties layers together (the route history predicts later layers) and ties a request's
tokens together (request placement has something to find).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from megatron_specmoe.artifacts.traces import RoutingTrace

__all__ = ["SyntheticSpec", "synthetic_trace"]


@dataclass(frozen=True, kw_only=True)
class SyntheticSpec:
    """Parameters of ``synthetic_trace`` (module docstring).

    Attributes:
        tokens: T.   layers: L.   num_experts: E.   topk: k.
        topics: C.   topic_experts: m (default max(2k, E // C)).
        p_topic: share of selections from the topic's set.   stickiness: see the docstring.
        request_length: tokens per request.   vocab: vocabulary size of the token ids.
        p_topic_token: share of token ids drawn from the topic's vocabulary slice.
        router_groups: G or None.   topk_groups: g (with G).   seed: the generator's seed.
    """

    tokens: int
    layers: int
    num_experts: int
    topk: int
    topics: int = 16
    topic_experts: Optional[int] = None
    p_topic: float = 0.7
    stickiness: float = 0.9
    request_length: int = 128
    vocab: int = 32000
    p_topic_token: float = 0.5
    router_groups: Optional[int] = None
    topk_groups: Optional[int] = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("tokens", "layers", "num_experts", "topk", "topics", "request_length", "vocab"):
            if getattr(self, name) < 1:
                raise ValueError(f"SyntheticSpec.{name} must be >= 1, got {getattr(self, name)}")
        if self.topk > self.num_experts:
            raise ValueError(f"SyntheticSpec: topk={self.topk} exceeds num_experts={self.num_experts}")
        for name in ("p_topic", "stickiness", "p_topic_token"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"SyntheticSpec.{name} must lie in [0, 1], got {getattr(self, name)}")
        if (self.router_groups is None) != (self.topk_groups is None):
            raise ValueError("SyntheticSpec: give router_groups and topk_groups together, or neither")
        if self.router_groups is not None:
            g, tg = self.router_groups, self.topk_groups
            if self.num_experts % g or not 1 <= tg <= g or tg * self.num_experts // g < self.topk:
                raise ValueError(
                    f"SyntheticSpec: router_groups={g} must divide E={self.num_experts} and "
                    f"topk_groups={tg} in 1..{g} must hold at least k={self.topk} experts"
                )

    @property
    def set_size(self) -> int:
        m = self.topic_experts if self.topic_experts is not None else max(2 * self.topk, self.num_experts // self.topics)
        return int(min(m, self.allowed_experts))

    @property
    def allowed_experts(self) -> int:
        """Experts a token may select: E, or g * E / G under group-limited routing."""
        if self.router_groups is None:
            return self.num_experts
        return self.topk_groups * self.num_experts // self.router_groups


def _popularity(rng: np.random.Generator, num: int) -> np.ndarray:
    w = np.empty(num)
    w[rng.permutation(num)] = np.arange(1, num + 1) ** -0.3
    return w / w.sum()


def _draw(rng: np.random.Generator, cdf: np.ndarray, shape) -> np.ndarray:
    """int64 draws from the rows' CDF: ``cdf`` [A, n] (one row per draw's ``row``) or [n]."""
    return np.minimum(np.searchsorted(cdf, rng.random(shape), side="right"), cdf.shape[-1] - 1)


def synthetic_trace(spec: SyntheticSpec) -> RoutingTrace:
    """A ``RoutingTrace`` with experts, token ids and request ids (module docstring)."""
    rng = np.random.default_rng(spec.seed)
    T, L, E, k, C = spec.tokens, spec.layers, spec.num_experts, spec.topk, spec.topics
    requests = -(-T // spec.request_length)
    topic_w = 1.0 / np.sqrt(np.arange(1, C + 1))
    topic_cdf = np.cumsum(topic_w / topic_w.sum())
    req_topic = _draw(rng, topic_cdf, requests)
    request_ids = np.arange(T, dtype=np.int64) // spec.request_length
    topic = np.where(rng.random(T) < spec.stickiness, req_topic[request_ids], _draw(rng, topic_cdf, T))
    slice_ = max(1, spec.vocab // C)
    own = topic * slice_ + rng.integers(0, slice_, T)
    token_ids = np.where(rng.random(T) < spec.p_topic_token, own, rng.integers(0, spec.vocab, T)) % spec.vocab

    m, A = spec.set_size, spec.allowed_experts
    experts = np.empty((T, L, k), dtype=np.int32)
    for layer in range(L):
        # allowed[c]: the experts topic c may use at this layer (all E without groups).
        if spec.router_groups is None:
            allowed = np.broadcast_to(np.arange(E), (C, E))
        else:
            size = E // spec.router_groups
            groups = np.stack([rng.permutation(spec.router_groups)[: spec.topk_groups] for _ in range(C)])
            allowed = (groups[:, :, None] * size + np.arange(size)).reshape(C, A)
        pop = _popularity(rng, E)
        sets = np.stack([rng.choice(allowed[c], size=m, replace=False) for c in range(C)])
        weights = pop[allowed]  # [C, A]
        cdf = np.cumsum(weights / weights.sum(axis=1, keepdims=True), axis=1)
        cdf[:, -1] = 1.0

        def fallback(rows: np.ndarray) -> np.ndarray:
            # Draws from q_l restricted to each row's topic's allowed experts (one pass per topic).
            out = np.empty(rows.shape[0], dtype=np.int64)
            c_rows = topic[rows]
            for c in np.unique(c_rows):
                pick = c_rows == c
                idx = np.searchsorted(cdf[c], rng.random(int(pick.sum())), side="right")
                out[pick] = allowed[c, np.minimum(idx, A - 1)]
            return out

        sel = np.where(
            rng.random((T, k)) < spec.p_topic,
            sets[topic[:, None], rng.integers(0, m, (T, k))],
            -1,
        )
        flat_rows = np.repeat(np.arange(T), k).reshape(T, k)
        todo = sel < 0
        sel[todo] = fallback(flat_rows[todo])
        for _ in range(100):  # redraw repeats until every row names k distinct experts
            srt = np.sort(sel, axis=1)
            dup_rows = np.nonzero((srt[:, 1:] == srt[:, :-1]).any(axis=1))[0]
            if dup_rows.size == 0:
                break
            sub = sel[dup_rows]
            order = np.argsort(sub, axis=1, kind="stable")
            ranked = np.take_along_axis(sub, order, axis=1)
            again = np.zeros_like(sub, dtype=bool)
            again_sorted = np.concatenate([np.zeros((sub.shape[0], 1), bool), ranked[:, 1:] == ranked[:, :-1]], axis=1)
            np.put_along_axis(again, order, again_sorted, axis=1)
            rows = np.repeat(dup_rows[:, None], k, axis=1)[again]
            sub[again] = fallback(rows)
            sel[dup_rows] = sub
        else:  # pragma: no cover - vanishingly rare: fill deterministically
            for t in np.nonzero((np.sort(sel, 1)[:, 1:] == np.sort(sel, 1)[:, :-1]).any(1))[0]:
                chosen = list(dict.fromkeys(sel[t].tolist()))
                chosen += [e for e in allowed[topic[t]].tolist() if e not in chosen][: k - len(chosen)]
                sel[t] = chosen
        experts[:, layer] = sel
    return RoutingTrace(
        experts=experts, num_experts=E, token_ids=token_ids.astype(np.int64), request_ids=request_ids,
        positions=(np.arange(T) % spec.request_length).astype(np.int32),
        source=f"synthetic(T={T}, L={L}, E={E}, k={k}, topics={C}, seed={spec.seed}"
               + (f", groups {spec.topk_groups}/{spec.router_groups}" if spec.router_groups else "") + ")",
    )
