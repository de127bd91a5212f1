"""Start W local processes with a torch.distributed process group each, run a function, collect
its results. Used by the tests and by ``specmoe demo`` (gloo on the CPU, no torchrun needed).

The port is picked free by the OS (never hard-coded); every process tears its group down
explicitly; an exception on any rank is re-raised in the parent with that rank's traceback.

Failures are named, never waited out: the parent polls its children while it waits for results,
so a rank that dies without reporting (killed, ``os._exit``, a crash in native code) is reported
by rank and exit code within about a second, not after the whole timeout; a timeout names the
ranks that never reported; and a rank that reported but then exited with a non-zero code (or
did not exit at all) fails the run too. A child ends with multiprocessing's exit function and
``os._exit``, skipping the interpreter's finalisation (whose native destructors can stall for
minutes on a loaded machine).

The free port can be taken by another process between the choice and the rendezvous (machines
shared by many test runs): when rank 0 cannot listen on it (EADDRINUSE) the whole start is retried
with a new port, up to ``_PORT_TRIES`` times; nothing of ``fn`` has run by then.
"""

from __future__ import annotations

import os
import queue as queue_module
import signal
import socket
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["free_port", "run_local", "RankFailed"]

_POLL_S = 0.2  # how often the parent looks at its children while waiting for results
_DRAIN_S = 2.0  # grace for a result still in the pipe when its rank has already exited
_EXIT_S = 30.0  # how long a rank that reported may take to exit
_PORT_TRIES = 3  # starts with a fresh port when the chosen one was taken before the rendezvous


class RankFailed(RuntimeError):
    """A rank raised, died, hung or exited badly; the message names it (and carries its
    traceback when it raised)."""


@dataclass(frozen=True, kw_only=True)
class _Job:
    fn: Callable[..., Any]
    args: tuple
    world_size: int
    port: int
    backend: str
    threads: int


def free_port() -> int:
    """A TCP port that the OS reports free on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, job: _Job, queue) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(job.port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(job.world_size),
    )
    torch.set_num_threads(job.threads)
    try:
        try:
            dist.init_process_group(job.backend, rank=rank, world_size=job.world_size)
        except Exception as exc:  # noqa: BLE001 - a taken port is retried by the parent
            if "EADDRINUSE" in str(exc):
                queue.put((rank, _PORT_TAKEN, traceback.format_exc()))
                return
            raise
        try:
            result = job.fn(rank, job.world_size, *job.args)
        finally:
            dist.destroy_process_group()
        queue.put((rank, True, result))
    except BaseException:  # noqa: BLE001 - reported to the parent with its traceback
        queue.put((rank, False, traceback.format_exc()))
    _exit_now(0)


def _exit_now(code: int) -> None:
    """End the child the way multiprocessing does, minus the interpreter's own finalisation:
    multiprocessing's exit function flushes the result queue and runs its finalizers (a finalizer
    may still end the process with another code), then ``os._exit``. Under load, the native
    destructors of torch / gloo at interpreter shutdown were seen to take 15-120 s after the
    result was reported (no Python frame, no thread left), which failed runs on ``_EXIT_S``."""
    import multiprocessing.util
    import sys

    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    multiprocessing.util._exit_function()
    os._exit(code)


class _PortTaken(Exception):
    """The rendezvous port was taken before rank 0 could listen on it."""


_PORT_TAKEN = "port taken"


def _exit_text(code: Optional[int]) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"code {code} (signal {signal.Signals(-code).name})"
        except ValueError:
            return f"code {code}"
    return f"code {code}"


def _dead_without_result(procs, results: dict) -> list[int]:
    return [r for r, p in enumerate(procs) if r not in results and p.exitcode is not None]


def _collect(procs, queue, world_size: int, timeout_s: Optional[float]) -> tuple[dict, list[str]]:
    """Results by rank, and failure texts (empty when every rank reported a result)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    results: dict[int, Any] = {}
    dead_since: Optional[float] = None
    while len(results) < world_size:
        try:
            rank, ok, payload = queue.get(timeout=_POLL_S)
        except queue_module.Empty:
            now = time.monotonic()
            dead = _dead_without_result(procs, results)
            if dead:
                # Its result may still be in the pipe (the feeder flushes before the exit); give
                # it a moment, then name it.
                dead_since = now if dead_since is None else dead_since
                if now - dead_since >= _DRAIN_S:
                    return results, [
                        f"rank {r} exited with {_exit_text(procs[r].exitcode)} without reporting a result"
                        for r in dead
                    ]
            if deadline is not None and now >= deadline:
                missing = [r for r in range(world_size) if r not in results]
                return results, [f"timed out after {timeout_s:g} s; no result from rank(s) {missing}"]
            continue
        if ok == _PORT_TAKEN:
            raise _PortTaken(payload)
        if not ok:
            return results, [f"--- rank {rank} ---\n{payload}"]
        results[rank] = payload
    return results, []


def run_local(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    threads: int = 1,
    timeout_s: Optional[float] = 600.0,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; return results by rank.

    ``fn`` must be importable (a module-level function) and its result picklable.
    ``timeout_s``: seconds to wait for every result; ``None`` waits as long as the ranks live.

    Raises:
        RankFailed: a rank raised (its traceback), died without a result (its rank and exit
            code, within about ``_DRAIN_S`` s), the timeout passed (the ranks without a result),
            or a rank that reported exited with a non-zero code or did not exit.
    """
    if timeout_s is not None and not timeout_s > 0:
        raise ValueError(f"run_local: timeout_s must be > 0 or None (no timeout), got {timeout_s!r}")
    for attempt in range(_PORT_TRIES):
        try:
            return _run_once(fn, world_size, args, backend=backend, threads=threads, timeout_s=timeout_s)
        except _PortTaken as taken:
            if attempt + 1 == _PORT_TRIES:
                raise RankFailed(f"the rendezvous port was taken {_PORT_TRIES} times in a row:\n{taken}") from None
    raise AssertionError("unreachable")


def _run_once(fn, world_size: int, args: tuple, *, backend: str, threads: int, timeout_s: Optional[float]) -> list[Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    job = _Job(fn=fn, args=args, world_size=world_size, port=free_port(), backend=backend, threads=threads)
    procs = [ctx.Process(target=_worker, args=(r, job, queue), daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    failures: list[str] = []
    try:
        results, failures = _collect(procs, queue, world_size, timeout_s)
    except _PortTaken:
        failures = ["port taken"]  # end every rank now; the caller starts again
        raise
    finally:
        # After a failure the other ranks may wait in a collective forever: end them.
        for p in procs:
            p.join(timeout=_EXIT_S if not failures else 0.5)
            if p.is_alive():
                p.kill()
                p.join()
                if not failures:
                    failures.append(f"rank {procs.index(p)} reported a result but did not exit within {_EXIT_S:g} s")
        queue.close()
    if not failures:
        failures = [f"rank {r} reported a result but exited with {_exit_text(p.exitcode)}"
                    for r, p in enumerate(procs) if p.exitcode != 0]
    if failures:
        raise RankFailed("a rank failed:\n" + "\n".join(failures))
    return [results[r] for r in range(world_size)]
