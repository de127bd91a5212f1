"""Start W local processes with a torch.distributed process group each, run a function, collect
its results. Used by the tests and by ``specmoe demo`` (gloo on the CPU, no torchrun needed).

The port is picked free by the OS (never hard-coded); every process tears its group down
explicitly; an exception on any rank is re-raised in the parent with that rank's traceback.
"""

from __future__ import annotations

import os
import socket
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["free_port", "run_local", "RankFailed"]


class RankFailed(RuntimeError):
    """A rank raised; the message carries its traceback."""


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
        dist.init_process_group(job.backend, rank=rank, world_size=job.world_size)
        try:
            result = job.fn(rank, job.world_size, *job.args)
        finally:
            dist.destroy_process_group()
        queue.put((rank, True, result))
    except BaseException:  # noqa: BLE001 - reported to the parent with its traceback
        queue.put((rank, False, traceback.format_exc()))


def run_local(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    threads: int = 1,
    timeout_s: float = 600.0,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; return results by rank.

    ``fn`` must be importable (a module-level function) and its result picklable.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue() if timeout_s is None else ctx.Queue()
    job = _Job(fn=fn, args=args, world_size=world_size, port=free_port(), backend=backend, threads=threads)
    procs = [ctx.Process(target=_worker, args=(r, job, queue), daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    failures: list[str] = []
    try:
        for _ in range(world_size):
            rank, ok, payload = queue.get(timeout=timeout_s)
            if ok:
                results[rank] = payload
            else:
                failures.append(f"--- rank {rank} ---\n{payload}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if not failures else 0.5)
            if p.is_alive():
                p.kill()
                p.join()
    if failures:
        raise RankFailed("a rank failed:\n" + "\n".join(failures))
    return [results[r] for r in range(world_size)]
