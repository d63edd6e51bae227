#!/usr/bin/env bash
# Shared by launch/single_node.sh, multi_node.sh and accelerate.sh (sourced, not run).
# slurm.sbatch keeps its own copy of program_args: sbatch runs a spooled copy of the
# script, which cannot find this file next to it.
set -euo pipefail

# Sets the array `prog`, what the launcher starts on every rank: the ENTRY script,
# or `python -m MODULE [COMMAND]` (COMMAND=none: no sub-command).
# shellcheck disable=SC2034  # prog is read by the script that sources this file
program_args() {
  if [[ -n $ENTRY ]]; then
    prog=("$ENTRY")
  elif [[ $COMMAND == none ]]; then
    prog=(--module "$MODULE")
  else
    prog=(--module "$MODULE" "$COMMAND")
  fi
}

# Prints the command shell-quoted after '+', then replaces this shell with it unless DRY_RUN=1.
run_printed() {
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  if [[ $DRY_RUN == 1 ]]; then
    exit 0
  fi
  exec "$@"
}
