"""Attention linears that do not communicate, so that the shuffle layer owns attention's TP
collectives (``megatron/shuffle_layer.py``); the TransformerEngine versions are in
``megatron/te_shuffle.py``.

Notation
    H: hidden size.   P: attention TP size. Inputs and outputs are Megatron's: the column linear
    takes the already gathered input [S, B, H]; the row linear returns its partial sum [S, B, H]
    over this rank's columns and its bias separately.
"""

from __future__ import annotations

from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

__all__ = ["NoCommColumnParallelLinear", "NoCommRowParallelLinear"]


class NoCommColumnParallelLinear(ColumnParallelLinear):
    """Megatron's ColumnParallelLinear whose forward never communicates: the caller hands it the
    already gathered input (Megatron's own "caller communicates" switch, ``explicit_expert_comm``)."""

    specmoe_no_comm = True  # checked by ShuffleTransformerLayer (the TE versions set it too)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.explicit_expert_comm = True


class NoCommRowParallelLinear(RowParallelLinear):
    """Megatron's RowParallelLinear that returns its partial sum (no all-reduce or reduce-scatter)
    and its bias separately; the shuffle layer reduces it. Needs ``skip_bias_add=True`` (as
    attention's output projection is built)."""

    specmoe_no_comm = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not self.skip_bias_add:
            raise ValueError(
                "NoCommRowParallelLinear needs skip_bias_add=True (the shuffle layer folds the "
                "bias into the reduce-scatter); use it only as attention's linear_proj"
            )
        self.explicit_expert_comm = True
