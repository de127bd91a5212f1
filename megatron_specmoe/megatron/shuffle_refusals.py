"""The one table of settings the shuffle layer refuses, read by the layer and by the launcher.

Notation
    settings   any object with Megatron's attribute names: a ``TransformerConfig`` (the layer, at
               build time) or Megatron-LM's parsed ``args`` (the launcher, before any GPU work).
               Megatron-LM copies config fields from args by name, so one attribute name serves both.
    scope      where a row is checked: "layer" (config only), "launcher" (args only; settings the
               config never sees, such as ``--spec``) or "both".

``layer_refusals(config)`` returns the layer's messages ("<field> must be ..."); the launcher calls
``launcher_refusals(args)`` for its "--specmoe-shuffle does not support <flag> (<why>)" message.
Each row names the setting and what to change. A row is removed only when the shuffle layer learns
to run with that setting (and a lossless test shows it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional

__all__ = ["moe_layer_pattern", "moe_layer_numbers", "shuffle_dense_layer_problem", "Refusal", "SHUFFLE_REFUSALS",
           "layer_refusals", "launcher_refusals", "launcher_sentences", "graphs_on", "graph_predictor_problem"]

# CUDA graphs (inference decode). The plan is graph-safe ("prices" on the Triton path: 7 launches,
# no host synchronisation, static shapes). Megatron's dropless all-to-all dispatcher, which the
# specmoe dispatcher extends, copies the per-rank token counts to the host every forward
# (``cuda_sync_point``); its drop-and-pad mode does not, and core 0.19's
# ``moe_pad_experts_for_cuda_graph_inference`` switches every dispatcher to it for graphed decode
# steps at a capacity that drops nothing (the specmoe dispatcher keeps its physical-slot mapping
# there, megatron/dispatcher.py). So graphs are accepted with that flag, and refused where the flag
# is off (dropless), where the config cannot carry it (core 0.16 keeps it on
# InferenceWrapperConfig, out of the layer's sight), for TransformerEngine / full-iteration graphs
# (training-only in Megatron), with sequence parallelism, and with the predictors whose inputs reach
# the layer as Python state per forward (``graph_predictor_problem``).
_PAD_FIELD = "moe_pad_experts_for_cuda_graph_inference"
_PAD_FLAG = "--moe-pad-experts-for-cuda-graph-inference"
_DROPLESS_WHY = ("the dropless dispatcher reads the per-rank token counts on the host every forward to size "
                 "its all-to-all, which graph capture refuses; Megatron's padded decode does not")


def graphs_on(s: Any) -> bool:
    """Whether ``s`` (config or args) asks for CUDA graphs: ``cuda_graph_impl`` other than 'none',
    or the deprecated ``enable_cuda_graph`` / ``external_cuda_graph``."""
    return (getattr(s, "cuda_graph_impl", "none") not in ("none", None) or bool(getattr(s, "enable_cuda_graph", False))
            or bool(getattr(s, "external_cuda_graph", False)))


def _impl(s: Any) -> str:
    if bool(getattr(s, "external_cuda_graph", False)):
        return "transformer_engine"
    impl = getattr(s, "cuda_graph_impl", "none") or "none"
    return "local" if impl == "none" and bool(getattr(s, "enable_cuda_graph", False)) else impl


# Predictors whose inputs reach the layer through the carrier, set in Python by each forward
# (token ids by a hook on the embedding, routes by the previous MoE layer, a seeded CPU generator
# per call): a replayed graph would reuse the capture's. "pregate" reads only the layer's input.
_GRAPH_PREDICTOR_WHY = {
    "route": "its token ids reach the layer through the carrier, set by a hook on the embedding each forward",
    "history": "the earlier layers' routes reach the layer through the carrier, set by each forward",
    "random": "it draws from a CPU generator seeded per call",
    "adversarial": "it is an ablation predictor, not run-time code",
    "contiguous": "it is an ablation predictor, not run-time code",
}


def graph_predictor_problem(settings: Any, predictor: str, *, name: Optional[str] = None) -> Optional[str]:
    """Why the shuffle layer cannot run the run-time ``predictor`` under the CUDA graphs ``settings``
    asks for, or None (no graphs, or "pregate"). ``name``: how the message calls the setting
    (default ``ShuffleOptions.predictor='<predictor>'``)."""
    if not graphs_on(settings) or predictor not in _GRAPH_PREDICTOR_WHY:
        return None
    name = f"ShuffleOptions.predictor={predictor!r}" if name is None else name
    return (f"{name} with CUDA graphs: {_GRAPH_PREDICTOR_WHY[predictor]}, which a replayed graph "
            "would not refresh; use the 'pregate' predictor (it reads only the layer's input) or run without "
            "CUDA graphs")

Scope = Literal["layer", "launcher", "both"]


@dataclass(frozen=True, kw_only=True)
class Refusal:
    """One refused setting.

    Attributes:
        field: the config / args attribute.
        flag: the Megatron-LM command-line flag.
        unwanted: predicate on the whole settings object (some rows combine two fields).
        requirement: the layer's wording ("<field> must be ...", with the fix).
        why: the launcher's wording (why the shuffle layer cannot run with the flag).
        scope: where the row is checked.
        sentence: for rows whose launcher message names two flags: the whole sentence, from args
            (None: the row joins the "--specmoe-shuffle does not support ..." list).
    """

    field: str
    flag: str
    unwanted: Callable[[Any], bool]
    requirement: str
    why: str
    scope: Scope = "both"
    sentence: Optional[Callable[[Any], str]] = None


def _int(s: Any, name: str) -> int:
    return int(getattr(s, name, 1) or 1)


SHUFFLE_REFUSALS: tuple[Refusal, ...] = (
    Refusal(field="expert_tensor_parallel_size", flag="--expert-tensor-parallel-size",
            unwanted=lambda s: getattr(s, "expert_tensor_parallel_size", 1) not in (1, None),
            requirement="expert_tensor_parallel_size must be 1 (MoE parallel folding)",
            why="each TP rank must run whole experts on the tokens the shuffle moved to it",
            scope="layer"),
    Refusal(field="context_parallel_size", flag="--context-parallel-size",
            unwanted=lambda s: _int(s, "context_parallel_size") != 1,
            requirement="context_parallel_size must be 1",
            why="the shuffle layer needs context parallel size 1"),
    Refusal(field="recompute_granularity", flag="--recompute-granularity",
            unwanted=lambda s: getattr(s, "recompute_granularity", None) is not None,
            requirement="recompute_granularity must be None (inference)",
            why="activation recomputation is for training; the shuffle layer is forward-only"),
    Refusal(field="inference_fuse_tp_communication", flag="--inference-fuse-tp-communication",
            unwanted=lambda s: bool(getattr(s, "inference_fuse_tp_communication", False)),
            requirement="inference_fuse_tp_communication must be False (the shuffle owns those collectives)",
            why="the shuffle layer owns attention's TP collectives"),
    Refusal(field="moe_pad_expert_input_to_capacity", flag="--moe-pad-expert-input-to-capacity",
            unwanted=lambda s: bool(getattr(s, "moe_pad_expert_input_to_capacity", False)),
            requirement=("moe_pad_expert_input_to_capacity must be False at build time (padding every "
                         "forward, prefill included, sends the padding over the all-to-all; token dropping "
                         "without padding works). For CUDA-graph decode Megatron switches padding on at run "
                         f"time, which the shuffle layer runs: set {_PAD_FIELD}=True instead"),
            why="the specmoe dispatcher does not pad expert inputs to capacity",
            scope="layer"),
    Refusal(field="moe_token_dispatcher_type", flag="--moe-token-dispatcher-type",
            unwanted=lambda s: getattr(s, "moe_token_dispatcher_type", None) != "specmoe",
            requirement="moe_token_dispatcher_type must be 'specmoe'",
            why="the shuffle needs the specmoe dispatcher", scope="layer"),
    Refusal(field="pipeline_model_parallel_size", flag="--pipeline-model-parallel-size",
            unwanted=lambda s: bool(getattr(s, "sequence_parallel", False))
            and _int(s, "pipeline_model_parallel_size") > 1,
            requirement=("pipeline_model_parallel_size must be 1 with sequence_parallel=True (the residual "
                         "order does not cross pipeline stages); turn sequence parallelism off for "
                         "pipelined inference"),
            why="the shuffled token order does not cross pipeline stages",
            sentence=lambda a: (
                f"--specmoe-shuffle with --sequence-parallel and --pipeline-model-parallel-size "
                f"{_int(a, 'pipeline_model_parallel_size')}: the shuffled token order does not cross pipeline "
                "stages. Drop --sequence-parallel for pipelined inference, or use "
                "--pipeline-model-parallel-size 1")),
    Refusal(field="moe_shared_expert_overlap", flag="--moe-shared-expert-overlap",
            unwanted=lambda s: bool(getattr(s, "moe_shared_expert_overlap", False)),
            requirement=("moe_shared_expert_overlap must be False (the shuffle layer runs the shared experts "
                         "itself, on its shard of tokens)"),
            why="the shuffle layer runs the shared experts itself, on its shard of tokens"),
    Refusal(field="tp_comm_overlap", flag="--tp-comm-overlap",
            unwanted=lambda s: bool(getattr(s, "tp_comm_overlap", False)),
            requirement="tp_comm_overlap must be False (the shuffle owns attention's TP collectives)",
            why="the shuffle layer owns attention's TP collectives"),
    Refusal(field="cuda_graph_impl", flag="--cuda-graph-impl",
            unwanted=lambda s: _impl(s) not in ("none", "local"),
            requirement=("cuda_graph_impl must be 'none' or 'local' (Megatron's inference CUDA graphs; "
                         "'transformer_engine' and 'full_iteration' graphs are for training)"),
            why="Megatron captures inference decode graphs with --cuda-graph-impl local only"),
    Refusal(field=_PAD_FIELD, flag=_PAD_FLAG,
            unwanted=lambda s: graphs_on(s) and _impl(s) == "local" and not hasattr(s, _PAD_FIELD),
            requirement=(f"CUDA graphs (cuda_graph_impl='local' / enable_cuda_graph) need megatron-core >= 0.19: "
                         f"this TransformerConfig has no {_PAD_FIELD} (core 0.16 keeps it on "
                         "InferenceWrapperConfig, out of the layer's sight), so the layer cannot tell padded "
                         f"decode from dropless ({_DROPLESS_WHY}); upgrade megatron-core, or set "
                         "cuda_graph_impl='none'"),
            why="", scope="layer"),
    Refusal(field=_PAD_FIELD, flag=_PAD_FLAG,
            unwanted=lambda s: graphs_on(s) and _impl(s) == "local" and hasattr(s, _PAD_FIELD)
            and not bool(getattr(s, _PAD_FIELD)),
            requirement=(f"{_PAD_FIELD} must be True with CUDA graphs (cuda_graph_impl='local' / "
                         f"enable_cuda_graph): {_DROPLESS_WHY}; set {_PAD_FLAG}, or cuda_graph_impl='none'"),
            why=_DROPLESS_WHY,
            sentence=lambda a: (f"--specmoe-shuffle with --cuda-graph-impl local needs {_PAD_FLAG}: "
                                f"{_DROPLESS_WHY}. Add {_PAD_FLAG}, or drop --cuda-graph-impl")),
    Refusal(field="sequence_parallel", flag="--sequence-parallel",
            unwanted=lambda s: graphs_on(s) and bool(getattr(s, "sequence_parallel", False)),
            requirement=("sequence_parallel must be False with CUDA graphs: each shuffle layer then hands its "
                         "token order to the next through the carrier (Python state set by each forward), which "
                         "a replayed graph would not refresh; decode without sequence parallelism"),
            why="the shuffled token order passes between layers as Python state",
            sentence=lambda a: ("--specmoe-shuffle with --sequence-parallel and CUDA graphs: each shuffle layer "
                                "hands its token order to the next as Python state, which a replayed graph would "
                                "not refresh. Drop --sequence-parallel, or drop --cuda-graph-impl")),
    Refusal(field="spec", flag="--spec", unwanted=lambda s: getattr(s, "spec", None) is not None,
            requirement="",
            why=("Megatron-LM then takes the layer spec from that module and never asks gpt_layer_specs, "
                 "so the shuffle layers would silently not be built"),
            scope="launcher"),
    Refusal(field="use_legacy_models", flag="--use-legacy-models",
            unwanted=lambda s: bool(getattr(s, "use_legacy_models", False)),
            requirement="", why="legacy models have no layer specs", scope="launcher"),
    Refusal(field="experimental_attention_variant", flag="--experimental-attention-variant",
            unwanted=lambda s: getattr(s, "experimental_attention_variant", None) is not None,
            requirement="", why="those blocks are built without gpt_layer_specs' decoder block spec",
            scope="launcher"),
    Refusal(field="mtp_num_layers", flag="--mtp-num-layers",
            unwanted=lambda s: getattr(s, "mtp_num_layers", None) is not None,
            requirement="",
            why="multi-token-prediction layers would get a second set of shuffle layers outside the block",
            scope="launcher"),
)


def _rows(scope: str) -> tuple[Refusal, ...]:
    return tuple(r for r in SHUFFLE_REFUSALS if r.scope in (scope, "both"))


def layer_refusals(config: Any) -> list[str]:
    """The layer's messages for every refused setting of ``config`` (empty: it may be built)."""
    return [r.requirement for r in _rows("layer") if r.unwanted(config)]


def launcher_sentences(args: Any) -> list[str]:
    """The whole-sentence messages (rows with ``sentence``) for Megatron-LM's parsed ``args``."""
    return [r.sentence(args) for r in _rows("launcher") if r.sentence is not None and r.unwanted(args)]


def launcher_refusals(args: Any) -> list[str]:
    """``"<flag> (<why>)"`` for every other refused setting of Megatron-LM's parsed ``args``."""
    return [f"{r.flag} ({r.why})" for r in _rows("launcher") if r.sentence is None and r.unwanted(args)]

def shuffle_dense_layer_problem(pattern: list[int], *, sequence_parallel: bool,
                                predictor: str) -> Optional[str]:
    """Why ``--specmoe-shuffle`` cannot run this mix of dense (0) and MoE (1) layers, or None.

    Dense layers stay Megatron's TransformerLayer. Without sequence parallelism every shuffle layer
    returns its output in true order, so dense layers may sit anywhere. With it, a shuffle layer
    hands the next layer its tokens in shuffled order, which only a shuffle layer reads: dense
    layers must all come before the first MoE layer (first-k-dense). The "history" predictor
    carries each MoE layer's routes to the next one along with the hidden states, so a dense layer
    between two MoE layers breaks the chain whatever the sequence parallelism. (The plan's MoE
    layer index comes from ``moe_layer_freq``, so "route" works with dense layers.)"""
    if 0 not in pattern or 1 not in pattern:
        return None
    first_moe = pattern.index(1)
    late = [i for i, x in enumerate(pattern) if not x and i > first_moe]
    if predictor == "history" and late:
        return (
            f"the shuffle's route-history predictor (--specmoe-predictor combined or history): dense "
            f"layer(s) {late} come after the MoE layer {first_moe}; the route history passes from one MoE "
            "layer to the next, which a dense layer in between interrupts. Use --specmoe-predictor token "
            "or pregate"
        )
    if sequence_parallel and late:
        return (
            f"token shuffling with --sequence-parallel: dense layer(s) {late} come after the MoE "
            f"layer {first_moe}; with sequence parallelism a shuffle layer passes its tokens on in "
            "shuffled order, which Megatron's dense TransformerLayer cannot read. Drop "
            "--sequence-parallel (shuffle layers then return true order), or use a model whose dense "
            "layers all come first (--moe-layer-freq like ([0]*K+[1]*N))"
        )
    return None


def moe_layer_pattern(num_layers: int, freq: Any, *,
                      names: tuple[str, str] = ("--moe-layer-freq", "--num-layers")) -> list[int]:
    """1 (MoE) or 0 (dense) for each of ``num_layers`` layers, from ``moe_layer_freq`` as Megatron
    reads it: an int N (layers 0, N, 2N, ... are MoE; None counts as 1) or a 0/1 list. ``names``:
    what the error calls the two settings (command-line flags, or config fields)."""
    freq = 1 if freq is None else freq
    if isinstance(freq, int):
        return [1 if i % freq == 0 else 0 for i in range(num_layers)]
    pattern = [int(bool(x)) for x in freq]
    if len(pattern) != num_layers:
        raise ValueError(
            f"{names[0]} lists {len(pattern)} layers but {names[1]} is {num_layers}"
        )
    return pattern


def moe_layer_numbers(config: Any) -> list[int]:
    """Megatron's 1-based numbers of the MoE layers of the whole model, from ``num_layers`` and
    ``moe_layer_freq`` (an int N: layers 1, N+1, 2N+1, ...; or a 0/1 list)."""
    pattern = moe_layer_pattern(int(config.num_layers), getattr(config, "moe_layer_freq", 1),
                                names=("moe_layer_freq", "num_layers"))
    return [i + 1 for i, x in enumerate(pattern) if x]
