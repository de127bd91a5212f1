"""Request placement inside Megatron's data-parallel inference coordinator (DP attention, TP = 1).

Megatron-Core 0.19's dynamic inference engine starts a ``DataParallelInferenceCoordinator`` in a
separate process (``multiprocessing`` spawn context, target ``DataParallelInferenceCoordinator.
entrypoint``, looked up in ``megatron.core.inference.engines.dynamic_engine``). For each submitted
request, its handler calls ``compute_request_hashes(prompt)`` and then
``get_best_data_parallel_rank(request_hashes)``, which picks the engine (DP rank) by prefix-cache
match and free request slots. ``SpecMoECoordinator`` overrides the two: the first also keeps the
prompt's token ids, the second scores each DP rank by the request's predicted local (token,
expert) pairs on the experts that rank hosts plus its free slots
(``schedule.request_placement.online_rank``), unless prefix caching matched the request, in which
case Megatron's choice stands (a KV-cache hit saves more than an all-to-all).

Glossary
    DP rank d    the engine whose ZMQ identity is ``mp-coord-{d}`` (how the 0.19 engine names
                 itself); with DP attention its EP rank is ``d % EP`` (TP = ETP = 1, Megatron's
                 rank order), so it hosts the experts ``placement.rank_of_logical() == d % EP``.
    router       ``AffinityRouter``: the plan's token table and placements, and the weight.

Process boundary. The coordinator runs in a freshly spawned process, which does not inherit
patches; so ``install_request_routing(plan_dir, weight)`` (the launcher calls it for
``--specmoe-request-placement``) does two explicit, reversible things in the engine's process:
it points ``dynamic_engine.DataParallelInferenceCoordinator`` at ``SpecMoECoordinator`` (an
importable class, so the spawned process gets it by name), and it sets the environment variables
``SPECMOE_REQUEST_PLAN`` and ``SPECMOE_REQUEST_WEIGHT``, which the spawned process inherits and
``SpecMoECoordinator.__init__`` reads. ``uninstall_request_routing()`` undoes both.

Megatron-Core 0.16's coordinator routes round-robin inside its event loop with no per-request
hook; ``install_request_routing`` refuses it by name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from megatron_specmoe.megatron.patching import Patch, apply_patches, patched_names, revert_patches

__all__ = [
    "AffinityRouter",
    "SpecMoECoordinator",
    "install_request_routing",
    "uninstall_request_routing",
    "is_request_routing_installed",
    "PLAN_ENV",
    "WEIGHT_ENV",
]

PLAN_ENV = "SPECMOE_REQUEST_PLAN"
WEIGHT_ENV = "SPECMOE_REQUEST_WEIGHT"


def _coordinator_class():
    try:
        from megatron.core.inference.data_parallel_inference_coordinator.coordinator import (
            DataParallelInferenceCoordinator,
        )
    except ImportError as exc:
        raise ImportError(
            "request placement needs megatron-core >= 0.19 (its DataParallelInferenceCoordinator has "
            "a per-request get_best_data_parallel_rank; 0.16 routes round-robin inside its event loop)"
        ) from exc
    return DataParallelInferenceCoordinator


@dataclass(frozen=True, kw_only=True)
class AffinityRouter:
    """What the coordinator needs to score a request.

    Attributes:
        predictor: a fitted token-id predictor (the plan's "token" table).
        placements: one ``ExpertPlacement`` per MoE layer.
        weight: share of the score given to affinity (``online_rank``), in [0, 1].
    """

    predictor: Any
    placements: Sequence[Any]
    weight: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"AffinityRouter.weight must be in [0, 1], got {self.weight}")
        if not self.placements:
            raise ValueError("AffinityRouter.placements is empty; the plan must hold expert placements")

    @property
    def ep_size(self) -> int:
        return int(self.placements[0].ep_size)

    @classmethod
    def from_plan(cls, plan_dir: str | Path, *, weight: float = 0.5) -> "AffinityRouter":
        """The plan's token table and placements (``specmoe plan`` writes both)."""
        from megatron_specmoe.schedule.placement import ExpertPlacement
        from megatron_specmoe.artifacts.plan_folder import load_plan
        from megatron_specmoe.predict.registry import predictor_from_state

        plan = load_plan(Path(plan_dir))
        if "token" not in plan.predictor_state:
            raise ValueError(
                f"request placement: the plan {plan_dir} has no 'token' predictor (it has "
                f"{sorted(plan.predictor_state)}); rerun `specmoe plan` on traces with token ids"
            )
        placements = plan.placements or [
            ExpertPlacement.contiguous(plan.header.num_experts, plan.header.ep_size)
        ] * plan.header.num_layers
        return cls(predictor=predictor_from_state("token", plan.predictor_state["token"]),
                   placements=list(placements), weight=weight)

    def rank_affinity(self, token_ids: Sequence[int], dp_ranks: Sequence[int]) -> np.ndarray:
        """float64 [N]: predicted local pairs of the request on each of the given DP ranks (EP
        rank ``d % EP`` for DP rank d)."""
        from megatron_specmoe.schedule.request_placement import request_affinity

        per_ep = request_affinity(self.predictor, [np.asarray(token_ids, dtype=np.int64)], self.placements)[0]
        return np.array([per_ep[d % self.ep_size] for d in dp_ranks], dtype=np.float64)


def _dp_rank_of(identity: bytes) -> int:
    text = identity.decode("utf-8", "replace") if isinstance(identity, bytes) else str(identity)
    head, _, tail = text.rpartition("-")
    if head != "mp-coord" or not tail.isdigit():
        raise ValueError(
            f"SpecMoECoordinator: engine identity {text!r} is not 'mp-coord-<dp rank>'; this Megatron "
            "version names its engines differently, so request placement cannot map them to EP ranks"
        )
    return int(tail)


def _base():
    return _coordinator_class()


class SpecMoECoordinator(_base()):
    """Megatron's ``DataParallelInferenceCoordinator`` that places requests by predicted expert
    affinity (module docstring). Without ``SPECMOE_REQUEST_PLAN`` in the environment it behaves
    exactly as Megatron's."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.specmoe_router = router_from_env()

    def compute_request_hashes(self, prompt):
        if getattr(self, "specmoe_router", None) is not None:
            tokens = self.tokenizer.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
            self.specmoe_prompt_tokens = tokens
        return super().compute_request_hashes(prompt)

    def get_best_data_parallel_rank(self, request_hashes):
        router: Optional[AffinityRouter] = getattr(self, "specmoe_router", None)
        # The prompt of the request being routed (kept for retries: the submit handler asks again,
        # after removing an unreachable engine, for the same request).
        tokens = getattr(self, "specmoe_prompt_tokens", None)
        if router is None or tokens is None or not self._identities_list:
            return super().get_best_data_parallel_rank(request_hashes)
        if request_hashes and getattr(self, "enable_prefix_caching", False) and hasattr(self, "_match_vector"):
            match, _ = self._match_vector(request_hashes)
            if np.any(np.asarray(match) > 0):  # a KV-cache hit: Megatron's prefix-aware choice
                return super().get_best_data_parallel_rank(request_hashes)
        from megatron_specmoe.schedule.request_placement import online_rank

        dp_ranks = [_dp_rank_of(identity) for identity in self._identities_list]
        affinity = router.rank_affinity(tokens, dp_ranks)
        best = online_rank(affinity, self._pending_counts, max_requests=int(self.max_requests), weight=router.weight)
        return self._identities_list[best]


def router_from_env() -> Optional[AffinityRouter]:
    """The AffinityRouter named by ``SPECMOE_REQUEST_PLAN`` / ``SPECMOE_REQUEST_WEIGHT``, or None."""
    plan_dir = os.environ.get(PLAN_ENV)
    if not plan_dir:
        return None
    raw = os.environ.get(WEIGHT_ENV, "0.5")
    try:
        weight = float(raw)
    except ValueError:
        raise ValueError(f"{WEIGHT_ENV}={raw!r} is not a number in [0, 1]") from None
    return AffinityRouter.from_plan(plan_dir, weight=weight)


def _patches() -> list[Patch]:
    from megatron.core.inference.engines import dynamic_engine

    return [Patch(owner=dynamic_engine, name="DataParallelInferenceCoordinator", replacement=SpecMoECoordinator,
                  why="the engine spawns SpecMoECoordinator, which places requests by expert affinity")]


def install_request_routing(plan_dir: str | Path, *, weight: float = 0.5) -> None:
    """Make Megatron's dynamic engine start ``SpecMoECoordinator`` with this plan (module
    docstring). Checks the plan here, in the caller's process, before anything is spawned.
    Idempotent; a second call with another plan replaces the environment variables."""
    AffinityRouter.from_plan(plan_dir, weight=weight)  # fail early, with the plan's own errors
    os.environ[PLAN_ENV] = str(Path(plan_dir).resolve())
    os.environ[WEIGHT_ENV] = repr(float(weight))
    apply_patches(_patches())


def uninstall_request_routing() -> None:
    """Undo ``install_request_routing`` (restores the engine's class, drops the variables)."""
    revert_patches(_patches())
    os.environ.pop(PLAN_ENV, None)
    os.environ.pop(WEIGHT_ENV, None)


def is_request_routing_installed() -> bool:
    from megatron.core.inference.engines import dynamic_engine

    return "DataParallelInferenceCoordinator" in patched_names(dynamic_engine)
