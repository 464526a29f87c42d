#!/usr/bin/env bash
# Encode image shards into code shards with a frozen tokenizer: `slurm/precompute.sh codes ...`.
#   sbatch --nodes=2 slurm/precompute_codes.sh --tokenizer exports/fqgan-dual-f16 \
#       --data data/imagenet/train --out data/imagenet/codes/fqgan_dual_f16 --resolution 256 --flip
# Resumable and requeued like every precompute job (see slurm/precompute.sh).
#SBATCH --job-name=vtok-codes
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
exec bash slurm/precompute.sh codes "$@"
