"""Record every MoE layer's expert choices (top-k ids and probabilities) on a live Megatron model.

Notation: S sequence length (as this rank's routers see it), B micro-batch, E routed experts,
k top-k, L MoE layers, T recorded tokens.

A forward hook on each MoE layer's router (``MoELayer.router``) reads the router's output. Both
output forms are understood:
    (probs float [S*B, E], routing_map bool [S*B, E])    TopKRouter.forward, core 0.16 and 0.19;
    (probs float [S*B, k], top_indices int [S*B, k])     core 0.19's inference router
                                                         (``InferenceMode`` active).
The k experts of a token are stored sorted by probability, highest first (ties: lower id first).

Token order: the router sees tokens sequence-major (row s * B + b). The recorder reorders every
forward to batch-major (token b * S + s), so that the tokens of one forward line up with
``input_ids.reshape(-1)`` of a [B, S] batch, and forwards follow in call order.

Each rank records what its own routers see (with TP > 1 and sequence parallelism, its sequence
shard). Attach with ``RouteRecorder.attach(model)``; detach explicitly with ``detach()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from megatron_specmoe.megatron.model_tools import moe_sites
from megatron_specmoe.artifacts.traces import RoutingTrace

__all__ = ["RouteRecorder"]


def _topk_from_output(output, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(experts int64 [N, k], probs float32 [N, k]) from a router's output, sorted by prob."""
    if not (isinstance(output, tuple) and len(output) == 2):
        raise ValueError(f"RouteRecorder: router returned {type(output).__name__}; expected a "
                         "(probs, routing_map) or (probs, top_indices) pair")
    probs, second = output
    probs = probs.detach().float()
    if second.dtype == torch.bool:  # routing_map [N, E]
        picks = second.sum(dim=1)
        if bool((picks != topk).any()):
            bad = int(torch.nonzero(picks != topk)[0, 0])
            raise ValueError(f"RouteRecorder: token {bad} has {int(picks[bad])} experts in the "
                             f"routing map, expected top-k={topk} (token dropping is not supported)")
        scores = probs.masked_fill(~second, float("-inf"))
        # A stable descending sort keeps equal probabilities in id order.
        top_p, top_i = torch.sort(scores, dim=1, descending=True, stable=True)
        return top_i[:, :topk].long(), top_p[:, :topk]
    if second.dtype.is_floating_point or second.shape[-1] != topk:
        raise ValueError(f"RouteRecorder: router's second output has dtype {second.dtype} and shape "
                         f"{tuple(second.shape)}; expected a bool routing map [N, E] or int top "
                         f"indices [N, {topk}]")
    order = torch.sort(probs, dim=1, descending=True, stable=True).indices
    return second.long().gather(1, order), probs.gather(1, order)


@dataclass(frozen=True, kw_only=True)
class _Forward:
    """One router call. experts int64 [B*S, k] and probs float32 [B*S, k], batch-major."""

    experts: torch.Tensor
    probs: torch.Tensor


class RouteRecorder:
    """Collects routes of every MoE layer of one model (on this rank).

    Use::

        rec = RouteRecorder.attach(model)
        model(tokens, positions, mask)          # any number of forwards
        trace = rec.trace(token_ids=tokens.reshape(-1).numpy())
        rec.detach()
    """

    def __init__(self, *, num_experts: int, topk: int, num_layers: int) -> None:
        self.num_experts = num_experts
        self.topk = topk
        self._calls: list[list[_Forward]] = [[] for _ in range(num_layers)]
        self._handles: list = []

    @classmethod
    def attach(cls, model: torch.nn.Module) -> "RouteRecorder":
        """Hook the router of every MoE layer of ``model`` (model order = trace layer order)."""
        sites = moe_sites(model)
        if not sites:
            raise ValueError("RouteRecorder.attach: the model has no MoE layers (no module with a "
                             "token_dispatcher)")
        config = sites[0].layer.config
        rec = cls(num_experts=int(config.num_moe_experts), topk=int(config.moe_router_topk),
                  num_layers=len(sites))
        for site in sites:
            router = getattr(site.layer, "router", None)
            if router is None:
                raise ValueError(f"RouteRecorder.attach: MoE layer {site.layer_number} has no router")
            rec._handles.append(router.register_forward_hook(rec._hook(site.index)))
        return rec

    def _hook(self, layer: int):
        def hook(_module, inputs, output):
            hidden = inputs[0]
            experts, probs = _topk_from_output(output, self.topk)
            if hidden.dim() == 3:  # [S, B, H]: sequence-major rows -> batch-major
                s, b = hidden.shape[0], hidden.shape[1]
                experts = experts.view(s, b, -1).transpose(0, 1).reshape(s * b, -1)
                probs = probs.view(s, b, -1).transpose(0, 1).reshape(s * b, -1)
            self._calls[layer].append(_Forward(experts=experts.cpu(), probs=probs.cpu()))

        return hook

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def detach(self) -> None:
        """Remove the hooks (idempotent); recorded routes stay readable."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def clear(self) -> None:
        """Forget everything recorded so far (hooks stay)."""
        for calls in self._calls:
            calls.clear()

    @property
    def num_tokens(self) -> int:
        return sum(int(c.experts.shape[0]) for c in self._calls[0])

    def _stacked(self, field: str) -> torch.Tensor:
        counts = [[int(c.experts.shape[0]) for c in calls] for calls in self._calls]
        if any(c != counts[0] for c in counts):
            raise ValueError(f"RouteRecorder: MoE layers saw different forwards (tokens per call "
                             f"{counts}); record whole model forwards only")
        if not counts[0]:
            return torch.zeros(len(self._calls), 0, self.topk)
        return torch.stack([torch.cat([getattr(c, field) for c in calls]) for calls in self._calls])

    def routes(self) -> np.ndarray:
        """int64 [L, T, k]: experts of every recorded token per layer, by probability."""
        return self._stacked("experts").numpy().astype(np.int64)

    def probs(self) -> np.ndarray:
        """float32 [L, T, k]: the router probabilities of ``routes()``."""
        return self._stacked("probs").numpy().astype(np.float32)

    def trace(
        self,
        *,
        token_ids: Optional[np.ndarray] = None,
        positions: Optional[np.ndarray] = None,
        request_ids: Optional[np.ndarray] = None,
        keep: Optional[np.ndarray] = None,
        with_probs: bool = False,
        source: str = "route-recorder",
    ) -> RoutingTrace:
        """The recorded routes as a ``RoutingTrace`` (tokens in recording order).

        Args:
            token_ids, positions, request_ids: int [T] aligned with the recorded tokens
                (batch-major per forward, forwards in order).
            keep: optional bool [T]; only these tokens are returned (e.g. drop padding).
            with_probs: include the router probabilities.
        """
        experts = self.routes().transpose(1, 0, 2)  # [T, L, k]
        t = experts.shape[0]
        for name, arr in (("token_ids", token_ids), ("positions", positions),
                          ("request_ids", request_ids), ("keep", keep)):
            if arr is not None and np.asarray(arr).shape != (t,):
                raise ValueError(f"RouteRecorder.trace: {name} has shape {np.asarray(arr).shape}, "
                                 f"expected ({t},) = the recorded tokens")
        trace = RoutingTrace(
            experts=experts,
            num_experts=self.num_experts,
            token_ids=token_ids,
            positions=positions,
            request_ids=request_ids,
            probs=self.probs().transpose(1, 0, 2) if with_probs else None,
            source=source,
        )
        return trace if keep is None else trace.select(np.asarray(keep, dtype=bool))
