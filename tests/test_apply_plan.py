"""Applying a placement to a live model: experts move between EP ranks, outputs do not change.

Expert weights come from a seeded bank, distinct per logical expert, so a misplaced expert would
both change the logits and fail the slot-by-slot identity check.
"""

import warnings

import pytest
import torch

from megatron_specmoe.testing.spawn import run_local
from megatron_specmoe.comm.weight_move import plan_moves
from megatron_specmoe.schedule.placement import ExpertPlacement

TARGETS = [(5, 2, 7, 0, 1, 6, 3, 4), (1, 0, 3, 2, 6, 7, 4, 5)]


def _worker(rank, world):
    warnings.filterwarnings("ignore")
    from megatron.core import parallel_state

    from megatron_specmoe.megatron import cpu_support
    from megatron_specmoe.megatron import parallel
    from megatron_specmoe.megatron.apply_plan import apply_placements
    from megatron_specmoe.megatron.build import MoEShape, build_gpt_model, make_config
    from megatron_specmoe.megatron.experts import load_bank, local_expert_state, make_expert_bank
    from megatron_specmoe.megatron.model_tools import moe_sites

    cpu_support.enable()
    parallel.initialize(parallel.ParallelLayout(ep=4))
    try:
        shape = MoEShape(layers=2)
        ep_rank = parallel_state.get_expert_model_parallel_rank()
        models = {}
        for d in ("alltoall", "specmoe"):
            models[d] = build_gpt_model(make_config(shape, dispatcher=d, ep=4), shape, specmoe=d == "specmoe").eval()
        models["specmoe"].load_state_dict(models["alltoall"].state_dict())
        banks = []
        for i, site in enumerate(moe_sites(models["alltoall"])):
            bank = make_expert_bank(site.layer, shape.experts, seed=11 + i)
            banks.append(bank)
            for m in models.values():
                load_bank(moe_sites(m)[i].layer, bank, ExpertPlacement.contiguous(8, 4), ep_rank)
        gen = torch.Generator().manual_seed(3 + parallel_state.get_data_parallel_rank())
        tokens = torch.randint(0, shape.vocab, (2, 8), generator=gen)
        pos = torch.arange(8).unsqueeze(0).expand(2, -1)
        mask = torch.triu(torch.ones(1, 1, 8, 8, dtype=torch.bool), diagonal=1)
        with torch.no_grad():
            before = models["alltoall"](tokens, pos, mask)
        placements = [ExpertPlacement(physical_to_logical=t, ep_size=4) for t in TARGETS]
        out = {}
        for d, mode in (("alltoall", "router"), ("specmoe", "dispatcher")):
            report = apply_placements(models[d], placements, mode=mode)
            with torch.no_grad():
                after = models[d](tokens, pos, mask)
            # Slot by slot: local expert i of this rank is now logical TARGETS[layer][ep_rank*2+i].
            exact = True
            for li, site in enumerate(moe_sites(models[d])):
                for i in range(2):
                    want = banks[li][TARGETS[li][ep_rank * 2 + i]]
                    got = local_expert_state(site.layer, i)
                    exact &= all(torch.equal(got[k], want[k]) for k in want)
            out[mode] = (float((after - before).abs().max()), exact, report.layers, report.transfers)
        with pytest.raises(ValueError, match="expert_model_parallel_size=4"):
            apply_placements(models["alltoall"], [ExpertPlacement.contiguous(8, 2)] * 2)
        with pytest.raises(ValueError, match="the plan has 1 placements but the model has 2 MoE layers"):
            apply_placements(models["alltoall"], placements[:1])
        return out
    finally:
        parallel.destroy()


def test_apply_placements_keeps_logits_and_places_experts():
    results = run_local(_worker, 4)
    for rank, out in enumerate(results):
        for mode, (diff, exact, layers, transfers) in out.items():
            assert diff <= 1e-6, (rank, mode, diff)
            assert exact, (rank, mode)
            assert layers == 2 and transfers > 0


def test_plan_moves_by_hand():
    moves = plan_moves([0, 1, 2, 3], [1, 0, 2, 3])
    assert [(m.logical, m.src_slot, m.dst_slot) for m in moves] == [(1, 1, 0), (0, 0, 1)]
    assert plan_moves([0, 1], [0, 1]) == []
    with pytest.raises(ValueError, match="permutations of the same"):
        plan_moves([0, 1], [0, 0])


GROUP_KEPT = (5, 4, 7, 6, 1, 0, 3, 2)  # router groups {0..3}, {4..7} trade blocks, shuffled inside
GROUP_MIXED = (5, 2, 7, 0, 1, 6, 3, 4)


def _grouped_worker(rank, world):
    """Group-limited routing (2 groups, 1 per token) with a nonzero expert bias: router mode applies a
    placement that keeps the groups intact and refuses one that mixes them; dispatcher mode keeps the
    function for the mixed one too."""
    warnings.filterwarnings("ignore")
    from megatron.core import parallel_state

    from megatron_specmoe.megatron import cpu_support, parallel
    from megatron_specmoe.megatron.apply_plan import apply_placements
    from megatron_specmoe.megatron.build import MoEShape, build_gpt_model, make_config
    from megatron_specmoe.megatron.model_tools import moe_sites

    cpu_support.enable()
    parallel.initialize(parallel.ParallelLayout(ep=4))
    try:
        shape = MoEShape(layers=2)
        extra = dict(moe_router_num_groups=2, moe_router_group_topk=1, moe_router_score_function="sigmoid",
                     moe_router_enable_expert_bias=True)
        models = {d: build_gpt_model(make_config(shape, dispatcher=d, ep=4, **extra), shape,
                                     specmoe=d == "specmoe").eval() for d in ("alltoall", "specmoe")}
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for site in moe_sites(models["alltoall"]):
                site.layer.router.expert_bias.copy_(torch.randn(8, generator=gen))
        models["specmoe"].load_state_dict(models["alltoall"].state_dict())
        gen = torch.Generator().manual_seed(3 + parallel_state.get_data_parallel_rank())
        tokens = torch.randint(0, shape.vocab, (2, 8), generator=gen)
        pos = torch.arange(8).unsqueeze(0).expand(2, -1)
        mask = torch.triu(torch.ones(1, 1, 8, 8, dtype=torch.bool), diagonal=1)
        with torch.no_grad():
            before = models["alltoall"](tokens, pos, mask)
        out = {}
        mixed = [ExpertPlacement(physical_to_logical=GROUP_MIXED, ep_size=4)] * 2
        try:
            apply_placements(models["alltoall"], mixed, mode="router")
            out["refused"] = ""
        except ValueError as exc:
            out["refused"] = str(exc)
        kept = [ExpertPlacement(physical_to_logical=GROUP_KEPT, ep_size=4)] * 2
        for d, mode, placements in (("alltoall", "router", kept), ("specmoe", "dispatcher", mixed)):
            apply_placements(models[d], placements, mode=mode)
            with torch.no_grad():
                out[mode] = float((models[d](tokens, pos, mask) - before).abs().max())
        return out
    finally:
        parallel.destroy()


def test_router_groups_in_router_and_dispatcher_modes():
    for out in run_local(_grouped_worker, 4):
        assert "router mode would make physical slots 0..3 router group 0, but they hold experts of " \
               "router groups [0, 1]" in out["refused"]
        assert out["router"] <= 1e-6 and out["dispatcher"] <= 1e-6, out
