"""Redundant experts at run time, the single-process parts: the dispatcher's logical -> physical
column map (by hand), its refusals, and the config helper. The 4-rank lossless check against
alltoall is in test_lossless.py (``replica_extra`` cases)."""

import pytest
import torch

from megatron_specmoe.schedule.placement import ExpertPlacement
from megatron_specmoe.schedule.replicas import ReplicatedPlacement

PERMUTED = (5, 2, 7, 0, 1, 6, 3, 4)
REP = ReplicatedPlacement(base=ExpertPlacement(physical_to_logical=PERMUTED, ep_size=4),
                          extra=((7,), (1,), (3,), (5,)), planned_load=(0.0, 1.0, 2.0, 3.0), policy="load")


def _dispatcher(ep_rank: int, num_experts: int = 12):
    from megatron_specmoe.megatron.dispatcher import SpecMoETokenDispatcher

    d = SpecMoETokenDispatcher.__new__(SpecMoETokenDispatcher)  # only the state set_replicas reads
    d.num_experts, d.ep_size, d._ep_rank, d.ep_group = num_experts, 4, ep_rank, None
    d.replicas, d._replica_slots, d._columns = None, None, None
    d.set_placement = lambda placement: None
    return d


def test_logical_columns_go_to_the_route_tables_slots():
    # Rank 3 holds 3, 4 (slots 9, 10) and a replica of 5 (slot 11). Its token picking experts 5 and 7:
    # 5 stays local (slot 11); 7 lives on rank 1 (slot 3) and rank 0 (slot 2, planned load 0): slot 2.
    d = _dispatcher(3)
    d.set_replicas(REP)
    routing = torch.zeros(1, 8, dtype=torch.bool)
    routing[0, [5, 7]] = True
    probs = torch.zeros(1, 8)
    probs[0, 5], probs[0, 7] = 0.75, 0.25
    phys_map, phys_probs = d._to_physical(routing, probs)
    assert phys_map.shape == (1, 12) and phys_map[0].nonzero().view(-1).tolist() == [2, 11]
    assert phys_probs[0, 11] == 0.75 and phys_probs[0, 2] == 0.25 and phys_probs.sum() == 1.0
    # Every logical column lands in a distinct slot holding that expert.
    slots = d._replica_slots.tolist()
    assert len(set(slots)) == 8 and all(REP.physical_to_logical[p] == e for e, p in enumerate(slots))
    d.set_replicas(None)
    assert d._replica_slots is None


def test_refusals_name_the_fix():
    with pytest.raises(ValueError, match=r"E=8 experts \+ R=4 replicas on EP 4.*num_moe_experts=8.*replicated_config"):
        _dispatcher(0, num_experts=8).set_replicas(REP)
    d = _dispatcher(0)
    d.set_replicas(REP)
    with pytest.raises(ValueError, match="router emitted 12 experts.*num_moe_experts = E"):
        d._to_physical(torch.zeros(2, 12, dtype=torch.bool), torch.zeros(2, 12))


def test_replicated_config_adds_the_slots():
    from megatron_specmoe.megatron.build import MoEShape, make_config
    from megatron_specmoe.megatron.replicas import replicated_config

    cfg = make_config(MoEShape(), dispatcher="specmoe", ep=4)
    assert replicated_config(cfg, 4).num_moe_experts == cfg.num_moe_experts + 4
    with pytest.raises(ValueError, match="--redundant-experts 3 .* divisible by the EP size 4"):
        replicated_config(cfg, 3)


def test_column_map_is_four_kernels_and_no_host_sync():
    from megatron_specmoe.measure.launches import HostSyncGuard, LaunchCounter

    d = _dispatcher(1)
    d.set_replicas(REP)
    routing = torch.rand(16, 8) > 0.7
    probs = torch.rand(16, 8) * routing
    d._to_physical(routing, probs)  # the table moves to the inputs' device once, on the first forward
    with LaunchCounter() as counter, HostSyncGuard():
        d._to_physical(routing, probs)
    count = counter.result()
    # Two zero-filled [T, E + R] buffers and two index_copy, whatever T: no host sync.
    assert count.kernels == 4 and count.host_syncs == 0, count.by_op
