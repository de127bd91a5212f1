"""Request placement inside Megatron's DP inference coordinator (core 0.19): the coordinator
subclass picks the engine whose experts the prompt is predicted to use, within its load; the
engine-side install is reversible. No ZMQ: the coordinator's scoring methods are called the way
its submit handler calls them, on an instance whose sockets were never opened."""

import numpy as np
import pytest

pytest.importorskip("megatron.core.inference.data_parallel_inference_coordinator.coordinator")

from megatron_specmoe.schedule.placement import ExpertPlacement  # noqa: E402
from megatron_specmoe.artifacts.plan_folder import make_plan, save_plan  # noqa: E402
from megatron_specmoe.predict.token_table import TokenTable  # noqa: E402
from megatron_specmoe.artifacts.traces import RoutingTrace  # noqa: E402


@pytest.fixture()
def plan_dir(tmp_path):
    # E = 4, EP = 2 (experts 0, 1 on EP rank 0; 2, 3 on EP rank 1), k = 1, one MoE layer:
    # token 7 always goes to expert 3, token 5 to expert 0.
    experts = np.array([[[3]], [[3]], [[0]], [[3]]], dtype=np.int32)
    trace = RoutingTrace(experts=experts, num_experts=4, token_ids=np.array([7, 7, 5, 7]))
    table = TokenTable(alpha=0.0).fit(trace)
    plan = make_plan(num_layers=1, num_experts=4, topk=1, ep_size=2,
                     placements=[ExpertPlacement.contiguous(4, 2)], predictor_state={"token": table.to_state()})
    out = tmp_path / "plan"
    save_plan(plan, out)
    return out


def _coordinator(router, pending):
    from megatron_specmoe.megatron_lm.dp_coordinator import SpecMoECoordinator

    from megatron.core.inference.config import PrefixCachingCoordinatorPolicy

    coord = object.__new__(SpecMoECoordinator)  # no sockets: only the routing state
    coord.prefix_caching_coordinator_policy = PrefixCachingCoordinatorPolicy.FIRST_PREFIX_BLOCK
    coord.tokenizer = None
    coord.enable_prefix_caching = False
    coord.block_size_tokens = None
    coord.max_requests = 4
    coord._identities_list = [b"mp-coord-0", b"mp-coord-1", b"mp-coord-2", b"mp-coord-3"]  # DP = 4
    coord._pending_counts = np.asarray(pending, dtype=np.int32)
    coord.specmoe_router = router
    return coord


def _submit(coord, prompt):
    """What Megatron's submit handler does before sending: hashes, then the best rank."""
    return coord.get_best_data_parallel_rank(coord.compute_request_hashes(prompt))


def test_requests_go_to_the_engine_hosting_their_experts(plan_dir):
    from megatron_specmoe.megatron_lm.dp_coordinator import AffinityRouter

    router = AffinityRouter.from_plan(plan_dir, weight=0.9)
    # DP rank d is EP rank d % 2: token 7 (expert 3) belongs on DP ranks 1 and 3, token 5 on 0 and 2.
    assert _submit(_coordinator(router, [0, 0, 0, 0]), [7, 7, 7]) == b"mp-coord-1"
    assert _submit(_coordinator(router, [0, 0, 0, 0]), [5, 5]) == b"mp-coord-0"
    # DP rank 1 is full (free 0): 0.9 * 0.5 + 0 = 0.45 < DP rank 3's 0.45 + 0.1 = 0.55.
    assert _submit(_coordinator(router, [0, 4, 0, 0]), [7, 7, 7]) == b"mp-coord-3"
    # weight 0 is Megatron's least-loaded routing.
    assert _submit(_coordinator(AffinityRouter.from_plan(plan_dir, weight=0.0), [1, 0, 2, 2]), [7]) == b"mp-coord-1"


def test_without_a_router_it_is_megatrons_coordinator(plan_dir):
    coord = _coordinator(None, [3, 2, 0, 1])
    assert _submit(coord, [7, 7]) == b"mp-coord-2"  # least loaded


def test_install_is_reversible_and_checks_the_plan(plan_dir, tmp_path, monkeypatch):
    from megatron.core.inference.data_parallel_inference_coordinator.coordinator import (
        DataParallelInferenceCoordinator,
    )
    from megatron.core.inference.engines import dynamic_engine

    from megatron_specmoe.megatron_lm import dp_coordinator as dpc

    monkeypatch.delenv(dpc.PLAN_ENV, raising=False)
    with pytest.raises(ValueError, match="missing: no such plan folder -- make one with `specmoe plan"):
        dpc.install_request_routing(tmp_path / "missing")
    assert not dpc.is_request_routing_installed()
    try:
        dpc.install_request_routing(plan_dir, weight=0.7)
        dpc.install_request_routing(plan_dir, weight=0.7)  # idempotent
        assert dynamic_engine.DataParallelInferenceCoordinator is dpc.SpecMoECoordinator
        router = dpc.router_from_env()  # what the spawned coordinator process reads
        assert router.weight == 0.7 and router.ep_size == 2
    finally:
        dpc.uninstall_request_routing()
    assert dynamic_engine.DataParallelInferenceCoordinator is DataParallelInferenceCoordinator
    assert dpc.router_from_env() is None and not dpc.is_request_routing_installed()


def test_engine_identities_must_name_their_dp_rank(plan_dir):
    from megatron_specmoe.megatron_lm.dp_coordinator import AffinityRouter

    coord = _coordinator(AffinityRouter.from_plan(plan_dir), [0, 0, 0, 0])
    coord._identities_list = [b"engine-a", b"engine-b", b"engine-c", b"engine-d"]
    with pytest.raises(ValueError, match="engine identity 'engine-a' is not 'mp-coord-<dp rank>'"):
        _submit(coord, [7])


def test_launcher_flags_are_checked_before_any_gpu_work(monkeypatch, plan_dir, tmp_path):
    from megatron_specmoe.megatron_lm import args as M
    from megatron_specmoe.megatron_lm.runtime import RuntimeSettings

    from tests.test_launch_shuffle import BASE_ARGV, parse

    # DP attention: TP = 1, EP = 2 (the plan's), specmoe dispatcher, the plan's token table.
    base = [*BASE_ARGV, "--tensor-model-parallel-size", "1", "--expert-model-parallel-size", "2",
            "--expert-tensor-parallel-size", "1", "--moe-token-dispatcher-type", "specmoe",
            "--num-experts", "4", "--moe-router-topk", "1", "--num-layers", "1", "--transformer-impl", "local"]
    # Request placement is what the specmoe dispatcher does at TP = 1, asked for or not.
    for extra in ([], ["--specmoe-request-placement"]):
        args = parse(monkeypatch, [*base, "--specmoe-plan", str(plan_dir), "--specmoe-request-weight", "0.8", *extra])
        assert M.validate_specmoe_args(args) == M.SpecMoEArgsCheck(active=True, method="requests", predictor="token",
                                                                   plan=plan_dir)
        assert args.specmoe_request_placement and not args.specmoe_shuffle
        settings = RuntimeSettings.from_args(args)
        assert settings.places_requests and settings.request_weight == 0.8 and not settings.shuffle
    good = [*base, "--specmoe-plan", str(plan_dir), "--specmoe-request-placement"]
    cases = [
        (["--specmoe-request-weight", "1.5"], r"--specmoe-request-weight 1.5: must be in \[0, 1\]"),
        (["--tensor-model-parallel-size", "2"],
         "places whole requests for DP attention .* TP is 2; with TP > 1 the specmoe dispatcher shuffles tokens"),
        (["--specmoe-predictor", "pregate"], "--specmoe-predictor pregate: request placement .* predicts from the "
         "prompt's token ids alone; use --specmoe-predictor token"),
        (["--specmoe-shuffle"], "--specmoe-shuffle and --specmoe-request-placement: the layout selects one"),
    ]
    for extra, message in cases:
        with pytest.raises(M.SpecMoEArgumentError, match=message):
            M.validate_specmoe_args(parse(monkeypatch, [*good, *extra]))
    with pytest.raises(M.SpecMoEArgumentError, match=r"request placement \(the specmoe dispatcher places requests at "
                       "--tensor-model-parallel-size 1, DP attention\) needs --specmoe-plan DIR with a 'token' predictor"):
        M.validate_specmoe_args(parse(monkeypatch, base))
    alltoall = [a if a != "specmoe" else "alltoall" for a in good]
    with pytest.raises(M.SpecMoEArgumentError, match="--specmoe-request-placement only apply to the specmoe dispatcher"):
        M.validate_specmoe_args(parse(monkeypatch, alltoall))
