#!/usr/bin/env bash
# Encode image shards into code shards with a frozen tokenizer, every GPU of every node taking its
# share of the shards:
#   sbatch --nodes=2 slurm/precompute_codes.sh --tokenizer exports/fqgan-dual-f16 \
#       --data data/imagenet/train --out data/imagenet/codes/fqgan_dual_f16 --resolution 256 --flip
# Resumable: finished output shards are skipped, so --requeue (or a rerun) continues the job.
#SBATCH --job-name=vtok-codes
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"  # sbatch runs a spooled copy of this file: find launch.sh from the repo
echo "[vtok] job ${SLURM_JOB_ID:-?} on ${SLURM_JOB_NODELIST:-?}: precompute codes $*"
exec srun --kill-on-bad-exit=1 slurm/launch.sh vtok precompute codes "$@"
