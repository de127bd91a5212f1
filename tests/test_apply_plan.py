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
    from megatron_specmoe.megatron.experts import load_seeded_banks, local_expert_state
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
        for m in models.values():
            banks = load_seeded_banks([s.layer for s in moe_sites(m)], shape.experts,
                                      ExpertPlacement.contiguous(8, 4), ep_rank, seed=11)
        gen = torch.Generator().manual_seed(3 + parallel_state.get_data_parallel_rank())
        tokens = torch.randint(0, shape.vocab, (2, 8), generator=gen)
        pos = torch.arange(8).unsqueeze(0).expand(2, -1)
        mask = torch.triu(torch.ones(1, 1, 8, 8, dtype=torch.bool), diagonal=1)
        with torch.no_grad():
            before = models["alltoall"](tokens, pos, mask)
        placements = [ExpertPlacement(physical_to_logical=t, ep_size=4) for t in TARGETS]
        out = {"refusals": _corrupted_moves_refused(models["alltoall"], placements, rank)}
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


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def _corrupted_moves_refused(model, placements, rank):
    """Two corruptions of the first layer's move, each on one rank only: (1) the bytes of the
    first expert tensor rank 2 receives are changed in flight; (2) the fingerprint rank 1 takes
    of a received expert is wrong. Each must be refused on every rank, naming the failure, and
    leave every weight of the model (routers included) exactly as it was. Returns, per
    corruption, (error message, whether the model is unchanged)."""
    import torch.distributed as dist

    from megatron_specmoe.comm import weight_move
    from megatron_specmoe.megatron.apply_plan import apply_placements
    from megatron_specmoe.megatron.patching import Patch, apply_patches, revert_patches

    send_recv = dist.batch_isend_irecv

    def corrupt_first_receive(ops):
        reqs = send_recv(ops)
        for req in reqs:
            req.wait()
        received = [op.tensor for op in ops if op.op is dist.irecv]
        if rank == 2 and received:
            received[0].add_(1.0)
        return []  # already completed (waiting twice on a gloo receive blocks)

    fingerprint = weight_move.fingerprint

    def bad_fingerprint(tensors):
        value = fingerprint(tensors)
        # Received buffers are plain tensors; the model's own experts are Parameters.
        if rank == 1 and not isinstance(tensors[0], torch.nn.Parameter):
            value = value + 1.0
        return value

    corruptions = [
        Patch(owner=dist, name="batch_isend_irecv", replacement=corrupt_first_receive, why="test: corrupt a transfer"),
        Patch(owner=weight_move, name="fingerprint", replacement=bad_fingerprint, why="test: a bad fingerprint"),
    ]
    out = []
    for patch in corruptions:
        before = _snapshot(model)
        applied = apply_patches([patch])
        try:
            apply_placements(model, placements, mode="router")
            message = ""
        except RuntimeError as err:
            message = str(err)
        finally:
            revert_patches(applied)
        after = _snapshot(model)
        out.append((message, before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)))
    return out


# Expert moves per rank (sends + receives + local copies), worked by hand from TARGETS with the
# contiguous start (slot p holds logical p; n = 2 slots per rank):
#   layer 0 (5,2,7,0,1,6,3,4): every slot changes and every expert leaves its rank, so each rank
#     receives 2 and sends 2: 4 on every rank;
#   layer 1 (1,0,3,2,6,7,4,5): ranks 0 and 1 swap their two experts in place (2 local copies);
#     ranks 2 and 3 exchange both experts (2 received + 2 sent = 4).
TRANSFERS = (4 + 2, 4 + 2, 4 + 4, 4 + 4)


def test_apply_placements_keeps_logits_and_places_experts():
    results = run_local(_worker, 4)
    for rank, out in enumerate(results):
        refusals = out.pop("refusals")
        # A corrupted transfer (on rank 2) and a bad fingerprint (on rank 1) are refused on every
        # rank before any rank writes a weight.
        for (message, unchanged), culprit in zip(refusals, (2, 1)):
            assert "MoE layer 1: expert move failed verification on 1 rank(s); no rank modified the layer" in message, (rank, message)
            assert ("arrived in slot" in message) == (rank == culprit), (rank, message)
            assert unchanged, rank
        for mode, (diff, exact, layers, transfers) in out.items():
            assert diff <= 1e-6, (rank, mode, diff)
            assert exact, (rank, mode)
            assert layers == 2 and transfers == TRANSFERS[rank], (rank, mode, transfers)


def test_plan_moves_by_hand():
    moves = plan_moves([0, 1, 2, 3], [1, 0, 2, 3])
    assert [(m.logical, m.src_slot, m.dst_slot) for m in moves] == [(1, 1, 0), (0, 0, 1)]
    assert plan_moves([0, 1], [0, 1]) == []
    with pytest.raises(ValueError, match="permutations of the same"):
        plan_moves([0, 1], [0, 0])


def test_plan_copies_by_hand():
    from megatron_specmoe.comm.weight_move import plan_copies

    # 2 ranks x 3 slots. Now: rank 0 holds 0, 1, (empty); rank 1 holds 2, 3, (empty).
    # Target: rank 0: 1, 0, replica 3; rank 1: 2, 3, replica 0. Expert 0's replica on rank 1 is
    # copied from rank 0 (its only holder); rank 0's slots swap locally.
    moves = plan_copies([0, 1, -1, 2, 3, -1], [1, 0, 3, 2, 3, 0], slots_per_rank=3)
    assert [(m.logical, m.src_slot, m.dst_slot) for m in moves] == [(1, 1, 0), (0, 0, 1), (3, 4, 2), (0, 0, 5)]
    # A holder on the destination's own rank is preferred to a lower slot elsewhere.
    moves = plan_copies([0, 1, -1, 2, 0, -1], [0, 1, 2, 2, 0, 0], slots_per_rank=3)
    assert [(m.logical, m.src_slot, m.dst_slot) for m in moves] == [(2, 3, 2), (0, 4, 5)]
    # A permutation gives plan_moves' moves.
    assert plan_copies([0, 1, 2, 3], [1, 0, 2, 3], slots_per_rank=2) == plan_moves([0, 1, 2, 3], [1, 0, 2, 3])
    with pytest.raises(ValueError, match=r"target experts \[4\] are in no current slot"):
        plan_copies([0, 1, -1, 2, 3, -1], [0, 1, 4, 2, 3, 0], slots_per_rank=3)
    with pytest.raises(ValueError, match="same length, a multiple of slots_per_rank=3"):
        plan_copies([0, 1, 2, 3], [0, 1, 2, 3], slots_per_rank=3)


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
