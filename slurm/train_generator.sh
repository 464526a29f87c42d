#!/usr/bin/env bash
# Train a generator on precomputed codes:  sbatch slurm/train_generator.sh recipes/gpt/gpt_b_vqgan.yaml
#SBATCH --job-name=vtok-generator
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32           # code shards decode cheaply: fewer loader cores than tokenizers
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@120
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
exec bash slurm/train.sh "$@"
