import numpy as np
import pytest

from megatron_specmoe.schedule.placement import ExpertPlacement


def test_contiguous_and_groups():
    p = ExpertPlacement.contiguous(8, 4)
    assert p.is_contiguous and p.experts_per_rank == 2
    assert p.rank_of_logical().tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    q = ExpertPlacement.from_rank_groups([[5, 2], [7, 0], [1, 6], [3, 4]])
    assert q.physical_to_logical == (5, 2, 7, 0, 1, 6, 3, 4)
    assert q.rank_of_logical().tolist() == [1, 2, 0, 3, 3, 0, 2, 1]
    assert q.logical_to_physical()[np.array(q.physical_to_logical)].tolist() == list(range(8))
    assert ExpertPlacement.from_json(q.to_json()) == q


def test_not_a_permutation():
    with pytest.raises(ValueError, match=r"physical_to_logical must be a permutation.*repeated \[1\]"):
        ExpertPlacement(physical_to_logical=(0, 1, 1, 3), ep_size=2)
    with pytest.raises(ValueError, match=r"out of range \[7\]"):
        ExpertPlacement(physical_to_logical=(0, 1, 2, 7), ep_size=2)


def test_ep_size_must_divide():
    with pytest.raises(ValueError, match="ep_size=3 does not divide the number of experts E=8"):
        ExpertPlacement.contiguous(8, 3)
    with pytest.raises(ValueError, match="ep_size must be a positive integer"):
        ExpertPlacement.contiguous(8, 0)
    with pytest.raises(ValueError, match="same number of experts"):
        ExpertPlacement.from_rank_groups([[0, 1], [2]])


def test_check_matches_names_the_field():
    p = ExpertPlacement.contiguous(8, 4)
    with pytest.raises(ValueError, match="num_moe_experts=16"):
        p.check_matches(num_experts=16, ep_size=4)
    with pytest.raises(ValueError, match="expert_model_parallel_size=2"):
        p.check_matches(num_experts=8, ep_size=2)


@pytest.mark.parametrize("bad", [0.9, 1.0, True, "3", None, np.float32(2.0)])
def test_entries_must_be_integers(bad):
    """Issue 18 finding 10: 0.9 became expert 0, True expert 1, "3" expert 3, silently."""
    p2l = [bad, 1, 2, 3]
    with pytest.raises(ValueError, match=r"physical_to_logical must hold integer expert ids, got "):
        ExpertPlacement(physical_to_logical=tuple(p2l), ep_size=2)
    with pytest.raises(ValueError, match=r"integer expert ids"):
        ExpertPlacement.from_json({"physical_to_logical": p2l, "ep_size": 2})


@pytest.mark.parametrize("ep", [2.0, True, "2"])
def test_ep_size_must_be_an_integer(ep):
    with pytest.raises(ValueError, match=r"ep_size must be a positive integer"):
        ExpertPlacement(physical_to_logical=(0, 1, 2, 3), ep_size=ep)


def test_numpy_integers_are_fine():
    pl = ExpertPlacement(physical_to_logical=tuple(np.arange(4, dtype=np.uint8)[::-1]), ep_size=np.int64(2))
    assert pl.physical_to_logical == (3, 2, 1, 0) and all(type(x) is int for x in pl.physical_to_logical)
