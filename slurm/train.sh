#!/usr/bin/env bash
# Shared body of train_tokenizer.sh / train_generator.sh: train, then requeue if preempted.
# Usage: slurm/train.sh RECIPE [key=value ...]
set -uo pipefail
recipe=${1:?usage: sbatch slurm/train_tokenizer.sh RECIPE [key=value ...]}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
run_dir=$(python -m vtok.cli info "$@" --get run_dir) || exit 2

echo "[vtok] job ${SLURM_JOB_ID:-?} on ${SLURM_JOB_NODELIST:-?}: ${recipe} -> ${run_dir}"
srun --kill-on-bad-exit=1 "${here}/launch.sh" vtok train "$@"
rc=$?
if [ "$rc" -ne 0 ]; then
  echo "[vtok] training failed (exit ${rc}); not requeueing" >&2
  exit "$rc"
fi
if [ ! -f "${run_dir}/COMPLETE" ]; then
  echo "[vtok] stopped before the last step (preempted or time limit): requeueing ${SLURM_JOB_ID}"
  scontrol requeue "${SLURM_JOB_ID}"
fi
