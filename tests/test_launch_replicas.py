"""A plan with redundant experts through the launcher's run-time hook (megatron_lm/runtime.py), on 4
gloo CPU ranks, and the launcher's early refusals (megatron_lm/checks.check_replicas).

As in test_megatron_runtime.py, stand-ins for Megatron-LM's ``get_model`` (it builds the plain
specmoe model) and ``load_checkpoint`` (it loads a saved plain state dict, strict) are wrapped by
the hook, so the path runs without megatron.training (which needs Python >= 3.12 and core 0.19).
The script's order is Megatron-LM's: get_model, then load_checkpoint. After each, every MoE layer
must have E + R slots, every slot the fingerprint of the expert the plan puts there, and the model
the alltoall model's logits.
"""

from __future__ import annotations

import argparse
import sys
import types
import warnings

import pytest
import torch

from megatron_specmoe.artifacts.plan_folder import make_plan, save_plan
from megatron_specmoe.schedule.placement import ExpertPlacement
from megatron_specmoe.schedule.replicas import ReplicatedPlacement, replicas_to_arrays
from megatron_specmoe.testing.spawn import run_local

TARGETS = [(5, 2, 7, 0, 1, 6, 3, 4), (1, 0, 3, 2, 6, 7, 4, 5)]
EXTRA = [((7,), (1,), (3,), (5,)), ((6,), (4,), (1,), (0,))]  # R = 4 per layer (one slot per rank)
B, S = 2, 8


def _replicas(extra_per_layer, loads=(0.0, 1.0, 2.0, 3.0)):
    return [ReplicatedPlacement(base=ExpertPlacement(physical_to_logical=TARGETS[i % 2], ep_size=4), extra=x,
                                planned_load=loads, policy="load") for i, x in enumerate(extra_per_layer)]


def _save_replica_plan(folder, extra_per_layer, hidden_size=16):
    reps = _replicas(extra_per_layer)
    save_plan(make_plan(num_layers=len(reps), num_experts=8, topk=2, ep_size=4, hidden_size=hidden_size,
                        placements=[r.base for r in reps], arrays=replicas_to_arrays(reps),
                        notes={"redundant_experts": reps[0].redundant, "replica_policy": "load"}), folder)
    return reps


def _args(**kw):
    base = dict(moe_token_dispatcher_type="specmoe", specmoe_plan=None, specmoe_record_routes=None,
                specmoe_record_every=0, specmoe_stats=None, padded_vocab_size=None)
    base.update(kw)
    return argparse.Namespace(**base)


def _slots_ok(model, reps, banks, ep_rank):
    from megatron_specmoe.comm.weight_move import fingerprint
    from megatron_specmoe.megatron.experts import local_expert_state
    from megatron_specmoe.megatron.model_tools import moe_sites

    ok = True
    for li, site in enumerate(moe_sites(model)):
        s = reps[li].slots_per_rank
        ok &= site.layer.num_local_experts == s and site.dispatcher.replicas == reps[li]
        for i in range(s):
            want = banks[li][reps[li].physical_to_logical[ep_rank * s + i]]
            got = local_expert_state(site.layer, i)
            ok &= bool(torch.allclose(fingerprint([got[k] for k in sorted(want)]),
                                      fingerprint([want[k] for k in sorted(want)])))
    return bool(ok)


def _worker(rank, world, plan_dir):
    warnings.filterwarnings("ignore")
    from megatron.core import parallel_state

    from megatron_specmoe.megatron import cpu_support, parallel
    from megatron_specmoe.megatron.build import MoEShape, build_gpt_model, make_config
    from megatron_specmoe.megatron.experts import load_seeded_banks
    from megatron_specmoe.megatron.model_tools import moe_sites
    from megatron_specmoe.megatron_lm import runtime as R
    from megatron_specmoe.megatron_lm import runtime_hook as RH

    cpu_support.enable()
    parallel.initialize(parallel.ParallelLayout(ep=4))
    try:
        shape = MoEShape(layers=2)
        ep_rank = parallel_state.get_expert_model_parallel_rank()
        ref = build_gpt_model(make_config(shape, dispatcher="alltoall", ep=4), shape, specmoe=False).eval()
        banks = load_seeded_banks([s.layer for s in moe_sites(ref)], 8, ExpertPlacement.contiguous(8, 4),
                                  ep_rank, seed=11)
        checkpoint = {k: v.clone() for k, v in ref.state_dict().items() if isinstance(v, torch.Tensor)}

        mod = types.ModuleType("specmoe_test_replica_script")

        def get_model(model_provider):
            return [model_provider()]

        def load_checkpoint(ddp_model, optimizer, opt_param_scheduler, strict=True):
            for chunk in R.unwrap_chunks(ddp_model):
                chunk.load_state_dict(checkpoint, strict=strict)  # strict: the plain layers' keys
            return 0, 0

        mod.get_model, mod.load_checkpoint = get_model, load_checkpoint
        sys.modules[mod.__name__] = mod  # the hook patches loaded modules (as a script's are)
        args = _args(specmoe_plan=plan_dir)
        targets = [RH.HookTarget(module=mod, name="get_model", model_from="result"),
                   RH.HookTarget(module=mod, name="load_checkpoint", model_from="first_arg")]
        out = {"patched": RH.install_runtime_hook(targets, get_args=lambda: args)}
        try:
            model = mod.get_model(lambda: build_gpt_model(make_config(shape, dispatcher="specmoe", ep=4), shape,
                                                           specmoe=True))
            spec = model[0]
            from megatron_specmoe.artifacts.plan_folder import load_plan
            from megatron_specmoe.schedule.replicas import replicas_from_arrays

            plan = load_plan(plan_dir)
            reps = replicas_from_arrays(plan.placements, plan.arrays, "load")
            out["after_get_model"] = [s.layer.num_local_experts for s in moe_sites(spec)]
            mod.load_checkpoint(model, None, None)
            spec.eval()
            out["slots_ok"] = _slots_ok(spec, reps, banks, ep_rank)
            gen = torch.Generator().manual_seed(3 + rank)
            pos = torch.arange(S).unsqueeze(0).expand(B, -1)
            mask = torch.triu(torch.ones(1, 1, S, S, dtype=torch.bool), diagonal=1)
            tokens = torch.randint(0, shape.vocab, (B, S), generator=gen)
            with torch.no_grad():
                out["diff"] = float((spec(tokens, pos, mask) - ref(tokens, pos, mask)).abs().max())
            runtime = spec.__dict__["_specmoe_runtime"]
            out["redundant"] = runtime.last_apply.redundant
            # By hand, no load in between: nothing moves, the same twins stay.
            twins = [s.layer for s in moe_sites(spec)]
            out["transfers_again"] = R.setup_specmoe_runtime(model, args).last_apply.transfers
            out["same_twins"] = all(a is s.layer for a, s in zip(twins, moe_sites(spec)))
            # A second load: plain layers swapped back for it (a strict load of the plain keys), then
            # the same twins filled again.
            mod.load_checkpoint(model, None, None)
            out["same_twins_after_reload"] = all(a is s.layer for a, s in zip(twins, moe_sites(spec)))
            out["slots_ok_reload"] = _slots_ok(spec, reps, banks, ep_rank)
            with torch.no_grad():
                out["diff_reload"] = float((spec(tokens, pos, mask) - ref(tokens, pos, mask)).abs().max())
            # The twins share the plain layers' router and base experts: one copy in memory.
            plain = twins[0].__dict__["_specmoe_plain"]
            out["shared"] = (twins[0].router is plain.router
                             and twins[0].experts.local_experts[1] is plain.experts.local_experts[1])
            # Training mode is refused by the twins (before the layer runs: no collective starts).
            twins[0].train()
            try:
                twins[0](torch.zeros(S, B, shape.hidden))
                out["train_refused"] = ""
            except RuntimeError as exc:
                out["train_refused"] = str(exc)
            twins[0].eval()
            runtime.close()
        finally:
            RH.uninstall_runtime_hook(targets)
        return out
    finally:
        parallel.destroy()


def test_launcher_builds_replicated_layers_and_reloads(tmp_path):
    _save_replica_plan(tmp_path / "plan", EXTRA)
    results = run_local(_worker, 4, str(tmp_path / "plan"))
    for rank, out in enumerate(results):
        assert out["patched"] == ["specmoe_test_replica_script.get_model",
                                  "specmoe_test_replica_script.load_checkpoint"], rank
        assert out["after_get_model"] == [3, 3], rank  # n + r = 2 + 1 slots per rank
        assert out["slots_ok"] and out["slots_ok_reload"], rank
        assert out["diff"] <= 1e-6 and out["diff_reload"] <= 1e-6, (rank, out)
        assert out["transfers_again"] == 0 and out["same_twins"] and out["same_twins_after_reload"], rank
        assert out["shared"], rank
        assert "replicated experts" in out["train_refused"] and "model.eval()" in out["train_refused"], rank


# --------------------------------------------------------------------------- the early refusals


def test_check_replicas_refuses_what_the_twins_cannot_serve(tmp_path):
    from megatron_specmoe.artifacts.plan_folder import load_plan
    from megatron_specmoe.megatron_lm.checks import SpecMoEArgumentError, check_replicas

    _save_replica_plan(tmp_path / "plan", EXTRA)
    plan = load_plan(tmp_path / "plan")
    assert check_replicas(argparse.Namespace(), "requests", plan, tmp_path / "plan") == 4
    with pytest.raises(SpecMoEArgumentError, match=r"--specmoe-plan .*plan \(made with --redundant-experts 4\): "
                                                   r"token shuffling \(TP > 1\).*--tensor-model-parallel-size 1"):
        check_replicas(argparse.Namespace(), "shuffle", plan, tmp_path / "plan")
    with pytest.raises(SpecMoEArgumentError, match="--moe-grouped-gemm .*drop --moe-grouped-gemm"):
        check_replicas(argparse.Namespace(moe_grouped_gemm=True), "requests", plan, tmp_path / "plan")
    save_plan(make_plan(num_layers=2, num_experts=8, topk=2, ep_size=4), tmp_path / "plain")
    assert check_replicas(argparse.Namespace(), "shuffle", load_plan(tmp_path / "plain"), tmp_path / "plain") == 0


def test_real_parser_refuses_replicas_with_shuffling(monkeypatch, tmp_path):
    """Megatron-LM's own parser and validate step (core 0.19; skips where megatron.training is absent)."""
    from tests.test_megatron_args import M, specmoe_args

    _save_replica_plan(tmp_path / "plan", EXTRA * 2, hidden_size=64)
    args = specmoe_args(monkeypatch, "--specmoe-plan", str(tmp_path / "plan"), "--specmoe-predictor", "pregate")
    with pytest.raises(M.SpecMoEArgumentError, match="token shuffling .*does not serve redundant experts"):
        M.validate_specmoe_args(args)
    args = specmoe_args(monkeypatch, "--specmoe-plan", str(tmp_path / "plan"), "--moe-grouped-gemm",
                        layout=["--tensor-model-parallel-size", "1", "--expert-model-parallel-size", "4"])
    with pytest.raises(M.SpecMoEArgumentError, match="--redundant-experts 4\): --moe-grouped-gemm"):
        M.validate_specmoe_args(args)


def test_grouped_gemm_experts_are_refused_by_name():
    from megatron_specmoe.megatron.replicas import replicate_layers

    class FakeLayer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.token_dispatcher, self.layer_number = object(), 3
            self.experts = torch.nn.Linear(2, 2)  # stands for TEGroupedMLP: no local_experts

    root = torch.nn.Sequential(FakeLayer())
    with pytest.raises(ValueError, match="MoE layer 3: experts are Linear; .*Drop --moe-grouped-gemm"):
        replicate_layers(root, 4)
