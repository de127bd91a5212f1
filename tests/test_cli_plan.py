"""``specmoe plan`` end to end on a small synthetic trace, and its errors."""

import json

import numpy as np
import pytest

from megatron_specmoe.cli.main import main
from megatron_specmoe.artifacts.plan_folder import load_plan
from megatron_specmoe.artifacts.trace_io import write_trace
from megatron_specmoe.artifacts.traces import RoutingTrace


def _trace(tmp_path, with_ids=True):
    rng = np.random.default_rng(0)
    tokens, layers, experts = 400, 3, 8
    # Two families of tokens: even ids use experts {0, 5}, odd ids {2, 7}, at every layer.
    ids = rng.integers(0, 50, size=tokens)
    fam = np.where(ids % 2 == 0, 0, 1)
    pairs = np.array([[0, 5], [2, 7]])[fam]
    ex = np.repeat(pairs[:, None, :], layers, axis=1).astype(np.int32)
    trace = RoutingTrace(experts=ex, num_experts=experts, token_ids=ids if with_ids else None)
    path = tmp_path / ("t.npz" if with_ids else "noids.npz")
    write_trace(trace, path)
    return path


def test_plan_writes_a_loadable_plan(tmp_path, capsys):
    path = _trace(tmp_path)
    out = tmp_path / "plan"
    assert main(["plan", "--traces", str(path), "--ep", "4", "--out", str(out), "--placement", "search"]) == 0
    plan = load_plan(out)
    assert plan.header.ep_size == 4 and plan.header.num_experts == 8 and plan.header.num_layers == 3
    assert plan.header.predictor_kinds == ("combined",)
    # Grouping puts the co-activated pairs {0,5} and {2,7} on one rank each, at every layer.
    for placement in plan.placements:
        rank = placement.rank_of_logical()
        assert rank[0] == rank[5] and rank[2] == rank[7]
    err = capsys.readouterr().err
    assert "wrote" in err
    # A fit-time estimate before fitting, and a bar per stage that reaches its end.
    assert err.index("fit-time estimate: 'combined' ~") < err.index("[specmoe plan: fit combined]")
    assert "[specmoe plan: fit combined] |" + "#" * 24 + "| 2/2 steps" in err
    assert "[specmoe plan: group search] |" + "#" * 24 + "| 3/3 layers" in err


def test_plan_refuses_bad_input(tmp_path, capsys):
    path = _trace(tmp_path, with_ids=False)
    out = str(tmp_path / "p")
    assert main(["plan", "--traces", str(path), "--ep", "3", "--out", out]) == 2
    assert "--ep 3 does not divide the traces' 8 experts" in capsys.readouterr().err
    assert main(["plan", "--traces", str(path), "--ep", "2", "--out", out, "--predictor", "token"]) == 2
    assert "needs token ids" in capsys.readouterr().err
    assert main(["plan", "--traces", str(path), "--ep", "2", "--out", out, "--predictor", "magic"]) == 2
    assert "unknown predictor kind 'magic'" in capsys.readouterr().err
    assert main(["plan", "--traces", str(path), "--ep", "2", "--out", out, "--placement", "magic"]) == 2
    assert "method='magic' is unknown" in capsys.readouterr().err


def test_plan_history_progress_counts_layers(tmp_path, capsys):
    path = _trace(tmp_path, with_ids=False)
    assert main(["plan", "--traces", str(path), "--ep", "2", "--out", str(tmp_path / "p"), "--predictor",
                 "history", "--placement", "contiguous"]) == 0
    err = capsys.readouterr().err
    assert "'history' ~" in err
    # Layers 1 and 2 are fitted (layer 0 scores the prior): 1/2 then 2/2.
    assert "| 1/2 layers" in err and "| 2/2 layers" in err


def test_plan_with_redundant_experts_and_evaluate(tmp_path, capsys):
    import json

    from megatron_specmoe.schedule.replicas import replicas_from_arrays

    path = _trace(tmp_path)
    out = tmp_path / "plan"
    assert main(["plan", "--traces", str(path), "--ep", "4", "--out", str(out), "--predictor", "token",
                 "--redundant-experts", "4", "--replica-policy", "coactivation"]) == 0
    plan = load_plan(out)
    assert plan.header.notes["redundant_experts"] == 4 and plan.header.notes["replica_policy"] == "coactivation"
    reps = replicas_from_arrays(plan.placements, plan.arrays, "coactivation")
    assert len(reps) == 3 and all(r.slots_per_rank == 3 and r.redundant == 4 for r in reps)
    capsys.readouterr()
    assert main(["evaluate", "--plan", str(out), "--traces", str(path), "--batch", "16", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["config"]["redundant_experts"] == 4
    # Replicas only add copies: the oracle with them keeps at least the oracle's local pairs.
    assert (result["oracle_replicas"]["local_activation_rate"]
            >= result["oracle"]["local_activation_rate"] - 1e-9)
    for flags, pattern in ((["--redundant-experts", "3"], "multiple of --ep 4"),
                           (["--redundant-experts", "4", "--replica-policy", "hot"], "--replica-policy 'hot'")):
        assert main(["plan", "--traces", str(path), "--ep", "4", "--out", str(tmp_path / "q"), "--predictor",
                     "token"] + flags) == 2
        assert pattern in capsys.readouterr().err


def test_evaluate_request_placement(tmp_path, capsys):
    import json
    from dataclasses import replace

    from megatron_specmoe.artifacts.trace_io import read_traces

    path = _trace(tmp_path)
    out = tmp_path / "plan"
    assert main(["plan", "--traces", str(path), "--ep", "4", "--out", str(out), "--predictor", "token"]) == 0
    trace = read_traces([str(path)])
    with_req = tmp_path / "req.npz"
    write_trace(replace(trace, request_ids=np.arange(trace.num_tokens) // 4), with_req)
    capsys.readouterr()
    for method in ("round_robin", "group_mask"):
        assert main(["evaluate", "--plan", str(out), "--traces", str(with_req), "--json",
                     "--request-placement", method, "--gpus-per-node", "2", "--hidden-size", "8"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert 0.0 <= result["requests"]["local_activation_rate"] <= 1.0
        assert "remote_nodes_per_token" in result["requests"]
    assert main(["evaluate", "--plan", str(out), "--traces", str(path), "--request-placement", "round_robin"]) == 1
    assert "needs traces with request ids" in capsys.readouterr().err  # a data error: exit 1
    assert main(["evaluate", "--plan", str(out), "--traces", str(with_req), "--request-placement", "magic"]) == 2
    assert "choose one of" in capsys.readouterr().err
