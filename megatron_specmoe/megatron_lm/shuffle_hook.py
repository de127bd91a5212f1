"""``--specmoe-shuffle``: Megatron-LM's own model builder makes its MoE layers shuffle layers (s-TS).

Glossary
    spec builder: a function of ``megatron.core.models.gpt.gpt_layer_specs`` that Megatron-LM's
        model builder (``gpt_builders.gpt_builder``; ``model_provider`` in older ``pretrain_gpt.py``)
        calls by name: ``get_gpt_decoder_block_spec`` for MoE models (it asks
        ``get_gpt_layer_local_spec`` / ``get_gpt_layer_with_transformer_engine_spec`` for one dense
        and one MoE layer spec and lays them out by ``moe_layer_freq``), the layer spec functions
        themselves for a single layer spec.
    carrier: the ``ShuffleCarrier`` through which one model's shuffle layers hand on the token
        order (``megatron/shuffle_layer.py``). One per model (per model chunk), never shared.
    settings: ``ShuffleSettings.from_args(args)``: None when ``--specmoe-shuffle`` is absent.

How the flag takes effect (``specmoe-launch`` does 1; ``megatron_lm/runtime`` does 3):
1. ``install_shuffle_hook()`` wraps the spec builders in ``gpt_layer_specs`` and in every loaded
   module that imported them by name; modules imported later (``gpt_builders.py``, which the
   script imports) get the wrapped ones. Each wrapper reads the settings when it is called
   (Megatron-LM's ``get_args()``, parsed by then): without ``--specmoe-shuffle`` it returns
   exactly what Megatron returns. ``uninstall_shuffle_hook()`` reverts; both are idempotent.
2. With the flag:
   ``get_gpt_decoder_block_spec(config, use_transformer_engine=False, ...)`` returns Megatron's
   block spec whose MoE layer specs are shuffle specs (``shuffle_specs.shuffle_layer_spec_from``)
   sharing one carrier made for this call; dense layers stay Megatron's ``TransformerLayer``.
   With sequence parallelism Megatron's torch norm (``WrappedTorchNorm``, what the local spec uses
   where Apex is absent) refuses to build, so it becomes ``TokenwiseNorm`` (forward-exact; the
   model is forward-only anyway); Apex's ``FusedLayerNorm`` is kept.
   ``get_gpt_layer_local_spec(num_experts=N, ...)`` returns a shuffle spec with a new carrier (a
   model built from one layer spec uses it for every layer: one carrier); dense specs unchanged.
   ``get_gpt_layer_with_transformer_engine_spec(num_experts=N, ...)`` and the block spec with
   ``use_transformer_engine=True`` refuse (the shuffle layer's TE linears, ``megatron/te_shuffle``,
   are not verified on a GPU yet).
3. After Megatron-LM's ``get_model`` (``RuntimeSettings.shuffle`` in ``megatron_lm/runtime``),
   ``attach_shuffle_outputs(model)`` finds each chunk's carrier in its layers and, with sequence
   parallelism, makes the output layer bring the logits back to true order inside its own
   all-gather (``shuffle_specs.true_order_output``); with the "route" / "history" predictors it feeds each
   forward's token ids to the carrier (``shuffle_specs.feed_token_ids``).

Refused with a ValueError naming the fix (``megatron_lm/args`` refuses the same before any GPU
work): TransformerEngine specs; dense layers after an MoE layer with sequence parallelism, and
dense layers after the first MoE layer with the "history" predictor
(``shuffle_refusals.shuffle_dense_layer_problem``).
The shuffle layer itself refuses the rest (shared experts with TP > 1, pipeline stages with
sequence parallelism, training mode, ...). Nothing here runs at import time.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, get_args

from megatron_specmoe.megatron.shuffle_refusals import moe_layer_pattern, shuffle_dense_layer_problem
from megatron_specmoe.megatron_lm.checks import RUNTIME_PREDICTOR_OF, te_refusal
from megatron_specmoe.predict.vocabulary import PLAN_KINDS, RuntimePredictor

__all__ = [
    "ShuffleSettings",
    "shuffle_block_spec",
    "shuffle_carriers",
    "attach_shuffle_outputs",
    "install_shuffle_hook",
    "uninstall_shuffle_hook",
    "is_shuffle_hook_installed",
    "SPEC_BUILDERS",
]

# The spec builders wrapped, in megatron.core.models.gpt.gpt_layer_specs.
SPEC_BUILDERS: tuple[str, ...] = (
    "get_gpt_decoder_block_spec",
    "get_gpt_layer_local_spec",
    "get_gpt_layer_with_transformer_engine_spec",
)
_SPECS_MODULE = "megatron.core.models.gpt.gpt_layer_specs"
_HOOK_RECORD = "__specmoe_shuffle_hook__"


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True, kw_only=True)
class ShuffleSettings:
    """What ``--specmoe-shuffle`` asks for.

    Attributes:
        predictor: the shuffle layer's predictor ("pregate", "route" or "history"), from
            ``--specmoe-predictor`` (``checks.RUNTIME_PREDICTOR_OF``: token -> route, combined and
            history -> history).
        plan: ``--specmoe-plan`` (its "token" predictor serves "route"; its "combined" or
            "history" predictor serves "history"), or None.
        plan_kind: the plan's predictor kind to load (``--specmoe-predictor`` itself), or None for
            the first of ``PLAN_KINDS[predictor]`` the plan holds.
    """

    predictor: str = "pregate"
    plan: Optional[Path] = None
    plan_kind: Optional[str] = None

    def __post_init__(self) -> None:
        if self.predictor not in get_args(RuntimePredictor):
            raise ValueError(f"ShuffleSettings.predictor {self.predictor!r}: choose one of "
                             f"{get_args(RuntimePredictor)}")
        if PLAN_KINDS[self.predictor] and self.plan is None:
            raise ValueError(f"the shuffle's {self.predictor} predictor needs --specmoe-plan DIR with "
                             f"a {' or '.join(repr(k) for k in PLAN_KINDS[self.predictor])} predictor")

    @classmethod
    def from_args(cls, args: Any) -> Optional["ShuffleSettings"]:
        """From Megatron-LM's args namespace; None when ``--specmoe-shuffle`` is off (or args is None)."""
        if args is None or not getattr(args, "specmoe_shuffle", False):
            return None
        plan = getattr(args, "specmoe_plan", None)
        name = getattr(args, "specmoe_predictor", None) or "pregate"
        if name not in RUNTIME_PREDICTOR_OF:
            raise ValueError(f"--specmoe-predictor {name}: token shuffling predicts with one of "
                             f"{tuple(RUNTIME_PREDICTOR_OF)}")
        return cls(predictor=RUNTIME_PREDICTOR_OF[name], plan=Path(plan) if plan else None,
                   plan_kind=None if name == "pregate" else name)

    def options(self):
        """The ``ShuffleOptions`` for one model's carrier (loads the plan's predictor for "route"
        and "history"; "refine" assignment, the runtime one)."""
        from megatron_specmoe.megatron.shuffle_layer import ShuffleOptions

        kinds = PLAN_KINDS.get(self.predictor) or None
        if not kinds:
            return ShuffleOptions(predictor=self.predictor)
        from megatron_specmoe.artifacts.plan_folder import load_plan
        from megatron_specmoe.predict.registry import predictor_from_state

        plan = load_plan(self.plan)
        kind = self.plan_kind if self.plan_kind in plan.predictor_state else next(
            (k for k in kinds if k in plan.predictor_state), None)
        if kind is None:
            raise ValueError(f"the shuffle's {self.predictor} predictor: the plan {self.plan} holds no "
                             f"{' or '.join(repr(k) for k in kinds)} predictor (it has "
                             f"{list(plan.predictor_state)}); re-run `specmoe plan` with it, or use the "
                             "pregate predictor")
        route = predictor_from_state(kind, plan.predictor_state[kind])
        return ShuffleOptions(predictor=self.predictor, route_predictor=route)


def _megatron_settings() -> Optional[ShuffleSettings]:
    """Settings from Megatron-LM's global args; None before they are parsed (then no command line
    can have asked for the shuffle) or without megatron.training."""
    try:
        from megatron.training.global_vars import get_args
    except ImportError:
        return None
    try:
        args = get_args()
    except AssertionError:  # "args is not initialized"
        return None
    return ShuffleSettings.from_args(args)


# --------------------------------------------------------------------------- specs


def _tokenwise(spec: Any) -> Any:
    """``spec`` (a layer spec) with each ``WrappedTorchNorm`` norm replaced by ``TokenwiseNorm``."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from megatron_specmoe.megatron.shuffle_specs import TokenwiseNorm

    sub = getattr(spec, "submodules", None)
    changes = {name: TokenwiseNorm for name in ("input_layernorm", "pre_mlp_layernorm")
               if getattr(sub, name, None) is WrappedTorchNorm}
    if not changes:
        return spec
    return dataclasses.replace(spec, submodules=dataclasses.replace(sub, **changes))


def shuffle_block_spec(block: Any, *, config: Any, carrier: Any) -> Any:
    """Megatron's decoder block spec (``TransformerBlockSubmodules``) with every MoE layer spec made
    a shuffle spec with ``carrier`` (dense layer specs stay), and, with
    ``config.sequence_parallel``, ``WrappedTorchNorm`` norms made ``TokenwiseNorm``.

    Raises:
        ValueError: the dense/MoE layout cannot be shuffled (``shuffle_dense_layer_problem``), or a
            layer spec cannot (``shuffle_specs.shuffle_layer_spec_from``).
    """
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from megatron_specmoe.megatron.local_mla import with_local_mla
    from megatron_specmoe.megatron.shuffle_specs import (
        TokenwiseNorm,
        is_moe_layer_spec,
        shuffle_layer_spec_from,
    )

    sp = bool(getattr(config, "sequence_parallel", False))
    problem = shuffle_dense_layer_problem(
        moe_layer_pattern(int(config.num_layers), getattr(config, "moe_layer_freq", 1)),
        sequence_parallel=sp, predictor=carrier.options.predictor)
    if problem:
        raise ValueError(problem)
    layer_specs = []
    for spec in block.layer_specs:
        # Multi-latent attention with local linears: the core attention that can run it, dense
        # layers included (megatron.local_mla; Megatron's local one cannot).
        spec = with_local_mla(spec)
        if is_moe_layer_spec(spec):
            spec = shuffle_layer_spec_from(spec, carrier=carrier)
        layer_specs.append(_tokenwise(spec) if sp else spec)
    layer_norm = block.layer_norm
    if sp and layer_norm is WrappedTorchNorm:
        layer_norm = TokenwiseNorm
    return dataclasses.replace(block, layer_specs=layer_specs, layer_norm=layer_norm)


def _carrier_of_block(block: Any) -> Any:
    """The one carrier the block's shuffle layer specs were given while Megatron built the block
    (Megatron's block builder asks the wrapped ``get_gpt_layer_local_spec`` for its MoE layer spec
    in this very call), or None when it holds no shuffle spec or several carriers."""
    from megatron_specmoe.megatron.shuffle_layer import ShuffleTransformerLayer
    from megatron_specmoe.megatron.shuffle_specs import carrier_of

    carriers = {id(c): c for c in (carrier_of(s) for s in block.layer_specs
                                   if getattr(s, "module", None) is ShuffleTransformerLayer)}
    return next(iter(carriers.values())) if len(carriers) == 1 else None


def _refuse_te(what: str) -> ValueError:
    return ValueError(te_refusal(f"--specmoe-shuffle: {what} asks for TransformerEngine layers"))


def _wrap_block(original: Callable, settings_from: Callable[[], Optional[ShuffleSettings]]) -> Callable:
    def get_gpt_decoder_block_spec(config, *pargs, **kwargs):
        settings = settings_from()
        if settings is None:
            return original(config, *pargs, **kwargs)
        from megatron_specmoe.megatron.shuffle_layer import ShuffleCarrier

        use_te = kwargs.get("use_transformer_engine", pargs[0] if pargs else False)
        if use_te:
            raise _refuse_te("get_gpt_decoder_block_spec(use_transformer_engine=True)")
        if getattr(config, "transformer_impl", None) == "inference_optimized":
            raise ValueError("--specmoe-shuffle: transformer_impl='inference_optimized' builds "
                             "inference layers the shuffle does not wrap; pass --transformer-impl local")
        block = original(config, *pargs, **kwargs)
        carrier = _carrier_of_block(block)
        if carrier is None:
            carrier = ShuffleCarrier(options=settings.options())
        return shuffle_block_spec(block, config=config, carrier=carrier)

    return get_gpt_decoder_block_spec


def _wrap_local(original: Callable, settings_from: Callable[[], Optional[ShuffleSettings]]) -> Callable:
    def get_gpt_layer_local_spec(*pargs, **kwargs):
        spec = original(*pargs, **kwargs)
        settings = settings_from()
        from megatron_specmoe.megatron.shuffle_specs import is_moe_layer_spec, shuffle_layer_spec_from

        if settings is None or not is_moe_layer_spec(spec):
            return spec
        from megatron_specmoe.megatron.shuffle_layer import ShuffleCarrier

        return shuffle_layer_spec_from(spec, carrier=ShuffleCarrier(options=settings.options()))

    return get_gpt_layer_local_spec


def _wrap_te(original: Callable, settings_from: Callable[[], Optional[ShuffleSettings]]) -> Callable:
    def get_gpt_layer_with_transformer_engine_spec(*pargs, **kwargs):
        num_experts = kwargs.get("num_experts", pargs[0] if pargs else None)
        if num_experts and settings_from() is not None:
            raise _refuse_te("get_gpt_layer_with_transformer_engine_spec(num_experts=...)")
        return original(*pargs, **kwargs)

    return get_gpt_layer_with_transformer_engine_spec


_WRAPPERS = {
    "get_gpt_decoder_block_spec": _wrap_block,
    "get_gpt_layer_local_spec": _wrap_local,
    "get_gpt_layer_with_transformer_engine_spec": _wrap_te,
}


# --------------------------------------------------------------------------- the hook


def install_shuffle_hook(*, get_args: Optional[Callable[[], Any]] = None) -> list[str]:
    """Wrap the spec builders (``SPEC_BUILDERS``) in ``gpt_layer_specs`` and in every loaded module
    that imported them by name. Idempotent: a second call changes nothing (and keeps the first
    call's ``get_args``). Returns the patched ``module.name`` strings.

    Args:
        get_args: returns the args namespace the wrappers read ``--specmoe-shuffle`` from when
            called; default: Megatron-LM's ``megatron.training.get_args()``.
    """
    from megatron.core.models.gpt import gpt_layer_specs

    from megatron_specmoe.megatron.patching import Patch, apply_patches

    if get_args is None:
        settings_from = _megatron_settings
    else:
        def settings_from() -> Optional[ShuffleSettings]:
            return ShuffleSettings.from_args(get_args())

    record = gpt_layer_specs.__dict__.get(_HOOK_RECORD, {})
    for name in SPEC_BUILDERS:
        if name in record or not hasattr(gpt_layer_specs, name):
            continue
        original = getattr(gpt_layer_specs, name)
        wrapped = _WRAPPERS[name](original, settings_from)
        wrapped.__wrapped__ = original
        wrapped.__doc__ = original.__doc__
        wrapped.__specmoe_shuffle_hook__ = True
        patches = [
            Patch(owner=module, name=name, replacement=wrapped,
                  why="--specmoe-shuffle: Megatron-LM's model builder gets shuffle layer specs")
            for module in list(sys.modules.values())
            if getattr(module, "__dict__", {}).get(name) is original
        ]
        record[name] = {"original": original, "wrapped": wrapped, "patches": apply_patches(patches)}
    setattr(gpt_layer_specs, _HOOK_RECORD, record)
    return sorted(f"{p.owner.__name__}.{p.name}" for entry in record.values() for p in entry["patches"])


def uninstall_shuffle_hook() -> None:
    """Restore what ``install_shuffle_hook`` replaced, also in modules that imported the wrapped
    functions later (e.g. ``gpt_builders``). Idempotent; specs already made stay shuffle specs."""
    from megatron_specmoe.megatron.patching import revert_patches

    gpt_layer_specs = sys.modules.get(_SPECS_MODULE)
    record = None if gpt_layer_specs is None else gpt_layer_specs.__dict__.get(_HOOK_RECORD)
    if record is None:
        return
    for name, entry in record.items():
        revert_patches(entry["patches"])
        for module in list(sys.modules.values()):
            namespace = getattr(module, "__dict__", None)
            if namespace is not None and namespace.get(name) is entry["wrapped"]:
                setattr(module, name, entry["original"])
    delattr(gpt_layer_specs, _HOOK_RECORD)


def is_shuffle_hook_installed() -> bool:
    """Whether ``install_shuffle_hook`` is in effect."""
    gpt_layer_specs = sys.modules.get(_SPECS_MODULE)
    return gpt_layer_specs is not None and _HOOK_RECORD in gpt_layer_specs.__dict__


# --------------------------------------------------------------------------- after get_model


def shuffle_carriers(module: Any) -> list:
    """The distinct ShuffleCarriers of the ``ShuffleTransformerLayer``s in ``module``, in layer order."""
    from megatron_specmoe.megatron.shuffle_layer import ShuffleTransformerLayer

    out: dict[int, Any] = {}
    for sub in module.modules():
        if isinstance(sub, ShuffleTransformerLayer):
            out.setdefault(id(sub.carrier), sub.carrier)
    return list(out.values())


def attach_shuffle_outputs(chunks: Sequence[Any]) -> list:
    """For each model chunk (unwrapped ``GPTModel``) with shuffle layers: ``true_order_output`` when
    its layers run with sequence parallelism (unless an output consumer is already declared), and
    ``feed_token_ids`` for the "route" and "history" predictors. Returns the handles (``remove()`` undoes each).

    Raises:
        ValueError: a chunk whose MoE layers are not shuffle layers (the script built its layer spec
            without the wrapped spec builders), or whose shuffle layers hold several carriers.
    """
    handles: list = []
    try:
        for i, chunk in enumerate(chunks):
            _attach_chunk(i, chunk, handles)
    except BaseException:
        for handle in handles:
            handle.remove()
        raise
    return handles


def _attach_chunk(i: int, chunk: Any, handles: list) -> None:
    """``attach_shuffle_outputs`` for chunk ``i``; appends to ``handles``."""
    from megatron_specmoe.megatron.model_tools import moe_sites
    from megatron_specmoe.megatron.shuffle_layer import ShuffleTransformerLayer
    from megatron_specmoe.megatron.shuffle_specs import feed_token_ids, true_order_output

    carriers = shuffle_carriers(chunk)
    if not carriers:
        if moe_sites(chunk):
            raise ValueError(
                f"--specmoe-shuffle: model chunk {i} has MoE layers but no ShuffleTransformerLayer: "
                "the script built its layer spec without gpt_layer_specs' spec builders (e.g. "
                "--spec, or its own model provider), so the shuffle hook could not take effect. "
                "Build the spec with gpt_layer_specs.get_gpt_decoder_block_spec, or drop "
                "--specmoe-shuffle"
            )
        return
    if len(carriers) > 1:
        raise ValueError(f"--specmoe-shuffle: model chunk {i} has shuffle layers with "
                         f"{len(carriers)} carriers; one model's layers must share one")
    carrier = carriers[0]
    layer = next(m for m in chunk.modules() if isinstance(m, ShuffleTransformerLayer))
    if layer.config.sequence_parallel and carrier.output_consumer is None:
        handles.append(true_order_output(chunk, carrier))
    if carrier.options.predictor in ("route", "history"):  # history: its token-table member
        handles.append(feed_token_ids(chunk, carrier))
