"""Speculative token shuffling under Megatron's dynamic inference engine (core 0.19): continuous
batching of flat token batches mixing prefill chunks and decode tokens, padded to the engine's
token count, with requests arriving and finishing between steps. On 2 gloo ranks (TP = EP = 2),
the shuffle model's generated tokens equal Megatron's alltoall model's on the same request stream
and its log-probs agree within fp32 rounding (``testing/shuffle_dynamic.py``)."""

from __future__ import annotations

import pytest

pytest.importorskip("megatron.core.inference.config")  # core 0.19's dynamic engine
pytest.importorskip("einops")

from megatron_specmoe.testing.shuffle_dynamic import NEW_TOKENS, PROMPTS, DynamicCase, dynamic_shuffle_lossless  # noqa: E402
from megatron_specmoe.testing.spawn import run_local  # noqa: E402


@pytest.mark.parametrize("case", [
    DynamicCase(sequence_parallel=False, predictor="pregate"),
    DynamicCase(sequence_parallel=True, predictor="route"),
], ids=["pregate", "route-sequence-parallel"])
def test_shuffle_under_the_dynamic_engine_is_lossless(case):
    results = run_local(dynamic_shuffle_lossless, case.tp, case, timeout_s=400)
    for out in results:
        reference, shuffled = out["alltoall"], out["shuffle"]
        assert sorted(reference) == sorted(shuffled) == list(range(len(PROMPTS)))
        for i in reference:
            tokens, log_probs, finished_at = shuffled[i]
            assert tokens == reference[i][0] and len(tokens) == NEW_TOKENS[i]
            assert max(abs(a - b) for a, b in zip(log_probs, reference[i][1])) < 1e-5
            assert finished_at == reference[i][2]
        assert len({step for _, _, step in shuffled.values()}) > 1  # requests left at different steps
        assert out["plans"] > 0 and out["moved"] > 0  # the shuffle ran, and moved tokens
    assert results[0]["shuffle"] == results[1]["shuffle"]  # both TP ranks serve the same output
