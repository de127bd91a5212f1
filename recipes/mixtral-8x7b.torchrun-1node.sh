#!/usr/bin/env bash
# Mixtral-8x7B (mistralai/Mixtral-8x7B-v0.1): 32 layers (32 MoE), 8 experts, top-2.
# 1 node(s) x 8 GPUs: TP=1 EP=8 ETP=1 PP=1 (attention DP=8).
#
# Generated from megatron_specmoe/megatron_lm/recipes.py by:
#   specmoe recipes --model mixtral-8x7b --nodes 1 --launcher torchrun --write DIR
# Edit recipes.py and regenerate rather than editing this file.
#
# Usage: bash THIS_FILE STEP, with STEP one of:
#   calibrate  run PROMPTS through the stock alltoall dispatcher, record the routes
#   plan       specmoe plan: fit the predictor and expert placement (CPU, one node)
#   serve      Megatron-LM's inference server, specmoe dispatcher, DP attention: each
#              request goes to the DP rank hosting its predicted experts
# Environment: MEGATRON_LM (a Megatron-LM checkout, core 0.19), CHECKPOINT (this
# model's Megatron checkpoint), PROMPTS (calibrate: JSONL, one {"text": ...} per line),
# SPECMOE_WORK (routes/, plan/, stats/; default ./specmoe-work; on a filesystem that
# every node sees). megatron_specmoe must be importable (pip install) on every node.
set -euo pipefail

STEP="${1:-}"
SPECMOE_WORK="${SPECMOE_WORK:-$PWD/specmoe-work}"
export SPECMOE_WORK
# Megatron-LM overlaps TP communication with compute only if kernels are queued in order.
export CUDA_DEVICE_MAX_CONNECTIONS=1
# Inside a node NCCL uses NVLink/NVSwitch by itself; P2P over NVLink only (not PCIe):
export NCCL_P2P_LEVEL="${NCCL_P2P_LEVEL:-NVL}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1

# The model, its parallel layout and precision: the Megatron-LM flags that calibrate
# and serve share.
MEGATRON_ARGS=(
    --num-layers 32
    --hidden-size 4096
    --ffn-hidden-size 14336
    --num-attention-heads 32
    --group-query-attention
    --num-query-groups 8
    --position-embedding-type rope
    --rotary-base 1000000
    --seq-length 4096
    --max-position-embeddings 32768
    --num-experts 8
    --moe-router-topk 2
    --normalization RMSNorm
    --swiglu
    --untie-embeddings-and-output-weights
    --disable-bias-linear
    --norm-epsilon 1e-5
    --tokenizer-type HuggingFaceTokenizer
    --tokenizer-model mistralai/Mixtral-8x7B-v0.1
    --tensor-model-parallel-size 1
    --expert-model-parallel-size 8
    --expert-tensor-parallel-size 1
    --pipeline-model-parallel-size 1
    --bf16
    --moe-grouped-gemm
    --moe-router-dtype fp32
    --micro-batch-size 1
    --inference-max-seq-length 4096
)

case "$STEP" in
  calibrate)
    : "${MEGATRON_LM:?set MEGATRON_LM (see the top of this file)}"
    : "${CHECKPOINT:?set CHECKPOINT (see the top of this file)}"
    : "${PROMPTS:?set PROMPTS (see the top of this file)}"
    mkdir -p "${SPECMOE_WORK}/routes"
    torchrun \
        --nproc-per-node=8 \
        --nnodes=1 \
        --standalone \
        -m megatron_specmoe.launch "${MEGATRON_LM}/examples/inference/offline_inference.py" \
        "${MEGATRON_ARGS[@]}" \
        --load "${CHECKPOINT}" \
        --moe-token-dispatcher-type alltoall \
        --specmoe-record-routes "${SPECMOE_WORK}/routes" \
        --prompt-file "${PROMPTS}" \
        --num-tokens-to-generate 128
    ;;
  plan)
    specmoe plan \
        --traces "${SPECMOE_WORK}/routes" \
        --ep 8 \
        --out "${SPECMOE_WORK}/plan" \
        --num-experts 8 \
        --predictor token
    ;;
  serve)
    : "${MEGATRON_LM:?set MEGATRON_LM (see the top of this file)}"
    : "${CHECKPOINT:?set CHECKPOINT (see the top of this file)}"
    mkdir -p "${SPECMOE_WORK}/stats"
    torchrun \
        --nproc-per-node=8 \
        --nnodes=1 \
        --standalone \
        -m megatron_specmoe.launch "${MEGATRON_LM}/examples/inference/launch_inference_server.py" \
        "${MEGATRON_ARGS[@]}" \
        --load "${CHECKPOINT}" \
        --moe-token-dispatcher-type specmoe \
        --specmoe-plan "${SPECMOE_WORK}/plan" \
        --specmoe-predictor token \
        --specmoe-request-placement \
        --specmoe-stats "${SPECMOE_WORK}/stats/rank{rank}.jsonl" \
        --port 5000
    ;;
  *)
    echo "usage: $0 calibrate|plan|serve (got: '$STEP')" >&2
    exit 2
    ;;
esac
