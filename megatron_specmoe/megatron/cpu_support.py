"""Run Megatron-Core's MoE layer and GPT model on a CPU-only torch with gloo (tests and demo).

Megatron-Core assumes CUDA in a handful of places. ``enable()`` patches exactly those, each for a
failure seen on a CPU build (docs/megatron_core.md, "Running on a CPU with gloo"), and ``disable()``
restores the originals. Nothing happens at import time, and ``enable()`` does nothing at all when
CUDA is available: GPU runs always use Megatron unmodified.

| failure on a CPU build                                     | patch                              |
| ---------------------------------------------------------- | ---------------------------------- |
| ``torch.cuda.current_device()`` asserts (router, layers)   | return ``"cpu"``                   |
| ``NameError: te_general_gemm`` without TE (0.16.1 bug)     | define ``moe_utils.te_general_gemm = None`` |
| alltoall dispatcher creates ``torch.cuda.Stream()``        | a no-op stream object on the class |
| alltoall DtoH sync uses CUDA streams; gloo's               | CPU version of                     |
|   ``all_to_all_single`` rejects tensor/numpy split sizes   |   ``_maybe_dtoh_and_synchronize``  |
|                                                            |   that turns splits into lists     |
| gloo rejects an uneven ``all_gather`` (TP > 1 dispatch)    | pad to the largest split, slice    |
| causal mask built with ``device="cuda"``                   | build it on the CPU                |
| CUDA RNG tracker ``add``/``fork`` call ``torch.cuda`` RNG   | a CPU RNG tracker with the same    |
|                                                            |   semantics (named CPU RNG states) |
| activation recompute saves / restores the CUDA RNG state   | no CUDA RNG state on the CPU: an   |
|   (``_get_cuda_rng_state`` / ``_set_cuda_rng_state``)      |   empty state, restoring is a no-op |
| ``isinstance(x, TELinear)`` in MLA's constructor, where    | a placeholder class no linear is   |
|   ``TELinear`` is no class without TE (0.16.1)             |   an instance of                   |

Usage::

    from megatron_specmoe.megatron import cpu_support
    cpu_support.enable()      # before building the model
    ...
    cpu_support.disable()
"""

from __future__ import annotations

import contextlib
import logging
from typing import Optional

import torch

from megatron_specmoe.megatron.patching import (
    Patch,
    apply_without_cuda,
    original,
    patched_names,
    revert_without_cuda,
)

__all__ = ["enable", "disable", "is_enabled", "needed"]

log = logging.getLogger(__name__)


def needed() -> bool:
    """True on a machine without CUDA (the only place these patches are applied)."""
    return not torch.cuda.is_available()


class _NoTELinear:
    """Stands in for TE's ``TELinear`` where megatron-core 0.16.1 tests ``isinstance`` against it
    without TE: no module is an instance of it."""


class _NoStream:
    """Stands in for ``torch.cuda.Stream`` on the CPU: nothing is asynchronous there."""

    def wait_stream(self, _other) -> None:
        return None

    def record_event(self):
        return _NoEvent()


class _NoEvent:
    def synchronize(self) -> None:
        return None


def _cpu_current_device() -> str:
    return "cpu"


def _to_list(x):
    if x is None or isinstance(x, list):
        return x
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return [int(v) for v in x]


def _cpu_maybe_dtoh_and_synchronize(self, point: str, tokens_per_expert: Optional[torch.Tensor] = None):
    """CPU stand-in for ``MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize``.

    Everything already lives on the host; only the EP split sizes need to become Python lists,
    which is what gloo's ``all_to_all_single`` accepts. ``output_splits_tp`` (the expert-TP
    all-gather sizes) is left a tensor, as on the GPU, because Megatron calls ``.tolist()`` on it.
    """
    if not self.drop_and_pad and point == self.cuda_dtoh_point:
        self.input_splits = _to_list(self.input_splits)
        self.output_splits = _to_list(self.output_splits)
        # output_splits_tp stays a tensor: Megatron's dispatch_postprocess calls
        # ``self.output_splits_tp.tolist()`` itself when the expert TP size (ETP) is > 1.
        if isinstance(self.num_out_tokens, torch.Tensor):
            self.num_out_tokens = int(self.num_out_tokens)
    return tokens_per_expert


def _make_padded_gather(original_fn):
    def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        """Uneven all-gather for gloo: pad every part to the largest split, gather, slice."""
        if output_split_sizes is None or len(set(int(s) for s in output_split_sizes)) <= 1:
            return original_fn(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(s) for s in output_split_sizes]
        largest = max(sizes)
        padded = input_.new_zeros((largest,) + tuple(input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        parts = [torch.empty_like(padded) for _ in sizes]
        torch.distributed.all_gather(parts, padded.contiguous(), group=group)
        return torch.cat([p[:s] for p, s in zip(parts, sizes)], dim=0)

    return _gather_along_first_dim


def _cpu_get_cuda_rng_state(*_args, **_kwargs) -> torch.Tensor:
    """No CUDA generator on the CPU: an empty state (the CPU state is saved separately)."""
    return torch.empty(0, dtype=torch.uint8)


def _cpu_set_cuda_rng_state(*_args, **_kwargs) -> None:
    return None


def _cpu_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _cpu_sliding_window_mask(sq, skv, window_size):
    m = torch.ones(sq, skv, dtype=torch.bool)
    mu = torch.triu(m, diagonal=skv - sq - window_size[0])
    return ~torch.tril(mu, diagonal=skv - sq + window_size[1])


def _cpu_tracker_add(self, name, seed):
    """Named CPU RNG state, same bookkeeping and errors as the CUDA tracker."""
    self._is_initialized = True
    if seed in self.seeds_:
        raise Exception(f"seed {seed} already exists")
    self.seeds_.add(seed)
    if name in self.states_:
        raise Exception(f"cuda rng state {name} already exists")
    saved = torch.get_rng_state()
    torch.manual_seed(seed)
    self.states_[name] = torch.get_rng_state()
    torch.set_rng_state(saved)


@contextlib.contextmanager
def _cpu_tracker_fork(self, name="model-parallel-rng"):
    if name not in self.states_:
        raise Exception(f"cuda rng state {name} is not added")
    saved = torch.get_rng_state()
    torch.set_rng_state(self.states_[name])
    try:
        yield
    finally:
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)


def _patches() -> list[Patch]:
    from megatron.core.fusions import fused_softmax
    from megatron.core.tensor_parallel import mappings, random as mrandom
    from megatron.core.transformer import utils as tutils
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    patches = [
        Patch(owner=torch.cuda, name="current_device", replacement=_cpu_current_device,
              why="torch.cuda.current_device() asserts on a CPU build"),
        Patch(owner=MoEAlltoAllTokenDispatcher, name="cuda_dtoh_stream", replacement=_NoStream(),
              why="the alltoall dispatcher creates torch.cuda.Stream()"),
        Patch(owner=MoEAlltoAllTokenDispatcher, name="_maybe_dtoh_and_synchronize",
              replacement=_cpu_maybe_dtoh_and_synchronize,
              why="CUDA streams in the DtoH sync; gloo needs list split sizes"),
        Patch(owner=mappings, name="_gather_along_first_dim",
              replacement=_make_padded_gather(original(mappings, "_gather_along_first_dim")),
              why="gloo rejects an uneven all_gather"),
        Patch(owner=tutils, name="get_default_causal_mask", replacement=_cpu_causal_mask,
              why="causal mask built with device='cuda'"),
        Patch(owner=fused_softmax, name="get_default_causal_mask", replacement=_cpu_causal_mask,
              why="causal mask built with device='cuda' (imported by name)"),
        Patch(owner=tutils, name="get_sliding_window_causal_mask", replacement=_cpu_sliding_window_mask,
              why="sliding-window mask built with device='cuda'"),
        Patch(owner=fused_softmax, name="get_sliding_window_causal_mask",
              replacement=_cpu_sliding_window_mask,
              why="sliding-window mask built with device='cuda' (imported by name)"),
        Patch(owner=mrandom.CudaRNGStatesTracker, name="add", replacement=_cpu_tracker_add,
              why="the RNG tracker seeds CUDA generators"),
        Patch(owner=mrandom.CudaRNGStatesTracker, name="fork", replacement=_cpu_tracker_fork,
              why="the RNG tracker forks CUDA generator states"),
        Patch(owner=mrandom, name="_get_cuda_rng_state", replacement=_cpu_get_cuda_rng_state,
              why="activation recompute saves the CUDA RNG state"),
        Patch(owner=mrandom, name="_set_cuda_rng_state", replacement=_cpu_set_cuda_rng_state,
              why="activation recompute restores the CUDA RNG state"),
    ]
    from megatron.core.transformer import multi_latent_attention as mla

    if not isinstance(mla.__dict__.get("TELinear", type), type) or "TELinear" in patched_names(mla):
        patches.append(Patch(owner=mla, name="TELinear", replacement=_NoTELinear,
                             why="isinstance(..., TELinear) where TELinear is no class without TE (0.16.1)"))
    if "te_general_gemm" not in moe_utils.__dict__ or "te_general_gemm" in patched_names(moe_utils):
        patches.append(
            Patch(owner=moe_utils, name="te_general_gemm", replacement=None,
                  why="NameError: te_general_gemm without TransformerEngine (0.16.1)")
        )
    return patches


def enable() -> bool:
    """Apply the CPU patches (idempotent). Returns False, doing nothing, when CUDA is available."""
    return apply_without_cuda(_patches, log)


def disable() -> None:
    """Restore every original that ``enable()`` replaced (idempotent)."""
    revert_without_cuda(_patches)


def is_enabled() -> bool:
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    return MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize is _cpu_maybe_dtoh_and_synchronize
