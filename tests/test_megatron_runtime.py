"""The run-time half of the --specmoe-* flags (megatron_lm/runtime.py) on 4 gloo CPU ranks.

A stand-in ``load_checkpoint`` (it loads a saved state dict into the unwrapped model) lives in a
throw-away module and is imported by name into a second one, as Megatron-LM's scripts do. The hook
wraps both; after the "checkpoint load" the specmoe model must compute the alltoall model's logits
with the plan's placement in effect (expert weights checked slot by slot against a seeded bank),
and the recorded routes / stats must agree with each other and with the placement.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import warnings

import numpy as np
import pytest
import torch

from megatron_specmoe.testing.spawn import run_local
from megatron_specmoe.schedule.placement import ExpertPlacement
from megatron_specmoe.artifacts.plan_folder import make_plan, save_plan

TARGETS = [(5, 2, 7, 0, 1, 6, 3, 4), (1, 0, 3, 2, 6, 7, 4, 5)]
B, S = 2, 8


def _args(**kw):
    base = dict(moe_token_dispatcher_type="specmoe", specmoe_plan=None, specmoe_record_routes=None,
                specmoe_record_every=0, specmoe_stats=None, padded_vocab_size=None)
    base.update(kw)
    return argparse.Namespace(**base)


class _Wrapper(torch.nn.Module):
    """Stands for Megatron's DDP / Float16Module: the model is ``.module``."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *a, **kw):
        return self.module(*a, **kw)


def _worker(rank, world, plan_dir, bad_plan_dir, out_dir):
    warnings.filterwarnings("ignore")
    from megatron.core import parallel_state

    from megatron_specmoe.megatron import cpu_support
    from megatron_specmoe.megatron import parallel
    from megatron_specmoe.megatron_lm import runtime as R
    from megatron_specmoe.megatron_lm import runtime_hook as RH
    from megatron_specmoe.megatron.build import MoEShape, build_gpt_model, make_config
    from megatron_specmoe.megatron.experts import load_seeded_banks, local_expert_state
    from megatron_specmoe.megatron.model_tools import moe_sites

    cpu_support.enable()
    parallel.initialize(parallel.ParallelLayout(ep=4))
    try:
        shape = MoEShape(layers=2)
        ep_rank = parallel_state.get_expert_model_parallel_rank()
        ref = build_gpt_model(make_config(shape, dispatcher="alltoall", ep=4), shape, specmoe=False).eval()
        spec = build_gpt_model(make_config(shape, dispatcher="specmoe", ep=4), shape, specmoe=True).eval()
        banks = load_seeded_banks([s.layer for s in moe_sites(ref)], shape.experts,
                                  ExpertPlacement.contiguous(8, 4), ep_rank, seed=11)
        checkpoint = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in ref.state_dict().items()}

        # The stand-in checkpoint loader, and a "script" module that imported it by name.
        ckpt_mod = types.ModuleType("specmoe_test_checkpointing")

        def load_checkpoint(ddp_model, optimizer, opt_param_scheduler, strict=True):
            for chunk in R.unwrap_chunks(ddp_model):
                chunk.load_state_dict(checkpoint, strict=strict)
            return 0, 0

        ckpt_mod.load_checkpoint = load_checkpoint
        user_mod = types.ModuleType("specmoe_test_script")
        user_mod.load_checkpoint = load_checkpoint
        sys.modules[ckpt_mod.__name__], sys.modules[user_mod.__name__] = ckpt_mod, user_mod
        target = RH.HookTarget(module=ckpt_mod, name="load_checkpoint", model_from="first_arg")
        args = _args(specmoe_plan=plan_dir, specmoe_record_routes=f"{out_dir}/routes",
                     specmoe_record_every=1, specmoe_stats=f"{out_dir}/stats-{{rank}}.jsonl")
        out = {}
        names = RH.install_runtime_hook([target], get_args=lambda: args)
        wrapped = user_mod.load_checkpoint
        out["patched"] = names
        out["idempotent"] = (RH.install_runtime_hook([target], get_args=lambda: args) == names
                             and user_mod.load_checkpoint is wrapped
                             and ckpt_mod.load_checkpoint is wrapped
                             and RH.is_runtime_hook_installed([target]))

        model = [_Wrapper(spec)]
        assert user_mod.load_checkpoint(model, None, None) == (0, 0)
        runtime = spec.__dict__["_specmoe_runtime"]
        gen = torch.Generator().manual_seed(3 + rank)
        pos = torch.arange(S).unsqueeze(0).expand(B, -1)
        mask = torch.triu(torch.ones(1, 1, S, S, dtype=torch.bool), diagonal=1)
        tokens, diffs = [], []
        for _ in range(2):
            t = torch.randint(0, shape.vocab, (B, S), generator=gen)
            tokens.append(t)
            with torch.no_grad():
                diffs.append(float((model[0](t, pos, mask) - ref(t, pos, mask)).abs().max()))
        out["diffs"] = diffs
        out["tokens"] = torch.cat([t.reshape(-1) for t in tokens]).tolist()
        out["placements"] = [tuple(s.dispatcher.placement.physical_to_logical) for s in moe_sites(spec)]
        exact = True
        for li, site in enumerate(moe_sites(spec)):
            for i in range(2):
                want = banks[li][TARGETS[li][ep_rank * 2 + i]]
                got = local_expert_state(site.layer, i)
                exact &= all(torch.equal(got[k], want[k]) for k in want)
        out["exact"] = exact
        out["parts_before_close"] = len(runtime.parts_written)

        # Called again by hand (no load in between): same runtime, nothing moves.
        again = R.setup_specmoe_runtime(model, args)
        out["same_runtime"] = again is runtime
        out["transfers_again"] = again.last_apply.transfers
        # A second checkpoint load: experts contiguous again, the plan is re-applied from there.
        user_mod.load_checkpoint(model, None, None)
        with torch.no_grad():
            out["diff_reload"] = float((model[0](tokens[0], pos, mask) - ref(tokens[0], pos, mask)).abs().max())
        runtime.close()
        out["stats_path"] = str(R.stats_path_for_rank(args.specmoe_stats, rank, world))
        out["parts"] = [str(p) for p in runtime.parts_written]
        out["closed"] = "_specmoe_runtime" not in spec.__dict__ and not runtime.route_recorder.attached

        RH.uninstall_runtime_hook([target])
        out["reverted"] = (user_mod.load_checkpoint is load_checkpoint
                           and ckpt_mod.load_checkpoint is load_checkpoint
                           and not RH.is_runtime_hook_installed([target]))
        RH.uninstall_runtime_hook([target])  # idempotent

        # Route recording with Megatron's own alltoall dispatcher: no plan, written on close.
        rec = R.setup_specmoe_runtime(ref, _args(moe_token_dispatcher_type="alltoall",
                                                 specmoe_record_routes=f"{out_dir}/alltoall"))
        with torch.no_grad():
            ref(tokens[0], pos, mask)
        rec.close()
        out["alltoall_parts"] = [str(p) for p in rec.parts_written]

        # A plan for another EP size is refused, naming the field and the folder.
        with pytest.raises(ValueError, match=r"(?s)--specmoe-plan .*bad.*ep_size: the plan was made for "
                                             r"ep_size=2 but the run has ep_size=4"):
            R.setup_specmoe_runtime(model, _args(specmoe_plan=bad_plan_dir))
        return out
    finally:
        parallel.destroy()


@pytest.fixture(scope="module")
def hooked_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime")
    save_plan(make_plan(num_layers=2, num_experts=8, topk=2, ep_size=4, hidden_size=16,
                        placements=[ExpertPlacement(physical_to_logical=t, ep_size=4) for t in TARGETS]),
              root / "plan")
    save_plan(make_plan(num_layers=2, num_experts=8, topk=2, ep_size=2), root / "bad")
    return root, run_local(_worker, 4, str(root / "plan"), str(root / "bad"), str(root / "out"))


def test_hook_applies_the_plan_after_load_checkpoint(hooked_run):
    _, results = hooked_run
    for rank, out in enumerate(results):
        assert out["patched"] == ["specmoe_test_checkpointing.load_checkpoint",
                                  "specmoe_test_script.load_checkpoint"]
        assert out["idempotent"] and out["reverted"] and out["closed"], rank
        assert max(out["diffs"]) <= 1e-6 and out["diff_reload"] <= 1e-6, (rank, out)
        assert out["placements"] == TARGETS and out["exact"], rank
        assert out["same_runtime"] and out["transfers_again"] == 0, rank


def test_recorded_routes_read_back_and_match_the_stats(hooked_run):
    from megatron_specmoe.artifacts.trace_io import read_traces

    root, results = hooked_run
    # --specmoe-record-every 1: one part per forward (3 forwards), nothing left for close().
    for rank, out in enumerate(results):
        assert out["parts_before_close"] == 2
        assert [p.rsplit("/", 1)[1] for p in out["parts"]] == [
            f"routes-rank{rank:05d}-part{i:04d}.npz" for i in range(3)]
    trace = read_traces(root / "out" / "routes")
    assert (trace.num_tokens, trace.num_layers, trace.topk, trace.num_experts) == (4 * 3 * B * S, 2, 2, 8)
    n = B * S
    want_ids = np.concatenate([out["tokens"] + out["tokens"][:n] for out in results])
    np.testing.assert_array_equal(trace.token_ids, want_ids)

    ranks_of = [ExpertPlacement(physical_to_logical=t, ep_size=4).rank_of_logical() for t in TARGETS]
    for rank, out in enumerate(results):
        lines = [json.loads(x) for x in open(out["stats_path"]).read().splitlines()]
        assert [x["layer_number"] for x in lines] == [1, 2]
        mine = trace.experts[rank * 3 * n:(rank + 1) * 3 * n]  # this rank's 3 forwards
        for li, line in enumerate(lines):
            assert (line["rank"], line["ep_rank"], line["ep_size"], line["forwards"]) == (rank, rank, 4, 3)
            hosts = ranks_of[li][mine[:, li, :]]
            want_pairs = np.bincount(hosts.reshape(-1), minlength=4).tolist()
            assert line["pairs_to_rank"] == want_pairs
            m = line["measures"]
            assert (m["tokens"], m["pairs"]) == (3 * n, 3 * n * 2)
            assert m["remote_pairs"] == int((hosts != rank).sum())
            assert line["dispatch_bytes_to_rank"][rank] == 0
            per_pair = line["dispatch_bytes_to_rank"][(rank + 1) % 4] // max(want_pairs[(rank + 1) % 4], 1)
            assert per_pair > 0 or want_pairs[(rank + 1) % 4] == 0


def test_route_recording_with_the_alltoall_dispatcher(hooked_run):
    from megatron_specmoe.artifacts.trace_io import read_traces

    root, results = hooked_run
    assert all(len(out["alltoall_parts"]) == 1 for out in results)
    trace = read_traces(root / "out" / "alltoall")
    assert (trace.num_tokens, trace.num_layers, trace.topk) == (4 * B * S, 2, 2)
    np.testing.assert_array_equal(trace.token_ids,
                                  np.concatenate([out["tokens"][:B * S] for out in results]))


# --------------------------------------------------------------------------- no ranks needed


def test_stats_path_per_rank():
    from megatron_specmoe.megatron_lm.runtime import stats_path_for_rank

    assert str(stats_path_for_rank("s/{rank}.jsonl", 3, 8)) == "s/3.jsonl"
    assert str(stats_path_for_rank("s/stats.jsonl", 3, 8)) == "s/stats.rank3.jsonl"
    assert str(stats_path_for_rank("s/stats.jsonl", 0, 1)) == "s/stats.jsonl"


def test_moe_layer_numbers_from_the_config():
    from megatron_specmoe.megatron_lm.runtime import moe_layer_numbers

    assert moe_layer_numbers(types.SimpleNamespace(num_layers=6, moe_layer_freq=2)) == [1, 3, 5]
    assert moe_layer_numbers(types.SimpleNamespace(num_layers=4, moe_layer_freq=[0, 1, 1, 0])) == [2, 3]
    with pytest.raises(ValueError, match="moe_layer_freq lists 3 layers but num_layers is 4"):
        moe_layer_numbers(types.SimpleNamespace(num_layers=4, moe_layer_freq=[1, 1, 1]))


def test_settings_from_args():
    from megatron_specmoe.megatron_lm.runtime import RuntimeSettings, setup_specmoe_runtime
    from megatron_specmoe.megatron_lm.runtime_hook import HookTarget

    assert not RuntimeSettings.from_args(_args()).active
    assert setup_specmoe_runtime(torch.nn.Linear(2, 2), _args()) is None  # nothing asked
    assert RuntimeSettings.from_args(_args(specmoe_plan="p")).applies_plan
    assert not RuntimeSettings.from_args(_args(moe_token_dispatcher_type="alltoall", specmoe_plan="p")).active
    with pytest.raises(ValueError, match="--specmoe-plan p with --save ckpt: .*Drop --save"):
        setup_specmoe_runtime(torch.nn.Linear(2, 2), _args(specmoe_plan="p", save="ckpt"))
    with pytest.raises(ValueError, match="--specmoe-record-every -1: must be >= 0"):
        RuntimeSettings.from_args(_args(specmoe_record_every=-1))
    with pytest.raises(ValueError, match="model_from='args'"):
        HookTarget(module=types, name="x", model_from="args")


def test_unwrap_chunks():
    from megatron_specmoe.megatron_lm.runtime import unwrap_chunks

    inner = torch.nn.Linear(2, 2)
    assert unwrap_chunks(_Wrapper(_Wrapper(inner))) == [inner]
    assert unwrap_chunks([_Wrapper(inner), inner]) == [inner, inner]
    with pytest.raises(ValueError, match="empty list of chunks"):
        unwrap_chunks([])


def test_read_traces_folder_of_npz(tmp_path):
    from megatron_specmoe.artifacts.trace_io import read_traces, write_trace
    from megatron_specmoe.artifacts.traces import RoutingTrace

    with pytest.raises(ValueError, match="no router_trace_rank\\*.jsonl files and no \\*.npz traces"):
        read_traces(tmp_path)
    a = np.array([[[0, 1]], [[2, 3]]])
    write_trace(RoutingTrace(experts=a, num_experts=4), tmp_path / "b.npz")
    write_trace(RoutingTrace(experts=a[::-1], num_experts=4), tmp_path / "a.npz")
    np.testing.assert_array_equal(read_traces(tmp_path).experts[:, 0], [[2, 3], [0, 1], [0, 1], [2, 3]])


def test_record_every_needs_record_routes():
    from megatron_specmoe.megatron_lm.args import SpecMoEArgumentError, validate_specmoe_args

    with pytest.raises(SpecMoEArgumentError, match="--specmoe-record-every 4: .*needs --specmoe-record-routes"):
        validate_specmoe_args(_args(moe_token_dispatcher_type="alltoall", specmoe_record_every=4))


LAUNCHED_SCRIPT = '''
import json, os, sys
import megatron.training.checkpointing as C
import megatron.training.training as T
from megatron.training.checkpointing import load_checkpoint
with open(os.environ["SPECMOE_TEST_OUT"], "w") as f:
    json.dump({"ckpt": hasattr(C.load_checkpoint, "__specmoe_runtime_hook__"),
               "by_name": load_checkpoint is C.load_checkpoint is T.load_checkpoint,
               "get_model": hasattr(T.get_model, "__specmoe_runtime_hook__")}, f)
'''


def test_launcher_installs_the_runtime_hook_around_the_script(monkeypatch, tmp_path):
    from tests.test_megatron_args import megatron_training

    C = megatron_training("checkpointing")
    T = megatron_training("training")
    from megatron_specmoe.megatron_lm import launch
    from megatron_specmoe.megatron_lm import runtime as R
    from megatron_specmoe.megatron_lm import runtime_hook as RH

    script = tmp_path / "script.py"
    script.write_text(LAUNCHED_SCRIPT)
    monkeypatch.setenv("SPECMOE_TEST_OUT", str(tmp_path / "out.json"))
    original = (C.load_checkpoint, T.get_model, T.__dict__.get("load_checkpoint"))
    assert launch.main([str(script)]) == 0
    assert json.loads((tmp_path / "out.json").read_text()) == {"ckpt": True, "by_name": True,
                                                               "get_model": True}
    assert (C.load_checkpoint, T.get_model, T.__dict__.get("load_checkpoint")) == original
    assert not RH.is_runtime_hook_installed()


def _tp_worker(rank, world, plan_dir, out_dir):
    """TP = 2 without sequence parallelism (Megatron's torch norms on the CPU have none), EP = 4:
    both TP ranks route the same tokens, only TP rank 0 writes them."""
    warnings.filterwarnings("ignore")
    from megatron.core import parallel_state

    from megatron_specmoe.megatron import cpu_support
    from megatron_specmoe.megatron import parallel
    from megatron_specmoe.megatron_lm import runtime as R
    from megatron_specmoe.megatron_lm import runtime_hook as RH
    from megatron_specmoe.megatron.build import MoEShape, build_gpt_model, make_config
    from megatron_specmoe.megatron.experts import load_seeded_banks
    from megatron_specmoe.megatron.model_tools import moe_sites
    from megatron_specmoe.artifacts.trace_io import read_trace

    cpu_support.enable()
    parallel.initialize(parallel.ParallelLayout(tp=2, ep=4))
    try:
        shape = MoEShape(layers=2)
        ep_rank = parallel_state.get_expert_model_parallel_rank()
        ref = build_gpt_model(make_config(shape, dispatcher="alltoall", tp=2, ep=4, sequence_parallel=False), shape, specmoe=False).eval()
        spec = build_gpt_model(make_config(shape, dispatcher="specmoe", tp=2, ep=4, sequence_parallel=False), shape, specmoe=True).eval()
        load_seeded_banks([s.layer for s in moe_sites(ref)], 8, ExpertPlacement.contiguous(8, 4), ep_rank, seed=11)
        spec.load_state_dict(ref.state_dict())
        runtime = R.setup_specmoe_runtime([_Wrapper(spec)], _args(specmoe_plan=plan_dir,
                                          specmoe_record_routes=out_dir), after_load=True)
        gen = torch.Generator().manual_seed(5 + parallel_state.get_data_parallel_rank())
        tokens = torch.randint(0, shape.vocab, (B, S), generator=gen)
        pos = torch.arange(S).unsqueeze(0).expand(B, -1)
        mask = torch.triu(torch.ones(1, 1, S, S, dtype=torch.bool), diagonal=1)
        with torch.no_grad():
            diff = float((spec(tokens, pos, mask) - ref(tokens, pos, mask)).abs().max())
        runtime.close()
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        if tp_rank:
            return tp_rank, diff, runtime.last_apply.layers, runtime.parts_written, None
        trace = read_trace(runtime.parts_written[0])
        ids = bool(np.array_equal(trace.token_ids, tokens.reshape(-1).numpy()))
        return tp_rank, diff, runtime.last_apply.layers, trace.num_tokens, ids
    finally:
        parallel.destroy()


def test_plan_and_routes_with_tensor_parallel(tmp_path):
    save_plan(make_plan(num_layers=2, num_experts=8, topk=2, ep_size=4, hidden_size=16,
                        placements=[ExpertPlacement(physical_to_logical=t, ep_size=4) for t in TARGETS]),
              tmp_path / "plan")
    results = run_local(_tp_worker, 4, str(tmp_path / "plan"), str(tmp_path / "routes"))
    assert sorted(r[0] for r in results) == [0, 0, 1, 1]
    for rank, (tp_rank, diff, layers, written, ids_match) in enumerate(results):
        assert diff <= 1e-5 and layers == 2, (rank, diff)
        if tp_rank:
            assert written == [], rank  # the same tokens as TP rank 0: not written twice
        else:
            assert written == B * S and ids_match, rank


def test_token_ids_of_a_sequence_parallel_shard():
    from megatron_specmoe.megatron_lm.runtime import RuntimeSettings, SpecMoERuntime

    rt = SpecMoERuntime(RuntimeSettings(dispatcher="alltoall"), [torch.nn.Linear(2, 2)])
    ids = torch.arange(16).reshape(2, 8)  # [B=2, S=8]
    rt._input_ids = [ids]
    rt._sequence_parallel, rt._tp_size, rt._tp_rank = True, 2, 1
    got, _ = rt._token_ids([8])  # this TP rank routed S/2 * B = 8 tokens: positions 4..7
    assert got.tolist() == [4, 5, 6, 7, 12, 13, 14, 15]
    got, why = rt._token_ids([6])
    assert got is None and "input_ids has shape (2, 8) but the routers saw 6 tokens" in why
    rt._sequence_parallel = False
    assert rt._token_ids([16])[0].tolist() == list(range(16))
    rt._input_ids = [ids, ids]
    assert "2 model forwards but 1 router calls" in rt._token_ids([16])[1]
