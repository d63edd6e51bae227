#!/usr/bin/env bash
# ZO fine-tuning on one node with the DeepSpeed launcher: one rank per GPU.
#
#   GPUS=8 launch/single_node.sh --ds-config ds_configs/zero3_bf16.json --config my_run.yaml
#   DRY_RUN=1 launch/single_node.sh ...        # print the command, run nothing
#
# Arguments are passed to the program, by default the trainer CLI
# (`python -m zo_deepspeed train ARGS`). Settings (environment):
#   GPUS         ranks on this node            (default: GPUs nvidia-smi lists, else 1)
#   MASTER_PORT  rendezvous port               (default 29500; change it for a second job on the node)
#   ENTRY        run this Python script instead of the trainer module (e.g. tests/dist/run_zo.py)
#   MODULE       module run with `python -m`   (default zo_deepspeed)
#   COMMAND      sub-command of the module     (default train; "none" for none)
#   DS_ARGS      extra `deepspeed` launcher arguments, word-split (e.g. "--bind_cores_to_rank")
#   DEEPSPEED    the launcher command          (default deepspeed)
#   DRY_RUN=1    print the command and exit
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

gpus_here() {
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    nvidia-smi -L | grep -c '^GPU'
  else
    echo 1
  fi
}

GPUS=${GPUS:-$(gpus_here)}
MASTER_PORT=${MASTER_PORT:-29500}
ENTRY=${ENTRY:-}
MODULE=${MODULE:-zo_deepspeed}
COMMAND=${COMMAND:-train}
DS_ARGS=${DS_ARGS:-}
DEEPSPEED=${DEEPSPEED:-deepspeed}
DRY_RUN=${DRY_RUN:-0}

read -r -a launcher <<<"$DEEPSPEED"
read -r -a ds_args <<<"$DS_ARGS"
program_args

# --no_local_rank: ranks read LOCAL_RANK from the environment instead of a --local_rank argument
cmd=("${launcher[@]}" --num_gpus "$GPUS" --master_port "$MASTER_PORT" --no_local_rank "${ds_args[@]}"
  "${prog[@]}" "$@")
run_printed "${cmd[@]}"
