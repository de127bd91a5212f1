"""The plan folder: exact round trip, checksum, versions, compatibility checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megatron_specmoe.artifacts import plan_folder as plan_mod
from megatron_specmoe.schedule.placement import ExpertPlacement
from megatron_specmoe.artifacts.plan_folder import (
    PLAN_FORMAT_VERSION,
    Plan,
    PlanHeader,
    load_plan,
    make_plan,
    save_plan,
)


def _example_plan() -> Plan:
    # 2 MoE layers, E = 4, P = 2: layer 1 swaps experts 1 and 2 between the ranks.
    placements = [
        ExpertPlacement.contiguous(4, 2),
        ExpertPlacement.from_rank_groups([[0, 2], [1, 3]]),
    ]
    state = {
        "token": {
            "config": {"min_count": 2, "smoothing": 0.5, "layers": [0, 1], "nested": {"a": None}},
            "arrays": {
                "table": np.arange(24, dtype=np.float16).reshape(2, 3, 4),
                "vocab": np.array([5, 9, 11], dtype=np.int64),
            },
        },
        "history": {
            "config": {"hidden": 16},
            "arrays": {"layer1/w": np.ones((3, 2), dtype=np.float32, order="F"),
                       "mask": np.array([True, False]), "scale": np.array(2.5)},
        },
    }
    return make_plan(num_layers=2, num_experts=4, topk=2, ep_size=2, vocab_size=32,
                     placements=placements, predictor_state=state,
                     arrays={"counts": np.array([[3, 1], [0, 7]], dtype=np.int32)},
                     notes={"fitted_on": ["a.json"], "lar": 0.61})


def test_round_trip_is_exact(tmp_path):
    plan = _example_plan()
    saved = save_plan(plan, tmp_path / "p")
    loaded = load_plan(tmp_path / "p")
    assert len(saved.header.checksum) == 64
    assert loaded.header == saved.header
    assert loaded.header.predictor_kinds == ("token", "history")
    assert loaded.header.created_by.startswith("megatron_specmoe ")
    assert [p.physical_to_logical for p in loaded.placements] == [(0, 1, 2, 3), (0, 2, 1, 3)]
    assert loaded.placements[1].rank_of_logical().tolist() == [0, 1, 0, 1]
    assert list(loaded.predictor_state) == ["token", "history"]
    for kind, state in plan.predictor_state.items():
        got = loaded.predictor_state[kind]
        assert got["config"] == state["config"]
        assert list(got["arrays"]) == list(state["arrays"])
        for name, arr in state["arrays"].items():
            assert got["arrays"][name].dtype == arr.dtype and got["arrays"][name].shape == arr.shape
            np.testing.assert_array_equal(got["arrays"][name], arr)
    np.testing.assert_array_equal(loaded.arrays["counts"], plan.arrays["counts"])
    assert loaded.source == str(tmp_path / "p")


def test_same_plan_same_checksum_and_default_placement(tmp_path):
    a = save_plan(_example_plan(), tmp_path / "a")
    b = save_plan(_example_plan(), tmp_path / "b")
    assert a.header.checksum == b.header.checksum
    bare = make_plan(num_layers=3, num_experts=8, topk=2, ep_size=4)
    assert all(p.is_contiguous and p.ep_size == 4 for p in bare.placements)
    back = load_plan(save_plan(bare, tmp_path / "bare").source)
    assert len(back.placements) == 3 and back.predictor_state == {} and back.arrays == {}
    assert back.header.hidden_size is None


def test_corrupt_tensors_are_refused(tmp_path):
    save_plan(_example_plan(), tmp_path)
    npz = tmp_path / "tensors.npz"
    data = bytearray(npz.read_bytes())
    data[len(data) // 2] ^= 0xFF
    npz.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"tensors\.npz: sha256 is [0-9a-f]{64} but plan\.json records"):
        load_plan(tmp_path)
    npz.unlink()
    with pytest.raises(ValueError, match=r"tensors\.npz: missing"):
        load_plan(tmp_path)


def test_bad_header_files(tmp_path):
    with pytest.raises(ValueError, match=r"no such plan folder"):
        load_plan(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"plan\.json: missing"):
        load_plan(tmp_path)
    save_plan(_example_plan(), tmp_path)
    hdr = tmp_path / "plan.json"
    text = hdr.read_text()
    hdr.write_text(text[:40])
    with pytest.raises(ValueError, match=r"plan\.json: not valid JSON at line \d+, column \d+"):
        load_plan(tmp_path)
    doc = json.loads(text)
    doc["arrays"] = []  # tensors.npz still holds array/counts
    _write_sealed(hdr, doc)  # past the header checksum, to reach the check behind it
    with pytest.raises(ValueError, match=r"does not list \['array/counts'\]"):
        load_plan(tmp_path)
    del doc["num_layers"]
    doc["arrays"] = ["counts"]
    _write_sealed(hdr, doc)
    with pytest.raises(ValueError, match=r"header lacks the field\(s\) \['num_layers'\]"):
        load_plan(tmp_path)


def _write_sealed(hdr, doc):
    """Write an edited header with a matching header_sha256 (what only save_plan should do)."""
    doc["header_sha256"] = plan_mod.header_digest(doc)
    hdr.write_text(json.dumps(doc))


def test_edited_header_is_refused(tmp_path):
    """Issue 18 finding 2: the checksum covered tensors.npz only, so "ep_size": 4 -> 2 loaded."""
    plan = make_plan(num_layers=2, num_experts=8, topk=2, ep_size=4)
    save_plan(plan, tmp_path)
    hdr = tmp_path / "plan.json"
    text = hdr.read_text()
    assert '"ep_size": 4' in text
    hdr.write_text(text.replace('"ep_size": 4', '"ep_size": 2'))
    with pytest.raises(ValueError, match=r"plan\.json: its sha256 is [0-9a-f]+\.\.\. but it records "
                       r"header_sha256 .* edited or corrupted .* -- re-run `specmoe plan`"):
        load_plan(tmp_path)
    assert '"notes": {}' in text
    hdr.write_text(text.replace('"notes": {}', '"notes": {"x": 1}', 1))
    with pytest.raises(ValueError, match=r"header was edited"):
        load_plan(tmp_path)
    hdr.write_text(text)
    assert load_plan(tmp_path).header.ep_size == 4


def _set_version(folder, version):
    hdr = folder / "plan.json"
    doc = json.loads(hdr.read_text())
    doc["format_version"] = version
    hdr.write_text(json.dumps(doc))
    return doc


def test_newer_and_unmigratable_older_versions_are_refused(tmp_path):
    save_plan(_example_plan(), tmp_path)
    _set_version(tmp_path, PLAN_FORMAT_VERSION + 1)
    with pytest.raises(ValueError, match=rf"version {PLAN_FORMAT_VERSION + 1} .* is newer .* upgrade megatron_specmoe"):
        load_plan(tmp_path)
    _set_version(tmp_path, PLAN_FORMAT_VERSION - 1)
    with pytest.raises(ValueError, match=rf"version {PLAN_FORMAT_VERSION - 1} .* older .* cannot be migrated -- re-run `specmoe plan`"):
        load_plan(tmp_path)


def test_older_version_with_a_migration_loads(tmp_path, monkeypatch):
    save_plan(_example_plan(), tmp_path)
    old = PLAN_FORMAT_VERSION - 1
    doc = _set_version(tmp_path, old)
    doc["model_topk"] = doc.pop("topk")  # pretend the old format named the field differently
    (tmp_path / "plan.json").write_text(json.dumps(doc))

    def migrate(d, arrays):
        d = dict(d, format_version=old + 1, topk=d["model_topk"])
        del d["model_topk"]
        return d, arrays

    monkeypatch.setitem(plan_mod._MIGRATIONS, old, migrate)
    assert load_plan(tmp_path).header.topk == 2


def test_check_compatible_names_each_field():
    plan = _example_plan()
    ok = dict(num_layers=2, num_experts=4, topk=2, ep_size=2)
    plan.check_compatible(**ok)
    plan.check_compatible(**ok, vocab_size=32, hidden_size=4096)  # plan has no hidden_size
    cases = [
        ("num_layers", 3, r"num_layers=2 but the run has num_layers=3; re-run `specmoe plan`"),
        ("num_experts", 8, r"num_experts=4 but the run has num_experts=8; re-run `specmoe plan`"),
        ("topk", 1, r"topk=2 but the run has topk=1; re-run `specmoe plan`"),
        ("ep_size", 4, r"ep_size=2 but the run has ep_size=4; re-run `specmoe plan` .*for ep_size=4"),
        ("vocab_size", 50, r"vocab_size=32 but the run has vocab_size=50; re-run `specmoe plan`"),
    ]
    for name, value, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            plan.check_compatible(**{**ok, name: value})
    sized = make_plan(num_layers=2, num_experts=4, topk=2, ep_size=2, hidden_size=64)
    sized.check_compatible(**ok, hidden_size=64)
    with pytest.raises(ValueError, match=r"hidden_size=64 but the run has hidden_size=128; re-run `specmoe plan`"):
        sized.check_compatible(**ok, hidden_size=128)
    with pytest.raises(ValueError, match=r"(?s)topk=2 .*topk=1.*ep_size=2 .*ep_size=1"):
        plan.check_compatible(**{**ok, "topk": 1, "ep_size": 1})


def test_invalid_plans_are_refused_when_built():
    with pytest.raises(ValueError, match=r"\['config'\] does not survive a JSON round trip"):
        make_plan(num_layers=1, num_experts=4, topk=2, ep_size=2,
                  predictor_state={"token": {"config": {"sizes": (1, 2)}, "arrays": {}}})
    with pytest.raises(ValueError, match=r"arrays\['x'\] has dtype object"):
        make_plan(num_layers=1, num_experts=4, topk=2, ep_size=2,
                  arrays={"x": np.array([{}, 1], dtype=object)})
    with pytest.raises(ValueError, match=r"1 placements for num_layers=2"):
        make_plan(num_layers=2, num_experts=4, topk=2, ep_size=2,
                  placements=[ExpertPlacement.contiguous(4, 2)])
    with pytest.raises(ValueError, match=r"layer 0: placement was made for ep_size=4"):
        make_plan(num_layers=1, num_experts=4, topk=2, ep_size=2,
                  placements=[ExpertPlacement.contiguous(4, 4)])
    with pytest.raises(ValueError, match=r"kind must be a non-empty str without '/'"):
        make_plan(num_layers=1, num_experts=4, topk=2, ep_size=2,
                  predictor_state={"a/b": {"config": {}, "arrays": {}}})
    header = PlanHeader(format_version=1, created_by="x", num_layers=1, num_experts=4, topk=2,
                        ep_size=2, predictor_kinds=("token",))
    with pytest.raises(ValueError, match=r"predictor_state has kinds \[\] but header\.predictor_kinds is \['token'\]"):
        Plan(header=header)
    with pytest.raises(ValueError, match=r"ep_size=3 does not divide num_experts=4"):
        PlanHeader(format_version=1, created_by="x", num_layers=1, num_experts=4, topk=2, ep_size=3)
