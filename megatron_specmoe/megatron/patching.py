"""Explicit, idempotent, reversible attribute patches.

A patch replaces ``owner.name`` (a module or class attribute). The original is kept on the owner
itself, in ``owner.__specmoe_originals__`` (a dict name -> original, or ``_MISSING`` when the
attribute did not exist), so that:

* applying the same patch twice is a no-op (the name is already recorded);
* reverting restores exactly what was there, from any caller, with no global registry;
* anyone can see what is patched: ``patched_names(owner)``.
"""

from __future__ import annotations

from dataclasses import dataclass
import logging
from typing import Any, Callable, Iterable

__all__ = ["Patch", "apply_patches", "revert_patches", "patched_names", "original", "apply_without_cuda", "revert_without_cuda"]

_ORIGINALS = "__specmoe_originals__"
_MISSING = object()


@dataclass(frozen=True, kw_only=True)
class Patch:
    """Replace ``owner.name`` by ``replacement``.

    Attributes:
        owner: the module or class that holds the attribute.
        name: attribute name.
        replacement: the new value.
        why: one line for logs and docs: which failure this patch removes.
    """

    owner: Any
    name: str
    replacement: Any
    why: str


def _originals(owner: Any) -> dict:
    table = owner.__dict__.get(_ORIGINALS) if hasattr(owner, "__dict__") else None
    if table is None:
        table = {}
        setattr(owner, _ORIGINALS, table)
    return table


def apply_patches(patches: Iterable[Patch]) -> list[Patch]:
    """Apply each patch not yet applied; return those applied now."""
    applied = []
    for patch in patches:
        table = _originals(patch.owner)
        if patch.name in table:
            continue
        table[patch.name] = patch.owner.__dict__.get(patch.name, _MISSING)
        setattr(patch.owner, patch.name, patch.replacement)
        applied.append(patch)
    return applied


def revert_patches(patches: Iterable[Patch]) -> None:
    """Restore the originals of the given patches (those not applied are skipped)."""
    for patch in patches:
        table = patch.owner.__dict__.get(_ORIGINALS)
        if not table or patch.name not in table:
            continue
        saved = table.pop(patch.name)
        if saved is _MISSING:
            delattr(patch.owner, patch.name)
        else:
            setattr(patch.owner, patch.name, saved)


def patched_names(owner: Any) -> list[str]:
    """Names currently patched on ``owner``."""
    table = getattr(owner, "__dict__", {}).get(_ORIGINALS) or {}
    return sorted(table)


def original(owner: Any, name: str) -> Any:
    """The value ``owner.name`` had before it was patched (the current value if not patched)."""
    table = getattr(owner, "__dict__", {}).get(_ORIGINALS) or {}
    if name not in table:
        return getattr(owner, name)
    saved = table[name]
    if saved is _MISSING and isinstance(owner, type):
        # The attribute was inherited: the original is the first base that defines it.
        for base in owner.__mro__[1:]:
            if name in base.__dict__:
                return base.__dict__[name]
    if saved is _MISSING:
        raise AttributeError(f"{owner!r} had no attribute {name!r} before it was patched")
    return saved


def apply_without_cuda(patches: Callable[[], list[Patch]], log: logging.Logger) -> bool:
    """Apply ``patches()`` (idempotent) on a machine without CUDA, the only place the CPU stand-ins
    belong. Returns False, applying nothing, where CUDA is available."""
    import torch

    if torch.cuda.is_available():
        log.info("%s: CUDA is available; Megatron runs unpatched", log.name)
        return False
    applied = apply_patches(patches())
    if applied:
        log.info("%s: %d CPU patches applied", log.name, len(applied))
    return True


def revert_without_cuda(patches: Callable[[], list[Patch]]) -> None:
    """Restore what ``apply_without_cuda(patches)`` replaced (idempotent; nothing where CUDA is)."""
    import torch

    if not torch.cuda.is_available():
        revert_patches(patches())
