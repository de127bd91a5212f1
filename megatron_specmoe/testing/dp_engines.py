"""Megatron's data-parallel inference coordinator, run live on loopback with stand-in engines.

Glossary
    coordinator  a ``DataParallelInferenceCoordinator`` (Megatron's, or ``SpecMoECoordinator``)
                 started exactly as core 0.19's dynamic engine starts it: a ``spawn`` process whose
                 target is the class's ``entrypoint``, with the engine's keyword arguments; it
                 sends its ZMQ address through a pipe and waits for ``data_parallel_size``
                 engines to register.
    stand-in     the smallest engine the coordinator accepts, speaking the dynamic engine's
    engine       protocol (``dynamic_engine.start_listening_to_data_parallel_coordinator`` and
                 ``schedule_requests``): a ZMQ DEALER socket with identity ``mp-coord-{dp rank}``
                 that registers with an empty message, takes msgpack ``SUBMIT_REQUEST`` payloads
                 ``[header, request id, prompt, sampling params]``, obeys ``PAUSE`` / ``UNPAUSE`` /
                 ``STOP``, and answers ``[ENGINE_REPLY, [finished request dict, ...]]``. Its
                 "model" is ``stand_in_generation`` (a fixed function of the prompt), so every
                 engine answers a request alike and placement cannot change an output. Two ways to
                 go away, as a real engine does: ``remove`` (what the dynamic engine's shutdown
                 does: send ``DISCONNECT`` and drop the requests it holds) and dying (the test
                 kills the process: no message at all).
    client       Megatron's own ``InferenceClient`` (in the caller's process).

Loopback only (127.0.0.1); every process stops by itself at its deadline. Header values are
passed in as ints (``header_values()``), so the engines import neither torch nor megatron.
"""

from __future__ import annotations

import multiprocessing
import time
from dataclasses import dataclass
from typing import Any

__all__ = [
    "IdTokenizer",
    "EngineSpec",
    "header_values",
    "stand_in_generation",
    "run_stand_in_engine",
    "spawn_coordinator",
    "spawn_engines",
    "stop_all",
]

HOST = "127.0.0.1"


class IdTokenizer:
    """What the coordinator needs of a tokenizer: prompts here are token-id lists already;
    ``detokenize`` writes the ids as text (the coordinator adds it to every reply)."""

    eod = None

    def tokenize(self, text: str) -> list[int]:
        return [int(word) for word in text.split()]

    def detokenize(self, tokens: list[int]) -> str:
        return " ".join(str(t) for t in tokens)


def header_values() -> dict[str, int]:
    """The wire values of the headers the stand-in engine speaks, from Megatron's ``Headers``."""
    from megatron.core.inference.headers import Headers

    names = ("SUBMIT_REQUEST", "ENGINE_REPLY", "PAUSE", "UNPAUSE", "STOP", "DISCONNECT")
    return {name: int(getattr(Headers, name).value) for name in names}


def stand_in_generation(prompt: list[int], num_tokens: int) -> list[int]:
    """The stand-in model: ``num_tokens`` ids, each a fixed function of the prompt and the
    previous id (engine-independent, so outputs compare across placements)."""
    token = sum(int(t) * (i + 1) for i, t in enumerate(prompt)) % 997
    out = []
    for _ in range(num_tokens):
        token = (token * 31 + 7) % 997
        out.append(token)
    return out


@dataclass(frozen=True, kw_only=True)
class EngineSpec:
    """One stand-in engine.

    Attributes:
        dp_rank: its DP rank (identity ``mp-coord-{dp_rank}``).
        address: the coordinator's ZMQ address.
        headers: ``header_values()``.
        num_tokens: tokens generated per request.
        deadline_s: the engine stops by itself this many seconds after it starts.
    """

    dp_rank: int
    address: str
    headers: dict
    num_tokens: int = 4
    deadline_s: float = 60.0


def run_stand_in_engine(spec: EngineSpec, remove: Any) -> None:
    """The engine's loop (a process target). ``remove``: a multiprocessing Event; when set, the
    engine leaves as the dynamic engine's shutdown does (DISCONNECT, held requests dropped)."""
    import msgpack
    import zmq

    h = spec.headers
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, f"mp-coord-{spec.dp_rank}".encode())
    sock.setsockopt(zmq.LINGER, 1000)
    sock.connect(spec.address)
    sock.send(b"")  # register
    held: list = []
    paused = False
    deadline = time.monotonic() + spec.deadline_s
    try:
        while time.monotonic() < deadline:
            if remove.is_set():
                sock.send(msgpack.packb([h["DISCONNECT"]], use_bin_type=True))
                return
            if sock.poll(20):
                message = msgpack.unpackb(sock.recv(), raw=False)
                header = message[0]
                if header == h["SUBMIT_REQUEST"]:
                    _, request_id, prompt, sampling_params = message
                    held.append((request_id, list(prompt), sampling_params))
                elif header == h["PAUSE"]:
                    paused = True
                elif header == h["UNPAUSE"]:
                    paused = False
                elif header == h["STOP"]:
                    return
                continue
            if held and not paused:
                finished = [{"request_id": rid, "prompt_tokens": prompt, "sampling_params": params,
                             "generated_tokens": stand_in_generation(prompt, spec.num_tokens),
                             "served_by": spec.dp_rank} for rid, prompt, params in held]
                held.clear()
                sock.send(msgpack.packb([h["ENGINE_REPLY"], finished], use_bin_type=True))
    finally:
        sock.close()
        context.term()


def spawn_coordinator(coordinator_cls: type, *, data_parallel_size: int, max_requests: int,
                      timeout_s: float = 60.0):
    """Start ``coordinator_cls.entrypoint`` as core 0.19's dynamic engine does (spawn context,
    its keyword arguments; prefix caching off). Returns (process, ready event, ZMQ address)."""
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    ready = context.Event()
    process = context.Process(
        target=coordinator_cls.entrypoint,
        kwargs={"pipe_connection": child, "ready_event": ready, "data_parallel_size": data_parallel_size,
                "tokenizer": IdTokenizer(), "max_requests": max_requests, "inference_coordinator_port": None,
                "deterministic_mode": False, "block_size_tokens": None, "enable_prefix_caching": False,
                "hostname": HOST},
        daemon=True,
    )
    process.start()
    if not parent.poll(timeout_s):
        process.terminate()
        raise RuntimeError(f"the coordinator ({coordinator_cls.__name__}) sent no address within {timeout_s} s")
    address = parent.recv()
    parent.close()
    return process, ready, address


def spawn_engines(address: str, dp_ranks, *, num_tokens: int = 4, deadline_s: float = 60.0):
    """Start one stand-in engine per DP rank. Returns [(process, remove event)] in that order."""
    context = multiprocessing.get_context("spawn")
    headers = header_values()
    out = []
    for d in dp_ranks:
        remove = context.Event()
        spec = EngineSpec(dp_rank=d, address=address, headers=headers, num_tokens=num_tokens,
                          deadline_s=deadline_s)
        process = context.Process(target=run_stand_in_engine, args=(spec, remove), daemon=True)
        process.start()
        out.append((process, remove))
    return out


def stop_all(processes, timeout_s: float = 5.0) -> None:
    """Join each process (started by this module), terminating those still alive after ``timeout_s``."""
    for process in processes:
        process.join(timeout_s)
        if process.is_alive():
            process.terminate()
            process.join(timeout_s)
