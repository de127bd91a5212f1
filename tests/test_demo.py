"""``specmoe demo`` runs end to end on 4 gloo ranks and writes its numbers."""

import json

from megatron_specmoe.cli.main import main


def test_demo_writes_json_and_figure(tmp_path, capsys):
    out, fig = tmp_path / "demo.json", tmp_path / "lar.png"
    code = main(["demo", "--batches", "2", "--seq", "16", "--batch", "2", "--json", str(out), "--figure", str(fig)])
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
    import pytest

    with pytest.raises(SystemExit, match="--ep 3 must divide --ranks 4"):
        main(["demo", "--ep", "3"])
