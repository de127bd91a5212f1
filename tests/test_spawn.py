"""``testing.spawn.run_local`` names what went wrong, promptly: a rank that dies without
reporting, a rank that reports and then exits badly, a timeout; and ``timeout_s=None`` waits
without a limit. Two gloo ranks each."""

import os
import time

import pytest
import torch
import torch.distributed as dist

from megatron_specmoe.testing.spawn import RankFailed, run_local


def _sum_then(rank, world, action):
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)  # the last collective: every rank gets here
    if rank == 1 and action == "die":
        os._exit(3)  # no result, no traceback
    if rank == 1 and action == "exit_after_report":
        import multiprocessing.util

        # Runs in the child's exit path after the result queue has been flushed (its feeder is
        # joined at exit priority -5), then ends the process with code 7.
        multiprocessing.util.Finalize(None, os._exit, args=(7,), exitpriority=-10)
    if rank == 0 and action == "hang":
        time.sleep(120)
    return float(t)


def test_results_by_rank_and_no_timeout():
    assert run_local(_sum_then, 2, "none", timeout_s=None) == [3.0, 3.0]


def test_a_rank_that_dies_without_reporting_is_named_promptly():
    start = time.monotonic()
    with pytest.raises(RankFailed, match=r"rank 1 exited with code 3 without reporting a result"):
        run_local(_sum_then, 2, "die", timeout_s=300)
    # Named within seconds of its death, not after the 300 s timeout.
    assert time.monotonic() - start < 60


def test_a_nonzero_exit_after_reporting_fails():
    with pytest.raises(RankFailed, match=r"rank 1 reported a result but exited with code 7"):
        run_local(_sum_then, 2, "exit_after_report", timeout_s=300)


def test_a_timeout_names_the_ranks_without_a_result():
    # Rank 0 hangs; rank 1 reports unless the loaded machine starts it too slowly for the timeout.
    with pytest.raises(RankFailed, match=r"timed out after 10 s; no result from rank\(s\) \[0(, 1)?\]"):
        run_local(_sum_then, 2, "hang", timeout_s=10)


def test_timeout_must_be_positive_or_none():
    with pytest.raises(ValueError, match=r"timeout_s must be > 0 or None \(no timeout\), got 0"):
        run_local(_sum_then, 2, "none", timeout_s=0)


def test_a_taken_port_is_retried_with_a_new_one(monkeypatch):
    import socket

    from megatron_specmoe.testing import spawn

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        ports = [held.getsockname()[1]]  # the first choice is taken by this test
        real = spawn.free_port

        def choose():
            return ports.pop() if ports else real()

        monkeypatch.setattr(spawn, "free_port", choose)
        assert run_local(_sum_then, 2, "none", timeout_s=300) == [3.0, 3.0]
        assert ports == []
