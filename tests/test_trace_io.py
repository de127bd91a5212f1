"""Trace readers/writers: round trips on small synthetic files, and one test per kind of bad file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megatron_specmoe.artifacts.trace_io import (
    cross_domain_split,
    dedup_routes,
    detect_format,
    leave_one_out_splits,
    read_layer_major_json,
    read_megatron_jsonl,
    read_trace,
    read_traces,
    write_trace,
)
from megatron_specmoe.artifacts.traces import RoutingTrace

# 3 tokens, 2 layers, top-2, E = 4. Token 2 repeats token 0's full route.
ROUTES = np.array(
    [
        [[0, 1], [2, 3]],
        [[3, 2], [1, 0]],
        [[0, 1], [2, 3]],
    ]
)


def _layer_major(routes: np.ndarray) -> dict:
    return {str(l): routes[:, l].tolist() for l in range(routes.shape[1])}


def _write_json(path, obj) -> str:
    path.write_text(json.dumps(obj))
    return str(path)


def _megatron_record(step, rank, layer, rows, topk=2, **extra) -> dict:
    rec = {"step": step, "stage": "pre_dispatch", "block": "decoder", "layer": layer, "rank": rank,
           "num_tokens": len(rows), "topk": topk, "top_indices": rows}
    rec.update(extra)
    return rec


def _write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


# ---- layer-major JSON ----------------------------------------------------------------------------
def test_layer_major_json_reads_token_routes(tmp_path):
    path = _write_json(tmp_path / "t.json", _layer_major(ROUTES))
    tr = read_layer_major_json(path, num_experts=4)
    assert tr.experts.shape == (3, 2, 2)
    assert tr.experts[1].tolist() == [[3, 2], [1, 0]]
    assert tr.num_experts == 4
    assert read_layer_major_json(path, num_experts=8).num_experts == 8


def test_json_formats_never_guess_the_expert_count(tmp_path):
    """Issue 18 finding 4: E was the largest id + 1, so one stray id changed the model."""
    path = _write_json(tmp_path / "t.json", _layer_major(ROUTES))
    with pytest.raises(ValueError, match=r"t\.json: a layer-major JSON trace does not record the number "
                       r"of experts .* -- pass --num-experts E"):
        read_layer_major_json(path)
    jl = _write_jsonl(tmp_path / "router_trace_rank0.jsonl", [_megatron_record(0, 0, 0, [[0, 1]])])
    with pytest.raises(ValueError, match=r"Megatron router-trace JSONL trace does not record the number"):
        read_megatron_jsonl(jl)
    with pytest.raises(ValueError, match=r"--num-experts 0: out of range 1\.\.65536"):
        read_layer_major_json(path, num_experts=0)
    with pytest.raises(ValueError, match=r"--num-experts 2\.5: not an integer"):
        read_layer_major_json(path, num_experts=2.5)


def test_layer_major_json_keys_out_of_order_in_file_are_sorted(tmp_path):
    obj = {"1": ROUTES[:, 1].tolist(), "0": ROUTES[:, 0].tolist()}
    tr = read_layer_major_json(_write_json(tmp_path / "t.json", obj), num_experts=4)
    np.testing.assert_array_equal(tr.experts, ROUTES)


def test_layer_major_json_unequal_layer_lengths(tmp_path):
    obj = _layer_major(ROUTES)
    obj["1"] = obj["1"][:2]
    path = _write_json(tmp_path / "short.json", obj)
    with pytest.raises(ValueError, match=r"short\.json: layer 1 has 2 tokens but layer 0 has 3"):
        read_layer_major_json(path, num_experts=4)


def test_layer_major_json_expert_out_of_range(tmp_path):
    path = _write_json(tmp_path / "t.json", _layer_major(ROUTES))
    with pytest.raises(ValueError, match=r"t\.json: layer 0, token 1: expert id 3 is out of range 0\.\.2"):
        read_layer_major_json(path, num_experts=3)


def test_layer_major_json_negative_id(tmp_path):
    obj = _layer_major(ROUTES)
    obj["0"][2] = [0, -1]
    with pytest.raises(ValueError, match=r"layer 0, token 2: expert id -1 is out of range 0\.\.3"):
        read_layer_major_json(_write_json(tmp_path / "t.json", obj), num_experts=4)


def test_layer_major_json_topk_mismatch_between_tokens(tmp_path):
    obj = _layer_major(ROUTES)
    obj["0"][1] = [3, 2, 1]
    with pytest.raises(ValueError, match=r"layer 0, token 1: has 3 experts but top-k is 2"):
        read_layer_major_json(_write_json(tmp_path / "t.json", obj), num_experts=4)


def test_layer_major_json_topk_mismatch_between_layers(tmp_path):
    obj = _layer_major(ROUTES)
    obj["1"] = [[r[0]] for r in obj["1"]]
    with pytest.raises(ValueError, match=r"layer 1, token 0: has 1 experts but top-k is 2"):
        read_layer_major_json(_write_json(tmp_path / "t.json", obj), num_experts=4)


def test_layer_major_json_truncated_file(tmp_path):
    path = tmp_path / "cut.json"
    text = json.dumps(_layer_major(ROUTES))
    path.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"cut\.json: not valid JSON at line 1, column \d+ \(char \d+\)"):
        read_layer_major_json(path, num_experts=4)


def test_layer_major_json_non_contiguous_keys(tmp_path):
    obj = {"0": ROUTES[:, 0].tolist(), "2": ROUTES[:, 1].tolist()}
    with pytest.raises(ValueError, match=r"not contiguous from 0: .*missing \[1\]"):
        read_layer_major_json(_write_json(tmp_path / "t.json", obj), num_experts=4)


def test_layer_major_json_missing_and_bad_keys(tmp_path):
    with pytest.raises(ValueError, match=r"no layer keys"):
        read_layer_major_json(_write_json(tmp_path / "empty.json", {}), num_experts=4)
    with pytest.raises(ValueError, match=r"key 'layer0' is not a layer number"):
        read_layer_major_json(_write_json(tmp_path / "bad.json", {"layer0": [[0, 1]]}), num_experts=4)
    with pytest.raises(ValueError, match=r"expert id '1' is not an integer"):
        read_layer_major_json(_write_json(tmp_path / "str.json", {"0": [[0, "1"]]}), num_experts=4)


# ---- Megatron-Core router trace -------------------------------------------------------------------
def _two_rank_files(tmp_path):
    # rank 0: step 0 has 2 tokens, step 1 has 1 token; rank 1: step 0 has 1 token. Layers 1 and 3
    # are the MoE layers (dense layers 0 and 2 have no router). Records appear in forward order.
    r0 = [
        _megatron_record(0, 0, 1, [[0, 1], [2, 3]]),
        _megatron_record(0, 0, 3, [[4, 5], [6, 7]]),
        _megatron_record(1, 0, 1, [[1, 0]]),
        _megatron_record(1, 0, 3, [[5, 4]]),
    ]
    r1 = [
        _megatron_record(0, 1, 1, [[7, 6]]),
        _megatron_record(0, 1, 3, [[3, 2]], hs_offset=0, hs_bytes=4, hs_shape=[1, 1]),
        {"step": 0, "stage": "pre_dispatch", "block": "mtp", "mtp_idx": 0, "layer": 0, "rank": 1,
         "num_tokens": 1, "topk": 2, "top_indices": [[0, 0]]},
    ]
    return _write_jsonl(tmp_path / "router_trace_rank0.jsonl", r0), _write_jsonl(
        tmp_path / "router_trace_rank1.jsonl", r1
    )


def test_megatron_jsonl_merges_step_major_then_rank(tmp_path, capsys):
    p0, p1 = _two_rank_files(tmp_path)
    tr = read_megatron_jsonl([p1, p0], num_experts=8)  # file order does not matter
    # (step 0, rank 0) two tokens, (step 0, rank 1) one token, (step 1, rank 0) one token.
    assert tr.experts.tolist() == [
        [[0, 1], [4, 5]],
        [[2, 3], [6, 7]],
        [[7, 6], [3, 2]],
        [[1, 0], [5, 4]],
    ]
    assert "skipped 1 record(s) of blocks other than 'decoder'" in capsys.readouterr().err


def test_megatron_jsonl_rank_filter_and_training_passes(tmp_path):
    # Two micro-batches in one training step on rank 0: the j-th record of each layer pairs up.
    recs = [
        _megatron_record(5, 0, 0, [[0, 1]]),
        _megatron_record(5, 0, 1, [[2, 3]]),
        _megatron_record(5, 0, 0, [[1, 2], [3, 0]]),
        _megatron_record(5, 0, 1, [[0, 3], [1, 2]]),
        _megatron_record(5, 1, 0, [[0, 0]]),
        _megatron_record(5, 1, 1, [[0, 0]]),
    ]
    path = _write_jsonl(tmp_path / "x.jsonl", recs)
    tr = read_megatron_jsonl(path, ranks=[0], num_experts=4)
    assert tr.experts.tolist() == [[[0, 1], [2, 3]], [[1, 2], [0, 3]], [[3, 0], [1, 2]]]
    assert tr.num_experts == 4


def test_megatron_jsonl_errors(tmp_path):
    bad_k = [_megatron_record(0, 0, 0, [[0, 1]]), _megatron_record(0, 0, 1, [[0]], topk=1)]
    with pytest.raises(ValueError, match=r"k\.jsonl: line 2: topk=1 but .*line 1 has topk=2"):
        read_megatron_jsonl(_write_jsonl(tmp_path / "k.jsonl", bad_k), num_experts=4)

    uneven = [_megatron_record(0, 0, 0, [[0, 1], [1, 0]]), _megatron_record(0, 0, 1, [[0, 1]])]
    with pytest.raises(ValueError, match=r"u\.jsonl: step 0, rank 0, pass 0: layers have unequal num_tokens"):
        read_megatron_jsonl(_write_jsonl(tmp_path / "u.jsonl", uneven), num_experts=4)

    missing_layer = [_megatron_record(0, 0, 0, [[0, 1]]), _megatron_record(0, 0, 1, [[0, 1]]),
                     _megatron_record(1, 0, 0, [[0, 1]])]
    with pytest.raises(ValueError, match=r"step 1, rank 0 has no records for layer\(s\) \[1\]"):
        read_megatron_jsonl(_write_jsonl(tmp_path / "m.jsonl", missing_layer), num_experts=4)

    rec = _megatron_record(0, 0, 0, [[0, 1]])
    del rec["top_indices"]
    with pytest.raises(ValueError, match=r"f\.jsonl: line 1: record lacks the field\(s\) \['top_indices'\]"):
        read_megatron_jsonl(_write_jsonl(tmp_path / "f.jsonl", [rec]), num_experts=4)

    count = [_megatron_record(0, 0, 0, [[0, 1]])]
    count[0]["num_tokens"] = 2
    with pytest.raises(ValueError, match=r"num_tokens=2 but top_indices has 1 rows"):
        read_megatron_jsonl(_write_jsonl(tmp_path / "n.jsonl", count), num_experts=4)

    with pytest.raises(ValueError, match=r"line 1 \(step 0, rank 0, layer 3\), token 0: expert id 5 is out of range 0\.\.3"):
        read_megatron_jsonl(_write_jsonl(tmp_path / "r.jsonl", [_megatron_record(0, 0, 3, [[5, 1]])]),
                            num_experts=4)


def test_megatron_jsonl_truncated_line_and_duplicate_file(tmp_path):
    p0, _ = _two_rank_files(tmp_path)
    lines = open(p0).read().splitlines()
    cut = tmp_path / "cut.jsonl"
    cut.write_text(lines[0] + "\n" + lines[1][:20] + "\n")
    with pytest.raises(ValueError, match=r"cut\.jsonl: not valid JSON at line 2, column \d+"):
        read_megatron_jsonl(cut, num_experts=8)
    copy = tmp_path / "copy.jsonl"
    copy.write_text(open(p0).read())
    with pytest.raises(ValueError, match=r"step 0, rank 0, layer 1 also appears in .*router_trace_rank0"):
        read_megatron_jsonl([p0, copy], num_experts=8)


# ---- compact npz -------------------------------------------------------------------------------------
def test_npz_round_trip_all_fields_smallest_dtype(tmp_path):
    tr = RoutingTrace(
        experts=ROUTES, num_experts=300,
        token_ids=np.array([5, 70000, 5]), positions=np.array([0, 1, 2]),
        request_ids=np.array([0, 0, 1]), probs=np.full(ROUTES.shape, 0.25, dtype=np.float32),
        source="synthetic",
    )
    path = tmp_path / "trace.bin"  # no suffix is added
    write_trace(tr, path)
    with np.load(path) as npz:
        assert npz["experts"].dtype == np.uint16  # 299 does not fit uint8
        assert npz["token_ids"].dtype == np.uint32
        assert npz["positions"].dtype == np.uint8
        header = json.loads(npz["header"].tobytes())
    assert header["format"] == "specmoe-trace" and header["num_experts"] == 300
    back = read_trace(path)
    for name in ("experts", "token_ids", "positions", "request_ids", "probs"):
        np.testing.assert_array_equal(getattr(back, name), getattr(tr, name))
        assert getattr(back, name).dtype == getattr(tr, name).dtype
    assert back.num_experts == 300


def test_npz_small_experts_use_uint8_and_no_optional_fields(tmp_path):
    tr = RoutingTrace(experts=ROUTES, num_experts=4)
    write_trace(tr, tmp_path / "t.npz")
    with np.load(tmp_path / "t.npz") as npz:
        assert npz["experts"].dtype == np.uint8
        assert sorted(npz.files) == ["experts", "header"]
    assert read_trace(tmp_path / "t.npz").token_ids is None


def test_npz_corrupt_and_wrong_files(tmp_path):
    write_trace(RoutingTrace(experts=ROUTES, num_experts=4), tmp_path / "t.npz")
    data = (tmp_path / "t.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.npz: not a readable \.npz trace"):
        read_trace(tmp_path / "cut.npz")
    np.savez(tmp_path / "plain.npz", experts=ROUTES)
    with pytest.raises(ValueError, match=r"plain\.npz: \.npz has no 'header' entry"):
        read_trace(tmp_path / "plain.npz")
    header = {"format": "specmoe-trace", "version": 99}
    np.savez(tmp_path / "new.npz", header=np.frombuffer(json.dumps(header).encode(), np.uint8))
    with pytest.raises(ValueError, match=r"new\.npz: trace format version 99 is not supported"):
        read_trace(tmp_path / "new.npz")


# ---- dispatch ----------------------------------------------------------------------------------------
def test_read_traces_detects_and_concatenates_every_format(tmp_path):
    js = _write_json(tmp_path / "a.json", _layer_major(ROUTES))
    npz = tmp_path / "b.npz"
    write_trace(RoutingTrace(experts=ROUTES[:1], num_experts=4), npz)
    jl = _write_jsonl(tmp_path / "c.jsonl", [_megatron_record(0, 0, 0, [[1, 2]]),
                                             _megatron_record(0, 0, 1, [[3, 0]])])
    noext = tmp_path / "d"
    noext.write_text(open(jl).read())
    assert detect_format(noext) == "megatron-jsonl"
    tr = read_traces([js, npz, jl], num_experts=4)
    assert tr.num_tokens == 3 + 1 + 1
    assert tr.experts[-1].tolist() == [[1, 2], [3, 0]]
    assert tr.experts[3].tolist() == ROUTES[0].tolist()
    with pytest.raises(ValueError, match=r"unknown fmt 'csv'"):
        read_traces([js], fmt="csv")


def test_read_traces_directory_means_rank_files(tmp_path):
    _two_rank_files(tmp_path)
    assert read_traces(tmp_path, num_experts=8).num_tokens == 4


# ---- dedup and splits ----------------------------------------------------------------------------
def test_dedup_keeps_first_occurrence():
    tr = RoutingTrace(experts=ROUTES, num_experts=4)
    out, kept = dedup_routes(tr)
    assert kept.tolist() == [0, 1]
    np.testing.assert_array_equal(out.experts, ROUTES[:2])
    # With token ids, equal routes of different tokens are both kept.
    tr = RoutingTrace(experts=ROUTES, num_experts=4, token_ids=np.array([7, 8, 9]))
    assert dedup_routes(tr)[1].tolist() == [0, 1, 2]


def test_cross_domain_split_counts_and_leave_one_out():
    a = RoutingTrace(experts=ROUTES, num_experts=4, source="a")
    b = RoutingTrace(experts=np.array([[[0, 1], [2, 3]], [[1, 1], [1, 1]]]), num_experts=4, source="b")
    split = cross_domain_split([a], [b], drop_seen_in_fit=True)
    assert (split.fit.num_tokens, split.fit_duplicates) == (2, 1)
    assert split.eval_seen_in_fit == 1
    assert split.eval.experts.tolist() == [[[1, 1], [1, 1]]]
    kept = cross_domain_split([a], [b])
    assert (kept.eval.num_tokens, kept.eval_seen_in_fit) == (2, 0)
    splits = leave_one_out_splits([a, b])
    assert [s.eval_sources for s in splits] == [("a",), ("b",)]
    assert [s.fit_sources for s in splits] == [("b",), ("a",)]
    with pytest.raises(ValueError, match=r"need at least 2 traces"):
        leave_one_out_splits([a])


def test_reads_what_megatron_core_router_tracer_writes(tmp_path):
    # The real writer (megatron-core >= 0.19; 0.16 has no tracer): two ranks, two decode steps,
    # MoE layers 1 and 3, handed over through the tracer's public record_indices().
    tracer_mod = pytest.importorskip("megatron.core.transformer.moe.router_trace")
    torch = pytest.importorskip("torch")
    for rank in (0, 1):
        tracer = tracer_mod.RouterTracer(str(tmp_path), max_steps=4, rank=rank)
        for step in range(2):
            # [num_tokens=2, num_layers=2, topk=2]; token 0 encodes (rank, step) in its ids.
            idx = torch.tensor([[[rank, 2 + step], [rank, 4 + step]], [[7, 6], [5, 4]]])
            tracer.record_indices(idx, layer_ids=[1, 3])
            tracer.advance_step()
        tracer.flush()
    tr = read_traces(tmp_path, num_experts=8)
    assert tr.experts[:, 0, :].tolist() == [
        [0, 2], [7, 6],  # step 0, rank 0
        [1, 2], [7, 6],  # step 0, rank 1
        [0, 3], [7, 6],  # step 1, rank 0
        [1, 3], [7, 6],  # step 1, rank 1
    ]
    assert tr.experts[2, 1].tolist() == [1, 4]
