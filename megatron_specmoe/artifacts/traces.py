"""The in-memory routing trace: which experts each token used at every MoE layer.

Notation
    T: tokens.   L: MoE layers (traced).   k: top-k.   E: routed experts per layer.

Readers and writers for the on-disk formats live in ``trace_io.py``; this module holds only the
type, so that predictors, planners and the simulator can depend on it without any file format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from megatron_specmoe.artifacts.errors import SpecMoEDataError

__all__ = ["RoutingTrace"]


@dataclass(frozen=True, kw_only=True)
class RoutingTrace:
    """Routes of T tokens through L MoE layers.

    Attributes:
        experts: int32 [T, L, k]; ``experts[t, l]`` are the logical experts the router selected for
            token t at MoE layer l, in the router's order (not necessarily sorted by weight).
            Every entry is in ``0 .. num_experts-1``.
        num_experts: E.
        token_ids: optional int64 [T], vocabulary ids.
        positions: optional int32 [T], position of each token in its sequence.
        request_ids: optional int64 [T], which request (sequence) each token belongs to.
        probs: optional float32 [T, L, k], router probabilities of ``experts``.
        source: where the trace came from (file names), used in messages.
    """

    experts: np.ndarray
    num_experts: int
    token_ids: Optional[np.ndarray] = None
    positions: Optional[np.ndarray] = None
    request_ids: Optional[np.ndarray] = None
    probs: Optional[np.ndarray] = None
    source: str = field(default="<memory>")

    def __post_init__(self) -> None:
        ex = np.asarray(self.experts)
        if ex.ndim != 3:
            raise ValueError(
                f"RoutingTrace.experts from {self.source}: expected [T, L, k], got shape {ex.shape}"
            )
        if not np.issubdtype(ex.dtype, np.integer):
            raise ValueError(
                f"RoutingTrace.experts from {self.source}: expected integer expert ids, got {ex.dtype}"
            )
        if (isinstance(self.num_experts, bool) or not isinstance(self.num_experts, (int, np.integer))
                or self.num_experts < 1):
            raise ValueError(f"RoutingTrace.num_experts must be a positive integer, got "
                             f"{self.num_experts!r}")
        object.__setattr__(self, "num_experts", int(self.num_experts))
        if ex.size and (ex.min() < 0 or ex.max() >= self.num_experts):
            bad = np.argwhere((ex < 0) | (ex >= self.num_experts))[0]
            raise ValueError(
                f"RoutingTrace.experts from {self.source}: expert id {int(ex[tuple(bad)])} at "
                f"(token {bad[0]}, layer {bad[1]}) is out of range 0..{self.num_experts - 1}"
            )
        # After the range check: an id beyond int32 cannot wrap into range.
        object.__setattr__(self, "experts", ex.astype(np.int32, copy=False))
        tokens = ex.shape[0]
        for name, dtype in (("token_ids", np.int64), ("positions", np.int32), ("request_ids", np.int64)):
            value = getattr(self, name)
            if value is None:
                continue
            arr = np.asarray(value)
            if arr.size and not np.issubdtype(arr.dtype, np.integer):
                raise SpecMoEDataError(f"RoutingTrace.{name} from {self.source}: stored as "
                                       f"{arr.dtype}, not integers (1.7 would become 1)",
                                       f"give {name} as an integer array")
            if arr.shape != (tokens,):
                raise ValueError(
                    f"RoutingTrace.{name} from {self.source}: expected shape [T]=({tokens},), "
                    f"got {arr.shape}"
                )
            object.__setattr__(self, name, arr.astype(dtype, copy=False))
        if self.probs is not None:
            pr = np.asarray(self.probs, dtype=np.float32)
            if pr.shape != ex.shape:
                raise ValueError(
                    f"RoutingTrace.probs from {self.source}: expected shape {ex.shape} like experts, "
                    f"got {pr.shape}"
                )
            object.__setattr__(self, "probs", pr)

    @property
    def num_tokens(self) -> int:
        return int(self.experts.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.experts.shape[1])

    @property
    def topk(self) -> int:
        return int(self.experts.shape[2])

    def select(self, index: np.ndarray) -> "RoutingTrace":
        """The tokens at ``index`` (int [T'] or bool [T]), all optional fields kept aligned."""

        def take(a):
            return None if a is None else a[index]

        return RoutingTrace(
            experts=self.experts[index],
            num_experts=self.num_experts,
            token_ids=take(self.token_ids),
            positions=take(self.positions),
            request_ids=take(self.request_ids),
            probs=take(self.probs),
            source=self.source,
        )

    @staticmethod
    def concat(traces: "list[RoutingTrace]") -> "RoutingTrace":
        """Tokens of several traces, in order. Optional fields survive only if all have them."""
        if not traces:
            raise ValueError("RoutingTrace.concat: no traces given")
        first = traces[0]
        for tr in traces[1:]:
            if (tr.num_layers, tr.topk, tr.num_experts) != (first.num_layers, first.topk, first.num_experts):
                raise ValueError(
                    f"RoutingTrace.concat: {tr.source} has (layers, top-k, experts) = "
                    f"{(tr.num_layers, tr.topk, tr.num_experts)} but {first.source} has "
                    f"{(first.num_layers, first.topk, first.num_experts)}"
                )

        def cat(name):
            parts = [getattr(t, name) for t in traces]
            return None if any(p is None for p in parts) else np.concatenate(parts)

        return RoutingTrace(
            experts=np.concatenate([t.experts for t in traces]),
            num_experts=first.num_experts,
            token_ids=cat("token_ids"),
            positions=cat("positions"),
            request_ids=cat("request_ids"),
            probs=cat("probs"),
            source="+".join(t.source for t in traces),
        )
