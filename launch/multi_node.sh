#!/usr/bin/env bash
# ZO fine-tuning on several nodes listed in a hostfile (`host slots=GPUS` per line).
#
# Two ways to start it:
#   * from one node, over passwordless ssh (DeepSpeed's pdsh launcher starts every node):
#       HOSTFILE=hostfile launch/multi_node.sh --ds-config ds_configs/zero3_hpz_bf16.json --config run.yaml
#   * without ssh: run the same command on every node, each with its NODE_RANK (0 on the
#     node whose address is MASTER_ADDR):
#       NODE_RANK=1 MASTER_ADDR=10.0.0.1 HOSTFILE=hostfile launch/multi_node.sh ...
#   DRY_RUN=1 prints the command and runs nothing.
#
# Settings (environment):
#   HOSTFILE     hostfile path                       (default ./hostfile)
#   NODE_RANK    this node's index in the hostfile: no-ssh mode (default: unset, ssh mode)
#   MASTER_ADDR  address of the first host           (default: the first host in the hostfile)
#   MASTER_PORT  rendezvous port                     (default 29500)
#   GPUS         ranks per node, if not the hostfile's slots (default: the slots)
#   NNODES       use only the first NNODES hosts     (default: all)
#   LAUNCHER     ssh-mode backend: pdsh, openmpi, mpich, impi, mvapich (default pdsh)
#   ENTRY, MODULE, COMMAND, DS_ARGS, DEEPSPEED, DRY_RUN: as in launch/single_node.sh
# Environment variables reach the other nodes only if named in ~/.deepspeed_env or
# ./.deepspeed_env (lines NAME=value); DeepSpeed forwards NCCL_*, PYTHON* and UCX_* itself.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

HOSTFILE=${HOSTFILE:-hostfile}
NODE_RANK=${NODE_RANK:-}
MASTER_PORT=${MASTER_PORT:-29500}
GPUS=${GPUS:-}
NNODES=${NNODES:-}
LAUNCHER=${LAUNCHER:-pdsh}
ENTRY=${ENTRY:-}
MODULE=${MODULE:-zo_deepspeed}
COMMAND=${COMMAND:-train}
DS_ARGS=${DS_ARGS:-}
DEEPSPEED=${DEEPSPEED:-deepspeed}
DRY_RUN=${DRY_RUN:-0}

if [[ ! -f $HOSTFILE ]]; then
  echo "multi_node.sh: hostfile '$HOSTFILE' not found; write one line 'HOST slots=GPUS' per node and set HOSTFILE" >&2
  exit 2
fi
first_host=$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$HOSTFILE")
if [[ -z $first_host ]]; then
  echo "multi_node.sh: hostfile '$HOSTFILE' lists no hosts" >&2
  exit 2
fi
MASTER_ADDR=${MASTER_ADDR:-$first_host}

read -r -a launcher <<<"$DEEPSPEED"
read -r -a ds_args <<<"$DS_ARGS"
program_args

cmd=("${launcher[@]}" --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
if [[ -n $NODE_RANK ]]; then
  cmd+=(--no_ssh --node_rank "$NODE_RANK")
else
  cmd+=(--launcher "$LAUNCHER")
fi
if [[ -n $GPUS ]]; then
  cmd+=(--num_gpus "$GPUS")
fi
if [[ -n $NNODES ]]; then
  cmd+=(--num_nodes "$NNODES")
fi
cmd+=(--no_local_rank "${ds_args[@]}" "${prog[@]}" "$@")

run_printed "${cmd[@]}"
