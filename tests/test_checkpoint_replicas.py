"""Checkpoint of a model serving redundant experts (megatron/checkpoint.py, megatron/expert_slots.py), 4 gloo ranks.

A GPT-MoE (EP = 4, 2 MoE layers, experts from a seeded bank) is served with plan A (a permuted base
placement plus one replica per rank) and saved. The file must be key for key what the same model
saved without a plan holds (every logical expert once), and loading it into a plain alltoall model,
into a model with plan A and into one with plan B (another base placement, two replicas per rank)
must give the reference logits.
"""

from __future__ import annotations

import warnings

import torch

from megatron_specmoe.schedule.placement import ExpertPlacement
from megatron_specmoe.schedule.replicas import ReplicatedPlacement
from megatron_specmoe.testing.spawn import run_local

B, S = 2, 8
PLAN_A = ReplicatedPlacement(base=ExpertPlacement(physical_to_logical=(5, 2, 7, 0, 1, 6, 3, 4), ep_size=4),
                             extra=((7,), (1,), (3,), (5,)), planned_load=(0.0, 1.0, 2.0, 3.0), policy="load")
PLAN_B = ReplicatedPlacement(base=ExpertPlacement(physical_to_logical=(1, 0, 3, 2, 6, 7, 4, 5), ep_size=4),
                             extra=((6, 2), (4, 0), (1, 3), (7, 2)), planned_load=(3.0, 2.0, 1.0, 0.0),
                             policy="coactivation")


def _worker(rank, world, folder):
    warnings.filterwarnings("ignore")
    from megatron.core import parallel_state

    from megatron_specmoe.megatron import checkpoint as C
    from megatron_specmoe.megatron import cpu_support, parallel
    from megatron_specmoe.megatron.apply_plan import apply_replicas
    from megatron_specmoe.megatron.build import MoEShape
    from megatron_specmoe.megatron.experts import load_seeded_banks
    from megatron_specmoe.megatron.model_tools import moe_sites
    from megatron_specmoe.megatron.replicas import replicate_layers

    cpu_support.enable()
    parallel.initialize(parallel.ParallelLayout(ep=4))
    try:
        ep_rank = parallel_state.get_expert_model_parallel_rank()
        card = C.ModelCard(directory=f"{folder}/replicated", shape=MoEShape(layers=2), config={},
                           gpt=dict(C._GPT_DEFAULTS), weights_file="", weights_dtype="float32", weights_sha256="")
        ref = C.build_model(card, dispatcher="alltoall").eval()
        load_seeded_banks([s.layer for s in moe_sites(ref)], 8, ExpertPlacement.contiguous(8, 4), ep_rank, seed=21)
        gen = torch.Generator().manual_seed(7 + rank)
        tokens = torch.randint(0, card.shape.vocab, (B, S), generator=gen)
        pos = torch.arange(S).unsqueeze(0).expand(B, -1)
        mask = torch.triu(torch.ones(1, 1, S, S, dtype=torch.bool), diagonal=1)

        def logits(model):
            with torch.no_grad():
                return model(tokens, pos, mask)

        want = logits(ref)
        # Serve plan A (twins filled by apply_replicas), save; save the plain model too.
        spec = C.build_model(card, dispatcher="specmoe").eval()
        spec.load_state_dict(ref.state_dict())
        replicate_layers(spec, PLAN_A.redundant)
        apply_replicas(spec, [PLAN_A, PLAN_A])
        out = {"served": float((logits(spec) - want).abs().max())}
        saved = C.save_checkpoint(spec, card, dtype="float32")
        import dataclasses

        C.save_checkpoint(ref, dataclasses.replace(card, directory=f"{folder}/plain"), dtype="float32")
        out["card_same_on_every_rank"] = saved.weights_sha256
        for name, kwargs in (("plain", dict(dispatcher="alltoall")),
                             ("plan_a", dict(dispatcher="specmoe", replicas=[PLAN_A, PLAN_A])),
                             ("plan_b", dict(dispatcher="specmoe", replicas=[PLAN_B, PLAN_B]))):
            model = C.load_model(f"{folder}/replicated", **kwargs)
            out[name] = float((logits(model) - want).abs().max())
            out[f"{name}_slots"] = [s.layer.num_local_experts for s in moe_sites(model)]
        return out
    finally:
        parallel.destroy()


def test_replicated_model_saves_each_expert_once_and_loads_under_any_plan(tmp_path):
    from megatron_specmoe.megatron import checkpoint as C

    results = run_local(_worker, 4, str(tmp_path))
    shas = {out["card_same_on_every_rank"] for out in results}
    assert len(shas) == 1
    for rank, out in enumerate(results):
        for name in ("served", "plain", "plan_a", "plan_b"):
            assert out[name] <= 1e-6, (rank, name, out)
        assert (out["plain_slots"], out["plan_a_slots"], out["plan_b_slots"]) == ([2, 2], [3, 3], [4, 4]), rank
    replicated = C.read_weights(C.read_card(tmp_path / "replicated"))
    plain = C.read_weights(C.read_card(tmp_path / "plain"))
    assert sorted(replicated) == sorted(plain)
    experts = [k for k in plain if ".local_experts." in k]
    assert len({k.split(".local_experts.")[1].split(".")[0] for k in experts}) == 8  # E = 8 once each, no slots 8..11
    assert all(torch.equal(replicated[k], plain[k]) for k in plain)
