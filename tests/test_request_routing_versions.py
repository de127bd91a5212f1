"""``--specmoe-request-placement`` on each megatron-core version, with no skip on either.

Request placement needs the per-request routing decision of megatron-core 0.19's DP inference
coordinator (``get_best_data_parallel_rank``); 0.16's coordinator routes round-robin inside its
event loop. On 0.16 the flag is refused by name, with the reason, when the command line is checked
(before anything starts), and importing the coordinator module says the same; on 0.19 the same
command line passes. The Megatron-LM parser is stood in for by its few flags the check reads
(megatron.training is absent from the 0.16 wheel)."""

import argparse
import importlib
import sys

import numpy as np
import pytest
from packaging.version import Version

from megatron_specmoe.artifacts.plan_folder import make_plan, save_plan
from megatron_specmoe.artifacts.traces import RoutingTrace
from megatron_specmoe.predict.token_table import TokenTable
from megatron_specmoe.schedule.placement import ExpertPlacement

REASON = (r"request placement needs megatron-core >= 0\.19 \(its DataParallelInferenceCoordinator has a "
          r"per-request get_best_data_parallel_rank; 0\.16 routes round-robin inside its event loop\)")


def _core_019() -> bool:
    import megatron.core

    return Version(megatron.core.__version__) >= Version("0.19")


def _plan(tmp_path):
    experts = np.array([[[3]], [[3]], [[0]], [[3]]], dtype=np.int32)
    trace = RoutingTrace(experts=experts, num_experts=4, token_ids=np.array([7, 7, 5, 7]))
    plan = make_plan(num_layers=1, num_experts=4, topk=1, ep_size=2,
                     placements=[ExpertPlacement.contiguous(4, 2)],
                     predictor_state={"token": TokenTable(alpha=0.0).fit(trace).to_state()})
    save_plan(plan, tmp_path / "plan")
    return tmp_path / "plan"


def _args(plan_dir):
    from megatron_specmoe.megatron_lm.args import add_specmoe_args

    parser = argparse.ArgumentParser()
    parser.add_argument("--moe-token-dispatcher-type", choices=("allgather", "alltoall", "flex"), default="allgather")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parser.add_argument("--expert-model-parallel-size", type=int, default=1)
    parser.add_argument("--num-layers", type=int, default=1)
    parser.add_argument("--num-experts", type=int)
    parser.add_argument("--moe-router-topk", type=int, default=2)
    add_specmoe_args(parser)
    return parser.parse_args([
        "--moe-token-dispatcher-type", "specmoe", "--num-layers", "1", "--num-experts", "4",
        "--moe-router-topk", "1", "--expert-model-parallel-size", "2",
        "--specmoe-plan", str(plan_dir), "--specmoe-predictor", "token", "--specmoe-request-placement",
    ])


def test_request_placement_flag_refused_on_016_accepted_on_019(tmp_path):
    from megatron_specmoe.megatron_lm.args import SpecMoEArgumentError, validate_specmoe_args

    args = _args(_plan(tmp_path))
    if _core_019():
        assert validate_specmoe_args(args).active
    else:
        with pytest.raises(SpecMoEArgumentError, match=r"^request placement \(the specmoe dispatcher places requests "
                           r"at --tensor-model-parallel-size 1, DP attention\): " + REASON):
            validate_specmoe_args(args)


def test_coordinator_module_refuses_016_by_name(monkeypatch):
    name = "megatron_specmoe.megatron_lm.dp_coordinator"
    monkeypatch.delitem(sys.modules, name, raising=False)
    if _core_019():
        module = importlib.import_module(name)
        assert callable(module.install_request_routing)
    else:
        with pytest.raises(ImportError, match=REASON):
            importlib.import_module(name)
