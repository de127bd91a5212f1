"""The specmoe dispatcher learns its receive sizes by all-to-all (``count_exchange``).

- ``comm.counts.exchange_expert_counts`` on 4 gloo ranks, hand-worked: each rank receives the
  counts every rank holds for its own experts, in Megatron's [TP, EP, n] layout (EP = 4; and
  EP = 2 x expert-TP = 2), and n counts per peer (EP times fewer than Megatron's all-gather);
  the refusals by pattern;
- an MoE layer (EP = 4 with 1 and 2 local experts, a permuted placement; EP = 2 x ETP = 2) with
  ``"alltoall"`` equals Megatron's own alltoall layer bit for bit, leaves the dispatcher's splits
  and per-expert counts equal to Megatron's, and replaces Megatron's all-gather by one
  all-to-all (c10d ops counted as a GPU would launch them); ``"allgather"`` issues Megatron's.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron_specmoe.testing.spawn import run_local

A2A, AG = "c10d::alltoall_base_", "c10d::_allgather_base_"


def _counts_worker(rank, world):
    import torch.distributed as dist

    from megatron_specmoe.comm.counts import exchange_expert_counts

    # Rank r holds 100 * r + e rows for expert e (E = 8).
    counts = torch.arange(8, dtype=torch.long) + 100 * rank
    out = {"ep4": exchange_expert_counts(counts, ep_size=4, tp_size=1, group=dist.group.WORLD).tolist(),
           "ep2_tp2": exchange_expert_counts(counts, ep_size=2, tp_size=2, group=dist.group.WORLD).tolist()}
    for kwargs in ({"ep_size": 3, "tp_size": 1}, {"ep_size": 2, "tp_size": 1}):
        try:
            exchange_expert_counts(counts, group=dist.group.WORLD, **kwargs)
        except ValueError as err:
            out.setdefault("errors", []).append(str(err))
    return out


@pytest.fixture(scope="module")
def exchanged():
    return run_local(_counts_worker, 4, timeout_s=120)


def test_each_rank_receives_every_ranks_counts_for_its_own_experts(exchanged):
    for rank, r in enumerate(exchanged):
        # EP = 4, n = 2: from source rank s, experts 2 * rank and 2 * rank + 1: 100 s + 2 rank + i.
        assert r["ep4"] == [[[100 * s + 2 * rank + i for i in range(2)] for s in range(4)]]
        # EP = 2 x TP = 2: group rank g = e * 2 + t; rank's EP index e = rank // 2, n = 4. Entry
        # [t, e', i] comes from group rank e' * 2 + t.
        e = rank // 2
        assert r["ep2_tp2"] == [[[100 * (e2 * 2 + t) + 4 * e + i for i in range(4)] for e2 in range(2)]
                                for t in range(2)]


def test_exchange_refuses_sizes_that_do_not_match(exchanged):
    errors = exchanged[0]["errors"]
    assert len(errors) == 2
    assert "counts must be int64 [E] with E divisible by EP=3" in errors[0]
    assert "the group has 4 ranks, EP * TP = 2; pass the dispatcher's tp_ep group" in errors[1]


def test_set_count_exchange_refuses_an_unknown_mode():
    from megatron_specmoe.megatron.dispatcher import SpecMoETokenDispatcher

    fake = SimpleNamespace()
    SpecMoETokenDispatcher.set_count_exchange(fake, "allgather")
    assert fake.count_exchange == "allgather"
    with pytest.raises(ValueError, match=r"set_count_exchange: mode must be one of \['alltoall', 'allgather'\], "
                                         r"got 'ring'"):
        SpecMoETokenDispatcher.set_count_exchange(fake, "ring")


# --------------------------------------------------------------------------- MoE layers, 4 gloo ranks

# (layout (tp, ep, etp), experts, placement)
CASES = (
    ((1, 4, 1), 8, None),
    ((1, 4, 1), 4, None),
    ((1, 4, 1), 8, (7, 6, 5, 4, 3, 2, 1, 0)),
    ((1, 2, 2), 8, None),
)


def _split_state(d):
    def plain(v):  # tensors and numpy arrays (Megatron moves some splits to numpy)
        return v.tolist() if hasattr(v, "tolist") else v

    return {k: plain(getattr(d, k)) for k in ("input_splits", "output_splits", "output_splits_tp",
                                                "num_global_tokens_per_local_expert", "tokens_per_expert")
            if getattr(d, k, None) is not None}


def _layer_worker(rank, world, case):
    import warnings

    from megatron_specmoe.measure.launches import LaunchCounter
    from megatron_specmoe.megatron import cpu_support, parallel
    from megatron_specmoe.megatron.build import MoEShape, build_moe_layer, make_config
    from megatron_specmoe.schedule.placement import ExpertPlacement
    from megatron_specmoe.testing.lossless import arrange_layers

    (tp, ep, etp), experts, placement = case
    warnings.filterwarnings("ignore")
    cpu_support.enable()
    parallel.initialize(parallel.ParallelLayout(tp=tp, ep=ep, etp=etp), seed=3)
    try:
        shape = MoEShape(hidden=16, ffn=8, experts=experts, topk=2, seq=6)
        ref = build_moe_layer(make_config(shape, dispatcher="alltoall", ep=ep, etp=etp), shape, specmoe=False)
        spec = build_moe_layer(make_config(shape, dispatcher="specmoe", ep=ep, etp=etp), shape, specmoe=True)
        places = [ExpertPlacement.contiguous(experts, ep),
                  ExpertPlacement.contiguous(experts, ep) if placement is None
                  else ExpertPlacement(physical_to_logical=placement, ep_size=ep)]
        spec.token_dispatcher.set_placement(places[1])
        spec.token_dispatcher.set_fuse_probs("off")  # Megatron's dispatch calls: only the counts differ
        arrange_layers([ref, spec], places, seed=5, layer_index=0)
        ref.eval()
        spec.eval()
        x = torch.randn(6 + rank, 1, 16, generator=torch.Generator().manual_seed(rank))
        outs, ops, state = {}, {}, {}
        for name, layer, mode in (("megatron", ref, None), ("allgather", spec, "allgather"),
                                  ("alltoall", spec, "alltoall")):
            if mode is not None:
                layer.token_dispatcher.set_count_exchange(mode)
            with torch.no_grad(), LaunchCounter() as counter:
                outs[name] = layer(x)[0]
            by_op = counter.result().by_op
            ops[name] = {"a2a": by_op.get(A2A, 0), "ag": by_op.get(AG, 0)}
            state[name] = _split_state(layer.token_dispatcher)
        return dict(same_as_megatron=torch.equal(outs["alltoall"], outs["megatron"]),
                    same_as_allgather=torch.equal(outs["alltoall"], outs["allgather"]),
                    ops=ops, state=state)
    finally:
        parallel.destroy()


@pytest.mark.parametrize("case", CASES, ids=["ep4", "ep4-one-local", "ep4-placement", "ep2-etp2"])
def test_alltoall_count_exchange_is_megatrons_dispatch_with_no_all_gather(case):
    results = run_local(_layer_worker, 4, case, timeout_s=300)
    etp = case[0][2]
    for r in results:
        assert r["same_as_megatron"] and r["same_as_allgather"], (case, r)
        # The dispatcher's splits and counts: those of Megatron's exchange (and Megatron's own
        # dispatcher's, where the placement does not move experts).
        assert r["state"]["alltoall"] == r["state"]["allgather"], r["state"]
        assert r["state"]["alltoall"]["output_splits"] and r["state"]["alltoall"]["input_splits"]
        if case[2] is None:
            assert r["state"]["alltoall"] == r["state"]["megatron"], r["state"]
        megatron, allgather, alltoall = r["ops"]["megatron"], r["ops"]["allgather"], r["ops"]["alltoall"]
        assert megatron["ag"] >= 1 and allgather == megatron, r["ops"]
        # The count all-gather becomes one all-to-all; expert-TP all-gathers (ETP > 1) remain.
        assert alltoall == {"a2a": megatron["a2a"] + 1, "ag": megatron["ag"] - 1}, r["ops"]
        if etp == 1:
            assert alltoall["ag"] == 0
