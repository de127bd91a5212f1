"""Reused buffers for the rows the shuffle collectives gather and permute within one layer.

Notation
    T: tokens of the shuffle domain.   T_pad = P * C: with the pad rows.   H: hidden size (plus
    any id columns riding along).

Why. Per layer and forward the shuffle path makes three [T_pad, H]-sized tensors that die inside
the layer: the all-gathered shards, the layer input put back in true order, and the partial sums
put in shuffled order before the reduce-scatter. Allocating them fresh each time is free on a
GPU (PyTorch's caching allocator) but not on the CPU, where buffers this large come from the
operating system and are touched page by page (page faults), and returned when freed. Megatron
reuses one buffer for its own sequence-parallel all-gather (``parallel_state``'s global memory
buffer) for the same reason. A ``Workspace`` does the same, explicitly: the model's
``ShuffleCarrier`` holds one, and the layers hand it to ``comm.shuffle`` as an argument.

Roles. A buffer is keyed by its role, dtype and device, and grows to the largest request. A
tensor taken for a role is valid until the next request for that role: each role must be dead by
then. The shuffle layer asks for each role once per layer ("gathered" and "true_order" in stage
1, "shuffled" in stage 4), the output layer's true-order gather asks for "gathered" and
"true_order" once more, and neither asks for a tensor that outlives it (a layer's output shard
and the model's logits are fresh tensors). The specmoe dispatcher keeps a workspace of its own
for "dispatch_send", the packed tokens + probs it hands to the all-to-all (dead once the call
returns). Static addresses also suit CUDA-graph capture.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

__all__ = ["WorkspaceRole", "Workspace"]

WorkspaceRole = Literal["gathered", "true_order", "shuffled", "dispatch_send"]


class Workspace:
    """Buffers by (role, dtype, device); ``take`` gives a contiguous view of the requested shape."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}
        # The last view handed out per buffer (a layer asks for the same shape every time).
        self._views: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    def take(self, role: WorkspaceRole, shape: tuple[int, ...], dtype: torch.dtype,
             device: torch.device) -> torch.Tensor:
        """An uninitialised contiguous tensor of ``shape`` in the ``role`` buffer (module
        docstring: valid until the next ``take`` of the same role)."""
        key = (role, dtype, torch.device(device))
        view = self._views.get(key)
        if view is not None and view.shape == shape:
            return view
        n = math.prod(shape)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < n:
            buf = torch.empty(n, dtype=dtype, device=device)
            self._buffers[key] = buf
        view = self._views[key] = buf[:n].view(shape)
        return view

    def nbytes(self) -> int:
        """Bytes the buffers hold."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())
