"""``specmoe demo`` runs end to end on 4 gloo ranks and writes its numbers."""

import json

import pytest

from megatron_specmoe.cli.main import main


def test_demo_pipeline_on_the_shipped_model(tmp_path, capsys):
    """profile -> plan -> serve -> report on the trained model: lossless, the shuffle with the plan's
    token table and grouping makes more activations local than alltoall, and allgather's bytes are
    its collectives' payloads."""
    code = main(["demo", "--calib-windows", "16", "--eval-windows", "8", "--seq", "64", "--batch", "2",
                 "--out-dir", str(tmp_path / "new")])  # a folder that does not exist yet
    assert code == 0
    doc = json.loads((tmp_path / "new" / "report.json").read_text())
    assert doc["mode"] == "pipeline" and doc["settings"]["tp"] == 4 and doc["settings"]["ep"] == 4
    assert doc["lossless_max_abs_diff"] <= 1e-4
    a2a, spec = doc["dispatchers"]["alltoall"], doc["dispatchers"]["specmoe"]
    assert a2a["tokens"] == spec["tokens"] == 8 * 64
    assert a2a["moe_layers"] == spec["moe_layers"] == 4
    # Every pair is accounted on both sides: 4 layers x tokens x top-4.
    assert a2a["remote_pairs"] / (1 - a2a["local_activation_rate"]) == pytest.approx(4 * 512 * 4)
    assert spec["local_activation_rate"] > a2a["local_activation_rate"] + 0.1
    assert spec["bytes_on_wire"] < a2a["bytes_on_wire"]
    # Timing: 2 passes (the default) over the 8 // 2 batches, every dispatcher on every batch; the
    # ratio is the median of the per-batch ratios, with its spread and pair count.
    assert doc["timing"]["passes"] == 2 and doc["timing"]["forwards_per_dispatcher"] == 2 * (8 // 2)
    assert len(a2a["a2a_s"]) == len(spec["a2a_s"]) == len(spec["forward_s"]) == 2 * (8 // 2)
    assert all(t > 0 for t in a2a["a2a_s"] + spec["a2a_s"])
    ratio = spec["forward_ratio"]
    assert ratio["pairs"] == 2 * (8 // 2) and ratio["min"] <= ratio["q1"] <= ratio["median"] <= ratio["q3"] <= ratio["max"]
    assert a2a["forward_ratio"]["median"] == 1.0
    # allgather: alltoall's routes, and every token to the 3 other ranks of the TP x EP group: hidden
    # (128 fp32), probs (32 fp32) and routing map (32 bool) gathered, the output (128 fp32) reduce-
    # scattered: 3 x (512 + 128 + 32) + 3 x 512 = 3552 bytes per token per layer, counted.
    ag = doc["dispatchers"]["allgather"]
    assert ag["bytes_counted_from_collectives"] and not a2a["bytes_counted_from_collectives"]
    assert ag["bytes_on_wire"] == 3552 * 8 * 64 * 4
    assert (ag["remote_pairs"], ag["local_activation_rate"]) == (a2a["remote_pairs"], a2a["local_activation_rate"])
    assert len(ag["a2a_s"]) == 2 * (8 // 2)
    assert (tmp_path / "new" / "plan" / "plan.json").is_file()
    assert (tmp_path / "new" / "lar.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_on_the_deepseek_style_model(tmp_path, capsys):
    """The same workflow on the shipped DeepSeek-style model (multi-latent attention, a shared
    expert at TP 4, 64 experts top-6 in 4 router groups, expert-bias router): lossless, more local
    activations and fewer bytes than alltoall, every pair accounted (4 layers x tokens x top-6),
    and the plan keeps the router groups on their ranks."""
    code = main(["demo", "--model", "deepseek-style", "--calib-windows", "16", "--eval-windows", "8",
                 "--seq", "64", "--batch", "2", "--out-dir", str(tmp_path)])
    assert code == 0
    doc = json.loads((tmp_path / "report.json").read_text())
    assert doc["settings"]["checkpoint"].endswith("deepseek-style")
    assert doc["lossless_max_abs_diff"] <= 1e-4
    a2a, spec = doc["dispatchers"]["alltoall"], doc["dispatchers"]["specmoe"]
    assert a2a["remote_pairs"] / (1 - a2a["local_activation_rate"]) == pytest.approx(4 * 512 * 6)
    assert spec["local_activation_rate"] > a2a["local_activation_rate"] + 0.1
    assert spec["bytes_on_wire"] < a2a["bytes_on_wire"]
    plan = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert plan["notes"]["router_groups"]["num_groups"] == 4


def test_demo_model_and_checkpoint_are_exclusive(capsys):
    assert main(["demo", "--model", "deepseek-style", "--checkpoint", "/tmp"]) == 2
    err = capsys.readouterr().err
    assert "--model and --checkpoint both given" in err and "not both" in err


def test_demo_synthetic_writes_json_and_figure(tmp_path, capsys):
    out, fig = tmp_path / "demo.json", tmp_path / "lar.png"
    code = main(["demo", "--synthetic", "--batches", "2", "--seq", "16", "--batch", "2", "--json", str(out),
                 "--figure", str(fig), "--out-dir", str(tmp_path)])
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["lossless_max_abs_diff"] <= 1e-5
    a2a, spec = doc["dispatchers"]["alltoall"], doc["dispatchers"]["specmoe"]
    # 4 ranks x 2 batches x 2 sequences x 16 tokens, 2 MoE layers, top-2.
    assert a2a["tokens"] == spec["tokens"] == 4 * 2 * 2 * 16
    assert a2a["moe_layers"] == 2 and len(a2a["per_layer_local_activation_rate"]) == 2
    # Same placement (contiguous), same routes: identical traffic, measured independently.
    for key in ("remote_pairs", "bytes_on_wire", "local_activation_rate", "remote_ranks_per_token"):
        assert a2a[key] == spec[key], key
    # bytes = remote pairs x (dispatch H*4 + prob 4 + combine H*4), H = 64.
    assert a2a["bytes_on_wire"] == a2a["remote_pairs"] * (64 * 4 + 4 + 64 * 4)
    assert 0.0 < a2a["local_activation_rate"] < 1.0
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = capsys.readouterr().out
    assert "alltoall" in text and "specmoe" in text and "LAR" in text


def test_demo_rejects_bad_layout(capsys):
    assert main(["demo", "--ep", "3"]) == 2
    assert "--ep 3 must divide --ranks 4" in capsys.readouterr().err
    assert main(["demo", "--ep", "2"]) == 2
    assert "--ep 2 must be a multiple of --tp 4" in capsys.readouterr().err
