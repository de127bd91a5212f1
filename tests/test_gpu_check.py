"""tools/gpu_check.py on the CPU: the timing step's code runs (tiny sizes, host clock), and the
script refuses a machine without CUDA. The GPU run itself is documented in the README."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

TOOL = Path(__file__).resolve().parents[1] / "tools" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_timing_step_runs_on_the_cpu_at_tiny_sizes(gpu_check):
    rows = gpu_check.timings("cpu", (96, 130), experts=8, topk=2, ranks=4, hidden=32, vocab=100,
                             history_layers=2, mlp_hidden=8, repeats=1)
    assert [r["tokens"] for r in rows] == [96, 130]
    keys = {"shuffle_plan_refine_ms", "route_table_lookup_ms", "history_scorer_ms", "pregate_scores_ms",
            "dispatch_permute_ms"}
    for row in rows:
        assert keys <= set(row) and all(row[k] > 0 for k in keys), row


def test_plan_graph_step_runs_on_the_cpu_at_tiny_sizes(gpu_check):
    rows = gpu_check.plan_graph("cpu", (1, 70), ranks=4, vocab=50, heads=2, head_dim=8, repeats=1)
    assert [r["tokens"] for r in rows] == [1, 70]
    for row in rows:
        assert row["graph_equal"].startswith("skipped")
        assert all(row[k] > 0 for k in ("plan_ms", "attention_ms", "overlapped_ms")), row


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_without_cuda(gpu_check, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--out", str(tmp_path / "out.json")])
    assert gpu_check.main() == 2
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()


def test_shuffle_worker_runs_on_gloo_with_every_predictor():
    """The GPU check's s-TS worker, on 2 CPU ranks (TP = EP = 2, sequence parallel on): lossless
    for pregate, route and history (the same code the GPU runs on NCCL, local linears)."""
    from megatron_specmoe.testing.spawn import run_local

    sys.path.insert(0, str(TOOL.parent))  # spawned ranks import the worker as module gpu_check
    try:
        import gpu_check as tool

        cases = [c for c in tool._shuffle_cases(te=False, world=2, device="cpu") if c["sp"]]
        assert [c["predictor"] for c in cases] == ["pregate", "route", "history"]
        results = run_local(tool._gpt_shuffle_worker, 2, cases)[0]
    finally:
        sys.path.remove(str(TOOL.parent))
    for case, res in zip(cases, results):
        assert res["max_abs_diff"] <= 1e-5, (case, res)
        assert res["linear_proj"] == "NoCommRowParallelLinear" and res["plans"] == 2, res


def test_decode_graph_worker_runs_on_gloo_in_padded_decode():
    """The GPU check's padded-decode graph step (3c) on 2 CPU ranks (TP = EP = 2): the shuffle
    layer's decode-shaped step in Megatron's padded decode equals Megatron's layer in the same mode;
    the CUDA-graph capture itself is skipped and says so (no GPU claimed)."""
    from megatron_specmoe.testing.spawn import run_local

    sys.path.insert(0, str(TOOL.parent))  # spawned ranks import the worker as module gpu_check
    try:
        import gpu_check as tool

        results = run_local(tool._decode_graph_worker, 2, "cpu", 3, 1)
    finally:
        sys.path.remove(str(TOOL.parent))
    for res in results:
        assert res["eager_max_abs_diff"] <= 1e-5, res
        assert res["graph_max_abs_diff"] == "skipped: no CUDA graphs on the CPU"
        # Drop-and-pad on, capacity = the C = 2 rows each rank routes (T = 3 tokens on 2 ranks).
        assert res["padding"] == [True, 2], res
