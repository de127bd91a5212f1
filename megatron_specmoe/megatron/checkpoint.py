"""Save a GPT-MoE as one plain, unsharded state dict plus a JSON model card; load it at any TP/EP.

Notation: TP tensor-parallel size, EP expert-parallel size, ETP expert tensor-parallel size,
E routed experts, n = E / EP local experts per rank, H hidden size, V vocabulary.

On disk (a directory; the shipped demo model is ``megatron_specmoe/data/``):
    model.json      the card: format/version, shape (``MoEShape`` fields), config (extra
                    ``TransformerConfig`` fields and GPTModel options), weights file name,
                    dtype and sha256, tokenizer file name and sha256 and end-of-text id,
                    training provenance.
    model.pt        ``torch.save`` of a flat ``dict[str, Tensor]``: the state dict of the whole
                    model built at TP = EP = 1 (keys as Megatron names them there, expert k of a
                    layer under ``...experts.local_experts.{k}.``), stored as ``dtype``
                    (float16 for the demo: half the size; loading casts every tensor to the
                    model's fp32 parameters). Read with ``torch.load(weights_only=True)``:
                    no pickled code.
    tokenizer.json  a ``tokenizers`` tokenizer (optional for loading weights).

Experts are stored by *logical* id, each once (``megatron/expert_slots.py``): saving a model whose
specmoe dispatchers route by a placement or serve redundant experts (E + R slots,
``megatron/replicas.py``) gathers every logical expert from its base copy over the EP group and
writes it under ``local_experts.{e}``; replica slots are copies and are not written. The file is
then exactly what the same model without a plan would save.

Loading (``load_model``) builds a ``GPTModel`` on the *current* Megatron parallel state and fills
each parameter from the full tensor:
    1. expert parameters: local expert i of EP rank r gets the logical expert that the layer's slot
       map puts in slot ``r * s + i`` (``expert_slots.slot_maps``: the dispatcher's replicas or
       placement, else contiguous ``r * n + i``), so a model that already holds a plan (the same
       one, another one, or none) is filled in place and computes the saved function;
    2. a parameter Megatron marks ``tensor_model_parallel`` takes chunk ``rank`` of ``size`` along
       its ``partition_dim`` (rank/size: TP, or ETP for experts). Megatron's fused QKV weight is
       laid out per query group, so a plain chunk along dim 0 is each rank's heads;
    3. everything else (norms, router) is copied whole.
Every key, shape and the weights' sha256 are checked; a mismatch raises ``ValueError`` naming the
key or card field and what to do.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from megatron_specmoe.artifacts.errors import SpecMoEDataError
from megatron_specmoe.artifacts.files import check_input_file
from megatron_specmoe.megatron.build import MoEShape, layer_spec, make_config
from megatron_specmoe.megatron.expert_slots import EXPERT_KEY, gather_logical_experts, slot_maps

__all__ = [
    "CARD_FORMAT",
    "CARD_VERSION",
    "ModelCard",
    "demo_model_dir",
    "sha256_file",
    "read_card",
    "read_weights",
    "build_model",
    "full_state_dict",
    "save_checkpoint",
    "load_state",
    "load_model",
    "load_demo_model",
]

CARD_FORMAT = "specmoe-gpt-moe"
CARD_VERSION = 1
CARD_FILE = "model.json"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_EXPERT_KEY = EXPERT_KEY

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True, kw_only=True)
class ModelCard:
    """The contents of ``model.json``.

    Attributes:
        directory: where the card was read from (files below are relative to it).
        shape: the model's ``MoEShape``.
        config: extra ``TransformerConfig`` keyword arguments (e.g. normalization,
            moe_router_load_balancing_type), applied on top of ``make_config``.
        gpt: ``GPTModel`` options: position_embedding_type, rotary_base,
            share_embeddings_and_output_weights.
        weights_file, weights_dtype, weights_sha256: the state-dict file.
        tokenizer_file, tokenizer_sha256: the tokenizer ("" if none).
        eot_id: end-of-text token id (separates documents).
        training: provenance (free-form; not used for loading).
    """

    directory: str
    shape: MoEShape
    config: Mapping[str, Any]
    gpt: Mapping[str, Any]
    weights_file: str
    weights_dtype: str
    weights_sha256: str
    tokenizer_file: str = ""
    tokenizer_sha256: str = ""
    eot_id: int = -1
    training: Mapping[str, Any] = field(default_factory=dict)

    @property
    def weights_path(self) -> str:
        return os.path.join(self.directory, self.weights_file)

    @property
    def tokenizer_path(self) -> str:
        return os.path.join(self.directory, self.tokenizer_file) if self.tokenizer_file else ""

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("directory")
        return {"format": CARD_FORMAT, "version": CARD_VERSION, **d}


_GPT_DEFAULTS = {
    "position_embedding_type": "rope",
    "rotary_base": 10000,
    "share_embeddings_and_output_weights": True,
}


DEMO_MODELS = {"gpt-moe": (), "deepseek-style": ("deepseek-style",)}


def demo_model_dir(name: str = "gpt-moe") -> str:
    """A shipped demo model's folder: "gpt-moe" (``megatron_specmoe/data``) or "deepseek-style"
    (``megatron_specmoe/data/deepseek-style``)."""
    if name not in DEMO_MODELS:
        raise ValueError(f"demo_model_dir: unknown model {name!r}; the package ships {sorted(DEMO_MODELS)}")
    return str(Path(__file__).resolve().parent.parent.joinpath("data", *DEMO_MODELS[name]))


def sha256_file(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_RESAVE = "re-save the checkpoint with megatron_specmoe.megatron.checkpoint.save_checkpoint"


def _need(obj: Mapping, key: str, kind: type, where: str, minimum: int = 1):
    if key not in obj:
        raise SpecMoEDataError(f"{where}: field {key!r} is missing; the card is incomplete", _RESAVE)
    value = obj[key]
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise SpecMoEDataError(f"{where}: field {key!r} should be {kind.__name__}, got {repr(value)[:40]}",
                               _RESAVE)
    if kind is int and value < minimum:
        raise SpecMoEDataError(f"{where}: field {key!r} is {value}, expected a count >= {minimum}", _RESAVE)
    return value


def read_card(path: Optional[PathLike] = None) -> ModelCard:
    """Read and check ``model.json`` (``path``: the file or its directory; None: the demo model)
    and that the weights file (and tokenizer, if named) it names are regular files there.
    Raises ``SpecMoEDataError`` naming the field and the fix."""
    path = Path(demo_model_dir() if path is None else path)
    card_path = path / CARD_FILE if path.is_dir() else path
    where = str(card_path)
    if not path.exists():
        raise SpecMoEDataError(f"{path}: no such checkpoint folder",
                               f"pass the directory holding {CARD_FILE} and the weights")
    if not card_path.exists():
        raise SpecMoEDataError(f"{where}: no model card",
                               f"pass the directory holding {CARD_FILE} and the weights")
    check_input_file(card_path, what="model card", fix=_RESAVE)
    try:
        obj = json.loads(card_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise SpecMoEDataError(f"{where}: not UTF-8 text at byte {exc.start}", _RESAVE) from None
    except json.JSONDecodeError as exc:
        raise SpecMoEDataError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno}); the card "
                               "is corrupt", _RESAVE) from None
    if not isinstance(obj, dict):
        raise SpecMoEDataError(f"{where}: expected a JSON object", _RESAVE)
    if obj.get("format") != CARD_FORMAT:
        raise SpecMoEDataError(f"{where}: field 'format' is {obj.get('format')!r}, expected "
                               f"{CARD_FORMAT!r}", _RESAVE)
    if obj.get("version") != CARD_VERSION:
        raise SpecMoEDataError(f"{where}: field 'version' is {obj.get('version')!r}; this package "
                               f"reads version {CARD_VERSION}", _RESAVE)
    shape_obj = _need(obj, "shape", dict, where)
    names = {f.name for f in dataclasses.fields(MoEShape)}
    unknown = sorted(set(shape_obj) - names)
    if unknown:
        raise SpecMoEDataError(f"{where}: field 'shape' has unknown keys {unknown}; known: "
                               f"{sorted(names)}", _RESAVE)
    for key in names:  # shared_ffn 0: no shared expert
        _need(shape_obj, key, int, f"{where} (shape)", minimum=0 if key == "shared_ffn" else 1)
    dtype = _need(obj, "weights_dtype", str, where)
    if dtype not in _DTYPES:
        raise SpecMoEDataError(f"{where}: field 'weights_dtype' is {dtype!r}; expected one of "
                               f"{sorted(_DTYPES)}", _RESAVE)
    for key in ("config", "gpt", "training"):
        if not isinstance(obj.get(key, {}), dict):
            raise SpecMoEDataError(f"{where}: field {key!r} should be an object", _RESAVE)
    eot = obj.get("eot_id", -1)
    if isinstance(eot, bool) or not isinstance(eot, int):
        raise SpecMoEDataError(f"{where}: field 'eot_id' should be int, got {repr(eot)[:40]}", _RESAVE)
    gpt = dict(_GPT_DEFAULTS)
    gpt.update(obj.get("gpt", {}))
    try:
        shape = MoEShape(**shape_obj)
    except (ValueError, TypeError) as exc:
        raise SpecMoEDataError(f"{where}: field 'shape' is inconsistent ({exc})", _RESAVE) from None
    card = ModelCard(
        directory=str(card_path.parent),
        shape=shape,
        config=dict(_need(obj, "config", dict, where)),
        gpt=gpt,
        weights_file=_need(obj, "weights_file", str, where),
        weights_dtype=dtype,
        weights_sha256=_need(obj, "weights_sha256", str, where),
        tokenizer_file=obj.get("tokenizer_file", ""),
        tokenizer_sha256=obj.get("tokenizer_sha256", ""),
        eot_id=eot,
        training=dict(obj.get("training", {})),
    )
    check_input_file(card.weights_path, what=f"weights file (model.json field 'weights_file') of {where}:",
                     fix=_RESAVE)
    if card.tokenizer_file:
        check_input_file(card.tokenizer_path, what=f"tokenizer (model.json field 'tokenizer_file') of "
                         f"{where}:", fix=_RESAVE)
    return card


def read_weights(card: ModelCard, *, verify: bool = True) -> dict[str, torch.Tensor]:
    """The full state dict (tensors as stored, e.g. float16), checked against the card's sha256."""
    path = card.weights_path
    if not os.path.isfile(path):
        raise ValueError(f"{path}: weights file named by model.json field 'weights_file' does not exist")
    if verify:
        digest = sha256_file(path)
        if digest != card.weights_sha256:
            raise ValueError(
                f"{path}: sha256 {digest[:16]}... does not match model.json field 'weights_sha256' "
                f"({card.weights_sha256[:16]}...); the weights are corrupt or belong to another card"
            )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for a bad file
        raise ValueError(f"{path}: not a readable torch state dict ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a flat dict of tensors")
    want = _DTYPES[card.weights_dtype]
    bad = [k for k, v in state.items() if v.is_floating_point() and v.dtype != want]
    if bad:
        raise ValueError(f"{path}: tensor {bad[0]!r} is {state[bad[0]].dtype}, but model.json field "
                         f"'weights_dtype' says {card.weights_dtype}")
    return state


def build_model(
    card: ModelCard,
    *,
    dispatcher: str = "alltoall",
    tp: int = 1,
    ep: int = 1,
    etp: int = 1,
    specmoe: Optional[bool] = None,
    via: str = "spec",
    parallel_output: bool = False,
    **config_overrides: Any,
):
    """An fp32 ``GPTModel`` of the card's architecture on the current parallel state (random
    weights; see ``load_state``). ``specmoe`` defaults to ``dispatcher == "specmoe"``;
    ``parallel_output=False`` gathers the logits over TP (every rank gets [B, S, V]).
    ``config_overrides`` go to ``TransformerConfig`` after the card's config; with TP > 1 the
    default is ``sequence_parallel=False`` (Megatron's torch norms do not support it)."""
    from megatron.core.models.gpt.gpt_model import GPTModel

    if specmoe is None:
        specmoe = dispatcher == "specmoe"
    kwargs = {"sequence_parallel": False, **dict(card.config), **config_overrides}
    config = make_config(card.shape, dispatcher=dispatcher, tp=tp, ep=ep, etp=etp, **kwargs)
    gpt = dict(card.gpt)
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(card.shape, specmoe=specmoe, via=via, config=config),
        vocab_size=card.shape.vocab,
        max_sequence_length=card.shape.seq,
        parallel_output=parallel_output,
        position_embedding_type=gpt["position_embedding_type"],
        rotary_base=int(gpt["rotary_base"]),
        share_embeddings_and_output_weights=bool(gpt["share_embeddings_and_output_weights"]),
    )


def _tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without Megatron's ``_extra_state`` entries (non-tensors)."""
    return {k: v for k, v in model.state_dict().items()
            if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict, experts by logical id (module docstring). A model sharded over
    EP (TP = ETP = PP = 1) is gathered: a collective over the EP group, call on every rank."""
    from megatron.core import parallel_state

    sizes = (parallel_state.get_tensor_model_parallel_world_size(),
             parallel_state.get_pipeline_model_parallel_world_size(),
             parallel_state.get_expert_tensor_parallel_world_size())
    if sizes != (1, 1, 1):
        raise ValueError(f"full_state_dict: the model is sharded (TP, PP, ETP) = {sizes}; save from a "
                         "TP = PP = ETP = 1 model, at any EP (gathering TP/PP shards is not implemented)")
    state = {k: v.detach().clone() for k, v in _tensors(model).items() if not _EXPERT_KEY.match(k)}
    experts = gather_logical_experts(model)
    prefixes = set(slot_maps(model))
    left = sorted(k for k in _tensors(model) if _EXPERT_KEY.match(k)
                  and _EXPERT_KEY.match(k)["prefix"] not in prefixes)
    if left:
        raise ValueError(f"full_state_dict: expert key {left[0]!r} belongs to no MoE layer found in the model")
    state.update(experts)
    return state


def save_checkpoint(
    model: torch.nn.Module,
    card: ModelCard,
    *,
    dtype: str = "float16",
) -> ModelCard:
    """Write ``model``'s full state dict (as ``dtype``; experts by logical id, each once) and the
    card into ``card.directory``. Under torch.distributed call on every rank (a collective);
    global rank 0 writes.

    Returns the card as written (weights file, dtype and sha256 filled in; the tokenizer's
    sha256 too when ``card.tokenizer_file`` exists)."""
    if dtype not in _DTYPES:
        raise ValueError(f"save_checkpoint: dtype {dtype!r}: choose one of {sorted(_DTYPES)}")
    state = {k: (v.to(_DTYPES[dtype]) if v.is_floating_point() else v).contiguous()
             for k, v in full_state_dict(model).items()}
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and torch.distributed.get_rank() != 0:
        torch.distributed.barrier()  # rank 0 writes; every rank then reads the card it wrote
        return read_card(card.directory)
    try:
        return _write(state, card, dtype)
    finally:
        if distributed:
            torch.distributed.barrier()


def _write(state: Mapping[str, torch.Tensor], card: ModelCard, dtype: str) -> ModelCard:
    os.makedirs(card.directory, exist_ok=True)
    weights_file = card.weights_file or "model.pt"
    path = os.path.join(card.directory, weights_file)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)
    tok_sha = card.tokenizer_sha256
    if card.tokenizer_file and os.path.isfile(card.tokenizer_path):
        tok_sha = sha256_file(card.tokenizer_path)
    out = dataclasses.replace(card, weights_file=weights_file, weights_dtype=dtype,
                              weights_sha256=sha256_file(path), tokenizer_sha256=tok_sha)
    card_path = os.path.join(card.directory, CARD_FILE)
    with open(card_path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(out.to_json(), f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(card_path + ".tmp", card_path)
    return out


def _full_key(local_key: str, ep_rank: int, num_local: int, maps: Mapping[str, Any]) -> str:
    """Step 1: the full-model key of a local parameter (expert indices made logical)."""
    m = _EXPERT_KEY.match(local_key)
    if m is None:
        return local_key
    slots = maps.get(m["prefix"])
    index = slots.logical(ep_rank, int(m["index"])) if slots is not None else ep_rank * num_local + int(m["index"])
    return f"{m['prefix']}{index}{m['rest']}"


@torch.no_grad()
def load_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor], *, source: str = "<state>") -> None:
    """Fill ``model`` (built on the current parallel state) from the full state dict ``state``.

    Checks that every full key is used by some rank layout (no unknown keys), that every local
    key has a full tensor, and every shape."""
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    etp_rank = parallel_state.get_expert_tensor_parallel_rank()
    etp_size = parallel_state.get_expert_tensor_parallel_world_size()
    params = dict(model.named_parameters())
    local = _tensors(model)
    num_local = _num_local_experts(model)
    maps = slot_maps(model)
    expected_full: set[str] = set()
    for key, target in local.items():
        full_key = _full_key(key, ep_rank, num_local, maps)
        expected_full.add(full_key)
        if full_key not in state:
            raise ValueError(f"{source}: key {full_key!r} is missing; the checkpoint does not fit this "
                             "model (another architecture or card?)")
        full = state[full_key]
        param = params.get(key)
        is_expert = full_key != key or ".experts." in key
        rank, size = (etp_rank, etp_size) if is_expert else (tp_rank, tp_size)
        piece = full
        if tuple(full.shape) != tuple(target.shape):
            # Step 2: a tensor-parallel shard.
            if param is None or not getattr(param, "tensor_model_parallel", False):
                raise ValueError(f"{source}: key {full_key!r} has shape {tuple(full.shape)} but the "
                                 f"model's is {tuple(target.shape)}; the card's shape does not match "
                                 "the weights")
            dim = int(param.partition_dim)
            if getattr(param, "partition_stride", 1) != 1:
                raise ValueError(f"{source}: key {full_key!r} is strided over TP (partition_stride "
                                 f"{param.partition_stride}); not supported")
            if getattr(model.config, "gated_linear_unit", False) and "linear_fc1" in key:
                raise ValueError(f"{source}: key {full_key!r}: splitting a gated (GLU) fc1 over TP/ETP "
                                 "is not supported; load with tp=1/etp=1 or a non-gated model")
            if full.shape[dim] != target.shape[dim] * size:
                raise ValueError(f"{source}: key {full_key!r} has {full.shape[dim]} rows along dim "
                                 f"{dim}, which is not {size} x the model's {target.shape[dim]}")
            piece = full.narrow(dim, rank * target.shape[dim], target.shape[dim])
            if tuple(piece.shape) != tuple(target.shape):
                raise ValueError(f"{source}: key {full_key!r}: shard shape {tuple(piece.shape)} != "
                                 f"{tuple(target.shape)}")
        target.copy_(piece.to(target.dtype))  # step 3 (or the shard): cast to fp32
    unknown = _unknown_keys(state, expected_full)
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} key(s) the model does not have, e.g. "
                         f"{unknown[0]!r}; the checkpoint does not fit this model")


def _unknown_keys(state: Mapping[str, torch.Tensor], expected_full: set[str]) -> list[str]:
    """Keys of ``state`` that no rank would read (expert keys of other ranks are expected)."""
    patterns = {_EXPERT_KEY.sub(lambda m: f"{m['prefix']}*{m['rest']}", k) for k in expected_full}
    return sorted(k for k in state if k not in expected_full
                  and _EXPERT_KEY.sub(lambda m: f"{m['prefix']}*{m['rest']}", k) not in patterns)


def _num_local_experts(model: torch.nn.Module) -> int:
    for module in model.modules():
        n = getattr(module, "num_local_experts", None)
        if n is not None and hasattr(module, "token_dispatcher"):
            return int(n)
    return 0


def load_model(
    path: Optional[PathLike] = None,
    *,
    dispatcher: str = "alltoall",
    tp: Optional[int] = None,
    ep: Optional[int] = None,
    verify: bool = True,
    replicas: Optional[Sequence[Any]] = None,
    **build_kwargs: Any,
):
    """Build the card's model on the current parallel state and load its weights, in eval mode.

    Args:
        path: the checkpoint directory (or its model.json); None: the shipped demo model.
        dispatcher: ``moe_token_dispatcher_type`` ("alltoall", "allgather", "specmoe", ...).
        tp, ep: expected TP/EP sizes; None: take them from the initialised parallel state. If given
            they must match it.
        verify: check the weights' sha256 against the card.
        replicas: one ``schedule.replicas.ReplicatedPlacement`` per MoE layer (a plan's, e.g.
            ``replicas_from_arrays``), or None. Every MoE layer is then built with E + R slots
            (``replicas.replicate_layers``; needs dispatcher="specmoe") and each slot is loaded
            with its logical expert directly: no weights move between ranks.
        build_kwargs: ``build_model`` options (etp, specmoe, via, parallel_output) and
            ``TransformerConfig`` overrides.
    Returns:
        A ``GPTModel`` in eval mode, fp32 parameters.
    """
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        raise ValueError("load_model: Megatron's parallel state is not initialised; call "
                         "megatron_specmoe.megatron.parallel.initialize(ParallelLayout(tp=..., ep=...)) first")
    actual_tp = parallel_state.get_tensor_model_parallel_world_size()
    actual_ep = parallel_state.get_expert_model_parallel_world_size()
    for name, want, have in (("tp", tp, actual_tp), ("ep", ep, actual_ep)):
        if want is not None and want != have:
            raise ValueError(f"load_model: {name}={want} but the parallel state has {name}={have}; "
                             "initialise with the same layout")
    build_kwargs.setdefault("etp", parallel_state.get_expert_tensor_parallel_world_size())
    card = read_card(path)
    if card.shape.experts % actual_ep:
        raise ValueError(f"load_model: {card.shape.experts} experts (model.json shape.experts) cannot "
                         f"be split over ep={actual_ep}")
    model = build_model(card, dispatcher=dispatcher, tp=actual_tp, ep=actual_ep, **build_kwargs)
    if replicas is not None:
        _use_replicas(model, replicas, dispatcher)
    load_state(model, read_weights(card, verify=verify), source=card.weights_path)
    return model.eval()


def _use_replicas(model: torch.nn.Module, replicas: Sequence[Any], dispatcher: str) -> None:
    """E + R-slot twins routed by ``replicas`` (the slots are filled by ``load_state``)."""
    from megatron_specmoe.megatron.model_tools import moe_sites
    from megatron_specmoe.megatron.replicas import replicate_layers

    if dispatcher != "specmoe":
        raise ValueError(f"load_model: replicas need dispatcher='specmoe', got {dispatcher!r}")
    if len(replicas) != len(moe_sites(model)):
        raise ValueError(f"load_model: {len(replicas)} replica layers for {len(moe_sites(model))} MoE layers; "
                         "pass the plan made for this model")
    for twin, rep in zip(replicate_layers(model, replicas[0].redundant), replicas):
        twin.token_dispatcher.set_replicas(rep)


def load_demo_model(*, dispatcher: str = "alltoall", tp: Optional[int] = None,
                    ep: Optional[int] = None, **build_kwargs: Any):
    """The shipped demo model (``megatron_specmoe/data``) on the current parallel state."""
    return load_model(None, dispatcher=dispatcher, tp=tp, ep=ep, **build_kwargs)
