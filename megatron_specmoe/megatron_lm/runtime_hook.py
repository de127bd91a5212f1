"""The explicit, reversible hook that sets up the specmoe runtime after Megatron-LM builds or loads a
model: it wraps ``megatron.training``'s ``get_model`` and ``load_checkpoint`` (in their modules and
wherever they were imported by name) so that ``runtime.setup_specmoe_runtime(model, get_args(),
after_load=True)`` runs after them.

Notation
    target   a ``HookTarget``: a module, a function name, and where the model is (the function's
             first argument, or its result).

``install_runtime_hook()`` is idempotent and records what it patched on the module itself;
``uninstall_runtime_hook()`` reverts it (``megatron/patching.py``). Nothing here runs at import time.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional, Sequence, get_args

from megatron_specmoe.megatron_lm.runtime import prepare_specmoe_load, setup_specmoe_runtime

__all__ = [
    "HookTarget",
    "wrap_model_function",
    "default_hook_targets",
    "install_runtime_hook",
    "uninstall_runtime_hook",
    "is_runtime_hook_installed",
]

_HOOK_RECORD = "__specmoe_runtime_hook__"
ModelFrom = Literal["first_arg", "result"]


@dataclass(frozen=True, kw_only=True)
class HookTarget:
    """A function after which the runtime is set up.

    Attributes:
        module: the module that defines it (patched there and wherever it was imported by name).
        name: the function's name.
        model_from: where the model is: its first argument, or its result.
    """

    module: Any
    name: str
    model_from: ModelFrom

    def __post_init__(self) -> None:
        if self.model_from not in get_args(ModelFrom):
            raise ValueError(f"HookTarget {self.name}: model_from={self.model_from!r}; choose one "
                             f"of {get_args(ModelFrom)}")


def wrap_model_function(original: Callable, *, model_from: ModelFrom,
                        get_args: Optional[Callable[[], Any]] = None) -> Callable:
    """``original`` followed by ``setup_specmoe_runtime(model, get_args(), after_load=True)``. For a
    loader (``model_from="first_arg"``) the model's replicated MoE layers are first swapped back to
    the plain layers the checkpoint holds (``runtime.prepare_specmoe_load``)."""
    def wrapped(*pargs, **kwargs):
        if model_from == "first_arg":
            prepare_specmoe_load(_model_argument(pargs, kwargs))
        out = original(*pargs, **kwargs)
        if model_from == "result":
            model = out
        else:
            model = _model_argument(pargs, kwargs)
        setup_specmoe_runtime(model, get_args() if get_args is not None else None, after_load=True)
        return out

    wrapped.__wrapped__ = original
    wrapped.__name__ = getattr(original, "__name__", "wrapped")
    wrapped.__doc__ = getattr(original, "__doc__", None)
    wrapped.__specmoe_runtime_hook__ = True
    return wrapped


def _model_argument(pargs, kwargs):
    return pargs[0] if pargs else kwargs.get("ddp_model", kwargs.get("model"))


def default_hook_targets() -> list[HookTarget]:
    """Megatron-LM's ``load_checkpoint`` and ``get_model`` (needs ``megatron.training``)."""
    try:
        import megatron.training.checkpointing as checkpointing
        import megatron.training.training as training
    except ImportError as exc:
        raise ImportError(f"specmoe runtime hook: megatron.training is not importable ({exc}); run "
                          "from a Megatron-LM checkout or put its root on PYTHONPATH") from exc
    return [HookTarget(module=checkpointing, name="load_checkpoint", model_from="first_arg"),
            HookTarget(module=training, name="get_model", model_from="result")]


def install_runtime_hook(targets: Optional[Sequence[HookTarget]] = None, *,
                         get_args: Optional[Callable[[], Any]] = None) -> list[str]:
    """Wrap each target function (default: ``default_hook_targets()``) in its module and in every
    loaded module that imported it by name. Idempotent. Returns the patched
    ``module.name`` strings (of this call and earlier ones)."""
    from megatron_specmoe.megatron.patching import Patch, apply_patches

    targets = default_hook_targets() if targets is None else list(targets)
    names = []
    for target in targets:
        record = target.module.__dict__.get(_HOOK_RECORD, {})
        if target.name not in record:
            original = getattr(target.module, target.name)
            wrapped = wrap_model_function(original, model_from=target.model_from, get_args=get_args)
            patches = [
                Patch(owner=module, name=target.name, replacement=wrapped,
                      why="set up the --specmoe-* runtime after the model is built / loaded")
                for module in list(sys.modules.values())
                if getattr(module, "__dict__", {}).get(target.name) is original
            ]
            record[target.name] = {"original": original, "wrapped": wrapped,
                                   "patches": apply_patches(patches)}
            setattr(target.module, _HOOK_RECORD, record)
        names += [f"{p.owner.__name__}.{p.name}" for p in record[target.name]["patches"]]
    return sorted(names)


def uninstall_runtime_hook(targets: Optional[Sequence[HookTarget]] = None) -> None:
    """Restore what ``install_runtime_hook`` replaced, also in modules that imported the wrapped
    function later. Idempotent. Models already set up keep their runtime (``close()`` it)."""
    from megatron_specmoe.megatron.patching import revert_patches

    if targets is None:
        targets = [t for t in _loaded_default_targets()]
    for target in targets:
        record = target.module.__dict__.get(_HOOK_RECORD)
        if not record or target.name not in record:
            continue
        entry = record.pop(target.name)
        revert_patches(entry["patches"])
        for module in list(sys.modules.values()):
            namespace = getattr(module, "__dict__", None)
            if namespace is not None and namespace.get(target.name) is entry["wrapped"]:
                setattr(module, target.name, entry["original"])
        if not record:
            delattr(target.module, _HOOK_RECORD)


def _loaded_default_targets() -> list[HookTarget]:
    """The default targets whose modules are loaded (uninstalling imports nothing)."""
    out = []
    for modname, name, model_from in (("megatron.training.checkpointing", "load_checkpoint", "first_arg"),
                                      ("megatron.training.training", "get_model", "result")):
        module = sys.modules.get(modname)
        if module is not None:
            out.append(HookTarget(module=module, name=name, model_from=model_from))
    return out


def is_runtime_hook_installed(targets: Optional[Sequence[HookTarget]] = None) -> bool:
    """Whether every target (default: the loaded default targets) is wrapped."""
    targets = _loaded_default_targets() if targets is None else list(targets)
    return bool(targets) and all(target.name in target.module.__dict__.get(_HOOK_RECORD, {})
                                 for target in targets)
