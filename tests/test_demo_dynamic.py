"""``specmoe demo --engine dynamic``: the evaluation text as a request stream through Megatron-Core
0.19's DynamicInferenceEngine on 2 gloo ranks, alltoall vs the shuffle; refused on older cores."""

import json
import re
from importlib.metadata import version

import pytest

from megatron_specmoe.cli.main import main

CORE_19 = tuple(int(p) for p in version("megatron-core").split(".")[:2]) >= (0, 19)


@pytest.mark.skipif(not CORE_19, reason="the dynamic engine demo needs megatron-core 0.19 (refusal tested below)")
def test_dynamic_demo_is_lossless_and_shuffles(tmp_path, capsys):
    pytest.importorskip("einops")
    code = main(["demo", "--engine", "dynamic", "--ranks", "2", "--calib-windows", "8", "--eval-windows", "4", "--seq", "64",
                 "--batch", "2", "--new-tokens", "6", "--out-dir", str(tmp_path)])
    assert code == 0
    doc = json.loads((tmp_path / "report.json").read_text())
    assert doc["mode"] == "dynamic" and doc["settings"]["tp"] == doc["settings"]["ep"] == 2
    req = doc["requests"]
    # Four prompts of different lengths, arriving over two steps, generating different counts.
    assert req["count"] == 4 and len(set(req["prompt_tokens"])) == 4 and len(set(req["new_tokens"])) > 1
    assert req["arrive_step"] == [0, 0, 1, 1] and req["generated_tokens"] == sum(req["new_tokens"])
    assert doc["lossless_same_tokens"] is True and doc["lossless_max_abs_diff"] <= 1e-4
    a2a, spec = doc["dispatchers"]["alltoall"], doc["dispatchers"]["specmoe"]
    assert set(a2a) == set(spec) and "allgather" not in doc["dispatchers"]
    # Every MoE token of every engine step: at least each prompt token and each decode token.
    assert a2a["tokens"] == spec["tokens"] >= sum(req["prompt_tokens"]) + req["generated_tokens"] - req["count"]
    for s in (a2a, spec):  # every pair accounted: 4 layers x tokens x top-4
        assert s["remote_pairs"] / (1 - s["local_activation_rate"]) == pytest.approx(4 * s["tokens"] * 4)
        assert len(s["forward_s"]) == len(s["a2a_s"]) == req["engine_steps"]
    assert spec["local_activation_rate"] > a2a["local_activation_rate"]
    assert spec["bytes_on_wire"] < a2a["bytes_on_wire"]
    assert (tmp_path / "lar.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = capsys.readouterr().out
    assert "specmoe" in text and "lossless = max |generated tokens' log-probs diff|" in text
    assert "fwd time = median engine step, ratio to alltoall" in text


@pytest.mark.skipif(CORE_19, reason="the refusal is for megatron-core older than 0.19")
def test_dynamic_demo_refused_before_core_19(capsys):
    assert main(["demo", "--engine", "dynamic"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert re.search(r"--engine dynamic needs megatron-core 0\.19 or newer \(found 0\.\d+\.\d+\).* -- "
                     r"use --engine static \(the default\), or install megatron-core 0\.19", err), err


def test_dynamic_demo_flags_refused_where_they_cannot_work(capsys):
    assert main(["demo", "--new-tokens", "4"]) == 2
    assert re.search(r"--new-tokens is a setting of the dynamic engine's request stream -- add --engine dynamic",
                     capsys.readouterr().err)
    if CORE_19:
        assert main(["demo", "--engine", "dynamic", "--ranks", "4", "--tp", "2"]) == 2
        assert "--engine dynamic runs one engine (DP = 1)" in capsys.readouterr().err
        assert main(["demo", "--engine", "dynamic", "--synthetic"]) == 2
        assert "--synthetic serves random tokens with the static engine only" in capsys.readouterr().err


def test_dynamic_demo_refuses_the_mla_model(capsys):
    # 0.19: MLA's latent cache (the only MLA path of the dynamic engine) fails with sequence
    # parallelism at TP > 1, so the demo cannot run alltoall like the shuffle; 0.16: no dynamic demo.
    code = main(["demo", "--model", "deepseek-style", "--engine", "dynamic"])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    if CORE_19:
        assert code == 2
        assert re.search(r"--engine dynamic with a multi-latent-attention model \(deepseek-style\): .*latent KV "
                         r"cache.*sequence parallelism at TP > 1.* -- use --engine static \(the default\)", err), err
    else:
        assert code == 1 and "--engine dynamic needs megatron-core 0.19 or newer" in err
