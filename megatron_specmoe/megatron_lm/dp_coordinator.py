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

Engines that go away: Megatron's coordinator forgets the requests a removed engine held (its
DISCONNECT handler and the EHOSTUNREACH path only drop the engine); ``SpecMoECoordinator`` sends
them again to the best remaining engine (class docstring). Tested live, with Megatron's client,
this coordinator in its spawned process and stand-in engines on loopback
(``tests/test_dp_coordinator_live.py``; 7 of 11 requests are lost without the re-send).

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
    affinity (module docstring) and loses no request when an engine goes away (below). Without
    ``SPECMOE_REQUEST_PLAN`` in the environment it places requests exactly as Megatron's.

    Engines that go away. Megatron's coordinator removes an engine when it sends DISCONNECT (what
    the dynamic engine's shutdown does, after cancelling the requests it holds) or when a send to
    it fails (EHOSTUNREACH: the process died), and forgets the requests that engine held: their
    clients never hear back. This one keeps the payload of every request it sent until the
    engine's ENGINE_REPLY for it arrives (``specmoe_in_flight``: request id -> (identity, payload));
    when an engine is removed, its unanswered requests are sent again to the best remaining
    engine, chosen as for a new request. With no engine left they wait (``specmoe_orphans``) for
    the next engine that registers."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.specmoe_router = router_from_env()
        self.specmoe_in_flight: dict[int, tuple[bytes, bytes]] = {}
        self.specmoe_orphans: list[bytes] = []
        reply = self._handlers[_headers().ENGINE_REPLY]

        def handle_engine_reply(coordinator, sender_identity, payload):
            for finished in payload[1]:
                coordinator.specmoe_in_flight.pop(finished["request_id"], None)
            return reply(coordinator, sender_identity, payload)

        self._handlers[_headers().ENGINE_REPLY] = handle_engine_reply

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

    # ---- no request lost ----------------------------------------------------------------------
    def _send_to_engine(self, identity, payload):
        sent = super()._send_to_engine(identity, payload)
        if sent:
            request_id = _submitted_request_id(payload)
            if request_id is not None:
                self.specmoe_in_flight[request_id] = (identity, payload)
        return sent

    def _remove_engine(self, identity):
        orphans = [rid for rid, (held_by, _) in self.specmoe_in_flight.items() if held_by == identity]
        super()._remove_engine(identity)
        for rid in orphans:
            _, payload = self.specmoe_in_flight.pop(rid)
            self.request_id_to_rank.pop(rid, None)  # its pending count left with the engine
            self.specmoe_orphans.append(payload)
        self._dispatch_orphans()

    def _handle_rank_registration(self, sender_identity):
        super()._handle_rank_registration(sender_identity)
        self._dispatch_orphans()

    def _dispatch_orphans(self) -> None:
        """Send the waiting requests to the best engines left (each send may remove another
        engine, whose requests join the queue); stops when the queue is empty or no engine is left."""
        import msgpack

        # The submit handler may be retrying a new request (a failed send removed an engine and
        # brought us here): its prompt must be the one routed when we return.
        routing = self.__dict__.get("specmoe_prompt_tokens")
        try:
            self._dispatch_waiting(msgpack)
        finally:
            self.specmoe_prompt_tokens = routing

    def _dispatch_waiting(self, msgpack) -> None:
        while self.specmoe_orphans and self._identities_list:
            payload = self.specmoe_orphans.pop(0)
            _, request_id, prompt, _ = msgpack.unpackb(payload, raw=False)
            hashes = self.compute_request_hashes(prompt)
            identity = self.get_best_data_parallel_rank(hashes)
            if not self._send_to_engine(identity, payload):
                self.specmoe_orphans.append(payload)  # that engine is gone too: try the next one
                continue
            self.request_id_to_rank[request_id] = identity
            self._pending_counts[self.identity_to_rank_index[identity]] += 1


def _headers():
    from megatron.core.inference.headers import Headers

    return Headers


def _submitted_request_id(payload: bytes) -> Optional[int]:
    """The request id of a SUBMIT_REQUEST engine payload (msgpack ``[header, id, prompt,
    sampling_params]``), or None for any other message."""
    import msgpack

    message = msgpack.unpackb(payload, raw=False)
    if message and message[0] == _headers().SUBMIT_REQUEST.value and len(message) == 4:
        return int(message[1])
    return None


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
