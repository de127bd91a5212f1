"""Trace-level s-TS evaluation on tiny hand-worked traces, and ``specmoe evaluate`` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megatron_specmoe.cli.main import main
from megatron_specmoe.measure.evaluate import evaluate_trace
from megatron_specmoe.schedule.placement import ExpertPlacement
from megatron_specmoe.artifacts.plan_folder import make_plan, save_plan
from megatron_specmoe.predict.base import RouteContext, RoutePredictor
from megatron_specmoe.predict.layer_table import LayerTable
from megatron_specmoe.artifacts.trace_io import write_trace
from megatron_specmoe.artifacts.traces import RoutingTrace

# E = 4 experts on P = 2 ranks: contiguous placement puts experts 0, 1 on rank 0 and 2, 3 on rank 1.
# One layer, four tokens, k = 2:
#   token 0: experts {2, 3} -> hits [0, 2]     token 1: {0, 2} -> [1, 1]
#   token 2: {0, 1}         -> [2, 0]          token 3: {3, 1} -> [1, 1]
ROUTES = np.array([[[2, 3]], [[0, 2]], [[0, 1]], [[3, 1]]], dtype=np.int32)


def _trace(experts=ROUTES):
    return RoutingTrace(experts=experts, num_experts=4, token_ids=np.arange(len(experts)))


class PerfectPredictor:
    """Scores 1/k on each true expert of the token (looked up by token id)."""

    kind = "perfect"

    def __init__(self, trace: RoutingTrace):
        self.trace, self.num_experts, self.num_layers = trace, trace.num_experts, trace.num_layers

    def expert_scores(self, ctx: RouteContext) -> np.ndarray:
        true = self.trace.experts[ctx.token_ids, ctx.layer]
        out = np.zeros((len(true), self.num_experts), dtype=np.float32)
        np.put_along_axis(out, true.astype(np.int64), 1.0 / true.shape[1], axis=1)
        return out

    def memory_bytes(self) -> int:
        return 0


class ConstantPredictor:
    """Always experts 0 and 1, i.e. always rank 0 under the contiguous placement."""

    kind = "constant"
    num_experts, num_layers = 4, 1

    def expert_scores(self, ctx: RouteContext) -> np.ndarray:
        return np.tile(np.array([[0.5, 0.5, 0.0, 0.0]], dtype=np.float32), (ctx.num_tokens, 1))

    def memory_bytes(self) -> int:
        return 0


class HistoryRecorder(ConstantPredictor):
    num_layers = 3

    def __init__(self):
        self.seen: list[tuple[int, tuple[int, ...]]] = []

    def expert_scores(self, ctx: RouteContext) -> np.ndarray:
        self.seen.append((ctx.layer, ctx.history.shape, ctx.history.copy()))
        return super().expert_scores(ctx)


CONTIGUOUS = [ExpertPlacement.contiguous(4, 2)]


def test_predictors_implement_the_protocol():
    assert isinstance(PerfectPredictor(_trace()), RoutePredictor)
    assert isinstance(ConstantPredictor(), RoutePredictor)


def test_baseline_measures_equal_hand_counts():
    ev = evaluate_trace(_trace(), ConstantPredictor(), CONTIGUOUS, batch_size=4, method="optimal")
    base = ev.baseline
    # Contiguous shards: tokens 0, 1 on rank 0; 2, 3 on rank 1. Local pairs: 0 + 1 + 0 + 1 = 2.
    assert base.total.local_pairs == 2 and base.total.pairs == 8
    assert base.local_activation_rate == pytest.approx(0.25)
    assert base.remote_pairs_per_token == pytest.approx(6 / 4)
    assert base.remote_ranks_per_token == pytest.approx(1.0)  # every token reaches the other rank
    assert base.total.load_per_rank == (4, 4) and base.load_imbalance == pytest.approx(1.0)
    # The constant predictor says nothing: every token prefers rank 0 equally, so the balanced
    # assignment keeps the contiguous shards.
    assert ev.specmoe.local_activation_rate == pytest.approx(0.25)
    # Its prediction {0, 1} overlaps the true sets in 0, 1, 2, 1 experts; rank 0 hosts an expert
    # of tokens 1, 2, 3.
    assert ev.prediction.precision == pytest.approx(4 / 8)
    assert ev.prediction.recall == pytest.approx(4 / 8)
    assert ev.prediction.f1 == pytest.approx(0.5)
    assert ev.prediction.rank_accuracy == pytest.approx(3 / 4)


def test_oracle_hand_counts_and_perfect_predictor_reaches_it():
    trace = _trace()
    ev = evaluate_trace(trace, PerfectPredictor(trace), CONTIGUOUS, batch_size=4, method="optimal")
    # Best balanced placement: token 2 on rank 0, token 0 on rank 1, tokens 1 and 3 one on each:
    # local pairs 2 + 2 + 1 + 1 = 6.
    assert ev.oracle.total.local_pairs == 6
    assert ev.oracle.local_activation_rate == pytest.approx(0.75)
    assert ev.oracle.remote_pairs_per_token == pytest.approx(2 / 4)
    assert ev.oracle.remote_ranks_per_token == pytest.approx(2 / 4)
    assert ev.specmoe.local_activation_rate == pytest.approx(ev.oracle.local_activation_rate)
    assert ev.prediction.precision == 1.0 and ev.prediction.recall == 1.0
    assert ev.prediction.rank_accuracy == 1.0


@pytest.mark.parametrize("method", ["greedy", "refine", "optimal"])
def test_perfect_predictor_equals_oracle_on_a_random_trace(method):
    rng = np.random.default_rng(0)
    experts = np.stack([rng.permutation(8)[:2] for _ in range(3 * 50)]).reshape(50, 3, 2)
    trace = RoutingTrace(experts=experts.astype(np.int32), num_experts=8, token_ids=np.arange(50))
    placements = [ExpertPlacement.contiguous(8, 4), ExpertPlacement.from_rank_groups(
        [[7, 0], [1, 6], [2, 5], [3, 4]]), ExpertPlacement.contiguous(8, 4)]
    ev = evaluate_trace(trace, PerfectPredictor(trace), placements, batch_size=16, method=method)
    assert ev.num_batches == 4  # 16 + 16 + 16 + 2, the last padded
    for a, b in zip(ev.specmoe.per_layer, ev.oracle.per_layer):
        assert a == b
    assert ev.specmoe.local_activation_rate > ev.baseline.local_activation_rate
    assert ev.baseline.total.tokens == 50 * 3
    # placement_only uses the plan's placement with contiguous shards: layer 0 and 2 are contiguous.
    assert ev.placement_only.per_layer[0] == ev.baseline.per_layer[0]


def test_history_is_the_true_experts_of_earlier_layers():
    experts = np.arange(4 * 3 * 2).reshape(4, 3, 2).astype(np.int32) % 4
    trace = RoutingTrace(experts=experts, num_experts=4)
    rec = HistoryRecorder()
    evaluate_trace(trace, rec, CONTIGUOUS * 3, batch_size=4)
    assert [(layer, shape) for layer, shape, _ in rec.seen] == [(0, (4, 0, 2)), (1, (4, 1, 2)),
                                                                (2, (4, 2, 2))]
    np.testing.assert_array_equal(rec.seen[2][2], experts[:, :2])


def test_json_has_the_named_fields():
    out = evaluate_trace(_trace(), ConstantPredictor(), CONTIGUOUS, batch_size=4).to_json()
    for side in ("baseline", "specmoe"):
        assert {"local_activation_rate", "remote_pairs_per_token", "remote_ranks_per_token",
                "load_imbalance", "prediction"} <= set(out[side])
    assert set(out["specmoe"]["prediction"]) >= {"precision", "recall", "f1", "rank_accuracy"}
    assert out["baseline"]["local_activation_rate"] == pytest.approx(0.25)
    assert out["baseline"]["prediction"] is None  # the baseline predicts nothing


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="2 placements for a trace with L=1"):
        evaluate_trace(_trace(), ConstantPredictor(), CONTIGUOUS * 2)
    two_layers = RoutingTrace(experts=ROUTES.repeat(2, axis=1), num_experts=4)
    with pytest.raises(ValueError, match=r"placements\[1\].*made for ep_size=4"):
        evaluate_trace(two_layers, ConstantPredictor(),
                       [ExpertPlacement.contiguous(4, 2), ExpertPlacement.contiguous(4, 4)])
    with pytest.raises(ValueError, match="fitted for L=1, E=4 but trace"):
        evaluate_trace(two_layers, ConstantPredictor(), CONTIGUOUS * 2)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        evaluate_trace(_trace(), ConstantPredictor(), CONTIGUOUS, batch_size=0)


# ---- specmoe evaluate ------------------------------------------------------------------------


def _repeating_trace(tokens=48, seed=0):
    # Layer 0 random; layers 1, 2 repeat layer 0, so the history predicts them exactly.
    rng = np.random.default_rng(seed)
    first = np.stack([rng.permutation(4)[:2] for _ in range(tokens)])
    return RoutingTrace(experts=np.stack([first] * 3, axis=1).astype(np.int32), num_experts=4)


@pytest.fixture()
def files(tmp_path):
    fit = _repeating_trace(seed=1)
    predictor = LayerTable(n=1, min_count=1, alpha=0.0).fit(fit)
    plan = make_plan(num_layers=3, num_experts=4, topk=2, ep_size=2,
                     placements=[ExpertPlacement.contiguous(4, 2)] * 3,
                     predictor_state={"layer": predictor.to_state()})
    save_plan(plan, tmp_path / "plan")
    empty = make_plan(num_layers=3, num_experts=4, topk=2, ep_size=2)
    save_plan(empty, tmp_path / "empty")
    trace = _repeating_trace(seed=2)
    write_trace(trace, tmp_path / "eval.npz")
    return tmp_path, trace


def _baseline_lar(trace, batch, ranks):
    """Independent count: contiguous shards of batch/P rows, expert e on rank e // (E/P)."""
    local = 0
    for t in range(trace.num_tokens):
        home = (t % batch) // (batch // ranks)
        local += int((trace.experts[t] // (trace.num_experts // ranks) == home).sum())
    return local / trace.experts.size


def test_json_output(files, capsys):
    tmp, trace = files
    rc = main(["evaluate", "--plan", str(tmp / "plan"), "--traces", str(tmp / "eval.npz"),
               "--batch", "16", "--assignment", "optimal", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)  # exactly one JSON object on stdout
    for side in ("baseline", "specmoe"):
        for key in ("local_activation_rate", "remote_pairs_per_token", "remote_ranks_per_token",
                    "load_imbalance"):
            assert isinstance(out[side][key], float)
    assert set(out["prediction"]) >= {"precision", "recall", "f1", "rank_accuracy"}
    assert out["specmoe"]["prediction"] == out["prediction"]
    assert out["baseline"]["local_activation_rate"] == pytest.approx(_baseline_lar(trace, 16, 2))
    # Layers 1 and 2 are predicted exactly, so there specmoe reaches the oracle.
    for layer in (1, 2):
        assert (out["specmoe"]["per_layer"]["local_activation_rate"][layer]
                == pytest.approx(out["oracle"]["per_layer"]["local_activation_rate"][layer]))
    assert out["specmoe"]["local_activation_rate"] > out["baseline"]["local_activation_rate"]
    assert out["config"]["assignment"] == "optimal" and out["config"]["batch_size"] == 16


def test_table_output_and_errors(files, capsys):
    tmp, _ = files
    assert main(["evaluate", "--plan", str(tmp / "plan"), "--traces", str(tmp / "eval.npz")]) == 0
    assert "specmoe" in capsys.readouterr().out
    assert main(["evaluate", "--plan", str(tmp / "plan"), "--traces", str(tmp / "eval.npz"),
                 "--kind", "history"]) == 2
    assert "--kind 'history'" in capsys.readouterr().err
    assert main(["evaluate", "--plan", str(tmp / "empty"), "--traces", str(tmp / "eval.npz")]) == 1  # a data error
    assert "stores no predictor" in capsys.readouterr().err
    assert main(["evaluate", "--plan", str(tmp / "plan"), "--traces", str(tmp / "eval.npz"),
                 "--assignment", "hungarian"]) == 2
    assert "--assignment 'hungarian' is not a method -- choose one of" in capsys.readouterr().err


def test_small_batches_report_progress_within_a_layer(capsys):
    """Issue 18 finding 5: `evaluate --batch 1` ran for minutes with one line per layer only."""
    rng = np.random.default_rng(0)
    experts = np.stack([rng.permutation(4)[:2] for _ in range(40)])[:, None, :].astype(np.int32)
    trace = _trace(experts)
    evaluate_trace(trace, PerfectPredictor(trace), CONTIGUOUS, batch_size=1, progress=True,
                   progress_every_s=0.0)
    err = capsys.readouterr().err
    assert "[evaluate] 40 tokens in 40 batch(es) of 1 x 1 layers" in err
    within = [x for x in err.splitlines() if ", batch " in x]
    assert len(within) >= 39 and "layer 1/1, batch 39/40" in within[-1] and "s left" in within[-1]
    evaluate_trace(trace, PerfectPredictor(trace), CONTIGUOUS, batch_size=1, progress=True)
    assert ", batch " not in capsys.readouterr().err  # throttled: every 5 s by default


def test_json_node_measures(files, capsys):
    tmp, _ = files
    base = ["evaluate", "--plan", str(tmp / "plan"), "--traces", str(tmp / "eval.npz"), "--batch", "16",
            "--json", "--hidden-size", "8"]
    # One GPU per node: nodes are ranks, so the node measures equal the rank measures.
    assert main(base + ["--gpus-per-node", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["gpus_per_node"] == 1
    for side in ("baseline", "placement_only", "specmoe", "oracle"):
        r = out[side]
        assert r["remote_nodes_per_token"] == pytest.approx(r["remote_ranks_per_token"])
        row = 8 * 2  # hidden 8, bf16
        assert r["internode_bytes_per_token"]["per_pair"] == pytest.approx(
            r["remote_pairs_per_token"] * (2 * row + 4))
        assert r["internode_bytes_per_token"]["per_node"] == pytest.approx(
            r["remote_ranks_per_token"] * 2 * row + r["remote_pairs_per_token"] * 4)
    # Both ranks on one node: nothing crosses nodes.
    assert main(base + ["--gpus-per-node", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["specmoe"]["remote_nodes_per_token"] == 0.0
    assert out["specmoe"]["internode_bytes_per_token"] == {"per_node": 0.0, "per_pair": 0.0}


def test_node_flags_refused(files, capsys):
    tmp, _ = files
    base = ["evaluate", "--plan", str(tmp / "plan"), "--traces", str(tmp / "eval.npz")]
    assert main(base + ["--gpus-per-node", "3", "--hidden-size", "8"]) == 2
    assert "--gpus-per-node=3 does not divide the EP size 2" in capsys.readouterr().err
    assert main(base + ["--gpus-per-node", "1"]) == 2
    assert "pass --hidden-size H" in capsys.readouterr().err
    assert main(base + ["--hidden-size", "8"]) == 2
    assert "pass --gpus-per-node too" in capsys.readouterr().err
    assert main(base + ["--gpus-per-node", "1", "--hidden-size", "8"]) == 0
    assert "remote nodes/tok" in capsys.readouterr().out
