"""The shipped demo checkpoint loads at any TP/EP and computes the same logits; bad cards fail clearly.

One process computes the reference logits (and routes) of four different token batches; four
gloo ranks then load the same checkpoint at EP=4 and at TP=2 x EP=2 (no sequence parallelism),
each rank feeding the batch of its data-parallel rank, and must match in fp32 to 1e-5. A loader
that put an expert on the wrong rank or sliced a TP shard wrongly changes the logits.
"""

import dataclasses
import json
import os
import shutil
import warnings

import numpy as np
import pytest
import torch

from megatron_specmoe.testing.spawn import run_local
from megatron_specmoe.megatron import checkpoint

TOL = 1e-5
SEQ = 24
BATCH = 2
LAYOUTS = ((1, 4), (2, 2))  # (tp, ep) on 4 ranks


def _tokens(dp_rank: int, vocab: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 + dp_rank)
    return torch.randint(0, vocab, (BATCH, SEQ), generator=gen)


def _forward(model, tokens):
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand(tokens.shape[0], -1)
    mask = torch.triu(torch.ones(1, 1, tokens.shape[1], tokens.shape[1], dtype=torch.bool), diagonal=1)
    with torch.no_grad():
        return model(tokens, pos, mask).float()


def _setup(tp: int, ep: int) -> None:
    from megatron_specmoe.megatron import cpu_support
    from megatron_specmoe.megatron import parallel

    warnings.filterwarnings("ignore")
    cpu_support.enable()
    parallel.initialize(parallel.ParallelLayout(tp=tp, ep=ep))


def _reference(rank, world_size, path):
    """Single process: logits and routes of the four batches, plus the loader's errors."""
    from megatron_specmoe.megatron import parallel
    from megatron_specmoe.megatron.route_recorder import RouteRecorder

    _setup(1, 1)
    try:
        model = checkpoint.load_model(path)
        card = checkpoint.read_card(path)
        rec = RouteRecorder.attach(model)
        logits, routes = [], []
        for dp in range(4):
            rec.clear()
            logits.append(_forward(model, _tokens(dp, card.shape.vocab)).numpy())
            routes.append(rec.routes())
        # The recorder's token order: sequence b alone gives rows b*SEQ .. (b+1)*SEQ-1.
        rec.clear()
        _forward(model, _tokens(0, card.shape.vocab)[1:])
        second_alone = rec.routes()
        rec.detach()
        _forward(model, _tokens(0, card.shape.vocab))
        after_detach = rec.num_tokens - second_alone.shape[1]  # nothing new recorded
        # Weights that do not fit: a card with half the experts, an extra key, a missing key.
        state = checkpoint.read_weights(card)
        small = dataclasses.replace(card, shape=dataclasses.replace(card.shape, experts=card.shape.experts // 2))
        errors = {}
        for name, target, weights in (
            ("shape", checkpoint.build_model(small), state),
            ("extra", model, {**state, "decoder.bogus.weight": torch.zeros(1)}),
            ("missing", model, {k: v for k, v in state.items() if k != "decoder.final_layernorm.weight"}),
        ):
            try:
                checkpoint.load_state(target, weights, source="ckpt")
                errors[name] = ""
            except ValueError as exc:
                errors[name] = str(exc)
        return dict(logits=logits, routes=routes, second_alone=second_alone,
                    after_detach=after_detach, errors=errors)
    finally:
        parallel.destroy()


def _sharded(rank, world_size, path, layouts):
    """Every (tp, ep) layout in turn: this rank's logits and its recorded routes."""
    from megatron.core import parallel_state

    from megatron_specmoe.megatron import parallel
    from megatron_specmoe.megatron.route_recorder import RouteRecorder

    out = []
    for tp, ep in layouts:
        _setup(tp, ep)
        try:
            model = checkpoint.load_model(path, tp=tp, ep=ep)
            dp = parallel_state.get_data_parallel_rank()
            rec = RouteRecorder.attach(model)
            logits = _forward(model, _tokens(dp, checkpoint.read_card(path).shape.vocab)).numpy()
            rec.detach()
            out.append(dict(tp=tp, ep=ep, dp=dp, logits=logits, routes=rec.routes(),
                            local_experts=sum(1 for n, _ in model.named_parameters()
                                              if "local_experts" in n and "fc1" in n)))
        finally:
            parallel.destroy()
    return out


@pytest.fixture(scope="module")
def reference():
    return run_local(_reference, 1, checkpoint.demo_model_dir())[0]


def test_card_describes_shipped_files():
    card = checkpoint.read_card()
    assert os.path.isfile(card.weights_path) and os.path.isfile(card.tokenizer_path)
    assert checkpoint.sha256_file(card.tokenizer_path) == card.tokenizer_sha256
    state = checkpoint.read_weights(card)  # checks the sha256 and dtype
    assert state["embedding.word_embeddings.weight"].shape == (card.shape.vocab, card.shape.hidden)
    experts = {k.split(".local_experts.")[1].split(".")[0] for k in state if ".local_experts." in k}
    assert experts == {str(e) for e in range(card.shape.experts)}


def test_sharded_logits_match_single_process(reference):
    results = run_local(_sharded, 4, checkpoint.demo_model_dir(), LAYOUTS)
    card = checkpoint.read_card()
    for rank, per_layout in enumerate(results):
        for res in per_layout:
            ref = reference["logits"][res["dp"]]
            assert res["logits"].shape == ref.shape == (BATCH, SEQ, card.shape.vocab)
            diff = float(np.abs(res["logits"] - ref).max())
            assert diff <= TOL, (rank, res["tp"], res["ep"], diff)
            # Each rank holds E / EP experts per layer and routes its own batch like the reference.
            assert res["local_experts"] == card.shape.layers * card.shape.experts // res["ep"]
            np.testing.assert_array_equal(res["routes"], reference["routes"][res["dp"]])


def test_route_recorder_order_and_detach(reference):
    routes = reference["routes"][0]  # [L, B*S, k]
    card = checkpoint.read_card()
    assert routes.shape == (card.shape.layers, BATCH * SEQ, card.shape.topk)
    np.testing.assert_array_equal(reference["second_alone"], routes[:, SEQ:])
    # k distinct experts per token, and the router spreads tokens over many experts.
    assert all(len(set(r)) == card.shape.topk for r in routes.reshape(-1, card.shape.topk))
    assert len(np.unique(routes[0])) > card.shape.experts // 2
    assert reference["after_detach"] == 0


def test_mismatched_weights_name_the_key(reference):
    errors = reference["errors"]
    card = checkpoint.read_card()
    assert errors["shape"].startswith(
        f"ckpt: key 'decoder.layers.0.mlp.router.weight' has shape ({card.shape.experts}, {card.shape.hidden})")
    assert "the card's shape does not match the weights" in errors["shape"]
    assert "key(s) the model does not have, e.g. 'decoder.bogus.weight'" in errors["extra"]
    assert "key 'decoder.final_layernorm.weight' is missing" in errors["missing"]


def _copy(tmp_path):
    src = checkpoint.read_card()
    dst = tmp_path / "ckpt"
    dst.mkdir()
    for name in ("model.json", src.weights_file, src.tokenizer_file):
        shutil.copy(os.path.join(src.directory, name), dst / name)
    return dst


def _edit_card(path, fn):
    card = json.loads((path / "model.json").read_text())
    fn(card)
    (path / "model.json").write_text(json.dumps(card))


def test_corrupt_weights_fail_on_sha256(tmp_path):
    path = _copy(tmp_path)
    card = checkpoint.read_card(path)
    with open(card.weights_path, "r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(ValueError, match="does not match model.json field 'weights_sha256'"):
        checkpoint.read_weights(card)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda c: c["shape"].pop("experts"), r"\(shape\): field 'experts' is missing"),
        (lambda c: c["shape"].update(experts="32"), r"field 'experts' should be int"),
        (lambda c: c["shape"].update(expert_count=32), r"field 'shape' has unknown keys \['expert_count'\]"),
        (lambda c: c.update(version=99), r"field 'version' is 99"),
        (lambda c: c.update(weights_dtype="int8"), r"field 'weights_dtype' is 'int8'"),
        (lambda c: c.pop("config"), r"field 'config' is missing"),
    ],
)
def test_bad_card_names_the_field(tmp_path, edit, match):
    path = _copy(tmp_path)
    _edit_card(path, edit)
    with pytest.raises(ValueError, match=match):
        checkpoint.read_card(path)


def test_wrong_dtype_and_missing_weights(tmp_path):
    path = _copy(tmp_path)
    _edit_card(path, lambda c: c.update(weights_dtype="bfloat16"))
    with pytest.raises(ValueError, match="model.json field 'weights_dtype' says bfloat16"):
        checkpoint.read_weights(checkpoint.read_card(path), verify=False)
    os.remove(path / "model.pt")
    with pytest.raises(ValueError, match=r"weights file \(model.json field 'weights_file'\) of .*model\.pt: no such file"):
        checkpoint.read_card(path)  # the card names a file that is not there: refused on reading the card


def test_recorder_reads_both_router_output_forms():
    from megatron_specmoe.megatron.route_recorder import _topk_from_output

    # (probs [N, E], routing_map [N, E]): token 0 picks experts 2 (0.6) and 3 (0.4); token 1 picks
    # 1 and 2 with equal probability (id order).
    probs = torch.tensor([[0.0, 0.0, 0.6, 0.4], [0.0, 0.5, 0.5, 0.0]])
    experts, p = _topk_from_output((probs, probs > 0), 2)
    assert experts.tolist() == [[2, 3], [1, 2]]
    assert p.reshape(-1).tolist() == pytest.approx([0.6, 0.4, 0.5, 0.5])
    # (probs [N, k], top_indices [N, k]) of core 0.19's inference router: sorted by probability.
    experts, p = _topk_from_output((torch.tensor([[0.4, 0.6], [0.5, 0.5]]), torch.tensor([[3, 2], [2, 1]])), 2)
    assert experts.tolist() == [[2, 3], [2, 1]]
    with pytest.raises(ValueError, match="token 1 has 1 experts in the routing map, expected top-k=2"):
        _topk_from_output((probs, torch.tensor([[False, False, True, True], [False, True, False, False]])), 2)


def test_corpus_splits_by_file(tmp_path):
    from megatron_specmoe.demo import corpus

    files = {"a.py": "x = 1\n", "pkg/b.py": "y = 2\n", "pkg/c.txt": "not python",
             "site-packages/d.py": "third party", "pkg/__pycache__/e.py": "cache"}
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    (tmp_path / "latin1.py").write_bytes(b"s = '\xe9'\n")
    got = corpus.read_corpus(str(tmp_path))
    assert [f.relpath for f in got.files] == ["a.py", "pkg/b.py"]
    assert got.skipped == ("latin1.py",)
    assert [f.split for f in got.files] == [corpus.split_of("a.py"), corpus.split_of("pkg/b.py")]
    # The split is a function of the path only: about 80/10/10 over many paths.
    counts = {s: 0 for s in ("fit", "calibration", "evaluation")}
    for i in range(3000):
        counts[corpus.split_of(f"m{i}.py")] += 1
    assert 2250 < counts["fit"] < 2550 and 200 < counts["calibration"] < 400 and 200 < counts["evaluation"] < 400
    with pytest.raises(ValueError, match="split 'train' is not one of"):
        got.of("train")
