#!/usr/bin/env bash
# ZO fine-tuning started by `accelerate launch` (torchrun underneath) with the DeepSpeed
# plugin config launch/accelerate_zero3.yaml. Equivalent to launch/single_node.sh; use it
# where accelerate is the house launcher.
#
#   GPUS=8 launch/accelerate.sh --ds-config ds_configs/zero3_bf16.json --config run.yaml
#   DRY_RUN=1 launch/accelerate.sh ...         # print the command, run nothing
#
# Settings (environment):
#   ACCELERATE_CONFIG  accelerate config file   (default: accelerate_zero3.yaml next to this script)
#   GPUS               processes on this node   (default: the config's num_processes)
#   MASTER_PORT        rendezvous port          (default 29500)
#   ACCELERATE_ARGS    extra `accelerate launch` arguments, word-split (e.g. "--cpu" on a CPU box)
#   ENTRY, MODULE, COMMAND, DRY_RUN: as in launch/single_node.sh
#   ACCELERATE         the accelerate command   (default accelerate)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-$here/accelerate_zero3.yaml}
GPUS=${GPUS:-}
MASTER_PORT=${MASTER_PORT:-29500}
ACCELERATE_ARGS=${ACCELERATE_ARGS:-}
ENTRY=${ENTRY:-}
MODULE=${MODULE:-zo_deepspeed}
COMMAND=${COMMAND:-train}
ACCELERATE=${ACCELERATE:-accelerate}
DRY_RUN=${DRY_RUN:-0}

read -r -a launcher <<<"$ACCELERATE"
read -r -a acc_args <<<"$ACCELERATE_ARGS"
program_args

cmd=("${launcher[@]}" launch --config_file "$ACCELERATE_CONFIG" --main_process_port "$MASTER_PORT")
if [[ -n $GPUS ]]; then
  cmd+=(--num_processes "$GPUS")
fi
cmd+=("${acc_args[@]}" "${prog[@]}" "$@")
run_printed "${cmd[@]}"
