"""The demo's forward-time statistic (demo/report.py): per-pair ratios on hand-made timings, and the
order the demo's models take turns in (demo/pipeline.py)."""

import pytest

from megatron_specmoe.demo.pipeline import _timing_order
from megatron_specmoe.demo.report import add_paired_ratios, format_table, paired_ratio


def test_paired_ratio_on_hand_made_timings():
    # Pairs (spec, base): 0.9/1.0, 2.2/2.0, 1.0/1.0, 3.0/2.0, 0.4/0.5 -> ratios 0.9, 1.1, 1.0, 1.5, 0.8;
    # sorted 0.8, 0.9, 1.0, 1.1, 1.5: median 1.0, inclusive quartiles 0.9 and 1.1.
    r = paired_ratio([0.9, 2.2, 1.0, 3.0, 0.4], [1.0, 2.0, 1.0, 2.0, 0.5])
    assert (r.median, r.low, r.high, r.pairs) == (pytest.approx(1.0), pytest.approx(0.8), pytest.approx(1.5), 5)
    assert (r.q1, r.q3) == (pytest.approx(0.9), pytest.approx(1.1))
    assert r.to_json() == {"median": r.median, "q1": r.q1, "q3": r.q3, "min": r.low, "max": r.high, "pairs": 5}


def test_a_load_spike_moves_one_pair_not_the_median():
    # The same work (ratio 1.0) but one baseline forward hit a spike (5x): the median of the two
    # sides' medians moves, the median of the pairs' ratios does not. 4 pairs: median of 1, 1, 1, 0.2.
    base = [1.0, 1.0, 5.0, 1.0]
    spec = [1.0, 1.0, 1.0, 1.0]
    r = paired_ratio(spec, base)
    assert r.median == pytest.approx(1.0) and r.low == pytest.approx(0.2) and r.high == pytest.approx(1.0)
    one_pair = paired_ratio([3.0], [2.0])
    assert (one_pair.median, one_pair.q1, one_pair.q3, one_pair.pairs) == (1.5, 1.5, 1.5, 1)


def test_paired_ratio_refuses_unpaired_or_empty_times():
    with pytest.raises(ValueError, match="equally long, non-empty"):
        paired_ratio([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="equally long, non-empty"):
        paired_ratio([], [])
    with pytest.raises(ValueError, match="baseline times must be > 0"):
        paired_ratio([1.0], [0.0])


def _summary(name, forward_s):
    return {"dispatcher": name, "forward_s": forward_s, "forward_s_median": sorted(forward_s)[len(forward_s) // 2],
            "remote_pairs_per_token": 1.0, "bytes_per_token": 10.0, "local_activation_rate": 0.5,
            "remote_ranks_per_token": 1.0, "load_imbalance": 1.0, "a2a_s_median": None}


def test_the_table_shows_the_paired_median_and_its_spread():
    summaries = [_summary("alltoall", [1.0, 2.0, 1.0]), _summary("specmoe", [0.9, 1.9, 1.2])]
    add_paired_ratios(summaries)
    assert summaries[0]["forward_ratio"]["median"] == 1.0 and summaries[0]["forward_ratio"]["pairs"] == 3
    assert summaries[1]["forward_ratio"]["median"] == pytest.approx(0.95)  # ratios 0.9, 0.95, 1.2
    text = format_table(summaries, 1e-6)
    assert "0.95x" in text.splitlines()[3]
    assert "fwd time specmoe / alltoall: median 0.950x, quartiles 0.925-1.075x, range 0.900-1.200x over 3 pairs" in text
    assert "fwd time = median forward, ratio to alltoall (the median over forwards of each one's ratio" in text
    # Times that cannot be paired (different counts) keep the ratio of the medians, and say nothing more.
    odd = [_summary("alltoall", [1.0, 2.0]), _summary("specmoe", [3.0])]
    add_paired_ratios(odd)
    text = format_table(odd, 0.0)
    assert odd[1]["forward_ratio"] is None and "1.50x" in text and "quartiles" not in text and "over forwards" not in text


def test_the_models_take_turns_in_an_order_that_reverses_every_step():
    names = ("alltoall", "allgather", "specmoe")
    orders = [_timing_order(names, step) for step in range(4)]
    assert orders == [names, names[::-1], names, names[::-1]]
    # Over two steps each model runs first once and last once.
    assert {orders[0][0], orders[1][0]} == {"alltoall", "specmoe"}
