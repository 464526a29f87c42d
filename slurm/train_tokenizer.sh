#!/usr/bin/env bash
# Train a tokenizer recipe:  sbatch slurm/train_tokenizer.sh recipes/fqgan/fqgan_dual_f16.yaml [key=value ...]
# Defaults below are for one 8-GPU node; override on the command line, e.g. sbatch --nodes=4 ...
#SBATCH --job-name=vtok-tokenizer
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1          # one torchrun agent per node; it starts one worker per GPU
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64           # data-loader workers need cores: data.num_workers x GPUs
#SBATCH --time=48:00:00
#SBATCH --requeue                    # allow requeueing after preemption / the time limit
#SBATCH --signal=USR1@120            # 2 min before the limit: workers save a checkpoint and exit
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
exec bash slurm/train.sh "$@"
