"""Count every ``torch.distributed`` collective a piece of code issues, at the raw functions.

Tests use this to check claims about communication ("the shuffle sends what Megatron sends") on
what was actually called, independently of the library's own accounting (``comm.shuffle``'s
``CollectiveCounter`` counts only where the library chose to count itself).

``count_collectives(counter)`` is an explicit, reversible patch (``megatron.patching.Patch``):
for each name in ``COLLECTIVES`` it wraps ``torch.distributed.<name>`` and every alias of the
same function object bound at import in an imported ``megatron`` or ``megatron_specmoe`` module
(Megatron binds ``dist_all_gather_func = torch.distributed.all_gather_into_tensor`` and the like).
Each call appends one ``CollectiveCall`` and then runs the original. On exit every original is
restored. Nesting is refused (a second counter would silently see nothing).

Notation: N the payload of a call in bytes, always the full tensor of the operation (see
``CollectiveCall.payload_bytes``); P the size of the group it ran on.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal, Optional, get_args

import torch
import torch.distributed as dist

from megatron_specmoe.megatron.patching import Patch, apply_patches, patched_names, revert_patches

__all__ = ["COLLECTIVES", "CollectiveName", "CollectiveCall", "RawCollectiveCounter", "count_collectives"]

CollectiveName = Literal[
    "all_reduce",
    "reduce_scatter_tensor",
    "all_gather_into_tensor",
    "all_gather",
    "reduce_scatter",
    "all_to_all_single",
    "all_to_all",
    "broadcast",
    "_reduce_scatter_base",
    "_all_gather_base",
]
COLLECTIVES: tuple[str, ...] = get_args(CollectiveName)


@dataclass(frozen=True, kw_only=True)
class CollectiveCall:
    """One call of a raw collective.

    Attributes:
        name: the ``torch.distributed`` function.
        group_ranks: global ranks of the group it ran on (the world for ``group=None``).
        payload_bytes: N, the full tensor of the operation: the all-reduced / broadcast tensor;
            the reduce-scatter input (all of it); the all-gather output (all of it); the
            all-to-all input.
        dtype: element type of the payload, e.g. ``"torch.float32"``.
        rows: first dimension of the payload (0 for a scalar).
    """

    name: str
    group_ranks: tuple[int, ...]
    payload_bytes: int
    dtype: str
    rows: int


@dataclass(kw_only=True)
class RawCollectiveCounter:
    """The calls seen, in order (mutable; one per measurement)."""

    calls: list[CollectiveCall] = field(default_factory=list)

    def on(self, group=None) -> list[CollectiveCall]:
        """The calls on ``group`` (a process group; None: the world), in order."""
        ranks = _ranks(group)
        return [c for c in self.calls if c.group_ranks == ranks]

    def signature(self, group=None) -> Counter:
        """Multiset of (name, payload_bytes, dtype) on ``group``: what "same collectives" compares."""
        return Counter((c.name, c.payload_bytes, c.dtype) for c in self.on(group))

    def clear(self) -> None:
        self.calls.clear()


def _ranks(group) -> tuple[int, ...]:
    if group is None:
        return tuple(range(dist.get_world_size()))
    return tuple(dist.get_process_group_ranks(group))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# Per function: the argument whose size is N, and whether it is a list of tensors.
_PAYLOAD_ARG = {
    "all_reduce": "tensor",
    "broadcast": "tensor",
    "reduce_scatter_tensor": "input",
    "_reduce_scatter_base": "input",
    "all_to_all_single": "input",
    "all_gather_into_tensor": "output_tensor",
    "_all_gather_base": "output_tensor",
    "all_gather": "tensor_list",
    "reduce_scatter": "input_list",
    "all_to_all": "input_tensor_list",
}


def _record(counter: RawCollectiveCounter, name: str, signature: inspect.Signature, args, kwargs) -> None:
    bound = signature.bind(*args, **kwargs)
    payload = bound.arguments[_PAYLOAD_ARG[name]]
    tensors = list(payload) if isinstance(payload, (list, tuple)) else [payload]
    first = tensors[0] if tensors else torch.empty(0)
    counter.calls.append(CollectiveCall(
        name=name,
        group_ranks=_ranks(bound.arguments.get("group")),
        payload_bytes=sum(_nbytes(t) for t in tensors),
        dtype=str(first.dtype),
        rows=int(sum(t.shape[0] if t.dim() else 0 for t in tensors)),
    ))


def _wrap(counter: RawCollectiveCounter, name: str, fn):
    signature = inspect.signature(fn)

    def counted(*args, **kwargs):
        _record(counter, name, signature, args, kwargs)
        return fn(*args, **kwargs)

    counted.__wrapped__ = fn
    counted.__name__ = name
    return counted


def _owners() -> list:
    """Modules that may hold an alias of a collective: torch.distributed first, then every
    imported megatron / megatron_specmoe module."""
    owners = [dist]
    for mod_name, mod in list(sys.modules.items()):
        if mod is not None and mod_name.split(".")[0] in ("megatron", "megatron_specmoe"):
            owners.append(mod)
    return owners


def _patches(counter: RawCollectiveCounter) -> list[Patch]:
    patches = []
    for name in COLLECTIVES:
        original = getattr(dist, name, None)
        if original is None:
            continue
        wrapped = _wrap(counter, name, original)
        for owner in _owners():
            for attr, value in list(vars(owner).items()):
                if value is original:
                    patches.append(Patch(owner=owner, name=attr, replacement=wrapped,
                                         why=f"count calls of torch.distributed.{name}"))
    return patches


@contextlib.contextmanager
def count_collectives(counter: Optional[RawCollectiveCounter] = None):
    """Within the block every raw collective call is appended to ``counter`` (a new one if None),
    which is yielded. Reversed on exit, also on an exception."""
    counter = RawCollectiveCounter() if counter is None else counter
    patches = _patches(counter)
    for p in patches:
        if p.name in patched_names(p.owner):
            raise RuntimeError(
                f"count_collectives: {getattr(p.owner, '__name__', p.owner)}.{p.name} is already patched "
                "(a counter is active, or another patch holds it); nested counting is not supported"
            )
    applied = apply_patches(patches)
    try:
        yield counter
    finally:
        revert_patches(applied)
