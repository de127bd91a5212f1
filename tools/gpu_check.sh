#!/usr/bin/env bash
# GPU check for a machine with an NVIDIA GPU whose Python already has torch with CUDA.
#
#   bash tools/gpu_check.sh [OUT_DIR]        (results in OUT_DIR/gpu_check.json, log beside it)
#
# Installs nothing from the network. If megatron-core is not importable, put its wheel (and, for
# 0.19.x, triton's) in .whl/ at the repository root: they are installed from there with --no-index.
# Bounded to 8 minutes.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$here}"
mkdir -p "$out"
py="${PYTHON:-python3}"
if ! "$py" -c "import megatron.core" 2>/dev/null; then
  if compgen -G "$here/.whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --target /tmp/specmoe-site "$here"/.whl/*.whl
    export PYTHONPATH="/tmp/specmoe-site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "gpu_check: megatron-core is not importable and no wheel is in $here/.whl/" >&2
    exit 2
  fi
fi
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
timeout 480 "$py" "$here/tools/gpu_check.py" --out "$out/gpu_check.json" 2>&1 | tee "$out/gpu_check.log"
