"""The combined (token table + history MLP) predictor's rank scores in one Triton kernel
(``predict/combined_triton.py``), run in Triton's interpreter in a subprocess (skipped where triton
is absent):

- equal to the torch form (``CombinedScorer.scores(...) @ span_hosts(...)``) up to float rounding,
  for both rules, both member orders, ids outside the table, a windowed history MLP, E not a power
  of two, experts outside the TP span, P from 2 to 64, T = 1;
- the run-time scorer (``rank_scorers.HistoryScorer``, as a shuffle layer calls it) takes that
  path: 7 launches for the scores (the MLP's 6, the kernel), no host sync, the same scores as the
  torch form; without the interpreter (this CPU) it keeps the torch form;
- the refusal of an unknown backend, by pattern.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import json
from types import SimpleNamespace
import numpy as np
import torch
from megatron_specmoe.measure.launches import LaunchCounter
from megatron_specmoe.predict.device import CombinedScorer, ExpertTable
from megatron_specmoe.predict.history_mlp import HistoryLayerScorer
from megatron_specmoe.predict.pregate import span_hosts
from megatron_specmoe.predict.rank_scorers import HistoryScorer, ScoreInputs


def mlp(layers, e, window, gen):
    w = layers if window is None else min(layers, window)
    return HistoryLayerScorer(layer=layers, num_experts=e, prior=torch.full((e,), 1.0 / e), window=window,
                              w1=torch.randn(w * e, 24, generator=gen), b1=torch.randn(24, generator=gen),
                              w2=torch.randn(24, e, generator=gen), b2=torch.randn(e, generator=gen))


out = {"cases": []}
for t, p, e, window, ep_base in ((1, 2, 4, None, 0), (300, 4, 10, None, 1), (77, 8, 32, 2, 0), (130, 64, 200, None, 0)):
    gen = torch.Generator().manual_seed(t + p)
    layers = 3
    table = ExpertTable(table=torch.softmax(3 * torch.randn(101, e, generator=gen), dim=1))
    hist = mlp(layers, e, window, gen)
    ids = torch.randint(-3, 110, (t,), generator=gen)  # some outside 0 .. V-1 (V = 100)
    history = torch.randint(0, e, (t, layers, 2), generator=gen)
    rank_of = torch.randint(0, p + 2, (e,), generator=gen)  # some experts outside the span
    hosts = span_hosts(rank_of, ep_base=ep_base, tp=p)
    for rule in ("mixture", "max_confidence"):
        for members in ((table, hist), (hist, table)):
            c = CombinedScorer(members=members, rule=rule)
            want = c.rank_scores(token_ids=ids, history=history, hosts=hosts, backend="torch")
            with LaunchCounter() as counter:
                got = c.rank_scores(token_ids=ids, history=history, hosts=hosts)
            r = counter.result()
            out["cases"].append({"t": t, "p": p, "e": e, "rule": rule, "table_first": members[0] is table,
                                 "max_err": float((got - want).abs().max()) if t else 0.0,
                                 "shape": list(got.shape), "triton": r.triton, "kernels": r.kernels})

# The run-time scorer with a fitted-predictor stand-in, as a shuffle layer calls it.
gen = torch.Generator().manual_seed(5)
e, p, layers = 8, 4, 2
token_scores = torch.softmax(torch.randn(51, e, generator=gen), dim=1).numpy()
token = SimpleNamespace(kind="token", vocab_size=50,
                        expert_scores=lambda ctx: token_scores[np.where((ctx.token_ids >= 0) & (ctx.token_ids < 50), ctx.token_ids, 50)])
layer_mlp = mlp(layers, e, None, gen)
history_pred = SimpleNamespace(kind="history", layer_scorer=lambda layer, device: layer_mlp)
predictor = SimpleNamespace(kind="combined", predictors=(token, history_pred), rule="mixture")
scorer = HistoryScorer(predictor, vocab_size=50)
t = 96
inputs = ScoreInputs(num_tokens=t, tp=p, ep_base=0, moe_index=layers, layer_number=3, call=0, placement=None,
                     rank_of=torch.arange(e) % p, layer_input=None, gate=None, topk=2,
                     token_ids=torch.randint(0, 60, (t,), generator=gen),
                     history=torch.randint(0, e, (t, layers, 2), generator=gen))
scorer(inputs)  # first call: the device scorer and the constants
with LaunchCounter() as counter:
    got = scorer(inputs)
device_scorer = scorer._cache[1]
want = device_scorer.rank_scores(token_ids=inputs.token_ids, history=inputs.history,
                                 hosts=span_hosts(inputs.rank_of, ep_base=0, tp=p), backend="torch")
r = counter.result()
out["scorer"] = {"kernels": r.kernels, "triton": r.triton, "host_syncs": r.host_syncs, "by_op": r.by_op,
                 "max_err": float((got - want).abs().max()), "fused": device_scorer.fused_members() is not None}
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def interpreted():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed in this Python (megatron-core 0.19's venv has it)")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    run = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_kernel_equals_the_torch_form(interpreted):
    cases = interpreted["cases"]
    assert len(cases) == 16
    for c in cases:
        assert c["shape"] == [c["t"], c["p"]], c
        assert c["triton"] == 1, c  # the kernel ran (not the torch form)
        assert c["max_err"] < 1e-5, c
    assert {(c["rule"], c["table_first"]) for c in cases} == {
        ("mixture", True), ("mixture", False), ("max_confidence", True), ("max_confidence", False)}


def test_the_run_time_scorer_takes_the_kernel_path(interpreted):
    s = interpreted["scorer"]
    assert s["fused"] and s["host_syncs"] == 0 and s["triton"] == 1, s
    # The MLP (index add, embedding-bag offsets and bag, bias, relu, matmul) and the kernel.
    assert s["kernels"] == 7, s["by_op"]
    assert s["max_err"] < 1e-5, s


def test_without_the_interpreter_the_cpu_keeps_the_torch_form():
    from megatron_specmoe.predict.device import CombinedScorer, ExpertTable
    from megatron_specmoe.predict.history_mlp import HistoryLayerScorer
    from megatron_specmoe.predict.pregate import span_hosts

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs Triton's interpreter")
    gen = torch.Generator().manual_seed(0)
    hist = HistoryLayerScorer(layer=2, num_experts=4, prior=torch.full((4,), 0.25), w1=torch.randn(8, 5, generator=gen),
                              b1=torch.zeros(5), w2=torch.randn(5, 4, generator=gen), b2=torch.zeros(4))
    c = CombinedScorer(members=(ExpertTable(table=torch.softmax(torch.randn(11, 4, generator=gen), 1)), hist),
                       rule="mixture")
    ids, history = torch.randint(0, 12, (9,), generator=gen), torch.randint(0, 4, (9, 2, 1), generator=gen)
    hosts = span_hosts(torch.tensor([0, 0, 1, 1]), ep_base=0, tp=2)
    assert torch.equal(c.rank_scores(token_ids=ids, history=history, hosts=hosts),
                       c.scores(token_ids=ids, history=history) @ hosts)
    with pytest.raises(ValueError, match=r"CombinedScorer.rank_scores: backend must be 'auto' or 'torch', got 'cuda'"):
        c.rank_scores(token_ids=ids, history=history, hosts=hosts, backend="cuda")
