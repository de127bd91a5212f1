"""Cluster recipes: calibrate -> plan -> serve, for torchrun and SLURM, from one description.

Glossary
    preset: a model's Megatron-LM flags (shape, attention, tokenizer) and the parallel layout
        to use for each node count.
    layout: TP (attention tensor parallel), EP (expert parallel), ETP (expert tensor parallel,
        always 1 here), PP (pipeline). With MoE parallel folding the expert grid reuses the
        attention data-parallel ranks, so Megatron-LM needs TP*PP | world and ETP*EP*PP | world
        (not TP*EP*PP | world). Every preset serves with DP attention (TP = 1: request placement,
        TE layers kept); TP > 1 (token shuffling: local linears only, for now) is refused.
    step: ``calibrate`` (run prompts through the stock alltoall dispatcher and record every MoE
        layer's routes), ``plan`` (``specmoe plan --num-experts E``: fit predictors and expert
        placement on the CPU), ``serve`` (Megatron-LM's inference server, specmoe dispatcher).
    launcher: ``torchrun`` (one node, or every node started by hand with the same MASTER_ADDR) or
        ``slurm`` (an sbatch file: srun starts one torchrun per node; rendezvous on the first node
        of the allocation).

Everything a shell file contains comes from the frozen dataclasses below; ``specmoe recipes``
prints the commands (``--dry-run``) or writes the files (``--write DIR``). Paths in commands are
shell variables (``${SPECMOE_WORK}/routes`` ...), so that the same file runs on any cluster, and
the calibration output, the plan input/output and the serve plan are one variable each.

Megatron-LM scripts (core 0.19 layout, run from a Megatron-LM checkout): calibration runs
``examples/inference/offline_inference.py``, serving ``examples/inference/launch_inference_server.py``,
both through ``python -m megatron_specmoe.launch`` so that the ``--specmoe-*`` flags parse.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Literal, Optional, Union, get_args

from megatron_specmoe.artifacts.files import atomic_file
from megatron_specmoe.schedule.layout import ParallelLayout

__all__ = [
    "ModelName",
    "Step",
    "Launcher",
    "RouteRecorder",
    "STEPS",
    "layout_flags",
    "layout_problems_on",
    "ModelPreset",
    "ScriptRef",
    "RecipePaths",
    "Command",
    "Recipe",
    "PRESETS",
    "CALIBRATION_SCRIPT",
    "SERVE_SCRIPT",
    "PLAN_PROGRAM",
    "preset",
    "make_recipe",
    "committed_recipes",
    "write_recipes",
    "render_argv",
]

ModelName = Literal["mixtral-8x7b", "deepseek-v2-lite", "qwen3-30b-a3b"]
Step = Literal["calibrate", "plan", "serve"]
Launcher = Literal["torchrun", "slurm"]
RouteRecorder = Literal["specmoe", "megatron"]
STEPS: tuple[Step, ...] = get_args(Step)

# Shell tokens that need no quoting at all.
_SAFE = re.compile(r"^[A-Za-z0-9_./=:,+@%-]+$")


def layout_flags(layout: ParallelLayout) -> tuple[str, ...]:
    """Megatron-LM's parallel-size flags for ``layout``."""
    out = (
        "--tensor-model-parallel-size", str(layout.tp),
        "--expert-model-parallel-size", str(layout.ep),
        "--expert-tensor-parallel-size", str(layout.etp),
        "--pipeline-model-parallel-size", str(layout.pp),
    )
    # Megatron-LM requires sequence parallelism for MoE with TP > 1.
    return out + (("--sequence-parallel",) if layout.tp > 1 else ())


def layout_problems_on(layout: ParallelLayout, world_size: int) -> list[str]:
    """Why ``layout`` cannot run on ``world_size`` GPUs, or cannot benefit (empty: fine)."""
    from megatron_specmoe.megatron_lm.args import layout_problems  # imports no megatron

    return layout.world_problems(world_size) + layout_problems(SimpleNamespace(
        tensor_model_parallel_size=layout.tp, expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp))


@dataclass(frozen=True, kw_only=True)
class ModelPreset:
    """One model's Megatron-LM flags (from its Hugging Face config) and layouts.

    Attributes:
        name: the preset name (a ModelName).
        title: the model's usual name, for comments.
        hf_id: Hugging Face id: the tokenizer to load and where the shape comes from.
        num_layers, hidden_size, num_attention_heads: transformer shape.
        ffn_hidden_size: dense MLP width (dense layers; also Megatron's default expert width).
        moe_ffn_hidden_size: routed expert width, or None for ffn_hidden_size.
        num_experts, topk: routed experts and experts per token.
        shared_expert_intermediate_size: total width of the shared experts, or None.
        moe_layer_freq: Megatron's --moe-layer-freq (int N, or a Python list expression).
        vocab_size: tokenizer vocabulary (before Megatron's padding).
        seq_length, max_position_embeddings: sequence lengths.
        attention_flags: GQA / MLA / positional-embedding flags.
        extra_flags: anything else the model needs (norm, activation, biases).
        layouts: (nodes, ParallelLayout) pairs, 8 GPUs per node.
    """

    name: str
    title: str
    hf_id: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    moe_ffn_hidden_size: Optional[int]
    num_experts: int
    topk: int
    shared_expert_intermediate_size: Optional[int]
    moe_layer_freq: Union[int, str]
    vocab_size: int
    seq_length: int
    max_position_embeddings: int
    attention_flags: tuple[str, ...]
    extra_flags: tuple[str, ...]
    layouts: tuple[tuple[int, ParallelLayout], ...]

    @property
    def num_moe_layers(self) -> int:
        if isinstance(self.moe_layer_freq, int):
            return len(range(0, self.num_layers, self.moe_layer_freq))
        pattern = eval(self.moe_layer_freq, {"__builtins__": {}})  # our own constant list expression
        return int(sum(1 for x in pattern if x))

    def layout_for(self, nodes: int) -> ParallelLayout:
        for n, layout in self.layouts:
            if n == nodes:
                return layout
        known = ", ".join(str(n) for n, _ in self.layouts)
        raise ValueError(f"preset {self.name} has no layout for {nodes} node(s); it has {known}")

    def model_flags(self) -> tuple[str, ...]:
        out = [
            "--num-layers", str(self.num_layers),
            "--hidden-size", str(self.hidden_size),
            "--ffn-hidden-size", str(self.ffn_hidden_size),
            "--num-attention-heads", str(self.num_attention_heads),
            *self.attention_flags,
            "--seq-length", str(self.seq_length),
            "--max-position-embeddings", str(self.max_position_embeddings),
            "--num-experts", str(self.num_experts),
            "--moe-router-topk", str(self.topk),
        ]
        if self.moe_ffn_hidden_size is not None:
            out += ["--moe-ffn-hidden-size", str(self.moe_ffn_hidden_size)]
        if self.shared_expert_intermediate_size is not None:
            out += ["--moe-shared-expert-intermediate-size",
                    str(self.shared_expert_intermediate_size)]
        if self.moe_layer_freq != 1:
            out += ["--moe-layer-freq", str(self.moe_layer_freq)]
        out += [
            *self.extra_flags,
            "--tokenizer-type", "HuggingFaceTokenizer",
            "--tokenizer-model", self.hf_id,
        ]
        return tuple(out)


_COMMON_FLAGS = ("--normalization", "RMSNorm", "--swiglu", "--untie-embeddings-and-output-weights",
                 "--disable-bias-linear")

# Shapes from each model's Hugging Face config.json.
PRESETS: dict[str, ModelPreset] = {
    "mixtral-8x7b": ModelPreset(
        name="mixtral-8x7b", title="Mixtral-8x7B", hf_id="mistralai/Mixtral-8x7B-v0.1",
        num_layers=32, hidden_size=4096, num_attention_heads=32, ffn_hidden_size=14336,
        moe_ffn_hidden_size=None, num_experts=8, topk=2, shared_expert_intermediate_size=None,
        moe_layer_freq=1, vocab_size=32000, seq_length=4096, max_position_embeddings=32768,
        attention_flags=("--group-query-attention", "--num-query-groups", "8",
                         "--position-embedding-type", "rope", "--rotary-base", "1000000"),
        extra_flags=(*_COMMON_FLAGS, "--norm-epsilon", "1e-5"),
        # 8 experts: EP stops at 8, so 2 nodes are two EP=8 replicas and the expert all-to-all
        # stays on NVLink inside each node. DP attention: ~15 GB per GPU in bf16.
        layouts=((1, ParallelLayout(tp=1, ep=8)), (2, ParallelLayout(tp=1, ep=8))),
    ),
    "deepseek-v2-lite": ModelPreset(
        name="deepseek-v2-lite", title="DeepSeek-V2-Lite", hf_id="deepseek-ai/DeepSeek-V2-Lite",
        num_layers=27, hidden_size=2048, num_attention_heads=16, ffn_hidden_size=10944,
        moe_ffn_hidden_size=1408, num_experts=64, topk=6,
        shared_expert_intermediate_size=2 * 1408, moe_layer_freq="([0]+[1]*26)",
        vocab_size=102400, seq_length=4096, max_position_embeddings=163840,
        attention_flags=("--multi-latent-attention", "--kv-lora-rank", "512",
                         "--qk-head-dim", "128", "--qk-pos-emb-head-dim", "64",
                         "--v-head-dim", "128", "--qk-layernorm",
                         "--position-embedding-type", "yarn", "--rotary-base", "10000",
                         "--rotary-scaling-factor", "40", "--mscale", "0.707",
                         "--mscale-all-dim", "0.707",
                         "--yarn-original-max-position-embeddings", "4096"),
        extra_flags=(*_COMMON_FLAGS, "--norm-epsilon", "1e-6"),
        # 2 nodes: EP=16 spans both nodes, the case where the all-to-all crosses InfiniBand.
        layouts=((1, ParallelLayout(tp=1, ep=8)), (2, ParallelLayout(tp=1, ep=16))),
    ),
    "qwen3-30b-a3b": ModelPreset(
        name="qwen3-30b-a3b", title="Qwen3-30B-A3B", hf_id="Qwen/Qwen3-30B-A3B",
        num_layers=48, hidden_size=2048, num_attention_heads=32, ffn_hidden_size=6144,
        moe_ffn_hidden_size=768, num_experts=128, topk=8, shared_expert_intermediate_size=None,
        moe_layer_freq=1, vocab_size=151936, seq_length=4096, max_position_embeddings=40960,
        attention_flags=("--group-query-attention", "--num-query-groups", "4",
                         "--kv-channels", "128", "--qk-layernorm",
                         "--position-embedding-type", "rope", "--rotary-base", "1000000"),
        extra_flags=(*_COMMON_FLAGS, "--norm-epsilon", "1e-6"),
        layouts=((1, ParallelLayout(tp=1, ep=8)), (2, ParallelLayout(tp=1, ep=16))),
    ),
}
assert set(PRESETS) == set(get_args(ModelName)), "PRESETS must match ModelName"


def preset(name: str) -> ModelPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


@dataclass(frozen=True, kw_only=True)
class ScriptRef:
    """A Megatron-LM script and the flags it adds to Megatron's parser itself.

    Attributes:
        path: relative to the Megatron-LM checkout.
        own_flags: flags from the script's extra_args_provider (not in Megatron's parser).
        source: where own_flags are defined, for whoever updates them.
    """

    path: str
    own_flags: frozenset[str]
    source: str


CALIBRATION_SCRIPT = ScriptRef(
    path="examples/inference/offline_inference.py",
    own_flags=frozenset({"--prompt-file", "--num-tokens-to-generate", "--prompt-file-num-truncate",
                         "--output-path", "--model-provider"}),
    source="megatron/inference/utils.py add_inference_args (Megatron-LM, core 0.19)",
)
SERVE_SCRIPT = ScriptRef(
    path="examples/inference/launch_inference_server.py",
    own_flags=frozenset({"--host", "--port", "--model-provider"}),
    source="examples/inference/launch_inference_server.py add_serve_args (Megatron-LM, core 0.19)",
)
# `specmoe plan`: reads the recorded routes, writes the plan folder (megatron_specmoe/cli/plan.py).
PLAN_PROGRAM = ("specmoe", "plan")


@dataclass(frozen=True, kw_only=True)
class RecipePaths:
    """Every path the steps share, as shell expressions. Variables: MEGATRON_LM (checkout),
    CHECKPOINT (Megatron checkpoint of the model), PROMPTS (calibration prompts, JSONL with a
    "text" field), SPECMOE_WORK (routes, plan, stats; on a shared filesystem for several nodes)."""

    megatron: str = "${MEGATRON_LM}"
    checkpoint: str = "${CHECKPOINT}"
    prompts: str = "${PROMPTS}"
    routes: str = "${SPECMOE_WORK}/routes"
    plan: str = "${SPECMOE_WORK}/plan"
    stats: str = "${SPECMOE_WORK}/stats/rank{rank}.jsonl"


@dataclass(frozen=True, kw_only=True)
class Command:
    """One step's command line, split by who reads each part.

    Attributes:
        step: which step.
        launcher: torchrun / srun + torchrun / srun (empty: run directly).
        program: what the launcher starts (``-m megatron_specmoe.launch SCRIPT`` or
            ``specmoe plan``).
        megatron_args: flags for Megatron-LM's parser (ours included); empty for ``plan``.
        script_args: flags the script (or ``specmoe plan``) adds itself.
        script: the Megatron-LM script, or None for ``plan``.
        creates: folders the step writes into (made before it runs).
    """

    step: Step
    launcher: tuple[str, ...]
    program: tuple[str, ...]
    megatron_args: tuple[str, ...]
    script_args: tuple[str, ...]
    script: Optional[ScriptRef]
    creates: tuple[str, ...] = ()

    def argv(self) -> tuple[str, ...]:
        return (*self.launcher, *self.program, *self.megatron_args, *self.script_args)

    def flag_value(self, flag: str) -> Optional[str]:
        """The value after ``flag`` (``--flag VALUE`` or ``--flag=VALUE``), or None."""
        argv = self.argv()
        for i, token in enumerate(argv):
            if token == flag and i + 1 < len(argv):
                return argv[i + 1]
            if token.startswith(flag + "="):
                return token[len(flag) + 1:]
        return None

    def render(self, indent: str = "") -> str:
        """The command as shell text: the program on one line, then one flag (with its value)
        per line; a bare word (torchrun after srun's flags) starts a line too."""
        # Launcher tokens are "--flag=value" or program names: one per line.
        lines: list[list[str]] = [[token] for token in self.launcher]
        if self.program:
            lines.append(list(self.program))
        for token in (*self.megatron_args, *self.script_args):
            if token.startswith("--") or not lines:
                lines.append([token])
            else:
                lines[-1].append(token)
        text = [" ".join(render_argv(line)) for line in lines]
        return (" \\\n" + indent + "    ").join(text)


def render_argv(argv) -> list[str]:
    """Quote each token for bash: bare when safe, double quotes when it expands a variable
    (``${...}``), single quotes otherwise."""
    out = []
    for token in argv:
        if _SAFE.match(token):
            out.append(token)
        elif "$" in token:
            if any(c in token for c in '"\\`'):
                raise ValueError(f"cannot quote {token!r}: it mixes a variable with \", \\ or `")
            out.append(f'"{token}"')
        else:
            out.append(shlex.quote(token))
    return out


_NCCL_COMMENTS_NVLINK = (
    "# Megatron-LM overlaps TP communication with compute only if kernels are queued in order.",
    "export CUDA_DEVICE_MAX_CONNECTIONS=1",
    "# Inside a node NCCL uses NVLink/NVSwitch by itself; P2P over NVLink only (not PCIe):",
    'export NCCL_P2P_LEVEL="${NCCL_P2P_LEVEL:-NVL}"',
    'export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"',
    "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
)
_NCCL_COMMENTS_IB = (
    "# Between nodes: InfiniBand. NCCL_IB_HCA lists the HCAs to use (see `ibstat`; '=mlx5_0,...'",
    "# for an exact list); NCCL_SOCKET_IFNAME the interface for NCCL's bootstrap and TCP fallback",
    "# ('^lo,docker' means any but those). On RoCE also set NCCL_IB_GID_INDEX (often 3).",
    'export NCCL_IB_HCA="${NCCL_IB_HCA:-mlx5}"',
    'export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-^lo,docker}"',
    "# GPUDirect RDMA between the NIC and GPU memory when they share a PCIe switch.",
    'export NCCL_NET_GDR_LEVEL="${NCCL_NET_GDR_LEVEL:-PHB}"',
)


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """calibrate -> plan -> serve for one model on ``nodes`` x ``gpus_per_node`` GPUs.

    Attributes:
        model: the preset.
        launcher: torchrun or slurm.
        nodes: node count (a preset layout must exist for it).
        gpus_per_node: GPUs per node.
        recorder: ``specmoe`` (--specmoe-record-routes: routes with token ids, for every
            predictor) or ``megatron`` (Megatron's --moe-routing-trace-path: routes only, so no
            token-table predictor, which request placement needs: refused).
        predictor: the --specmoe-predictor to plan and serve with ("token", the only one request
            placement takes).
        paths: shared paths.
        calibration_tokens: tokens generated per calibration prompt.
        port: the server's HTTP port.
        master_port: the rendezvous port on the first node.
    """

    model: ModelPreset
    launcher: Launcher
    nodes: int
    gpus_per_node: int = 8
    recorder: RouteRecorder = "specmoe"
    predictor: str = "token"
    paths: RecipePaths = field(default_factory=RecipePaths)
    calibration_tokens: int = 128
    port: int = 5000
    master_port: int = 29500

    def __post_init__(self) -> None:
        for name in ("nodes", "gpus_per_node", "calibration_tokens", "port", "master_port"):
            if type(getattr(self, name)) is not int or getattr(self, name) < 1:  # not bool, >= 1
                raise ValueError(f"Recipe.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.launcher not in get_args(Launcher):
            raise ValueError(f"Recipe.launcher {self.launcher!r} is not one of {get_args(Launcher)}")
        if self.recorder not in get_args(RouteRecorder):
            raise ValueError(f"Recipe.recorder {self.recorder!r} is not one of "
                             f"{get_args(RouteRecorder)}")
        if self.recorder == "megatron" and self.predictor in ("token", "combined"):
            raise ValueError(f"Recipe: predictor {self.predictor!r} needs token ids, which "
                             "Megatron's --moe-routing-trace-path does not record; use "
                             "recorder='specmoe'")
        problems = layout_problems_on(self.layout, self.world_size)
        if problems:
            raise ValueError(f"Recipe {self.model.name} on {self.nodes}x{self.gpus_per_node}: "
                             + "; ".join(problems))
        if self.layout.tp > 1:
            raise ValueError(f"Recipe {self.model.name}: token shuffling (what TP = {self.layout.tp} turns on) "
                             "needs --transformer-impl local until tools/gpu_check.sh has verified its TE "
                             "linears on a GPU, and the serve step runs Megatron's TE layers; use a layout "
                             "with TP = 1 (DP attention: request placement)")
        if self.predictor != "token":
            raise ValueError(f"Recipe: predictor {self.predictor!r}: the serve step places requests (DP "
                             "attention), which predicts from the prompt's token ids: use predictor 'token'")

    @property
    def layout(self) -> ParallelLayout:
        return self.model.layout_for(self.nodes)

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def file_name(self) -> str:
        if self.launcher == "slurm":
            return f"{self.model.name}.slurm-{self.nodes}nodes.sbatch"
        nodes = "1node" if self.nodes == 1 else f"{self.nodes}nodes"
        return f"{self.model.name}.torchrun-{nodes}.sh"

    # ---- command parts

    def _gpu_launcher(self) -> tuple[str, ...]:
        torchrun = ("torchrun", f"--nproc-per-node={self.gpus_per_node}")
        if self.launcher == "torchrun" and self.nodes == 1:
            return (*torchrun, "--nnodes=1", "--standalone")
        rdzv = ("--rdzv-backend=c10d", "--rdzv-endpoint=${MASTER_ADDR}:${MASTER_PORT}")
        if self.launcher == "torchrun":
            return (*torchrun, f"--nnodes={self.nodes}", "--rdzv-id=specmoe", *rdzv)
        return ("srun", f"--nodes={self.nodes}", "--ntasks-per-node=1", *torchrun,
                f"--nnodes={self.nodes}", "--rdzv-id=${SLURM_JOB_ID}", *rdzv)

    def _cpu_launcher(self) -> tuple[str, ...]:
        return ("srun", "--nodes=1", "--ntasks=1") if self.launcher == "slurm" else ()

    def _megatron_common(self) -> tuple[str, ...]:
        return (*self.model.model_flags(), *layout_flags(self.layout),
                "--bf16", "--moe-grouped-gemm", "--moe-router-dtype", "fp32",
                "--micro-batch-size", "1", "--inference-max-seq-length", str(self.model.seq_length),
                "--load", self.paths.checkpoint)

    def _program(self, script: ScriptRef) -> tuple[str, ...]:
        return ("-m", "megatron_specmoe.launch", f"{self.paths.megatron}/{script.path}")

    def commands(self) -> dict[str, Command]:
        """The three steps, in order."""
        p = self.paths
        record = (("--specmoe-record-routes", p.routes) if self.recorder == "specmoe"
                  else ("--moe-routing-trace-path", p.routes))
        calibrate = Command(
            step="calibrate", launcher=self._gpu_launcher(), program=self._program(CALIBRATION_SCRIPT),
            megatron_args=(*self._megatron_common(), "--moe-token-dispatcher-type", "alltoall",
                           *record),
            script_args=("--prompt-file", p.prompts,
                         "--num-tokens-to-generate", str(self.calibration_tokens)),
            script=CALIBRATION_SCRIPT, creates=(p.routes,),
        )
        plan = Command(
            step="plan", launcher=self._cpu_launcher(), program=PLAN_PROGRAM, megatron_args=(),
            script_args=("--traces", p.routes, "--ep", str(self.layout.ep), "--out", p.plan,
                         "--num-experts", str(self.model.num_experts), "--predictor", self.predictor),
            script=None,
        )
        serve = Command(
            step="serve", launcher=self._gpu_launcher(), program=self._program(SERVE_SCRIPT),
            megatron_args=(*self._megatron_common(), "--moe-token-dispatcher-type", "specmoe",
                           "--specmoe-plan", p.plan, "--specmoe-predictor", self.predictor,
                           "--specmoe-request-placement",
                           "--specmoe-stats", p.stats),
            script_args=("--port", str(self.port)),
            script=SERVE_SCRIPT, creates=(str(Path(p.stats).parent),),
        )
        return {"calibrate": calibrate, "plan": plan, "serve": serve}

    # ---- shell text

    def _header(self) -> list[str]:
        lay, m = self.layout, self.model
        dp = self.world_size // (lay.tp * lay.pp)
        where = {
            ("torchrun", True): "bash THIS_FILE STEP",
            ("torchrun", False): f"on each of the {self.nodes} nodes: MASTER_ADDR=<first node> "
                                 "bash THIS_FILE STEP",
            ("slurm", True): "sbatch THIS_FILE STEP",
            ("slurm", False): "sbatch THIS_FILE STEP",
        }[(self.launcher, self.nodes == 1)]
        lines = []
        if self.launcher == "slurm":
            lines += [
                f"#SBATCH --job-name=specmoe-{m.name}",
                f"#SBATCH --nodes={self.nodes}",
                "#SBATCH --ntasks-per-node=1",
                f"#SBATCH --gpus-per-node={self.gpus_per_node}",
                "#SBATCH --exclusive",
                "#SBATCH --time=04:00:00",
                "#SBATCH --output=specmoe-%x-%j.out",
            ]
        lines += [
            f"# {m.title} ({m.hf_id}): {m.num_layers} layers ({m.num_moe_layers} MoE), "
            f"{m.num_experts} experts, top-{m.topk}"
            + (f", shared experts ({m.shared_expert_intermediate_size} wide)"
               if m.shared_expert_intermediate_size else "") + ".",
            f"# {self.nodes} node(s) x {self.gpus_per_node} GPUs: TP={lay.tp} EP={lay.ep} "
            f"ETP={lay.etp} PP={lay.pp} (attention DP={dp}).",
            "#",
            "# Generated from megatron_specmoe/megatron_lm/recipes.py by:",
            f"#   specmoe recipes --model {m.name} --nodes {self.nodes} --launcher {self.launcher} "
            "--write DIR",
            "# Edit recipes.py and regenerate rather than editing this file.",
            "#",
            f"# Usage: {where}, with STEP one of:",
            "#   calibrate  run PROMPTS through the stock alltoall dispatcher, record the routes",
            "#   plan       specmoe plan: fit the predictor and expert placement (CPU, one node)",
            "#   serve      Megatron-LM's inference server, specmoe dispatcher, DP attention: each",
            "#              request goes to the DP rank hosting its predicted experts",
            "# Environment: MEGATRON_LM (a Megatron-LM checkout, core 0.19), CHECKPOINT (this",
            "# model's Megatron checkpoint), PROMPTS (calibrate: JSONL, one {\"text\": ...} per line),",
            "# SPECMOE_WORK (routes/, plan/, stats/; default ./specmoe-work; on a filesystem that",
            "# every node sees). megatron_specmoe must be importable (pip install) on every node.",
        ]
        return lines

    def _environment(self) -> list[str]:
        lines = [
            'STEP="${1:-}"',
            'SPECMOE_WORK="${SPECMOE_WORK:-$PWD/specmoe-work}"',
            "export SPECMOE_WORK",
        ]
        if self.launcher == "slurm":
            lines += [
                "# Rendezvous on the first node of the allocation (sed, not head: head would close",
                "# the pipe early and pipefail would stop the job on scontrol's SIGPIPE).",
                'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"',
                f'MASTER_PORT="${{MASTER_PORT:-{self.master_port}}}"',
                "export MASTER_ADDR MASTER_PORT",
            ]
        elif self.nodes > 1:
            lines += [
                "# Every node runs calibrate/serve with the same MASTER_ADDR (the first node's",
                "# hostname); plan runs on one node and needs none.",
                'MASTER_ADDR="${MASTER_ADDR:-}"',
                f'MASTER_PORT="${{MASTER_PORT:-{self.master_port}}}"',
                "export MASTER_ADDR MASTER_PORT",
            ]
        lines += list(_NCCL_COMMENTS_NVLINK)
        if self.nodes > 1:
            lines += list(_NCCL_COMMENTS_IB)
        return lines

    def _require(self, step: str) -> list[str]:
        need = {
            "calibrate": ("MEGATRON_LM", "CHECKPOINT", "PROMPTS"),
            "plan": (),
            "serve": ("MEGATRON_LM", "CHECKPOINT"),
        }[step]
        if step != "plan" and self.launcher == "torchrun" and self.nodes > 1:
            need += ("MASTER_ADDR",)
        return [f': "${{{name}:?set {name} (see the top of this file)}}"' for name in need]

    def step_lines(self, step: str, indent: str = "") -> list[str]:
        """The shell lines of one step: required variables, folders, the command."""
        cmd = self.commands()[step]
        lines = self._require(step)
        if cmd.creates:
            lines.append("mkdir -p " + " ".join(render_argv(cmd.creates)))
        lines.append(cmd.render(indent))
        return [indent + line for line in lines]

    def script_text(self) -> str:
        lines = ["#!/usr/bin/env bash", *self._header(), "set -euo pipefail", "",
                 *self._environment(), "", 'case "$STEP" in']
        for step in STEPS:
            lines.append(f"  {step})")
            lines += self.step_lines(step, indent="    ")
            lines.append("    ;;")
        lines += [
            "  *)",
            '    echo "usage: $0 calibrate|plan|serve (got: \'$STEP\')" >&2',
            "    exit 2",
            "    ;;",
            "esac",
        ]
        return "\n".join(lines) + "\n"

    def dry_run(self, steps: tuple[str, ...] = STEPS) -> str:
        """What ``--dry-run`` prints: the environment lines and each step's exact command."""
        out = [f"# {self.file_name}: {', '.join(steps)}", *self._environment()]
        for step in steps:
            out += ["", f"# --- {step}", *self.step_lines(step)]
        return "\n".join(out) + "\n"


def make_recipe(model: str, *, nodes: int, launcher: str, **kwargs) -> Recipe:
    return Recipe(model=preset(model), nodes=nodes, launcher=launcher, **kwargs)


def committed_recipes() -> list[Recipe]:
    """The recipes kept in recipes/: every model x {torchrun 1 node, torchrun 2 nodes,
    slurm 2 nodes}."""
    out = []
    for name in PRESETS:
        out.append(make_recipe(name, nodes=1, launcher="torchrun"))
        out.append(make_recipe(name, nodes=2, launcher="torchrun"))
        out.append(make_recipe(name, nodes=2, launcher="slurm"))
    return out


def write_recipes(recipes, directory) -> list[Path]:
    """Write each recipe's shell file into ``directory`` (made if missing), executable."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for r in recipes:
        path = directory / r.file_name
        with atomic_file(path) as tmp:  # renamed into place: never half a script
            tmp.write_text(r.script_text()), tmp.chmod(0o755)
        written.append(path)
    return written
