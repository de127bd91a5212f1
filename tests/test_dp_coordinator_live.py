"""Request placement inside Megatron's serving stack, live: core 0.19's DP inference coordinator
(Megatron's and ``SpecMoECoordinator``) in its own spawned process, four stand-in engine processes
(``testing/dp_engines.py``) and Megatron's ``InferenceClient``, over ZMQ on loopback.

Engines are paused (Megatron's PAUSE, broadcast by the coordinator) while the stream is submitted,
so no reply changes the coordinator's load counts mid-stream and every choice can be replayed
exactly: ``SpecMoECoordinator`` with ``AffinityRouter`` + ``online_rank``, Megatron's coordinator
with least-loaded routing (lowest index on ties). Every process stops by itself (deadlines)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

pytest.importorskip("megatron.core.inference.data_parallel_inference_coordinator.coordinator")
pytest.importorskip("zmq")
pytest.importorskip("msgpack")

from megatron_specmoe.testing import dp_engines as E  # noqa: E402
from tests.test_dp_coordinator import plan_dir  # noqa: E402,F401  (fixture: E=4, EP=2, 7 -> expert 3, 5 -> 0)

DP = 4
MAX_REQUESTS = 8
# Token 7 predicts expert 3 (EP rank 1: DP ranks 1, 3), token 5 expert 0 (EP rank 0: DP ranks 0, 2).
STREAM = [[7, 7, 7], [7, 7], [5, 5], [7, 5, 7], [7, 7, 7, 7], [5], [7], [5, 5, 5], [7, 7, 5], [7]]


class _Cluster:
    """A coordinator of ``coordinator_cls`` and DP stand-in engines; ``stream`` sends one request
    stream through them; leaving the ``with`` stops every process."""

    def __init__(self, coordinator_cls):
        self.coordinator, ready, self.address = E.spawn_coordinator(
            coordinator_cls, data_parallel_size=DP, max_requests=MAX_REQUESTS)
        self.engines = E.spawn_engines(self.address, range(DP), deadline_s=90.0)
        assert ready.wait(60), "the coordinator did not see its engines register"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for _, remove in self.engines:
            remove.set()
        E.stop_all([p for p, _ in self.engines])
        self.coordinator.terminate()
        E.stop_all([self.coordinator])

    def stream(self, prompts, *, during=None, tail=()):
        """Pause the engines, submit ``prompts``, call ``during(engines)`` (engines going away),
        submit ``tail``, unpause; every reply (dict, or None if none came in 30 s) in submission
        order."""
        from megatron.core.inference.inference_client import InferenceClient
        from megatron.core.inference.sampling_params import SamplingParams

        async def run():
            client = InferenceClient(self.address)
            client.start()
            try:
                client.pause_engines()
                futures = [client.add_request(p, SamplingParams(num_tokens_to_generate=4)) for p in prompts]
                await asyncio.sleep(0.3)  # the stream has reached the engines
                if during is not None:
                    during(self.engines)
                futures += [client.add_request(p, SamplingParams(num_tokens_to_generate=4)) for p in tail]
                await asyncio.sleep(0.2)
                client.unpause_engines()
                done, _ = await asyncio.wait(futures, timeout=30)
                return [f.result() if f in done else None for f in futures]
            finally:
                client.listener_task.cancel()
                client.socket.close(linger=0)
                client.context.term()

        return asyncio.run(run())


def _replay_affinity(router, prompts, ranks=range(DP)):
    from megatron_specmoe.schedule.request_placement import online_rank

    ranks = list(ranks)
    pending = np.zeros(len(ranks), dtype=np.int32)
    chosen = []
    for p in prompts:
        best = online_rank(router.rank_affinity(p, ranks), pending, max_requests=MAX_REQUESTS, weight=router.weight)
        pending[best] += 1
        chosen.append(ranks[best])
    return chosen


def _replay_least_loaded(prompts):
    pending = np.zeros(DP, dtype=np.int32)
    chosen = []
    for _ in prompts:
        best = int(np.argmin(pending))
        pending[best] += 1
        chosen.append(best)
    return chosen


def _check_outputs(replies, prompts):
    assert all(r is not None for r in replies), f"{sum(r is None for r in replies)} request(s) lost"
    for reply, prompt in zip(replies, prompts):
        assert reply["prompt_tokens"] == prompt
        assert reply["generated_tokens"] == E.stand_in_generation(prompt, 4)
        assert reply["generated_text"] == " ".join(map(str, reply["generated_tokens"]))  # the coordinator's


def _engines_go_away(engines):
    _, remove = engines[3]
    remove.set()  # engine 3 leaves as the dynamic engine's shutdown does: DISCONNECT, requests dropped
    process, _ = engines[1]
    process.kill()  # engine 1 dies: no message at all
    process.join(10)
    engines[3][0].join(10)
    time.sleep(1.0)  # the coordinator's ZMQ sees the dead peer's connection close


def test_placement_live_against_megatrons_routing_and_engines_that_go_away(plan_dir, monkeypatch):  # noqa: F811
    from megatron.core.inference.data_parallel_inference_coordinator.coordinator import (
        DataParallelInferenceCoordinator,
    )
    from megatron.core.inference.engines import dynamic_engine

    from megatron_specmoe.megatron_lm import dp_coordinator as dpc

    # Megatron's own coordinator: least-loaded routing.
    with _Cluster(DataParallelInferenceCoordinator) as cluster:
        megatron = cluster.stream(STREAM)
    _check_outputs(megatron, STREAM)
    assert [r["served_by"] for r in megatron] == _replay_least_loaded(STREAM)

    # What the launcher installs for request placement: the engine spawns whatever
    # dynamic_engine.DataParallelInferenceCoordinator names, and the spawned process reads the plan
    # from the environment it inherits.
    monkeypatch.delenv(dpc.PLAN_ENV, raising=False)
    dpc.install_request_routing(plan_dir, weight=0.9)
    try:
        with _Cluster(dynamic_engine.DataParallelInferenceCoordinator) as cluster:
            ours = cluster.stream(STREAM)
            # The same stream again (every earlier request answered, so the load counts are back at
            # zero), while engine 3 is removed and engine 1 dies with requests in flight. The tail
            # request predicts EP rank 1, whose only DP rank left is the dead engine 1: the send
            # fails (EHOSTUNREACH), Megatron's handler removes engine 1 and asks again.
            tail = [[7, 7, 7]]
            again = cluster.stream(STREAM, during=_engines_go_away, tail=tail)
    finally:
        dpc.uninstall_request_routing()
    _check_outputs(ours, STREAM)
    router = dpc.AffinityRouter.from_plan(plan_dir, weight=0.9)
    held = _replay_affinity(router, STREAM)
    served = [r["served_by"] for r in ours]
    assert served == held
    # Each prompt whose tokens agree on one EP rank landed on a DP rank of that EP rank.
    for prompt, d in zip(STREAM, served):
        if set(prompt) == {7}:
            assert d % 2 == 1
        elif set(prompt) == {5}:
            assert d % 2 == 0
    # Placement changes no output: the same replies as Megatron's routing gave.
    assert [r["generated_tokens"] for r in ours] == [r["generated_tokens"] for r in megatron]

    # Nothing lost: every request, the ones engines 1 and 3 held included, answered once, alike.
    _check_outputs(again, STREAM + tail)
    served = [r["served_by"] for r in again]
    assert set(served) <= {0, 2}
    moved = [i for i, d in enumerate(held) if d in (1, 3)]
    assert moved and all(served[i] in (0, 2) for i in moved)
    kept = [i for i, d in enumerate(held) if d in (0, 2)]
    assert [served[i] for i in kept] == [held[i] for i in kept]  # the others stayed put
