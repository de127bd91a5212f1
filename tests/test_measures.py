"""Measures and accounting on hand-worked examples."""

import pytest
import torch

from megatron_specmoe.measure.accounting import DispatchRecord, TrafficReport
from megatron_specmoe.measure.measures import WireFormat, measure_routes, rank_hits, traffic_matrix
from megatron_specmoe.schedule.placement import ExpertPlacement

# 4 experts on 2 ranks; placement puts logical {3, 0} on rank 0 and {1, 2} on rank 1.
PLACEMENT = ExpertPlacement(physical_to_logical=(3, 0, 1, 2), ep_size=2)
# Four tokens, top-2 logical experts.
TOPK = torch.tensor([[0, 3], [1, 2], [0, 1], [2, 3]])
HOME = torch.tensor([0, 0, 1, 1])


def _hits():
    rank_of = torch.as_tensor(PLACEMENT.rank_of_logical())
    return rank_hits(rank_of[TOPK], 2)


def test_rank_hits_by_hand():
    # token0 {0,3} -> both rank 0; token1 {1,2} -> rank 1; token2 {0,1} -> 1 and 1; token3 {2,3} -> 1 and 1
    assert _hits().tolist() == [[2, 0], [0, 2], [1, 1], [1, 1]]


def test_rank_hits_ignores_dropped():
    assert rank_hits(torch.tensor([[1, -1]]), 2).tolist() == [[0, 1]]


def test_measures_by_hand():
    m = measure_routes(_hits(), HOME)
    # local pairs: t0 2 (home 0), t1 0 (home 0, both on 1), t2 1, t3 1 -> 4 of 8
    assert (m.tokens, m.pairs, m.local_pairs, m.remote_pairs) == (4, 8, 4, 4)
    assert m.local_activation_rate == pytest.approx(0.5)
    assert m.remote_pairs_per_token == pytest.approx(1.0)
    # remote ranks: t0 0, t1 1, t2 1, t3 1
    assert m.remote_ranks_per_token == pytest.approx(0.75)
    # load: rank 0 computes 2+0+1+1 = 4, rank 1 4 -> balanced
    assert m.load_per_rank == (4, 4)
    assert m.load_imbalance == pytest.approx(1.0)


def test_traffic_matrix_by_hand():
    assert traffic_matrix(_hits(), HOME, 2).tolist() == [[2, 2], [2, 2]]


def test_record_bytes_by_hand():
    # rank 1 holds tokens 2 and 3: it sends 1+1 pairs to rank 0, keeps 2 local.
    hits = _hits()[2:]
    m = measure_routes(hits, torch.tensor([1, 1]))
    wire = WireFormat(hidden_size=8, activation_bytes=2, prob_bytes=4)  # bf16 rows, fp32 probs
    rec = DispatchRecord(layer_number=3, ep_rank=1, ep_size=2, pairs_to_rank=m.load_per_rank, wire=wire, measures=m)
    assert rec.pairs_to_rank == (2, 2)
    assert rec.remote_pairs == 2
    assert rec.dispatch_bytes_to_rank == (2 * (8 * 2 + 4), 0)  # 40 bytes to rank 0
    assert rec.combine_bytes_from_rank == (2 * 8 * 2, 0)  # 32 bytes back


def test_traffic_report_stacks_ranks():
    wire = WireFormat(hidden_size=8, activation_bytes=2)
    rows = []
    for rank in (1, 0):
        sel = HOME == rank
        m = measure_routes(_hits()[sel], HOME[sel])
        rows.append(DispatchRecord(layer_number=1, ep_rank=rank, ep_size=2, pairs_to_rank=m.load_per_rank,
                                   wire=wire, measures=m))
    rep = TrafficReport.from_records(rows)
    assert rep.pairs == ((2, 2), (2, 2))
    assert rep.dispatch_bytes == ((0, 40), (40, 0))
    assert rep.bytes_on_wire == 2 * 40 + 2 * 32
    assert rep.measures.local_activation_rate == pytest.approx(0.5)


def test_traffic_report_rejects_missing_rank():
    wire = WireFormat(hidden_size=8, activation_bytes=2)
    m = measure_routes(_hits(), HOME)
    rec = DispatchRecord(layer_number=1, ep_rank=0, ep_size=2, pairs_to_rank=(1, 1), wire=wire, measures=m)
    with pytest.raises(ValueError, match="one record per EP rank"):
        TrafficReport.from_records([rec])


def test_measures_add_and_mismatch():
    a = measure_routes(_hits(), HOME)
    assert (a + a).pairs == 16
    with pytest.raises(ValueError, match="different EP sizes"):
        a + measure_routes(torch.ones(1, 3, dtype=torch.long), torch.tensor([0]))
