"""Cluster recipes: calibrate -> plan -> serve, for torchrun and SLURM, from one description.

Glossary
    preset: a model's Megatron-LM flags and layouts (``presets.py``).
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
from typing import Literal, Optional, get_args

from megatron_specmoe.artifacts.files import atomic_file
from megatron_specmoe.megatron_lm.presets import (
    PRESETS,
    ModelName,
    ModelPreset,
    layout_flags,
    layout_problems_on,
    preset,
)
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
    "render_array",
    "SHARED_ARRAY",
]

Step = Literal["calibrate", "plan", "serve"]
Launcher = Literal["torchrun", "slurm"]
RouteRecorder = Literal["specmoe", "megatron"]
STEPS: tuple[Step, ...] = get_args(Step)

# Shell tokens that need no quoting at all.
_SAFE = re.compile(r"^[A-Za-z0-9_./=:,+@%-]+$")


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
        shared: how many leading ``megatron_args`` are the recipe's shared Megatron flags (the
            model, its layout, precision: the same for calibrate and serve); a file
            states them once, in the bash array ``MEGATRON_ARGS``.
    """

    step: Step
    launcher: tuple[str, ...]
    program: tuple[str, ...]
    megatron_args: tuple[str, ...]
    script_args: tuple[str, ...]
    script: Optional[ScriptRef]
    creates: tuple[str, ...] = ()
    shared: int = 0

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

    def render(self, indent: str = "", *, shared_array: bool = False) -> str:
        """The command as shell text: the program on one line, then one flag (with its value)
        per line; a bare word (torchrun after srun's flags) starts a line too. With
        ``shared_array`` the shared Megatron flags are ``"${MEGATRON_ARGS[@]}"`` (see
        :func:`render_array`)."""
        # Launcher tokens are "--flag=value" or program names: one per line.
        lines = [render_argv([token]) for token in self.launcher]
        if self.program:
            lines.append(render_argv(self.program))
        rest = (*self.megatron_args, *self.script_args)
        if shared_array and self.shared:
            lines.append(['"${%s[@]}"' % SHARED_ARRAY])
            rest = rest[self.shared:]
        lines += _flag_lines(rest)
        return (" \\\n" + indent + "    ").join(" ".join(line) for line in lines)


# The bash array a recipe file keeps its shared Megatron flags in.
SHARED_ARRAY = "MEGATRON_ARGS"


def _flag_lines(argv) -> list[list[str]]:
    """Quoted tokens, one flag with its values per line (a value never starts a line: the
    first token always does)."""
    lines: list[list[str]] = []
    for token in argv:
        if token.startswith("--") or not lines:
            lines.append([token])
        else:
            lines[-1].append(token)
    return [render_argv(line) for line in lines]


def render_array(name: str, argv, indent: str = "") -> list[str]:
    """``name=( ... )``: a bash array of ``argv``, one flag (with its values) per line."""
    return ([f"{indent}{name}=("] + [f"{indent}    {' '.join(line)}" for line in _flag_lines(argv)]
            + [f"{indent})"])


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
        """The flags calibrate and serve share: constants only (no shell variable, so the array
        is defined before any step checks its variables)."""
        return (*self.model.model_flags(), *layout_flags(self.layout),
                "--bf16", "--moe-grouped-gemm", "--moe-router-dtype", "fp32",
                "--micro-batch-size", "1", "--inference-max-seq-length", str(self.model.seq_length))

    def _program(self, script: ScriptRef) -> tuple[str, ...]:
        return ("-m", "megatron_specmoe.launch", f"{self.paths.megatron}/{script.path}")

    def commands(self) -> dict[str, Command]:
        """The three steps, in order."""
        p = self.paths
        record = (("--specmoe-record-routes", p.routes) if self.recorder == "specmoe"
                  else ("--moe-routing-trace-path", p.routes))
        calibrate = Command(
            step="calibrate", launcher=self._gpu_launcher(), program=self._program(CALIBRATION_SCRIPT),
            megatron_args=(*self._megatron_common(), "--load", p.checkpoint,
                           "--moe-token-dispatcher-type", "alltoall",
                           *record),
            shared=len(self._megatron_common()),
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
            shared=len(self._megatron_common()),
            megatron_args=(*self._megatron_common(), "--load", p.checkpoint,
                           "--moe-token-dispatcher-type", "specmoe",
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

    def step_lines(self, step: str, indent: str = "", *, shared_array: bool = False) -> list[str]:
        """The shell lines of one step: required variables, folders, the command (its shared
        Megatron flags as ``"${MEGATRON_ARGS[@]}"`` with ``shared_array``)."""
        cmd = self.commands()[step]
        lines = self._require(step)
        if cmd.creates:
            lines.append("mkdir -p " + " ".join(render_argv(cmd.creates)))
        lines.append(cmd.render(indent, shared_array=shared_array))
        return [indent + line for line in lines]

    def shared_lines(self) -> list[str]:
        """The bash array of the Megatron flags calibrate and serve share (stated once)."""
        return ["# The model, its parallel layout and precision: the Megatron-LM flags that calibrate",
                "# and serve share.",
                *render_array(SHARED_ARRAY, self._megatron_common())]

    def script_text(self) -> str:
        lines = ["#!/usr/bin/env bash", *self._header(), "set -euo pipefail", "",
                 *self._environment(), "", *self.shared_lines(), "", 'case "$STEP" in']
        for step in STEPS:
            lines.append(f"  {step})")
            lines += self.step_lines(step, indent="    ", shared_array=True)
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
