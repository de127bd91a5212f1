"""Launch counts and host synchronisations of the run-time plan (measure/launches.py): the counter
on hand-worked blocks, the guard, and the bound of 16 launches per MoE layer for the plan with
every run-time predictor (pregate, route, history, combined token + history) on the Triton path, run in Triton's interpreter
in a subprocess (skipped where triton is absent)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_specmoe.measure.launches import HostSyncError, HostSyncGuard, LaunchCounter
from megatron_specmoe.schedule.fast_assign import prices_plan

REPO = Path(__file__).resolve().parents[1]


def test_counter_sorts_kernels_views_and_host_syncs():
    x = torch.arange(12.0)
    with LaunchCounter() as counter:
        y = (x + 1).view(3, 4)  # add: a kernel; view: none
        y.sum(dim=0)
        float(y[0, 0])  # select: views; .item(): a host sync (a copy too)
    got = counter.result()
    assert got.by_op == {"aten::add": 1, "aten::sum": 1, "aten::_local_scalar_dense": 1}
    assert got.kernels == 3 and got.host_syncs == 1 and got.views == 3 and got.triton == 0


def test_guard_rejects_item_and_data_dependent_shapes():
    x = torch.tensor([0.0, 2.0])
    with pytest.raises(HostSyncError, match="_local_scalar_dense"):
        with HostSyncGuard():
            x.sum().item()
    with pytest.raises(HostSyncError, match="nonzero"):
        with HostSyncGuard():
            x.nonzero()


def test_torch_plan_and_predictors_need_no_host_sync():
    from megatron_specmoe.predict.pregate import rank_scores_from_logits, span_hosts
    from megatron_specmoe.predict.device import RankTable

    hosts = span_hosts(torch.arange(8) // 2, ep_base=0, tp=4)
    table = RankTable(table=torch.rand(11, 4), layer=0, ep_base=0, placement_key=())
    with HostSyncGuard():
        prices_plan(rank_scores_from_logits(torch.randn(100, 8), k=2, hosts=hosts), backend="torch")
        prices_plan(table.lookup(torch.tensor([-5, 0, 3, 10, 99])), backend="torch")


def test_route_lookup_maps_outside_ids_to_the_prior_row():
    from megatron_specmoe.predict.device import RankTable

    table = RankTable(table=torch.arange(12.0).view(6, 2), layer=0, ep_base=0, placement_key=())  # V = 5
    got = table.lookup(torch.tensor([-7, -1, 0, 4, 5, 123]))
    assert got[:, 0].tolist() == [10.0, 10.0, 0.0, 8.0, 10.0, 10.0]


def test_device_pregate_and_history_equal_the_reference_forms():
    from megatron_specmoe.predict.history_mlp import HistoryLayerScorer
    from megatron_specmoe.predict.pregate import (
        expert_rank_counts,
        rank_scores_from_experts,
        rank_scores_from_logits,
        span_hosts,
        topk_rank_scores,
    )

    gen = torch.Generator().manual_seed(0)
    rank_of = torch.tensor([3, 0, 1, 2, 0, 1, 2, 3])
    hosts = span_hosts(rank_of, ep_base=1, tp=2)  # experts outside ranks 1, 2 count nowhere
    logits = torch.randint(0, 3, (64, 8), generator=gen).float()  # many ties
    want = topk_rank_scores(logits, k=3, rank_of=rank_of, ep_base=1, tp=2)
    assert torch.equal(rank_scores_from_logits(logits, k=3, hosts=hosts), want)
    experts = torch.randint(0, 8, (64, 2), generator=gen)
    assert torch.equal(rank_scores_from_experts(experts, hosts=hosts),
                       expert_rank_counts(experts, rank_of=rank_of, ep_base=1, tp=2))
    scorer = HistoryLayerScorer(layer=2, num_experts=8, prior=torch.full((8,), 0.125),
                                w1=torch.randn(16, 5, generator=gen), b1=torch.randn(5, generator=gen),
                                w2=torch.randn(5, 8, generator=gen), b2=torch.randn(8, generator=gen))
    history = torch.randint(0, 8, (64, 2, 2), generator=gen)
    hosts_sum = torch.cat([span_hosts(rank_of, ep_base=0, tp=4), torch.ones(8, 1)], dim=1)
    got = scorer.rank_scores(history=history, hosts_sum=hosts_sum, offsets=(torch.arange(2) * 8).view(1, -1, 1),
                         floor=torch.tensor([0.0] * 4 + [1e-12]))
    torch.testing.assert_close(got, scorer.scores(history=history) @ span_hosts(rank_of, ep_base=0, tp=4))


@pytest.fixture(scope="module")
def interpreted_counts():
    """Counts of tools/bench_plan.py's run-time paths on the Triton path, in Triton's interpreter."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed in this Python (megatron-core 0.19's venv has it)")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    code = ("import json, sys; sys.path.insert(0, 'tools'); import bench_plan; "
            "print(json.dumps(bench_plan.count_paths([(1, 4), (64, 8), (1000, 64)], check_equal=True)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_plan_is_at_most_16_launches_per_layer_with_every_predictor(interpreted_counts):
    seen = set()
    for row in interpreted_counts:
        seen.add(row["predictor"])
        assert row["host_syncs"] == 0, row
        assert row["kernels"] <= 16, row
        assert row["equal_to_torch"] and row["scores_close"], row
    assert seen == {"assignment", "pregate", "pregate_sp", "route", "history", "combined"}
    assignment = [r for r in interpreted_counts if r["predictor"] == "assignment"]
    assert all(r["kernels"] == 7 and r["triton"] == 4 for r in assignment)  # 2 iterations: 3 + 2 * 2


def test_simulator_charges_the_counted_launches(interpreted_counts):
    """sim/plan_cost's launch constants are the counts measured here (largest over sizes)."""
    from megatron_specmoe.sim.plan_cost import DEFAULT_PLAN_KERNELS, PLAN_KERNELS

    for name, kernels in PLAN_KERNELS.items():
        measured = max(r["kernels"] for r in interpreted_counts if r["predictor"] == name)
        assert kernels == measured, (name, kernels, measured)
    assert DEFAULT_PLAN_KERNELS == max(r["kernels"] for r in interpreted_counts if r["predictor"] != "assignment")
