"""Re-derive the fitted constants of megatron_specmoe/sim/cluster.py from calibration.csv.

Two constants are fitted to published figures; this prints the evidence for each:

    H800 achieved NVLink   from DeepEP's intranode rows (use = fit, metric deepep_nvl_bw): the bytes
                           the model puts on NVLink (self copies excluded) over the measured time
                           minus the assumed fixed cost.
    DeepEP low-latency     from the low-latency rows: measured time minus the model's bytes / bw
    fixed costs            term (the model run with zero fixed cost); their spread shows whether
                           a per-message term is visible.

    python tools/fit_calibration.py
"""

from __future__ import annotations

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    import numpy as np
    import torch

    from megatron_specmoe.schedule.placement import ExpertPlacement
    from megatron_specmoe.sim.calibration import load_rows, predict
    from megatron_specmoe.sim.cluster import cluster_preset
    from megatron_specmoe.sim.simulate import route_counts
    from megatron_specmoe.sim.synthetic import synthetic_routes

    torch.set_num_threads(1)
    rows = load_rows()
    print("# H800 NVLink implied by DeepEP's intranode normal kernels")
    h800 = cluster_preset("h800-ib")
    for row in rows:
        if row.metric != "deepep_nvl_bw" or row.preset != "h800-ib":
            continue
        tokens = row.tokens_per_rank * row.ep
        trace = synthetic_routes(num_tokens=tokens, num_experts=row.num_experts, top_k=row.top_k)
        counts = route_counts(trace, [ExpertPlacement.contiguous(row.num_experts, row.ep)],
                              (np.arange(tokens) // row.tokens_per_rank)[:, None], num_ranks=row.ep,
                              gpus_per_node=8, tokens_per_step=tokens)
        per_row = row.hidden + row.hidden // 128 * 4 if row.phase == "dispatch" else 2 * row.hidden
        logical = counts.copies.sum(-2).mean() * per_row  # DeepEP's count, self copies included
        time_s = logical / (row.measured * 1e9)
        off = counts.copies[0, 0] * ~np.eye(row.ep, dtype=bool)
        wire = off.sum(0).max() * per_row  # busiest GPU's NVLink receive
        fixed = h800.latency.deepep_normal_intra_s
        print(f"{row.id}: measured {row.measured:g} GB/s logical -> {time_s * 1e6:.0f} us; busiest GPU receives "
              f"{wire / 1e6:.1f} MB -> {wire / (time_s - fixed) / 1e9:.0f} GB/s on the wire "
              f"(after the {fixed * 1e6:.0f} us fixed cost)")
    print(f"preset h800-ib uses {h800.nvlink_bw_bytes_per_s / 1e9:.0f} GB/s")

    print("\n# DeepEP low-latency residuals: measured - model without fixed cost")
    for phase in ("dispatch", "combine"):
        residuals = []
        for row in rows:
            if row.metric != "latency" or row.phase != phase:
                continue
            base = cluster_preset(row.preset)
            zero = dataclasses.replace(base.latency, deepep_ll_dispatch_s=0.0, deepep_ll_combine_s=0.0)
            bare = predict(row, dataclasses.replace(base, latency=zero))
            residuals.append(row.measured - bare)
            print(f"{row.id}: measured {row.measured:g} us, bytes / bw {bare:.1f} us, residual {row.measured - bare:.1f} us")
        fixed = getattr(cluster_preset("h800-ib").latency, f"deepep_ll_{phase}_s") * 1e6
        print(f"{phase}: residual median {np.median(residuals):.1f} us, range {min(residuals):.1f} .. "
              f"{max(residuals):.1f}; preset uses {fixed:.0f} us\n")
    print("command: " + " ".join([sys.executable, *sys.argv]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
