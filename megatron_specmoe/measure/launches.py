"""Kernel launches and host synchronisations of device code, counted the way a GPU would see them.

Notation
    op: one aten (or custom, e.g. ``specmoe::*``) operator call reaching the dispatcher below
        autograd, as a ``TorchDispatchMode`` sees it.

A GPU pays per launch, not per flop, at plan sizes. ``LaunchCounter`` counts every op a block of
code dispatches and sorts them:
    kernels      ops that launch work: everything but views (``OpOverload.is_view``) and the ops
                 that only allocate or relabel memory (``NO_KERNEL``). A custom op (our Triton
                 kernels are registered as ``specmoe::*``) counts once: its launch.
    triton       the ``specmoe::*`` ops among the kernels.
    host_syncs   ops that need the data on the host: ``.item()`` (``_local_scalar_dense``),
                 data-dependent output shapes (``nonzero``, ``unique``, ``masked_select``, ...), and
                 copies from a device to the CPU. Each one stalls the CPU on a GPU and breaks
                 CUDA-graph capture.
Work done outside torch (numpy "twins" on the CPU) dispatches no op and would count as free, so
measure device paths with the numpy fast paths switched off or on tensors of a device numpy
cannot read (``meta``), as ``tools/bench_plan.py`` and the tests do.

``HostSyncGuard`` raises at the first host-sync op instead of counting it (for tests).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["LaunchCounter", "LaunchCount", "HostSyncGuard", "HostSyncError", "NO_KERNEL", "HOST_SYNC_OPS"]

# Ops that allocate or relabel memory without a kernel.
NO_KERNEL = frozenset({
    "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty", "aten::new_empty_strided",
    "aten::_unsafe_view", "aten::lift_fresh", "aten::detach", "aten::alias", "aten::_reshape_alias",
    "aten::set_", "aten::resize_", "prim::device",
})

# Ops whose result the host must read (a synchronisation on a GPU, refused by CUDA-graph capture).
HOST_SYNC_OPS = frozenset({
    "aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::nonzero_static", "aten::unique_dim",
    "aten::_unique", "aten::_unique2", "aten::unique_consecutive", "aten::masked_select", "aten::equal",
    "aten::is_nonzero", "aten::_assert_async", "aten::repeat_interleave", "aten::bincount",
    "aten::histc", "aten::allclose",
})


@dataclass(frozen=True, kw_only=True)
class LaunchCount:
    """What one counted block dispatched. Attributes: kernels, triton, host_syncs, views (ops that
    launch nothing), by_op (op name -> calls, kernels only)."""

    kernels: int
    triton: int
    host_syncs: int
    views: int
    by_op: dict = field(default_factory=dict)


def _name(func) -> str:
    return func._schema.name if hasattr(func, "_schema") else str(func)


def _is_host_sync(name: str, args) -> bool:
    if name in HOST_SYNC_OPS:
        return True
    if name in ("aten::_to_copy", "aten::copy_", "aten::to"):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        devices = {t.device.type for t in tensors}
        return "cpu" in devices and len(devices) > 1
    return False


class LaunchCounter(TorchDispatchMode):
    """Count the ops of a block (module docstring): ``with LaunchCounter() as c: ...; c.result()``."""

    def __init__(self) -> None:
        super().__init__()
        self._kernels: Counter = Counter()
        self._views = 0
        self._syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _name(func)
        out = func(*args, **kwargs)
        if _is_host_sync(name, args) or (name in ("aten::_to_copy",) and _lands_on_cpu(args, kwargs)):
            self._syncs += 1
        if getattr(func, "is_view", False) or name in NO_KERNEL:
            self._views += 1
        else:
            self._kernels[name] += 1
        return out

    def result(self) -> LaunchCount:
        """The counts so far."""
        kernels = sum(self._kernels.values())
        triton = sum(n for op, n in self._kernels.items() if op.startswith("specmoe::"))
        return LaunchCount(kernels=kernels, triton=triton, host_syncs=self._syncs, views=self._views,
                           by_op=dict(self._kernels))


def _lands_on_cpu(args, kwargs) -> bool:
    """aten::_to_copy(x, device=cpu) of a tensor on another device: a device-to-host copy."""
    src = args[0] if args and isinstance(args[0], torch.Tensor) else None
    dst = kwargs.get("device")
    return src is not None and dst is not None and torch.device(dst).type == "cpu" and src.device.type != "cpu"


class HostSyncError(RuntimeError):
    """Raised by ``HostSyncGuard`` at an op that needs device data on the host."""


class HostSyncGuard(TorchDispatchMode):
    """Fail at the first host-sync op (``HOST_SYNC_OPS``, device-to-host copies) of a block."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _name(func)
        if _is_host_sync(name, args) or (name == "aten::_to_copy" and _lands_on_cpu(args, kwargs)):
            raise HostSyncError(
                f"{name} reads device data on the host (a synchronisation; CUDA graphs refuse it); "
                "keep the run-time path on the device with static shapes"
            )
        return func(*args, **kwargs)
