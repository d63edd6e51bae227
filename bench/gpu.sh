#!/usr/bin/env bash
# GPU benchmarks of bench/gpu.py on one lent GPU (H100/H200; PyTorch + Triton installed; no network):
# perturbation pass GB/s vs a device-to-device copy, ZO step vs 2 x forward for a ~1B model, and one
# ZO step of an OPT-30B-shaped model (random bf16 weights built on the device) under an 80 GiB cap.
# Writes section 'gpu' of bench/RESULTS.md.
#
#   bash bench/gpu.sh                    # everything (about 5 minutes on an H100)
#   PARTS=pass bash bench/gpu.sh         # one part
#   DRY_RUN=1 bash bench/gpu.sh          # print the command, run nothing
#
# Settings (environment):
#   PYTHON       interpreter                                    (default python3)
#   PARTS        comma-separated parts: pass, step, opt30b      (default pass,step,opt30b)
#   MEM_CAP_GIB  allocator cap for opt30b, GiB; 0 for none      (default 80: an 80 GB H100 on a bigger GPU)
#   STEP_MODEL   model of the step part (zo_deepspeed/model_configs)  (default opt-1.3b)
#   BATCH, SEQ   step part batch and tokens                     (default 8, 512)
#   BIG_BATCH=1  opt30b also at batch 16 (MeZO Table 23)        (default 1)
#   JSON_OUT     raw results as JSON (default $OUT/gpu.json when $OUT is set, else none)
#   NO_WRITE=1   print only, leave bench/RESULTS.md alone
#   EXTRA        more bench/gpu.py arguments, word-split (e.g. "--repeats 5 --eager")
#   DRY_RUN=1    print the command and exit
set -euo pipefail

cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
PARTS=${PARTS:-pass,step,opt30b}
MEM_CAP_GIB=${MEM_CAP_GIB:-80}
STEP_MODEL=${STEP_MODEL:-opt-1.3b}
BATCH=${BATCH:-8}
SEQ=${SEQ:-512}
BIG_BATCH=${BIG_BATCH:-1}
OUT=${OUT:-}
JSON_OUT=${JSON_OUT:-${OUT:+$OUT/gpu.json}}
NO_WRITE=${NO_WRITE:-0}
EXTRA=${EXTRA:-}
DRY_RUN=${DRY_RUN:-0}
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-1}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}

read -r -a extra <<<"$EXTRA"
cmd=("$PYTHON" bench/gpu.py --parts "$PARTS" --mem-cap-gib "$MEM_CAP_GIB" --step-model "$STEP_MODEL"
  --batch "$BATCH" --seq "$SEQ")
if [[ $BIG_BATCH == 1 ]]; then
  cmd+=(--big-batch)
fi
if [[ -n $JSON_OUT ]]; then
  cmd+=(--json-out "$JSON_OUT")
fi
if [[ $NO_WRITE == 1 ]]; then
  cmd+=(--no-write)
fi
cmd+=("${extra[@]}")

echo "+ TORCHINDUCTOR_COMPILE_THREADS=$TORCHINDUCTOR_COMPILE_THREADS ${cmd[*]}"
if [[ $DRY_RUN == 1 ]]; then
  exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv || true
fi
exec "${cmd[@]}"
